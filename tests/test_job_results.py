"""What a finished job reports and keeps (issue 15), against a real ``backend serve`` (fake pipeline):
``result_ready`` and ``jobs`` carry warnings, the preset that ran, model, device, seed and
duration; every finished job has a 128² ``thumbnail.png`` to fetch; ``delete_job`` removes a
finished job (record, folder) for good and refuses a running one."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from backend.server.client import BackendClient, BackendError
from backend.server.launcher import ServerProcess

FAKE = "tests.fake_pipeline:run_job"
QUICK = {"test.steps": 4, "test.step_seconds": 0.005, "test.preview_every": 0}


def test_result_facts_thumbnail_and_delete(tmp_path):
    data = tmp_path / "data"
    srv = ServerProcess(data, tmp_path / "conn.json", pipeline=FAKE).start()
    try:
        with BackendClient(srv.info) as c:
            c.hello()
            job = c.submit({"prompt": "a wooden chair", "preset": "auto", "seed": None,
                            "overrides": {**QUICK, "test.warning": "the model does not know chair"}})
            result = c.wait_result(job, timeout=60)
            facts = {k: result.content.get(k) for k in ("warnings", "resolved_preset", "model", "device", "seed")}
            seed = facts.pop("seed")  # none was asked for: the seed the backend chose and ran
            assert isinstance(seed, int) and 0 <= seed < 2**31
            assert facts == {"warnings": ["the model does not know chair"], "resolved_preset": "cpu",
                             "model": "fake-icosphere", "device": "CPU"}
            assert 0 < result.content["duration_s"] < 60
            entry = next(e for e in c.list_jobs() if e["job_id"] == job)
            assert entry["thumbnail"] is True and entry["warnings"] == facts["warnings"] and entry["seed"] == seed
            assert entry["created"] <= entry["started"] <= entry["finished"] and entry["duration_s"] > 0
            png = c.fetch(job, "thumbnail.png")
            with Image.open(io.BytesIO(png)) as im:
                assert im.size == (128, 128) and im.mode == "RGBA"
                alpha = im.getchannel("A")
                assert alpha.getextrema() == (0, 255)  # an object on a transparent background

            slow = c.submit({"prompt": "a slow cube", "preset": "draft", "seed": 1,
                             "overrides": {**QUICK, "test.steps": 400, "test.step_seconds": 0.05}})
            c.next(lambda m: m.job_id == slow and m.msg_type == "progress", timeout=30)
            with pytest.raises(BackendError) as err:
                c.request("delete_job", {}, job_id=slow, expect=("job_deleted",))
            assert err.value.code == "not_deletable"
            c.cancel(slow)

            reply = c.request("delete_job", {}, job_id=job, expect=("job_deleted",))
            assert reply.job_id == job and not (data / job).exists()
            assert job not in [e["job_id"] for e in c.list_jobs()]
            with pytest.raises(BackendError) as err:
                c.request("delete_job", {}, job_id=job, expect=("job_deleted",))
            assert err.value.code in ("unknown_job", "no_such_job")
        srv.stop()
        srv = ServerProcess(data, tmp_path / "conn.json", pipeline=FAKE).start()  # gone after a restart too
        with BackendClient(srv.info) as c:
            assert job not in [e["job_id"] for e in c.list_jobs()]
    finally:
        srv.stop()

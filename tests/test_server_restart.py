"""kill -9 of the server mid-job, restart on the same data directory: nothing finished is lost."""

from __future__ import annotations

import hashlib
import json
import time

import pytest

from backend.server.client import BackendClient, BackendError, BackendTimeout
from backend.server.launcher import ServerProcess

FAKE = "tests.fake_pipeline:run_job"
QUICK = {"test.steps": 4, "test.step_seconds": 0.005, "test.no_obj": False}
LONG = {"test.steps": 100000, "test.step_seconds": 0.01}


def p(overrides, prompt="restart test"):
    return {"prompt": prompt, "preset": "draft", "seed": 1, "overrides": overrides}


@pytest.mark.slow
def test_kill9_mid_job_then_restart(tmp_path):
    data, conn = tmp_path / "data", tmp_path / "conn.json"
    srv = ServerProcess(data, conn, pipeline=FAKE, args=["--queue-limit", "2"]).start()
    try:
        c = BackendClient(srv.info)
        done_id = c.submit(p(QUICK, "finished before the crash"))
        result = c.wait_result(done_id, 60)
        glb = (data / done_id / "result" / result.content["name"]).read_bytes()
        session1 = c.ping().server_session

        running_id = c.submit(p(LONG))
        c.next(lambda m: m.job_id == running_id and m.msg_type == "progress", 30)
        queued = [c.submit(p(QUICK, f"queued {i}")) for i in range(2)]
        with pytest.raises(BackendError) as e:
            c.submit(p(QUICK, "one too many"))
        assert e.value.code == "queue_full" and e.value.retriable

        time.sleep(1.5)  # let a few hundred progress events go out (and a seq checkpoint happen)
        last_seen = max(m.seq for m in c.inbox if m.job_id == running_id and m.seq is not None)
        while c.sock.poll(0):
            m = c._read(0)
            if m is not None and m.job_id == running_id and m.seq is not None:
                last_seen = max(last_seen, m.seq)
        killed_at = time.monotonic()
        srv.kill9()
        # the client pings every 0.25 s with a 0.5 s deadline: it notices the dead server quickly
        noticed = None
        while noticed is None:
            try:
                c.ping(timeout=0.5)
                time.sleep(0.25)
            except BackendTimeout:
                noticed = time.monotonic() - killed_at
            assert time.monotonic() - killed_at < 10
        assert noticed < 3.0
        c.close()
    finally:
        srv.kill9()

    srv2 = ServerProcess(data, conn, pipeline=FAKE).start()
    try:
        c2 = BackendClient(srv2.info)
        assert c2.ping().server_session != session1  # a client can tell the server restarted
        st = c2.status(running_id).content
        assert st["job_state"] == "interrupted" and st["error"]["code"] == "interrupted"
        assert st["state"] in ("interrupted", "failed")
        for q in queued:
            assert c2.status(q).content["job_state"] == "interrupted"
        # the finished job is intact: listed, status done, fetchable byte for byte
        listed = {j["job_id"]: j for j in c2.list_jobs()}
        assert listed[done_id]["state"] == "done"
        assert c2.fetch(done_id) == glb
        assert hashlib.sha256(glb).hexdigest() == c2.status(done_id).content["result"]["files"][0]["sha256"]
        # attaching to a finished job replays its final event with the original seq
        c2.attach(done_id, from_seq=1)
        final = c2.next(lambda m: m.job_id == done_id and m.seq is not None, 10)
        assert final.msg_type == "result_ready" and final.seq == result.seq
        assert final.mesh() is not None
        # attaching to the interrupted job tells the client so, even one that resumes from the
        # last seq it saw (its final event is numbered past anything the dead server sent)
        c2.attach(running_id, from_seq=last_seen + 1)
        err = c2.next(lambda m: m.job_id == running_id and m.seq is not None, 10)
        assert err.msg_type == "error" and err.content["code"] == "interrupted"
        assert err.seq > last_seen
        # the journal on disk agrees
        record = json.loads((data / running_id / "job.json").read_text())
        assert record["state"] == "interrupted"
        # and the restarted server runs new jobs
        new_id = c2.submit(p(QUICK, "after restart"))
        assert c2.wait_result(new_id, 60).msg_type == "result_ready"
        c2.close()
    finally:
        assert srv2.stop() == 0, srv2.log()
    assert not conn.exists()  # a clean stop removes the connection file
    assert "interrupted" in srv2.log()  # and the restart said which jobs it found interrupted

"""``conjure-backend generate`` / ``jobs`` / ``keys`` as real processes, plus the job store on disk."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import uuid
from types import SimpleNamespace

import numpy as np
import pytest
import trimesh

from backend.cli import main, parse_sets
from backend.server import jobs as J
from backend.server.jobs import JobRecord, JobStore, read_data_dir
from backend.server.launcher import REPO_ROOT

FAKE = "tests.fake_pipeline:run_job"


def cli(*args, timeout=120):
    """``python -m backend ...`` as a real process."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, "-m", "backend", *map(str, args)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def cli_here(capsys, *args):
    """``backend.cli.main`` in this process (for the fast paths); returns (code, stdout, stderr)."""
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


def test_generate_writes_glb_and_obj_next_to_it(tmp_path):
    out = tmp_path / "out" / "chair.glb"
    r = cli("generate", "a small chair", "--out", out, "--preset", "draft", "--seed", 3,
            "--set", "test.steps=5", "--set", "test.subdivisions=3", "--pipeline", FAKE)
    assert r.returncode == 0, r.stderr
    assert f"wrote {out}" in r.stdout and "model: fake-icosphere" in r.stdout and "seed 3" in r.stdout
    assert "coarse" in r.stderr and "5/5" in r.stderr  # the progress bar
    scene = trimesh.load(out)
    mesh = next(iter(scene.geometry.values()))
    assert len(mesh.faces) == 20 * 4**3
    # Blender Z-up sphere written as glTF Y-up: still a sphere centred at the origin
    assert np.allclose(mesh.vertices.mean(axis=0), 0, atol=0.05)
    for suffix in (".obj", ".mtl", ".png"):
        assert out.with_suffix(suffix).exists()
    assert "mtllib chair.mtl" in out.with_suffix(".obj").read_text()
    assert "map_Kd chair.png" in out.with_suffix(".mtl").read_text()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".conjure-")]  # work dir removed


def test_generate_reports_bad_input_clearly(tmp_path, capsys):
    cli = functools.partial(cli_here, capsys)
    r = cli("generate", "x", "--out", tmp_path / "a.glb", "--set", "nokey", "--pipeline", FAKE)
    assert r.returncode == 2 and "must look like section.field=value" in r.stderr
    r = cli("generate", "x", "--out", tmp_path / "a.glb", "--set", "test.stepz=3", "--pipeline", FAKE)
    assert r.returncode == 2 and "unknown override 'test.stepz'" in r.stderr
    r = cli("generate", "   ", "--out", tmp_path / "a.glb", "--pipeline", FAKE)
    assert r.returncode == 2 and "prompt" in r.stderr
    r = cli("generate", "x", "--out", tmp_path / "a.obj", "--pipeline", FAKE)
    assert r.returncode == 2 and "--out must end in .glb" in r.stderr


def test_parse_sets_types():
    assert parse_sets(["a.b=3", "a.c=0.5", "a.d=true", "a.e=hello", "a.f=1,2"]) == {
        "a.b": 3, "a.c": 0.5, "a.d": True, "a.e": "hello", "a.f": "1,2"}


def _record(job_id, state=J.QUEUED):
    return JobRecord(job_id=job_id, prompt=f"prompt {job_id[:4]}", seed=1, state=state)


def test_store_recovers_after_a_crash(tmp_path):
    store = JobStore(tmp_path).open()
    ids = [str(uuid.uuid4()) for _ in range(3)]
    for i in ids:
        store.add(_record(i))
    store.set_state(store.get(ids[0]), J.RUNNING)
    store.set_state(store.get(ids[1]), J.RUNNING)
    rec = store.get(ids[1])
    rdir = store.result_dir(ids[1])
    rdir.mkdir(parents=True)
    (rdir / "model.glb").write_bytes(b"glTF....")
    rec.results = {"glb": {"name": "model.glb", "size": 8, "sha256": "0" * 64}}
    store.set_state(rec, J.DONE)
    # simulate a crash: no close() (the dead process's data-directory lock goes with it); a torn
    # line at the end of the journal
    with pytest.raises(J.DataDirLocked, match=f"pid {os.getpid()}"):  # while held, a second store refuses
        JobStore(tmp_path).open()
    store.unlock()
    with open(tmp_path / J.JOURNAL_FILE, "ab") as f:
        f.write(b'{"job_id": "' + ids[2].encode() + b'", "sta')
    again = JobStore(tmp_path).open()
    assert again.get(ids[0]).state == J.INTERRUPTED  # was running
    assert again.get(ids[2]).state == J.INTERRUPTED  # was queued
    assert again.get(ids[1]).state == J.DONE
    assert sorted(again.recovered_interrupted) == sorted([ids[0], ids[2]])
    lines = (tmp_path / J.JOURNAL_FILE).read_text().splitlines()
    assert len(lines) == 3  # compacted: one line per job
    assert json.loads((tmp_path / ids[0] / J.JOB_FILE).read_text())["state"] == J.INTERRUPTED
    again.close()
    # a result file that went missing is reported, not served
    (rdir / "model.glb").unlink()
    third = JobStore(tmp_path).open()
    assert third.get(ids[1]).state == J.FAILED and third.get(ids[1]).error["code"] == "result_missing"
    third.close()


def test_jobs_command_lists_the_data_dir(tmp_path, capsys):
    cli = functools.partial(cli_here, capsys)
    store = JobStore(tmp_path).open()
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    store.add(_record(a))
    store.add(_record(b))
    store.set_state(store.get(b), J.CANCELLED)
    store.close()
    r = cli("jobs", "--data-dir", tmp_path)
    assert r.returncode == 0, r.stderr
    assert a in r.stdout and b in r.stdout and "cancelled" in r.stdout and "2 job(s)" in r.stdout
    r = cli("jobs", "--data-dir", tmp_path, "--json")
    assert {j["job_id"]: j["state"] for j in json.loads(r.stdout)} == {a: "queued", b: "cancelled"}
    assert [x.job_id for x in read_data_dir(tmp_path)][0] in (a, b)
    r = cli("jobs", "--data-dir", tmp_path / "empty")
    assert r.returncode == 0 and "no jobs" in r.stdout


def test_keys_command(tmp_path, capsys):
    cli = functools.partial(cli_here, capsys)
    r = cli("keys", "--dir", tmp_path / "k", "--client", "laptop")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "k" / "clients" / "laptop.key").exists()
    assert (os.stat(tmp_path / "k" / "server.key_secret").st_mode & 0o777) == 0o600
    r = cli("keys", "--dir", tmp_path / "k", "--client", "bad name!")
    assert r.returncode == 2 and "client name" in r.stderr


def test_generate_refuses_a_gpu_only_setting_without_the_gpu_packages(tmp_path, capsys):
    import importlib.util

    import pytest

    if importlib.util.find_spec("gsplat") is not None:
        pytest.skip("gsplat is installed here; the refusal path needs a machine without it")
    r = cli_here(capsys, "generate", "a red cube", "--out", tmp_path / "a.glb", "--preset", "draft",
                 "--set", "coarse.renderer=gsplat")
    assert r.returncode == 2
    assert "coarse.renderer='gsplat'" in r.stderr and "conjure[gpu]" in r.stderr
    assert not (tmp_path / "a.glb").exists()

"""End to end with bpy 5.0.1 and a real backend process (the fake test pipeline): the headless
API and the Generate operator (both block in background mode), errors, timeouts, a backend
killed mid-job and brought back."""

from __future__ import annotations

import time

import pytest

from tests.addon_support import backend_process, body_main, enable_addon, have_bpy, run_body

pytestmark = pytest.mark.skipif(not have_bpy(), reason="bpy 5.0.1 not installed")

FAST = {"test.steps": 6, "test.step_seconds": 0.02, "test.preview_every": 2, "test.subdivisions": 3}


backend = pytest.fixture(backend_process)


def _body_api(args):
    bpy = enable_addon()
    from blender_addon import api
    from blender_addon.runtime import RUNTIME

    conn = args["conn"]
    bpy.context.scene.cursor.location = (2.0, 0.0, 0.0)
    t0 = time.monotonic()
    obj = api.generate("a blue ball", seed=7, preset="draft", overrides=args["fast"], connection=conn,
                       previews=True)
    seconds = time.monotonic() - t0
    out = {
        "name": obj.name, "verts": len(obj.data.vertices), "faces": len(obj.data.polygons),
        "loc": list(obj.location), "props": {k: list(obj[k]) if k == "conjure_warnings" else obj[k] for k in obj.keys()
                                           if k.startswith("conjure_")},
        "objects": len(bpy.data.objects), "meshes": len(bpy.data.meshes),
        "previews_applied": RUNTIME.stats["previews_applied"], "seconds": seconds,
        "color_attrs": [a.name for a in obj.data.color_attributes],
    }
    # history: list_jobs, then re-import the finished job (re-attach from seq 1)
    client = RUNTIME.client
    client.list_jobs()
    t0 = time.monotonic()
    while client.history is None and time.monotonic() - t0 < 10:
        RUNTIME.process(0.05, timeout_ms=20)
    out["history"] = [(h.get("prompt"), h.get("state")) for h in client.history or []]
    bpy.context.scene.cursor.location = (0.0, 4.0, 0.0)
    again = RUNTIME.reimport(obj["conjure_job_id"], params={"prompt": "a blue ball"})
    t0 = time.monotonic()
    while again.imported_object is None and not (again.finished and again.state != "done") \
            and time.monotonic() - t0 < 20:
        RUNTIME.process(0.05, timeout_ms=20)
    re_obj = bpy.data.objects.get(again.imported_object or "")
    out["reimport"] = {"state": again.state, "name": re_obj.name if re_obj else None,
                       "faces": len(re_obj.data.polygons) if re_obj else None,
                       "loc": list(re_obj.location) if re_obj else None,
                       "job": re_obj.get("conjure_job_id") if re_obj else None}
    bpy.data.objects.remove(re_obj)
    # the operator blocks in background mode too; settings come from the scene
    s = bpy.context.scene.conjure
    s.prompt = "a green cube"
    s.random_seed = False
    s.seed = 11
    s.preset = "cpu"
    s.extra_overrides = "; ".join(f"{k}={v}" for k, v in args["fast"].items())
    bpy.context.scene.cursor.location = (-2.0, 1.0, 0.0)
    res = bpy.ops.conjure.generate()
    op_obj = bpy.data.objects.get("a green cube")
    out["op"] = {"result": sorted(res), "exists": op_obj is not None,
                 "loc": list(op_obj.location) if op_obj else None,
                 "seed": op_obj.get("conjure_seed") if op_obj else None,
                 "preset": op_obj.get("conjure_preset") if op_obj else None}
    # a parameter the backend refuses -> ConjureError with its code
    try:
        api.generate("x", overrides={"nope.knob": 1}, connection=conn, timeout=20)
        out["bad"] = None
    except api.ConjureError as e:
        out["bad"] = [e.code, e.message]
    # a timeout cancels the job and says so
    slow = dict(args["fast"], **{"test.steps": 200, "test.step_seconds": 0.05})
    t0 = time.monotonic()
    try:
        api.generate("slow", overrides=slow, connection=conn, timeout=1.0)
        out["timeout"] = None
    except api.ConjureError as e:
        out["timeout"] = [e.code, time.monotonic() - t0]
        timed_out_job = e.job_id
    job = RUNTIME.client.jobs[timed_out_job]
    deadline = time.monotonic() + 5
    while job.state != "cancelled" and time.monotonic() < deadline:
        RUNTIME.process(0.05, timeout_ms=20)
    out["timeout_job_state"] = job.state
    out["objects_end"] = sorted(o.name for o in bpy.data.objects)
    api.disconnect()
    return out


def test_headless_api_and_operator_end_to_end(backend):
    r = run_body(__file__, "api", {"conn": str(backend.conn), "fast": FAST}, timeout=180)
    assert r["name"] == "a blue ball"
    assert r["verts"] == 642 and r["faces"] == 1280  # icosphere, 3 subdivisions
    assert r["loc"] == pytest.approx([2.0, 0.0, 0.0])
    assert r["props"]["conjure_prompt"] == "a blue ball" and r["props"]["conjure_seed"] == 7
    assert r["props"]["conjure_preset"] == "draft" and len(r["props"]["conjure_job_id"]) == 36
    assert r["color_attrs"] == ["Col"]
    assert r["objects"] == 1 and r["meshes"] == 1, "previews must not leave objects or meshes behind"
    assert r["previews_applied"] >= 1
    assert ("a blue ball", "done") in [tuple(h) for h in r["history"]]
    ri = r["reimport"]
    assert ri["state"] == "done" and ri["name"].startswith("a blue ball") and ri["faces"] == 1280
    assert ri["loc"] == pytest.approx([0.0, 4.0, 0.0]) and ri["job"] == r["props"]["conjure_job_id"]
    assert r["op"]["result"] == ["FINISHED"] and r["op"]["exists"]
    assert r["op"]["loc"] == pytest.approx([-2.0, 1.0, 0.0])
    assert r["op"]["seed"] == 11 and r["op"]["preset"] == "cpu"
    assert r["bad"] is not None and r["bad"][0] == "invalid_params" and "nope.knob" in r["bad"][1]
    assert r["timeout"] is not None and r["timeout"][0] == "timeout" and r["timeout"][1] < 3.0
    assert r["timeout_job_state"] == "cancelled"
    assert r["objects_end"] == ["a blue ball", "a green cube"]


def _body_restart(args):
    import json
    import sys

    bpy = enable_addon()
    from blender_addon import api
    from blender_addon.runtime import RUNTIME

    conn = args["conn"]
    client = api.connect(conn)
    deadline = time.monotonic() + 10
    while client.state != "connected" and time.monotonic() < deadline:
        RUNTIME.process(0.05, timeout_ms=20)
    slow = dict(args["fast"], **{"test.steps": 400, "test.step_seconds": 0.05})
    job = RUNTIME.submit({"prompt": "a slow vase", "seed": 1, "preset": "draft", "overrides": slow})
    while job.state != "running" and time.monotonic() < deadline:
        RUNTIME.process(0.05, timeout_ms=20)
    first_session = client.server_session
    # the test process kills the backend now
    print("KILL", flush=True)
    sys.stdout.flush()
    cmd = json.loads(sys.stdin.readline())
    assert cmd == "killed"
    t_kill = time.monotonic()
    while client.state != "lost" and time.monotonic() - t_kill < 10:
        RUNTIME.process(0.05, timeout_ms=20)
    noticed = time.monotonic() - t_kill
    status_lost = RUNTIME.status()
    print("RESTART", flush=True)
    cmd = json.loads(sys.stdin.readline())
    assert cmd == "restarted"
    t_back = time.monotonic()
    while (client.state != "connected" or not job.finished) and time.monotonic() - t_back < 20:
        RUNTIME.process(0.05, timeout_ms=20)
    recovered = time.monotonic() - t_back
    out = {"noticed": noticed, "status_lost": list(status_lost), "state_after": client.state,
           "recovered": recovered, "job_state": job.state, "job_error": job.error.code if job.error else None,
           "restarts": client.stats["restarts"], "new_session": client.server_session != first_session,
           "preview_objects": len(bpy.data.objects), "trace": [list(t) for t in client.trace if t[0] != "pong"][-12:]}
    obj = api.generate("after restart", overrides=args["fast"], timeout=60)
    out["after_obj"] = obj.name
    # the interrupted job's Resubmit: same settings (seed included), a new job id, and it finishes
    RUNTIME.requests[job.job_id]["overrides"] = dict(args["fast"])  # the same job, only shorter
    again = RUNTIME.resubmit(job.job_id)
    t0 = time.monotonic()
    while again.imported_object is None and not (again.finished and again.state != "done") \
            and time.monotonic() - t0 < 30:
        RUNTIME.process(0.05, timeout_ms=20)
    out["resubmit"] = {"new_id": again.job_id != job.job_id, "prompt": again.prompt,
                       "seed": again.params["seed"], "state": again.state, "object": again.imported_object}
    api.disconnect()
    return out


def test_backend_killed_mid_job_is_noticed_and_recovered(backend, tmp_path):
    import json
    import os
    import subprocess
    import sys

    from tests.addon_support import REPO

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    args = json.dumps({"conn": str(backend.conn), "fast": FAST})
    proc = subprocess.Popen([sys.executable, __file__, "restart", args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO), env=env)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("KILL"):
                backend.kill()
                proc.stdin.write(json.dumps("killed") + "\n")
                proc.stdin.flush()
            elif line.startswith("RESTART"):
                backend.start()
                proc.stdin.write(json.dumps("restarted") + "\n")
                proc.stdin.flush()
            elif line.startswith("RESULT "):
                break
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    result_lines = [ln for ln in lines if ln.startswith("RESULT ")]
    assert result_lines, "".join(lines) + proc.stderr.read()[-4000:]
    r = json.loads(result_lines[-1][len("RESULT "):])
    assert r["noticed"] < 3.0, r
    # the killed backend closed its connection: "lost" at once (a busy one would be "slow")
    assert r["status_lost"][0] == "lost" and "closed the connection" in r["status_lost"][1]
    assert r["state_after"] == "connected" and r["new_session"] and r["restarts"] >= 1
    assert r["job_state"] in ("interrupted", "failed") and r["job_error"] == "interrupted", json.dumps(r)
    assert r["preview_objects"] == 0, "the interrupted job's preview is removed"
    assert r["after_obj"] == "after restart"
    assert r["resubmit"] == {"new_id": True, "prompt": "a slow vase", "seed": 1, "state": "done",
                             "object": "a slow vase"}


def test_make_props_example_fills_a_scene(backend, tmp_path):
    import subprocess
    import sys

    from tests.addon_support import REPO

    out = tmp_path / "props.blend"
    cmd = [sys.executable, str(REPO / "examples/make_props.py"), "--out", str(out), "--connection",
           str(backend.conn), "--preset", "draft", "--prompt", "a barrel", "--prompt", "a lantern",
           "--prompt", "a mushroom", "--spacing", "3"]
    for k, v in FAST.items():
        cmd += ["--set", f"{k}={v}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    made = [ln for ln in proc.stdout.splitlines() if ln.startswith("made ")]
    assert len(made) == 3 and "at (6.0, 0.0, 0.0)" in made[2], made
    assert out.exists() and out.stat().st_size > 10_000


def _body_local(args):
    import sys

    bpy = enable_addon()
    from blender_addon import api
    from blender_addon.prefs_access import get_prefs
    from blender_addon.runtime import RUNTIME

    prefs = get_prefs()
    prefs.mode = "LOCAL"
    prefs.python_path = sys.executable
    prefs.data_dir = args["dir"]
    prefs.device = "cpu"
    prefs.backend_args = "--pipeline tests.fake_pipeline:run_job"
    backend = RUNTIME.start_backend(prefs)
    t0 = time.monotonic()
    statuses = set()
    while (RUNTIME.client is None or RUNTIME.client.state != "connected") and time.monotonic() - t0 < 60:
        RUNTIME.process(0.05, timeout_ms=20)
        statuses.add(RUNTIME.status().text.split("…")[0])
        time.sleep(0.02)
    out = {"connected": RUNTIME.client is not None and RUNTIME.client.state == "connected",
           "statuses": sorted(statuses), "conn_file": RUNTIME.client.connection_file if RUNTIME.client else None,
           "cmd": backend.command()}
    obj = api.generate("a local ball", overrides=args["fast"], timeout=60)
    out["obj"] = obj.name
    proc = backend.proc
    bpy.ops.conjure.stop_backend()
    out["stopped"] = proc.poll() is not None
    out["client_after_stop"] = RUNTIME.client is not None
    return out


def test_local_backend_started_and_stopped_from_preferences(tmp_path):
    r = run_body(__file__, "local", {"dir": str(tmp_path / "data"), "fast": FAST}, timeout=180)
    assert r["connected"] and "Starting backend" in r["statuses"]
    assert r["conn_file"] == str(tmp_path / "data" / "connection.json")
    assert "--data-dir" in r["cmd"] and "tests.fake_pipeline:run_job" in r["cmd"]
    assert r["obj"] == "a local ball"
    assert r["stopped"] and not r["client_after_stop"]


def test_unreachable_backend_raises_clear_error(tmp_path):
    r = run_body(__file__, "unreachable", {"dir": str(tmp_path)})
    assert r["missing"][0] == "no_connection_file" and r["missing"][2] == "start_backend"
    assert r["silent"][0] == "backend_unreachable"


def _body_unreachable(args):
    import os

    enable_addon()
    from blender_addon import api
    from blender_addon.api import ConjureError
    from protocol import ConnectionInfo, write_connection_file

    out = {}
    try:
        api.generate("x", connection=os.path.join(args["dir"], "missing.json"))
    except ConjureError as e:
        out["missing"] = [e.code, e.message, e.action]
    path = write_connection_file(os.path.join(args["dir"], "c.json"),
                                 ConnectionInfo("tcp", "127.0.0.1", 1, b"k" * 32, "1.0"))
    api.LOST_GIVE_UP_S = 0.5
    try:
        api.generate("x", connection=str(path), timeout=30)
    except ConjureError as e:
        out["silent"] = [e.code, e.message]
    api.disconnect()
    return out


if __name__ == "__main__":
    body_main(globals())

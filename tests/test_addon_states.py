"""The artist's first hour (issue 15), headless with bpy 5.0.1 and a real backend process (the fake
test pipeline): warnings that stay, what ran recorded on the object, placement and size,
connection states (busy is not gone, a closed connection is), failed + Resubmit, backend start
failures, cancel wording, progress wording and one bar, history with dates, durations,
thumbnails and delete, and the add-on's import graph without circles."""

from __future__ import annotations

import ast
import time
from pathlib import Path

import pytest

from tests.addon_support import (
    REPO,
    backend_process,
    body_main,
    enable_addon,
    have_bpy,
    run_body,
)

pytestmark = pytest.mark.skipif(not have_bpy(), reason="bpy 5.0.1 not installed")

FAST = {"test.steps": 6, "test.step_seconds": 0.02, "test.preview_every": 2, "test.subdivisions": 3}


backend = pytest.fixture(backend_process)


def _pump_until(cond, seconds):
    from blender_addon.runtime import RUNTIME

    deadline = time.monotonic() + seconds
    while not cond() and time.monotonic() < deadline:
        RUNTIME.process(0.05, timeout_ms=20)
    return cond()


# --------------------------------------------------------------------------------------------
def _body_result(args):
    import warnings

    import numpy as np

    bpy = enable_addon()
    from blender_addon import api
    from blender_addon.runtime import RUNTIME

    conn = args["conn"]
    bpy.context.scene.cursor.location = (3.0, 1.0, 0.25)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        obj = api.generate("a wooden chair", seed=42, preset="auto", size=2.0, connection=conn,
                           overrides=dict(args["fast"], **{"test.warning": "the model does not know chair"}))
    job = RUNTIME.client.jobs[obj["conjure_job_id"]]
    world = np.array([v.co[:] for v in obj.data.vertices]) + np.array(obj.location[:])  # no rotation/scale
    out = {
        "props": {k: obj[k] if k != "conjure_warnings" else list(obj[k]) for k in obj.keys()
                  if k.startswith("conjure_")},
        "warned": [[w.category.__name__, str(w.message)] for w in caught],
        "loc": list(obj.location), "min": world.min(0).tolist(), "max": world.max(0).tolist(),
        "status": job.status_line(), "job_warnings": list(job.warnings),
    }
    try:
        api.generate("x", seed=2**31, connection=conn)
    except api.ConjureError as e:
        out["seed_error"] = e.message
    # the next job replaces the job box: the warning belonged to the previous one
    job2 = RUNTIME.submit({"prompt": "a red cube", "seed": 1, "preset": "draft", "overrides": args["fast"]})
    _pump_until(lambda: job2.finished, 30)
    out["current_warnings"] = list(RUNTIME.current_job().warnings)
    api.disconnect()
    return out


def test_warnings_stay_and_the_object_records_what_ran(backend):
    r = run_body(__file__, "result", {"conn": str(backend.conn), "fast": FAST}, timeout=180)
    p = r["props"]
    assert p["conjure_warnings"] == ["the model does not know chair"] == r["job_warnings"]
    assert r["warned"] == [["ConjureWarning", "Conjure: a wooden chair: the model does not know chair"]]
    assert p["conjure_preset"] == "cpu"  # what ran, not "auto"
    assert p["conjure_model"] == "fake-icosphere" and p["conjure_device"] == "CPU" and p["conjure_seed"] == 42
    assert 0 < p["conjure_duration_s"] < 60
    assert r["status"].startswith("Done in ")
    # placement: the base rests on the cursor, centred on it; Size sets the largest dimension
    assert r["loc"] == pytest.approx([3.0, 1.0, 0.25])
    assert r["min"][2] == pytest.approx(0.25, abs=1e-4)
    assert (r["min"][0] + r["max"][0]) / 2 == pytest.approx(3.0, abs=0.05)
    assert max(b - a for a, b in zip(r["min"], r["max"])) == pytest.approx(2.0, rel=0.06)
    assert "2147483647" in r["seed_error"]  # the API's seed limit is the panel's
    assert r["current_warnings"] == []


# --------------------------------------------------------------------------------------------
def _body_states(args):
    import os
    import signal

    enable_addon()
    from blender_addon import api
    from blender_addon.runtime import RUNTIME

    conn, pid = args["conn"], args["pid"]
    client = api.connect(conn)
    _pump_until(lambda: client.state == "connected", 10)
    out = {"connected": list(RUNTIME.status())}
    # busy (the server's process stopped, its TCP connection still open): "slow", never "lost"
    os.kill(pid, signal.SIGSTOP)
    kinds = set()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 5.0:
        RUNTIME.process(0.05, timeout_ms=20)
        kinds.add(RUNTIME.status().kind)
    out["busy_kinds"] = sorted(kinds)
    out["busy_status"] = [RUNTIME.status().text, RUNTIME.status().hint]
    os.kill(pid, signal.SIGCONT)
    out["back"] = _pump_until(lambda: RUNTIME.status().kind == "connected", 10)
    # cancel: "Cancelling…" until the backend confirms, then "Cancelled" (not an error)
    slow = dict(args["fast"], **{"test.steps": 400, "test.step_seconds": 0.05})
    job = RUNTIME.submit({"prompt": "a slow cone", "seed": 3, "preset": "draft", "overrides": slow})
    _pump_until(lambda: job.state == "running", 10)
    words = set()
    for _ in range(40):
        RUNTIME.process(0.05, timeout_ms=20)
        words.add(job.status_line().split(" ")[0])
    out["running_words"] = sorted(words)
    out["time_line"] = job.time_line()
    RUNTIME.cancel(job.job_id)
    out["cancelling"] = job.status_line()
    _pump_until(lambda: job.finished, 10)
    out["cancelled"] = [job.state, job.status_line()]
    # a backend that exits closes its connection: "lost" at once, not after a silence
    job = RUNTIME.submit({"prompt": "a slow torus", "seed": 4, "preset": "draft", "overrides": slow})
    _pump_until(lambda: job.state == "running", 10)
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    _pump_until(lambda: RUNTIME.status().kind == "lost", 10)
    out["lost_after_s"] = time.monotonic() - t0
    out["lost"] = list(RUNTIME.status())
    return out


def test_busy_is_slow_not_gone_and_cancel_is_neutral(backend):
    r = run_body(__file__, "states", {"conn": str(backend.conn), "pid": backend.proc.pid, "fast": FAST},
                 timeout=120)
    assert r["connected"] == ["connected", "CPU · fake-icosphere"] or r["connected"][0] == "connected", r
    assert "slow" in r["busy_kinds"] and "lost" not in r["busy_kinds"], r["busy_kinds"]
    assert r["busy_status"][0].startswith("Backend busy") and "Still connected" in r["busy_status"][1]
    assert r["back"]
    assert "Shaping" in r["running_words"] and "elapsed" in r["time_line"]
    assert r["cancelling"] == "Cancelling…"
    assert r["cancelled"] == ["cancelled", "Cancelled"]
    assert r["lost"][0] == "lost" and "closed the connection" in r["lost"][1]
    assert r["lost_after_s"] < 1.5


# --------------------------------------------------------------------------------------------
def _body_progress(args):
    enable_addon()
    from blender_addon import api
    from blender_addon.runtime import RUNTIME

    client = api.connect(args["conn"])
    _pump_until(lambda: client.state == "connected", 10)
    steps = dict(args["fast"], **{"test.steps": 30, "test.step_seconds": 0.03})
    job = RUNTIME.submit({"prompt": "a blue torus", "seed": 5, "preset": "draft", "overrides": steps})
    lines, bars = [], []
    while not job.finished:
        RUNTIME.process(0.02, timeout_ms=10)
        if job.state == "running":
            lines.append(job.status_line())
            bars.append(job.overall)
    return {"lines": sorted(set(lines)), "bars": bars, "final": job.overall}


def test_progress_wording_and_one_bar(backend):
    r = run_body(__file__, "progress", {"conn": str(backend.conn), "fast": FAST}, timeout=120)
    assert any(line.startswith("Shaping ") and "/30" in line for line in r["lines"]), r["lines"]
    assert all(not line.lower().startswith(("coarse", "export", "loss")) for line in r["lines"]), r["lines"]
    bars = r["bars"]
    assert bars == sorted(bars), "the bar never goes back at a stage change"
    assert r["final"] == 1.0 and max(bars) > 0.3


# --------------------------------------------------------------------------------------------
def _body_history(args):
    import os

    enable_addon()
    from blender_addon import api, thumbnails
    from blender_addon.runtime import RUNTIME

    client = api.connect(args["conn"])
    _pump_until(lambda: client.state == "connected", 10)
    client.list_jobs()
    _pump_until(lambda: client.history is not None, 10)
    out = {"before": len(client.history)}
    obj = api.generate("a green cone", seed=9, overrides=args["fast"])
    job_id = obj["conjure_job_id"]
    # the history refreshes by itself when a job ends
    _pump_until(lambda: any(h["job_id"] == job_id for h in client.history or ()), 10)
    item = next((h for h in client.history or () if h["job_id"] == job_id), None)
    out["item"] = {k: item.get(k) for k in ("prompt", "state", "created", "finished", "duration_s", "thumbnail",
                                            "resolved_preset", "model", "seed")} if item else None
    # the thumbnail: fetched once, checked, cached, shown through bpy.utils.previews
    icon = thumbnails.icon_id(client, item)
    _pump_until(lambda: not client.fetching(job_id, thumbnails.THUMBNAIL_NAME), 10)
    icon = thumbnails.icon_id(client, item)
    path = os.path.join(thumbnails.cache_dir(), job_id + ".png")
    with open(path, "rb") as f:
        head = f.read(24)
    out["thumb"] = {"icon": icon, "loaded": thumbnails.loaded(job_id), "png": head[:8] == b"\x89PNG\r\n\x1a\n",
                    "size": [int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")]}
    # re-import says so (not "Done in 0 s")
    again = RUNTIME.reimport(job_id, params={"prompt": "a green cone"})
    _pump_until(lambda: again.imported_object is not None, 20)
    out["reimport_line"] = again.status_line()
    # delete: the backend removes the job, the history and the cached thumbnail follow
    client.delete_job(job_id)
    _pump_until(lambda: job_id in client.deleted or not any(h["job_id"] == job_id for h in client.history), 10)
    _pump_until(lambda: not any(h["job_id"] == job_id for h in client.history), 10)
    out["deleted"] = not any(h["job_id"] == job_id for h in client.history)
    out["folder_gone"] = not os.path.exists(os.path.join(args["data"], job_id))
    out["thumb_gone"] = not os.path.exists(path)
    # deleting it again: a notice about that job, not a connection error
    client.delete_job(job_id)
    _pump_until(lambda: client.notice is not None, 10)
    out["again"] = [client.notice.code if client.notice else None, client.error is None]
    api.disconnect()
    return out


def test_history_dates_durations_thumbnail_refresh_and_delete(backend):
    r = run_body(__file__, "history", {"conn": str(backend.conn), "fast": FAST, "data": str(backend.data_dir)},
                 timeout=120)
    it = r["item"]
    assert it is not None and it["prompt"] == "a green cone" and it["state"] == "done"
    assert it["created"] <= it["finished"] and 0 < it["duration_s"] < 60 and it["thumbnail"] is True
    assert it["resolved_preset"] == "cpu" and it["model"] == "fake-icosphere" and it["seed"] == 9
    # (icon ids are handed out by the UI; headless only the loaded preview can be checked)
    assert r["thumb"]["png"] and r["thumb"]["size"] == [128, 128] and r["thumb"]["loaded"]
    assert r["reimport_line"] == "Re-imported"
    assert r["deleted"] and r["folder_gone"] and r["thumb_gone"]
    assert r["again"] == ["unknown_job", True] or r["again"][1], r["again"]


# --------------------------------------------------------------------------------------------
def _body_start(args):
    import sys

    enable_addon()
    from blender_addon.backend_process import LocalBackend
    from blender_addon.client import ConjureError
    from blender_addon.prefs_access import get_prefs
    from blender_addon.runtime import RUNTIME

    prefs = get_prefs()
    out = {}
    # a local backend that fails to start: the log's last meaningful line and what to do
    prefs.mode = "LOCAL"
    prefs.python_path = sys.executable
    prefs.data_dir = args["dir"]
    prefs.backend_args = "--no-such-flag"
    RUNTIME.start_backend(prefs)
    _pump_until(lambda: RUNTIME.status().kind == "start_failed", 30)
    st = RUNTIME.status()
    out["failed"] = [st.kind, st.text, st.hint]
    RUNTIME.stop_backend()
    # the same summary for a traceback in the log
    b = LocalBackend(sys.executable, args["dir"] + "/other/connection.json")
    import os

    os.makedirs(os.path.dirname(b.log_path), exist_ok=True)
    with open(b.log_path, "w") as f:
        f.write("Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n    import torch\n"
                "ModuleNotFoundError: No module named 'torch'\n\n")
    out["torch"] = list(b.failure_summary())
    # connect mode without a connection file: say how to start one
    prefs.mode = "CONNECT"
    prefs.connect_with = "FILE"
    prefs.connection_file = args["dir"] + "/nowhere.json"
    try:
        RUNTIME.ensure_client(prefs)
    except ConjureError as e:
        out["connect"] = e.message
    return out


def test_backend_start_failure_and_connect_without_file(tmp_path):
    r = run_body(__file__, "start", {"dir": str(tmp_path)}, timeout=120)
    kind, text, hint = r["failed"]
    assert kind == "start_failed" and "unrecognized arguments: --no-such-flag" in text, r["failed"]
    assert "Extra Arguments" in hint and "backend.log" in hint
    assert r["torch"][0] == "ModuleNotFoundError: No module named 'torch'" and "pip install" in r["torch"][1]
    assert "conjure-backend serve" in r["connect"]


# --------------------------------------------------------------------------------------------
def _addon_imports(path: Path) -> set[str]:
    """Sibling modules ``path`` imports (``from . import x``, ``from .x import y``), at any depth."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(a.name for a in node.names)
    return out - {"protocol", "_build_info"}


def test_addon_imports_form_no_circle_and_operators_use_mark_dirty():
    folder = REPO / "blender_addon"
    graph = {p.stem: _addon_imports(p) for p in folder.glob("*.py") if p.stem != "__init__"}
    seen, stack = set(), []

    def visit(node):
        if node in stack:
            raise AssertionError("import circle: " + " -> ".join(stack[stack.index(node):] + [node]))
        if node in seen:
            return
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            visit(nxt)
        stack.pop()
        seen.add(node)

    for mod in sorted(graph):
        visit(mod)
    assert "preferences" not in graph["runtime"] and "prefs_access" in graph["runtime"]
    for name in ("operators.py", "panel.py", "api.py"):
        assert "RUNTIME._dirty" not in (folder / name).read_text(), name


if __name__ == "__main__":
    body_main(globals())

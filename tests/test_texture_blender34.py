"""Texture Selected from the panel in a real Blender 3.4 window (xvfb-run), real backend (test
pipeline): previews on a temporary copy, the object keeps topology/modifier/UV map/materials,
one undo step removes the texture. Screenshots land in ``artifacts/``."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from tests.addon_support import REPO, BackendProcess
from tests.test_addon_blender34 import install_addon, session_result

pytestmark = [pytest.mark.blender34, pytest.mark.slow]

STEPS = {"test.steps": 30, "test.step_seconds": 0.25, "test.preview_every": 2}


def test_blender34_texture_selected_from_the_panel(tmp_path, artifacts_dir):
    data = tmp_path / "data"
    data.mkdir()
    backend = BackendProcess(data)
    backend.start()
    scripts = tmp_path / "scripts"
    module = install_addon(scripts)
    out = tmp_path / "out"
    out.mkdir()
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"addon": module, "conn": str(backend.conn), "out": str(out),
                               "overrides": "; ".join(f"{k}={v}" for k, v in STEPS.items())}))
    env = dict(os.environ)
    env.update({"CONJURE_TEST_CONFIG": str(cfg), "BLENDER_USER_SCRIPTS": str(scripts),
                "BLENDER_USER_CONFIG": str(tmp_path / "config")})
    env.pop("PYTHONPATH", None)
    env["PATH"] = os.pathsep.join(["/usr/bin", "/bin", env.get("PATH", "")])
    log = open(tmp_path / "blender.log", "wb")
    proc = subprocess.Popen(["xvfb-run", "-a", "-s", "-screen 0 1280x720x24", "blender", "--factory-startup",
                             "--enable-event-simulate", "--python", str(REPO / "tests/blender34/texture_session.py")],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(tmp_path))
    try:
        deadline = time.monotonic() + 400
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if proc.poll() is None:
            proc.kill()
    finally:
        backend.stop()
        log.close()
    r = session_result(tmp_path, out, artifacts_dir, "blender34_texture")
    assert r.get("done") and r.get("tab_found") and r["poll_in_panel"]
    assert r["operator"] == ["FINISHED"]
    assert r["job"]["state"] == "done" and r["job"]["imported"] == "Cube", r["job"]
    assert r["hidden_during"] and "Cube (texturing) (preview)" in r["preview_objects"]
    b, a = r["before"], r["after"]
    assert a["polys"] == b["polys"] == 6 and a["quads"] == 6
    assert a["modifiers"] == b["modifiers"] == ["SUBSURF"]
    assert a["uv_maps"] == ["UVMap", "Conjure"] and b["uv_maps"] == ["UVMap"]
    assert a["materials"][0] == "Old Paint" and a["materials"][1].startswith("Conjure")
    assert not a["hidden"] and r["objects_after"] == sorted(["Camera", "Cube", "Light"])
    assert r["after_undo"] == b, "one undo step takes the texture away, and only it"
    assert len(r["screenshots"]) == 3

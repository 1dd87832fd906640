"""bench/gpu_smoke.sh --cpu-dry-run: the smoke script's CPU path runs every check and reports each one."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cpu_dry_run_reports_every_check(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), PYTHONPATH=str(REPO))
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_smoke.sh"), "--cpu-dry-run"], cwd=str(REPO), env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    results = [json.loads(line[3:]) for line in summary.splitlines() if line.startswith("## ")]
    assert not [r for r in results if "error" in r], [r for r in results if "error" in r]
    by = {}
    for r in results:
        by.setdefault(r["check"], []).append(r)
    assert by["env"][0]["device"] == "CPU" and by["env"][0]["will_run"]["renderers"] == "PyTorch renderers"
    assert {b["name"]: b["state"] for b in by["build"]} == {"gsplat": "unavailable", "nvdiffrast": "unavailable"}
    steps = by["guidance-step"]
    assert [(s["variant"], s["batch"]) for s in steps] == [("model-vae", 1), ("model-vae", 2), ("model-vae", 4),
                                                          ("taesd", 4)]
    assert all(s["grad_finite_nonzero"] and s["sds_fwd_bwd_ms"] > 0 for s in steps)
    assert steps[-1]["vae"] == "taesd"
    taesd = by["taesd-encoder"][0]
    assert taesd["kl_fwd_bwd_tflop"] > 5 * taesd["taesd_fwd_bwd_tflop"] > 0  # counted at 4 x 512^2 on meta tensors
    assert by["gauss-orientation"][0]["ok"] and by["texture-flip"][0]["ok"]
    assert by["gauss-vs-mesh-silhouette"][0]["ok"]
    assert by["densify-stats"][0]["visible"] > 0
    stages = {s["preset"]: s for s in by["stages"]}
    assert set(stages) == {"draft", "standard"}
    assert stages["standard"]["est_full_preset_s"] > 0 and "glb" in stages["standard"]["files"]
    assert "--- dry-run rc=0" in summary
    assert "[cpu dry run]" in proc.stdout

"""``conjure-backend texture IN "prompt" --out OUT.glb`` as a real process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from backend.mesh.load import load_mesh_file
from tests.texture_meshes import cube

REPO_ROOT = Path(__file__).resolve().parent.parent
FAKE = "tests.fake_pipeline:run_job"


def cli(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, "-m", "backend", *map(str, args)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def write_cube_obj(path: Path, nan: bool = False) -> np.ndarray:
    """An OBJ cube (+Y up, as Blender exports) with quads; returns its Blender-frame triangle positions."""
    pos, _ = cube(1.5)
    yup = np.stack([pos[:, 0], pos[:, 2], -pos[:, 1]], 1)
    lines = [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in yup]
    if nan:
        lines[2] = "v nan 0 0"
    quads = [(1, 2, 4, 3), (5, 7, 8, 6), (1, 5, 6, 2), (3, 4, 8, 7), (1, 3, 7, 5), (2, 6, 8, 4)]
    lines += [f"f {a} {b} {c} {d}" for a, b, c, d in quads]
    path.write_text("\n".join(lines) + "\n")
    return pos


def test_texture_cli_with_the_test_pipeline_keeps_positions(tmp_path):
    src = tmp_path / "cube.obj"
    write_cube_obj(src)
    before, _ = load_mesh_file(src)
    out = tmp_path / "out" / "painted.glb"
    r = cli("texture", src, "a green cube", "--out", out, "--color", "0.5,0.5,0.5",
            "--set", "test.steps=2", "--pipeline", FAKE)
    assert r.returncode == 0, r.stderr
    assert out.exists() and out.with_suffix(".png").exists()
    after, _ = load_mesh_file(out)
    assert after.texture_rgba is not None and after.uvs is not None
    # the GLB splits vertices at UV seams; every output position is an input position, bit for bit
    assert set(map(bytes, after.positions)) == set(map(bytes, before.positions))
    assert "wrote" in r.stdout


@pytest.mark.parametrize("make, words", [
    ("missing", "no such file"),
    ("nan", "NaN"),
    ("suffix", "unsupported mesh format"),
    ("empty", "no triangle mesh"),
])
def test_texture_cli_reports_bad_input_clearly(tmp_path, make, words):
    src = tmp_path / "in.obj"
    if make == "nan":
        write_cube_obj(src, nan=True)
    elif make == "suffix":
        src = tmp_path / "in.fbx"
        src.write_text("not a mesh")
    elif make == "empty":
        src.write_text("v 0 0 0\nv 1 0 0\n")
    r = cli("texture", src, "a red cube", "--out", tmp_path / "o.glb", "--pipeline", FAKE)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert words in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.slow
def test_texture_cli_real_pipeline_on_the_cpu_preset(tmp_path):
    src = tmp_path / "cube.obj"
    write_cube_obj(src)
    out = tmp_path / "blue.glb"
    r = cli("texture", src, "a blue cube", "--out", out, "--preset", "cpu", "--seed", "2",
            "--set", "fine.steps=20", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "UVs: xatlas" in r.stdout
    after, _ = load_mesh_file(out)
    before, _ = load_mesh_file(src)
    assert set(map(bytes, after.positions)) == set(map(bytes, before.positions))
    rgb = after.texture_rgba[..., :3].reshape(-1, 3).astype(float).mean(0)
    assert rgb[2] > rgb[0] + 20 and rgb[2] > rgb[1] + 20, rgb

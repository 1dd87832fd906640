"""UV unwrapping: xatlas in a child process, recovery from an xatlas crash, the grid fallback."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from backend.mesh import rasterize_torch as rt
from backend.mesh.uv import CRASH_ENV, grid_atlas, unwrap


def _coverage_vs_area(corner_uvs: np.ndarray, res: int = 512) -> tuple[float, float]:
    uv = corner_uvs.reshape(-1, 3, 2).astype(np.float64)
    area = 0.5 * np.abs((uv[:, 1, 0] - uv[:, 0, 0]) * (uv[:, 2, 1] - uv[:, 0, 1])
                        - (uv[:, 2, 0] - uv[:, 0, 0]) * (uv[:, 1, 1] - uv[:, 0, 1])).sum()
    n = len(corner_uvs)
    clip = torch.tensor(np.c_[corner_uvs * 2 - 1, np.zeros(n), np.ones(n)], dtype=torch.float32)
    tri = torch.arange(n, dtype=torch.int32).reshape(-1, 3)
    covered = (rt.rasterize(clip, tri, (res, res))[..., 3] > 0).float().mean().item()
    return covered, area


def test_isolated_and_in_process_unwrap_agree():
    mesh = trimesh.creation.capsule(height=1.0, radius=0.4)
    a = unwrap(mesh.vertices, mesh.faces, resolution=256, padding=2)
    b = unwrap(mesh.vertices, mesh.faces, resolution=256, padding=2, isolate=False)
    assert a.method == "xatlas"
    np.testing.assert_allclose(a.corner_uvs, b.corner_uvs)
    assert a.corner_uvs.shape == (len(mesh.faces) * 3, 2)
    with pytest.raises(ValueError, match="without faces"):
        unwrap(mesh.vertices, np.zeros((0, 3), np.int64))


def test_unwrap_recovers_from_an_xatlas_crash(tmp_path, monkeypatch):
    mesh = trimesh.creation.icosphere(subdivisions=2)
    monkeypatch.setenv(CRASH_ENV, str(tmp_path / "crashed-once"))
    atlas = unwrap(mesh.vertices, mesh.faces, resolution=128, padding=2)
    assert (tmp_path / "crashed-once").exists()  # the first child really died
    assert atlas.method == "xatlas-jitter"
    np.testing.assert_array_equal(atlas.vmapping[atlas.uv_faces], mesh.faces)
    covered, area = _coverage_vs_area(atlas.corner_uvs)
    assert covered == pytest.approx(area, rel=0.08)


def test_grid_fallback_when_xatlas_always_crashes(monkeypatch):
    mesh = trimesh.creation.icosphere(subdivisions=2)
    monkeypatch.setenv(CRASH_ENV, "always")
    atlas = unwrap(mesh.vertices, mesh.faces, resolution=256, padding=2)
    assert atlas.method == "grid"
    assert atlas.corner_uvs.min() >= 0 and atlas.corner_uvs.max() <= 1
    covered, area = _coverage_vs_area(atlas.corner_uvs)
    assert covered == pytest.approx(area, rel=0.08)  # no two faces share texels
    # odd face counts and the corner layout
    v, idx, uv = grid_atlas(np.array([[0, 1, 2], [2, 1, 3], [3, 1, 4]]), 64, 1)
    assert uv.shape == (9, 2) and idx.shape == (3, 3)
    np.testing.assert_array_equal(v[idx], [[0, 1, 2], [2, 1, 3], [3, 1, 4]])

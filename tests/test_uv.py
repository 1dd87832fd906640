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


@pytest.fixture(scope="module")
def meshed_cube():
    """The exact cube through the fine stage's mesher: 64³ marching cubes, clean-up, 5 000 faces."""
    from backend.mesh.cleanup import clean_mesh
    from backend.quality.reference import solid_surface

    pos, faces = solid_surface("cube", 64)
    clean = clean_mesh(pos, faces, face_budget=5000, min_component_fraction=0.02)
    return np.asarray(clean.positions, np.float32), np.asarray(clean.faces, np.int64)


def test_filled_atlas_keeps_the_padding_and_uses_the_area(meshed_cube):
    from backend.quality.texture import chart_mask, min_chart_gap, texel_density

    pos, faces = meshed_cube
    atlas = unwrap(pos, faces, resolution=256, padding=2)
    assert atlas.method == "xatlas"
    np.testing.assert_array_equal(atlas.vmapping[atlas.uv_faces], faces)
    # every chart keeps its 2 empty texels (the old packing normalised a 197×298 atlas to 256², 3 here)
    assert min_chart_gap(atlas.corner_uvs, 256) >= 4
    # the six faces fill the atlas, each face at one texel density
    assert chart_mask(atlas.corner_uvs.reshape(-1, 3, 2), 256, 256).mean() > 0.85
    dens = texel_density(pos, faces, atlas.corner_uvs, 256, 256)
    assert dens["spread"] < 1.05 and dens["anisotropy"] <= 2.0 + 1e-6
    covered, area = _coverage_vs_area(atlas.corner_uvs)
    assert covered == pytest.approx(area, rel=0.08)  # no overlaps


def test_fill_square_only_stretches():
    from backend.mesh.uv import fill_square

    uv = np.array([[0.1, 0.1], [0.6, 0.1], [0.1, 0.3], [0.9, 0.9]], np.float32)
    idx = np.array([[0, 1, 2]])
    out = fill_square(uv, idx, resolution=100, padding=2, max_stretch=5.0)
    used = out[:3]
    # the box plus 2 texels (0.02) of margin, [0.08, 0.62] × [0.08, 0.32], becomes [0, 1]²
    np.testing.assert_allclose(used.min(0), [0.02 / 0.54, 0.02 / 0.24], atol=1e-6)
    np.testing.assert_allclose(used.max(0), [1 - 0.02 / 0.54, 1 - 0.02 / 0.24], atol=1e-6)
    d_in, d_out = np.diff(uv[:3], axis=0), np.diff(used, axis=0)
    assert np.all(np.abs(d_out) >= np.abs(d_in) - 1e-7)  # distances never shrink
    capped = fill_square(uv, idx, resolution=100, padding=2, max_stretch=2.0)
    assert np.ptp(capped[:3, 1]) == pytest.approx(0.4, abs=1e-6)  # y stretch capped at 2×

"""Mesh extraction from Gaussians: density grid, marching cubes, components, budget, colours, size."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from backend.gaussians.model import GaussianModel, Gaussians
from backend.mesh.extract import (
    EmptyMeshError,
    density_grid,
    evaluate_gaussians,
    extract_mesh,
    fit_to_size,
    signed_volume,
)


def blob(centre, radius, n, colour, seed=0, scale=0.04, opacity=0.6):
    m = GaussianModel.init_random(n, radius=radius, scale=scale, opacity=opacity,
                                  generator=torch.Generator().manual_seed(seed))
    g = m.activated().detach()
    return Gaussians(g.means + torch.tensor(centre), g.quats, g.scales, g.opacities,
                     torch.tensor(colour).expand(n, 3).clone())


def cat(*gs):
    return Gaussians(*(torch.cat([getattr(g, f) for g in gs]) for f in ("means", "quats", "scales", "opacities",
                                                                       "colors")))


def test_grid_matches_exact_evaluation():
    g = blob((0.1, -0.2, 0.05), 0.3, 200, (0.2, 0.4, 0.6), scale=0.05)
    g.quats = torch.nn.functional.normalize(torch.randn(200, 4, generator=torch.Generator().manual_seed(1)), dim=-1)
    g.scales = g.scales * torch.tensor([1.0, 0.5, 1.5])
    R = 24
    grid, colour = density_grid(g, R, with_color=True)
    h = 2.0 / R
    axis = -1 + h * (torch.arange(R) + 0.5)
    pts = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    exact, exact_col = evaluate_gaussians(pts, g, with_color=True, cutoff=10.0)
    exact = exact.reshape(R, R, R).numpy()
    # the grid truncates each Gaussian at 3 sigma: the missing tail is at most exp(-4.5) of a peak per Gaussian
    assert np.abs(grid - exact).max() < 0.02 * max(1.0, exact.max())
    assert grid.max() > 1.0
    dense = exact > 0.5
    assert np.allclose(colour.reshape(-1, 3)[dense.reshape(-1)], [0.2, 0.4, 0.6], atol=1e-4)


def test_sphere_mesh_volume_orientation_colours_budget():
    g = blob((0.0, 0.0, 0.0), 0.5, 3000, (0.9, 0.1, 0.1), scale=0.04, opacity=0.6)
    mesh = extract_mesh(g, grid_resolution=48, face_budget=2000, threshold=0.5)
    assert mesh.positions.dtype == np.float32 and mesh.faces.dtype == np.uint32
    assert 0 < mesh.faces.shape[0] <= 2000
    vol = signed_volume(mesh.positions, mesh.faces.astype(np.int64))
    true_vol = 4 / 3 * math.pi * 0.5**3
    assert 0.7 * true_vol < vol < 1.4 * true_vol  # CCW from outside: positive volume near the true one
    # normals point away from the centre
    radial = mesh.positions / np.linalg.norm(mesh.positions, axis=1, keepdims=True)
    assert (np.einsum("ij,ij->i", radial, mesh.normals) > 0).mean() > 0.95
    assert np.abs(mesh.colors[:, :3].astype(int) - [230, 26, 26]).max() <= 3
    assert (mesh.colors[:, 3] == 255).all()
    r = np.linalg.norm(mesh.positions, axis=1)
    assert 0.4 < np.median(r) < 0.65


def test_keeps_largest_components_and_drops_specks():
    big = blob((-0.4, 0.0, 0.0), 0.35, 1500, (0.1, 0.9, 0.1), seed=1)
    small = blob((0.6, 0.0, 0.0), 0.12, 100, (0.1, 0.1, 0.9), seed=2)
    speck = blob((0.0, 0.7, 0.7), 0.02, 5, (1.0, 1.0, 1.0), seed=3, scale=0.03, opacity=0.95)
    g = cat(big, small, speck)
    mesh = extract_mesh(g, 48, 50000, 0.5, min_component_fraction=0.05)
    xs = mesh.positions[:, 0]
    assert (xs < 0).any() and (xs > 0.45).any()  # both real parts kept
    assert not (np.linalg.norm(mesh.positions - [0.0, 0.7, 0.7], axis=1) < 0.1).any()  # speck dropped
    only_big = extract_mesh(g, 48, 50000, 0.5, max_components=1)
    assert (only_big.positions[:, 0] < 0.1).all()


def test_low_density_is_meshed_at_half_peak_and_empty_raises():
    faint = blob((0, 0, 0), 0.3, 50, (0.5, 0.5, 0.5), opacity=0.05, scale=0.05)
    mesh = extract_mesh(faint, 32, 1000, threshold=50.0)
    assert mesh.faces.shape[0] > 0
    far = blob((5, 5, 5), 0.1, 10, (0.5, 0.5, 0.5))
    with pytest.raises(EmptyMeshError):
        extract_mesh(far, 16, 1000)


def test_fit_to_size():
    g = blob((0.2, 0.1, -0.1), 0.4, 800, (0.5, 0.5, 0.5))
    mesh = fit_to_size(extract_mesh(g, 32, 1000), 2.5)
    lo, hi = mesh.positions.min(0), mesh.positions.max(0)
    assert abs(float((hi - lo).max()) - 2.5) < 1e-5
    assert np.allclose(((lo + hi) / 2)[:2], 0, atol=1e-5)  # centred in X and Y
    assert abs(float(lo[2])) < 1e-6  # base on z = 0: the origin is the bottom centre
    with pytest.raises(ValueError, match="metres"):
        fit_to_size(mesh, 0.0)


def test_a_hollow_shell_is_meshed_as_its_outside_only():
    """Gaussians on a spherical shell leave a hollow inside: one outer surface, no hidden inner shell."""
    import trimesh

    from backend.mesh.extract import fill_cavities

    n = 2500
    dirs = torch.nn.functional.normalize(torch.randn(n, 3, generator=torch.Generator().manual_seed(1)), dim=-1)
    shell = Gaussians(0.55 * dirs, torch.tensor([1.0, 0, 0, 0]).expand(n, 4).clone(), torch.full((n, 3), 0.04),
                      torch.full((n,), 0.9), torch.full((n, 3), 0.5))
    vol, _ = density_grid(shell, 48, 1.0, with_color=True)
    assert vol[24, 24, 24] < 0.05 and vol.max() > 0.5  # hollow inside
    filled = fill_cavities(vol, 0.5)
    assert filled[24, 24, 24] > 0.5 and np.array_equal(filled[vol >= 0.5], vol[vol >= 0.5])
    assert filled[0, 0, 0] == vol[0, 0, 0]  # the outside is untouched
    mesh = extract_mesh(shell, grid_resolution=48, face_budget=20000, threshold=0.5)
    tm = trimesh.Trimesh(mesh.positions, mesh.faces.astype(np.int64), process=True)
    assert len(tm.split(only_watertight=False)) == 1
    r = np.linalg.norm(mesh.positions, axis=1)
    assert r.min() > 0.45  # no inner surface near the centre

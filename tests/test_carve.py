"""Space carving by the optimisation's cameras (backend/mesh/carve.py): what no view saw empty is filled,
what some view saw empty stays empty."""

from __future__ import annotations

import math

import numpy as np
import torch

from backend.gaussians.model import Gaussians
from backend.mesh.carve import CarveViews, carve_views_for, fill_unseen, unseen_cells
from backend.mesh.extract import extract_mesh, signed_volume
from backend.pipeline.presets import get_preset

LEVEL = 0.15


def _shell(points: torch.Tensor, scale: float = 0.012, opacity: float = 0.9) -> Gaussians:
    n = points.shape[0]
    quats = torch.zeros(n, 4)
    quats[:, 0] = 1.0
    return Gaussians(points.float(), quats, torch.full((n, 3), scale), torch.full((n,), opacity),
                     torch.full((n, 3), 0.5))


def _cone_side(n: int = 9000, apex_up: bool = True) -> Gaussians:
    """Gaussians on the lateral surface of a cone (radius 0.6, height 1.2, axis Z), no base disc: an
    opaque wall (optical depth ~3) about 0.06 thick at the iso level."""
    g = torch.Generator().manual_seed(0)
    s = torch.rand(n, generator=g).sqrt()  # uniform over the lateral area
    phi = torch.rand(n, generator=g) * 2 * math.pi
    r = 0.6 * s
    z = 0.6 - 1.2 * s if apex_up else -0.6 + 1.2 * s
    return _shell(torch.stack([r * phi.cos(), r * phi.sin(), z], -1))


def _volume(gaussians, carve) -> float:
    mesh = extract_mesh(gaussians, grid_resolution=64, face_budget=1 << 30, threshold=LEVEL, with_colors=False,
                        carve=carve)
    return abs(signed_volume(mesh.positions.astype("float64"), mesh.faces.astype("int64")))


CONE_VOLUME = math.pi * 0.6**2 * 1.2 / 3.0
VIEWS = CarveViews(azimuths=8, elevations=3)


def test_a_shell_open_underneath_is_filled_because_no_camera_above_the_horizon_saw_inside():
    shell = _cone_side(apex_up=True)
    hollow = _volume(shell, None)
    carved = _volume(shell, VIEWS)
    assert hollow < 0.5 * CONE_VOLUME, hollow  # the thin shell alone
    assert 0.85 * CONE_VOLUME < carved < 1.3 * CONE_VOLUME, (carved, CONE_VOLUME)


def test_a_cup_open_to_the_cameras_stays_open():
    cup = _cone_side(apex_up=False)  # opening at the top, seen from the cameras above the horizon
    hollow = _volume(cup, None)
    carved = _volume(cup, VIEWS)
    assert carved < 1.5 * hollow and carved < 0.6 * CONE_VOLUME, (hollow, carved)


def test_a_torus_hole_is_seen_from_above_and_stays_empty():
    g = torch.Generator().manual_seed(1)
    u, v = torch.rand(3000, generator=g) * 2 * math.pi, torch.rand(3000, generator=g) * 2 * math.pi
    R, r = 0.5, 0.18
    pts = torch.stack([(R + r * v.cos()) * u.cos(), (R + r * v.cos()) * u.sin(), r * v.sin()], -1)
    unseen = unseen_cells(_shell(pts, scale=0.03), VIEWS, resolution=32)
    c = (torch.arange(32) + 0.5) / 16 - 1.0
    X, Y, Z = torch.meshgrid(c, c, c, indexing="ij")
    rho = (X**2 + Y**2).sqrt()
    in_hole = (rho < R - r - 0.12).numpy()  # beyond the splats' 3-sigma skirt (scale 0.03)
    in_tube = (((rho - R) ** 2 + Z**2).sqrt() < r - 0.08).numpy()
    far = (((rho - R) ** 2 + Z**2).sqrt() > r + 0.15).numpy()
    assert not unseen[in_hole].any()
    assert not unseen[far].any()  # nothing outside the object is filled
    assert unseen[in_tube].mean() > 0.9  # the inside of the tube no camera saw into


def test_fill_unseen_keeps_seen_density_and_lifts_unseen_cells_over_the_level():
    vol = np.zeros((16, 16, 16), dtype=np.float32)
    vol[2:5, 2:5, 2:5] = 1.0
    unseen = np.zeros_like(vol, dtype=bool)
    unseen[8:14, 8:14, 8:14] = True
    out = fill_unseen(vol, LEVEL, unseen)
    assert (out[3, 3, 3] == 1.0) and (out[10:12, 10:12, 10:12] > LEVEL).all() and out[0, 0, 15] < LEVEL
    assert fill_unseen(vol, LEVEL, np.zeros_like(unseen)) is vol


def test_presets_carve_with_their_own_camera_ranges_and_the_override_turns_it_off():
    cpu = get_preset("cpu")
    views = carve_views_for(cpu.coarse)
    assert views is not None and views.elevation_range == tuple(float(x) for x in cpu.coarse.elevation_range)
    assert carve_views_for(get_preset("cpu", {"coarse.fill_unseen": "false"}).coarse) is None
    for name in ("draft", "standard", "high"):
        assert get_preset(name).coarse.fill_unseen


def test_carving_the_same_gaussians_again_is_remembered_and_a_change_is_not(monkeypatch):
    import backend.mesh.carve as carve

    calls = []
    real = carve._unseen_cells
    monkeypatch.setattr(carve, "_unseen_cells", lambda *a: calls.append(1) or real(*a))
    shell = _cone_side(n=2000)
    first = carve.unseen_cells(shell, VIEWS, resolution=16)
    again = carve.unseen_cells(_shell(shell.means.clone()), VIEWS, resolution=16)  # equal contents, new tensors
    assert len(calls) == 1 and again is first and not first.flags.writeable
    moved = _shell(shell.means + torch.tensor([0.0, 0.0, 0.2]))
    other = carve.unseen_cells(moved, VIEWS, resolution=16)
    finer = carve.unseen_cells(shell, VIEWS, resolution=20)
    assert len(calls) == 3 and not np.array_equal(other, first) and finer.shape == (20, 20, 20)


def test_meshing_the_same_gaussians_again_evaluates_the_density_grid_once(monkeypatch):
    """A job meshes its final Gaussians twice (the coarse GLB, the fine stage's surface): the second
    ``extract_mesh`` reuses the density grid (``backend.mesh.memo``) and gives the same mesh; other
    Gaussians or another grid are evaluated afresh."""
    import backend.mesh.extract as extract

    calls = []
    real = extract.density_grid
    monkeypatch.setattr(extract, "density_grid", lambda *a, **k: calls.append(1) or real(*a, **k))
    shell = _cone_side(n=2000)
    first = extract_mesh(shell, grid_resolution=24, face_budget=10_000)
    again = extract_mesh(_shell(shell.means.clone()), grid_resolution=24, face_budget=10_000, with_colors=False)
    assert len(calls) == 1
    assert np.array_equal(first.positions, again.positions) and np.array_equal(first.faces, again.faces)
    extract_mesh(_shell(shell.means * 0.9), grid_resolution=24, face_budget=10_000)
    extract_mesh(shell, grid_resolution=28, face_budget=10_000)
    assert len(calls) == 3


def test_the_memo_keeps_at_most_its_byte_budget():
    """``GaussianMemo(max_bytes=...)``: a result larger than the budget is returned and not kept; older
    results are dropped until the kept ones fit."""
    from backend.mesh.memo import GaussianMemo

    memo = GaussianMemo(size=3, max_bytes=1000)
    shell = _cone_side(n=50)
    calls = []

    def compute(n):
        return lambda: calls.append(n) or np.zeros(n, dtype=np.uint8)

    big = memo.get(shell, "big", compute(2000))
    assert big.nbytes == 2000 and memo.get(shell, "big", compute(2000)) is not big and calls == [2000, 2000]
    a = memo.get(shell, "a", compute(600))
    memo.get(shell, "b", compute(600))  # 1200 bytes > 1000: "a" goes
    assert memo.get(shell, "b", compute(600)) is not None and len(calls) == 4
    assert memo.get(shell, "a", compute(600)) is not a and len(calls) == 5

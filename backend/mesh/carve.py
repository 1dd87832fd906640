"""Space carving by the optimisation's own cameras: cells that no view saw empty are inside.

SDS constrains only what its cameras see. The coarse stage looks from elevations −10°…80°
(``CoarseConfig.elevation_range``), so an object's underside, and any pocket that opens only
downwards, is never seen from below: the Gaussians there stay faint, and the density iso-surface
opens a dome-shaped hollow under a cone, a cube or a pyramid whose rim is the object's lowest
point. The hollow is invisible from every training view, yet it held about a sixth of a cone's volume
in the cpu preset's benchmark (57,690 of the ideal's 68,736 voxels, docs/benchmarks.md session 7), and
the artist gets a shell with a dented, open underside instead of a solid.

Space carving (Kutulakos & Seitz 2000, "A Theory of Shape by Space Carving"; the visual hull of
Laurentini 1994, with depth) keeps a cell unless some view shows it to be empty. Here the views are
the optimisation's: a ring of azimuths at elevations spanning ``elevation_range``, at the middle of
its distance and field-of-view ranges. A view shows a cell empty when the cell projects inside the
image onto a pixel whose rendered alpha is below ``alpha_level`` (the ray reaches the background),
or lies nearer to the camera than that pixel's rendered depth (alpha-normalised expected depth)
minus ``margin_cells`` grid cells (the ray passes the cell before it meets the surface). A cell no
view carves is *unseen*: :func:`fill_unseen` raises the density of unseen cells above the iso
level, so the surface closes where the cameras never looked and stays what they saw everywhere
else: a bowl's inside, a torus's hole and the gap between a table's legs are seen from some view
and stay empty.

Frames: world (Blender, +Z up) grid over [-bound, bound]^3, cell-centred, indexed [ix, iy, iz] as
``backend.mesh.extract.density_grid``; cameras in OpenCV convention (``backend.gaussians.cameras``).
"""

from __future__ import annotations

import logging
from dataclasses import astuple, dataclass

import numpy as np
import torch

from backend.gaussians.cameras import Cameras, orbit_cameras
from backend.mesh.memo import GaussianMemo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CarveViews:
    """The views that carve.

    ``azimuths`` evenly spaced azimuths × ``elevations`` elevations spread evenly over
    ``elevation_range`` (degrees), at ``distance`` (world units) with ``fovy`` (degrees), rendered at
    ``resolution`` pixels (None: two pixels per grid cell, 32 to 256; a 64³ grid → 128 px, about 1.4
    pixels per cell at the middle distance). The defaults, 16 × 3 = 48 views, carve what 24 × 4 do
    within ±0.003 IoU on the cpu preset's solids in half the time (about 2 s at 64³ on one core;
    docs/benchmarks.md, session 7). ``alpha_level``: below it a pixel is background.
    ``margin_cells``: how far in front of the rendered depth a cell must lie to be carved."""

    elevation_range: tuple[float, float] = (-10.0, 80.0)
    distance: float = 3.1
    fovy: float = 50.0
    azimuths: int = 16
    elevations: int = 3
    resolution: int | None = None
    alpha_level: float = 0.5
    margin_cells: float = 1.0

    def pixels(self, grid_resolution: int) -> int:
        """The render size for a grid of ``grid_resolution`` cells per side."""
        return int(self.resolution) if self.resolution else int(min(max(2 * int(grid_resolution), 32), 256))

    def cameras(self, device: torch.device | str = "cpu", pixels: int = 128) -> Cameras:
        lo, hi = (float(x) for x in self.elevation_range)
        els = np.linspace(lo, hi, max(int(self.elevations), 1)) if hi > lo else np.array([lo])
        az = np.arange(int(self.azimuths)) * (360.0 / int(self.azimuths))
        A, E = np.meshgrid(az, els, indexing="ij")
        # stagger alternate elevation rings by half an azimuth step so the rings cover each other's gaps
        A = A + (np.arange(E.shape[1])[None, :] % 2) * (180.0 / int(self.azimuths))
        return orbit_cameras(torch.tensor(A.ravel(), dtype=torch.float32), torch.tensor(E.ravel(), dtype=torch.float32),
                             float(self.distance), float(self.fovy), int(pixels), device=device)


def carve_views_for(coarse_config) -> CarveViews | None:
    """The :class:`CarveViews` of a ``CoarseConfig`` (its camera ranges), or None when its
    ``fill_unseen`` is off."""
    if not coarse_config.fill_unseen:
        return None
    d_lo, d_hi = (float(x) for x in coarse_config.distance_range)
    f_lo, f_hi = (float(x) for x in coarse_config.fovy_range)
    e_lo, e_hi = (float(x) for x in coarse_config.elevation_range)
    return CarveViews(elevation_range=(e_lo, e_hi), distance=0.5 * (d_lo + d_hi), fovy=0.5 * (f_lo + f_hi))


#: The last few :func:`unseen_cells` results, by the Gaussians' contents and the carving's settings. A job
#: meshes the same final Gaussians twice (the coarse GLB and the fine stage's starting surface), and
#: both carve alike at the cpu preset's equal grids; the second is then a lookup instead of 48 renders.
_memo = GaussianMemo(size=2)


def unseen_cells(gaussians, views: CarveViews, resolution: int, bound: float = 1.0, chunk_views: int = 8) -> np.ndarray:
    """(R, R, R) bool: grid cells that some view of ``views`` sees and none shows to be empty (see the
    module docstring); a cell outside every view's image is not unseen but unknown, and stays empty.

    ``gaussians``: activated Gaussians (means, quats, scales, opacities, colors), rendered with
    ``backend.gaussians.render.render_gaussians`` on their own device. The result is read-only and
    remembered for the same Gaussians and settings (``backend.mesh.memo``; the last two of them).
    """
    return _memo.get(gaussians, ("unseen_cells", astuple(views), int(resolution), float(bound)),
                     lambda: _unseen_cells(gaussians, views, resolution, bound, chunk_views))


@torch.no_grad()
def _unseen_cells(gaussians, views: CarveViews, resolution: int, bound: float, chunk_views: int) -> np.ndarray:
    """:func:`unseen_cells` without the cache."""
    from backend.gaussians.render import render_gaussians

    device = gaussians.means.device
    R = int(resolution)
    cams = views.cameras(device, views.pixels(R))
    h = 2.0 * bound / R
    c = -bound + h * (torch.arange(R, device=device, dtype=torch.float32) + 0.5)
    pts = torch.stack(torch.meshgrid(c, c, c, indexing="ij"), -1).reshape(-1, 3)  # (R^3, 3)
    seen_empty = torch.zeros(pts.shape[0], dtype=torch.bool, device=device)
    in_view = torch.zeros(pts.shape[0], dtype=torch.bool, device=device)
    margin = float(views.margin_cells) * h
    W, H = cams.width, cams.height
    bg = torch.zeros(3, device=device)
    for s in range(0, len(cams), chunk_views):
        idx = torch.arange(s, min(s + chunk_views, len(cams)), device=device)
        sub = Cameras(cams.viewmats[idx], cams.Ks[idx], W, H, cams.azimuth_deg[idx], cams.elevation_deg[idx],
                      cams.distance[idx])
        out = render_gaussians(gaussians.means, gaussians.quats, gaussians.scales, gaussians.opacities,
                               gaussians.colors, sub, background=bg)
        for k in range(len(sub)):
            cam = pts @ sub.viewmats[k, :3, :3].T + sub.viewmats[k, :3, 3]
            z = cam[:, 2]
            K = sub.Ks[k]
            u = torch.floor(K[0, 0] * cam[:, 0] / z.clamp_min(1e-6) + K[0, 2]).long()
            v = torch.floor(K[1, 1] * cam[:, 1] / z.clamp_min(1e-6) + K[1, 2]).long()
            ok = (z > 1e-6) & (u >= 0) & (u < W) & (v >= 0) & (v < H)
            flat = (v.clamp(0, H - 1) * W + u.clamp(0, W - 1))
            alpha = out.alpha[k, 0].reshape(-1)[flat]
            depth = out.depth[k, 0].reshape(-1)[flat]
            seen_empty |= ok & ((alpha < views.alpha_level) | (z < depth - margin))
            in_view |= ok
    return (in_view & ~seen_empty).reshape(R, R, R).cpu().numpy()


def fill_unseen(vol: np.ndarray, level: float, unseen: np.ndarray, smooth_cells: float = 1.0) -> np.ndarray:
    """Density grid (R, R, R) with unseen cells raised above ``level``.

    The unseen mask is blurred by a Gaussian of ``smooth_cells`` cells and scaled so its 0.5 contour
    sits at ``level``: the filled region's boundary is a smooth surface, not a voxel staircase.
    Cells already above ``level`` keep their density (``max``), so every surface a view saw stays.
    """
    from scipy import ndimage

    if not unseen.any():
        return vol
    mask = ndimage.gaussian_filter(unseen.astype(np.float32), sigma=float(smooth_cells)) if smooth_cells > 0 \
        else unseen.astype(np.float32)
    out = np.maximum(vol, (2.0 * float(level)) * mask).astype(vol.dtype, copy=False)
    log.debug("filled %d unseen cells below the iso level", int((unseen & (vol < level)).sum()))
    return out

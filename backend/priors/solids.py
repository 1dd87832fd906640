"""Analytic renderer of the prior's simple solids (sphere tracing of exact implicit shapes).

World frame: Blender's (metres, +Z up, front faces -Y), shapes centred at the origin in their
canonical resting orientation, sized to fit the [-1, 1]^3 optimisation volume with a half-extent of
about 0.6-0.75 (like the objects SDS optimises). Cameras: ``backend.gaussians.cameras.Cameras``
(OpenCV world→camera ``viewmats``, pixel ``Ks``), exactly the model the SDS loop uses.

Shading: albedo × (ambient + diffuse·max(0, n·l)) with a light fixed in the world (from above and
in front), composited over a plain background; alpha is the pixel coverage (supersampled).

Public functions:

* ``solid_sdf(shape, points (N,3)) -> (N,)`` signed distance (or a 1-Lipschitz lower bound of it).
* ``solid_occupancy(shape, points (N,3)) -> bool (N,)`` inside test (for volumetric IoU).
* ``render_solid_maps(shape, cameras) -> (coverage (B,H,W), shading (B,H,W))`` colour-free maps.
* ``render_solid(shape, color_rgb, cameras, background_rgb) -> (B,H,W,4) float32 RGBA``.
"""

from __future__ import annotations

import math

import torch

from backend.gaussians.cameras import Cameras
from backend.priors import SHAPES

#: Default world light direction (unit vector pointing *towards* the light): above, front, right.
DEFAULT_LIGHT = (0.35, -0.45, 0.82)
AMBIENT = 0.42
DIFFUSE = 0.58

# Shape dimensions (metres). Exposed so tests/benchmarks can reason about extents.
CUBE_HALF = 0.58
SPHERE_RADIUS = 0.72
CYL_RADIUS = 0.55
CYL_HALF_HEIGHT = 0.62
CONE_RADIUS = 0.68
CONE_BOTTOM, CONE_TOP = -0.62, 0.72
TORUS_MAJOR, TORUS_MINOR = 0.50, 0.24
PYR_HALF = 0.66
PYR_BOTTOM, PYR_TOP = -0.60, 0.72
BOUND_RADIUS = 1.08  # every shape lies inside this sphere


def _check_shape(shape: str) -> None:
    if shape not in SHAPES:
        raise ValueError(f"unknown solid {shape!r}; known: {', '.join(SHAPES)}")


def solid_sdf(shape: str, p: torch.Tensor) -> torch.Tensor:
    """Signed distance (negative inside) from points ``p`` (..., 3) world metres to ``shape``.

    Exact for cube, sphere, cylinder and torus; a 1-Lipschitz lower bound (max of plane / cone
    distances, exact near the faces) for cone and pyramid, which is all sphere tracing needs.
    """
    _check_shape(shape)
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    if shape == "sphere":
        return p.norm(dim=-1) - SPHERE_RADIUS
    if shape == "cube":
        q = p.abs() - CUBE_HALF
        return q.clamp(min=0).norm(dim=-1) + q.max(dim=-1).values.clamp(max=0)
    r = torch.sqrt(x * x + y * y + 1e-12)
    if shape == "cylinder":
        d = torch.stack([r - CYL_RADIUS, z.abs() - CYL_HALF_HEIGHT], dim=-1)
        return d.clamp(min=0).norm(dim=-1) + d.max(dim=-1).values.clamp(max=0)
    if shape == "torus":
        return torch.sqrt((r - TORUS_MAJOR) ** 2 + z * z) - TORUS_MINOR
    if shape == "cone":
        h = CONE_TOP - CONE_BOTTOM
        L = math.hypot(h, CONE_RADIUS)
        side = (h * r + CONE_RADIUS * (z - CONE_TOP)) / L
        return torch.maximum(side, CONE_BOTTOM - z)
    # pyramid: square base |x|,|y| <= PYR_HALF at PYR_BOTTOM, apex at (0, 0, PYR_TOP)
    h = PYR_TOP - PYR_BOTTOM
    L = math.hypot(h, PYR_HALF)
    m = torch.maximum(x.abs(), y.abs())
    side = (h * m + PYR_HALF * (z - PYR_TOP)) / L
    return torch.maximum(side, PYR_BOTTOM - z)


def solid_occupancy(shape: str, points: torch.Tensor) -> torch.Tensor:
    """bool (N,) — whether each point (N, 3) world metres lies inside the canonical ``shape``."""
    points = torch.as_tensor(points, dtype=torch.float32)
    return solid_sdf(shape, points) <= 0.0


def _pixel_rays(cameras: Cameras, supersample: int) -> tuple[torch.Tensor, torch.Tensor]:
    """World-space ray origins (B, 3) and unit directions (B, H*s, W*s, 3) through sub-pixel centres."""
    s = supersample
    H, W = cameras.height * s, cameras.width * s
    Ks = cameras.Ks.float()
    fx, fy = Ks[:, 0, 0] * s, Ks[:, 1, 1] * s
    cx, cy = Ks[:, 0, 2] * s, Ks[:, 1, 2] * s
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float32) + 0.5,
                          torch.arange(W, dtype=torch.float32) + 0.5, indexing="ij")
    dx = (u[None] - cx[:, None, None]) / fx[:, None, None]
    dy = (v[None] - cy[:, None, None]) / fy[:, None, None]
    d_cam = torch.stack([dx, dy, torch.ones_like(dx)], dim=-1)  # OpenCV camera frame
    R = cameras.viewmats[:, :3, :3].float()
    d_world = torch.einsum("bhwj,bjk->bhwk", d_cam, R)  # R^T d  (rows of R are camera axes)
    d_world = torch.nn.functional.normalize(d_world, dim=-1)
    return cameras.camera_centers().float(), d_world


@torch.no_grad()
def render_solid_maps(
    shape: str,
    cameras: Cameras,
    light_dir: tuple[float, float, float] | torch.Tensor = DEFAULT_LIGHT,
    supersample: int = 3,
    max_steps: int = 96,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Colour-free maps of ``shape`` seen by ``cameras``.

    Returns:
        coverage: (B, H, W) float32 in [0, 1], fraction of the pixel covered by the solid.
        shading: (B, H, W) float32, mean over the pixel of hit·(AMBIENT + DIFFUSE·max(0, n·l)),
            i.e. premultiplied by coverage; the RGB of a solid of albedo c over background g is
            ``c * shading + g * (1 - coverage)``.
    ``light_dir``: (3,) or (B, 3) world direction towards the light (normalised here).
    """
    _check_shape(shape)
    B = len(cameras)
    s = supersample
    origin, dirs = _pixel_rays(cameras, s)
    Hs, Ws = dirs.shape[1], dirs.shape[2]
    o = origin[:, None, None, :].expand_as(dirs).reshape(-1, 3)
    d = dirs.reshape(-1, 3)
    # bounding-sphere entry / exit
    b = (o * d).sum(-1)
    c = (o * o).sum(-1) - BOUND_RADIUS**2
    disc = b * b - c
    valid = disc > 0
    sq = torch.sqrt(disc.clamp(min=0))
    t = (-b - sq).clamp(min=0)
    t_exit = -b + sq
    hit = torch.zeros_like(valid)
    active = valid.clone()
    eps = 4e-4
    for _ in range(max_steps):
        idx = active.nonzero(as_tuple=True)[0]
        if idx.numel() == 0:
            break
        p = o[idx] + t[idx, None] * d[idx]
        dist = solid_sdf(shape, p)
        t_new = t[idx] + dist
        t[idx] = t_new
        done_hit = dist < eps
        hit[idx[done_hit]] = True
        gone = t_new > t_exit[idx]
        active[idx[done_hit | gone]] = False
    # normals by central differences of the SDF at the hit points
    shade = torch.zeros(o.shape[0], dtype=torch.float32)
    hidx = hit.nonzero(as_tuple=True)[0]
    if hidx.numel():
        p = o[hidx] + t[hidx, None] * d[hidx]
        h = 1e-3
        n = torch.zeros_like(p)
        for k in range(3):
            e = torch.zeros(3)
            e[k] = h
            n[:, k] = solid_sdf(shape, p + e) - solid_sdf(shape, p - e)
        n = torch.nn.functional.normalize(n, dim=-1)
        light = torch.as_tensor(light_dir, dtype=torch.float32)
        light = torch.nn.functional.normalize(light.reshape(-1, 3), dim=-1)
        if light.shape[0] == 1:
            ldot = (n * light).sum(-1)
        else:
            img_of_ray = torch.arange(B).repeat_interleave(Hs * Ws)[hidx]
            ldot = (n * light[img_of_ray]).sum(-1)
        shade[hidx] = AMBIENT + DIFFUSE * ldot.clamp(min=0)
    H, W = cameras.height, cameras.width
    cov = hit.float().reshape(B, H, s, W, s).mean(dim=(2, 4))
    sh = shade.reshape(B, H, s, W, s).mean(dim=(2, 4))
    return cov, sh


def composite(
    coverage: torch.Tensor, shading: torch.Tensor, color_rgb: torch.Tensor, background_rgb: torch.Tensor
) -> torch.Tensor:
    """(B, H, W, 3) RGB in [0, 1] from colour-free maps (B, H, W), albedo (3,)|(B,3), background (3,)|(B,3)."""
    B = coverage.shape[0]
    col = torch.as_tensor(color_rgb, dtype=torch.float32).reshape(-1, 3).expand(B, 3)
    bg = torch.as_tensor(background_rgb, dtype=torch.float32).reshape(-1, 3).expand(B, 3)
    rgb = col[:, None, None, :] * shading[..., None] + bg[:, None, None, :] * (1 - coverage[..., None])
    return rgb.clamp(0, 1)


def render_solid(
    shape: str,
    color_rgb: tuple[float, float, float] | torch.Tensor,
    cameras: Cameras,
    background_rgb: tuple[float, float, float] | torch.Tensor = (1.0, 1.0, 1.0),
    light_dir: tuple[float, float, float] | torch.Tensor = DEFAULT_LIGHT,
    supersample: int = 3,
) -> torch.Tensor:
    """Render ``shape`` with albedo ``color_rgb`` (3,) in [0, 1] for every camera.

    Returns (B, H, W, 4) float32: RGB in [0, 1] composited over ``background_rgb`` and alpha = the
    pixel's coverage by the solid. Row 0 is the top of the image.
    """
    cov, sh = render_solid_maps(shape, cameras, light_dir=light_dir, supersample=supersample)
    rgb = composite(cov, sh, torch.as_tensor(color_rgb, dtype=torch.float32),
                    torch.as_tensor(background_rgb, dtype=torch.float32))
    return torch.cat([rgb, cov[..., None]], dim=-1).float()

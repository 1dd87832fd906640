"""Shading of rendered views during SDS, so the optimised colour is albedo (DreamFusion).

DreamFusion (Poole et al., 2022, "DreamFusion: Text-to-3D using 2D Diffusion", §3.1 and §4)
renders ``albedo × (ambient + diffuse · max(0, n·l))`` from a random point light during Score
Distillation, and sometimes the albedo alone or a white ("textureless") albedo under the same
light. A 2D prior sees lit objects; when the render carries the light itself, the colour parameters
no longer have to bake light and shadow into the surface colour, and flat faces must actually be
flat to shade uniformly (a geometry cue that plain colour renders lack).

Per view ``sample_shading`` draws one of three modes (``LIT``, ``ALBEDO``, ``TEXTURELESS``) and a
light direction. Directions are world unit vectors pointing *towards* the light (Blender frame,
+Z up): azimuth = the camera's azimuth ± ``light_azimuth_spread`` degrees (uniform), elevation
uniform in ``light_elevation_range`` degrees above the horizon (threestudio's camera-relative light
sampling, kept above the horizon as natural and rendered lighting is). With ``light_frame="world"``
the light is instead one world direction with a little noise, whatever the camera: the lighting of a
prior trained on renders lit from a fixed world light (the bundled ``conjure-solids``).

Normals:

* Gaussians (coarse stage): normals of the rendered expected-depth map. Each pixel is
  back-projected to camera space, ``P = d · K⁻¹ [j + ½, i + ½, 1]``, and the normal is
  ``normalize(∂P/∂x × ∂P/∂y)`` from central differences, turned to face the camera and rotated to
  the world frame. This is the depth-normal used by Gaussian surface methods (e.g. 2DGS's
  depth-normal consistency) and it sends the shading gradient to the Gaussians' positions. Where a
  pixel or its neighbours are less than half covered the normal falls back to the view direction
  (the shade of a face seen head-on).
* Meshes (fine stage): the face normal of the triangle under each pixel, turned to face the camera.

Compositing: renders are ``colour + (1 − α)·background``; shading multiplies the colour part only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from backend.gaussians.cameras import Cameras, orbit_position

LIT, ALBEDO, TEXTURELESS = 0, 1, 2


@dataclass
class ShadingDraw:
    """Per-view shading choices: ``lights`` (B, 3) world unit vectors towards the light and
    ``modes`` (B,) int64 in {LIT, ALBEDO, TEXTURELESS}."""

    lights: torch.Tensor
    modes: torch.Tensor


def sample_shading(cameras: Cameras, config, generator: torch.Generator | None = None) -> ShadingDraw:
    """Draw a light and a mode per camera from a ``ShadingConfig`` (see the module docstring)."""
    B = len(cameras)
    u = torch.rand(B, 3, generator=generator)
    frame = config.light_frame
    if frame == "world":
        base = orbit_position(torch.tensor([float(config.world_light_azimuth)]),
                              torch.tensor([float(config.world_light_elevation)]), torch.ones(1))
        lights = F.normalize(base + float(config.world_light_jitter) * torch.randn(B, 3, generator=generator), dim=-1)
        lights[:, 2] = lights[:, 2].abs().clamp(min=0.3)  # above the horizon
    elif frame == "camera":
        spread = float(config.light_azimuth_spread)
        az = cameras.azimuth_deg.detach().float().cpu() + (2.0 * u[:, 0] - 1.0) * spread
        lo, hi = (float(x) for x in config.light_elevation_range)
        el = lo + (hi - lo) * u[:, 1]
        lights = orbit_position(az, el, torch.ones(B))
    else:
        raise ValueError(f"shading.light_frame must be 'camera' or 'world', got {frame!r}")
    p_alb, p_tl = float(config.albedo_prob), float(config.textureless_prob)
    modes = torch.full((B,), LIT, dtype=torch.long)
    modes[u[:, 2] < p_alb + p_tl] = TEXTURELESS
    modes[u[:, 2] < p_alb] = ALBEDO
    dev = cameras.device
    return ShadingDraw(F.normalize(lights, dim=-1).to(dev), modes.to(dev))


def covered_pixels(alpha: torch.Tensor, min_alpha: float = 0.5) -> torch.Tensor:
    """(B, 1, H, W) bool: the pixel and its four neighbours are more than ``min_alpha`` covered, so a
    central-difference depth normal there sees only surface (``alpha``: (B, 1, H, W); no gradient)."""
    ap = F.pad(alpha.detach(), (1, 1, 1, 1), mode="constant", value=0.0)
    return (ap[:, :, 1:-1, 1:-1] > min_alpha) & (ap[:, :, 1:-1, 2:] > min_alpha) & \
        (ap[:, :, 1:-1, :-2] > min_alpha) & (ap[:, :, 2:, 1:-1] > min_alpha) & (ap[:, :, :-2, 1:-1] > min_alpha)


def normal_smoothness(normals: torch.Tensor, alpha: torch.Tensor, min_alpha: float = 0.5,
                      cap: float = 0.0) -> torch.Tensor:
    """Mean squared difference between the unit normals of horizontally and vertically neighbouring
    pixels, over pairs where both pixels are covered (``covered_pixels``); a scalar, 0 for a plane.

    threestudio's 2D normal-smoothness loss (``lambda_normal_smooth``, used with DreamFusion-style
    systems; the same term regularises Gaussian normals in GaussianShader, Jiang et al. 2024). On the
    depth normals of the Gaussians (``depth_normals``) it sends its gradient to their positions, so
    a face SDS left dented or bulging is pulled flat. Pairs that cross the silhouette are left out:
    there the normal falls back to the view direction, which is not a surface's.

    ``cap`` > 0 truncates each pair's squared difference at ``cap`` (Blake & Zisserman's weak membrane,
    "Visual Reconstruction", 1987): a pair across a crease or an occlusion edge inside the silhouette
    (the back of a ring seen past its front, a handle in front of a body) costs a constant and sends
    no gradient, so the term flattens faces without asking to bridge depth jumps. The squared
    difference of unit normals is 2 − 2 cos θ (θ the angle between them): 0.27 at 30°, 0.59 at 45°.
    Measured on the cpu preset (docs/benchmarks.md, session 9): the cap does not keep a torus's hole
    from filming over when the term runs from the start; a late start does.

    Args:
        normals: (B, 3, H, W) unit normals (any frame); alpha: (B, 1, H, W) coverage.
    """
    ok = covered_pixels(alpha, min_alpha).to(normals.dtype)
    dx = (normals[..., :, 1:] - normals[..., :, :-1]).square().sum(1, keepdim=True)
    dy = (normals[..., 1:, :] - normals[..., :-1, :]).square().sum(1, keepdim=True)
    if cap > 0:
        dx, dy = dx.clamp(max=cap), dy.clamp(max=cap)
    mx = ok[..., :, 1:] * ok[..., :, :-1]
    my = ok[..., 1:, :] * ok[..., :-1, :]
    return ((dx * mx).sum() + (dy * my).sum()) / (mx.sum() + my.sum()).clamp(min=1.0)


def depth_normals(depth: torch.Tensor, alpha: torch.Tensor, cameras: Cameras,
                  min_alpha: float = 0.5) -> torch.Tensor:
    """World-frame unit normals (B, 3, H, W) of an expected-depth map (see the module docstring).

    Args:
        depth: (B, 1, H, W) camera-space z (alpha-normalised expected depth), differentiable.
        alpha: (B, 1, H, W) coverage.
        cameras: the B cameras (OpenCV frame: +X right, +Y down, +Z forward).
    """
    B, _, H, W = depth.shape
    dev, dt = depth.device, depth.dtype
    K = cameras.Ks.to(dev, dt)
    jj = torch.arange(W, device=dev, dtype=dt) + 0.5
    ii = torch.arange(H, device=dev, dtype=dt) + 0.5
    x = (jj.view(1, 1, W) - K[:, 0, 2].view(B, 1, 1)) / K[:, 0, 0].view(B, 1, 1)
    y = (ii.view(1, H, 1) - K[:, 1, 2].view(B, 1, 1)) / K[:, 1, 1].view(B, 1, 1)
    d = depth[:, 0]
    P = torch.stack([x.expand(B, H, W) * d, y.expand(B, H, W) * d, d], dim=1)  # (B, 3, H, W)
    Pp = F.pad(P, (1, 1, 1, 1), mode="replicate")
    dx = (Pp[:, :, 1:-1, 2:] - Pp[:, :, 1:-1, :-2]) * 0.5
    dy = (Pp[:, :, 2:, 1:-1] - Pp[:, :, :-2, 1:-1]) * 0.5
    n = torch.cross(dx, dy, dim=1)
    view = F.normalize(P.detach(), dim=1, eps=1e-8)
    ok = covered_pixels(alpha, min_alpha) & (n.detach().norm(dim=1, keepdim=True) > 1e-12)
    n = torch.where(ok, F.normalize(n, dim=1, eps=1e-12), -view)
    facing = (n * view).sum(1, keepdim=True)
    n = torch.where(facing > 0, -n, n)  # towards the camera
    R = cameras.viewmats[:, :3, :3].to(dev, dt)  # world -> camera rows
    return torch.einsum("bji,bjhw->bihw", R, n)


def face_normals_image(verts: torch.Tensor, faces: torch.Tensor, rast: torch.Tensor,
                       cameras: Cameras) -> torch.Tensor:
    """World-frame unit normals (B, 3, H, W) of the triangle under each pixel, facing the camera
    (zeros in empty pixels). ``rast``: (B, H, W, 4) rasteriser output (triangle id + 1 last)."""
    tri = verts[faces.long()]
    fn = F.normalize(torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1), dim=-1, eps=1e-12)
    tid = rast[..., 3].long() - 1
    n = fn[tid.clamp(min=0)]  # (B, H, W, 3)
    centres = tri.mean(1)[tid.clamp(min=0)]
    eye = cameras.camera_centers().to(verts)
    to_eye = eye.view(-1, 1, 1, 3) - centres.detach()
    n = torch.where(((n * to_eye).sum(-1, keepdim=True) < 0), -n, n)
    n = n * (tid >= 0).unsqueeze(-1).to(n.dtype)
    return n.permute(0, 3, 1, 2)


def apply_shading(image: torch.Tensor, alpha: torch.Tensor, backgrounds: torch.Tensor, normals: torch.Tensor,
                  draw: ShadingDraw, ambient: float, diffuse: float) -> torch.Tensor:
    """Shade composited renders: ``colour · (ambient + diffuse · max(0, n·l)) + (1 − α)·bg``.

    Args:
        image: (B, 3, H, W) in [0, 1], composited over ``backgrounds`` (B, 3) or per pixel (B, 3, H, W).
        alpha: (B, 1, H, W) coverage; normals: (B, 3, H, W) world unit normals.
        draw: per-view lights and modes (ALBEDO views are returned unshaded, TEXTURELESS views
            use a white albedo).
    Returns:
        (B, 3, H, W) shaded images (differentiable w.r.t. image, alpha and normals).
    """
    bg = (backgrounds if backgrounds.dim() == 4 else backgrounds.view(-1, 3, 1, 1)).to(image)
    behind = (1.0 - alpha) * bg
    colour = image - behind
    modes = draw.modes.view(-1, 1, 1, 1)
    colour = torch.where(modes == TEXTURELESS, alpha.expand_as(colour), colour)
    ndotl = (normals * draw.lights.view(-1, 3, 1, 1).to(normals)).sum(1, keepdim=True).clamp(min=0.0)
    shade = ambient + diffuse * ndotl
    shade = torch.where(modes == ALBEDO, torch.ones_like(shade), shade)
    return colour * shade + behind

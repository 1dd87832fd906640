"""A learned environment background for SDS (DreamFusion, Poole et al. 2022, §3 / appendix A.2).

With a fixed background, the diffusion prior's wish for a different background (most priors draw
objects in front of coloured backdrops) can only be met by geometry: Gaussians form films across
holes and skirts around the silhouette that paint "background" into the object. DreamFusion renders
each ray that misses the object with a learned background colour that depends only on the ray
direction, optimised with the scene, so the background can take the colour the prior asks for and
the geometry does not have to. As in DreamFusion (and threestudio's
``neural-environment-map-background`` with ``random_aug``), a fraction of views still get a random
solid colour, so the object cannot hide in the background.

The environment is a small latitude–longitude grid of RGB logits (``height`` × ``width``, sampled
bilinearly by ray direction). It is deliberately coarse (45°-wide cells at 4 × 8): an object
spans ~25° of the view, so the background can take any colour but cannot draw the object.

Frames: world = Blender (Z up); ray directions come from the cameras' OpenCV view matrices and
intrinsics with pixel centres at (j + 0.5, i + 0.5).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from backend.gaussians.cameras import Cameras


def ray_directions(cameras: Cameras) -> torch.Tensor:
    """(B, H, W, 3) unit world-space directions of the rays through each pixel centre."""
    H, W = cameras.height, cameras.width
    dev = cameras.viewmats.device
    j = torch.arange(W, device=dev, dtype=torch.float32) + 0.5
    i = torch.arange(H, device=dev, dtype=torch.float32) + 0.5
    v, u = torch.meshgrid(i, j, indexing="ij")
    pix = torch.stack([u, v, torch.ones_like(u)], dim=-1)  # (H, W, 3)
    kinv = torch.linalg.inv(cameras.Ks)  # (B, 3, 3)
    cam = torch.einsum("bij,hwj->bhwi", kinv, pix)  # camera frame (OpenCV: x right, y down, z forward)
    rot_t = cameras.viewmats[:, :3, :3].transpose(1, 2)  # camera → world rotation
    world = torch.einsum("bij,bhwj->bhwi", rot_t, cam)
    return F.normalize(world, dim=-1)


class EnvironmentBackground(torch.nn.Module):
    """Learned background colour per ray direction: a (3, height, width) lat-long grid of logits.

    ``forward(cameras)`` returns (B, 3, H, W) colours in (0, 1). Starts at ``init`` grey everywhere.
    """

    def __init__(self, height: int = 4, width: int = 8, init: float = 0.5, device: torch.device | str = "cpu"):
        super().__init__()
        if height < 1 or width < 1:
            raise ValueError(f"the environment grid must be at least 1 × 1, got {height} × {width}")
        init = min(max(float(init), 1e-3), 1 - 1e-3)
        logit = math.log(init / (1 - init))
        self.logits = torch.nn.Parameter(torch.full((1, 3, height, width), logit, device=device))

    def forward(self, cameras: Cameras) -> torch.Tensor:
        d = ray_directions(cameras.to(self.logits.device))
        lon = torch.atan2(d[..., 1], d[..., 0]) / math.pi  # [-1, 1]
        lat = torch.asin(d[..., 2].clamp(-1.0, 1.0)) / (math.pi / 2)  # [-1, 1], +1 straight up
        grid = torch.stack([lon, -lat], dim=-1)  # grid_sample: x across, y down the rows
        B = grid.shape[0]
        out = F.grid_sample(self.logits.expand(B, -1, -1, -1), grid, mode="bilinear",
                            padding_mode="border", align_corners=False)
        return torch.sigmoid(out)


def draw_random_colours(views: int, prob: float, generator: torch.Generator | None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Which views get a random solid background and which colour: ((views,) bool drawn with
    probability ``prob``, (views, 3) uniform colours in [0, 1]), both from ``generator`` on the CPU
    (DreamFusion's background augmentation, threestudio's ``random_aug``)."""
    use = torch.rand(views, generator=generator) < prob
    return use, torch.rand(views, 3, generator=generator)


def view_backgrounds(views: int, grey: float, random_prob: float, generator: torch.Generator | None,
                     device: torch.device | str) -> torch.Tensor:
    """(views, 3) solid background colours: a random colour with probability ``random_prob``
    (:func:`draw_random_colours`), the grey level ``grey`` otherwise; nothing is drawn when
    ``random_prob`` is 0. Used by the fine stage: with a fixed white background an object whose
    albedo is near white has no silhouette in the render."""
    bgs = torch.full((views, 3), float(grey))
    if random_prob > 0:
        use, colours = draw_random_colours(views, random_prob, generator)
        bgs = torch.where(use[:, None], colours, bgs)
    return bgs.to(device)


def composite_backgrounds(premultiplied: torch.Tensor, alpha: torch.Tensor, environment: torch.Tensor,
                          random_colours: torch.Tensor, use_random: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Put a background behind renders made over black.

    Args:
        premultiplied: (B, 3, H, W) colour × alpha (a render over a black background).
        alpha: (B, 1, H, W) coverage.
        environment: (B, 3, H, W) the learned background; random_colours: (B, 3) solid colours;
        use_random: (B,) bool, the views that get their random colour instead.
    Returns:
        (images (B, 3, H, W), backgrounds (B, 3, H, W)) with images = premultiplied + (1 − α)·bg.
    """
    solid = random_colours.view(-1, 3, 1, 1).expand_as(environment)
    bg = torch.where(use_random.view(-1, 1, 1, 1), solid, environment)
    return premultiplied + (1.0 - alpha) * bg, bg

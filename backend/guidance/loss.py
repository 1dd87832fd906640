"""The one loss-function type both optimisation stages take, and SDS through the Guidance interface.

A loss function maps a batch of rendered views to a scalar:

    loss_fn(images, cameras, backgrounds, step_ratio) -> torch.Tensor (scalar)

* ``images``: (B, 3, H, W) float in [0, 1], row 0 at the top, differentiable;
* ``cameras``: the :class:`~backend.gaussians.cameras.Cameras` the views were rendered with;
* ``backgrounds``: (B, 3) float in [0, 1], the colour composited behind each view;
* ``step_ratio``: the stage's progress in [0, 1] (``backend.schedule.step_ratio``).

The coarse (Gaussian) and fine (textured mesh) stages call it identically; the pipeline plugs in
:func:`sds_loss_fn`, the reference tests a photometric loss against known images.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from backend.gaussians.cameras import Cameras
from backend.guidance.sample_sides import guidance_side

LossFn = Callable[[torch.Tensor, Cameras, torch.Tensor, float], torch.Tensor]


def sds_loss_fn(guidance) -> LossFn:
    """The SDS loss of a ``Guidance`` as a :data:`LossFn`; renders are resized (bilinear, antialiased when
    shrinking) to the side of ``guidance.sides`` that fits them (``sample_sides.guidance_side``), for most
    models the one ``guidance.resolution``."""
    sides = tuple(guidance.sides) or (int(guidance.resolution),)

    def loss(images: torch.Tensor, cameras: Cameras, backgrounds: torch.Tensor, step_ratio: float) -> torch.Tensor:
        side = guidance_side(sides, images.shape[-1])
        if images.shape[-1] != side or images.shape[-2] != side:
            images = F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False,
                                   antialias=images.shape[-1] > side)
        return guidance.sds_loss(images, cameras.azimuth_deg, cameras.elevation_deg, step_ratio)

    return loss

"""The Guidance interface every diffusion prior implements (see docs/ARCHITECTURE.md)."""

from __future__ import annotations

import torch


class GuidanceError(RuntimeError):
    """A guidance model could not be used (bad folder, unsupported layout, ...)."""


class ModelNotFoundError(GuidanceError):
    """The requested model is neither a local folder nor loadable from the hub cache."""


class Guidance:
    """A 2D diffusion prior that turns rendered views into a Score Distillation loss.

    Attributes:
        resolution: image side (pixels) the prior works at; renders are resized to it.
        sides: every image side the prior accepts, ascending, ``resolution`` the largest; a render is
            resized to the largest one not above its own side (``backend.guidance.sample_sides``);
            empty: ``resolution`` only.
        model_id: the hub id or folder the model came from.
        description: one plain line saying which model is used and why (for logs / progress).
        vocabulary: set of words the prior knows, or None when it is open-vocabulary.
    """

    resolution: int = 512
    sides: tuple[int, ...] = ()
    model_id: str = ""
    description: str = ""
    vocabulary: frozenset[str] | None = None

    def set_prompt(self, prompt: str, negative_prompt: str = "") -> None:
        """Encode ``prompt`` (with every view suffix) and ``negative_prompt`` once; cached per prompt."""
        raise NotImplementedError

    def sds_loss(self, images: torch.Tensor, azimuth_deg: torch.Tensor, elevation_deg: torch.Tensor,
                 step_ratio: float) -> torch.Tensor:
        """Scalar loss whose gradient w.r.t. ``images`` is the SDS gradient.

        Args:
            images: (B, 3, H, W) float in [0, 1], differentiable.
            azimuth_deg, elevation_deg: (B,) camera angles in degrees (pick the view suffix).
            step_ratio: run progress in [0, 1]; drives timestep annealing.
        """
        raise NotImplementedError

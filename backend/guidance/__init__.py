"""Diffusion guidance for Score Distillation Sampling.

``load_guidance(config, device) -> Guidance`` resolves ``config.model`` ("auto", a hub id or a local
folder), loads it with ``from_pretrained`` into a resident cache and returns a
:class:`~backend.guidance.sds.DiffusionGuidance` (latent SD 1.x/2.x, or pixel-space when the folder
has no ``vae/``). The choice is logged and available as ``guidance.description``.
"""

from __future__ import annotations

import logging

import torch

from backend.guidance.base import Guidance, GuidanceError, ModelNotFoundError
from backend.guidance.loader import DEFAULT_MODEL, clear_cache, load_model, resolve_model

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MODEL", "Guidance", "GuidanceError", "ModelNotFoundError", "clear_cache", "load_guidance",
    "resolve_model",
]


def load_guidance(config, device: torch.device | str) -> Guidance:
    """A ready SDS guidance for ``config`` (a ``GuidanceConfig``) on ``device``.

    Raises:
        ModelNotFoundError: with instructions for getting the model.
    """
    from backend.guidance.sds import DiffusionGuidance

    device = torch.device(device)
    model, reason = resolve_model(config.model, device)
    log.info("guidance: %s", reason)
    bundle = load_model(model, device, fp16=config.fp16, cpu_offload=config.cpu_offload,
                        attention_slicing=config.attention_slicing, vae=getattr(config, "vae", "model"))
    kind = "latent" if bundle.is_latent else "pixel-space"
    description = f"{reason}; {kind} prior at {bundle.resolution}px on {device}"
    if bundle.vae_kind == "taesd":
        description += " (TAESD encoder)"
    for warning in bundle.warnings:
        description += f"; warning: {warning}"
    return DiffusionGuidance(bundle, config, description)

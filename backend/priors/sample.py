"""DDIM sampling from a pixel-space conjure-solids model folder (for evaluation and tests).

``sample_images(model_dir, prompts, steps=30, cfg=5.0, seed=0) -> (B, 3, H, W) float32 in [0, 1]``

A camera-conditioned model (``backend.camera_conditioning``) is sampled from ``cameras``, one
(azimuth, elevation) in degrees per prompt, or from ``DEFAULT_CAMERA`` for every prompt.
"""

from __future__ import annotations

from pathlib import Path

import torch

from backend.camera_conditioning import encode_cameras
from backend.priors.model import SolidsModel, encode_prompts, load_model

#: (azimuth, elevation) in degrees used for a camera-conditioned model when no cameras are given.
DEFAULT_CAMERA = (30.0, 20.0)

_MODELS: dict[str, SolidsModel] = {}


def _get_model(model_dir: str | Path) -> SolidsModel:
    key = str(Path(model_dir).resolve())
    if key not in _MODELS:
        _MODELS[key] = load_model(model_dir)
    return _MODELS[key]


@torch.no_grad()
def sample_images(
    model_dir: str | Path,
    prompts: list[str],
    steps: int = 30,
    cfg: float = 5.0,
    seed: int = 0,
    negative_prompt: str = "",
    eta: float = 0.0,
    cameras: list[tuple[float, float]] | None = None,
    side: int | None = None,
) -> torch.Tensor:
    """Sample one image per prompt with DDIM and classifier-free guidance.

    Args:
        model_dir: a folder written by ``backend.priors.model.save_model`` (no ``vae/``).
        prompts: B prompts (each sampled once; repeat a prompt for more samples).
        steps: DDIM steps; cfg: guidance scale (1 = no guidance); seed: initial-noise seed.
        cameras: (azimuth, elevation) degrees per prompt for a camera-conditioned model (ignored by a
            text-only one); None: ``DEFAULT_CAMERA``.
        side: image side in pixels, one the model declares (``sample_sides.json``); None: ``sample_size``.
    Returns:
        (B, 3, H, W) float32 RGB in [0, 1], row 0 at the top; H = W = ``side``.
    """
    from diffusers import DDIMScheduler

    if not prompts:
        raise ValueError("need at least one prompt")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    m = _get_model(model_dir)
    sched = DDIMScheduler.from_config(m.scheduler.config)
    sched.set_timesteps(steps)
    B = len(prompts)
    cond = encode_prompts(m, prompts)
    uncond = encode_prompts(m, [negative_prompt] * B)
    size = int(m.unet.config.sample_size)
    declared = m.sides or (size,)
    if side is not None:
        if int(side) not in declared:
            raise ValueError(f"side {side} is not one the model was trained at ({', '.join(map(str, declared))})")
        size = int(side)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, int(m.unet.config.in_channels), size, size, generator=g)
    emb = torch.cat([cond, uncond])
    labels = None
    if m.camera_encoding is not None:
        cams = torch.tensor(cameras if cameras is not None else [DEFAULT_CAMERA] * B, dtype=torch.float32)
        if cams.shape != (B, 2):
            raise ValueError(f"need one (azimuth, elevation) per prompt, got {tuple(cams.shape)} for {B} prompts")
        vec = encode_cameras(m.camera_encoding, cams[:, 0], cams[:, 1])
        labels = torch.cat([vec, vec])
    for t in sched.timesteps:
        out = m.unet(torch.cat([x, x]), t, encoder_hidden_states=emb, class_labels=labels).sample
        e_c, e_u = out.chunk(2)
        eps = e_u + cfg * (e_c - e_u)
        x = sched.step(eps, t, x, eta=eta, generator=g).prev_sample
    return ((x.clamp(-1, 1) + 1) / 2).float()

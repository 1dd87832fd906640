"""The image sides a pixel-space model was trained at, and which one SDS uses for a render.

A pixel-space UNet is fully convolutional, so one model can learn several image sides at once
(``python -m backend.priors.train --train-resolutions 32,48,64``). Such a model declares them in
``sample_sides.json`` beside ``model_index.json``::

    {"sides": [32, 48, 64]}

SDS then scores each render at the largest declared side that does not exceed the render's own side,
so a coarse stage whose render resolution grows (``coarse.render_resolution`` →
``render_resolution_end``) gets a prior that sees finer detail as it goes, and the fine stage's 64 px
renders meet the 64 px prior. This is coarse-to-fine guidance resolution: Magic3D (Lin et al. 2023)
guides its coarse stage with a 64 px base model and its fine stage with a 512 px one; here the two are
one model. A model without the file (Stable Diffusion, any latent model) works at its single
``sample_size`` and every render is resized to it, as before.
"""

from __future__ import annotations

import json
from pathlib import Path

SAMPLE_SIDES_FILE = "sample_sides.json"


def parse_sides(text: str, source: str, sample_size: int) -> tuple[int, ...]:
    """The sorted sides a ``sample_sides.json`` text declares; ValueError naming ``source`` when they are
    not positive multiples of 4 or do not include the UNet's ``sample_size`` as the largest."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source} is not valid JSON: {exc}") from exc
    sides = data.get("sides") if isinstance(data, dict) else None
    if (not isinstance(sides, list) or not sides
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 8 and s % 4 == 0 for s in sides)):
        raise ValueError(f"{source} must hold {{\"sides\": [...]}} with image sides that are multiples of 4 "
                         f"from 8, got {text.strip()[:80]!r}")
    out = tuple(sorted(set(sides)))
    if out[-1] != int(sample_size):
        raise ValueError(f"{source}: the largest side {out[-1]} must be the UNet's sample_size {sample_size}")
    return out


def read_sides(folder: str | Path | None, sample_size: int) -> tuple[int, ...]:
    """The sides declared in a local model folder, or ``(sample_size,)`` when it declares none."""
    path = None if folder is None else Path(folder) / SAMPLE_SIDES_FILE
    if path is None or not path.is_file():
        return (int(sample_size),)
    return parse_sides(path.read_text(), str(path), sample_size)


def write_sides(folder: str | Path, sides: tuple[int, ...] | list[int]) -> Path:
    path = Path(folder) / SAMPLE_SIDES_FILE
    path.write_text(json.dumps({"sides": sorted({int(s) for s in sides})}) + "\n")
    return path


def guidance_side(sides: tuple[int, ...], render_side: int) -> int:
    """The side SDS scores a ``render_side`` px render at: the largest declared side not above it, or
    the smallest side when the render is smaller than all of them."""
    fitting = [s for s in sides if s <= int(render_side)]
    return max(fitting) if fitting else min(sides)

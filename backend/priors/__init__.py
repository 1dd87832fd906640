"""The bundled "conjure-solids" diffusion prior: a closed world of simple solids in plain colours.

* ``BUNDLED_PRIOR_DIR`` — the diffusers-layout model folder shipped with the package
  (``model_index.json``, ``unet/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``; no ``vae/``:
  a pixel-space model on RGB in [-1, 1] at ``unet.config.sample_size``).
* ``VOCABULARY`` — the words the prior knows: ``shapes``, ``colours`` and ``views`` (the view words
  the guidance appends as ``"<prompt>, <view> view"``).
* ``prompt_in_vocabulary(prompt)`` — whether every word of a prompt is known, and which are not.

Submodules: ``solids`` (analytic renderer of the solids), ``data`` (captioned training images),
``tokenizer`` (the word-level CLIP tokenizer files), ``model`` (model construction), ``train``
(``python -m backend.priors.train``), ``sample`` (DDIM sampler), ``evaluate`` (colour / shape judges).
"""

from __future__ import annotations

import re
from pathlib import Path

BUNDLED_PRIOR_DIR = Path(__file__).parent / "weights" / "conjure-solids"

#: Shape names, in the order the shape classifier numbers them.
SHAPES: tuple[str, ...] = ("cube", "sphere", "cylinder", "cone", "torus", "pyramid")

#: Named colours → linear-ish sRGB albedo in [0, 1].
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.08, 0.08),
    "orange": (1.00, 0.50, 0.05),
    "yellow": (0.95, 0.85, 0.10),
    "green": (0.10, 0.68, 0.16),
    "blue": (0.10, 0.25, 0.92),
    "purple": (0.55, 0.14, 0.76),
    "white": (0.95, 0.95, 0.95),
    "black": (0.07, 0.07, 0.07),
}

VIEWS: tuple[str, ...] = ("front", "side", "back", "overhead")

VOCABULARY: dict[str, tuple[str, ...]] = {
    "shapes": SHAPES,
    "colours": tuple(COLOURS),
    "views": VIEWS,
}

#: Words that may appear in a prompt without carrying meaning for the prior.
FILLER_WORDS: tuple[str, ...] = ("a", "an", "the", "view", "of", "one", "single", "solid", "3d", "object")


def prompt_words(prompt: str) -> list[str]:
    """Lower-case words of a prompt (letters/digits), punctuation dropped."""
    return re.findall(r"[a-z0-9]+", prompt.lower())


def prompt_in_vocabulary(prompt: str) -> tuple[bool, list[str]]:
    """(all known, unknown words) for a prompt against the prior's closed world.

    A prompt is "in the vocabulary" when every word is a shape, colour, view or filler word and
    it names at least one shape.
    """
    known = set(SHAPES) | set(COLOURS) | set(VIEWS) | set(FILLER_WORDS)
    words = prompt_words(prompt)
    unknown = [w for w in words if w not in known]
    has_shape = any(w in SHAPES for w in words)
    return (not unknown and has_shape), unknown


def vocabulary_text() -> str:
    """A one-line human description of the vocabulary (for warnings)."""
    return (
        f"shapes: {', '.join(SHAPES)}; colours: {', '.join(COLOURS)}; "
        f"e.g. \"a red cube\""
    )

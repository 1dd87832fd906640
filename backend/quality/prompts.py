"""The asset-quality benchmark's prompt list and the intent (shape, colour) read from a prompt.

``BENCH_PROMPTS`` is the one home of the project's 12-prompt benchmark (issue 12): every solid of
the bundled prior twice and every colour at least once. ``parse_intent`` reads the intended solid
and colour from any prompt in the prior's closed vocabulary (``backend.priors.SHAPES`` /
``backend.priors.COLOURS``).
"""

from __future__ import annotations

from dataclasses import dataclass

from backend.priors import COLOURS, SHAPES, prompt_words


@dataclass(frozen=True)
class Intent:
    """What a prompt asks for: a solid of ``backend.priors.SHAPES`` and a colour of ``COLOURS`` (or None)."""

    shape: str
    colour: str | None


#: (prompt, shape, colour): 6 solids × 2, all 8 colours.
BENCH_PROMPTS: tuple[tuple[str, str, str], ...] = (
    ("a red cube", "cube", "red"),
    ("a blue sphere", "sphere", "blue"),
    ("a green cylinder", "cylinder", "green"),
    ("a yellow cone", "cone", "yellow"),
    ("an orange torus", "torus", "orange"),
    ("a purple pyramid", "pyramid", "purple"),
    ("a white cube", "cube", "white"),
    ("a black sphere", "sphere", "black"),
    ("a red cylinder", "cylinder", "red"),
    ("a blue cone", "cone", "blue"),
    ("a yellow torus", "torus", "yellow"),
    ("a green pyramid", "pyramid", "green"),
)


def parse_intent(prompt: str) -> Intent:
    """The solid and colour a prompt names (first of each); ValueError when it names no solid."""
    words = prompt_words(prompt)
    shapes = [w for w in words if w in SHAPES]
    colours = [w for w in words if w in COLOURS]
    if not shapes:
        raise ValueError(f"prompt {prompt!r} names no solid the judge knows ({', '.join(SHAPES)})")
    return Intent(shapes[0], colours[0] if colours else None)


def slug(prompt: str) -> str:
    """File-name form of a prompt: 'a red cube' → 'a_red_cube'."""
    return "_".join(prompt_words(prompt)) or "prompt"

"""Generation parameters sent with ``submit``, validated field by field."""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass, field

from .errors import ProtocolError

MAX_PROMPT_CHARS = 1000
MAX_OVERRIDES = 64
MAX_OVERRIDE_KEY_CHARS = 128
MAX_OVERRIDE_STR_CHARS = 256
SEED_MAX = 2**32 - 1
#: Preset names: lower-case letter first, then letters, digits, ``_`` or ``-`` (at most 32).
PRESET_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}\Z")
#: Override keys: dotted preset paths such as ``coarse.steps`` (1..6 identifiers).
OVERRIDE_KEY_RE = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*){0,5}\Z")
PARAM_FIELDS = ("prompt", "negative_prompt", "seed", "preset", "overrides")
#: Job kinds a ``submit`` may name (content ``kind``): make a new asset, or texture an uploaded mesh.
JOB_KINDS = ("generate", "texture")


@dataclass
class GenerationParams:
    """What to generate.

    Attributes:
        prompt: text prompt, stripped, 1..1000 characters, no control characters.
        negative_prompt: what to avoid, 0..1000 characters, no control characters.
        seed: RNG seed in 0..2**32-1, or None for a random seed chosen by the backend.
        preset: preset name (``auto`` (default), ``draft``, ``standard``, ``high``, ``cpu``); the backend
            checks that it exists.
        overrides: dotted preset path -> int | float | bool | str, e.g. ``{"coarse.steps": 300}``;
            the backend checks that the paths exist.
    """

    prompt: str
    negative_prompt: str = ""
    seed: int | None = None
    preset: str = "auto"
    overrides: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "seed": self.seed,
            "preset": self.preset,
            "overrides": dict(self.overrides),
        }


def _err(field_name: str, msg: str) -> ProtocolError:
    return ProtocolError("invalid_params", f"{field_name}: {msg}", field=field_name)


def _check_text(name: str, value, *, allow_empty: bool, max_chars: int) -> str:
    if not isinstance(value, str):
        raise _err(name, f"must be a string, got {type(value).__name__}")
    if len(value) > max_chars:
        raise _err(name, f"is {len(value)} characters long; the limit is {max_chars}")
    for i, ch in enumerate(value):
        if unicodedata.category(ch) in ("Cc", "Cs"):
            raise _err(name, f"contains a control character {ch!r} at position {i}")
    stripped = value.strip()
    if not allow_empty and not stripped:
        raise _err(name, "must not be empty")
    return stripped


def _check_override(key, value) -> None:
    if not isinstance(key, str) or len(key) > MAX_OVERRIDE_KEY_CHARS or not OVERRIDE_KEY_RE.match(key):
        shown = key if isinstance(key, str) and len(key) <= 40 else repr(key)[:40]
        raise _err("overrides", f"key {shown!r} is not a dotted preset path like 'coarse.steps'")
    name = f"overrides.{key}"
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        if abs(value) > 2**53:
            raise _err(name, "integer out of range (|value| <= 2**53)")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _err(name, "must be a finite number")
        return
    if isinstance(value, str):
        _check_text(name, value, allow_empty=True, max_chars=MAX_OVERRIDE_STR_CHARS)
        return
    raise _err(name, f"must be int, float, bool or str, got {type(value).__name__}")


def validate_params(data) -> GenerationParams:
    """Validate a params dict (as sent in ``submit``) and return ``GenerationParams``.

    Missing optional fields take their defaults; unknown fields are rejected. Raises
    ``ProtocolError("invalid_params", ...)`` whose ``field`` names the offending field.
    """
    if isinstance(data, GenerationParams):
        data = data.to_dict()
    if not isinstance(data, dict):
        raise ProtocolError("invalid_params", "params must be an object", field="params")
    for key in data:
        if key not in PARAM_FIELDS:
            shown = key if isinstance(key, str) and len(key) <= 40 else repr(key)[:40]
            raise _err(str(shown), f"unknown parameter (known: {', '.join(PARAM_FIELDS)})")
    if "prompt" not in data:
        raise _err("prompt", "is required")
    prompt = _check_text("prompt", data["prompt"], allow_empty=False, max_chars=MAX_PROMPT_CHARS)
    negative = _check_text(
        "negative_prompt", data.get("negative_prompt", ""), allow_empty=True, max_chars=MAX_PROMPT_CHARS
    )
    seed = data.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise _err("seed", f"must be an integer or null, got {type(seed).__name__}")
        if not 0 <= seed <= SEED_MAX:
            raise _err("seed", f"must be in 0..{SEED_MAX}, got {seed}")
    preset = data.get("preset", "auto")
    if not isinstance(preset, str) or not PRESET_RE.match(preset):
        shown = preset[:40] if isinstance(preset, str) else type(preset).__name__
        raise _err("preset", f"must be a preset name like 'standard' (a-z, 0-9, _ or -), got {shown!r}")
    overrides = data.get("overrides", {})
    if overrides is None:
        overrides = {}
    if not isinstance(overrides, dict):
        raise _err("overrides", f"must be an object, got {type(overrides).__name__}")
    if len(overrides) > MAX_OVERRIDES:
        raise _err("overrides", f"has {len(overrides)} entries; the limit is {MAX_OVERRIDES}")
    for key, value in overrides.items():
        _check_override(key, value)
    return GenerationParams(
        prompt=prompt, negative_prompt=negative, seed=seed, preset=preset, overrides=dict(overrides)
    )

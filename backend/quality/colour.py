"""Colour verdict of the asset-quality judge: mean surface colour → HSV → one of the prior's colours.

Input: the area-weighted mean sRGB (3,) in [0, 1] of the surface as seen (``texture.surface_samples``
+ ``texture.sample_surface_colour``). HSV is Python's ``colorsys`` (hue in degrees here).

Rules, in order (absolute, no "nearest of eight"):

* black: value ≤ ``BLACK_MAX_VALUE``;
* white: saturation ≤ ``WHITE_MAX_SATURATION`` and value ≥ ``WHITE_MIN_VALUE``;
* grey (no colour of the vocabulary; always wrong): saturation < ``CHROMA_MIN_SATURATION``, i.e.
  too unsaturated for a hue and too dark or too saturated for white;
* otherwise the hue nearest to the hue of one of the chromatic colours in ``backend.priors.COLOURS``
  (red 0°, orange 28°, yellow 53°, green 126°, blue 229°, purple 280°). The margin is how much
  nearer that hue is than the next one (degrees); below ``MIN_HUE_MARGIN`` the verdict is
  "ambiguous" (a hue on the border between two names is not a right answer).
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np

from backend.priors import COLOURS

BLACK_MAX_VALUE = 0.25
WHITE_MIN_VALUE = 0.75
WHITE_MAX_SATURATION = 0.20
CHROMA_MIN_SATURATION = 0.35
MIN_HUE_MARGIN = 5.0

#: Hue (degrees) of each chromatic colour of the prior.
HUES: dict[str, float] = {name: colorsys.rgb_to_hsv(*rgb)[0] * 360.0 for name, rgb in COLOURS.items()
                          if name not in ("white", "black")}


@dataclass
class ColourVerdict:
    """name: a key of COLOURS, 'grey' or 'ambiguous'; hsv: (hue degrees, saturation, value) of the
    mean colour; margin: hue margin in degrees (None for white/black/grey); rgb: the mean sRGB."""

    name: str
    hsv: tuple[float, float, float]
    margin: float | None
    rgb: tuple[float, float, float]


def _hue_dist(a: float, b: float) -> float:
    d = abs(a - b) % 360.0
    return min(d, 360.0 - d)


def classify_colour(rgb) -> ColourVerdict:
    """Name the mean colour ``rgb`` (3,) sRGB in [0, 1] by the rules of the module docstring."""
    r, g, b = (float(c) for c in np.clip(np.asarray(rgb, dtype=np.float64).reshape(3), 0.0, 1.0))
    h, s, v = colorsys.rgb_to_hsv(r, g, b)
    hsv = (h * 360.0, s, v)
    name, margin = _name_hsv(hsv)
    return ColourVerdict(name, hsv, margin, (r, g, b))


def _name_hsv(hsv: tuple[float, float, float]) -> tuple[str, float | None]:
    """(name, hue margin or None) of one colour (hue degrees, saturation, value) by the module's rules."""
    h, s, v = hsv
    if v <= BLACK_MAX_VALUE:
        return "black", None
    if s <= WHITE_MAX_SATURATION and v >= WHITE_MIN_VALUE:
        return "white", None
    if s < CHROMA_MIN_SATURATION:
        return "grey", None
    dists = sorted((_hue_dist(h, hue), name) for name, hue in HUES.items())
    margin = dists[1][0] - dists[0][0]
    return (dists[0][1] if margin >= MIN_HUE_MARGIN else "ambiguous"), margin


def off_colour_fraction(rgb: np.ndarray, colour: str) -> float:
    """Fraction of surface samples ``rgb`` (N, 3) sRGB in [0, 1] (equal-area samples of the surface as seen)
    whose own colour, named one by one by the module's rules, is not ``colour``: blotches of another hue,
    grey or black patches on a chromatic object, tinted patches on a white one. The colour verdict
    judges only the mean, which blotches of two opposite tints leave right. Information only (no
    threshold); a texture with shading or a little speckle scores a few per cent."""
    rgb = np.clip(np.asarray(rgb, dtype=np.float64).reshape(-1, 3), 0.0, 1.0)
    if len(rgb) == 0:
        return 0.0
    off = 0
    for r, g, b in rgb.tolist():
        h, s, v = colorsys.rgb_to_hsv(r, g, b)
        off += _name_hsv((h * 360.0, s, v))[0] != colour
    return off / len(rgb)


def luminance(rgb: np.ndarray) -> np.ndarray:
    """Rec. 709 luma of sRGB values (..., 3) in [0, 1] (no linearisation: a brightness proxy)."""
    rgb = np.asarray(rgb, dtype=np.float64)
    return rgb[..., 0] * 0.2126 + rgb[..., 1] * 0.7152 + rgb[..., 2] * 0.0722

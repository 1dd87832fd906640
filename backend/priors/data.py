"""Captioned training images of the solids, seen by SDS-like cameras.

Geometry is rendered once per (shape, camera) as colour-free maps (coverage, shading — see
``solids.render_solid_maps``) and cached; colours and backgrounds are applied per batch, so the
data set is effectively unlimited. Captions match the prompts the guidance builds:
``"a red cube"`` and ``"a red cube, side view"`` with the view word from
``backend.gaussians.cameras.view_word(azimuth, elevation)``; ~10 % are empty (classifier-free
guidance dropout).

Images are (B, 3, H, W) float32 in [0, 1], row 0 at the top.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from backend.gaussians.cameras import (
    AZIMUTH_RANGE,
    DISTANCE_RANGE,
    ELEVATION_RANGE,
    FOVY_RANGE,
    orbit_cameras,
    view_word,
)
from backend.priors import COLOURS, SHAPES
from backend.priors.solids import DEFAULT_LIGHT, composite, render_solid_maps

#: Camera distance range for the data: the SDS range widened a little (object size jitter).
DATA_DISTANCE_RANGE = (DISTANCE_RANGE[0] - 0.2, DISTANCE_RANGE[1] + 0.2)
#: Fraction of views drawn from high elevations (45°-85°) so "overhead view" is learnt too.
HIGH_ELEVATION_FRACTION = 0.12
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
COLOUR_TABLE = torch.tensor([COLOURS[c] for c in COLOUR_NAMES], dtype=torch.float32)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(shape: str, colour: str | None, view: str | None = None) -> str:
    """The canonical prompt: "a red cube" / "an orange torus" (+ ", side view")."""
    body = f"{colour} {shape}" if colour else shape
    text = f"{article(body)} {body}"
    return f"{text}, {view} view" if view else text


@dataclass
class GeometryBank:
    """Cached colour-free renders: coverage/shading (S, N, H, W) and the views' angles (S, N)."""

    coverage: torch.Tensor
    shading: torch.Tensor
    azimuth: torch.Tensor
    elevation: torch.Tensor

    @property
    def views_per_shape(self) -> int:
        return int(self.coverage.shape[1])


def sample_view_params(n: int, g: torch.Generator,
                       high_fraction: float = HIGH_ELEVATION_FRACTION) -> tuple[torch.Tensor, ...]:
    """(azimuth, elevation, distance, fovy) tensors (n,) for data views, degrees / metres; a
    ``high_fraction`` of the elevations is drawn from 45°-85° instead of ``ELEVATION_RANGE``."""

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=g)

    az = u(*AZIMUTH_RANGE)
    el = u(*ELEVATION_RANGE)
    high = torch.rand(n, generator=g) < high_fraction
    el = torch.where(high, u(45.0, 85.0), el)
    return az, el, u(*DATA_DISTANCE_RANGE), u(*FOVY_RANGE)


def build_geometry_bank(
    views_per_shape: int, resolution: int, seed: int = 0, supersample: int = 3,
    cache_dir: str | Path | None = "/tmp/conjure_solids_cache", chunk: int = 50,
    high_elevation_fraction: float = HIGH_ELEVATION_FRACTION,
) -> GeometryBank:
    """Render every shape from ``views_per_shape`` random cameras (cached on disk when ``cache_dir``);
    ``high_elevation_fraction`` of them from 45°-85° above the horizon (``sample_view_params``)."""
    high = "" if high_elevation_fraction == HIGH_ELEVATION_FRACTION else f"|high{high_elevation_fraction}"
    key = hashlib.sha1(
        f"v2|{views_per_shape}|{resolution}|{seed}|{supersample}|{SHAPES}|{DEFAULT_LIGHT}{high}".encode()
    ).hexdigest()[:12]
    path = Path(cache_dir) / f"bank_{key}.pt" if cache_dir else None
    if path is not None and path.is_file():
        d = torch.load(path)
        return GeometryBank(d["coverage"], d["shading"], d["azimuth"], d["elevation"])
    g = torch.Generator().manual_seed(seed)
    covs, shs, azs, els = [], [], [], []
    base_light = torch.tensor(DEFAULT_LIGHT)
    for shape in SHAPES:
        az, el, dist, fov = sample_view_params(views_per_shape, g, high_elevation_fraction)
        light = torch.nn.functional.normalize(base_light + 0.25 * torch.randn(views_per_shape, 3, generator=g), dim=-1)
        light[:, 2] = light[:, 2].abs().clamp(min=0.3)  # the light stays above the horizon
        c_all, s_all = [], []
        for i in range(0, views_per_shape, chunk):
            sl = slice(i, i + chunk)
            cams = orbit_cameras(az[sl], el[sl], dist[sl], fov[sl], resolution)
            c, s = render_solid_maps(shape, cams, light_dir=light[sl], supersample=supersample)
            c_all.append(c)
            s_all.append(s)
        covs.append(torch.cat(c_all))
        shs.append(torch.cat(s_all))
        azs.append(az)
        els.append(el)
    bank = GeometryBank(torch.stack(covs), torch.stack(shs), torch.stack(azs), torch.stack(els))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"coverage": bank.coverage, "shading": bank.shading,
                    "azimuth": bank.azimuth, "elevation": bank.elevation}, tmp)
        tmp.replace(path)
    return bank


def sample_backgrounds(n: int, g: torch.Generator) -> torch.Tensor:
    """(n, 3) plain backgrounds: white (35 %), light grey (25 %), dark grey (10 %) or a uniformly
    random colour (30 %, like the coarse stage's ``random_backgrounds``)."""
    r = torch.rand(n, generator=g)
    level = torch.where(
        r < 0.35, 0.96 + 0.04 * torch.rand(n, generator=g),
        torch.where(r < 0.6, 0.6 + 0.35 * torch.rand(n, generator=g), 0.1 + 0.3 * torch.rand(n, generator=g)),
    )
    grey = (level[:, None] + 0.02 * torch.randn(n, 3, generator=g)).clamp(0, 1)
    colour = torch.rand(n, 3, generator=g)
    return torch.where((r >= 0.7)[:, None], colour, grey)


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, H, W) float32 in [0, 1]
    captions: list[str]
    shape_idx: torch.Tensor  # (B,) int64 into SHAPES
    colour_idx: torch.Tensor  # (B,) int64 into COLOUR_NAMES
    azimuth: torch.Tensor  # (B,) float32 degrees, the view's camera (``backend.gaussians.cameras``)
    elevation: torch.Tensor  # (B,) float32 degrees


def sample_batch(
    bank: GeometryBank, batch: int, g: torch.Generator, p_empty: float = 0.1,
    p_view: float = 0.6, p_shape_only: float = 0.05,
) -> Batch:
    """A random batch of captioned images from the geometry bank."""
    S, N = bank.coverage.shape[:2]
    si = torch.randint(0, S, (batch,), generator=g)
    vi = torch.randint(0, N, (batch,), generator=g)
    ci = torch.randint(0, len(COLOUR_NAMES), (batch,), generator=g)
    albedo = (COLOUR_TABLE[ci] + 0.03 * torch.randn(batch, 3, generator=g)).clamp(0, 1)
    bg = sample_backgrounds(batch, g)
    rgb = composite(bank.coverage[si, vi], bank.shading[si, vi], albedo, bg)  # (B, H, W, 3)
    u = torch.rand(batch, 3, generator=g)
    caps = []
    for k in range(batch):
        if u[k, 0] < p_empty:
            caps.append("")
            continue
        shape = SHAPES[int(si[k])]
        colour = None if u[k, 1] < p_shape_only else COLOUR_NAMES[int(ci[k])]
        view = None
        if u[k, 2] < p_view:
            view = view_word(float(bank.azimuth[si[k], vi[k]]), float(bank.elevation[si[k], vi[k]]))
        caps.append(caption(shape, colour, view))
    return Batch(rgb.permute(0, 3, 1, 2).contiguous(), caps, si, ci, bank.azimuth[si, vi], bank.elevation[si, vi])


def all_prompts(with_views: bool = True) -> list[str]:
    """Every canonical prompt of the closed world (for tokenizer caching and evaluation)."""
    out = [""]
    for s in SHAPES:
        for c in [None, *COLOUR_NAMES]:
            out.append(caption(s, c))
            if with_views:
                out += [caption(s, c, v) for v in ("front", "side", "back", "overhead")]
    return out


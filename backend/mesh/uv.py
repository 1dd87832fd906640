"""UV unwrapping with xatlas (charts packed with padding into one atlas).

UVs follow the project's texture convention: per corner, origin at the bottom-left, in [0, 1];
texel (row r, column c) of an H×W texture (row 0 at the top) is centred at
uv = ((c + 0.5)/W, 1 − (r + 0.5)/H).

xatlas (0.0.x) can crash the whole process with a segmentation fault on some inputs (very
regular meshes such as a perfect icosphere trigger it). ``unwrap`` therefore runs it in a child
process (``python -m backend.mesh.uv IN OUT``, arrays through a temporary ``.npz``): on a crash it
retries with the positions jittered by 1e-5 and then 1e-4 of the bounding-box diagonal, then once
without the fill below, and as a last resort falls back to :func:`grid_atlas` (every pair of faces in
its own cell; never fails).

Packing (``fill=True``, the default; issue 12 "an atlas that uses its area"): xatlas builds the charts
(best of ``CHART_VARIANTS``), then they are packed again as a UV mesh into exactly one resolution²
atlas at the largest scale that fits (brute-force placement), and the layout is stretched per axis
(≤ ``MAX_FILL_STRETCH``, never shrunk) to span the square. The padding is then exact in texels of
the texture (xatlas's own packing returns a w × h atlas, 200–340 texels a side for 256, and
normalising it to [0, 1]² left 1.5 texels of a 2-texel padding on some charts). xatlas's packer
keeps about half of a 256² atlas in charts for the cpu preset's 5k-face meshes either way (figures
in docs/benchmarks.md, "Atlas utilisation (session 3)"). If the charts do not fit one atlas at any
scale, xatlas is rerun with an automatically sized atlas so every UV lies in one [0, 1]² square.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

#: Tests set this to "always" (every xatlas child crashes) or to a file path (the first child that
#: finds no such file creates it and crashes) to exercise the retry and fallback paths.
CRASH_ENV = "CONJURE_TEST_XATLAS_CRASH"


@dataclass
class UVAtlas:
    """xatlas output kept in two forms.

    corner_uvs: (F*3, 2) float32 per-corner UVs (MeshPayload layout: corner k of face f at 3f + k).
    uv: (M, 2) float32 unique UV vertices; uv_faces: (F, 3) int64 indices into ``uv`` (the
        per-corner index buffer the rasteriser's ``interpolate`` takes).
    vmapping: (M,) int64 original vertex of each UV vertex.
    resolution: the atlas size in texels the padding was computed for.
    method: 'xatlas', 'xatlas-jitter', 'xatlas-jitter-unfilled' (the filled packing crashed every
        time; session 2's packing worked) or 'grid' (the fallback).
    """

    corner_uvs: np.ndarray
    uv: np.ndarray
    uv_faces: np.ndarray
    vmapping: np.ndarray
    resolution: int
    method: str = "xatlas"


#: Chart-building variants (xatlas ``ChartOptions`` fields) tried in turn; the packing whose charts
#: cover the most atlas area wins. Measured on cpu-preset outputs and the exact solids (docs/benchmarks.md,
#: "Atlas utilisation (session 3)"): no single variant is best on every mesh.
CHART_VARIANTS: tuple[dict[str, float], ...] = ({}, {"max_iterations": 2}, {"normal_deviation_weight": 4.0})

#: Meshes with more faces only get the first variant: building charts costs ~0.3 s for the cpu preset's
#: 5k faces but ~20 s for 50k (measured on the 2-core CPU), and every variant builds them again.
VARIANTS_MAX_FACES = 10_000

#: Brute-force placement (xatlas ``PackOptions.bruteForce``) only up to this atlas side: ~15 ms a
#: packing at 256², ~1.7 s at 1024² with 50k faces (against 0.23 s placed at random), and the scale
#: scan packs about a dozen times.
BRUTE_FORCE_MAX_RESOLUTION = 512

#: Largest factor by which ``fill_square`` stretches one axis of the packed layout (texels per metre
#: along that axis grow by up to this much; nothing ever shrinks, padding only widens).
MAX_FILL_STRETCH = 2.0

#: Chart scales tried by ``_fit_charts``, as multiples of resolution / (longer side of xatlas's own
#: layout), largest first; the first that fits one atlas wins (xatlas's packer is not monotonic in scale).
FIT_SCALES = tuple(1.3 - 0.025 * i for i in range(33))  # 1.3 … 0.5


def _generate(positions: np.ndarray, faces: np.ndarray, resolution: int, padding: int,
              texels_per_unit: float, chart_options: dict | None = None, uv_mesh: bool = False):
    """One ``xatlas.Atlas.generate`` call (``uv_mesh``: ``positions`` are (M, 2) UVs to repack)."""
    import xatlas

    atlas = xatlas.Atlas()
    if uv_mesh:
        atlas.add_uv_mesh(positions, faces)
    else:
        atlas.add_mesh(positions, faces)
    chart = xatlas.ChartOptions()
    for key, value in (chart_options or {}).items():
        setattr(chart, key, type(getattr(chart, key))(value))
    pack = xatlas.PackOptions()
    pack.padding = int(padding)
    pack.resolution = int(resolution)
    pack.texels_per_unit = float(texels_per_unit)
    pack.bilinear = True
    pack.blockAlign = False
    pack.bruteForce = uv_mesh and resolution <= BRUTE_FORCE_MAX_RESOLUTION  # only the final packing
    atlas.generate(chart, pack)
    return atlas


def _fit_charts(atlas, resolution: int, padding: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Repack ``atlas``'s charts into exactly one resolution² atlas at the largest scale that fits.

    xatlas with ``texels_per_unit = 0`` only estimates a density for ``resolution``: its atlas comes back
    w × h (often 200–340 texels a side for 256) and normalising that to [0, 1]² squeezes the longer
    side, so the padding shrinks below ``padding`` texels and texels turn anisotropic. Here the charts
    (as a UV mesh in xatlas's texel units) are packed again at a fixed ``resolution`` with brute-force
    placement, trying ``FIT_SCALES`` from the largest down. Returns (vmapping, indices, uvs) or None
    when no scale fits one atlas.
    """
    vm0, idx0, uv0 = atlas[0]
    uv_texels = np.ascontiguousarray(uv0 * np.array([atlas.width, atlas.height], np.float32), np.float32)
    idx0 = np.ascontiguousarray(idx0, np.uint32)
    base = resolution / max(atlas.width, atlas.height, 1)
    for factor in FIT_SCALES:
        packed = _generate(uv_texels, idx0, resolution, padding, base * factor, uv_mesh=True)
        if packed.atlas_count == 1:
            vm1, idx1, uv1 = packed[0]
            return vm0.astype(np.int64)[vm1.astype(np.int64)], idx1.astype(np.int64), uv1.astype(np.float32)
    return None


def fill_square(uvs: np.ndarray, indices: np.ndarray, resolution: int, padding: int,
                max_stretch: float = MAX_FILL_STRETCH) -> np.ndarray:
    """Stretch a packed layout per axis so its bounding box (plus ``padding`` texels) spans [0, 1]².

    Each axis is scaled by ≥ 1 (at most ``max_stretch``) about the layout's corner: texel density only
    grows and gaps between charts only widen, so the padding stays at least ``padding`` texels.
    uvs: (M, 2) in [0, 1]; indices: (F, 3). Returns the new (M, 2) float32 UVs.
    """
    used = uvs[np.unique(indices)].astype(np.float64)
    margin = padding / float(resolution)
    lo = np.maximum(used.min(0) - margin, 0.0)
    hi = np.minimum(used.max(0) + margin, 1.0)
    scale = np.clip(1.0 / np.maximum(hi - lo, 1e-9), 1.0, max_stretch)
    return np.clip((uvs - lo) * scale, 0.0, 1.0).astype(np.float32)


def atlas_use(uvs: np.ndarray, indices: np.ndarray, resolution: int) -> float:
    """Fraction of the resolution² texels whose centre lies in some UV triangle (overlaps count once,
    so a folded chart is not rewarded; ``backend.mesh.uv_check.chart_mask``)."""
    from backend.mesh.uv_check import chart_mask

    return float(chart_mask(uvs[indices], resolution, resolution).mean())


def _xatlas(positions: np.ndarray, faces: np.ndarray, resolution: int, padding: int,
            fill: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run xatlas in this process → (vmapping (M,), indices (F, 3), uvs (M, 2)) in one atlas.

    ``fill`` (the default): for each of ``CHART_VARIANTS`` (only the first above ``VARIANTS_MAX_FACES``
    faces) the charts are fitted into exactly one resolution² atlas (``_fit_charts``) and stretched to
    fill it (``fill_square``); the layout that covers the most texels (``atlas_use``) wins. ``fill=False`` (or when nothing fits) is the packing
    of session 2: xatlas's own estimate, its w × h atlas normalised to [0, 1]².
    """
    best, best_area = None, -1.0
    if fill:
        variants = CHART_VARIANTS if len(faces) <= VARIANTS_MAX_FACES else CHART_VARIANTS[:1]
        for variant in variants:
            fitted = _fit_charts(_generate(positions, faces, resolution, padding, 0.0, variant), resolution, padding)
            if fitted is None:
                continue
            vmapping, indices, uvs = fitted
            uvs = fill_square(uvs, indices, resolution, padding)
            area = atlas_use(uvs, indices, resolution) if len(variants) > 1 else 0.0
            if area > best_area:
                best, best_area = (vmapping, indices, uvs), area
        if best is not None:
            return best
    atlas = _generate(positions, faces, resolution, padding, 0.0)
    if atlas.atlas_count > 1:
        # charts did not fit one atlas: let xatlas size the atlas for a texel density that fills
        # about half of resolution² with the mesh's surface
        tri = positions[faces.astype(np.int64)].astype(np.float64)
        area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1).sum()
        atlas = _generate(positions, faces, 0, padding, math.sqrt(0.5 * resolution * resolution / max(area, 1e-12)))
    vmapping, indices, uvs = atlas[0]
    return vmapping.astype(np.int64), indices.astype(np.int64).reshape(-1, 3), uvs.astype(np.float32)


def _xatlas_subprocess(positions: np.ndarray, faces: np.ndarray, resolution: int, padding: int,
                       timeout: float, fill: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``_xatlas`` in a child process; None when it crashed or timed out."""
    repo_root = Path(__file__).resolve().parents[2]
    with tempfile.TemporaryDirectory(prefix="conjure-uv-") as tmp:
        src, dst = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        np.savez(src, positions=positions, faces=faces, resolution=resolution, padding=padding, fill=fill)
        try:
            proc = subprocess.run([sys.executable, "-m", "backend.mesh.uv", str(src), str(dst)],
                                  cwd=str(repo_root), capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning("xatlas timed out after %.0f s", timeout)
            return None
        if proc.returncode != 0 or not dst.exists():
            log.warning("xatlas failed (exit status %s): %s", proc.returncode,
                        proc.stderr.decode(errors="replace")[-500:])
            return None
        with np.load(dst) as out:
            return out["vmapping"], out["indices"], out["uvs"]


def grid_atlas(faces: np.ndarray, resolution: int, padding: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fallback parametrisation: faces in pairs, each pair in its own square cell of a grid.

    Face 2k takes the lower-left half of cell k, face 2k+1 the upper-right half, each inset by
    ``padding`` texels (at least half a texel). Distorted but valid and overlap-free.
    """
    F = len(faces)
    cells = math.ceil(F / 2)
    n = max(1, math.ceil(math.sqrt(cells)))
    size = 1.0 / n
    inset = min(max(padding, 0.5) / resolution, 0.2 * size)
    k = np.arange(F) // 2
    cx, cy = (k % n) * size, (k // n) * size
    lo, hi = inset, size - inset
    upper = (np.arange(F) % 2) == 1
    # lower-left and upper-right triangles of the cell, kept apart across the diagonal by 2·gap
    gap = min(inset, 0.1 * size)
    uv = np.empty((F, 3, 2), np.float32)
    lower_tri = np.array([[lo, lo], [hi - gap, lo], [lo, hi - gap]])
    upper_tri = np.array([[hi, hi], [lo + gap, hi], [hi, lo + gap]])
    uv[:] = np.where(upper[:, None, None], upper_tri[None], lower_tri[None])
    uv[..., 0] += cx[:, None]
    uv[..., 1] += cy[:, None]
    vmapping = faces.reshape(-1).astype(np.int64)
    indices = np.arange(F * 3, dtype=np.int64).reshape(F, 3)
    return vmapping, indices, np.clip(uv.reshape(-1, 2), 0.0, 1.0)


def unwrap(positions: np.ndarray, faces: np.ndarray, resolution: int = 1024, padding: int = 2,
           isolate: bool = True, timeout: float = 600.0, fill: bool = True) -> UVAtlas:
    """Parametrise a triangle mesh with xatlas (see the module docstring for crash handling).

    Args:
        positions: (N, 3) float vertex positions (any frame).
        faces: (F, 3) int vertex indices.
        resolution: texture side in texels the charts are packed for.
        padding: empty texels kept around each chart (bleeding margin for bilinear filtering).
        isolate: run xatlas in a child process (True) or in this one.
        fill: fit the charts into exactly one resolution² atlas and stretch them to fill it (see
            ``_xatlas``; the padding is then exact in texels); False keeps xatlas's own w × h atlas
            normalised to [0, 1]² (session 2's packing, about 3× less xatlas time).

    Returns:
        UVAtlas whose faces are in the input order (corner k of face f ↔ faces[f, k]).
    """
    positions = np.ascontiguousarray(positions, dtype=np.float32)
    faces = np.ascontiguousarray(faces, dtype=np.uint32)
    if faces.ndim != 2 or faces.shape[1] != 3 or len(faces) == 0:
        raise ValueError(f"cannot unwrap a mesh without faces (faces shape {faces.shape})")
    if positions.ndim != 2 or positions.shape[1] != 3 or int(faces.max()) >= len(positions):
        raise ValueError("positions must be (N, 3) and every face index < N")
    result, method = None, "xatlas"
    if not isolate:
        result = _xatlas(positions, faces, resolution, padding, fill)
    else:
        diag = float(np.linalg.norm(positions.max(0) - positions.min(0))) or 1.0
        rng = np.random.default_rng(0)
        tries = [(0.0, fill), (1e-5, fill), (1e-4, fill)] + ([(1e-4, False)] if fill else [])
        for jitter, fill_try in tries:
            pos = positions if jitter == 0 else (positions + rng.normal(0, jitter * diag, positions.shape)).astype(np.float32)
            result = _xatlas_subprocess(pos, faces, resolution, padding, timeout, fill_try)
            if result is not None:
                method = ("xatlas" if jitter == 0 else "xatlas-jitter") + ("" if fill_try == fill else "-unfilled")
                break
    if result is None:
        log.warning("xatlas failed on every try; using the grid atlas fallback")
        result, method = grid_atlas(faces.astype(np.int64), resolution, padding), "grid"
    vmapping, indices, uvs = result
    if indices.shape[0] != faces.shape[0] or not np.array_equal(vmapping[indices], faces.astype(np.int64)):
        raise RuntimeError("xatlas changed the face order or count; cannot map UVs back to the input faces")
    uvs = np.clip(uvs.astype(np.float32), 0.0, 1.0)
    return UVAtlas(uvs[indices].reshape(-1, 2), uvs, indices, vmapping, int(resolution), method)


def uv_from_corners(corner_uvs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-corner UVs (F*3, 2) → unique UVs (M, 2) and uv_faces (F, 3) int64."""
    uniq, inv = np.unique(np.asarray(corner_uvs, np.float32), axis=0, return_inverse=True)
    return uniq, inv.reshape(-1, 3).astype(np.int64)


def _main(argv: list[str]) -> int:
    """Child-process entry: ``python -m backend.mesh.uv IN.npz OUT.npz``."""
    if len(argv) != 2:
        print("usage: python -m backend.mesh.uv IN.npz OUT.npz", file=sys.stderr)
        return 2
    crash = os.environ.get(CRASH_ENV)  # test hook: make this child die like xatlas does
    if crash == "always" or (crash and not Path(crash).exists() and Path(crash).touch() is None):
        os.kill(os.getpid(), signal.SIGSEGV)
    with np.load(argv[0]) as data:
        positions, faces = data["positions"], data["faces"]
        resolution, padding = int(data["resolution"]), int(data["padding"])
        fill = bool(data["fill"]) if "fill" in data.files else True
    vmapping, indices, uvs = _xatlas(positions, faces, resolution, padding, fill)
    tmp = Path(argv[1]).with_suffix(".part.npz")
    np.savez(tmp, vmapping=vmapping, indices=indices, uvs=uvs)
    tmp.replace(argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

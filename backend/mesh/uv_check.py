"""Is a mesh's own UV layout usable as a texture atlas? (inside 0..1, no overlap, not degenerate)

A texture job keeps the user's UVs when every texel of the atlas belongs to at most one place on
the surface. That fails when UVs leave the unit square (tiling), when charts are stacked or
mirrored onto each other (two halves of a symmetric model sharing texels), or when the layout is
degenerate (an empty UV map: every corner at (0, 0)). The overlap is *measured*: every UV
triangle is rasterised at texel centres into a coverage grid that counts how many triangles cover
each texel; the overlap fraction is (texels covered twice or more) / (texels covered at all).

Conventions: per-corner UVs (F*3, 2), corner k of face f at row 3f + k, origin bottom-left; grid
texel (row r, column c) of an R×R grid (row 0 at the top) is centred at
uv = ((c + 0.5)/R, 1 − (r + 0.5)/R), as in ``backend.mesh.uv``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: UVs may stray this far outside [0, 1] (float noise of an exporter) and still count as inside.
INSIDE_TOLERANCE = 1e-4
#: Layouts whose overlap fraction is above this are refused (packing noise stays far below it).
MAX_OVERLAP_FRACTION = 0.01
#: Layouts where more than this fraction of the surface area has zero-area UV triangles are refused.
MAX_DEGENERATE_AREA_FRACTION = 0.01
#: Largest number of (triangle, texel) candidate pairs tested at once (bounds memory: ~40 bytes each).
_CHUNK_SAMPLES = 2_000_000


@dataclass(frozen=True)
class UVCheck:
    """The verdict on one UV layout.

    valid: usable as is; reason: why not ('' when valid);
    inside: every UV within [0, 1] (± ``INSIDE_TOLERANCE``);
    overlap_fraction: texels covered by two or more triangles / texels covered at all (0..1);
    coverage: fraction of the grid's texels covered by some triangle;
    degenerate_area_fraction: share of the 3D surface area on zero-area UV triangles;
    resolution: side of the coverage grid (texels).
    """

    valid: bool
    reason: str
    inside: bool
    overlap_fraction: float
    coverage: float
    degenerate_area_fraction: float
    resolution: int

    def as_dict(self) -> dict:
        return {"valid": self.valid, "reason": self.reason, "inside": self.inside,
                "overlap_fraction": round(self.overlap_fraction, 6), "coverage": round(self.coverage, 6),
                "degenerate_area_fraction": round(self.degenerate_area_fraction, 6),
                "resolution": self.resolution}


def coverage_counts(corner_uvs: np.ndarray, resolution: int) -> np.ndarray:
    """(R, R) int32 grid: how many UV triangles cover each texel centre (row 0 at the top).

    A texel centre counts as inside a triangle when all three barycentric coordinates are
    strictly positive (so a centre on an edge shared by two triangles counts for neither, never
    twice). Vectorised: each triangle's texel bounding box is enumerated in bounded chunks.
    """
    R = int(resolution)
    uv = np.asarray(corner_uvs, np.float64).reshape(-1, 3, 2)
    counts = np.zeros(R * R, np.int64)
    if len(uv) == 0:
        return counts.reshape(R, R).astype(np.int32)
    # texel space: x = u·R − 0.5 (column), y = (1 − v)·R − 0.5 (row); centres at integers
    px = uv[..., 0] * R - 0.5
    py = (1.0 - uv[..., 1]) * R - 0.5
    x0 = np.clip(np.ceil(px.min(1)), 0, R - 1).astype(np.int64)
    x1 = np.clip(np.floor(px.max(1)), 0, R - 1).astype(np.int64)
    y0 = np.clip(np.ceil(py.min(1)), 0, R - 1).astype(np.int64)
    y1 = np.clip(np.floor(py.max(1)), 0, R - 1).astype(np.int64)
    w = np.maximum(x1 - x0 + 1, 0)
    h = np.maximum(y1 - y0 + 1, 0)
    # triangles wholly outside the grid or too small to hold a centre get an empty box
    empty = (px.max(1) < 0) | (px.min(1) > R - 1) | (py.max(1) < 0) | (py.min(1) > R - 1)
    n = np.where(empty, 0, w * h)
    # edge functions: area2 = (b − a) × (c − a); a centre p is inside when every edge function of
    # p has the sign of area2 (strictly); zero-area triangles cover nothing
    ax, ay, bx, by, cx, cy = px[:, 0], py[:, 0], px[:, 1], py[:, 1], px[:, 2], py[:, 2]
    area2 = (bx - ax) * (cy - ay) - (by - ay) * (cx - ax)
    n = np.where(np.abs(area2) > 1e-12, n, 0)
    order = np.flatnonzero(n)
    start = 0
    while start < len(order):
        # take triangles until the chunk holds about _CHUNK_SAMPLES candidate texels
        csum = np.cumsum(n[order[start:]])
        stop = start + max(1, int(np.searchsorted(csum, _CHUNK_SAMPLES, side="right")))
        tris = order[start:stop]
        start = stop
        nt = n[tris]
        tri = np.repeat(tris, nt)
        first = np.repeat(np.cumsum(nt) - nt, nt)
        k = np.arange(int(nt.sum()), dtype=np.int64) - first
        x = x0[tri] + k % w[tri]
        y = y0[tri] + k // w[tri]
        s = np.sign(area2[tri])
        e0 = ((bx[tri] - ax[tri]) * (y - ay[tri]) - (by[tri] - ay[tri]) * (x - ax[tri])) * s
        e1 = ((cx[tri] - bx[tri]) * (y - by[tri]) - (cy[tri] - by[tri]) * (x - bx[tri])) * s
        e2 = ((ax[tri] - cx[tri]) * (y - cy[tri]) - (ay[tri] - cy[tri]) * (x - cx[tri])) * s
        inside = (e0 > 1e-9) & (e1 > 1e-9) & (e2 > 1e-9)
        counts += np.bincount((y * R + x)[inside], minlength=R * R)
    return counts.reshape(R, R).astype(np.int32)


def check_uvs(corner_uvs: np.ndarray | None, positions: np.ndarray, faces: np.ndarray,
              resolution: int = 512) -> UVCheck:
    """Decide whether ``corner_uvs`` can carry a texture for the mesh (positions (N, 3), faces (F, 3)).

    Refused (``valid=False``) when: there are no UVs; any UV lies outside [0, 1]; more than
    ``MAX_DEGENERATE_AREA_FRACTION`` of the surface area sits on zero-area UV triangles; or the
    measured overlap fraction exceeds ``MAX_OVERLAP_FRACTION`` (stacked or mirrored charts).
    """
    R = int(resolution)
    if corner_uvs is None:
        return UVCheck(False, "the mesh has no UVs", False, 0.0, 0.0, 1.0, R)
    uv = np.asarray(corner_uvs, np.float64)
    faces = np.asarray(faces, np.int64)
    if uv.shape != (len(faces) * 3, 2):
        raise ValueError(f"corner_uvs must be (F*3, 2) = ({len(faces) * 3}, 2), got {uv.shape}")
    inside = bool(uv.size == 0 or (uv.min() >= -INSIDE_TOLERANCE and uv.max() <= 1.0 + INSIDE_TOLERANCE))
    tri = np.asarray(positions, np.float64)[faces]
    area3 = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    t = uv.reshape(-1, 3, 2)
    area_uv = 0.5 * np.abs((t[:, 1, 0] - t[:, 0, 0]) * (t[:, 2, 1] - t[:, 0, 1])
                           - (t[:, 1, 1] - t[:, 0, 1]) * (t[:, 2, 0] - t[:, 0, 0]))
    total = float(area3.sum()) or 1.0
    degenerate = float(area3[area_uv < 1e-12].sum()) / total
    if not inside:
        return UVCheck(False, f"UVs lie outside 0..1 (range {uv.min():.3g}..{uv.max():.3g})", False,
                       0.0, 0.0, degenerate, R)
    counts = coverage_counts(uv, R)
    covered = int((counts >= 1).sum())
    overlap = float((counts >= 2).sum()) / covered if covered else 0.0
    coverage = covered / float(R * R)
    if degenerate > MAX_DEGENERATE_AREA_FRACTION:
        return UVCheck(False, f"{degenerate:.1%} of the surface has zero-area UVs", True, overlap, coverage,
                       degenerate, R)
    if covered == 0:
        return UVCheck(False, "the UV triangles cover no texel", True, overlap, coverage, degenerate, R)
    if overlap > MAX_OVERLAP_FRACTION:
        return UVCheck(False, f"UV triangles overlap on {overlap:.1%} of the covered texels (stacked or "
                       "mirrored charts)", True, overlap, coverage, degenerate, R)
    return UVCheck(True, "", True, overlap, coverage, degenerate, R)


def chart_mask(corner_uvs: np.ndarray, H: int, W: int) -> np.ndarray:
    """(H, W) bool: texels whose centre lies inside some UV triangle (corner_uvs (F, 3, 2)), edges and
    corners included (``coverage_counts`` counts strictly inside, so a centre on a shared edge counts for
    neither triangle there); the chart mask of the packer's ``atlas_use`` and of the quality judge."""
    uv = np.asarray(corner_uvs, dtype=np.float64).reshape(-1, 3, 2)
    X = uv[..., 0] * W - 0.5           # texel-centre coordinates: column c at x = c
    Y = (1.0 - uv[..., 1]) * H - 0.5   # row r at y = r
    c0 = np.clip(np.ceil(X.min(1)), 0, W).astype(np.int64)
    c1 = np.clip(np.floor(X.max(1)), -1, W - 1).astype(np.int64)
    r0 = np.clip(np.ceil(Y.min(1)), 0, H).astype(np.int64)
    r1 = np.clip(np.floor(Y.max(1)), -1, H - 1).astype(np.int64)
    nc, nr = np.maximum(c1 - c0 + 1, 0), np.maximum(r1 - r0 + 1, 0)
    count = nc * nr
    mask = np.zeros((H, W), dtype=bool)
    total = int(count.sum())
    if not total:
        return mask
    f = np.repeat(np.arange(len(uv)), count)
    k = np.arange(total) - np.repeat(np.cumsum(count) - count, count)
    cc = c0[f] + k % nc[f]
    rr = r0[f] + k // nc[f]
    ax, ay, bx, by, cx, cy = X[f, 0], Y[f, 0], X[f, 1], Y[f, 1], X[f, 2], Y[f, 2]
    d = (by - cy) * (ax - cx) + (cx - bx) * (ay - cy)
    ok = np.abs(d) > 1e-12
    d = np.where(ok, d, 1.0)
    l1 = ((by - cy) * (cc - cx) + (cx - bx) * (rr - cy)) / d
    l2 = ((cy - ay) * (cc - cx) + (ax - cx) * (rr - cy)) / d
    eps = -1e-9
    inside = ok & (l1 >= eps) & (l2 >= eps) & (1 - l1 - l2 >= eps)
    mask[rr[inside], cc[inside]] = True
    return mask

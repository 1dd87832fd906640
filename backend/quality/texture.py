"""Texture measures of the asset-quality judge: surface samples, chart mask, speckle, seam jumps.

Conventions (``protocol.mesh.MeshPayload``): per-corner UVs (F*3, 2) in [0, 1], origin at the
bottom-left; the texture (H, W, C) has row 0 at the top, so texel (row r, column c) is centred at
uv = ((c + 0.5)/W, 1 − (r + 0.5)/H). Colours here are sRGB floats in [0, 1]; jumps and deviations
are reported in 8-bit units (/255).

* ``surface_samples`` — area-weighted random points on the faces (what a viewer of the surface
  sees, independent of how much atlas area each chart got and never touching the padding).
* ``chart_mask`` — texels whose centre lies inside some face's UV triangle (the charts, padding
  excluded; defined in ``backend.mesh.uv_check``, shared with the packer).
* ``texel_density`` — texels per metre of surface (√(UV area in texels / 3D area) per face): the
  area-weighted median, the spread (90th over 10th percentile; 1 = every part of the surface gets the
  same detail) and the mean anisotropy (larger over smaller singular value of the 3D → texel map;
  1 = square texels).
* ``min_chart_gap`` — fewest empty texels between two UV charts (the padding the packing kept).
* ``speckle`` — mean absolute deviation of chart texels from their 3×3 median, over texels whose
  whole 3×3 neighbourhood lies in the charts (so padding never enters a median).
* ``seam_jumps`` — colour jump across UV seams versus across interior edges: for every mesh edge
  shared by two faces (after welding positions), colours are sampled (bilinear) at 1/5 … 4/5 along
  the edge, a quarter texel inside each of the two faces (``inset_texels``), and the mean
  |difference| over RGB is taken. An edge is a seam when its two faces give it different UVs
  (different charts). Both kinds of edge compare sample pairs half a texel apart, the scale at which
  a magnified texture (a 256² atlas on a 1 m object fills a few screen pixels per texel) shows a
  seam as a line: inside a chart such samples share texels, across a seam they come from two
  unrelated places of the atlas, so a bake that is continuous across seams scores about 1 and one
  whose charts disagree scores the ratio of the disagreement to the ordinary texel-to-texel change.
"""

from __future__ import annotations

import io

import numpy as np

from backend.mesh.uv_check import chart_mask  # the packer's and the judge's chart mask

#: Jumps below this (8-bit units) are quantisation; the seam ratio floors both jumps here.
JUMP_FLOOR = 1.0


def load_texture(mesh) -> np.ndarray | None:
    """(H, W, 3) float32 sRGB in [0, 1] of a MeshPayload's texture (``texture_rgba`` or PNG), or None."""
    tex = getattr(mesh, "texture_rgba", None)
    if tex is None and getattr(mesh, "texture_png", None) is not None:
        from PIL import Image

        tex = np.asarray(Image.open(io.BytesIO(mesh.texture_png)).convert("RGBA"))
    if tex is None:
        return None
    tex = np.asarray(tex)
    out = tex[..., :3].astype(np.float32)
    return out / 255.0 if tex.dtype == np.uint8 else out


def sample_bilinear(tex: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """(M, C) bilinear samples of ``tex`` (H, W, C) at uv (M, 2) (bottom-left origin, clamped)."""
    H, W = tex.shape[:2]
    x = np.clip(uv[:, 0] * W - 0.5, 0, W - 1)
    y = np.clip((1.0 - uv[:, 1]) * H - 0.5, 0, H - 1)
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    x1, y1 = np.minimum(x0 + 1, W - 1), np.minimum(y0 + 1, H - 1)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    top = tex[y0, x0] * (1 - fx) + tex[y0, x1] * fx
    bot = tex[y1, x0] * (1 - fx) + tex[y1, x1] * fx
    return top * (1 - fy) + bot * fy


def face_areas(positions: np.ndarray, faces: np.ndarray) -> np.ndarray:
    tri = np.asarray(positions, dtype=np.float64)[np.asarray(faces, dtype=np.int64)]
    return 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)


def surface_samples(positions: np.ndarray, faces: np.ndarray, n: int = 60_000, seed: int = 0
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Area-weighted uniform points on the surface: (face index (M,), barycentrics (M, 3)).

    Deterministic for a given ``seed``; faces are drawn in proportion to their area.
    """
    area = face_areas(positions, faces)
    total = area.sum()
    if total <= 0:
        raise ValueError("the mesh has no surface area")
    rng = np.random.default_rng(seed)
    fid = rng.choice(len(area), size=n, p=area / total)
    r1, r2 = rng.random(n), rng.random(n)
    s = np.sqrt(r1)
    bary = np.stack([1 - s, s * (1 - r2), s * r2], axis=1)
    return fid, bary


def corner_uvs_of(mesh) -> np.ndarray | None:
    uvs = getattr(mesh, "uvs", None)
    return None if uvs is None else np.asarray(uvs, dtype=np.float64).reshape(-1, 3, 2)


def sample_surface_colour(mesh, fid: np.ndarray, bary: np.ndarray) -> np.ndarray | None:
    """(M, 3) sRGB in [0, 1] of the surface at samples: the texture through the UVs, else vertex colours."""
    tex = load_texture(mesh)
    uv3 = corner_uvs_of(mesh)
    if tex is not None and uv3 is not None:
        uv = np.einsum("mk,mkj->mj", bary, uv3[fid])
        return sample_bilinear(tex, uv)
    colors = getattr(mesh, "colors", None)
    if colors is not None:
        vc = np.asarray(colors, dtype=np.float64)[:, :3] / 255.0
        f = np.asarray(mesh.faces, dtype=np.int64)[fid]
        return np.einsum("mk,mkj->mj", bary, vc[f])
    return None


def texel_density(positions: np.ndarray, faces: np.ndarray, corner_uvs: np.ndarray, H: int, W: int) -> dict:
    """Texel density of a UV layout on an H×W texture (module docstring).

    positions (N, 3) metres, faces (F, 3), corner_uvs (F*3, 2) or (F, 3, 2). Faces with no area in
    3D or in UV are skipped. Returns {"median": texels/m, "spread": p90/p10, "anisotropy": mean σ1/σ2,
    area-weighted}; NaNs when no face counts.
    """
    P = np.asarray(positions, dtype=np.float64)[np.asarray(faces, dtype=np.int64)]
    U = np.asarray(corner_uvs, dtype=np.float64).reshape(-1, 3, 2) * np.array([W, H], dtype=np.float64)
    e1, e2 = P[:, 1] - P[:, 0], P[:, 2] - P[:, 0]
    len1 = np.linalg.norm(e1, axis=1)
    area3 = 0.5 * np.linalg.norm(np.cross(e1, e2), axis=1)
    # the triangle in its own plane: first edge along x
    x = e1 / np.maximum(len1, 1e-30)[:, None]
    e2x = (e2 * x).sum(1)
    e2y = np.linalg.norm(e2 - e2x[:, None] * x, axis=1)
    ok = (area3 > 1e-14) & (len1 > 1e-12) & (e2y > 1e-12)
    du1, du2 = U[ok, 1] - U[ok, 0], U[ok, 2] - U[ok, 0]
    # J maps plane coordinates to texels: J @ (len1, 0) = du1, J @ (e2x, e2y) = du2
    c0 = du1 / len1[ok, None]
    c1 = (du2 - e2x[ok, None] * c0) / e2y[ok, None]
    J = np.stack([c0, c1], axis=2)  # (K, 2, 2)
    sv = np.linalg.svd(J, compute_uv=False)
    keep = sv[:, 1] > 1e-12
    if not keep.any():
        return {"median": float("nan"), "spread": float("nan"), "anisotropy": float("nan")}
    w = area3[ok][keep]
    dens = np.sqrt(sv[keep, 0] * sv[keep, 1])
    order = np.argsort(dens)
    cw = np.cumsum(w[order]) / w.sum()

    def q(p: float) -> float:
        return float(dens[order][min(int(np.searchsorted(cw, p)), len(order) - 1)])

    return {"median": q(0.5), "spread": q(0.9) / max(q(0.1), 1e-12),
            "anisotropy": float((sv[keep, 0] / sv[keep, 1] * w).sum() / w.sum())}


def chart_labels(corner_uvs: np.ndarray) -> np.ndarray:
    """(F,) chart id of every face: faces sharing a UV point (corner_uvs (F*3, 2), welded at 1e-6) are
    in one chart (meshes loaded from GLB repeat vertices, so UV indices alone split charts)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    _, uv_faces = np.unique(np.round(corner_uvs.reshape(-1, 2) * 1e6).astype(np.int64), axis=0, return_inverse=True)
    uv_faces = uv_faces.reshape(-1, 3)
    F, M = len(uv_faces), int(uv_faces.max()) + 1
    rows = np.repeat(np.arange(F), 3)
    g = coo_matrix((np.ones(3 * F), (rows, uv_faces.reshape(-1) + F)), shape=(F + M, F + M))
    return connected_components(g, directed=False)[1][:F]


def min_chart_gap(corner_uvs: np.ndarray, res: int, ss: int = 4, most: int = 8) -> int:
    """Fewest empty texels between two charts of a res² atlas (``most`` when none is closer).

    A texel is a chart's when the chart touches it (``chart_mask`` at ``ss``× the resolution, pooled);
    distances are Chebyshev, so 2·p means each chart kept its padding of p texels; 0 also when two
    charts share a texel.
    """
    from scipy import ndimage

    uv3 = corner_uvs.reshape(-1, 3, 2)
    lab = chart_labels(corner_uvs)
    owner = np.full((res, res), -1, np.int64)
    for c in np.unique(lab):
        touched = chart_mask(uv3[lab == c], res * ss, res * ss).reshape(res, ss, res, ss).any((1, 3))
        if (owner[touched] >= 0).any():
            return 0
        owner[touched] = c
    fg = owner >= 0
    for r in range(1, most + 1):
        hi = ndimage.maximum_filter(owner, size=2 * r + 1, mode="constant", cval=-1)
        lo = ndimage.minimum_filter(np.where(fg, owner, 1 << 40), size=2 * r + 1, mode="constant", cval=1 << 40)
        if ((hi[fg] != owner[fg]) | (lo[fg] != owner[fg])).any():
            return r - 1
    return most


def speckle(tex: np.ndarray, mask: np.ndarray) -> tuple[float, int]:
    """(mean |texel − 3×3 median| over RGB in /255, number of texels measured) inside the charts.

    Only texels whose full 3×3 neighbourhood is in ``mask`` count; NaN when there is none.
    """
    from scipy import ndimage

    interior = ndimage.binary_erosion(mask, structure=np.ones((3, 3), dtype=bool), border_value=0)
    n = int(interior.sum())
    if n == 0:
        return float("nan"), 0
    t = np.asarray(tex, dtype=np.float32)
    med = np.stack([ndimage.median_filter(t[..., c], size=3, mode="nearest") for c in range(3)], axis=-1)
    dev = np.abs(t - med).mean(axis=-1)
    return float(dev[interior].mean() * 255.0), n


def _edge_pairs(positions: np.ndarray, faces: np.ndarray, corner_uvs: np.ndarray):
    """Manifold edges after welding: (face_a, k_a, face_b, k_b, flipped) arrays.

    Edge k of a face runs from corner k to corner (k + 1) % 3; ``flipped`` is True when face b
    traverses the edge in the opposite direction (the usual case for consistent winding).
    """
    from backend.quality.geometry import merge_vertices

    _, wf = merge_vertices(positions, faces)
    F = len(wf)
    a = wf
    b = np.roll(wf, -1, axis=1)
    lo, hi = np.minimum(a, b).reshape(-1), np.maximum(a, b).reshape(-1)
    key = lo * (int(wf.max()) + 1) + hi
    order = np.argsort(key, kind="stable")
    ks = key[order]
    uniq, start, counts = np.unique(ks, return_index=True, return_counts=True)
    two = counts == 2
    ea, eb = order[start[two]], order[start[two] + 1]
    fa, ka, fb, kb = ea // 3, ea % 3, eb // 3, eb % 3
    flipped = a[fa, ka] != a[fb, kb]
    del F, uniq
    return fa, ka, fb, kb, flipped


def seam_jumps(positions: np.ndarray, faces: np.ndarray, corner_uvs: np.ndarray, tex: np.ndarray,
               inset_texels: float = 0.25) -> dict:
    """Colour jumps across UV seams and across interior edges (module docstring).

    Returns {"seam": mean jump /255 or NaN, "interior": mean jump /255 or NaN, "ratio":
    max(seam, JUMP_FLOOR) / max(interior, JUMP_FLOOR) or NaN, "seam_edges": n, "interior_edges": n}.
    """
    uv3 = np.asarray(corner_uvs, dtype=np.float64).reshape(-1, 3, 2)
    H, W = tex.shape[:2]
    fa, ka, fb, kb, flipped = _edge_pairs(positions, faces, uv3)
    if len(fa) == 0:
        return {"seam": float("nan"), "interior": float("nan"), "ratio": float("nan"), "seam_edges": 0,
                "interior_edges": 0}
    # edge endpoints in each face's UV, oriented the same way along the 3D edge
    pa0, pa1 = uv3[fa, ka], uv3[fa, (ka + 1) % 3]
    pb0, pb1 = uv3[fb, kb], uv3[fb, (kb + 1) % 3]
    pb0, pb1 = np.where(flipped[:, None], pb1, pb0), np.where(flipped[:, None], pb0, pb1)
    tol = 0.25 / max(H, W)
    seam = (np.abs(pa0 - pb0).max(1) > tol) | (np.abs(pa1 - pb1).max(1) > tol)
    ca, cb = uv3[fa, (ka + 2) % 3], uv3[fb, (kb + 2) % 3]  # the third corners

    def inset(p0, p1, c):
        px = np.array([W, H], dtype=np.float64)
        e = (p1 - p0) * px
        h = np.abs(e[:, 0] * ((c - p0) * px)[:, 1] - e[:, 1] * ((c - p0) * px)[:, 0]) / np.maximum(
            np.linalg.norm(e, axis=1), 1e-12)  # distance of the third corner from the edge, texels
        return np.clip(inset_texels / np.maximum(h, 1e-12), 0.0, 0.45)

    ea_, eb_ = inset(pa0, pa1, ca), inset(pb0, pb1, cb)
    jumps = np.zeros(len(fa))
    ts = (0.2, 0.4, 0.6, 0.8)
    for t in ts:
        qa = (1 - ea_[:, None]) * ((1 - t) * pa0 + t * pa1) + ea_[:, None] * ca
        qb = (1 - eb_[:, None]) * ((1 - t) * pb0 + t * pb1) + eb_[:, None] * cb
        jumps += np.abs(sample_bilinear(tex, qa) - sample_bilinear(tex, qb)).mean(axis=1)
    jumps = jumps / len(ts) * 255.0
    s = float(jumps[seam].mean()) if seam.any() else float("nan")
    i = float(jumps[~seam].mean()) if (~seam).any() else float("nan")
    ratio = float("nan") if np.isnan(s) or np.isnan(i) else max(s, JUMP_FLOOR) / max(i, JUMP_FLOOR)
    return {"seam": s, "interior": i, "ratio": ratio, "seam_edges": int(seam.sum()),
            "interior_edges": int((~seam).sum())}

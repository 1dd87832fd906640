"""Judging a generated mesh against the prior's closed world: shape by volumetric IoU, colour by hue.

* ``mesh_occupancy_grid(positions, faces, res, extent)`` — inside/outside on a regular grid by the
  parity of crossings of vertical rays (robust to small holes in SDS meshes).
* ``shape_ious(positions, faces)`` — for each canonical solid, the volumetric IoU with the mesh
  after scale normalisation (both centred on their vertical axis and scaled so the larger of the
  radial and vertical half-extents is 1) and the best rotation about the vertical (+Z) axis.
* ``mesh_mean_colour(mesh)`` / ``judge_mesh(mesh)`` — area-weighted mean surface colour (texture
  sampled at face UV centroids, or vertex colours) named by ``evaluate.name_colour``.

Geometry is in the Blender world frame (metres, +Z up), ``protocol.mesh.MeshPayload`` conventions.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from backend.priors import SHAPES
from backend.priors.solids import solid_occupancy


def mesh_occupancy_grid(positions: np.ndarray, faces: np.ndarray, res: int = 48, extent: float = 1.2) -> np.ndarray:
    """(res, res, res) bool occupancy (index order x, y, z) of cell centres in [-extent, extent]^3."""
    v = np.asarray(positions, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    if v.ndim != 2 or v.shape[1] != 3 or f.ndim != 2 or f.shape[1] != 3:
        raise ValueError(f"need positions (N,3) and faces (F,3), got {v.shape} and {f.shape}")
    centres = (np.arange(res) + 0.5) / res * 2 * extent - extent
    occ = np.zeros((res, res, res), dtype=bool)
    if len(f) == 0:
        return occ
    tri = v[f]  # (F, 3, 3)
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
    # 2D barycentric set-up in the XY plane
    d = (b[:, 1] - c[:, 1]) * (a[:, 0] - c[:, 0]) + (c[:, 0] - b[:, 0]) * (a[:, 1] - c[:, 1])
    ok = np.abs(d) > 1e-12
    a, b, c, d = a[ok], b[ok], c[ok], d[ok]
    lo = np.minimum(np.minimum(a, b), c)
    hi = np.maximum(np.maximum(a, b), c)
    jitter = 1e-5 * extent  # avoid rays through shared edges/vertices exactly
    for i, x in enumerate(centres):
        x = x + jitter
        sel_x = (lo[:, 0] <= x) & (hi[:, 0] >= x)
        if not sel_x.any():
            continue
        ax, bx, cx, dx = a[sel_x], b[sel_x], c[sel_x], d[sel_x]
        lox, hix = lo[sel_x], hi[sel_x]
        for j, y in enumerate(centres):
            y = y + 0.7 * jitter
            sel = (lox[:, 1] <= y) & (hix[:, 1] >= y)
            if not sel.any():
                continue
            A, B, C, D = ax[sel], bx[sel], cx[sel], dx[sel]
            l1 = ((B[:, 1] - C[:, 1]) * (x - C[:, 0]) + (C[:, 0] - B[:, 0]) * (y - C[:, 1])) / D
            l2 = ((C[:, 1] - A[:, 1]) * (x - C[:, 0]) + (A[:, 0] - C[:, 0]) * (y - C[:, 1])) / D
            l3 = 1 - l1 - l2
            inside = (l1 >= 0) & (l2 >= 0) & (l3 >= 0)
            if not inside.any():
                continue
            z = np.sort(l1[inside] * A[inside, 2] + l2[inside] * B[inside, 2] + l3[inside] * C[inside, 2])
            crossings_above = len(z) - np.searchsorted(z, centres, side="right")
            occ[i, j] = (crossings_above % 2) == 1
    return occ


def _normaliser(occ: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, float]:
    """(centre (3,), scale) of an occupancy grid, invariant to rotations about +Z.

    Centre: the occupied cells' XY centroid and the middle of their 1-99 % Z range. Scale: the larger
    of the 99th-percentile radial distance from the vertical axis and the Z half-range.
    """
    idx = np.argwhere(occ)
    if len(idx) == 0:
        return np.zeros(3), 1.0
    pts = centres[idx]
    cxy = pts[:, :2].mean(axis=0)
    zlo, zhi = np.percentile(pts[:, 2], [1, 99])
    r = np.linalg.norm(pts[:, :2] - cxy, axis=1)
    scale = max(float(np.percentile(r, 99)), float(zhi - zlo) / 2, 1e-3)
    return np.array([cxy[0], cxy[1], (zlo + zhi) / 2]), scale


def shape_ious(positions: np.ndarray, faces: np.ndarray, res: int = 40, extent: float = 1.2,
               angles_deg: tuple[float, ...] = tuple(range(0, 90, 5))) -> dict[str, float]:
    """Best-rotation-about-Z, scale-normalised volumetric IoU of the mesh with every canonical solid."""
    centres = (np.arange(res) + 0.5) / res * 2 * extent - extent
    v = np.asarray(positions, dtype=np.float64)
    if len(v):  # any placement/size: fit the bounding box into [-1, 1]^3 first
        lo, hi = v.min(axis=0), v.max(axis=0)
        v = (v - (lo + hi) / 2) / max(float((hi - lo).max()) / 2, 1e-9)
    mesh_occ = mesh_occupancy_grid(v, faces, res, extent)
    m_c, m_s = _normaliser(mesh_occ, centres)
    # query points in the normalised frame, [-1.1, 1.1]^3
    q1 = (np.arange(res) + 0.5) / res * 2.2 - 1.1
    Q = np.stack(np.meshgrid(q1, q1, q1, indexing="ij"), axis=-1).reshape(-1, 3)
    # mesh occupancy at Q (nearest cell of the world grid)
    W = Q * m_s + m_c
    cell = np.clip(np.floor((W + extent) / (2 * extent) * res).astype(int), 0, res - 1)
    inside_world = np.all(np.abs(W) <= extent, axis=1)
    m = mesh_occ[cell[:, 0], cell[:, 1], cell[:, 2]] & inside_world
    out = {}
    for shape in SHAPES:
        pts = torch.as_tensor(np.stack(np.meshgrid(centres, centres, centres, indexing="ij"), -1).reshape(-1, 3),
                              dtype=torch.float32)
        s_occ = solid_occupancy(shape, pts).numpy().reshape(res, res, res)
        s_c, s_s = _normaliser(s_occ, centres)
        best = 0.0
        for ang in angles_deg:
            t = math.radians(ang)
            R = np.array([[math.cos(t), -math.sin(t), 0], [math.sin(t), math.cos(t), 0], [0, 0, 1]])
            P = (Q @ R.T) * s_s + s_c
            s = solid_occupancy(shape, torch.as_tensor(P, dtype=torch.float32)).numpy()
            union = np.count_nonzero(m | s)
            iou = np.count_nonzero(m & s) / union if union else 0.0
            best = max(best, iou)
        out[shape] = best
    return out


def mesh_mean_colour(mesh) -> np.ndarray | None:
    """(3,) area-weighted mean sRGB in [0, 1] of a ``MeshPayload``'s surface, or None without colour."""
    v = np.asarray(mesh.positions, dtype=np.float64)
    f = np.asarray(mesh.faces, dtype=np.int64)
    if len(f) == 0:
        return None
    tri = v[f]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    tex = mesh.texture_rgba
    if tex is None and mesh.texture_png is not None:
        import io

        from PIL import Image

        tex = np.asarray(Image.open(io.BytesIO(mesh.texture_png)).convert("RGBA"))
    if tex is not None and mesh.uvs is not None:
        uv = np.asarray(mesh.uvs, dtype=np.float64).reshape(-1, 3, 2).mean(axis=1)
        H, W = tex.shape[:2]
        col = np.clip((uv[:, 0] * W).astype(int), 0, W - 1)
        row = np.clip(((1 - uv[:, 1]) * H).astype(int), 0, H - 1)
        rgb = tex[row, col, :3].astype(np.float64) / 255.0
    elif mesh.colors is not None:
        rgb = np.asarray(mesh.colors, dtype=np.float64)[:, :3][f].mean(axis=1) / 255.0
    else:
        return None
    w = area / max(area.sum(), 1e-12)
    return (rgb * w[:, None]).sum(axis=0)


def judge_mesh(mesh) -> dict:
    """{"ious": {shape: IoU}, "shape": best shape, "rgb": mean colour, "colour": colour name or None}."""
    from backend.priors.evaluate import name_colour

    ious = shape_ious(mesh.positions, mesh.faces)
    rgb = mesh_mean_colour(mesh)
    return {"ious": ious, "shape": max(ious, key=ious.get), "rgb": None if rgb is None else rgb.tolist(),
            "colour": None if rgb is None else name_colour(torch.as_tensor(rgb, dtype=torch.float32))}

"""Meshes for the texture-job tests: a cube with good, stacked or mirrored UVs, and a big sphere."""

from __future__ import annotations

import numpy as np

from protocol.mesh import MeshPayload


def cube(size: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """(positions (8, 3) float32, faces (12, 3) uint32) of an axis-aligned cube, CCW from outside."""
    import trimesh

    box = trimesh.creation.box(extents=(size, size, size))
    return np.asarray(box.vertices, np.float32), np.asarray(box.faces, np.uint32)


def _face_cells(faces: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Per-corner UVs: each of the cube's 6 sides (2 triangles) planar-projected into its own cell of a 3×2 grid."""
    uvs = np.empty((len(faces) * 3, 2), np.float32)
    tri = positions[faces.astype(np.int64)]
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    axis = np.abs(normal).argmax(1)
    side = axis * 2 + (normal[np.arange(len(faces)), axis] > 0)
    for f in range(len(faces)):
        keep = [a for a in range(3) if a != axis[f]]
        local = (tri[f][:, keep] - positions.min(0)[keep]) / np.ptp(positions, 0)[keep]  # 0..1
        cell = np.array([side[f] % 3, side[f] // 3], np.float32)
        uvs[3 * f:3 * f + 3] = (cell + 0.05 + 0.9 * local) / np.array([3.0, 2.0], np.float32)
    return uvs


def cube_with_uvs(kind: str = "cells") -> MeshPayload:
    """A cube whose UVs are 'cells' (valid: every side in its own cell), 'stacked' (every side on
    the whole square) or 'mirrored' (the −X half of the layout mirrored onto the +X half)."""
    pos, faces = cube()
    uvs = _face_cells(faces, pos)
    if kind == "stacked":
        tri = pos[faces.astype(np.int64)]
        normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        axis = np.abs(normal).argmax(1)
        for f in range(len(faces)):
            keep = [a for a in range(3) if a != axis[f]]
            uvs[3 * f:3 * f + 3] = (tri[f][:, keep] - pos.min(0)[keep]) / np.ptp(pos, 0)[keep]
    elif kind == "mirrored":
        u = uvs[:, 0]
        uvs[:, 0] = np.where(u > 0.5, 1.0 - u, u)  # right half folded onto the left half
    elif kind != "cells":
        raise ValueError(kind)
    return MeshPayload(positions=pos, faces=faces, uvs=np.clip(uvs, 0, 1))


def sphere(min_faces: int, uvs: bool = False) -> MeshPayload:
    """A UV sphere (lat-long grid) with at least ``min_faces`` triangles, float32 positions.

    ``uvs=True`` adds overlap-free lat-long per-corner UVs (u = column / columns, v = 1 − row /
    rows; the seam column's far corners get u = 1, so no triangle wraps across the square).
    """
    n = int(np.ceil(np.sqrt(min_faces / 4.0)))
    rows, cols = n, 2 * n
    theta = np.linspace(0, np.pi, rows + 1)
    phi = np.linspace(0, 2 * np.pi, cols, endpoint=False)
    t, p = np.meshgrid(theta, phi, indexing="ij")
    pos = np.stack([np.sin(t) * np.cos(p), np.sin(t) * np.sin(p), np.cos(t)], -1).reshape(-1, 3)
    idx = np.arange((rows + 1) * cols).reshape(rows + 1, cols)
    a, b = idx[:-1], np.roll(idx[:-1], -1, axis=1)
    c, d = idx[1:], np.roll(idx[1:], -1, axis=1)
    faces = np.concatenate([np.stack([a, c, b], -1).reshape(-1, 3), np.stack([b, c, d], -1).reshape(-1, 3)])
    corner_uvs = None
    if uvs:
        r, k = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        g = lambda rr, kk: np.stack([kk / cols, 1.0 - rr / rows], -1)  # noqa: E731
        ua, ub, uc, ud = g(r, k), g(r, k + 1), g(r + 1, k), g(r + 1, k + 1)
        corner_uvs = np.concatenate([np.stack([ua, uc, ub], -2).reshape(-1, 3, 2),
                                     np.stack([ub, uc, ud], -2).reshape(-1, 3, 2)]).reshape(-1, 2)
        corner_uvs = corner_uvs.astype(np.float32)
    return MeshPayload(positions=pos.astype(np.float32), faces=faces.astype(np.uint32), uvs=corner_uvs)

"""Edge topology of a triangle mesh, computed by the backend so Blender does not have to.

Blender stores a mesh's edges explicitly (``.edge_verts``) and, for every face corner, the edge
that leaves it (``.corner_edge``). Its importer-side ``mesh.update(calc_edges=True)`` hashes every
corner on Blender's main thread (about 40 ms for 200k triangles on one core); the backend computes
the same arrays once, off the artist's machine's UI thread, and sends them with the mesh
(``MeshPayload.edges`` / ``corner_edges``, see ``protocol/PROTOCOL.md``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from protocol.mesh import MeshPayload


def edge_topology(faces: np.ndarray, n_vertices: int) -> tuple[np.ndarray, np.ndarray]:
    """Unique undirected edges of triangles and the edge of each corner.

    Args:
        faces: (F, 3) integer vertex indices of triangles.
        n_vertices: N, the number of vertices (every index is < N).
    Returns:
        edges: (E, 2) uint32 vertex pairs (smaller index first), sorted, each edge once.
        corner_edges: (3F,) uint32; row 3f+k is the index into ``edges`` of the edge from
            corner k of face f to corner (k+1) % 3 (Blender's ``.corner_edge`` convention).
    """
    f = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    if f.size == 0:
        return np.zeros((0, 2), np.uint32), np.zeros(0, np.uint32)
    a = f.ravel()
    b = f[:, (1, 2, 0)].ravel()
    n = max(int(n_vertices), 1)
    key = np.minimum(a, b) * n + np.maximum(a, b)
    unique, inverse = np.unique(key, return_inverse=True)
    edges = np.stack([unique // n, unique % n], axis=1).astype(np.uint32)
    return edges, inverse.reshape(-1).astype(np.uint32)


def with_edges(mesh: MeshPayload) -> MeshPayload:
    """``mesh`` with ``edges``/``corner_edges`` filled in (unchanged when it already has them)."""
    if mesh.edges is not None and mesh.corner_edges is not None:
        return mesh
    edges, corner_edges = edge_topology(mesh.faces, len(mesh.positions))
    return dataclasses.replace(mesh, edges=edges, corner_edges=corner_edges)

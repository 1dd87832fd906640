"""UV unwrapping with xatlas (charts packed with padding into one atlas).

UVs follow the project's texture convention: per corner, origin at the bottom-left, in [0, 1];
texel (row r, column c) of an H×W texture (row 0 at the top) is centred at
uv = ((c + 0.5)/W, 1 − (r + 0.5)/H).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class UVAtlas:
    """xatlas output kept in two forms.

    corner_uvs: (F*3, 2) float32 per-corner UVs (MeshPayload layout: corner k of face f at 3f + k).
    uv: (M, 2) float32 unique UV vertices; uv_faces: (F, 3) int64 indices into ``uv`` (the
        per-corner index buffer the rasteriser's ``interpolate`` takes).
    vmapping: (M,) int64 original vertex of each UV vertex.
    resolution: the atlas size in texels the padding was computed for.
    """

    corner_uvs: np.ndarray
    uv: np.ndarray
    uv_faces: np.ndarray
    vmapping: np.ndarray
    resolution: int


def unwrap(positions: np.ndarray, faces: np.ndarray, resolution: int = 1024, padding: int = 2) -> UVAtlas:
    """Parametrise a triangle mesh with xatlas.

    Args:
        positions: (N, 3) float vertex positions (any frame).
        faces: (F, 3) int vertex indices.
        resolution: texture side in texels the charts are packed for.
        padding: empty texels kept around each chart (bleeding margin for mipmaps/bilinear).

    Returns:
        UVAtlas whose faces are in the input order (corner k of face f ↔ faces[f, k]).
    """
    import xatlas

    positions = np.ascontiguousarray(positions, dtype=np.float32)
    faces = np.ascontiguousarray(faces, dtype=np.uint32)
    if len(faces) == 0:
        raise ValueError("cannot unwrap a mesh without faces")
    atlas = xatlas.Atlas()
    atlas.add_mesh(positions, faces)
    chart_options = xatlas.ChartOptions()
    pack_options = xatlas.PackOptions()
    pack_options.padding = int(padding)
    pack_options.resolution = int(resolution)
    pack_options.bilinear = True
    pack_options.blockAlign = False
    atlas.generate(chart_options, pack_options)
    vmapping, indices, uvs = atlas[0]
    vmapping = vmapping.astype(np.int64)
    indices = indices.astype(np.int64).reshape(-1, 3)
    if indices.shape[0] != faces.shape[0] or not np.array_equal(vmapping[indices], faces.astype(np.int64)):
        raise RuntimeError("xatlas changed the face order or count; cannot map UVs back to the input faces")
    uvs = np.clip(uvs.astype(np.float32), 0.0, 1.0)
    return UVAtlas(uvs[indices].reshape(-1, 2), uvs, indices, vmapping, int(resolution))


def uv_from_corners(corner_uvs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-corner UVs (F*3, 2) → unique UVs (M, 2) and uv_faces (F, 3) int64."""
    uniq, inv = np.unique(np.asarray(corner_uvs, np.float32), axis=0, return_inverse=True)
    return uniq, inv.reshape(-1, 3).astype(np.int64)

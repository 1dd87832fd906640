"""Mesh payloads that cross the wire.

Coordinates are Blender's: metres, +Z up, right-handed, front facing -Y, centred at the origin.
(The protocol helper adds encode/decode/validation below the dataclass.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class MeshPayload:
    """A triangle mesh with optional per-corner UVs, normals, vertex colours and a texture.

    Attributes:
        positions: (N, 3) float32 vertex positions in metres, Blender frame.
        faces: (F, 3) uint32 vertex indices, counter-clockwise seen from outside.
        uvs: (F*3, 2) float32 per-corner UVs in [0, 1], origin bottom-left (Blender/OpenGL),
            corner k of face f at row 3*f + k; or None.
        normals: (N, 3) float32 unit per-vertex normals; or None.
        colors: (N, 4) uint8 sRGB RGBA per-vertex colours; or None.
        texture_png: PNG-encoded base-colour texture; or None.
        texture_rgba: (H, W, 4) uint8 RGBA base-colour texture, row 0 at the top; or None.
    """

    positions: np.ndarray
    faces: np.ndarray
    uvs: np.ndarray | None = None
    normals: np.ndarray | None = None
    colors: np.ndarray | None = None
    texture_png: bytes | None = None
    texture_rgba: np.ndarray | None = None

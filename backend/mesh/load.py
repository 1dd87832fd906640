"""Read a mesh file (GLB/glTF, OBJ, PLY, STL) into a ``MeshPayload`` in Blender's frame.

GLB/glTF and OBJ are +Y up (as Blender's own exporters write them by default, and as
``backend.mesh.export`` writes them); they are converted to Blender's +Z up with
(x, y, z) → (x, −z, y), which is exact in float32 (the inverse of the export's (x, z, −y)).
Vertices are never merged or reordered (``process=False``); a scene's meshes are joined with their
node transforms applied. Per-vertex UVs (trimesh splits vertices at UV seams and gives the origin
bottom-left) become per-corner UVs (row 3f + k = corner k of face f), and a base-colour texture
image becomes ``texture_rgba`` (the texture job starts from it when it keeps the UVs). The result is checked with the wire format's
validation (``encode_mesh``/``decode_mesh``: limits, finite values, indices in range).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from protocol.mesh import MeshPayload, decode_mesh, encode_mesh, validate_upload_mesh

#: File suffixes read as +Y up (converted to Blender's +Z up); others (PLY, STL) are taken as +Z up.
Y_UP_SUFFIXES = (".glb", ".gltf", ".obj")
SUFFIXES = (".glb", ".gltf", ".obj", ".ply", ".stl")


class MeshLoadError(ValueError):
    """The file cannot be read as a triangle mesh."""


def _texture(visual) -> np.ndarray | None:
    """The material's base-colour image as (H, W, 4) uint8 (row 0 at the top), else None."""
    material = getattr(visual, "material", None)
    image = getattr(material, "baseColorTexture", None) or getattr(material, "image", None)
    if image is None:
        return None
    return np.ascontiguousarray(np.asarray(image.convert("RGBA")), np.uint8)


def _base_color(visual) -> list[float] | None:
    """The material's base colour (sRGB 0..1, RGBA) when the file gives one, else None."""
    material = getattr(visual, "material", None)
    for name in ("baseColorFactor", "main_color", "diffuse"):
        value = getattr(material, name, None)
        if value is not None:
            c = np.asarray(value, np.float64).reshape(-1)
            if c.size >= 3:
                c = c / 255.0 if c.max() > 1.0 else c
                return [float(x) for x in np.clip(c[:4], 0, 1)]
    return None


def load_mesh_file(path: str | Path) -> tuple[MeshPayload, list[float] | None]:
    """``(mesh, base_color)`` from ``path``; raises ``MeshLoadError`` with a clear message."""
    import trimesh

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise MeshLoadError(f"{path.name}: unsupported mesh format {suffix!r} (use {', '.join(SUFFIXES)})")
    if not path.is_file():
        raise MeshLoadError(f"{path}: no such file")
    try:
        loaded = trimesh.load(str(path), process=False)
    except Exception as exc:
        raise MeshLoadError(f"{path.name}: cannot read it as a mesh ({type(exc).__name__}: {exc})") from exc
    if isinstance(loaded, trimesh.Scene):
        geoms = []
        for node in loaded.graph.nodes_geometry:
            transform, name = loaded.graph[node]
            g = loaded.geometry[name]
            if isinstance(g, trimesh.Trimesh):
                g = g.copy()
                if not np.allclose(transform, np.eye(4)):
                    g.apply_transform(transform)
                geoms.append(g)
    else:
        geoms = [loaded] if isinstance(loaded, trimesh.Trimesh) else []
    geoms = [g for g in geoms if len(g.faces)]
    if not geoms:
        raise MeshLoadError(f"{path.name}: holds no triangle mesh")
    positions, faces, uvs, offset, base, texture = [], [], [], 0, None, None
    all_uv = all(getattr(g.visual, "uv", None) is not None and len(g.visual.uv) == len(g.vertices) for g in geoms)
    for g in geoms:
        v = np.asarray(g.vertices, np.float32)
        f = np.asarray(g.faces, np.int64)
        positions.append(v)
        faces.append(f + offset)
        if all_uv:
            uv = np.asarray(g.visual.uv, np.float32)
            uvs.append(uv[f.reshape(-1)])
        base = base or _base_color(g.visual)
        if len(geoms) == 1 and all_uv:
            texture = _texture(g.visual)
        offset += len(v)
    pos = np.concatenate(positions)
    if suffix in Y_UP_SUFFIXES:
        pos = np.stack([pos[:, 0], -pos[:, 2], pos[:, 1]], axis=1)
    mesh = MeshPayload(positions=np.ascontiguousarray(pos, np.float32),
                       faces=np.concatenate(faces).astype(np.uint32),
                       uvs=np.concatenate(uvs) if all_uv else None, texture_rgba=texture)
    try:
        meta, buffers = encode_mesh(mesh)
        mesh = validate_upload_mesh(decode_mesh(meta, buffers))
    except Exception as exc:
        raise MeshLoadError(f"{path.name}: {getattr(exc, 'message', exc)}") from exc
    return mesh, (None if texture is not None else base)

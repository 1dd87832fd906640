"""Export a ``MeshPayload`` to GLB (always) and OBJ/MTL/PNG (when textured).

Frames
------
Input meshes are in Blender's frame (metres, +Z up, front -Y). Files are written in glTF's
+Y up frame: a Blender point (x, y, z) becomes (x, z, -y). That map is a proper rotation
(determinant +1) so counter-clockwise winding seen from outside is preserved. The OBJ uses the
same Y-up coordinates, which is what Blender's OBJ importer expects by default (forward -Z, up Y).

Texture coordinates
-------------------
``MeshPayload.uvs`` are per corner with the origin at the bottom-left (v = 1 - row/H). glTF's
origin is top-left, so TEXCOORD_0 stores (u, 1 - v); OBJ keeps (u, v). Vertices are split where
one position carries several UVs (seams), so every GLB vertex has exactly one UV.

Files are written atomically and durably with :mod:`backend.fsutil` (temporary file in the same
folder, fsync, rename, fsync the folder).
"""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np

from backend.fsutil import atomic_write_bytes
from protocol.mesh import MeshPayload

GLB_MAGIC = 0x46546C67  # b"glTF" little-endian
GLB_VERSION = 2
CHUNK_JSON = 0x4E4F534A  # b"JSON"
CHUNK_BIN = 0x004E4942  # b"BIN\0"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

#: PBR defaults for generated assets: a matte, non-metallic surface.
DEFAULT_ROUGHNESS = 0.8
DEFAULT_METALLIC = 0.0

# glTF enums
_FLOAT = 5126
_UINT = 5125
_ARRAY_BUFFER = 34962
_ELEMENT_ARRAY_BUFFER = 34963
_LINEAR = 9729
_LINEAR_MIPMAP_LINEAR = 9987
_REPEAT = 10497

#: Blender (Z up) → glTF (Y up): (x, y, z) → (x, z, -y).
BLENDER_TO_GLTF = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]], dtype=np.float64)


class ExportError(ValueError):
    """The mesh cannot be exported (bad shapes, indices out of range, non-finite values, bad PNG)."""


# ----------------------------------------------------------------------------------------------
# public API


def export_mesh(mesh: MeshPayload, out_dir: Path, name: str) -> dict[str, Path]:
    """Write ``<name>.glb`` (always) and ``<name>.obj/.mtl/.png`` (textured meshes) into ``out_dir``.

    Args:
        mesh: Blender-frame mesh. Textured when it has per-corner ``uvs`` and a texture
            (``texture_png`` or ``texture_rgba``); otherwise vertex colours (``colors``), if any,
            go into the GLB's COLOR_0 (converted from sRGB to linear as glTF requires).
        out_dir: existing or creatable folder.
        name: file stem: letters, digits, '-', '_' and '.' only (no path separators).

    Returns:
        {'glb': path} plus 'obj', 'mtl', 'png' when textured.

    Raises:
        ExportError: invalid mesh or name.
    """
    _check_name(name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    positions, faces = _check_geometry(mesh)
    png = _texture_png(mesh)
    uvs = None
    if mesh.uvs is not None:
        uvs = np.asarray(mesh.uvs, dtype=np.float32)
        if uvs.shape != (faces.shape[0] * 3, 2):
            raise ExportError(f"uvs must have shape (F*3, 2) = ({faces.shape[0] * 3}, 2), got {uvs.shape}")
        if not np.all(np.isfinite(uvs)):
            raise ExportError("uvs contain NaN or infinite values")
    textured = uvs is not None and png is not None
    if png is not None and uvs is None:
        raise ExportError("mesh has a texture but no uvs")

    normals = _vertex_normals(mesh, positions, faces)
    colors = None
    if not textured and mesh.colors is not None:
        colors = np.asarray(mesh.colors)
        if colors.shape != (positions.shape[0], 4) or colors.dtype != np.uint8:
            raise ExportError(f"colors must be (N, 4) uint8 with N={positions.shape[0]}, got "
                              f"{colors.shape} {colors.dtype}")

    files: dict[str, Path] = {}
    glb = build_glb(positions, faces, normals, uvs if textured else None, png if textured else None,
                    colors, name)
    files["glb"] = out_dir / f"{name}.glb"
    atomic_write_bytes(files["glb"], glb)
    if textured:
        files["png"] = out_dir / f"{name}.png"
        files["mtl"] = out_dir / f"{name}.mtl"
        files["obj"] = out_dir / f"{name}.obj"
        atomic_write_bytes(files["png"], png)
        atomic_write_bytes(files["mtl"], _mtl_text(name, files["png"].name).encode())
        atomic_write_bytes(files["obj"], _obj_text(positions, faces, normals, uvs, files["mtl"].name, name).encode())
    return files


def split_seams(faces: np.ndarray, uvs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split vertices so every (vertex, uv) pair becomes one output vertex.

    Args:
        faces: (F, 3) integer vertex indices.
        uvs: (F*3, 2) float32 per-corner UVs.

    Returns:
        source: (M,) int64 index of the original vertex of each output vertex,
        new_faces: (F, 3) uint32 indices into the M output vertices,
        vert_uvs: (M, 2) float32 UV of each output vertex.
    """
    corner_v = faces.reshape(-1).astype(np.int64)
    uv_bits = np.ascontiguousarray(uvs, dtype=np.float32).view(np.uint32).astype(np.int64)
    keys = np.stack([corner_v, uv_bits[:, 0], uv_bits[:, 1]], axis=1)
    uniq, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    return uniq[:, 0], inverse.reshape(-1, 3).astype(np.uint32), np.asarray(uvs, np.float32)[first]


def build_glb(
    positions: np.ndarray,
    faces: np.ndarray,
    normals: np.ndarray,
    uvs: np.ndarray | None,
    png: bytes | None,
    colors: np.ndarray | None,
    name: str = "mesh",
) -> bytes:
    """Bytes of a GLB holding one mesh, Blender-frame inputs converted to glTF's Y up.

    Args:
        positions: (N, 3) float Blender-frame positions.
        faces: (F, 3) int indices, CCW from outside.
        normals: (N, 3) float unit normals (Blender frame).
        uvs: (F*3, 2) per-corner UVs (origin bottom-left) or None; requires ``png``.
        png: PNG bytes of the base-colour texture or None.
        colors: (N, 4) uint8 sRGB vertex colours or None (ignored when textured).
        name: mesh / node / material name.
    """
    if uvs is not None:
        source, faces_out, vert_uv = split_seams(faces, uvs)
        pos = positions[source]
        nrm = normals[source]
        col = None
        tex = np.stack([vert_uv[:, 0], 1.0 - vert_uv[:, 1]], axis=1).astype(np.float32)
    else:
        pos, nrm, faces_out, tex = positions, normals, faces.astype(np.uint32), None
        col = colors
    pos_gl = (pos.astype(np.float64) @ BLENDER_TO_GLTF.T).astype(np.float32)
    nrm_gl = (nrm.astype(np.float64) @ BLENDER_TO_GLTF.T).astype(np.float32)

    blob = bytearray()
    buffer_views: list[dict] = []
    accessors: list[dict] = []

    def add_view(data: bytes, target: int | None) -> int:
        while len(blob) % 4:
            blob.append(0)
        view = {"buffer": 0, "byteOffset": len(blob), "byteLength": len(data)}
        if target is not None:
            view["target"] = target
        blob.extend(data)
        buffer_views.append(view)
        return len(buffer_views) - 1

    def add_accessor(arr: np.ndarray, component: int, kind: str, target: int, minmax: bool = False,
                     normalized: bool = False) -> int:
        view = add_view(np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes(), target)
        acc = {"bufferView": view, "componentType": component, "count": int(arr.shape[0]), "type": kind}
        if normalized:
            acc["normalized"] = True
        if minmax:
            acc["min"] = [float(x) for x in arr.min(axis=0)]
            acc["max"] = [float(x) for x in arr.max(axis=0)]
        accessors.append(acc)
        return len(accessors) - 1

    attributes = {
        "POSITION": add_accessor(pos_gl, _FLOAT, "VEC3", _ARRAY_BUFFER, minmax=True),
        "NORMAL": add_accessor(nrm_gl, _FLOAT, "VEC3", _ARRAY_BUFFER),
    }
    if tex is not None:
        attributes["TEXCOORD_0"] = add_accessor(tex, _FLOAT, "VEC2", _ARRAY_BUFFER)
    if col is not None:
        attributes["COLOR_0"] = add_accessor(srgb_to_linear(col), _FLOAT, "VEC4", _ARRAY_BUFFER)
    idx = np.ascontiguousarray(faces_out.reshape(-1, 1), dtype=np.uint32)
    indices = add_accessor(idx, _UINT, "SCALAR", _ELEMENT_ARRAY_BUFFER)
    accessors[indices]["type"] = "SCALAR"

    pbr: dict = {"metallicFactor": DEFAULT_METALLIC, "roughnessFactor": DEFAULT_ROUGHNESS,
                 "baseColorFactor": [1.0, 1.0, 1.0, 1.0]}
    gltf: dict = {
        "asset": {"version": "2.0", "generator": "Conjure"},
        "scene": 0,
        "scenes": [{"name": "Scene", "nodes": [0]}],
        "nodes": [{"name": name, "mesh": 0}],
        "meshes": [{"name": name, "primitives": [
            {"attributes": attributes, "indices": indices, "material": 0, "mode": 4}]}],
        "materials": [{"name": f"{name}_material", "pbrMetallicRoughness": pbr, "doubleSided": False}],
        "accessors": accessors,
        "bufferViews": buffer_views,
    }
    if png is not None:
        image_view = add_view(png, None)
        gltf["images"] = [{"name": f"{name}_basecolor", "mimeType": "image/png", "bufferView": image_view}]
        gltf["samplers"] = [{"magFilter": _LINEAR, "minFilter": _LINEAR_MIPMAP_LINEAR,
                             "wrapS": _REPEAT, "wrapT": _REPEAT}]
        gltf["textures"] = [{"sampler": 0, "source": 0}]
        pbr["baseColorTexture"] = {"index": 0, "texCoord": 0}
    while len(blob) % 4:
        blob.append(0)
    gltf["buffers"] = [{"byteLength": len(blob)}]
    return pack_glb(gltf, bytes(blob))


def pack_glb(gltf: dict, binary: bytes) -> bytes:
    """Assemble the GLB container: 12-byte header, JSON chunk (space-padded), BIN chunk (zero-padded)."""
    js = json.dumps(gltf, separators=(",", ":")).encode("utf-8")
    js += b" " * (-len(js) % 4)
    binary = binary + b"\0" * (-len(binary) % 4)
    total = 12 + 8 + len(js) + (8 + len(binary) if binary else 0)
    out = io.BytesIO()
    out.write(struct.pack("<III", GLB_MAGIC, GLB_VERSION, total))
    out.write(struct.pack("<II", len(js), CHUNK_JSON))
    out.write(js)
    if binary:
        out.write(struct.pack("<II", len(binary), CHUNK_BIN))
        out.write(binary)
    return out.getvalue()


def srgb_to_linear(colors: np.ndarray) -> np.ndarray:
    """(N, 4) uint8 sRGB RGBA → (N, 4) float32 linear RGB with alpha kept linear in [0, 1]."""
    c = colors.astype(np.float32) / 255.0
    rgb = c[:, :3]
    lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    return np.concatenate([lin, c[:, 3:4]], axis=1).astype(np.float32)


def encode_png(rgba: np.ndarray) -> bytes:
    """PNG bytes of an (H, W, 4) or (H, W, 3) uint8 image (row 0 at the top)."""
    from PIL import Image

    arr = np.asarray(rgba)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ExportError(f"texture_rgba must be (H, W, 4) uint8, got {arr.shape} {arr.dtype}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr), "RGBA" if arr.shape[2] == 4 else "RGB").save(
        buf, format="PNG", compress_level=6)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# helpers


def _check_name(name: str) -> None:
    ok = name and all(c.isalnum() or c in "-_." for c in name) and not name.startswith(".")
    if not ok:
        raise ExportError(f"bad export name {name!r}: use letters, digits, '-', '_', '.' (no path separators)")


def _check_geometry(mesh: MeshPayload) -> tuple[np.ndarray, np.ndarray]:
    positions = np.asarray(mesh.positions, dtype=np.float32)
    faces = np.asarray(mesh.faces)
    if positions.ndim != 2 or positions.shape[1] != 3 or positions.shape[0] == 0:
        raise ExportError(f"positions must be (N, 3) with N > 0, got {positions.shape}")
    if faces.ndim != 2 or faces.shape[1] != 3 or faces.shape[0] == 0:
        raise ExportError(f"faces must be (F, 3) with F > 0, got {faces.shape}")
    if not np.issubdtype(faces.dtype, np.integer):
        raise ExportError(f"faces must be integers, got {faces.dtype}")
    if faces.min() < 0 or faces.max() >= positions.shape[0]:
        raise ExportError(f"face indices out of range [0, {positions.shape[0]})")
    if not np.all(np.isfinite(positions)):
        raise ExportError("positions contain NaN or infinite values")
    return positions, faces.astype(np.int64)


def _texture_png(mesh: MeshPayload) -> bytes | None:
    if mesh.texture_png is not None:
        png = bytes(mesh.texture_png)
        if not png.startswith(PNG_SIGNATURE):
            raise ExportError("texture_png does not start with the PNG signature")
        return png
    if mesh.texture_rgba is not None:
        return encode_png(mesh.texture_rgba)
    return None


def compute_vertex_normals(positions: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(N, 3) float32 area-weighted unit vertex normals; isolated vertices get +Z."""
    p = positions.astype(np.float64)
    fn = np.cross(p[faces[:, 1]] - p[faces[:, 0]], p[faces[:, 2]] - p[faces[:, 0]])
    vn = np.zeros_like(p)
    for k in range(3):
        np.add.at(vn, faces[:, k], fn)
    norm = np.linalg.norm(vn, axis=1, keepdims=True)
    out = np.where(norm > 1e-20, vn / np.maximum(norm, 1e-20), np.array([0.0, 0.0, 1.0]))
    return out.astype(np.float32)


def _vertex_normals(mesh: MeshPayload, positions: np.ndarray, faces: np.ndarray) -> np.ndarray:
    if mesh.normals is not None:
        n = np.asarray(mesh.normals, dtype=np.float32)
        if n.shape == positions.shape and np.all(np.isfinite(n)):
            norm = np.linalg.norm(n, axis=1, keepdims=True)
            if np.all(norm > 1e-6):
                return (n / norm).astype(np.float32)
    return compute_vertex_normals(positions, faces)


def _mtl_text(name: str, png_name: str) -> str:
    return (
        "# Conjure material (PBR extension keys Pr/Pm for importers that read them)\n"
        f"newmtl {name}_material\n"
        "Ka 1.000 1.000 1.000\nKd 1.000 1.000 1.000\nKs 0.000 0.000 0.000\n"
        "Ns 10.0\nd 1.0\nillum 1\n"
        f"Pr {DEFAULT_ROUGHNESS}\nPm {DEFAULT_METALLIC}\n"
        f"map_Kd {png_name}\n"
    )


def _obj_text(positions: np.ndarray, faces: np.ndarray, normals: np.ndarray, uvs: np.ndarray,
              mtl_name: str, name: str) -> str:
    """Wavefront OBJ, Y-up (same map as the GLB), per-corner UVs deduplicated, 1-based indices."""
    pos = positions.astype(np.float64) @ BLENDER_TO_GLTF.T
    nrm = normals.astype(np.float64) @ BLENDER_TO_GLTF.T
    uniq_uv, uv_idx = np.unique(np.asarray(uvs, np.float32), axis=0, return_inverse=True)
    uv_idx = uv_idx.reshape(-1, 3) + 1
    f = faces + 1
    lines = [f"# Conjure OBJ export, Y up\nmtllib {mtl_name}\no {name}\n"]
    lines.append("".join(f"v {x:.6f} {y:.6f} {z:.6f}\n" for x, y, z in pos))
    lines.append("".join(f"vt {u:.6f} {v:.6f}\n" for u, v in uniq_uv))
    lines.append("".join(f"vn {x:.5f} {y:.5f} {z:.5f}\n" for x, y, z in nrm))
    lines.append(f"usemtl {name}_material\ns 1\n")
    lines.append("".join(
        f"f {a}/{ta}/{a} {b}/{tb}/{b} {c}/{tc}/{c}\n"
        for (a, b, c), (ta, tb, tc) in zip(f.tolist(), uv_idx.tolist())))
    return "".join(lines)

"""Test helper: a strict reader of the GLB binary container (glTF 2.0 §4.4).

The exporter's tests and the pipeline's end-to-end tests check every GLB they produce with
:func:`check_glb_structure`, independently of trimesh's and Blender's more forgiving readers.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from backend.mesh.export import CHUNK_BIN, CHUNK_JSON, GLB_MAGIC, GLB_VERSION


class GLBStructureError(ValueError):
    """A GLB file violates the binary container layout of the glTF 2.0 specification."""


def check_glb_structure(path: Path | str) -> dict:
    """Validate a GLB file's container against glTF 2.0 §4.4 and return its parsed JSON.

    Checks: magic ``glTF``; version 2; header length equal to the file size; first chunk JSON,
    optional second chunk BIN, no chunk running past the end; chunk lengths and starts 4-byte
    aligned; JSON is UTF-8 with ``asset.version == "2.0"``; buffer 0 fits in the BIN chunk;
    every bufferView fits in its buffer; every accessor fits in its bufferView.

    Raises:
        GLBStructureError: naming the first violation found.
    """
    data = Path(path).read_bytes()
    if len(data) < 20:
        raise GLBStructureError(f"file too short for a GLB header + chunk: {len(data)} bytes")
    magic, version, length = struct.unpack_from("<III", data, 0)
    if magic != GLB_MAGIC:
        raise GLBStructureError(f"bad magic {magic:#010x}, expected 'glTF'")
    if version != GLB_VERSION:
        raise GLBStructureError(f"GLB version {version}, expected 2")
    if length != len(data):
        raise GLBStructureError(f"header length {length} != file size {len(data)}")
    if length % 4:
        raise GLBStructureError(f"total length {length} not a multiple of 4")
    chunks: list[tuple[int, bytes]] = []
    off = 12
    while off < length:
        if off + 8 > length:
            raise GLBStructureError(f"truncated chunk header at byte {off}")
        clen, ctype = struct.unpack_from("<II", data, off)
        if off % 4:
            raise GLBStructureError(f"chunk at byte {off} not 4-byte aligned")
        if clen % 4:
            raise GLBStructureError(f"chunk {len(chunks)} length {clen} not a multiple of 4")
        if off + 8 + clen > length:
            raise GLBStructureError(f"chunk {len(chunks)} (length {clen}) runs past the end of the file")
        chunks.append((ctype, data[off + 8: off + 8 + clen]))
        off += 8 + clen
    if not chunks or chunks[0][0] != CHUNK_JSON:
        raise GLBStructureError("first chunk is not JSON")
    if len(chunks) > 1 and chunks[1][0] != CHUNK_BIN:
        raise GLBStructureError(f"second chunk type {chunks[1][0]:#010x} is not BIN")
    try:
        gltf = json.loads(chunks[0][1].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GLBStructureError(f"JSON chunk does not parse: {exc}") from exc
    if not isinstance(gltf, dict) or gltf.get("asset", {}).get("version") != "2.0":
        raise GLBStructureError("JSON lacks asset.version == '2.0'")
    bin_len = len(chunks[1][1]) if len(chunks) > 1 else 0
    buffers = gltf.get("buffers", [])
    for i, buf in enumerate(buffers):
        if i == 0 and "uri" not in buf and buf.get("byteLength", 0) > bin_len:
            raise GLBStructureError(f"buffer 0 byteLength {buf.get('byteLength')} > BIN chunk {bin_len}")
    for i, view in enumerate(gltf.get("bufferViews", [])):
        b = view.get("buffer", -1)
        if not 0 <= b < len(buffers):
            raise GLBStructureError(f"bufferView {i} names missing buffer {b}")
        end = view.get("byteOffset", 0) + view.get("byteLength", 0)
        if end > buffers[b].get("byteLength", 0):
            raise GLBStructureError(f"bufferView {i} ends at {end}, past buffer {b}")
    sizes = {5120: 1, 5121: 1, 5122: 2, 5123: 2, 5125: 4, 5126: 4}
    ncomp = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4, "MAT2": 4, "MAT3": 9, "MAT4": 16}
    views = gltf.get("bufferViews", [])
    for i, acc in enumerate(gltf.get("accessors", [])):
        if "bufferView" not in acc:
            continue
        v = acc["bufferView"]
        if not 0 <= v < len(views):
            raise GLBStructureError(f"accessor {i} names missing bufferView {v}")
        comp = sizes.get(acc.get("componentType"))
        n = ncomp.get(acc.get("type"))
        if comp is None or n is None:
            raise GLBStructureError(f"accessor {i} has bad componentType/type")
        if acc.get("byteOffset", 0) % comp:
            raise GLBStructureError(f"accessor {i} byteOffset not aligned to its component size")
        stride = views[v].get("byteStride", comp * n)
        need = acc.get("byteOffset", 0) + stride * (acc["count"] - 1) + comp * n if acc["count"] else 0
        if need > views[v].get("byteLength", 0):
            raise GLBStructureError(f"accessor {i} needs {need} bytes, bufferView {v} has "
                                    f"{views[v].get('byteLength')}")
    return gltf

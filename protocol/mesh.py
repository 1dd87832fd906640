"""Mesh payloads that cross the wire.

Coordinates are Blender's: metres, +Z up, right-handed, front facing -Y, centred at the origin.
(The protocol helper adds encode/decode/validation below the dataclass.)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ProtocolError


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
        edges: (E, 2) uint32 vertex pairs, each undirected edge of the faces once; or None.
        corner_edges: (F*3,) uint32 index into ``edges`` of the edge from corner k of face f to
            corner (k+1) % 3, at row 3*f + k (Blender's ``.corner_edge``); given with ``edges``.
            The sender computes these so a receiver such as Blender need not rebuild them.
    """

    positions: np.ndarray
    faces: np.ndarray
    uvs: np.ndarray | None = None
    normals: np.ndarray | None = None
    colors: np.ndarray | None = None
    texture_png: bytes | None = None
    texture_rgba: np.ndarray | None = None
    edges: np.ndarray | None = None
    corner_edges: np.ndarray | None = None


# --------------------------------------------------------------------------------------
# Wire encoding. The dataclass above is the shared contract; below is how it travels.
# --------------------------------------------------------------------------------------

#: Hard limits, checked on the metadata before any buffer is touched or allocated.
MAX_VERTICES = 16_000_000
MAX_FACES = 32_000_000
MAX_TEXTURE_SIDE = 8192
MAX_PNG_BYTES = 256 * 1024 * 1024

#: field -> (dtype name, trailing shape; "N" = vertex count, "F3" = 3 * face count, "F" = faces).
_FIELDS: dict[str, tuple[str, tuple]] = {
    "positions": ("float32", ("N", 3)),
    "faces": ("uint32", ("F", 3)),
    "uvs": ("float32", ("F3", 2)),
    "normals": ("float32", ("N", 3)),
    "colors": ("uint8", ("N", 4)),
    "texture_rgba": ("uint8", ("H", "W", 4)),
    "texture_png": ("bytes", ("B",)),
    "edges": ("uint32", ("E", 2)),
    "corner_edges": ("uint32", ("F3",)),
}
MESH_FIELDS = tuple(_FIELDS)
_PNG_SIG = b"\x89PNG\r\n\x1a\n"


def _mesh_err(field: str, msg: str, code: str = "bad_mesh") -> ProtocolError:
    return ProtocolError(code, f"mesh.{field}: {msg}", field=f"mesh.{field}")


def _as_array(value, dtype: str, field: str) -> np.ndarray:
    """Contiguous little-endian array of ``dtype``; refuses lossy integer casts."""
    arr = np.asarray(value)
    target = np.dtype(dtype).newbyteorder("<")
    if arr.dtype.kind in "iu" and np.dtype(dtype).kind == "u" and arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > np.iinfo(target).max:
            raise _mesh_err(field, f"values {lo}..{hi} do not fit {dtype}")
    elif np.dtype(dtype).kind in "iu" and arr.dtype.kind not in "iu":
        raise _mesh_err(field, f"must be an integer array, got {arr.dtype}")
    elif arr.dtype.kind not in "iufb":
        raise _mesh_err(field, f"unsupported dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=target)


def encode_mesh(mesh: MeshPayload, base_index: int = 0) -> tuple[dict, list]:
    """Encode ``mesh`` for a message: ``(meta, buffers)``.

    ``meta`` maps each present field to ``{"buffer": i, "dtype": name, "shape": [...]}``
    where ``i`` indexes the message's buffer list (``base_index`` + position in ``buffers``);
    put ``meta`` in the content (e.g. ``content["mesh"]``) and ``buffers`` in the message.
    Arrays are converted to the canonical dtypes (no copy when already contiguous
    little-endian of that dtype) and validated exactly as ``decode_mesh`` would.
    """
    if not isinstance(mesh, MeshPayload):
        raise ProtocolError("bad_mesh", f"expected MeshPayload, got {type(mesh).__name__}")
    meta: dict = {}
    buffers: list = []
    for name, (dtype, _) in _FIELDS.items():
        value = getattr(mesh, name)
        if value is None:
            continue
        if dtype == "bytes":
            if not isinstance(value, (bytes, bytearray, memoryview)):
                raise _mesh_err(name, f"must be bytes, got {type(value).__name__}")
            buf = value
            shape = [len(memoryview(value).cast("B"))]
        else:
            buf = _as_array(value, dtype, name)
            shape = list(buf.shape)
        meta[name] = {"buffer": base_index + len(buffers), "dtype": dtype, "shape": shape}
        buffers.append(buf)
    decode_mesh(meta, [None] * base_index + buffers)  # same checks as the receiver
    return meta, buffers


def _check_shape(name: str, desc, dims: dict) -> list[int]:
    dtype, pattern = _FIELDS[name]
    if not isinstance(desc, dict):
        raise _mesh_err(name, "descriptor must be an object")
    if desc.get("dtype") != dtype:
        raise _mesh_err(name, f"dtype must be {dtype!r}, got {str(desc.get('dtype'))[:32]!r}", "bad_buffer")
    shape = desc.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) != len(pattern)
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
    ):
        raise _mesh_err(name, f"shape must be a list of {len(pattern)} non-negative ints", "bad_buffer")
    for size, want in zip(shape, pattern):
        if isinstance(want, int):
            if size != want:
                raise _mesh_err(name, f"shape {shape} must match {list(pattern)}", "bad_buffer")
        elif want in dims:
            if size != dims[want]:
                raise _mesh_err(name, f"shape {shape} disagrees with {want}={dims[want]}", "bad_buffer")
        else:
            dims[want] = size
    return shape


def _check_limits(name: str, shape: list[int]) -> None:
    if name == "positions" and shape[0] > MAX_VERTICES:
        raise _mesh_err(name, f"{shape[0]} vertices exceed MAX_VERTICES={MAX_VERTICES}", "too_large")
    if name == "faces" and shape[0] > MAX_FACES:
        raise _mesh_err(name, f"{shape[0]} faces exceed MAX_FACES={MAX_FACES}", "too_large")
    if name == "texture_rgba":
        if shape[0] > MAX_TEXTURE_SIDE or shape[1] > MAX_TEXTURE_SIDE:
            raise _mesh_err(name, f"{shape[1]}x{shape[0]} exceeds MAX_TEXTURE_SIDE={MAX_TEXTURE_SIDE}", "too_large")
        if shape[0] == 0 or shape[1] == 0:
            raise _mesh_err(name, "texture must not be empty")
    if name == "texture_png" and shape[0] > MAX_PNG_BYTES:
        raise _mesh_err(name, f"{shape[0]} bytes exceed MAX_PNG_BYTES={MAX_PNG_BYTES}", "too_large")


def _view_bytes(buf: Any) -> memoryview:
    if isinstance(buf, np.ndarray):
        if not buf.flags.c_contiguous:
            buf = np.ascontiguousarray(buf)
        return buf.data.cast("B") if buf.size else memoryview(b"")
    view = buf.buffer if hasattr(buf, "buffer") and not isinstance(buf, (bytes, bytearray)) else memoryview(buf)
    return view if (view.ndim == 1 and view.itemsize == 1) else view.cast("B")


def _load(name: str, desc: dict, shape: list[int], buffers: list) -> np.ndarray | memoryview:
    """The buffer of field ``name`` checked against its descriptor: a read-only array, or a byte
    view for ``bytes`` fields (``texture_png``)."""
    dtype, _ = _FIELDS[name]
    idx = desc.get("buffer")
    if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < len(buffers):
        raise _mesh_err(name, f"buffer index {str(idx)[:20]} out of range (have {len(buffers)})", "bad_buffer")
    buf = buffers[idx]
    if buf is None:
        raise _mesh_err(name, f"buffer {idx} is missing", "bad_buffer")
    if dtype == "bytes":
        if isinstance(buf, np.ndarray) and buf.dtype != np.uint8:
            raise _mesh_err(name, f"buffer dtype must be bytes/uint8, got {buf.dtype}", "bad_buffer")
        try:
            view = _view_bytes(buf)
        except (TypeError, ValueError) as e:
            raise _mesh_err(name, f"buffer is not bytes-like: {e}", "bad_buffer") from e
        if len(view) != shape[0]:
            raise _mesh_err(name, f"buffer has {len(view)} bytes, descriptor says {shape[0]}", "bad_buffer")
        return view
    want = np.dtype(dtype).newbyteorder("<")
    nbytes = want.itemsize
    for s in shape:
        nbytes *= s
    if isinstance(buf, np.ndarray):
        if buf.dtype != want or list(buf.shape) != shape:
            raise _mesh_err(
                name, f"buffer is {buf.dtype}{list(buf.shape)}, descriptor says {dtype}{shape}", "bad_buffer"
            )
        return buf
    try:
        view = _view_bytes(buf)
    except (TypeError, ValueError) as e:
        raise _mesh_err(name, f"buffer is not bytes-like: {e}", "bad_buffer") from e
    if len(view) != nbytes:
        raise _mesh_err(name, f"buffer has {len(view)} bytes, {dtype}{shape} needs {nbytes}", "bad_buffer")
    return np.frombuffer(view, dtype=want).reshape(shape)


def _check_finite(name: str, arr: np.ndarray) -> None:
    if arr.size and not (np.isfinite(arr.min()) and np.isfinite(arr.max())):  # no temporaries
        raise _mesh_err(name, "contains NaN or infinite values")


def _png_size(name: str, view: memoryview) -> None:
    head = bytes(view[:24])
    if len(head) < 24 or head[:8] != _PNG_SIG or head[12:16] != b"IHDR":
        raise _mesh_err(name, "is not a PNG (bad signature or missing IHDR)")
    width = int.from_bytes(head[16:20], "big")
    height = int.from_bytes(head[20:24], "big")
    if not (0 < width <= MAX_TEXTURE_SIDE and 0 < height <= MAX_TEXTURE_SIDE):
        raise _mesh_err(name, f"PNG is {width}x{height}; limit is {MAX_TEXTURE_SIDE} a side", "too_large")


def decode_mesh(meta: dict, buffers: Iterable[Any]) -> MeshPayload:
    """Validate ``meta`` (from ``encode_mesh``) against ``buffers`` and build a ``MeshPayload``.

    ``buffers`` is the message's buffer list: numpy arrays (as ``Session.deserialize``
    yields), or bytes-likes / zmq Frames. Arrays are zero-copy, read-only views of the frames
    where the input allows it; ``texture_png`` is copied to ``bytes``.

    Checks, all before touching buffer data: known field names, required ``positions`` and
    ``faces``, exact dtype per field, shapes consistent (N, F, 3F), hard limits
    (``MAX_VERTICES``, ``MAX_FACES``, ``MAX_TEXTURE_SIDE``, ``MAX_PNG_BYTES``), distinct
    buffer indices and exact byte lengths. Then: face indices < N, floats finite, PNG header
    size within limits. Raises ``ProtocolError`` (``bad_mesh``, ``bad_buffer``, ``too_large``).
    """
    if not isinstance(meta, dict):
        raise ProtocolError("bad_mesh", "mesh meta must be an object", field="mesh")
    try:
        buffers = list(buffers)
    except TypeError as e:
        raise ProtocolError("bad_mesh", "buffers must be a list", field="mesh") from e
    for key in meta:
        if key not in _FIELDS:
            raise ProtocolError("bad_mesh", f"mesh: unknown field {str(key)[:40]!r}", field="mesh")
    for key in ("positions", "faces"):
        if key not in meta:
            raise _mesh_err(key, "is required")
    if "texture_png" in meta and "texture_rgba" in meta:
        raise ProtocolError("bad_mesh", "mesh: give texture_png or texture_rgba, not both", field="mesh")
    if ("edges" in meta) != ("corner_edges" in meta):
        raise ProtocolError("bad_mesh", "mesh: give edges and corner_edges together, or neither", field="mesh")
    dims: dict = {}
    shapes = {}
    for name in _FIELDS:
        if name in meta:
            shape = _check_shape(name, meta[name], dims)
            if name == "faces":
                if "F3" in dims and dims["F3"] != 3 * shape[0]:
                    raise _mesh_err("uvs", "must have 3 rows per face", "bad_buffer")
                dims["F3"] = 3 * shape[0]
            _check_limits(name, shape)
            shapes[name] = shape
    used = [meta[n].get("buffer") for n in shapes]
    if len(set(map(repr, used))) != len(used):
        raise ProtocolError("bad_mesh", "mesh: two fields share one buffer", field="mesh")
    loaded: dict[str, np.ndarray] = {}
    png_view: memoryview | None = None
    for name in shapes:
        value = _load(name, meta[name], shapes[name], buffers)
        if isinstance(value, memoryview):  # the one bytes field, texture_png
            png_view = value
        else:
            loaded[name] = value

    n_vertices = shapes["positions"][0]
    faces = loaded["faces"]
    if faces.size:
        hi = int(faces.max())
        if hi >= n_vertices:
            raise _mesh_err("faces", f"index {hi} out of range for {n_vertices} vertices")
    if "edges" in loaded:
        edges, corner_edges = loaded["edges"], loaded["corner_edges"]
        if len(edges) > 3 * len(faces):
            raise _mesh_err("edges", f"{len(edges)} edges for {len(faces)} triangles (at most 3 per face)")
        if edges.size and int(edges.max()) >= n_vertices:
            raise _mesh_err("edges", f"index {int(edges.max())} out of range for {n_vertices} vertices")
        if corner_edges.size and int(corner_edges.max()) >= len(edges):
            raise _mesh_err("corner_edges", f"index {int(corner_edges.max())} out of range for {len(edges)} edges")
    for name in ("positions", "uvs", "normals"):
        if name in loaded:
            _check_finite(name, loaded[name])
    png = None
    if png_view is not None:
        _png_size("texture_png", png_view)
        png = bytes(png_view)
    return MeshPayload(
        positions=loaded["positions"],
        faces=faces,
        uvs=loaded.get("uvs"),
        normals=loaded.get("normals"),
        colors=loaded.get("colors"),
        texture_png=png,
        texture_rgba=loaded.get("texture_rgba"),
        edges=loaded.get("edges"),
        corner_edges=loaded.get("corner_edges"),
    )


def validate_upload_mesh(mesh: MeshPayload) -> MeshPayload:
    """Extra checks for a mesh a client uploads to be textured (after ``decode_mesh``).

    ``decode_mesh`` already enforced the limits, dtypes, shapes, byte lengths, index ranges and
    finite values; a texture job also needs at least one triangle, and no edges (the backend
    derives its own). UVs may lie anywhere (the backend checks them and re-unwraps when they are
    outside 0..1 or overlap). Raises ``ProtocolError("bad_mesh")``.
    """
    if len(mesh.faces) == 0:
        raise _mesh_err("faces", "an uploaded mesh needs at least one triangle")
    if mesh.edges is not None:
        raise ProtocolError("bad_mesh", "mesh: an uploaded mesh must not carry edges", field="mesh.edges")
    return mesh


def upload_sizes(meta: dict) -> list[int]:
    """Byte length of each buffer a mesh ``meta`` describes, in buffer-index order (0, 1, …).

    Only the descriptors are read (known field, dtype, a list of non-negative ints as shape,
    indices 0..k-1 each once); ``decode_mesh`` checks the rest. Raises ``ProtocolError``.
    """
    if not isinstance(meta, dict):
        raise ProtocolError("bad_mesh", "mesh meta must be an object", field="mesh")
    sizes: dict[int, int] = {}
    for name, desc in meta.items():
        if name not in _FIELDS or not isinstance(desc, dict):
            raise ProtocolError("bad_mesh", f"mesh: unknown field or bad descriptor {str(name)[:40]!r}", field="mesh")
        dtype = _FIELDS[name][0]
        shape, idx = desc.get("shape"), desc.get("buffer")
        if (not isinstance(shape, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                   for v in shape)):
            raise _mesh_err(name, "shape must be a list of non-negative ints", "bad_buffer")
        if not isinstance(idx, int) or isinstance(idx, bool) or idx < 0 or idx in sizes:
            raise _mesh_err(name, f"buffer index {str(idx)[:20]} is invalid or used twice", "bad_buffer")
        n = 1 if dtype == "bytes" else np.dtype(dtype).itemsize
        for v in shape:
            n *= v  # Python ints: nothing allocated
        sizes[idx] = n
    if sorted(sizes) != list(range(len(sizes))):
        raise ProtocolError("bad_buffer", "mesh: buffer indices must be 0..k-1", field="mesh")
    return [sizes[i] for i in range(len(sizes))]


def pack_upload(mesh: MeshPayload) -> tuple[dict, bytes]:
    """``(meta, blob)``: ``encode_mesh`` with its buffers concatenated in index order (for uploads
    sent in ``upload`` pieces; :func:`unpack_upload` is the inverse)."""
    meta, buffers = encode_mesh(mesh)
    return meta, b"".join(np.ascontiguousarray(b).tobytes() if isinstance(b, np.ndarray) else bytes(b)
                          for b in buffers)


def unpack_upload(meta: dict, blob) -> MeshPayload:
    """Split ``blob`` by the sizes ``meta`` describes (checked against its length before anything
    is made) and ``decode_mesh`` it. Raises ``ProtocolError``."""
    sizes = upload_sizes(meta)
    view = memoryview(blob).cast("B")
    if sum(sizes) != len(view):
        raise ProtocolError("bad_buffer", f"mesh: the upload has {len(view)} bytes, its meta describes "
                            f"{sum(sizes)}", field="mesh")
    buffers, at = [], 0
    for n in sizes:
        buffers.append(view[at:at + n])
        at += n
    return decode_mesh(meta, buffers)


#: Uploads up to this many bytes of buffers ride in the ``submit`` itself; larger ones in pieces.
INLINE_UPLOAD_BYTES = 256 * 1024


def texture_submit(params: dict, mesh: MeshPayload, base_color=None, chunk_bytes: int = 1 << 20
                   ) -> tuple[list[tuple[dict, list]], dict, list]:
    """The messages a client sends for a texture job: ``(pieces, submit_content, submit_buffers)``.

    ``pieces`` is a list of ``(upload content, [bytes])`` to send first, in order (empty for a
    small mesh, whose buffers ride in the submit); then the ``submit``. ``params`` is the
    ``GenerationParams`` dict; ``base_color`` 3 or 4 sRGB floats in 0..1 or None.
    """
    import hashlib

    meta, blob = pack_upload(mesh)
    content = {"params": params, "kind": "texture", "mesh": meta}
    if base_color is not None:
        content["base_color"] = [float(c) for c in base_color]
    if len(blob) <= INLINE_UPLOAD_BYTES:
        sizes = upload_sizes(meta)
        view, at, buffers = memoryview(blob), 0, []
        for n in sizes:
            buffers.append(view[at:at + n])
            at += n
        return [], content, buffers
    total = len(blob)
    pieces = [({"offset": at, "total": total}, [memoryview(blob)[at:at + chunk_bytes]])
              for at in range(0, total, chunk_bytes)]
    content["upload"] = {"total": total, "sha256": hashlib.sha256(blob).hexdigest()}
    return pieces, content, []

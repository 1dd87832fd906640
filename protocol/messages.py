"""Signed multipart messages: types, schemas, (de)serialisation and socket helpers.

Frame layout (frames are read at fixed positions)::

    [routing id]  only on a ROUTER socket (Session(routing=True))
    b"CONJURE/1"  protocol tag with the major version
    signature     hex HMAC-SHA256 over every following frame (see signing.py)
    header JSON   {msg_id, msg_type, session, server_session, job_id, seq, time, version, buffers}
    content JSON  per-type schema (see ``MSG_TYPES``)
    buffers...    raw little-endian arrays or opaque bytes, one frame each

Header fields:
    msg_id: str, unique id (uuid4 hex) of this message.
    msg_type: str, one of ``MSG_TYPES``.
    session: str, the client's session id (clients send their own; the server echoes it).
    server_session: str | None, the server's session id (servers send their own; clients
        echo the last one seen, so a restarted server can tell).
    job_id: str | None, the job (UUID string) the message is about.
    seq: int | None, per-job sequence number of server events (for ``attach``).
    time: float, sender's Unix time in seconds (checked against a window; see ReplayGuard).
    version: str, ``"MAJOR.MINOR"``; majors must match.
    buffers: list of ``{"dtype", "shape", "nbytes"}``, one per buffer frame. dtype is one of
        ``BUFFER_DTYPES`` (little-endian) or ``"bytes"`` (shape ``[nbytes]``).

Received buffers are zero-copy, read-only numpy arrays over the frames (``"bytes"``
buffers are read-only memoryviews). Unknown content fields are allowed (minor-version
additions); known ones are type-checked. Everything wrong with input raises ``ProtocolError``.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import time as _time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from .errors import ProtocolError
from .mesh import MeshPayload, decode_mesh
from .params import JOB_KINDS, validate_params
from .signing import ReplayGuard, Signer, _as_view

if TYPE_CHECKING:
    import zmq

PROTOCOL_VERSION = "1.0"
PROTOCOL_MAJOR = 1
PROTOCOL_TAG = b"CONJURE/%d" % PROTOCOL_MAJOR

#: Hard limits (defaults; ``Session`` takes ``max_message_bytes``).
MAX_BUFFERS = 64
MAX_HEADER_BYTES = 16 * 1024
MAX_CONTENT_BYTES = 1024 * 1024
MAX_JSON_DEPTH = 16
MAX_MESSAGE_BYTES = 1 << 30
MAX_BUFFER_NDIM = 8
MAX_CHUNK_BYTES = 16 * 1024 * 1024
MAX_STR_CHARS = 4096
#: Most bytes in the signed frames of a message a *server* accepts: client requests carry no
#: buffers, so header + content limits plus a little. Larger ones are dropped before hashing.
MAX_REQUEST_BYTES = MAX_HEADER_BYTES + MAX_CONTENT_BYTES + 64 * 1024
#: Largest single frame a server accepts (its socket's ``ZMQ_MAXMSGSIZE``: libzmq drops the peer).
MAX_REQUEST_FRAME_BYTES = MAX_CONTENT_BYTES + 1024

#: Texture-job uploads larger than one request travel as ``upload`` messages of at most this many
#: bytes each (one frame; within ``MAX_REQUEST_FRAME_BYTES``), then a ``submit`` that names them.
UPLOAD_CHUNK_BYTES = 1 << 20
#: Most bytes of mesh buffers in one texture-job upload (a 1M-triangle mesh with UVs is ~42 MB).
MAX_UPLOAD_BYTES = 512 * 1024 * 1024

BUFFER_DTYPES = (
    "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
    "float16", "float32", "float64",
)
_DTYPES = {name: np.dtype(name).newbyteorder("<") for name in BUFFER_DTYPES}

#: Job states on the wire; "interrupted": the job was running when the server stopped.
JOB_STATES = ("queued", "running", "done", "failed", "cancelled", "interrupted")

_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{0,64}\Z")
_JOB_ID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
_VERSION_RE = re.compile(r"^(\d{1,4})\.(\d{1,4})\Z")
_HEX64_RE = re.compile(r"^[0-9a-f]{64}\Z")
_CODE_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}\Z")


def default_limits(max_message_bytes: int = MAX_MESSAGE_BYTES) -> dict:
    """The hard limits this protocol version enforces, e.g. for ``hello_reply.limits``."""
    from .mesh import MAX_FACES, MAX_PNG_BYTES, MAX_TEXTURE_SIDE, MAX_VERTICES

    return {
        "max_message_bytes": int(max_message_bytes),
        "max_buffers": MAX_BUFFERS,
        "max_header_bytes": MAX_HEADER_BYTES,
        "max_content_bytes": MAX_CONTENT_BYTES,
        "max_json_depth": MAX_JSON_DEPTH,
        "max_chunk_bytes": MAX_CHUNK_BYTES,
        "max_vertices": MAX_VERTICES,
        "max_faces": MAX_FACES,
        "max_texture_side": MAX_TEXTURE_SIDE,
        "max_png_bytes": MAX_PNG_BYTES,
    }


def new_job_id() -> str:
    """A fresh job id (UUID4, canonical lower-case form)."""
    return str(uuid.uuid4())


def is_job_id(value: object) -> bool:
    return isinstance(value, str) and bool(_JOB_ID_RE.match(value))


def version_compatible(version: str) -> bool:
    """True if ``version`` ("MAJOR.MINOR") has our major version."""
    m = _VERSION_RE.match(version) if isinstance(version, str) else None
    return bool(m) and int(m.group(1)) == PROTOCOL_MAJOR


# ---------------------------------------------------------------------------------------
# Tiny schema language: each check takes (value, path) and raises ProtocolError.
# ---------------------------------------------------------------------------------------

def _bad(path: str, msg: str, code: str = "bad_content") -> ProtocolError:
    return ProtocolError(code, f"{path}: {msg}", field=path)


def _tname(v) -> str:
    return type(v).__name__


def _finite(v) -> bool:
    """True for finite reals; huge JSON integers (beyond float range) count as not finite."""
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def _str(max_chars: int = MAX_STR_CHARS, *, nonempty: bool = False, pattern: re.Pattern | None = None):
    def check(v, path):
        if not isinstance(v, str):
            raise _bad(path, f"must be a string, got {_tname(v)}")
        if len(v) > max_chars:
            raise _bad(path, f"is longer than {max_chars} characters")
        if nonempty and not v:
            raise _bad(path, "must not be empty")
        if pattern is not None and not pattern.match(v):
            raise _bad(path, f"has an invalid format: {v[:40]!r}")
    return check


def _int(lo: int | None = 0, hi: int | None = 2**53):
    def check(v, path):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise _bad(path, f"must be an integer, got {_tname(v)}")
        n = int(v)  # exact for every Integral (numpy integers included)
        if (lo is not None and n < lo) or (hi is not None and n > hi):
            raise _bad(path, f"must be in {lo}..{hi}, got {v}")
    return check


def _num(lo: float | None = None, hi: float | None = None):
    def check(v, path):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise _bad(path, f"must be a number, got {_tname(v)}")
        if not _finite(v):
            raise _bad(path, "must be finite")
        x = cast(float, v)  # a Real compares with floats exactly as it is (no conversion)
        if (lo is not None and x < lo) or (hi is not None and x > hi):
            raise _bad(path, f"must be in [{lo}, {hi}], got {v}")
    return check


def _bool(v, path):
    if not isinstance(v, (bool, np.bool_)):
        raise _bad(path, f"must be true or false, got {_tname(v)}")


def _opt(check):
    def opt(v, path):
        if v is not None:
            check(v, path)
    return opt


def _enum(*values):
    def check(v, path):
        if v not in values:
            raise _bad(path, f"must be one of {', '.join(values)}, got {str(v)[:40]!r}")
    return check


def _list(item, max_len: int = 1024):
    def check(v, path):
        if not isinstance(v, list):
            raise _bad(path, f"must be a list, got {_tname(v)}")
        if len(v) > max_len:
            raise _bad(path, f"has {len(v)} items; the limit is {max_len}")
        for i, x in enumerate(v):
            item(x, f"{path}[{i}]")
    return check


def _obj(fields: dict | None = None, max_keys: int = 256):
    """An object; ``fields`` maps name -> (check, required)."""
    def check(v, path):
        if not isinstance(v, dict):
            raise _bad(path, f"must be an object, got {_tname(v)}")
        if len(v) > max_keys:
            raise _bad(path, f"has {len(v)} keys; the limit is {max_keys}")
        if fields:
            _check_fields(v, fields, path)
    return check


def _check_fields(obj: dict, fields: dict, path: str) -> None:
    for name, (check, required) in fields.items():
        sub = f"{path}.{name}" if path else name
        if name not in obj:
            if required:
                raise _bad(sub, "is required")
            continue
        check(obj[name], sub)


def _params(v, path):
    try:
        validate_params(v)
    except ProtocolError as e:
        field_name = f"{path}.{e.field}" if e.field and e.field != "params" else path
        raise ProtocolError("invalid_params", e.message, field=field_name) from None


def _rgb(v, path):
    """[r, g, b] or [r, g, b, a], each a number in 0..1."""
    _list(_num(0.0, 1.0), 4)(v, path)
    if len(v) < 3:
        raise _bad(path, f"must have 3 or 4 numbers (r, g, b[, a]), got {len(v)}")


_VERSION = _str(16, pattern=_VERSION_RE)
_STATE = _enum(*JOB_STATES)
_FILE = _obj({"name": (_str(255, nonempty=True), True), "size": (_int(0), True), "sha256": (_str(64, pattern=_HEX64_RE), False)})
_JOB_SUMMARY = _obj({"job_id": (_str(64, pattern=_JOB_ID_RE), True), "state": (_STATE, True)})
_LIMITS = _obj(max_keys=64)
_MODEL_ENTRY = _obj({"id": (_str(256, nonempty=True), True), "name": (_str(256), True), "present": (_bool, True)})
_PULL = _obj({"id": (_str(256, nonempty=True), True), "state": (_enum("running", "done", "failed"), True),
              "done": (_int(0), True), "total": (_int(0), True), "unit": (_str(8), False),
              "message": (_str(), False), "seconds": (_num(0.0), False)})

#: msg_type -> (content fields {name: (check, required)}, job_id required, buffers rule).
#: buffers rule: 0 = no buffers, None = any number, "chunk" = exactly one "bytes" buffer.
_SCHEMAS: dict[str, tuple[dict, bool, Any]] = {
    "hello": ({
        "protocol_version": (_VERSION, True),
        "client_name": (_str(128), False),
        "client_version": (_str(64), False),
        "capabilities": (_list(_str(64), 64), False),
    }, False, 0),
    "hello_reply": ({
        "protocol_version": (_VERSION, True),
        "server_version": (_str(64), False),
        "limits": (_LIMITS, True),
        "presets": (_list(_str(64), 256), False),
        "device": (_str(256), False),
        "capabilities": (_list(_str(64), 64), False),
        "model": (_str(256), False),
        "models": (_list(_MODEL_ENTRY, 256), False),
        "vocabulary": (_list(_str(64), 4096), False),
        "versions": (_obj(max_keys=32), False),
    }, False, 0),
    "submit": ({
        "params": (_params, True),
        # kind / mesh / base_color are checked by the receiver's handler with check_submit_upload
        # (so a bad upload gets an error reply instead of being dropped as a malformed message)
    }, True, None),
    "upload": ({
        "offset": (_int(0, MAX_UPLOAD_BYTES), True),
        "total": (_int(1, MAX_UPLOAD_BYTES), True),
    }, True, "chunk"),
    "upload_ack": ({
        "received": (_int(0, MAX_UPLOAD_BYTES), True),
        "total": (_int(0, MAX_UPLOAD_BYTES), True),
    }, True, 0),
    "accepted": ({
        "queue_position": (_int(0), True),
        "state": (_STATE, False),
        "duplicate": (_bool, False),
    }, True, 0),
    "progress": ({
        "stage": (_str(64, nonempty=True), True),
        "step": (_int(0), True),
        "total": (_int(0), True),
        "fraction": (_num(0.0, 1.0), True),
        "elapsed": (_num(0.0), True),
        "eta": (_opt(_num(0.0)), False),
        "message": (_str(), False),
    }, True, 0),
    "preview_mesh": ({
        "stage": (_str(64, nonempty=True), True),
        "step": (_int(0), True),
        "mesh": (_obj(max_keys=16), True),
    }, True, None),
    "result_ready": ({
        "name": (_str(255, nonempty=True), True),
        "size": (_int(0), True),
        "sha256": (_str(64, pattern=_HEX64_RE), True),
        "files": (_list(_FILE, 256), True),
        "mesh": (_obj(max_keys=16), False),
        "warnings": (_list(_str(), 64), False),
        "resolved_preset": (_str(64), False),
        "model": (_str(256), False),
        "device": (_str(256), False),
        "seed": (_int(0), False),
        "duration_s": (_num(0.0), False),
    }, True, None),
    "fetch_result": ({
        "name": (_str(255, nonempty=True), False),
        "offset": (_int(0), True),
        "length": (_int(1, MAX_CHUNK_BYTES), True),
    }, True, 0),
    "result_chunk": ({
        "name": (_str(255, nonempty=True), True),
        "offset": (_int(0), True),
        "size": (_int(0), True),
        "eof": (_bool, True),
    }, True, "chunk"),
    "cancel": ({"reason": (_str(), False)}, True, 0),
    "cancelled": ({"message": (_str(), False)}, True, 0),
    "error": ({
        "code": (_str(64, pattern=_CODE_RE), True),
        "message": (_str(), True),
        "retriable": (_bool, True),
        "field": (_opt(_str(256)), False),
        "in_reply_to": (_opt(_str(64, pattern=_ID_RE)), False),
    }, False, 0),
    "status": ({}, True, 0),
    "status_reply": ({
        "state": (_STATE, True),
        "queue_position": (_opt(_int(0)), False),
        "stage": (_opt(_str(64)), False),
        "fraction": (_opt(_num(0.0, 1.0)), False),
        "last_seq": (_opt(_int(0)), False),
        "params": (_opt(_obj()), False),
        "result": (_opt(_obj()), False),
        "error": (_opt(_obj()), False),
        "created": (_opt(_num()), False),
        "updated": (_opt(_num()), False),
    }, True, 0),
    "list_jobs": ({
        "limit": (_int(1, 1000), False),
        "states": (_list(_STATE, 8), False),
    }, False, 0),
    "jobs": ({"jobs": (_list(_JOB_SUMMARY, 1000), True)}, False, 0),
    "attach": ({"from_seq": (_int(0), True)}, True, 0),
    "delete_job": ({}, True, 0),
    "job_deleted": ({}, True, 0),
    "list_models": ({}, False, 0),
    "pull_model": ({"model_id": (_str(256, nonempty=True), True)}, False, 0),
    "models": ({
        "device": (_str(256), False),
        "model": (_str(256), False),
        "models": (_list(_MODEL_ENTRY, 256), False),
        "vocabulary": (_list(_str(64), 4096), False),
        "pulls": (_list(_PULL, 64), False),
    }, False, 0),
    "ping": ({"token": (_str(128), False)}, False, 0),
    "pong": ({"token": (_str(128), False), "server_time": (_num(), False)}, False, 0),
}

#: Every message type, with a one-line description.
MSG_TYPES: dict[str, str] = {
    "hello": "client -> server: protocol_version, client_name?, client_version?, capabilities?",
    "hello_reply": ("server -> client: protocol_version, limits{}, server_version?, presets?, device? "
                    "(\"CPU\" / \"CUDA · <GPU>\"), model? (auto's model id), models? [{id, name, present}], "
                    "vocabulary? (words of a closed-vocabulary default model; empty otherwise), versions? {package: version}"),
    "submit": ("client -> server [job_id]: params (GenerationParams dict), kind? ('generate' | 'texture'), "
               "mesh? + buffers (kind 'texture': the mesh to texture), base_color? [r, g, b(, a)] sRGB 0..1; "
               "idempotent on job_id"),
    "upload": ("client -> server [job_id]: offset, total; one 'bytes' buffer of at most UPLOAD_CHUNK_BYTES: "
               "a piece of a texture job's mesh upload, in order"),
    "upload_ack": "server -> client [job_id]: received, total (bytes of the upload so far)",
    "accepted": "server -> client [job_id]: queue_position, state?, duplicate?",
    "progress": "server -> client [job_id, seq]: stage, step, total, fraction, elapsed, eta?, message?",
    "preview_mesh": "server -> client [job_id, seq]: stage, step, mesh meta (encode_mesh) + buffers",
    "result_ready": "server -> client [job_id, seq]: name, size, sha256, files[], mesh?, warnings?, "
                    "resolved_preset?, model?, device?, seed?, duration_s? + buffers",
    "fetch_result": "client -> server [job_id]: name?, offset, length (<= MAX_CHUNK_BYTES)",
    "result_chunk": "server -> client [job_id]: name, offset, size (file total), eof; one 'bytes' buffer",
    "cancel": "client -> server [job_id]: reason?",
    "cancelled": "server -> client [job_id, seq]: message?",
    "error": "either way [job_id?]: code, message, retriable, field?, in_reply_to?",
    "status": "client -> server [job_id]",
    "status_reply": "server -> client [job_id]: state, queue_position?, stage?, fraction?, last_seq?, ...",
    "list_jobs": "client -> server: limit?, states?",
    "jobs": "server -> client: jobs [{job_id, state, prompt?, created?, finished?, duration_s?, thumbnail?, ...}]",
    "attach": "client -> server [job_id]: from_seq; server resends the job's events with seq >= from_seq",
    "delete_job": "client -> server [job_id]: remove a finished job and its files",
    "job_deleted": "server -> client [job_id]: the job was removed (reply to delete_job)",
    "list_models": "client -> server: (no fields); the server replies models",
    "pull_model": "client -> server: model_id (owner/name); starts a background download; the server replies models",
    "models": ("server -> client: device?, model?, models? [{id, name, present}], vocabulary?, pulls? "
               "[{id, state running|done|failed, done, total, unit B|it, message?, seconds?}]"),
    "ping": "either way: token?",
    "pong": "reply to ping: token?, server_time?",
}
assert set(MSG_TYPES) == set(_SCHEMAS)


def validate_content(msg_type: str, content: Any, job_id: str | None = None,
                     buffers: Sequence[Any] | None = None) -> None:
    """Check ``content`` (and job id / buffer count) against the schema of ``msg_type``."""
    if msg_type not in _SCHEMAS:
        raise ProtocolError("unknown_msg_type", f"unknown message type {str(msg_type)[:40]!r}")
    fields, needs_job, rule = _SCHEMAS[msg_type]
    if not isinstance(content, dict):
        raise ProtocolError("bad_content", f"{msg_type}: content must be an object, got {_tname(content)}")
    if needs_job and job_id is None:
        raise ProtocolError("bad_header", f"{msg_type}: job_id is required", field="job_id")
    _check_fields(content, fields, "")
    if buffers is not None:
        if rule == 0 and len(buffers) != 0:
            raise ProtocolError("bad_buffer", f"{msg_type} carries no buffers, got {len(buffers)}")
        if rule == "chunk":
            if len(buffers) != 1 or isinstance(buffers[0], np.ndarray):
                raise ProtocolError("bad_buffer", f"{msg_type} carries exactly one 'bytes' buffer")


def check_submit_upload(content: dict, n_buffers: int) -> str:
    """Check a ``submit``'s job kind and upload fields; return the kind ('generate' | 'texture').

    A texture job carries its mesh (``content.mesh`` + buffers, or ``content.mesh`` + ``content.upload``
    ``{total, sha256}`` naming the bytes sent before in ``upload`` messages, see
    ``protocol.mesh.pack_upload``) and may carry ``base_color`` ([r, g, b] or [r, g, b, a], sRGB
    in 0..1); a generate job carries none of these. The mesh itself is checked by
    ``decode_mesh``. Raises ``ProtocolError``.
    """
    kind = content.get("kind", "generate")
    if kind not in JOB_KINDS:
        raise _bad("kind", f"must be one of {', '.join(JOB_KINDS)}, got {str(kind)[:40]!r}")
    if kind == "texture":
        if "mesh" not in content:
            raise _bad("mesh", "submit of kind 'texture' needs a mesh")
        _obj(max_keys=16)(content["mesh"], "mesh")
        if "upload" in content:
            _obj({"total": (_int(1, MAX_UPLOAD_BYTES), True),
                  "sha256": (_str(64, pattern=_HEX64_RE), True)})(content["upload"], "upload")
            if n_buffers:
                raise ProtocolError("bad_buffer", "a submit that names an upload carries no buffers")
        if content.get("base_color") is not None:
            _rgb(content["base_color"], "base_color")
        return kind
    for name in ("mesh", "base_color", "upload"):
        if name in content:
            raise _bad(name, f"a submit of kind {kind!r} takes no {name}")
    if n_buffers:
        raise ProtocolError("bad_buffer", f"a submit of kind {kind!r} carries no buffers, got {n_buffers}")
    return kind


# ---------------------------------------------------------------------------------------
# JSON with bounded size and depth
# ---------------------------------------------------------------------------------------

_STRING_RE = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def _reject_constant(name):
    raise ValueError(f"{name} is not allowed")


def _json_too_deep(raw: bytes, limit: int) -> bool:
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False  # fast path: cannot be deeper than the number of openers
    brackets = _STRING_RE.sub(b'""', raw).translate(None, _NOT_BRACKETS)
    arr = np.frombuffer(brackets, dtype=np.uint8)
    step = np.where((arr == 0x5B) | (arr == 0x7B), 1, -1).astype(np.int32)
    return bool(np.cumsum(step).max(initial=0) > limit)


def loads_bounded(raw: bytes | memoryview, what: str, max_bytes: int, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse a JSON frame; any failure is ``ProtocolError("bad_json" | "too_large")``."""
    if len(raw) > max_bytes:
        raise ProtocolError("too_large", f"{what} JSON is {len(raw)} bytes; the limit is {max_bytes}")
    raw = bytes(raw)
    if _json_too_deep(raw, max_depth):
        raise ProtocolError("bad_json", f"{what} JSON is nested deeper than {max_depth}")
    try:
        return _DECODER.decode(raw.decode("utf-8"))
    except (ValueError, RecursionError, UnicodeDecodeError, TypeError) as e:
        raise ProtocolError("bad_json", f"{what} is not valid JSON: {str(e)[:200]}") from None


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _json_default(o):
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_json_default)


def dumps(obj: Any) -> bytes:
    """Compact strict JSON (no NaN/Infinity) as UTF-8; numpy scalars become Python numbers."""
    try:
        return _ENCODER.encode(obj).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as e:
        raise ProtocolError("bad_content", f"cannot encode as JSON: {e}") from None


# ---------------------------------------------------------------------------------------
# Message and Session
# ---------------------------------------------------------------------------------------

@dataclass
class Message:
    """One protocol message.

    ``buffers``: on send, numpy arrays (any whitelisted dtype, converted to contiguous
    little-endian) or bytes-likes (sent as ``"bytes"``); on receive, read-only numpy arrays
    viewing the frames (``"bytes"`` buffers as read-only memoryviews).
    ``routing_id`` is the ROUTER peer id (not part of the header, not signed).
    """

    msg_type: str
    content: dict = field(default_factory=dict)
    buffers: list = field(default_factory=list)
    msg_id: str = field(default_factory=lambda: os.urandom(16).hex())
    session: str = ""
    server_session: str | None = None
    job_id: str | None = None
    seq: int | None = None
    time: float = field(default_factory=_time.time)
    version: str = PROTOCOL_VERSION
    routing_id: bytes | None = None
    #: meshes already decoded by ``mesh()``, by content key (validation runs once per message)
    _decoded: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def header(self, descriptors: list) -> dict:
        return {
            "msg_id": self.msg_id,
            "msg_type": self.msg_type,
            "session": self.session,
            "server_session": self.server_session,
            "job_id": self.job_id,
            "seq": self.seq,
            "time": self.time,
            "version": self.version,
            "buffers": descriptors,
        }

    def mesh(self, key: str = "mesh") -> MeshPayload | None:
        """Decode and validate ``content[key]`` against this message's buffers, or None.

        A successful decode is kept, so a second call (e.g. after a helper thread decoded it)
        costs nothing; a failed one raises ``ProtocolError`` again on every call.
        """
        meta = self.content.get(key)
        if meta is None:
            return None
        if key not in self._decoded:
            self._decoded[key] = decode_mesh(meta, self.buffers)
        return self._decoded[key]


def _frame_of(buf) -> tuple[dict, Any]:
    """Descriptor and sendable frame for one outgoing buffer."""
    if isinstance(buf, np.ndarray):
        name = buf.dtype.name
        if name not in _DTYPES:
            raise ProtocolError("bad_buffer", f"buffer dtype {buf.dtype} is not one of {BUFFER_DTYPES}")
        if len(buf.shape) > MAX_BUFFER_NDIM:
            raise ProtocolError("bad_buffer", f"buffer has {buf.ndim} dimensions (limit {MAX_BUFFER_NDIM})")
        arr = np.ascontiguousarray(buf, dtype=_DTYPES[name])
        frame = arr.data.cast("B") if arr.size else b""
        return {"dtype": name, "shape": list(arr.shape), "nbytes": arr.nbytes}, frame
    try:
        view = _as_view(buf)
    except (TypeError, ValueError) as e:
        raise ProtocolError("bad_buffer", f"buffer of type {_tname(buf)} is not bytes-like") from e
    return {"dtype": "bytes", "shape": [len(view)], "nbytes": len(view)}, view


def _check_id(value, name: str, pattern=_ID_RE, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not pattern.match(value):
        raise ProtocolError("bad_header", f"header.{name} is not a valid id: {str(value)[:40]!r}", field=name)


def _validate_header(h) -> None:
    if not isinstance(h, dict):
        raise ProtocolError("bad_header", "header must be an object")
    for name in ("msg_id", "msg_type", "session", "time", "version", "buffers"):
        if name not in h:
            raise ProtocolError("bad_header", f"header.{name} is missing", field=name)
    version = h["version"]
    if not isinstance(version, str) or not _VERSION_RE.match(version):
        raise ProtocolError("bad_header", f"header.version is malformed: {str(version)[:20]!r}", field="version")
    if not version_compatible(version):
        raise ProtocolError("version_mismatch", f"peer speaks protocol {version}, we speak {PROTOCOL_VERSION}")
    if not isinstance(h["msg_type"], str) or h["msg_type"] not in _SCHEMAS:
        raise ProtocolError("unknown_msg_type", f"unknown message type {str(h['msg_type'])[:40]!r}")
    _check_id(h["msg_id"], "msg_id")
    _check_id(h["session"], "session")
    _check_id(h.get("server_session"), "server_session", optional=True)
    _check_id(h.get("job_id"), "job_id", _JOB_ID_RE, optional=True)
    seq = h.get("seq")
    if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= 2**53):
        raise ProtocolError("bad_header", "header.seq must be null or an integer >= 0", field="seq")
    t = h["time"]
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not _finite(t):
        raise ProtocolError("bad_header", "header.time must be a finite number", field="time")
    if not isinstance(h["buffers"], list):
        raise ProtocolError("bad_header", "header.buffers must be a list", field="buffers")


def _load_buffer(i: int, desc, view: memoryview):
    if not isinstance(desc, dict):
        raise ProtocolError("bad_buffer", f"buffer {i}: descriptor must be an object")
    dtype, shape, nbytes = desc.get("dtype"), desc.get("shape"), desc.get("nbytes")
    if dtype != "bytes" and dtype not in _DTYPES:
        raise ProtocolError("bad_buffer", f"buffer {i}: dtype {str(dtype)[:20]!r} not in the whitelist")
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= (1 if dtype == "bytes" else MAX_BUFFER_NDIM)
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
    ):
        raise ProtocolError("bad_buffer", f"buffer {i}: shape must be a list of non-negative ints")
    if isinstance(nbytes, bool) or not isinstance(nbytes, int):
        raise ProtocolError("bad_buffer", f"buffer {i}: nbytes must be an integer")
    expected = 1 if dtype == "bytes" else _DTYPES[dtype].itemsize
    for s in shape:
        expected *= s  # Python ints: no overflow, nothing allocated
    if expected != nbytes or nbytes != len(view):
        raise ProtocolError(
            "bad_buffer",
            f"buffer {i}: {dtype}{shape} needs {expected} bytes, descriptor says {nbytes}, frame has {len(view)}",
        )
    if dtype == "bytes":
        return view.toreadonly()
    arr = np.frombuffer(view, dtype=_DTYPES[dtype]).reshape(shape)
    arr.flags.writeable = False
    return arr


class Session:
    """Signs, checks, serialises and parses messages for one endpoint.

    Args:
        key: shared signing key (bytes).
        session_id: this endpoint's session id (default: a fresh uuid4 hex).
        routing: True on the server's ROUTER socket: frames start with the routing id.
        replay_guard: a ``ReplayGuard``, or None to build a default one; False disables
            replay checks (tests and benchmarks only).
        max_message_bytes: most bytes in all signed frames of one message (sent or received).
        max_recv_bytes: most bytes in the signed frames of a *received* message (default
            ``max_message_bytes``; a server uses :data:`MAX_REQUEST_BYTES`). :meth:`recv` stops
            collecting a message's frames once past it and discards the rest unhashed.
    """

    def __init__(
        self,
        key: bytes,
        session_id: str | None = None,
        *,
        routing: bool = False,
        replay_guard: ReplayGuard | None | bool = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        max_recv_bytes: int | None = None,
    ):
        self.signer = Signer(key)
        self.session_id = session_id if session_id is not None else uuid.uuid4().hex
        _check_id(self.session_id, "session")
        self.routing = bool(routing)
        if replay_guard is None or replay_guard is True:
            replay_guard = ReplayGuard()
        self.replay_guard = None if replay_guard is False else replay_guard
        self.max_message_bytes = int(max_message_bytes)
        self.max_recv_bytes = int(max_recv_bytes) if max_recv_bytes is not None else self.max_message_bytes
        #: client side: the last server session seen; server side: routing id -> client session.
        self.peer_session: str | None = None
        self._client_sessions: OrderedDict[bytes, str] = OrderedDict()
        #: ZAP "User-Id" of the last message :meth:`recv` read (None without CurveZMQ)
        self.last_user_id: str | None = None

    # -- building ------------------------------------------------------------------------
    def msg(
        self,
        msg_type: str,
        content: dict | None = None,
        buffers: Sequence[Any] = (),
        *,
        job_id: str | None = None,
        seq: int | None = None,
        routing_id: bytes | None = None,
        server_session: str | None = None,
        session: str | None = None,
    ) -> Message:
        """Build a ``Message`` with this session's header fields filled in."""
        if self.routing:
            if session is not None:
                client = session
            else:
                client = self._client_sessions.get(routing_id, "") if routing_id is not None else ""
            server = self.session_id
        else:
            client = self.session_id if session is None else session
            server = server_session if server_session is not None else self.peer_session
        return Message(
            msg_type=msg_type,
            content={} if content is None else content,
            buffers=list(buffers),
            session=client,
            server_session=server,
            job_id=job_id,
            seq=seq,
            routing_id=routing_id,
        )

    def serialize(self, msg: Message) -> list:
        """Frames for ``msg`` (routing id first on a routing session). Validates the content."""
        _check_id(msg.job_id, "job_id", _JOB_ID_RE, optional=True)
        if len(msg.buffers) > MAX_BUFFERS:
            raise ProtocolError("too_large", f"{len(msg.buffers)} buffers; the limit is {MAX_BUFFERS}")
        descriptors, frames = [], []
        for buf in msg.buffers:
            desc, frame = _frame_of(buf)
            descriptors.append(desc)
            frames.append(frame)
        validate_content(msg.msg_type, msg.content, msg.job_id,
                         [b if isinstance(b, np.ndarray) else None for b in msg.buffers])
        header_obj = msg.header(descriptors)
        _validate_header(header_obj)  # a sender bug (bad id, negative seq) fails here, not at the peer
        header = dumps(header_obj)
        content = dumps(msg.content)
        if len(header) > MAX_HEADER_BYTES or len(content) > MAX_CONTENT_BYTES:
            raise ProtocolError("too_large", "header or content JSON exceeds its size limit")
        if _json_too_deep(content, MAX_JSON_DEPTH):
            raise ProtocolError("bad_content", f"content is nested deeper than {MAX_JSON_DEPTH}")
        signed = [header, content, *frames]
        total = sum(len(f) for f in signed)
        if total > self.max_message_bytes:
            raise ProtocolError("too_large", f"message is {total} bytes; the limit is {self.max_message_bytes}")
        out = [PROTOCOL_TAG, self.signer.sign(signed), *signed]
        if self.routing:
            if msg.routing_id is None:
                raise ProtocolError("bad_header", "a routing session needs msg.routing_id to send")
            out.insert(0, msg.routing_id)
        return out

    def deserialize(self, frames: Sequence[Any]) -> Message:
        """Parse and check a received multipart message (routing id first if ``routing``).

        Order: frame count, tag, sizes, signature (constant time), replay, header JSON,
        header fields, version, time window, content JSON and schema, buffers (zero-copy).
        Raises ``ProtocolError`` for everything wrong with the input, nothing else.
        """
        try:
            frames = list(frames)
        except TypeError:
            raise ProtocolError("bad_frame_count", "frames must be a sequence") from None
        off = 1 if self.routing else 0
        if not off + 4 <= len(frames) <= off + 4 + MAX_BUFFERS:
            raise ProtocolError(
                "bad_frame_count", f"got {len(frames)} frames, expected {off + 4}..{off + 4 + MAX_BUFFERS}"
            )
        try:
            views = [_as_view(f) for f in frames]
        except (TypeError, ValueError) as e:
            raise ProtocolError("bad_frame_count", f"a frame is not bytes-like: {e}") from None
        routing_id = bytes(views[0]) if self.routing else None
        tag = views[off]
        if len(tag) != len(PROTOCOL_TAG) or bytes(tag) != PROTOCOL_TAG:
            head = bytes(tag[:16])
            if head.startswith(b"CONJURE/"):
                raise ProtocolError("version_mismatch", f"peer tag {head!r}, we speak {PROTOCOL_TAG!r}")
            raise ProtocolError("bad_tag", f"frame {off} is not the protocol tag {PROTOCOL_TAG!r}")
        signed = views[off + 2:]
        if len(signed[0]) > MAX_HEADER_BYTES:
            raise ProtocolError("too_large", f"header frame is {len(signed[0])} bytes (limit {MAX_HEADER_BYTES})")
        if len(signed[1]) > MAX_CONTENT_BYTES:
            raise ProtocolError("too_large", f"content frame is {len(signed[1])} bytes (limit {MAX_CONTENT_BYTES})")
        total = sum(len(v) for v in signed)
        limit = min(self.max_message_bytes, self.max_recv_bytes)
        if total > limit:
            raise ProtocolError("too_large", f"message is {total} bytes; the limit is {limit}")
        signature = bytes(views[off + 1][:128])
        self.signer.verify(signature, signed)
        if self.replay_guard is not None:
            self.replay_guard.check_signature(signature)

        header = loads_bounded(signed[0], "header", MAX_HEADER_BYTES)
        try:
            _validate_header(header)
        except ProtocolError as exc:
            exc.request = self._answerable(header, signature, routing_id)
            raise
        if self.replay_guard is not None:
            self.replay_guard.accept(signature, float(header["time"]))
        msg_type = header["msg_type"]
        try:
            content = loads_bounded(signed[1], "content", MAX_CONTENT_BYTES)
            buffer_views = signed[2:]
            descriptors = header["buffers"]
            if len(descriptors) != len(buffer_views):
                raise ProtocolError(
                    "bad_buffer", f"header describes {len(descriptors)} buffers, message has {len(buffer_views)}"
                )
            buffers = [_load_buffer(i, d, v) for i, (d, v) in enumerate(zip(descriptors, buffer_views))]
            validate_content(msg_type, content, header.get("job_id"),
                             [b if isinstance(b, np.ndarray) else None for b in buffers])
        except ProtocolError as exc:
            # signed by a key holder with a valid header: the sender can be answered (``exc.request``)
            exc.request = Message(msg_type=msg_type, msg_id=header["msg_id"], session=header["session"],
                                  server_session=header.get("server_session"), job_id=header.get("job_id"),
                                  time=float(header["time"]), version=header["version"], routing_id=routing_id)
            if routing_id is not None:  # set exactly when self.routing
                self._remember_client(routing_id, header["session"])
            raise

        msg = Message(
            msg_type=msg_type,
            content=content,
            buffers=buffers,
            msg_id=header["msg_id"],
            session=header["session"],
            server_session=header.get("server_session"),
            job_id=header.get("job_id"),
            seq=header.get("seq"),
            time=float(header["time"]),
            version=header["version"],
            routing_id=routing_id,
        )
        if routing_id is not None:  # set exactly when self.routing
            self._remember_client(routing_id, msg.session)
        elif msg.server_session:
            self.peer_session = msg.server_session
        return msg

    def _remember_client(self, routing_id: bytes, session: str) -> None:
        book = self._client_sessions
        book[routing_id] = session
        book.move_to_end(routing_id)
        while len(book) > 10_000:
            book.popitem(last=False)

    # -- sockets -------------------------------------------------------------------------
    def send(
        self,
        socket: zmq.Socket,
        msg_type: str | Message,
        content: dict | None = None,
        buffers: Sequence[Any] = (),
        *,
        job_id: str | None = None,
        seq: int | None = None,
        routing_id: bytes | None = None,
        server_session: str | None = None,
        session: str | None = None,
        flags: int = 0,
    ) -> Message:
        """Build, sign and send a message (or send a prepared ``Message`` given as ``msg_type``).

        Buffers go out without copies (``copy=False``). Returns the sent ``Message``.
        """
        if isinstance(msg_type, Message):
            msg = msg_type
            if routing_id is not None:
                msg.routing_id = routing_id
        else:
            msg = self.msg(msg_type, content, buffers, job_id=job_id, seq=seq, routing_id=routing_id,
                           server_session=server_session, session=session)
        socket.send_multipart(self.serialize(msg), flags=flags, copy=False)
        return msg

    def recv(self, socket: zmq.Socket, flags: int = 0) -> tuple[bytes | None, Message]:
        """Receive one message: ``(routing_id or None, Message)``. Frames are not copied.

        ``zmq.Again`` (with ``flags=zmq.NOBLOCK``) passes through; a malformed message
        raises ``ProtocolError`` (the message is consumed).
        """
        frames = self._recv_frames(socket, flags)
        msg = self.deserialize(frames)
        return msg.routing_id, msg

    def _answerable(self, header, signature: bytes, routing_id) -> Message | None:
        """For a correctly signed message whose header is invalid: a content-less ``Message`` to
        answer it by, when its ``msg_id``/``session`` are usable and its time passes the replay
        guard (so a replayed bad message is not answered twice); else None."""
        if not isinstance(header, dict):
            return None
        msg_id, session, t = header.get("msg_id"), header.get("session"), header.get("time")
        if not (isinstance(msg_id, str) and _ID_RE.match(msg_id) and isinstance(session, str) and session
                and _ID_RE.match(session)):
            return None
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not _finite(t):
            return None
        if self.replay_guard is not None:
            try:
                self.replay_guard.accept(signature, float(t))
            except ProtocolError:
                return None
        job_id = header.get("job_id")
        msg_type = header.get("msg_type")
        return Message(msg_type=msg_type if isinstance(msg_type, str) else "unknown", msg_id=msg_id,
                       session=session, job_id=job_id if isinstance(job_id, str) and _JOB_ID_RE.match(job_id)
                       else None, time=float(t), routing_id=routing_id)

    def _recv_frames(self, socket, flags: int) -> list:
        """The frames of one multipart message, read one by one; once they pass
        ``max_recv_bytes`` (or the frame-count limit) the rest are read and dropped without
        being kept or hashed, and ``ProtocolError("too_large")`` is raised."""
        import zmq

        off = 1 if self.routing else 0
        max_frames = off + 4 + MAX_BUFFERS
        budget = self.max_recv_bytes + 256  # + tag and signature frames
        first = socket.recv(flags, copy=False)
        try:  # the ZAP user id (CurveZMQ: the peer's z85 public key), for servers that re-check it
            self.last_user_id = first.get("User-Id")
        except (zmq.ZMQError, AttributeError):
            self.last_user_id = None
        frames, total, over = [first], 0, None
        while socket.getsockopt(zmq.RCVMORE):
            frame = socket.recv(0, copy=False)
            if over is not None:
                continue
            total += len(frame.buffer)
            if len(frames) >= max_frames:
                over = f"more than {max_frames} frames"
            elif total > budget:
                over = f"more than {self.max_recv_bytes} bytes"
            if over is not None:
                frames = []  # freed now; the remaining frames are read and dropped
                continue
            frames.append(frame)
        if over is not None:
            raise ProtocolError("too_large", f"message has {over}; the limit is {self.max_recv_bytes} bytes")
        return frames

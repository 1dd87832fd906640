"""Texture-job uploads: read the mesh a ``submit`` carries, keep it in the job folder, run the job.

A ``submit`` with ``kind: "texture"`` carries the user's mesh (``content.mesh`` + buffers, the
same encoding as ``preview_mesh``; or, when it is larger than one request may be, ``content.upload``
naming the bytes sent before in ``upload`` pieces, kept on disk by :class:`UploadStore`) and
optionally ``base_color``. The server decodes it with
``protocol.mesh.decode_mesh`` (limits, dtypes, shapes, byte lengths checked before any array is
made; indices in range; finite values) plus ``validate_upload_mesh``, then writes it to
``<job dir>/input_mesh.npz`` before queueing, so a queued texture job survives a worker restart.

The worker process calls :func:`run_pipeline`, which dispatches on the job's kind: ``generate``
→ the pipeline module's ``run_job(params, ctx)``; ``texture`` → its ``run_texture(params, mesh,
ctx, base_color=...)`` (a pipeline without one fails the job with ``unsupported_job_kind``).
Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

from protocol.errors import ProtocolError
from protocol.mesh import MeshPayload, unpack_upload, upload_sizes, validate_upload_mesh
from protocol.messages import check_submit_upload

INPUT_MESH_FILE = "input_mesh.npz"
GENERATE = "generate"
TEXTURE = "texture"


class UnsupportedJobKindError(ValueError):
    """The server's pipeline has no entry point for this job kind."""


@dataclass
class TextureUpload:
    """A validated uploaded mesh and what identifies it (for idempotent re-submits).

    sha256: :func:`upload_key` (the mesh meta, the SHA-256 of its bytes, the base colour);
    base_color: 3 or 4 sRGB floats in 0..1, or None.
    """

    mesh: MeshPayload
    sha256: str
    base_color: list[float] | None = None

    def summary(self) -> dict:
        return {"sha256": self.sha256, "vertices": int(len(self.mesh.positions)),
                "faces": int(len(self.mesh.faces)), "uvs": self.mesh.uvs is not None,
                "texture": self.mesh.texture_rgba is not None, "base_color": self.base_color}


class UploadStore:
    """Pieces of texture-job uploads (``upload`` messages), appended to files under ``root`` until
    the ``submit`` that names them takes them.

    One upload per (client session, job id); pieces must arrive in order (``offset`` = bytes so
    far) with the same ``total`` (≤ ``MAX_UPLOAD_BYTES``, checked before anything is written).
    At most ``max_open`` uploads at once; one untouched for ``ttl_s`` seconds is dropped.
    """

    def __init__(self, root: Path, max_open: int = 8, ttl_s: float = 600.0):
        self.root = Path(root)
        self.max_open = int(max_open)
        self.ttl_s = float(ttl_s)
        self._open: dict[tuple[str, str], dict] = {}
        for stale in self.root.glob("*.part") if self.root.is_dir() else ():  # left by an earlier server
            stale.unlink(missing_ok=True)

    def _path(self, session: str, job_id: str) -> Path:
        return self.root / f"{job_id}.{session}.part"

    def expire(self, now: float | None = None) -> None:
        import time

        now = time.monotonic() if now is None else now
        for key, up in list(self._open.items()):
            if now - up["touched"] > self.ttl_s:
                self.discard(*key)

    def discard(self, session: str, job_id: str) -> None:
        self._open.pop((session, job_id), None)
        self._path(session, job_id).unlink(missing_ok=True)

    def add(self, session: str, job_id: str, offset: int, total: int, data) -> int:
        """Append one piece; returns the bytes received so far. Raises ``ProtocolError``."""
        import time

        from protocol.messages import MAX_UPLOAD_BYTES

        self.expire()
        key = (session, job_id)
        data = memoryview(data).cast("B")
        if total > MAX_UPLOAD_BYTES:
            raise ProtocolError("too_large", f"upload: {total} bytes exceed MAX_UPLOAD_BYTES={MAX_UPLOAD_BYTES}",
                                field="total")
        up = self._open.get(key)
        if offset == 0:
            if up is None and len(self._open) >= self.max_open:
                raise ProtocolError("too_many_uploads", f"the server holds {self.max_open} unfinished uploads; "
                                    "finish or wait for one", field="offset")
            self.discard(session, job_id)
            up = self._open[key] = {"total": int(total), "received": 0, "touched": time.monotonic()}
            self.root.mkdir(parents=True, exist_ok=True)
            self._path(session, job_id).write_bytes(b"")
        elif up is None:
            raise ProtocolError("bad_upload", f"upload: no upload in progress for job {job_id} (start at offset 0)",
                                field="offset")
        if total != up["total"]:
            self.discard(session, job_id)
            raise ProtocolError("bad_upload", f"upload: total changed from {up['total']} to {total}", field="total")
        if offset != up["received"]:
            self.discard(session, job_id)
            raise ProtocolError("bad_upload", f"upload: piece at offset {offset}, expected {up['received']}",
                                field="offset")
        if up["received"] + len(data) > up["total"]:
            self.discard(session, job_id)
            raise ProtocolError("bad_upload", f"upload: pieces add up to more than the announced {up['total']} bytes",
                                field="total")
        try:
            with open(self._path(session, job_id), "ab") as f:
                f.write(data)
        except OSError:
            self.discard(session, job_id)
            raise
        up["received"] += len(data)
        up["touched"] = time.monotonic()
        return up["received"]

    def take(self, session: str, job_id: str, total: int, sha256: str) -> bytes:
        """The finished upload's bytes (its SHA-256 checked); the upload is then forgotten."""
        up = self._open.get((session, job_id))
        if up is None:
            raise ProtocolError("bad_upload", f"submit: no upload was sent for job {job_id}", field="upload")
        try:
            if up["received"] != total or up["total"] != total:
                raise ProtocolError("bad_upload", f"submit: the upload has {up['received']} of {up['total']} bytes, "
                                    f"the submit names {total}", field="upload")
            data = self._path(session, job_id).read_bytes()
            if hashlib.sha256(data).hexdigest() != sha256:
                raise ProtocolError("bad_upload", "submit: the upload's SHA-256 does not match", field="upload.sha256")
            return data
        finally:
            self.discard(session, job_id)


def upload_key(meta: dict, blob_sha256: str, base_color) -> str:
    """What identifies an upload for idempotent re-submits: its meta, the SHA-256 of its bytes
    (buffers concatenated in index order) and the base colour."""
    import json

    text = json.dumps([meta, blob_sha256, None if base_color is None else [float(c) for c in base_color]],
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def read_upload(msg, store: UploadStore | None = None, existing: bool = False) -> TextureUpload | None:
    """The texture upload of a ``submit`` message, or None for a ``generate`` job.

    Its mesh travels as buffers of the submit, or (``content.upload``) as ``upload`` pieces sent
    before, taken from ``store``. With ``existing`` (the job id is known already) the pieces are not
    needed: only the key is computed, from the announced SHA-256, for the duplicate check.
    Raises ``ProtocolError`` (``bad_mesh``, ``bad_buffer``, ``too_large``, ``bad_upload``).
    """
    c = msg.content
    if check_submit_upload(c, len(msg.buffers)) != TEXTURE:
        return None
    color = c.get("base_color")
    color = None if color is None else [float(x) for x in color]
    if "upload" in c:
        announced = c["upload"]
        if existing:
            if store is not None:
                store.discard(msg.session, msg.job_id)
            return TextureUpload(None, upload_key(c["mesh"], announced["sha256"], color), color)
        if store is None:
            raise ProtocolError("bad_upload", "this server takes no separate uploads", field="upload")
        blob = store.take(msg.session, msg.job_id, announced["total"], announced["sha256"])
        mesh = validate_upload_mesh(unpack_upload(c["mesh"], blob))
        return TextureUpload(mesh, upload_key(c["mesh"], announced["sha256"], color), color)
    mesh = validate_upload_mesh(msg.mesh("mesh"))
    blob = hashlib.sha256()
    for i in range(len(upload_sizes(c["mesh"]))):
        blob.update(memoryview(msg.buffers[i]).cast("B"))
    return TextureUpload(mesh, upload_key(c["mesh"], blob.hexdigest(), color), color)


def save_upload(job_dir: Path, upload: TextureUpload) -> Path:
    """Write the uploaded mesh to ``<job_dir>/input_mesh.npz`` (tmp → rename) and return the path."""
    from .worker import write_preview_npz

    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    path = job_dir / INPUT_MESH_FILE
    write_preview_npz(path, upload.mesh)
    return path


def worker_params(params: dict, kind: str, upload_info: dict | None) -> dict:
    """The params dict sent to the worker: the generation params plus ``kind`` / ``base_color``."""
    if kind == GENERATE:
        return params
    out = dict(params, kind=kind)
    if upload_info and upload_info.get("base_color") is not None:
        out["base_color"] = list(upload_info["base_color"])
    return out


def run_pipeline(run_job, params: dict, make_params, ctx, job_dir: Path):
    """Run one job in the worker: ``run_job`` for 'generate', the module's ``run_texture`` for 'texture'."""
    params = dict(params)
    kind = params.pop("kind", GENERATE)
    base_color = params.pop("base_color", None)
    if kind == GENERATE:
        return run_job(make_params(params), ctx)
    if kind != TEXTURE:
        raise UnsupportedJobKindError(f"unknown job kind {kind!r}")
    module = sys.modules.get(getattr(run_job, "__module__", ""), None)
    run_texture = getattr(module, "run_texture", None)
    if not callable(run_texture):
        raise UnsupportedJobKindError(f"the pipeline {getattr(module, '__name__', '?')!r} cannot texture meshes "
                                      "(it has no run_texture)")
    from .worker import read_mesh_npz

    mesh = read_mesh_npz(Path(job_dir) / INPUT_MESH_FILE)
    if mesh is None:
        raise FileNotFoundError(f"the uploaded mesh {Path(job_dir) / INPUT_MESH_FILE} is missing or unreadable")
    return run_texture(make_params(params), mesh, ctx, base_color=base_color)

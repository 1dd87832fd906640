"""Texture-job uploads: read the mesh a ``submit`` carries, keep it in the job folder, run the job.

A ``submit`` with ``kind: "texture"`` carries the user's mesh (``content.mesh`` + buffers, the
same encoding as ``preview_mesh``) and optionally ``base_color``. The server decodes it with
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

from protocol.mesh import MESH_FIELDS, MeshPayload, validate_upload_mesh
from protocol.messages import check_submit_upload

INPUT_MESH_FILE = "input_mesh.npz"
GENERATE = "generate"
TEXTURE = "texture"


class UnsupportedJobKindError(ValueError):
    """The server's pipeline has no entry point for this job kind."""


@dataclass
class TextureUpload:
    """A validated uploaded mesh and what identifies it (for idempotent re-submits).

    sha256: digest over the mesh's fields (names, shapes, bytes) and the base colour;
    base_color: 3 or 4 sRGB floats in 0..1, or None.
    """

    mesh: MeshPayload
    sha256: str
    base_color: list[float] | None = None

    def summary(self) -> dict:
        return {"sha256": self.sha256, "vertices": int(len(self.mesh.positions)),
                "faces": int(len(self.mesh.faces)), "uvs": self.mesh.uvs is not None,
                "base_color": self.base_color}


def mesh_digest(mesh: MeshPayload, base_color=None) -> str:
    """SHA-256 over every present mesh field (name, shape, bytes) and the base colour."""
    import numpy as np

    h = hashlib.sha256()
    for name in MESH_FIELDS:
        value = getattr(mesh, name, None)
        if value is None:
            continue
        arr = np.frombuffer(value, np.uint8) if isinstance(value, (bytes, bytearray)) else np.asarray(value)
        h.update(f"{name}:{list(arr.shape)}:{arr.dtype.str};".encode())
        h.update(np.ascontiguousarray(arr).data)
    h.update(repr(None if base_color is None else [float(c) for c in base_color]).encode())
    return h.hexdigest()


def read_upload(msg) -> TextureUpload | None:
    """The texture upload of a ``submit`` message, or None for a ``generate`` job.

    Raises ``ProtocolError`` (``bad_mesh``, ``bad_buffer``, ``too_large``) for a malformed mesh.
    """
    if check_submit_upload(msg.content, len(msg.buffers)) != TEXTURE:
        return None
    mesh = validate_upload_mesh(msg.mesh("mesh"))
    color = msg.content.get("base_color")
    color = None if color is None else [float(c) for c in color]
    return TextureUpload(mesh, mesh_digest(mesh, color), color)


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

"""Wire views of job records: the content of ``status_reply``, ``result_ready`` and a finished
job's final event, built from a :class:`~backend.server.jobs.JobRecord` (no sockets, no worker)."""

from __future__ import annotations

import logging

from protocol import ProtocolError, encode_mesh

from . import jobs as J
from .jobs import JobRecord, JobStore
from .worker import RESULT_MESH_FILE, read_mesh_npz

log = logging.getLogger("conjure.server")


def result_content(rec: JobRecord, mesh) -> tuple[dict, tuple]:
    """``result_ready`` content + buffers: GLB name/size/SHA-256, all files, info, final mesh."""
    glb = rec.results["glb"]
    content = {"name": glb["name"], "size": glb["size"], "sha256": glb["sha256"],
               "files": [{"kind": k, **v} for k, v in rec.results.items()], "info": rec.info}
    buffers: tuple = ()
    if mesh is not None:
        try:
            meta, bufs = encode_mesh(mesh)
            content["mesh"] = meta
            buffers = tuple(bufs)
        except ProtocolError as exc:
            log.warning("result mesh of %s not sent: %s", rec.job_id, exc)
    return content, buffers


def final_event(store: JobStore, rec: JobRecord) -> tuple[str, dict, tuple]:
    """``(msg_type, content, buffers)`` of a finished job's last event, rebuilt from its record."""
    if rec.state == J.DONE:
        mesh = read_mesh_npz(store.job_dir(rec.job_id) / RESULT_MESH_FILE)
        return ("result_ready", *result_content(rec, mesh))
    if rec.state == J.CANCELLED:
        return "cancelled", {"message": "the job was cancelled", "state": "cancelled"}, ()
    err = rec.error or {"code": "failed", "message": "the job failed"}
    return "error", {"code": err.get("code", "failed"), "message": err.get("message", ""),
                     "retriable": bool(err.get("retriable", rec.state == J.INTERRUPTED)),
                     "state": rec.state, "job_state": rec.state}, ()


def status_content(rec: JobRecord, *, last_seq: int, queue_position: int | None, running=None) -> dict:
    """``status_reply`` content. ``running`` (with ``stage``, ``fraction``) is given for a running job."""
    content = {
        "state": rec.state,
        "job_state": rec.state,
        "queue_position": queue_position,
        "last_seq": last_seq,
        "params": rec.params_dict(),
        "result": {"files": [{"kind": k, **v} for k, v in rec.results.items()], "info": rec.info}
        if rec.results else None,
        "error": rec.error,
        "created": rec.created,
        "updated": rec.finished or rec.started or rec.created,
        "timings": rec.timings,
    }
    if running is not None:
        content["stage"] = running.stage or None
        content["fraction"] = min(1.0, max(0.0, running.fraction))
    if rec.state == J.DONE:
        content["fraction"] = 1.0
    return content


def list_entry(rec: JobRecord) -> dict:
    """One job of a ``jobs`` reply."""
    s = rec.summary()
    s["job_state"] = rec.state
    return s

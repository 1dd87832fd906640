"""Request handlers: one method per client message type, ``on_<msg_type>(msg)``.

A handler validates what the schema could not (job exists, state allows it, preset and
overrides fit the pipeline), changes state through the :class:`~backend.server.supervisor.JobSupervisor`
and the job store, and answers through :class:`~backend.server.streams.Delivery`. A
``ProtocolError`` raised by a handler becomes an ``error`` reply naming the field.
"""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING

from protocol import PROTOCOL_VERSION, ProtocolError, validate_params
from protocol.messages import MAX_CHUNK_BYTES, MAX_MESSAGE_BYTES, MAX_REQUEST_BYTES
from protocol.params import coerce_overrides

from . import jobs as J
from .jobs import JobRecord
from .records import list_entry, status_content
from .streams import DEFAULT_PREVIEW_CREDITS, Subscription
from .uploads import UploadStore, read_upload, save_upload
from .worker import package_versions

if TYPE_CHECKING:
    from .app import Server

#: most bytes one result_chunk carries (a client asking for more gets this much; it pulls the rest).
#: With the socket's SNDHWM this bounds what a peer that never reads can pin in the server.
MAX_FETCH_BYTES = 1 << 20
CAPABILITIES = ["attach", "fetch_result", "preview_credits", "stats", "models", "texture", "upload"]


class RequestHandlers:
    """The server's answers to client requests (see the message flow in ``app.py``)."""

    def __init__(self, server: Server):
        self.server = server
        self.store = server.store
        self.delivery = server.delivery
        self.jobs = server.supervisor
        self.config = server.config
        self.uploads = UploadStore(self.store.data_dir / "uploads")  # texture-job upload pieces

    def dispatch(self, msg) -> None:
        """Run ``on_<msg_type>``; every failure becomes an ``error`` reply to the sender."""
        handler = getattr(self, f"on_{msg.msg_type}", None)
        d = self.delivery
        if handler is None:
            d.error(msg.session, "unexpected_msg_type", f"the server does not accept {msg.msg_type!r} messages",
                    job_id=msg.job_id, in_reply_to=msg.msg_id)
            return
        try:
            handler(msg)
        except ProtocolError as exc:
            d.error(msg.session, exc.code, exc.message, job_id=msg.job_id, in_reply_to=msg.msg_id, field=exc.field)
        except Exception as exc:
            import logging

            logging.getLogger("conjure.server").exception("handler for %s failed", msg.msg_type)
            d.error(msg.session, "internal_error", f"{type(exc).__name__}: {exc}", job_id=msg.job_id,
                    in_reply_to=msg.msg_id, retriable=True)

    # ------------------------------------------------------------------ helpers
    def _grant(self, msg, sub: Subscription | None) -> None:
        credits = msg.content.get("preview_credits")
        if sub is None or credits is None:
            return
        if isinstance(credits, bool) or not isinstance(credits, int) or credits < 0:
            raise ProtocolError("bad_content", "preview_credits must be a non-negative integer",
                                field="preview_credits")
        self.delivery.grant(msg.session, sub, credits)

    def _job_or_error(self, msg) -> JobRecord | None:
        """The record of ``msg.job_id``, or None after answering the sender with ``unknown_job``."""
        rec = self.store.get(msg.job_id)
        if rec is None:
            self.delivery.error(msg.session, "unknown_job", f"no job {msg.job_id}", job_id=msg.job_id,
                                in_reply_to=msg.msg_id)
        return rec

    def hello_content(self) -> dict:
        """The ``hello_reply`` content: versions, limits, presets, capabilities (one place to extend)."""
        try:
            from backend.pipeline.presets import preset_names

            presets = preset_names()
        except Exception:
            presets = []
        from backend.models.info import safe_hello_model_fields

        cfg = self.config
        return {
            **safe_hello_model_fields(),
            "protocol_version": PROTOCOL_VERSION,
            "server_version": self.server.version,
            "limits": {"queue_limit": self.jobs.queue.limit, "max_chunk_bytes": MAX_CHUNK_BYTES,
                       "max_message_bytes": MAX_MESSAGE_BYTES, "max_fetch_bytes": MAX_FETCH_BYTES,
                       "max_request_bytes": MAX_REQUEST_BYTES,
                       "preview_credits": DEFAULT_PREVIEW_CREDITS,
                       "event_log": cfg.log_limit, "cancel_timeout_s": cfg.cancel_timeout},
            "presets": presets,
            "capabilities": list(CAPABILITIES),
            "server_session": self.server.session_id,
            "pipeline": cfg.pipeline,
        }

    # ------------------------------------------------------------------ handlers
    def on_hello(self, msg):
        from protocol import version_compatible

        if not version_compatible(msg.content.get("protocol_version", "")):
            self.delivery.error(msg.session, "version_mismatch",
                                f"client speaks protocol {msg.content.get('protocol_version')}, "
                                f"server {PROTOCOL_VERSION}", in_reply_to=msg.msg_id)
            return
        self.delivery.send(msg.session, "hello_reply", self.hello_content())

    def on_list_models(self, msg):
        from backend.models.pulls import models_reply

        self.delivery.send(msg.session, "models", models_reply())

    def on_pull_model(self, msg):
        from backend.models.pulls import start_pull_or_protocol_error

        self.delivery.send(msg.session, "models", start_pull_or_protocol_error(msg.content["model_id"]))

    def on_ping(self, msg):
        content = {"server_time": time.time(), "stats": self.server.stats_snapshot()}
        if "token" in msg.content:
            content["token"] = msg.content["token"]
        self.delivery.send(msg.session, "pong", content)

    def on_submit(self, msg):
        d = self.delivery
        job_id = msg.job_id
        params = validate_params(msg.content["params"])
        rec = self.store.get(job_id)
        # texture jobs: the mesh, validated (ProtocolError -> error reply); see uploads.py
        upload = read_upload(msg, self.uploads, existing=rec is not None)
        if rec is not None:
            same = (rec.prompt == params.prompt and rec.negative_prompt == params.negative_prompt
                    and rec.preset == params.preset and rec.overrides == params.overrides
                    and (params.seed is None or params.seed == rec.seed)
                    and (rec.upload or {}).get("sha256") == (upload.sha256 if upload else None))
            if not same:
                d.error(msg.session, "job_id_conflict",
                        f"job {job_id} already exists with other parameters; use a new job id",
                        job_id=job_id, in_reply_to=msg.msg_id)
                return
            d.send(msg.session, "accepted", {"queue_position": self.jobs.position(job_id) or 0,
                                             "state": rec.state, "duplicate": True}, job_id=job_id)
            stream = d.ensure_stream(rec)
            sub = d.subscription(job_id, msg.session)
            if sub is None:
                sub = d.subscribe(job_id, msg.session, stream.first_seq - 1)
            self._grant(msg, sub)
            return
        queue = self.jobs.queue
        if queue.full():
            d.error(msg.session, "queue_full", f"the queue holds {len(queue)} jobs (limit {queue.limit}); "
                    "try again later", job_id=job_id, retriable=True, in_reply_to=msg.msg_id)
            return
        try:  # every pipeline: known keys typed and in their documented range, no file paths
            coerce_overrides(params.overrides, unknown="keep")
        except ProtocolError as exc:
            d.error(msg.session, "invalid_params", exc.message, job_id=job_id, in_reply_to=msg.msg_id,
                    field=exc.field)
            return
        try:
            self.server.check_params(params.preset, params.overrides)
        except ValueError as exc:
            d.error(msg.session, "invalid_params", str(exc), job_id=job_id, in_reply_to=msg.msg_id, field="params")
            return
        seed = params.seed if params.seed is not None else random.randrange(2**31)
        rec = JobRecord(job_id=job_id, prompt=params.prompt, negative_prompt=params.negative_prompt, seed=seed,
                        preset=params.preset, overrides=dict(params.overrides), pipeline=self.config.pipeline,
                        versions=package_versions())
        if upload is not None:
            rec.kind, rec.upload = "texture", upload.summary()
        try:
            self.store.add(rec)
            if upload is not None:
                save_upload(self.store.job_dir(job_id), upload)
        except OSError as exc:  # full disk: refuse the job, keep nothing of it
            self.store.remove(job_id)
            full = J.is_disk_full(exc)
            d.error(msg.session, "disk_full" if full else "storage_error",
                    ("the disk holding the data directory is full; free some space and submit again" if full
                     else f"the data directory cannot be written: {exc.strerror or exc}"),
                    job_id=job_id, retriable=True, in_reply_to=msg.msg_id)
            return
        ahead = self.jobs.enqueue(rec)
        stream = d.new_stream(job_id)
        sub = d.subscribe(job_id, msg.session, 0)
        self._grant(msg, sub)
        d.append(rec, stream, "accepted", {"queue_position": ahead, "state": "queued"})
        self.jobs.maybe_start()

    def on_upload(self, msg):
        """One piece of a texture job's mesh upload (see ``uploads.UploadStore``) -> ``upload_ack``."""
        try:
            received = self.uploads.add(msg.session, msg.job_id, msg.content["offset"], msg.content["total"],
                                        msg.buffers[0])
        except OSError as exc:
            full = J.is_disk_full(exc)
            self.delivery.error(msg.session, "disk_full" if full else "storage_error",
                                "the disk holding the data directory is full" if full
                                else f"the upload cannot be stored: {exc.strerror or exc}",
                                job_id=msg.job_id, retriable=True, in_reply_to=msg.msg_id)
            return
        self.delivery.send(msg.session, "upload_ack", {"received": received, "total": msg.content["total"]},
                           job_id=msg.job_id)

    def on_cancel(self, msg):
        d = self.delivery
        job_id = msg.job_id
        rec = self._job_or_error(msg)
        if rec is None:
            return
        follows = d.subscription(job_id, msg.session) is not None  # it gets the stream's cancelled event
        if rec.state == J.QUEUED:
            self.jobs.cancel_queued(rec)
            if not follows:
                d.send(msg.session, "cancelled", {"message": "cancelled before it started", "state": "cancelled"},
                       job_id=job_id)
        elif rec.state == J.RUNNING and self.jobs.running_job(job_id) is not None:
            if not self.jobs.request_cancel(rec):
                d.send(msg.session, "cancelled", {"message": "already cancelling", "state": "cancelling"},
                       job_id=job_id)
            elif not follows:
                d.send(msg.session, "cancelled", {"message": "cancel requested; the job stops at its next step",
                                                  "state": "cancelling"}, job_id=job_id)
        elif rec.state == J.CANCELLED:
            d.send(msg.session, "cancelled", {"message": "already cancelled", "state": "cancelled"}, job_id=job_id)
        else:
            d.error(msg.session, "not_cancellable", f"job {job_id} already ended ({rec.state})",
                    job_id=job_id, in_reply_to=msg.msg_id)

    def on_status(self, msg):
        rec = self._job_or_error(msg)
        if rec is None:
            return
        self._grant(msg, self.delivery.subscription(msg.job_id, msg.session))
        self.delivery.send(msg.session, "status_reply", self.status_of(rec), job_id=rec.job_id)

    def status_of(self, rec: JobRecord) -> dict:
        stream = self.delivery.streams.get(rec.job_id)
        return status_content(rec, last_seq=stream.last_seq if stream else rec.last_seq,
                              queue_position=self.jobs.position(rec.job_id),
                              running=self.jobs.running_job(rec.job_id))

    def on_list_jobs(self, msg):
        limit = msg.content.get("limit", 100)
        states = msg.content.get("states")
        recs = sorted(self.store.list(), key=lambda r: r.created, reverse=True)
        out = []
        for rec in recs:
            if states and rec.state not in states:
                continue
            out.append(list_entry(rec))
            if len(out) >= limit:
                break
        self.delivery.send(msg.session, "jobs", {"jobs": out})

    def on_delete_job(self, msg):
        """Remove a finished job (record, folder, stream); answers ``job_deleted``."""
        rec = self._job_or_error(msg)
        if rec is None:
            return
        if rec.state in J.ACTIVE_STATES:
            self.delivery.error(msg.session, "not_deletable", f"job {rec.job_id} is {rec.state}; cancel it first",
                                job_id=rec.job_id, in_reply_to=msg.msg_id)
            return
        self.store.delete(rec.job_id)
        self.delivery.streams.pop(rec.job_id, None)
        self.delivery.subs.pop(rec.job_id, None)
        self.delivery.send(msg.session, "job_deleted", {}, job_id=rec.job_id)

    def on_attach(self, msg):
        rec = self._job_or_error(msg)
        if rec is None:
            return
        d = self.delivery
        stream = d.ensure_stream(rec)
        from_seq = msg.content["from_seq"]
        cursor = max(0, min(from_seq - 1, stream.last_seq))
        sub = d.subscribe(rec.job_id, msg.session, cursor)
        if cursor < stream.first_seq - 1:
            sub.missed += stream.first_seq - 1 - cursor
            sub.cursor = stream.first_seq - 1
        self._grant(msg, sub)

    def on_fetch_result(self, msg):
        d = self.delivery
        rec = self._job_or_error(msg)
        if rec is None:
            return
        if rec.state != J.DONE:
            d.error(msg.session, "not_ready", f"job {msg.job_id} has no result (state {rec.state})",
                    job_id=msg.job_id, in_reply_to=msg.msg_id, retriable=rec.state in J.ACTIVE_STATES)
            return
        name = msg.content.get("name") or rec.results["glb"]["name"]
        info = next((v for v in rec.results.values() if v["name"] == name), None)
        if info is None:
            d.error(msg.session, "unknown_file", f"job {msg.job_id} has no file {name!r}; it has "
                    + ", ".join(v["name"] for v in rec.results.values()), job_id=msg.job_id,
                    in_reply_to=msg.msg_id, field="name")
            return
        offset, length = msg.content["offset"], min(msg.content["length"], MAX_FETCH_BYTES)
        if offset > info["size"]:
            d.error(msg.session, "bad_offset", f"offset {offset} is past the end ({info['size']} bytes)",
                    job_id=msg.job_id, in_reply_to=msg.msg_id, field="offset")
            return
        path = self.store.result_dir(rec.job_id) / info["name"]
        msg_id = msg.msg_id

        def chunk():  # read when the peer's pipe takes it (a peer that does not read pins no file data)
            try:
                with open(path, "rb") as f:
                    f.seek(offset)
                    data = f.read(length)
            except OSError as exc:
                return "error", {"code": "result_missing", "message": f"cannot read {info['name']}: "
                                 f"{exc.strerror or exc}", "retriable": False, "in_reply_to": msg_id}, ()
            return "result_chunk", {"name": name, "offset": offset, "size": info["size"],
                                    "eof": offset + len(data) >= info["size"], "sha256": info["sha256"]}, (data,)

        d.send_lazy(msg.session, chunk, job_id=rec.job_id)

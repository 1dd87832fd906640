"""The backend server: one ROUTER socket, a control loop that always answers, one worker process.

The control loop never runs pipeline code. It polls the ROUTER socket and the worker's pipe
(``zmq.Poller`` with a short timeout), so ping / status / cancel / list_jobs / attach are
answered within milliseconds even while a job saturates the CPU or GPU in the worker.

Message flow (protocol message types, see ``protocol/messages.py``):

- ``hello`` -> ``hello_reply`` (versions, limits, presets, capabilities).
- ``ping`` -> ``pong`` (``server_time``, plus ``stats``: uptime, queue, worker, message counters,
  dropped messages by error code).
- ``submit`` [job_id] -> events of that job, numbered by ``seq`` 1, 2, ... without gaps:
  ``accepted`` (queue_position = jobs ahead), ``progress``..., ``result_ready`` (GLB name, size,
  SHA-256, all files, final mesh) | ``error`` | ``cancelled``. A repeated submit with the same
  job id and params answers ``accepted`` with ``duplicate: true`` (seq null) and re-subscribes
  the sender from seq 1. Optional content field ``preview_credits`` (int).
- ``preview_mesh`` messages are outside the numbered stream (header ``seq`` null, content
  ``preview_no`` and ``after_seq``): only the latest preview is kept, and one is sent only while
  the client holds preview credits (each preview spends one). Credits: ``preview_credits`` in
  ``submit`` / ``attach`` / ``status`` content *adds* credits (max 64). A client that never
  grants credits starts with 2 and gets 1 back per second while it is seen alive (any message
  in the last 5 s), so old clients still see previews at a bounded rate.
- ``cancel`` [job_id] -> ``cancelled`` at once (in the job's stream). A queued job is dropped;
  a running one stops at the pipeline's next ``check_cancel``; if the worker has not stopped
  within ``cancel_timeout`` seconds it is killed and restarted.
- ``status`` [job_id] -> ``status_reply``; ``list_jobs`` -> ``jobs``.
- ``attach`` [job_id] {from_seq} -> the job's events with seq >= from_seq (events older than the
  bounded log are reported in ``missed`` of an ``error``-free ``status_reply`` first), then live.
  After a server restart, finished jobs still answer with their final event.
- ``fetch_result`` [job_id] {name?, offset, length} -> one ``result_chunk`` (name, offset, size,
  eof, sha256) with the bytes; the client pulls chunk by chunk and checks the SHA-256 from
  ``result_ready`` / ``status_reply.result``.
- Every reply carries the server's session id in the header (``server_session``): a client that
  sees it change knows the server restarted. Malformed, forged, unsigned and replayed messages
  are dropped and counted (``stats.dropped`` in ``pong``).

Job states on the wire are the protocol's ``JOB_STATES``; a job interrupted by a server
restart is reported as ``interrupted`` when the protocol knows that state, else as ``failed``
with ``error.code == "interrupted"``.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import signal
import sys
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from backend import __version__
from protocol import (
    JOB_STATES,
    PROTOCOL_VERSION,
    ConnectionInfo,
    ProtocolError,
    Session,
    encode_mesh,
    new_key,
    validate_params,
    write_connection_file,
)
from protocol.messages import MAX_CHUNK_BYTES, MAX_MESSAGE_BYTES

from . import jobs as J
from .jobs import DataDirError, JobQueue, JobRecord, JobStore
from .preflight import params_checker
from .security import CurveKeys, SecurityError, apply_server_curve, check_bind, start_authenticator
from .streams import (
    DEFAULT_LOG_LIMIT,
    DEFAULT_PREVIEW_CREDITS,
    JobStream,
    Subscription,
)
from .uploads import read_upload, save_upload, worker_params
from .worker import (
    DEFAULT_PIPELINE,
    PipelineSpecError,
    WorkerDied,
    WorkerHandle,
    package_versions,
    read_mesh_npz,
)

log = logging.getLogger("conjure.server")

SERVER_VERSION = __version__  # one version source: pyproject.toml
KEEP_FINISHED_STREAMS = 16
CLIENT_FORGET_S = 3600.0
LEGACY_REFILL_S = 1.0
LEGACY_ALIVE_S = 5.0
OUTBOX_LIMIT = 256
#: most bytes one result_chunk carries (a client asking for more gets this much; it pulls the rest)
MAX_FETCH_BYTES = 4 << 20
#: longest progress / error text forwarded (the protocol allows 4096 characters)
MAX_TEXT = 2000


class ServerStartError(Exception):
    """The server cannot start; the message says why and what to do."""


@dataclass
class ServerConfig:
    """Options of ``conjure-backend serve`` (see ``backend/cli.py`` for their help texts)."""

    data_dir: Path = field(default_factory=J.default_data_dir)
    connection_file: Path | None = None
    ip: str = "127.0.0.1"
    port: int = 0
    advertise_ip: str | None = None
    pipeline: str = DEFAULT_PIPELINE
    preset: str | None = None
    queue_limit: int = 16
    cancel_timeout: float = 5.0
    curve_keys: Path | None = None
    log_limit: int = DEFAULT_LOG_LIMIT
    worker_start_timeout: float = 300.0
    key: bytes | None = None


@dataclass
class Client:
    routing_id: bytes
    last_seen: float
    explicit_credits: bool = False
    last_refill: float = 0.0
    outbox: deque = field(default_factory=deque)


@dataclass
class Running:
    job_id: str
    job_no: int
    started: float
    stage: str = ""
    stage_started: float = 0.0
    fraction: float = 0.0
    cancel_requested: float | None = None
    checkpointed_seq: int = 0


def wire_state(state: str) -> str:
    if state in JOB_STATES:
        return state
    return "failed"


class Server:
    """Build with a :class:`ServerConfig`, call :meth:`start` (binds, starts the worker, writes the
    connection file), then :meth:`serve_forever` until :meth:`stop` or SIGINT/SIGTERM."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.session_id = uuid.uuid4().hex
        self.started_at = time.time()
        self.store = JobStore(config.data_dir)
        self.queue = JobQueue(config.queue_limit)
        self.streams: OrderedDict[str, JobStream] = OrderedDict()
        self.subs: dict[str, dict[str, Subscription]] = {}
        self.clients: dict[str, Client] = {}
        self.running: Running | None = None
        self.job_no = 0
        self.worker: WorkerHandle | None = None
        self._worker_fd = None
        self.stats = {"received": 0, "sent": 0, "dropped": {}, "send_again": 0, "clients_gone": 0,
                      "worker_restarts": 0, "jobs_done": 0, "jobs_failed": 0, "jobs_cancelled": 0,
                      "outbox_overflow": 0, "unsendable": 0, "previews_sent": 0, "previews_replaced": 0}
        self._stop = False
        self.ctx: zmq.Context | None = None
        self.sock: zmq.Socket | None = None
        self.auth = None
        self.curve: CurveKeys | None = None
        self.connection_file: Path | None = None
        self.url = ""
        self._check_params = None
        self._dirty: set[str] = set()  # job ids whose subscribers may have something to send
        self._restart_at: float | None = None  # delayed worker restart after failed starts
        self._backlog: deque = deque()  # worker messages read but not handled yet
        self._failed_starts = 0
        self._last_trim = 0.0

    # ------------------------------------------------------------------ start / stop
    def start(self) -> ConnectionInfo:
        cfg = self.config
        if cfg.curve_keys is not None:
            from .security import load_curve_keys

            try:
                self.curve = load_curve_keys(cfg.curve_keys)
            except SecurityError as exc:
                raise ServerStartError(str(exc)) from exc
        try:
            check_bind(cfg.ip, self.curve)
        except SecurityError as exc:
            raise ServerStartError(str(exc)) from exc
        try:
            self._check_params = params_checker(cfg.pipeline)
        except Exception as exc:  # noqa: BLE001 - import errors of a user-given module
            raise ServerStartError(f"cannot load the pipeline {cfg.pipeline!r}: {type(exc).__name__}: {exc}") from exc
        if cfg.preset is not None:
            try:
                self._check_params(cfg.preset, {})
            except ValueError as exc:
                raise ServerStartError(f"preset {cfg.preset!r} cannot run here: {exc}") from exc
        try:
            self.store.open()
        except DataDirError as exc:
            raise ServerStartError(str(exc)) from exc
        for job_id in self.store.recovered_interrupted:
            log.warning("job %s was interrupted by the previous server's exit", job_id)

        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.SNDHWM, 1000)
        self.sock.setsockopt(zmq.RCVHWM, 1000)
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES + (1 << 20))
        if self.curve is not None:
            self.auth = start_authenticator(self.ctx, self.curve)
            apply_server_curve(self.sock, self.curve)
        host = f"[{cfg.ip}]" if ":" in cfg.ip else cfg.ip
        if ":" in cfg.ip:
            self.sock.setsockopt(zmq.IPV6, 1)
        endpoint = f"tcp://{host}:{cfg.port if cfg.port else '*'}"
        try:
            self.sock.bind(endpoint)
        except zmq.ZMQError as exc:
            self._close_socket()
            self.store.close()
            if exc.errno == errno.EADDRINUSE:
                raise ServerStartError(f"port {cfg.port} on {cfg.ip} is already in use; pick another with "
                                       "--port, or --port 0 for a free one") from exc
            raise ServerStartError(f"cannot bind {endpoint}: {exc}") from exc
        self.url = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        port = int(self.url.rsplit(":", 1)[1])

        self.worker = WorkerHandle(cfg.pipeline)
        self.worker.start()
        try:
            self.worker.wait_ready(cfg.worker_start_timeout)
        except (PipelineSpecError, WorkerDied, TimeoutError, RuntimeError) as exc:
            self.worker.kill()
            self._close_socket()
            self.store.close()
            raise ServerStartError(f"the worker could not start the pipeline {cfg.pipeline!r}: {exc}") from exc

        key = cfg.key or new_key()
        self.session = Session(key, self.session_id, routing=True)
        advertise = cfg.advertise_ip or (cfg.ip if cfg.ip not in ("0.0.0.0", "::") else _hostname())
        info = ConnectionInfo("tcp", advertise, port, key, PROTOCOL_VERSION,
                              server_public_key=self.curve.public.decode() if self.curve else None)
        from protocol import default_connection_path

        path = Path(cfg.connection_file) if cfg.connection_file else default_connection_path()
        try:
            self.connection_file = write_connection_file(path, info)
        except OSError as exc:
            self.shutdown()
            raise ServerStartError(f"cannot write the connection file {path}: {exc.strerror or exc}") from exc
        return info

    def _close_socket(self):
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None
        if self.auth is not None:
            self.auth.stop()
            self.auth = None
        if self.ctx is not None:
            self.ctx.term()
            self.ctx = None

    def stop(self, *_):
        self._stop = True

    def shutdown(self) -> None:
        """Stop the worker (a running job becomes ``interrupted``), close sockets, remove the
        connection file."""
        if self.running is not None:
            rec = self.store.get(self.running.job_id)
            if rec is not None and rec.state == J.RUNNING:
                rec.error = {"code": "interrupted", "message": "the server was stopped while the job ran"}
                self.store.set_state(rec, J.INTERRUPTED)
            self.running = None
        for job_id in self.queue.ids():
            rec = self.store.get(job_id)
            if rec is not None:
                rec.error = {"code": "interrupted", "message": "the server was stopped while the job was queued"}
                self.store.set_state(rec, J.INTERRUPTED)
        if self.worker is not None:
            self.worker.stop(2.0)
        self._close_socket()
        self.store.close()
        if self.connection_file is not None:
            try:
                self.connection_file.unlink()
            except OSError:
                pass

    # ------------------------------------------------------------------ loop
    def serve_forever(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        self._worker_fd = self.worker.fileno()
        poller.register(self._worker_fd, zmq.POLLIN)
        try:
            while not self._stop:
                timeout = 0 if self._backlog else 5 if self._dirty else 100
                try:
                    ready = dict(poller.poll(timeout))
                except zmq.ZMQError as exc:
                    if exc.errno == errno.EINTR:
                        continue
                    raise
                if self.sock in ready:
                    self._handle_incoming()
                self._pump_worker(poller)
                self._flush()
                self._timers(poller)
        finally:
            self.shutdown()

    # ------------------------------------------------------------------ sending
    def _send(self, client_id: str, msg_type: str, content: dict, buffers=(), *, job_id=None, seq=None,
              direct: bool = True) -> str:
        """Send to a client (by session id). Returns 'ok', 'again' (its pipe is full) or 'gone'.

        ``direct`` replies that cannot go out now are kept in a small per-client outbox.
        """
        client = self.clients.get(client_id)
        if client is None:
            return "gone"
        if direct and client.outbox:
            return self._queue_direct(client, msg_type, content, buffers, job_id, seq)
        try:
            self.session.send(self.sock, msg_type, content, buffers, job_id=job_id, seq=seq,
                              routing_id=client.routing_id, session=client_id, flags=zmq.NOBLOCK)
        except ProtocolError as exc:  # our own message does not fit the schema: a bug, not a client's fault
            log.error("cannot send %s to %s: %s", msg_type, client_id, exc)
            self.stats["unsendable"] += 1
            return "skip"
        except zmq.Again:
            self.stats["send_again"] += 1
            if direct:
                return self._queue_direct(client, msg_type, content, buffers, job_id, seq)
            return "again"
        except zmq.ZMQError as exc:
            if exc.errno == errno.EHOSTUNREACH:
                self._client_gone(client_id)
                return "gone"
            raise
        self.stats["sent"] += 1
        return "ok"

    def _queue_direct(self, client, msg_type, content, buffers, job_id, seq) -> str:
        if len(client.outbox) >= OUTBOX_LIMIT:
            self.stats["outbox_overflow"] += 1
            return "again"
        client.outbox.append((msg_type, content, tuple(buffers), job_id, seq))
        return "again"

    def _flush_outbox(self, client_id: str, client: Client) -> bool:
        """Send queued direct replies; True when the outbox is empty."""
        while client.outbox:
            msg_type, content, buffers, job_id, seq = client.outbox[0]
            try:
                self.session.send(self.sock, msg_type, content, buffers, job_id=job_id, seq=seq,
                                  routing_id=client.routing_id, session=client_id, flags=zmq.NOBLOCK)
            except ProtocolError as exc:
                log.error("cannot send %s to %s: %s", msg_type, client_id, exc)
                self.stats["unsendable"] += 1
            except zmq.Again:
                return False
            except zmq.ZMQError as exc:
                if exc.errno == errno.EHOSTUNREACH:
                    self._client_gone(client_id)
                    return False
                raise
            client.outbox.popleft()
            self.stats["sent"] += 1
        return True

    def _client_gone(self, client_id: str) -> None:
        """The client's socket disconnected: drop its subscriptions (jobs go on, results persist)."""
        self.stats["clients_gone"] += 1
        client = self.clients.pop(client_id, None)
        if client is not None:
            client.outbox.clear()
        for subs in self.subs.values():
            subs.pop(client_id, None)

    def _error(self, client_id, code, message, *, job_id=None, retriable=False, in_reply_to=None, field=None):
        content = {"code": code, "message": message, "retriable": retriable}
        if in_reply_to:
            content["in_reply_to"] = in_reply_to
        if field:
            content["field"] = field
        self._send(client_id, "error", content, job_id=job_id)

    # ------------------------------------------------------------------ incoming
    def _handle_incoming(self, budget: int = 500) -> None:
        for _ in range(budget):
            try:
                rid, msg = self.session.recv(self.sock, zmq.NOBLOCK)
            except zmq.Again:
                return
            except ProtocolError as exc:
                d = self.stats["dropped"]
                d[exc.code] = d.get(exc.code, 0) + 1
                continue
            self.stats["received"] += 1
            now = time.monotonic()
            client = self.clients.get(msg.session)
            if client is None:
                client = self.clients[msg.session] = Client(rid, now, last_refill=now)
            client.routing_id = rid
            client.last_seen = now
            handler = getattr(self, f"_on_{msg.msg_type}", None)
            if handler is None:
                self._error(msg.session, "unexpected_msg_type",
                            f"the server does not accept {msg.msg_type!r} messages", job_id=msg.job_id,
                            in_reply_to=msg.msg_id)
                continue
            try:
                handler(msg)
            except ProtocolError as exc:
                self._error(msg.session, exc.code, exc.message, job_id=msg.job_id, in_reply_to=msg.msg_id,
                            field=exc.field)
            except Exception as exc:  # noqa: BLE001 - a bug in one handler must not stop the server
                log.exception("handler for %s failed", msg.msg_type)
                self._error(msg.session, "internal_error", f"{type(exc).__name__}: {exc}", job_id=msg.job_id,
                            in_reply_to=msg.msg_id, retriable=True)

    def _grant(self, msg, sub: Subscription | None) -> None:
        credits = msg.content.get("preview_credits")
        if sub is None or credits is None:
            return
        if isinstance(credits, bool) or not isinstance(credits, int) or credits < 0:
            raise ProtocolError("bad_content", "preview_credits must be a non-negative integer",
                                field="preview_credits")
        self.clients[msg.session].explicit_credits = True
        sub.grant(credits)
        self._dirty.add(sub.job_id)

    def _subscribe(self, job_id: str, client_id: str, cursor: int) -> Subscription:
        subs = self.subs.setdefault(job_id, {})
        sub = subs.get(client_id)
        if sub is None:
            sub = subs[client_id] = Subscription(job_id, client_id, cursor=cursor)
        else:
            sub.cursor = cursor
        self._dirty.add(job_id)
        return sub

    def _on_hello(self, msg):
        from protocol import version_compatible

        if not version_compatible(msg.content.get("protocol_version", "")):
            self._error(msg.session, "version_mismatch",
                        f"client speaks protocol {msg.content.get('protocol_version')}, server {PROTOCOL_VERSION}",
                        in_reply_to=msg.msg_id)
            return
        try:
            from backend.pipeline.presets import preset_names

            presets = preset_names()
        except Exception:  # noqa: BLE001
            presets = []
        self._send(msg.session, "hello_reply", {
            "protocol_version": PROTOCOL_VERSION,
            "server_version": SERVER_VERSION,
            "limits": {"queue_limit": self.queue.limit, "max_chunk_bytes": MAX_CHUNK_BYTES,
                       "max_message_bytes": MAX_MESSAGE_BYTES, "max_fetch_bytes": MAX_FETCH_BYTES,
                       "preview_credits": DEFAULT_PREVIEW_CREDITS,
                       "event_log": self.config.log_limit, "cancel_timeout_s": self.config.cancel_timeout},
            "presets": presets,
            "capabilities": ["attach", "fetch_result", "preview_credits", "stats"],
            "server_session": self.session_id,
            "pipeline": self.config.pipeline,
        })

    def _on_ping(self, msg):
        content = {"server_time": time.time(), "stats": self.stats_snapshot()}
        if "token" in msg.content:
            content["token"] = msg.content["token"]
        self._send(msg.session, "pong", content)

    def stats_snapshot(self) -> dict:
        running = self.running
        return {
            "server_session": self.session_id,
            "uptime_s": round(time.time() - self.started_at, 3),
            "queue": len(self.queue),
            "running": running.job_id if running else None,
            "worker_pid": self.worker.pid if self.worker else None,
            "worker_ready": bool(self.worker and self.worker.ready),
            "clients": len(self.clients),
            "streams": len(self.streams),
            "rss_bytes": _rss_bytes(),
            **{k: (dict(v) if isinstance(v, dict) else v) for k, v in self.stats.items()},
        }

    def _on_submit(self, msg):
        job_id = msg.job_id
        params = validate_params(msg.content["params"])
        upload = read_upload(msg)  # texture jobs: the mesh, validated (ProtocolError -> error reply)
        rec = self.store.get(job_id)
        if rec is not None:
            same = (rec.prompt == params.prompt and rec.negative_prompt == params.negative_prompt
                    and rec.preset == params.preset and rec.overrides == params.overrides
                    and (params.seed is None or params.seed == rec.seed)
                    and (rec.upload or {}).get("sha256") == (upload.sha256 if upload else None))
            if not same:
                self._error(msg.session, "job_id_conflict",
                            f"job {job_id} already exists with other parameters; use a new job id",
                            job_id=job_id, in_reply_to=msg.msg_id)
                return
            self._send(msg.session, "accepted", {"queue_position": self._position(job_id) or 0,
                                                 "state": wire_state(rec.state), "duplicate": True},
                       job_id=job_id)
            self._ensure_stream(rec)
            sub = self.subs.get(job_id, {}).get(msg.session)
            if sub is None:
                sub = self._subscribe(job_id, msg.session, self.streams[job_id].first_seq - 1)
            self._grant(msg, sub)
            return
        if self.queue.full():
            self._error(msg.session, "queue_full",
                        f"the queue holds {len(self.queue)} jobs (limit {self.queue.limit}); try again later",
                        job_id=job_id, retriable=True, in_reply_to=msg.msg_id)
            return
        try:
            self._check_params(params.preset, params.overrides)
        except ValueError as exc:
            self._error(msg.session, "invalid_params", str(exc), job_id=job_id, in_reply_to=msg.msg_id,
                        field="params")
            return
        seed = params.seed if params.seed is not None else random.randrange(2**31)
        rec = JobRecord(job_id=job_id, prompt=params.prompt, negative_prompt=params.negative_prompt, seed=seed,
                        preset=params.preset, overrides=dict(params.overrides), pipeline=self.config.pipeline,
                        versions=package_versions())
        if upload is not None:
            rec.kind, rec.upload = "texture", upload.summary()
            save_upload(self.store.job_dir(job_id), upload)
        self.store.add(rec)
        ahead = len(self.queue) + (1 if self.running else 0)
        self.queue.push(job_id)
        stream = self._new_stream(job_id)
        sub = self._subscribe(job_id, msg.session, 0)
        self._grant(msg, sub)
        self._append(rec, stream, "accepted", {"queue_position": ahead, "state": "queued"})
        self._maybe_start()

    def _position(self, job_id) -> int | None:
        if self.running and self.running.job_id == job_id:
            return 0
        pos = self.queue.position(job_id)
        if pos is None:
            return None
        return pos - 1 + (1 if self.running else 0)

    def _job_or_error(self, msg) -> JobRecord | None:
        """The record of ``msg.job_id``, or None after answering the sender with ``unknown_job``."""
        rec = self.store.get(msg.job_id)
        if rec is None:
            self._error(msg.session, "unknown_job", f"no job {msg.job_id}", job_id=msg.job_id,
                        in_reply_to=msg.msg_id)
        return rec

    def _on_cancel(self, msg):
        job_id = msg.job_id
        rec = self._job_or_error(msg)
        if rec is None:
            return
        if rec.state == J.QUEUED:
            self.queue.remove(job_id)
            self.stats["jobs_cancelled"] += 1
            self._append(rec, self._ensure_stream(rec), "cancelled",
                         {"message": "cancelled before it started", "state": "cancelled"}, final=True)
            self.store.set_state(rec, J.CANCELLED)
        elif rec.state == J.RUNNING and self.running and self.running.job_id == job_id:
            stream = self._ensure_stream(rec)
            if self.running.cancel_requested is None:
                self.running.cancel_requested = time.monotonic()
                self.worker.cancel(self.running.job_no)
                self._append(rec, stream, "cancelled",
                             {"message": "cancel requested; the job stops at its next step",
                              "state": "cancelling"}, final=True)
            else:
                self._send(msg.session, "cancelled", {"message": "already cancelling", "state": "cancelling"},
                           job_id=job_id)
        elif rec.state == J.CANCELLED:
            self._send(msg.session, "cancelled", {"message": "already cancelled", "state": "cancelled"},
                       job_id=job_id)
        else:
            self._error(msg.session, "not_cancellable", f"job {job_id} already ended ({rec.state})",
                        job_id=job_id, in_reply_to=msg.msg_id)

    def _on_status(self, msg):
        rec = self._job_or_error(msg)
        if rec is None:
            return
        sub = self.subs.get(msg.job_id, {}).get(msg.session)
        self._grant(msg, sub)
        self._send(msg.session, "status_reply", self._status_content(rec), job_id=rec.job_id)

    def _status_content(self, rec: JobRecord) -> dict:
        stream = self.streams.get(rec.job_id)
        content = {
            "state": wire_state(rec.state),
            "job_state": rec.state,
            "queue_position": self._position(rec.job_id),
            "last_seq": stream.last_seq if stream else rec.last_seq,
            "params": rec.params_dict(),
            "result": {"files": [{"kind": k, **v} for k, v in rec.results.items()], "info": rec.info}
            if rec.results else None,
            "error": rec.error,
            "created": rec.created,
            "updated": rec.finished or rec.started or rec.created,
            "timings": rec.timings,
        }
        if self.running and self.running.job_id == rec.job_id:
            content["stage"] = self.running.stage or None
            content["fraction"] = min(1.0, max(0.0, self.running.fraction))
        if rec.state == J.DONE:
            content["fraction"] = 1.0
        return content

    def _on_list_jobs(self, msg):
        limit = msg.content.get("limit", 100)
        states = msg.content.get("states")
        recs = sorted(self.store.list(), key=lambda r: r.created, reverse=True)
        out = []
        for rec in recs:
            if states and wire_state(rec.state) not in states:
                continue
            s = rec.summary()
            s["state"] = wire_state(rec.state)
            s["job_state"] = rec.state
            out.append(s)
            if len(out) >= limit:
                break
        self._send(msg.session, "jobs", {"jobs": out})

    def _on_attach(self, msg):
        rec = self._job_or_error(msg)
        if rec is None:
            return
        stream = self._ensure_stream(rec)
        from_seq = msg.content["from_seq"]
        cursor = max(0, min(from_seq - 1, stream.last_seq))
        sub = self._subscribe(rec.job_id, msg.session, cursor)
        if cursor < stream.first_seq - 1:
            sub.missed += stream.first_seq - 1 - cursor
            sub.cursor = stream.first_seq - 1
        self._grant(msg, sub)

    def _on_fetch_result(self, msg):
        rec = self._job_or_error(msg)
        if rec is None:
            return
        if rec.state != J.DONE:
            self._error(msg.session, "not_ready", f"job {msg.job_id} has no result (state {rec.state})",
                        job_id=msg.job_id, in_reply_to=msg.msg_id, retriable=rec.state in J.ACTIVE_STATES)
            return
        name = msg.content.get("name") or rec.results["glb"]["name"]
        info = next((v for v in rec.results.values() if v["name"] == name), None)
        if info is None:
            self._error(msg.session, "unknown_file", f"job {msg.job_id} has no file {name!r}; it has "
                        + ", ".join(v["name"] for v in rec.results.values()), job_id=msg.job_id,
                        in_reply_to=msg.msg_id, field="name")
            return
        offset, length = msg.content["offset"], min(msg.content["length"], MAX_FETCH_BYTES)
        if offset > info["size"]:
            self._error(msg.session, "bad_offset", f"offset {offset} is past the end ({info['size']} bytes)",
                        job_id=msg.job_id, in_reply_to=msg.msg_id, field="offset")
            return
        path = self.store.result_dir(rec.job_id) / info["name"]
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read(length)
        except OSError as exc:
            self._error(msg.session, "result_missing", f"cannot read {info['name']}: {exc.strerror or exc}",
                        job_id=msg.job_id, in_reply_to=msg.msg_id)
            return
        self._send(msg.session, "result_chunk", {
            "name": name, "offset": offset, "size": info["size"], "eof": offset + len(data) >= info["size"],
            "sha256": info["sha256"]}, [data], job_id=rec.job_id)

    # ------------------------------------------------------------------ streams
    def _new_stream(self, job_id: str, first_seq: int = 1) -> JobStream:
        stream = JobStream(job_id, self.config.log_limit, first_seq)
        self.streams[job_id] = stream
        self.streams.move_to_end(job_id)
        return stream

    def _ensure_stream(self, rec: JobRecord) -> JobStream:
        """The job's stream, rebuilt from the record for jobs of a previous run or evicted streams:
        the final event gets the seq it had (``rec.last_seq``)."""
        stream = self.streams.get(rec.job_id)
        if stream is not None:
            return stream
        if rec.state in J.ACTIVE_STATES:  # cannot happen: active jobs always have streams
            return self._new_stream(rec.job_id)
        stream = self._new_stream(rec.job_id, first_seq=max(1, rec.last_seq))
        msg_type, content, buffers = self._final_event(rec)
        stream.append(msg_type, content, buffers, final=True)
        return stream

    def _final_event(self, rec: JobRecord):
        if rec.state == J.DONE:
            mesh = read_mesh_npz(self.store.job_dir(rec.job_id) / "result_mesh.npz")
            return ("result_ready", *self._result_content(rec, mesh))
        if rec.state == J.CANCELLED:
            return "cancelled", {"message": "the job was cancelled", "state": "cancelled"}, ()
        err = rec.error or {"code": "failed", "message": "the job failed"}
        return "error", {"code": err.get("code", "failed"), "message": err.get("message", ""),
                         "retriable": bool(err.get("retriable", rec.state == J.INTERRUPTED)),
                         "state": wire_state(rec.state), "job_state": rec.state}, ()

    def _result_content(self, rec: JobRecord, mesh) -> tuple[dict, tuple]:
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

    def _append(self, rec: JobRecord, stream: JobStream, msg_type: str, content: dict, buffers=(),
                final: bool = False) -> None:
        if stream.closed:
            return
        ev = stream.append(msg_type, content, buffers, final=final)
        rec.last_seq = ev.seq  # persisted with the job's next state change (no fsync on this path)
        self._dirty.add(rec.job_id)

    def _flush(self) -> None:
        now = time.monotonic()
        for client_id, client in list(self.clients.items()):
            if client.outbox:
                self._flush_outbox(client_id, client)
        for job_id in list(self._dirty):
            subs = self.subs.get(job_id)
            stream = self.streams.get(job_id)
            busy = False
            if subs and stream is not None:
                for client_id, sub in list(subs.items()):
                    client = self.clients.get(client_id)
                    if client is None:
                        subs.pop(client_id, None)
                        continue
                    if client.outbox:
                        busy = True
                        continue
                    if not client.explicit_credits and sub.credits == 0 and \
                            now - client.last_refill >= LEGACY_REFILL_S and now - client.last_seen < LEGACY_ALIVE_S:
                        sub.credits = 1
                        client.last_refill = now
                    if self._flush_sub(stream, sub):
                        busy = True
                    elif stream.closed and sub.cursor >= stream.last_seq:
                        del subs[client_id]  # the client has the whole stream: forget it
            if not busy:
                self._dirty.discard(job_id)

    def _flush_sub(self, stream: JobStream, sub: Subscription, budget: int = 256) -> bool:
        """Send what ``sub`` has not seen; True if something is still pending afterwards."""
        for _ in range(budget):
            if sub.cursor < stream.last_seq:
                nxt = sub.cursor + 1
                ev = stream.get(nxt)
                if ev is None:  # evicted from the bounded log
                    sub.missed += stream.first_seq - nxt
                    sub.cursor = stream.first_seq - 1
                    continue
                content = ev.content
                if sub.missed:
                    content = {**content, "missed": sub.missed}
                r = self._send(sub.client, ev.msg_type, content, ev.buffers, job_id=stream.job_id, seq=ev.seq,
                               direct=False)
                if r in ("again", "gone"):
                    return r == "again"
                sub.missed = 0
                sub.cursor = nxt  # sent (or unsendable: skipped so the stream goes on)
                continue
            p = stream.preview
            if p is not None and not stream.closed and sub.credits > 0 and p.number > sub.preview_sent:
                content = {**p.content, "preview_no": p.number, "after_seq": p.after_seq}
                r = self._send(sub.client, "preview_mesh", content, p.buffers, job_id=stream.job_id, direct=False)
                if r in ("again", "gone"):
                    return r == "again"
                if sub.preview_sent and p.number > sub.preview_sent + 1:
                    self.stats["previews_replaced"] += p.number - sub.preview_sent - 1
                sub.preview_sent = p.number
                sub.credits -= 1
                self.stats["previews_sent"] += 1
                continue
            return False
        return True

    # ------------------------------------------------------------------ worker
    def _maybe_start(self) -> None:
        if self.running is not None or not self.worker.ready:
            return
        while True:
            job_id = self.queue.pop()
            if job_id is None:
                return
            rec = self.store.get(job_id)
            if rec is not None and rec.state == J.QUEUED:
                break
        self.job_no += 1
        now = time.monotonic()
        self.running = Running(job_id, self.job_no, now, stage_started=now)
        self.store.set_state(rec, J.RUNNING)
        self.worker.run(self.job_no, job_id, worker_params(rec.params_dict(), rec.kind, rec.upload),
                        self.store.work_dir(job_id),
                        self.store.result_dir(job_id), self.store.job_dir(job_id) / J.PREVIEW_FILE)
        # tell clients waiting in the queue their new positions? (status answers on demand)

    def _pump_worker(self, poller, budget: int = 256) -> None:
        if self._restart_at is not None:
            return  # no worker until the delayed restart
        backlog = self._backlog
        if not backlog:
            try:
                backlog.extend(self.worker.read(budget))
            except WorkerDied as exc:
                self._worker_died(poller, exc)
                return
        while backlog:
            m = backlog.popleft()
            kind = m[0]
            if kind == "ready":
                self.worker.ready = True
                self._failed_starts = 0
                continue
            if kind == "fatal":
                log.error("worker cannot start: %s", m[1])
                continue
            run = self.running
            if run is None or m[1] != run.job_no:
                continue  # a late message of a job that was already ended (killed / cancelled)
            rec = self.store.get(run.job_id)
            stream = self.streams[run.job_id]
            if kind == "progress":
                self._on_progress(rec, stream, run, m[2])
            elif kind == "preview":
                ev = m[2]
                if run.cancel_requested is None:
                    try:
                        meta, bufs = encode_mesh(ev.mesh)
                    except ProtocolError as exc:
                        log.warning("preview of %s dropped: %s", run.job_id, exc)
                        continue
                    stream.set_preview({"stage": _stage_name(ev.stage), "step": max(0, int(ev.step)), "mesh": meta},
                                       tuple(bufs))
                    self._dirty.add(run.job_id)
                    break  # flush this preview before a newer one can replace it
            elif kind == "result":
                self._finish_done(rec, stream, m[2])
            elif kind == "cancelled":
                self._finish_cancelled(rec, stream)
            elif kind == "error":
                _, _, code, message, retriable, tb = m
                log.warning("job %s failed: %s\n%s", run.job_id, message, tb)
                if run.cancel_requested is not None:
                    self._finish_cancelled(rec, stream)
                else:
                    self._finish_failed(rec, stream, code, message, retriable)
        if self.running is None:
            self._maybe_start()

    def _on_progress(self, rec, stream, run: Running, ev) -> None:
        if run.cancel_requested is not None:
            return
        now = time.monotonic()
        stage = _stage_name(ev.stage)
        if stage != run.stage:
            self._close_stage(rec, run, now)
            run.stage, run.stage_started = stage, now
        total = max(int(ev.total), 0)
        step = max(int(ev.step), 0)
        fraction = min(1.0, step / total) if total else 0.0
        run.fraction = fraction
        stage_elapsed = now - run.stage_started
        eta = (stage_elapsed / step * (total - step)) if step and total >= step else None
        content = {"stage": stage, "step": step, "total": total, "fraction": fraction,
                   "elapsed": round(now - run.started, 4), "message": str(ev.message)[:MAX_TEXT]}
        if eta is not None:
            content["eta"] = round(eta, 3)
        self._append(rec, stream, "progress", content)

    @staticmethod
    def _close_stage(rec, run: Running, now: float) -> None:
        """Add the time spent in the current stage to ``rec.timings["stages"]`` (seconds)."""
        if run.stage:
            stages = rec.timings.setdefault("stages", {})
            stages[run.stage] = round(stages.get(run.stage, 0.0) + now - run.stage_started, 4)

    def _end_running(self, rec, state) -> None:
        """Journal + job.json (fsynced) of the final state. Called after the final event was put in
        the job's log and before the loop flushes it, so nothing reaches a client before the disk."""
        if self.running is not None:
            self._close_stage(rec, self.running, time.monotonic())
        self.running = None
        stream = self.streams.get(rec.job_id)
        if stream is not None:
            stream.drop_preview()  # the final event supersedes any preview not sent yet
        self.store.set_state(rec, state)
        self._trim_streams()

    def _finish_done(self, rec, stream, payload) -> None:
        rec.results = payload["files"]
        rec.info = payload.get("info") or {}
        self.stats["jobs_done"] += 1
        content, buffers = self._result_content(rec, payload.get("mesh"))
        self._append(rec, stream, "result_ready", content, buffers, final=True)
        self._end_running(rec, J.DONE)

    def _finish_cancelled(self, rec, stream) -> None:
        self.stats["jobs_cancelled"] += 1
        self._append(rec, stream, "cancelled", {"message": "cancelled", "state": "cancelled"}, final=True)
        self._end_running(rec, J.CANCELLED)

    def _finish_failed(self, rec, stream, code, message, retriable) -> None:
        message = str(message)[:MAX_TEXT]
        rec.error = {"code": code, "message": message, "retriable": bool(retriable)}
        self.stats["jobs_failed"] += 1
        self._append(rec, stream, "error", {"code": code, "message": message, "retriable": bool(retriable),
                                            "state": "failed"}, final=True)
        self._end_running(rec, J.FAILED)

    def _worker_died(self, poller, exc: WorkerDied) -> None:
        code = exc.exitcode
        run = self.running
        if run is not None:
            rec = self.store.get(run.job_id)
            stream = self.streams[run.job_id]
            if run.cancel_requested is not None:
                self._finish_cancelled(rec, stream)
            else:
                how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
                hint = " (signal 9 often means the system ran out of memory)" if code == -signal.SIGKILL else ""
                self._finish_failed(rec, stream, "worker_crashed",
                                    f"the worker process {how} while running the job{hint}; it was restarted",
                                    True)
        if not self.worker.ready:  # died before it was ready: back off (1, 2, 4 ... 30 s)
            self._failed_starts += 1
            delay = min(30.0, 2.0 ** (self._failed_starts - 1))
            log.error("the worker died while starting (exit code %s); retrying in %.0f s", code, delay)
            self._unregister_worker(poller)
            self.worker.kill()
            self._restart_at = time.monotonic() + delay
            return
        self._restart_worker(poller)

    def _unregister_worker(self, poller) -> None:
        self._backlog.clear()  # messages of the old worker
        if self._worker_fd is not None:
            try:
                poller.unregister(self._worker_fd)
            except KeyError:
                pass
            self._worker_fd = None

    def _restart_worker(self, poller) -> None:
        self._unregister_worker(poller)
        self.worker.kill()
        self.stats["worker_restarts"] += 1
        self.worker.start()
        self._worker_fd = self.worker.fileno()
        poller.register(self._worker_fd, zmq.POLLIN)

    def _timers(self, poller) -> None:
        now = time.monotonic()
        if self._restart_at is not None and now >= self._restart_at:
            self._restart_at = None
            self._restart_worker(poller)
        if now - self._last_trim > 1.0:
            self._last_trim = now
            self._trim_streams()
            run = self.running
            if run is not None:  # checkpoint the running job's seq (no fsync: for crash recovery)
                rec = self.store.get(run.job_id)
                if rec is not None and rec.last_seq != run.checkpointed_seq:
                    run.checkpointed_seq = rec.last_seq
                    self.store.write_record(rec, durable=False)
        run = self.running
        if run is not None and run.cancel_requested is not None:
            if time.monotonic() - run.cancel_requested > self.config.cancel_timeout:
                log.warning("job %s did not stop within %.1f s of cancel; killing the worker", run.job_id,
                            self.config.cancel_timeout)
                rec = self.store.get(run.job_id)
                self._finish_cancelled(rec, self.streams[run.job_id])
                self._restart_worker(poller)
        now = time.monotonic()
        for client_id, client in list(self.clients.items()):
            if now - client.last_seen > CLIENT_FORGET_S and not client.outbox:
                if not any(client_id in subs for subs in self.subs.values()):
                    del self.clients[client_id]

    def _trim_streams(self) -> None:
        """Keep the streams of active jobs and of the last KEEP_FINISHED_STREAMS finished ones."""
        finished = [j for j, s in self.streams.items() if s.closed and not self.subs.get(j)]
        for job_id in finished[:-KEEP_FINISHED_STREAMS] if len(finished) > KEEP_FINISHED_STREAMS else []:
            del self.streams[job_id]
            self.subs.pop(job_id, None)
        for job_id, stream in self.streams.items():
            if stream.closed and stream.preview is not None and not self.subs.get(job_id):
                stream.drop_preview()
        for job_id in [j for j, s in self.subs.items() if not s]:
            del self.subs[job_id]


def _stage_name(stage) -> str:
    """A stage name that fits the protocol (non-empty, at most 64 characters)."""
    text = str(stage or "run")
    return text[:64]


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _hostname() -> str:
    import socket

    return socket.gethostname()


def run_server(config: ServerConfig, out=sys.stdout) -> int:
    """Start and serve until stopped; prints where the connection file is. Returns an exit code."""
    server = Server(config)
    info = server.start()
    print(f"conjure-backend: listening on {server.url} (pipeline {config.pipeline}, "
          f"worker pid {server.worker.pid})", file=out)
    print(f"conjure-backend: connection file {server.connection_file}", file=out)
    print(f"conjure-backend: data directory {server.store.data_dir}", file=out)
    if info.server_public_key:
        print(f"conjure-backend: CURVE on, {server.curve.allowed} allowed client key(s)", file=out)
    out.flush()
    server.serve_forever()
    return 0

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
- ``cancel`` [job_id] -> ``cancelled`` at once (in the job's stream, and directly to a sender
  that does not follow the job). A queued job is dropped;
  a running one stops at the pipeline's next ``check_cancel``; if the worker has not stopped
  within ``cancel_timeout`` seconds it is killed and restarted.
- ``status`` [job_id] -> ``status_reply``; ``list_jobs`` -> ``jobs``.
- ``attach`` [job_id] {from_seq} -> the job's events with seq >= from_seq (events older than the
  bounded log are reported in ``missed`` of an ``error``-free ``status_reply`` first), then live.
  After a server restart, finished jobs still answer with their final event.
- ``fetch_result`` [job_id] {name?, offset, length} -> one ``result_chunk`` (name, offset, size,
  eof, sha256) with at most ``MAX_FETCH_BYTES`` (1 MiB); the client pulls chunk by chunk and
  checks the SHA-256 from ``result_ready`` / ``status_reply.result``. The chunk is read from disk
  when the peer's pipe takes it, so unread replies cost a small record each.
- Every reply carries the server's session id in the header (``server_session``): a client that
  sees it change knows the server restarted. Forged, unsigned, replayed and oversized messages
  are dropped and counted (``stats.dropped`` in ``pong``); a correctly signed request whose
  content the schema rejects is answered with an ``error`` naming the field. Every signed
  request gets a reply.
- Limits (issue 14): requests of at most ``MAX_REQUEST_BYTES`` (libzmq refuses frames over
  ``MAX_REQUEST_FRAME_BYTES``); replies to one peer queue at most ``SNDHWM`` messages in the
  socket plus a small outbox; one server per data directory (``flock``); a full disk fails the
  job (``disk_full``), never the server.

Job states on the wire are the protocol's ``JOB_STATES``; a job interrupted by a server
restart is reported as ``interrupted``.

The parts (the way jupyter_client keeps its session apart from its channels):

- this module: :class:`Server` owns the ROUTER socket, the poll loop and start/stop;
- ``handlers.py``: :class:`RequestHandlers`, one ``on_<msg_type>`` per request;
- ``streams.py``: :class:`Delivery`, the peers' outboxes, job streams, subscriptions and credits;
- ``supervisor.py``: :class:`JobSupervisor` (queue -> workers -> events, final states) over a
  :class:`WorkerPool` (today :class:`LocalWorkerPool`, one worker process);
- ``records.py``: wire views of job records (status, result, final event).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from backend import __version__
from protocol import (
    PROTOCOL_VERSION,
    ConnectionInfo,
    ProtocolError,
    Session,
    new_key,
    write_connection_file,
)
from protocol.messages import MAX_REQUEST_BYTES, MAX_REQUEST_FRAME_BYTES

from . import jobs as J
from .handlers import RequestHandlers
from .jobs import DataDirError, JobQueue, JobStore
from .preflight import params_checker
from .records import final_event
from .security import CurveKeys, SecurityError, apply_server_curve, check_bind, start_authenticator
from .streams import DEFAULT_LOG_LIMIT, Delivery
from .supervisor import JobSupervisor, LocalWorkerPool
from .worker import DEFAULT_PIPELINE, PipelineSpecError, WorkerDied

log = logging.getLogger("conjure.server")

SERVER_VERSION = __version__  # one version source: pyproject.toml
#: messages queued per peer in the ROUTER socket before sends to it get EAGAIN
SNDHWM = 32


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


class Server:
    """Build with a :class:`ServerConfig`, call :meth:`start` (binds, starts the worker, writes the
    connection file), then :meth:`serve_forever` until :meth:`stop` or SIGINT/SIGTERM."""

    version = SERVER_VERSION

    def __init__(self, config: ServerConfig):
        self.config = config
        self.session_id = uuid.uuid4().hex
        self.started_at = time.time()
        self.store = JobStore(config.data_dir)
        self.stats = {"received": 0, "sent": 0, "dropped": {}, "send_again": 0, "clients_gone": 0,
                      "worker_restarts": 0, "jobs_done": 0, "jobs_failed": 0, "jobs_cancelled": 0,
                      "outbox_overflow": 0, "unsendable": 0, "previews_sent": 0, "previews_replaced": 0}
        self.delivery = Delivery(self.stats, config.log_limit, lambda rec: final_event(self.store, rec))
        self.pool = LocalWorkerPool(config.pipeline, self.stats)
        self.supervisor = JobSupervisor(self.store, JobQueue(config.queue_limit), self.pool, self.delivery,
                                        self.stats, config.cancel_timeout)
        self.handlers = RequestHandlers(self)
        self._stop = False
        self.ctx: zmq.Context | None = None
        self.sock: zmq.Socket | None = None
        self.auth = None
        self.curve: CurveKeys | None = None
        self.connection_file: Path | None = None
        self.url = ""
        self.check_params = None
        self._polled_fds: set[int] = set()
        self._started_pool = False
        self._allow_checked = 0.0
        self._allow_stamp: tuple = ()
        self._allowed_keys: set[str] | None = None  # z85 client keys (CurveZMQ only)

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
            self.check_params = params_checker(cfg.pipeline)
        except Exception as exc:  # noqa: BLE001 - import errors of a user-given module
            raise ServerStartError(f"cannot load the pipeline {cfg.pipeline!r}: {type(exc).__name__}: {exc}") from exc
        if cfg.preset is not None:
            try:
                self.check_params(cfg.preset, {})
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
        # per-peer send pipe: at most SNDHWM messages (credit-based flow control inside libzmq: a
        # peer that stops reading fills it, then sends get EAGAIN and replies wait in the small
        # outbox), so one peer pins at most ~SNDHWM x MAX_FETCH_BYTES of replies
        self.sock.setsockopt(zmq.SNDHWM, SNDHWM)
        self.sock.setsockopt(zmq.RCVHWM, 1000)
        # requests are small: libzmq drops a peer that announces a larger frame, before Python sees it
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_FRAME_BYTES)
        if self.curve is not None:
            self._allow_stamp = _folder_stamp(self.curve.clients_dir)
            self._allowed_keys = _allowed_keys(self.curve.clients_dir)
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

        self._started_pool = True
        try:
            self.pool.start(cfg.worker_start_timeout)
        except (PipelineSpecError, WorkerDied, TimeoutError, RuntimeError) as exc:
            self.pool.handle.kill()
            self._close_socket()
            self.store.close()
            raise ServerStartError(f"the worker could not start the pipeline {cfg.pipeline!r}: {exc}") from exc

        key = cfg.key or new_key()
        self.session = Session(key, self.session_id, routing=True, max_recv_bytes=MAX_REQUEST_BYTES)
        self.delivery.bind(self.session, self.sock)
        advertise = cfg.advertise_ip or (cfg.ip if cfg.ip not in ("0.0.0.0", "::") else _hostname())
        info = ConnectionInfo("tcp", advertise, port, key, PROTOCOL_VERSION,
                              server_public_key=self.curve.public.decode() if self.curve else None)
        from protocol import default_connection_path

        path = Path(cfg.connection_file) if cfg.connection_file else default_connection_path()
        _private_parent(path, fix=not cfg.connection_file)
        try:
            self.connection_file = write_connection_file(path, info)
            self._connection_info = info
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
        self.supervisor.shutdown()
        self._close_socket()
        self.store.close()
        if self.connection_file is not None and self._owns_connection_file():
            try:
                self.connection_file.unlink()
            except OSError:
                pass

    def _owns_connection_file(self) -> bool:
        """True while the connection file is still the one this server wrote (another server may
        have replaced it since: then it is theirs to remove)."""
        from protocol.connection import read_connection_file

        mine = getattr(self, "_connection_info", None)
        try:
            there = read_connection_file(self.connection_file)
        except Exception:  # noqa: BLE001 - missing, half-written or foreign: not ours to delete
            return False
        return mine is not None and there.key == mine.key and there.port == mine.port

    # ------------------------------------------------------------------ loop
    def serve_forever(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        sup, delivery = self.supervisor, self.delivery
        try:
            while not self._stop:
                self._sync_worker_fds(poller)
                timeout = 0 if sup.backlog else 5 if delivery.dirty else 100
                try:
                    ready = dict(poller.poll(timeout))
                except zmq.ZMQError as exc:
                    if exc.errno == errno.EINTR:
                        continue
                    raise
                if self.sock in ready:
                    self._handle_incoming()
                self._guarded(sup.pump)
                self._guarded(delivery.flush)
                now = time.monotonic()
                self._guarded(sup.timers, now)
                delivery.forget_idle(now)
                self._reload_allow_list(now)
        finally:
            self.shutdown()

    def _guarded(self, fn, *args) -> None:
        """Run one step of the loop; a bug in it is logged and counted, and the server goes on."""
        try:
            fn(*args)
        except Exception:  # noqa: BLE001 - the server never exits because of one bad event
            self.stats["loop_errors"] = self.stats.get("loop_errors", 0) + 1
            log.exception("error in %s; the server goes on", getattr(fn, "__name__", fn))

    def _reload_allow_list(self, now: float) -> None:
        """Re-read the CURVE client allow-list when its folder changes (checked once a second): a
        removed key is refused on its next connection and its messages on an open one are dropped;
        an added key is admitted; no restart."""
        if self.auth is None or now - self._allow_checked < 1.0:
            return
        self._allow_checked = now
        stamp = _folder_stamp(self.curve.clients_dir)
        if stamp == self._allow_stamp:
            return
        self._allow_stamp = stamp
        try:
            self.auth.configure_curve(domain="*", location=str(self.curve.clients_dir))
            self._allowed_keys = _allowed_keys(self.curve.clients_dir)
            log.warning("CURVE allow-list %s changed: %d client key(s) now allowed", self.curve.clients_dir,
                        len(stamp))
        except Exception as exc:  # noqa: BLE001 - keep the old list rather than none
            log.error("cannot reload the CURVE allow-list: %s", exc)

    def _sync_worker_fds(self, poller) -> None:
        """Poll the pool's current pipes (a restarted worker has a new one)."""
        fds = set(self.pool.fds())
        for fd in self._polled_fds - fds:
            try:
                poller.unregister(fd)
            except KeyError:
                pass
        for fd in fds - self._polled_fds:
            poller.register(fd, zmq.POLLIN)
        self._polled_fds = fds

    def _handle_incoming(self, budget: int = 500) -> None:
        for _ in range(budget):
            try:
                rid, msg = self.session.recv(self.sock, zmq.NOBLOCK)
            except zmq.Again:
                return
            except ProtocolError as exc:
                d = self.stats["dropped"]
                d[exc.code] = d.get(exc.code, 0) + 1
                req = exc.request
                if req is not None:  # signed by a key holder: answer, naming the field
                    self.delivery.touch(req.session, req.routing_id, time.monotonic())
                    self.delivery.error(req.session, exc.code, exc.message, job_id=req.job_id,
                                        in_reply_to=req.msg_id, field=exc.field)
                continue
            if self._allowed_keys is not None and self.session.last_user_id not in self._allowed_keys:
                d = self.stats["dropped"]  # its key left the allow-list after it connected
                d["revoked_key"] = d.get("revoked_key", 0) + 1
                continue
            self.stats["received"] += 1
            self.delivery.touch(msg.session, rid, time.monotonic())
            self.handlers.dispatch(msg)

    def stats_snapshot(self) -> dict:
        running = self.supervisor.first_running()
        return {
            "server_session": self.session_id,
            "uptime_s": round(time.time() - self.started_at, 3),
            "queue": len(self.supervisor.queue),
            "running": running.job_id if running else None,
            **self.pool.describe(),
            "clients": len(self.delivery.peers),
            "streams": len(self.delivery.streams),
            "rss_bytes": _rss_bytes(),
            **{k: (dict(v) if isinstance(v, dict) else v) for k, v in self.stats.items()},
        }


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _folder_stamp(folder: Path) -> tuple:
    """(name, size, mtime_ns) of every ``*.key`` in ``folder``: changes when a key is added, removed
    or rewritten."""
    out = []
    try:
        for p in sorted(Path(folder).glob("*.key")):
            st = p.stat()
            out.append((p.name, st.st_size, st.st_mtime_ns))
    except OSError:
        pass
    return tuple(out)


def _allowed_keys(folder: Path) -> set[str]:
    """z85 public keys of the allow-list (what the ZAP handler reports as a peer's User-Id)."""
    from zmq.auth import load_certificates

    return {k.decode() if isinstance(k, bytes) else str(k) for k in load_certificates(str(folder))}


def _private_parent(path: Path, fix: bool) -> None:
    """The connection file's folder should be private. The default runtime folder is set to 0700
    when group/other can read it (``fix``); a folder the user named is only warned about, and a
    shared sticky folder such as /tmp is left alone (the file itself is 0600 in every case)."""
    folder = Path(path).expanduser().parent
    try:
        st = folder.stat()
    except OSError:
        return  # created 0700 by write_connection_file
    import stat as _stat

    if not st.st_mode & 0o077 or st.st_mode & _stat.S_ISVTX:
        return
    if not fix or st.st_uid != os.getuid():
        log.warning("the connection file's folder %s has mode %04o (others can list it); the file itself is "
                    "0600", folder, st.st_mode & 0o777)
        return
    log.warning("the runtime folder %s had mode %04o; setting it to 0700 (it holds the connection key)",
                folder, st.st_mode & 0o777)
    try:
        os.chmod(folder, 0o700)
    except OSError as exc:
        log.warning("cannot chmod %s: %s", folder, exc)


def _hostname() -> str:
    import socket

    return socket.gethostname()


def run_server(config: ServerConfig, out=sys.stdout) -> int:
    """Start and serve until stopped; prints where the connection file is. Returns an exit code."""
    server = Server(config)
    info = server.start()
    print(f"conjure-backend: listening on {server.url} (pipeline {config.pipeline}, "
          f"worker pid {server.pool.pid})", file=out)
    print(f"conjure-backend: connection file {server.connection_file}", file=out)
    print(f"conjure-backend: data directory {server.store.data_dir}", file=out)
    if info.server_public_key:
        print(f"conjure-backend: CURVE on, {server.curve.allowed} allowed client key(s)", file=out)
    out.flush()
    server.serve_forever()
    return 0

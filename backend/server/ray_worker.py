"""Workers as Ray actors: the same pipeline runner as the local worker, on any machine of a Ray cluster.

``conjure-backend serve --ray ADDRESS|auto`` makes each worker a :class:`ConjureActor`
(``num_gpus=1`` when the cluster has GPUs, else ``num_cpus=1``). The actor imports the pipeline
once (plus its optional ``warm_up()``), so the models stay resident between jobs, and runs each
job with the local worker's own job runner (``backend.server.worker._run_one``): one pipeline
runner, two transports.

Events travel back through a Ray *streaming generator* (``num_returns="streaming"``): the actor's
``run`` method yields the worker-protocol messages of ``backend/server/worker.py`` one by one as
the pipeline emits them (progress, previews, result), plus ``("file", header, chunk)`` items that
carry the result files before the result message. The actor may run on another machine, so it
works in its own scratch folder; :class:`RayWorkerHandle` (the server's side) writes the chunks
into the server's job store (``<job>/result/``: tmp -> fsync -> SHA-256 check -> rename) and only
then lets the result message through. A file whose SHA-256 differs from the actor's fails the job
(``result_corrupted``, retriable).

:class:`RayWorkerHandle` has the interface of :class:`backend.server.worker.WorkerHandle`
(``start``, ``wait_ready``, ``fileno``, ``read``, ``run``, ``cancel``, ``kill``, ``stop``), so the
server supervises Ray actors and local processes with the same code. A background thread per
handle consumes the generator, writes files, and wakes the control loop through a pipe
(``fileno``). Cancel is a second actor call (the actor is threaded, ``max_concurrency`` 4) that
sets the number the job's ``check_cancel`` compares; the server kills and replaces the actor when
the job has not stopped within ``--cancel-timeout``. An actor that dies (its process killed, its
node lost) raises ``ActorDied`` from ``read``; the server ends its job ``worker_crashed``
(retriable) and starts a new actor.

Ray is optional (``pip install "conjure[farm]"``); this module imports it only when used.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

from .jobs import fsync_dir
from .worker import (
    RESULT_MESH_FILE,
    WORKER_NICE,
    JobFailed,
    JobPreview,
    JobResult,
    PipelineSpecError,
    RunJob,
    WorkerDied,
    WorkerFatal,
    WorkerReady,
    load_callable,
    sha256_file,
    write_preview_npz,
)

log = logging.getLogger("conjure.server.ray")

#: bytes per ("file", ...) item of the event stream
FILE_CHUNK_BYTES = 4 << 20
#: seconds between liveness checks of an idle actor
HEALTH_CHECK_S = 2.0
PREVIEW_WRITE_INTERVAL_S = 0.5
#: seconds the server's Ray driver keeps trying to reach a lost GCS before Ray ends the process (1 year)
GCS_RECONNECT_TIMEOUT_S = 365 * 24 * 3600


class RayUnavailable(RuntimeError):
    """Ray is not installed, or the cluster cannot be reached; the message says what to do."""


def import_ray():
    """``import ray`` with a clear error when the optional extra is missing."""
    try:
        import ray
    except ImportError as exc:
        raise RayUnavailable('Ray is not installed; install the farm extra: pip install "conjure[farm]"') from exc
    return ray


def connect(address: str, *, num_cpus: int | None = None) -> dict:
    """Join the Ray cluster at ``address`` ("auto": the one ``ray start`` made on this machine;
    "local": start a private one-machine instance inside this process). Returns the cluster's
    resources (``{"CPU": n, "GPU": n, ...}``). Raises :class:`RayUnavailable`."""
    explicit = address not in ("auto", "local") and not address.startswith("ray://")
    if "ray" not in sys.modules:  # before Ray reads its configuration at import
        if explicit:
            _use_cluster_token()
        # a Ray driver exits its whole process 60 s after it loses the cluster's GCS; the server
        # must not: it keeps answering clients, its workers show not ready, and it retries
        os.environ.setdefault("RAY_gcs_rpc_server_reconnect_timeout_s", str(GCS_RECONNECT_TIMEOUT_S))
    ray = import_ray()
    if ray.is_initialized():
        return dict(ray.cluster_resources())
    if explicit:
        _probe(address)  # ray.init retries an unreachable address for many minutes
    kwargs = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    try:
        if address == "local":
            ray.init(num_cpus=num_cpus, **kwargs)
        else:
            ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        hint = " (start one with: ray start --head)" if address == "auto" else ""
        raise RayUnavailable(f"cannot join the Ray cluster at {address!r}{hint}: {exc}") from exc
    return dict(ray.cluster_resources())


def _probe(address: str, timeout: float = 5.0) -> None:
    """Raise :class:`RayUnavailable` unless a TCP connection to ``host:port`` opens."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout):
            pass
    except ValueError:
        raise RayUnavailable(f"--ray {address!r} is not 'auto', 'local' or host:port") from None
    except OSError as exc:
        raise RayUnavailable(f"cannot join the Ray cluster at {address!r}: nothing answers there "
                             f"({exc.strerror or exc}); start the head with: ray start --head --port {port}") from None


def _use_cluster_token() -> None:
    """Ray (2.5x+) turns token authentication on for ``ray start`` clusters, and ``ray.init`` uses
    the token (``$RAY_AUTH_TOKEN``, ``$RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``) by itself
    only for ``address="auto"``. For an explicit address do the same, unless ``RAY_AUTH_MODE``
    says otherwise."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or os.path.exists(path):
        os.environ["RAY_AUTH_MODE"] = "token"


def disconnect(timeout: float = 10.0) -> None:
    """Leave the cluster (our actors die with this driver). Bounded: with the cluster's GCS gone,
    ``ray.shutdown`` waits for it (about 5 s here), and the server must still exit."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    t = threading.Thread(target=ray.shutdown, name="conjure-ray-shutdown", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        log.warning("ray.shutdown did not finish within %.0f s; leaving it", timeout)


def _is_result(msg) -> bool:
    return isinstance(msg, JobResult)


def _message_mesh(msg):
    """The mesh a result or preview message carries (None for the others)."""
    if isinstance(msg, JobResult):
        return msg.mesh
    if isinstance(msg, JobPreview):
        return msg.event.mesh
    return None


# ---------------------------------------------------------------------------------- the actor
class _QueueConn:
    """What ``worker._run_one`` sends on (its ``conn``): a thread-safe queue."""

    def __init__(self):
        self.q: queue.Queue = queue.Queue()

    def send(self, msg) -> None:
        self.q.put(msg)


class ConjureActor:
    """One worker on a Ray node: the pipeline loaded once, one job at a time.

    Decorated with ``ray.remote`` by :func:`actor_class` (Ray stays an optional import).
    """

    def __init__(self, pipeline_spec: str):
        with contextlib.suppress(OSError, AttributeError):
            os.nice(WORKER_NICE)
        self.pipeline_spec = pipeline_spec
        self.cancel_value = SimpleNamespace(value=0)
        self.scratch = Path(tempfile.mkdtemp(prefix="conjure-ray-"))
        self.fatal: str | None = None
        self.run_job = None
        try:
            self.run_job = load_callable(pipeline_spec)
            warm_up = getattr(sys.modules.get(pipeline_spec.split(":", 1)[0]), "warm_up", None)
            if callable(warm_up):
                warm_up()
        except PipelineSpecError as exc:
            self.fatal = str(exc)
        except Exception as exc:
            self.fatal = f"the pipeline's warm_up() failed: {type(exc).__name__}: {exc}"

    def ready(self) -> dict:
        """Where this actor runs: ``{"pid", "host", "node_ip", "gpus": [ids], "fatal": str|None}``."""
        import ray

        try:
            gpus = [str(g) for g in ray.get_gpu_ids()]
        except Exception:
            gpus = []
        return {"pid": os.getpid(), "host": socket.gethostname(), "node_ip": ray.util.get_node_ip_address(),
                "gpus": gpus, "fatal": self.fatal}

    def ping(self) -> int:
        return os.getpid()

    def cancel(self, job_no: int) -> None:
        """Ask job ``job_no`` to stop at its next ``check_cancel`` (runs beside ``run``)."""
        self.cancel_value.value = job_no

    def run(self, job_no: int, job_id: str, params: dict):
        """Generator (call with ``num_returns="streaming"``): the job's worker-protocol messages,
        with ``("file", {"name", "size", "sha256", "offset", "eof"}, bytes)`` items before the result."""
        from .worker import _run_one

        job_dir = self.scratch / job_id
        work_dir, result_dir, preview_path = job_dir / "work", job_dir / "result", job_dir / "preview.npz"
        conn = _QueueConn()
        done = object()

        def target():
            try:
                _run_one(conn, self.cancel_value, self.run_job, job_no, job_id, params, str(work_dir),
                         str(result_dir), str(preview_path))
            except BaseException as exc:
                conn.send(JobFailed(job_no, "worker_error", f"{type(exc).__name__}: {exc}", True))
            finally:
                conn.q.put(done)

        thread = threading.Thread(target=target, name=f"conjure-job-{job_no}", daemon=True)
        thread.start()
        try:
            while True:
                msg = conn.q.get()
                if msg is done:
                    break
                if _is_result(msg):
                    yield from self._ship_files(result_dir)
                yield msg
        finally:
            thread.join(5.0)
            shutil.rmtree(job_dir, ignore_errors=True)

    @staticmethod
    def _ship_files(result_dir: Path):
        for path in sorted(result_dir.iterdir()) if result_dir.is_dir() else []:
            size, digest = sha256_file(path)
            offset = 0
            with open(path, "rb") as f:
                while True:
                    chunk = f.read(FILE_CHUNK_BYTES)
                    eof = offset + len(chunk) >= size
                    yield ("file", {"name": path.name, "size": size, "sha256": digest, "offset": offset,
                                    "eof": eof}, chunk)
                    offset += len(chunk)
                    if eof:
                        break

    def __del__(self):
        shutil.rmtree(getattr(self, "scratch", ""), ignore_errors=True)


_ACTOR_CLASS = None


def actor_class():
    """``ray.remote(ConjureActor)`` (made once)."""
    global _ACTOR_CLASS
    if _ACTOR_CLASS is None:
        ray = import_ray()
        _ACTOR_CLASS = ray.remote(max_concurrency=4)(ConjureActor)
    return _ACTOR_CLASS


# ---------------------------------------------------------------------------------- the server's side
class ActorDied(WorkerDied):
    """The actor's process or node died (``exitcode`` is None: Ray does not report it)."""

    def __init__(self, reason: str):
        WorkerDied.__init__(self, None)
        self.args = (reason,)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


class RayWorkerHandle:
    """The server's side of one Ray actor, with :class:`~backend.server.worker.WorkerHandle`'s interface.

    ``resources``: the actor's Ray resources, e.g. ``{"num_gpus": 1}`` or ``{"num_cpus": 1}``.
    After ``wait_ready``: ``pid``, ``host`` and ``gpu`` (Ray's GPU ids, "" on CPU) say where it runs.
    """

    def __init__(self, pipeline_spec: str, resources: dict | None = None, name: str = "ray"):
        self.pipeline_spec = pipeline_spec
        self.resources = dict(resources or {"num_cpus": 1})
        self.name = name
        self.kind = "ray"
        self.actor = None
        self.ready = False
        self.pid = None
        self.host = ""
        self.gpu = ""
        self.starts = 0
        self._q: queue.Queue = queue.Queue()
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)
        self._generation = 0
        self._jobs: queue.Queue = queue.Queue()  # (generation, job_no, job_id, params, result_dir, preview)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # ---- life cycle
    def start(self) -> None:
        """Create a new actor (asynchronously); a ``ready`` message follows when it has loaded the pipeline."""
        ray = import_ray()
        with self._lock:
            self._generation += 1
            gen = self._generation
        self.ready = False
        self.pid = None
        self.starts += 1
        self._jobs = queue.Queue()
        try:
            self.actor = actor_class().options(**self.resources).remote(self.pipeline_spec)
        except Exception as exc:
            self.actor = None
            self._put(gen, ActorDied(f"cannot create a Ray actor: {_short(exc)}"))
            return
        self._thread = threading.Thread(target=self._consume, args=(ray, self.actor, gen, self._jobs),
                                        name=f"conjure-{self.name}", daemon=True)
        self._thread.start()

    def _current(self, gen: int) -> bool:
        return gen == self._generation

    def _put(self, gen: int, item) -> None:
        if not self._current(gen):
            return
        self._q.put((gen, item))
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wfd, b"x")

    def _consume(self, ray, actor, gen: int, jobs: queue.Queue) -> None:
        """Background thread: wait for the actor, then run the jobs handed to it one by one."""
        died = (ray.exceptions.RayActorError,)
        try:
            info = ray.get(actor.ready.remote())
        except died as exc:
            self._put(gen, ActorDied(f"the Ray actor died while starting: {_short(exc)}"))
            return
        except Exception as exc:
            self._put(gen, WorkerFatal(f"the Ray actor could not start: {_short(exc)}"))
            self._put(gen, ActorDied("the Ray actor could not start"))
            return
        if info.get("fatal"):
            self._put(gen, WorkerFatal(info["fatal"]))
            self._put(gen, ActorDied(f"the Ray actor could not load the pipeline: {info['fatal']}"))
            return
        self.host = info.get("host") or info.get("node_ip") or ""
        self.gpu = ",".join(info.get("gpus") or [])
        self._put(gen, WorkerReady(info["pid"]))
        while self._current(gen):
            try:
                job = jobs.get(timeout=HEALTH_CHECK_S)
            except queue.Empty:
                try:  # is the idle actor still there?
                    ray.get(actor.ping.remote(), timeout=30)
                except died as exc:
                    self._put(gen, ActorDied(f"the Ray actor died while idle: {_short(exc)}"))
                    return
                except Exception:
                    pass
                continue
            if job is None:
                return
            job_no, job_id, params, result_dir, preview_path = job
            try:
                self._run_job(ray, actor, gen, job_no, job_id, params, result_dir, preview_path)
            except died as exc:
                self._put(gen, ActorDied(f"the Ray actor died while running the job: {_short(exc)}"))
                return
            except Exception as exc:
                log.exception("job %s on Ray failed in transfer", job_id)
                self._put(gen, JobFailed(job_no, "transfer_failed",
                                         f"the result could not be stored: {_short(exc)}", True))

    def _run_job(self, ray, actor, gen, job_no, job_id, params, result_dir: Path, preview_path: Path) -> None:
        stream = actor.run.options(num_returns="streaming").remote(job_no, job_id, params)
        writer = _FileWriter(result_dir)
        last_preview = 0.0
        for ref in stream:
            item = ray.get(ref)
            if not self._current(gen):
                return  # the actor was killed / replaced: nothing of this job counts any more
            if isinstance(item, tuple) and item and item[0] == "file":
                writer.write(item[1], item[2])
                continue
            if _is_result(item):
                bad = writer.check()
                if bad:
                    self._put(gen, JobFailed(job_no, "result_corrupted", bad, True))
                    continue
                mesh = _message_mesh(item)
                if mesh is not None:
                    write_preview_npz(preview_path.with_name(RESULT_MESH_FILE), mesh)
            else:
                mesh = _message_mesh(item)
                now = time.monotonic()
                if mesh is not None and now - last_preview >= PREVIEW_WRITE_INTERVAL_S:
                    with contextlib.suppress(OSError):
                        write_preview_npz(preview_path, mesh)
                    last_preview = now
            self._put(gen, item)

    def wait_ready(self, timeout: float) -> None:
        """Block until the actor has loaded the pipeline. Raises ``PipelineSpecError`` / ``ActorDied`` /
        ``TimeoutError``."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the Ray actor did not start within {timeout:g} s (is there a free "
                                   f"{'GPU' if 'num_gpus' in self.resources else 'CPU'} in the cluster?)")
            try:
                gen, item = self._q.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if not self._current(gen):
                continue
            self._drain_wakeups()
            if isinstance(item, ActorDied):
                raise item
            if isinstance(item, WorkerFatal):
                raise PipelineSpecError(item.message)
            self.pid = item.pid
            self.ready = True
            return

    def fileno(self) -> int:
        """A pipe that becomes readable when events are waiting (register it with a poller)."""
        return self._rfd

    def _drain_wakeups(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._rfd, 4096):
                pass

    def alive(self) -> bool:
        return self.actor is not None

    def submit(self, job: RunJob) -> None:
        """Hand a job to the actor. ``job.result_dir`` / ``job.preview_path`` are in the server's job
        store (``job.work_dir`` is unused: the actor works in its own scratch folder)."""
        self._jobs.put((job.job_no, job.job_id, job.params, Path(job.result_dir), Path(job.preview_path)))

    def cancel(self, job_no: int) -> None:
        if self.actor is not None:
            self.actor.cancel.remote(job_no)

    def read(self, max_messages: int = 64) -> list:
        """Messages waiting (non-blocking). Raises ``ActorDied`` when the actor died."""
        self._drain_wakeups()
        out = []
        while len(out) < max_messages:
            try:
                gen, item = self._q.get_nowait()
            except queue.Empty:
                break
            if not self._current(gen):
                continue
            if isinstance(item, WorkerReady):
                self.pid = item.pid
            if isinstance(item, ActorDied):
                if out:  # report the messages first, the death on the next read
                    self._q.put((gen, item))
                    os.write(self._wfd, b"x")
                    break
                raise item
            out.append(item)
        return out

    def kill(self) -> None:
        """Kill the actor (no restart by Ray: the server starts a new one)."""
        with self._lock:
            self._generation += 1
        self._jobs.put(None)
        actor, self.actor = self.actor, None
        ray = sys.modules.get("ray")
        if actor is not None and ray is not None and ray.is_initialized():
            # ray.kill blocks while the cluster's GCS is unreachable: never in the control loop
            threading.Thread(target=_kill_actor, args=(ray, actor), name="conjure-ray-kill", daemon=True).start()
        self.ready = False

    def stop(self, timeout: float = 2.0) -> None:
        self.kill()
        if self._thread is not None:
            self._thread.join(timeout)
        for fd in (self._rfd, self._wfd):
            with contextlib.suppress(OSError):
                os.close(fd)


class _FileWriter:
    """Writes ``("file", header, chunk)`` items into ``result_dir``: ``name.tmp`` -> fsync -> SHA-256
    check against the actor's -> rename. ``check()`` returns a problem ('' when every file is good)."""

    def __init__(self, result_dir: Path):
        self.result_dir = Path(result_dir)
        self.open: dict[str, tuple] = {}
        self.problems: list[str] = []

    def write(self, header: dict, chunk: bytes) -> None:
        name = header["name"]
        if Path(name).name != name or name in ("", ".", ".."):
            self.problems.append(f"refused a result file named {name!r}")
            return
        if name not in self.open:
            self.result_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.result_dir / (name + ".tmp")
            self.open[name] = (open(tmp, "wb"), hashlib.sha256(), tmp)
        f, h, tmp = self.open[name]
        if f.tell() != header["offset"]:
            self.problems.append(f"{name}: chunk at offset {header['offset']} arrived at {f.tell()}")
        f.write(chunk)
        h.update(chunk)
        if header["eof"]:
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
            f.close()
            del self.open[name]
            if size != header["size"] or h.hexdigest() != header["sha256"]:
                tmp.unlink(missing_ok=True)
                self.problems.append(f"{name}: received {size} bytes with SHA-256 {h.hexdigest()[:12]}…, the "
                                     f"worker sent {header['size']} bytes with {header['sha256'][:12]}…")
                return
            os.replace(tmp, self.result_dir / name)

    def check(self) -> str:
        for name, (f, _, tmp) in list(self.open.items()):
            f.close()
            tmp.unlink(missing_ok=True)
            self.problems.append(f"{name}: the transfer ended early")
        self.open.clear()
        if self.result_dir.is_dir():
            fsync_dir(self.result_dir)
        return "; ".join(self.problems)


def _kill_actor(ray, actor) -> None:
    with contextlib.suppress(Exception):
        ray.kill(actor, no_restart=True)


def _short(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "…"

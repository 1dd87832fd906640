"""The worker process: runs the pipeline, one job at a time, and streams events back.

The server starts it with the ``spawn`` start method and talks to it over a
``multiprocessing`` pipe (both ends are our own processes; nothing from the network is ever
unpickled here). The worker is long-lived, so the pipeline's model cache stays resident
between jobs (an optional ``warm_up()`` in the pipeline's module runs once before the worker
reports ready); it is only restarted after a crash, a kill, or a cancel it did not honour.

Server -> worker (pipe): :class:`RunJob` or :class:`Quit`.
Cancel does not go through the pipe (the pipe is not read while the pipeline runs): the server
writes the job number to a shared integer, and ``JobContext.cancelled`` compares it.

Worker -> server (pipe), small frozen dataclasses (see :data:`WorkerMessage`):
    WorkerReady(pid)
    WorkerFatal(message)                 could not import the pipeline; the worker exits
    JobStarted(job_no)
    JobProgress(job_no, event: ProgressEvent)
    JobPreview(job_no, event: PreviewEvent)
    JobResult(job_no, files: {kind: {"name", "size", "sha256"}}, info: dict, mesh: MeshPayload | None)
    JobCancelled(job_no)
    JobFailed(job_no, code, message, retriable: bool, traceback: str)
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import importlib
import importlib.metadata
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from backend.fsutil import atomic_copy, atomic_open, durable_move

DEFAULT_PIPELINE = "backend.pipeline.run:run_job"
PREVIEW_WRITE_INTERVAL_S = 0.5
RESULT_MESH_FILE = "result_mesh.npz"
#: niceness added to the worker process, so the server's control loop stays responsive on busy CPUs
WORKER_NICE = 5


# ---------------------------------------------------------------- pipe messages (both directions)
@dataclass(frozen=True)
class RunJob:
    """Server -> worker: run one job. Paths are strings (pickled across the pipe)."""

    job_no: int
    job_id: str
    params: dict
    work_dir: str
    result_dir: str
    preview_path: str


@dataclass(frozen=True)
class Quit:
    """Server -> worker: exit after the current job."""


@dataclass(frozen=True)
class WorkerReady:
    """The worker imported the pipeline (and ran ``warm_up``)."""

    pid: int


@dataclass(frozen=True)
class WorkerFatal:
    """The worker cannot start the pipeline; it exits after sending this."""

    message: str


@dataclass(frozen=True)
class JobStarted:
    job_no: int


@dataclass(frozen=True)
class JobProgress:
    job_no: int
    event: Any  # backend.pipeline.events.ProgressEvent


@dataclass(frozen=True)
class JobPreview:
    job_no: int
    event: Any  # backend.pipeline.events.PreviewEvent


@dataclass(frozen=True)
class JobResult:
    """Published result: ``files`` maps kind -> {"name", "size", "sha256"}; ``mesh`` a MeshPayload."""

    job_no: int
    files: dict
    info: dict
    mesh: Any = None


@dataclass(frozen=True)
class JobCancelled:
    job_no: int


@dataclass(frozen=True)
class JobFailed:
    job_no: int
    code: str
    message: str
    retriable: bool
    traceback: str = ""


@dataclass(frozen=True)
class WorkerLost:
    """Not sent by the worker: the pool reports that the worker process exited (``exitcode``) while
    running job ``job_no`` (None when idle) or while starting (``starting``). ``reason`` says what
    happened when the exit code cannot (a Ray actor whose process or node died)."""

    job_no: int | None
    exitcode: int | None
    starting: bool = False
    reason: str = ""


WorkerMessage = (WorkerReady | WorkerFatal | JobStarted | JobProgress | JobPreview | JobResult | JobCancelled
                 | JobFailed | WorkerLost)


class PipelineSpecError(ValueError):
    """A ``module:function`` pipeline spec that cannot be imported."""


def load_callable(spec: str):
    """Import ``"package.module:function"`` and return the function."""
    if ":" not in spec:
        raise PipelineSpecError(f"pipeline {spec!r} must look like package.module:function")
    mod_name, func_name = spec.split(":", 1)
    try:
        module = importlib.import_module(mod_name)
    except Exception as exc:  # ImportError, or anything the module raises while importing
        raise PipelineSpecError(f"cannot import pipeline module {mod_name!r}: {type(exc).__name__}: {exc}") from exc
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise PipelineSpecError(f"pipeline module {mod_name!r} has no function {func_name!r}")
    return fn


_VERSIONS: dict | None = None


def package_versions() -> dict:
    """Versions of the packages that shape a result (None when not installed). Cached."""
    global _VERSIONS
    if _VERSIONS is None:
        out = {"python": sys.version.split()[0]}
        for name in ("conjure", "torch", "diffusers", "transformers", "gsplat", "diffrp-nvdiffrast",
                     "nvdiffrast", "trimesh", "xatlas", "numpy", "pyzmq"):
            try:
                out[name] = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                out[name] = None
        _VERSIONS = out
    return dict(_VERSIONS)


def sha256_file(path: Path, chunk: int = 1 << 20) -> tuple[int, str]:
    """(size in bytes, hex SHA-256) of a file."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            size += len(block)
            h.update(block)
    return size, h.hexdigest()


def publish_results(files: dict, work_dir: Path, result_dir: Path) -> dict:
    """Make the pipeline's files durable in ``result_dir`` (:mod:`backend.fsutil`): fsync, rename
    and fsync the folder, or an atomic durable copy when the file lives outside ``work_dir``.

    File names are kept (an OBJ names its MTL, the MTL its PNG). Returns
    ``{kind: {"name", "size", "sha256"}}``. Raises ``ValueError`` if 'glb' is missing.
    """
    if "glb" not in files:
        raise ValueError("the pipeline returned no 'glb' file")
    result_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for kind, src in files.items():
        src = Path(src)
        dst = result_dir / src.name
        if src.resolve().parent == Path(work_dir).resolve():
            durable_move(src, dst)
        else:
            atomic_copy(src, dst)
        size, digest = sha256_file(dst)
        out[str(kind)] = {"name": dst.name, "size": size, "sha256": digest}
    return out


def write_preview_npz(path: Path, mesh) -> None:
    """Save a ``MeshPayload`` as ``.npz`` (arrays named after its fields), atomically (not fsynced)."""
    import numpy as np

    from protocol.mesh import MESH_FIELDS

    arrays = {}
    for name in MESH_FIELDS:  # every field of the wire format, so a new one is never dropped here
        value = getattr(mesh, name, None)
        if value is not None:
            arrays[name] = np.frombuffer(value, np.uint8) if name == "texture_png" else np.asarray(value)
    with atomic_open(path, durable=False) as f:  # previews are rewritten often and cheap to lose
        np.savez(f, **arrays)


def read_mesh_npz(path: Path):
    """Inverse of :func:`write_preview_npz`: a ``MeshPayload`` or None if the file is missing/bad."""
    import numpy as np

    from protocol.mesh import MeshPayload

    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError):
        return None
    if "positions" not in arrays or "faces" not in arrays:
        return None
    png = arrays.pop("texture_png", None)
    return MeshPayload(texture_png=None if png is None else png.tobytes(), **arrays)


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")


def classify_error(exc: BaseException) -> tuple[str, bool]:
    """(error code, retriable) for a failed job. ``ModelNotFoundError`` -> ``model_not_found``;
    ``ValueError`` -> ``invalid_params``; out of memory -> ``out_of_memory``; else ``pipeline_error``."""
    if _is_oom(exc):
        return "out_of_memory", True
    name = type(exc).__name__
    if name == "ModelNotFoundError":
        return "model_not_found", False
    if isinstance(exc, ValueError):
        return "invalid_params", False
    if name.endswith("Error") and type(exc).__module__.startswith("backend."):
        return _snake(name[:-5]) + "_error", False
    return "pipeline_error", True


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    name = type(exc).__name__
    return name.endswith("OutOfMemoryError") or "out of memory" in str(exc).lower()


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the server dies (so a kill -9 of the server leaves no orphan)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, daemon=True, name="conjure-parent-watch").start()


def _make_params(params: dict):
    try:
        from protocol.params import GenerationParams
    except ImportError:  # pragma: no cover - the protocol package is always present in the product
        return SimpleNamespace(**params)
    return GenerationParams(**params)


def worker_main(conn, cancel_value, pipeline_spec: str) -> None:
    """Entry point of the worker process (spawned)."""
    _die_with_parent()
    with contextlib.suppress(OSError, AttributeError):
        os.nice(WORKER_NICE)  # the control loop wins the CPU when both want it
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the server, which stops us
    # jobs run with their scratch folder as the working directory (see _run_one): imports must not
    # depend on the directory the server was started from
    sys.path[:] = [os.path.abspath(p) if p else os.getcwd() for p in sys.path]
    try:
        run_job = load_callable(pipeline_spec)
    except PipelineSpecError as exc:
        conn.send(WorkerFatal(str(exc)))
        return
    warm_up = getattr(sys.modules.get(pipeline_spec.split(":", 1)[0]), "warm_up", None)
    if callable(warm_up):
        try:
            warm_up()
        except Exception as exc:
            conn.send(WorkerFatal(f"the pipeline's warm_up() failed: {type(exc).__name__}: {exc}"))
            return
    conn.send(WorkerReady(os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if isinstance(msg, Quit):
            return
        if isinstance(msg, RunJob):
            home = os.getcwd()
            with contextlib.suppress(OSError):  # if this fails, _run_one reports the job's error
                # a relative name in the job (e.g. a Hub id "org/name" that a loader also tries as a
                # folder) resolves inside the job's own, fresh scratch folder, never in the server's
                Path(msg.work_dir).mkdir(parents=True, exist_ok=True)
                os.chdir(msg.work_dir)
            try:
                _run_one(conn, cancel_value, run_job, msg.job_no, msg.job_id, msg.params, msg.work_dir,
                         msg.result_dir, msg.preview_path)
            except (BrokenPipeError, EOFError, OSError):
                return
            finally:
                with contextlib.suppress(OSError):
                    os.chdir(home)


def _run_one(conn, cancel_value, run_job, job_no, job_id, params, work_dir, result_dir, preview_path):
    from backend.mesh.topology import with_edges
    from backend.pipeline.events import Cancelled, PreviewEvent, ProgressEvent, ResultEvent

    from .uploads import run_pipeline

    work_dir, result_dir, preview_path = Path(work_dir), Path(result_dir), Path(preview_path)
    work_dir.mkdir(parents=True, exist_ok=True)
    last_preview_write = [0.0]
    pending_preview = [None]

    def emit(event):
        if isinstance(event, ProgressEvent):
            conn.send(JobProgress(job_no, event))
        elif isinstance(event, PreviewEvent):
            event = dataclasses.replace(event, mesh=with_edges(event.mesh))  # Blender skips calc_edges
            now = time.monotonic()
            if now - last_preview_write[0] >= PREVIEW_WRITE_INTERVAL_S:
                write_preview_npz(preview_path, event.mesh)
                last_preview_write[0] = now
                pending_preview[0] = None
            else:
                pending_preview[0] = event.mesh
            conn.send(JobPreview(job_no, event))

    def cancelled() -> bool:
        return cancel_value.value == job_no

    from backend.pipeline.events import JobContext

    ctx = JobContext(out_dir=work_dir, emit=emit, cancelled=cancelled)
    conn.send(JobStarted(job_no))
    try:
        result = run_pipeline(run_job, params, _make_params, ctx, preview_path.parent)  # generate | texture
        if not isinstance(result, ResultEvent):
            raise TypeError(f"the pipeline returned {type(result).__name__}, not a ResultEvent")
        if pending_preview[0] is not None:
            write_preview_npz(preview_path, pending_preview[0])
        mesh = getattr(result, "mesh", None)
        files = publish_results({**result.files, **_thumbnail(mesh, work_dir)}, work_dir, result_dir)
        if mesh is not None:
            mesh = with_edges(mesh)
            write_preview_npz(preview_path.with_name(RESULT_MESH_FILE), mesh)
        conn.send(JobResult(job_no, files, _plain(result.info), mesh))
    except Cancelled:
        conn.send(JobCancelled(job_no))
    except (BrokenPipeError, EOFError):
        raise
    except BaseException as exc:
        tb = traceback.format_exc(limit=20)
        if _is_oom(exc):
            with contextlib.suppress(Exception):
                torch = sys.modules.get("torch")
                if torch is not None and torch.cuda.is_available():
                    torch.cuda.empty_cache()
            conn.send(JobFailed(job_no, "out_of_memory",
                                f"out of memory while running the job ({type(exc).__name__}: {exc}); try a "
                                "smaller preset such as 'draft', or lower the resolution overrides", True, tb))
        else:
            code, retriable = classify_error(exc)
            text = f"{exc}" if code == "invalid_params" else f"{type(exc).__name__}: {exc}"
            conn.send(JobFailed(job_no, code, text, retriable, tb))
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise


def _thumbnail(mesh, work_dir: Path) -> dict:
    """``{"thumbnail": path}`` of a 128² PNG of the result mesh in ``work_dir``, or {} (no mesh, or
    the render failed: a missing picture must never fail the job)."""
    if mesh is None:
        return {}
    try:
        from backend.mesh.thumbnail import THUMBNAIL_NAME, render_thumbnail

        path = work_dir / THUMBNAIL_NAME
        path.write_bytes(render_thumbnail(mesh, 128))
        return {"thumbnail": path}
    except Exception as exc:
        print(f"conjure worker: no thumbnail ({type(exc).__name__}: {exc})", file=sys.stderr, flush=True)
        return {}


def _plain(obj):
    """JSON-safe copy (paths and numbers as str/float)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "item"):
        with contextlib.suppress(Exception):
            return obj.item()
    return str(obj)


class WorkerDied(Exception):
    """The worker process exited (crash, OOM kill, kill -9)."""

    def __init__(self, exitcode):
        super().__init__(f"worker process exited with code {exitcode}")
        self.exitcode = exitcode


class WorkerHandle:
    """The server's side of one worker process: start, send a job, read events, cancel, kill."""

    def __init__(self, pipeline_spec: str = DEFAULT_PIPELINE):
        self.pipeline_spec = pipeline_spec
        self._mp = multiprocessing.get_context("spawn")
        self.proc = None
        self.conn = None
        self.cancel_value = None
        self.ready = False
        self.pid = None
        self.starts = 0

    def start(self) -> None:
        parent, child = self._mp.Pipe(duplex=True)
        self.cancel_value = self._mp.RawValue("q", 0)
        self.proc = self._mp.Process(target=worker_main, args=(child, self.cancel_value, self.pipeline_spec),
                                     name="conjure-worker", daemon=True)
        self.proc.start()
        child.close()
        self.conn = parent
        self.ready = False
        self.pid = self.proc.pid
        self.starts += 1

    def fileno(self) -> int:
        return self.conn.fileno()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.is_alive()

    def submit(self, job: RunJob) -> None:
        """Send a job to the (ready, idle) worker."""
        self.conn.send(job)

    def run(self, job_no: int, job_id: str, params: dict, work_dir: Path, result_dir: Path,
            preview_path: Path) -> None:
        self.conn.send(RunJob(job_no, job_id, params, str(work_dir), str(result_dir), str(preview_path)))

    def cancel(self, job_no: int) -> None:
        self.cancel_value.value = job_no

    def read(self, max_messages: int = 64) -> list:
        """Messages waiting on the pipe (non-blocking). Raises ``WorkerDied`` on EOF."""
        out = []
        try:
            while len(out) < max_messages and self.conn.poll(0):
                out.append(self.conn.recv())
        except (EOFError, OSError):
            self.proc.join(1.0)
            raise WorkerDied(self.proc.exitcode) from None
        if not out and not self.proc.is_alive():
            # drain anything written before the exit, then report it
            try:
                while self.conn.poll(0):
                    out.append(self.conn.recv())
            except (EOFError, OSError):
                pass
            if not out:
                raise WorkerDied(self.proc.exitcode)
        return out

    def wait_ready(self, timeout: float) -> None:
        """Block until the worker has imported the pipeline. Raises ``PipelineSpecError`` / ``WorkerDied``
        / ``TimeoutError``."""
        if not self.conn.poll(timeout):
            if not self.proc.is_alive():
                raise WorkerDied(self.proc.exitcode)
            raise TimeoutError(f"the worker did not start within {timeout:g} s")
        try:
            msg = self.conn.recv()
        except (EOFError, OSError):
            self.proc.join(1.0)
            raise WorkerDied(self.proc.exitcode) from None
        if isinstance(msg, WorkerFatal):
            raise PipelineSpecError(msg.message)
        if not isinstance(msg, WorkerReady):
            raise RuntimeError(f"unexpected first message from the worker: {type(msg).__name__}")
        self.ready = True

    def kill(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.proc.kill()
            self.proc.join(2.0)
        if self.conn is not None:
            self.conn.close()
        self.ready = False

    def stop(self, timeout: float = 2.0) -> None:
        """Ask the worker to quit; kill it if it does not within ``timeout``."""
        if self.proc is None:
            return
        with contextlib.suppress(OSError, ValueError):
            self.conn.send(Quit())
        self.proc.join(timeout)
        self.kill()

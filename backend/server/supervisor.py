"""Worker supervision: a pool of workers behind one small interface, and the job life cycle on top.

- :class:`WorkerPool` is the seam: ``submit`` a :class:`~backend.server.worker.RunJob`, ``cancel``
  (cooperative) or ``kill_job`` (the job would not stop), ``poll`` for worker messages, ``free``
  capacity, ``fds`` to wait on. :class:`LocalWorkerPool` is one local worker process
  (:class:`~backend.server.worker.WorkerHandle`) that it restarts after a crash (with back-off
  while the pipeline fails to start). A pool of N processes or Ray actors fits the same interface.
- :class:`JobSupervisor` moves jobs from the queue to the pool and turns worker messages into
  job events (``progress``, ``preview_mesh``, ``result_ready`` | ``error`` | ``cancelled``) and
  state changes in the job store. It never touches a socket: events go to
  :class:`~backend.server.streams.Delivery`.
"""

from __future__ import annotations

import logging
import signal
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from protocol import ProtocolError, encode_mesh

from . import jobs as J
from .jobs import JobQueue, JobRecord, JobStore, json_safe
from .records import result_content
from .streams import Delivery
from .uploads import worker_params
from .worker import (
    JobCancelled,
    JobFailed,
    JobPreview,
    JobProgress,
    JobResult,
    JobStarted,
    RunJob,
    WorkerDied,
    WorkerFatal,
    WorkerHandle,
    WorkerLost,
    WorkerReady,
)

log = logging.getLogger("conjure.server")

#: longest progress / error text forwarded (the protocol allows 4096 characters)
MAX_TEXT = 2000


class WorkerPool(Protocol):
    """What the supervisor needs from the workers, however many and wherever they run."""

    capacity: int

    def free(self) -> int:
        """Jobs it can take right now."""

    def submit(self, job: RunJob) -> None:
        """Start ``job`` on a free worker (only when ``free() > 0``)."""

    def cancel(self, job_no: int) -> None:
        """Ask the job to stop at its next ``check_cancel`` (cheap, never blocks)."""

    def kill_job(self, job_no: int) -> None:
        """The job ignored cancel: kill its worker and start a fresh one."""

    def poll(self, budget: int) -> list:
        """Worker messages waiting (non-blocking), plus ``WorkerLost`` for workers that died."""

    def fds(self) -> list[int]:
        """File descriptors that become readable when ``poll`` has something."""

    def tick(self, now: float) -> None:
        """Timers (delayed restarts)."""

    def stop(self, timeout: float) -> None:
        """Stop every worker (kill those that do not quit within ``timeout`` seconds)."""

    def describe(self) -> dict:
        """``{"worker_pid", "worker_ready"}`` for stats."""

    def placement(self, job_no: int) -> dict | None:
        """Where job ``job_no`` runs: ``{"name", "kind", "host", "gpu", "pid"}`` (None if unknown)."""


class LocalWorkerPool:
    """One local worker process (capacity 1), restarted when it dies.

    A worker that dies before it is ready is restarted after 1, 2, 4 ... 30 s; one that dies
    while ready is restarted at once. Restarts are counted in ``stats["worker_restarts"]``.
    """

    capacity = 1

    def __init__(self, pipeline_spec: str, stats: dict, handle=None):
        #: a WorkerHandle, or anything with its interface (pool.PinnedWorkerHandle, ray_worker.RayWorkerHandle)
        self.handle = handle if handle is not None else WorkerHandle(pipeline_spec)
        self.stats = stats
        self.job_no: int | None = None  # the job the worker runs
        self._restart_at: float | None = None
        self._failed_starts = 0
        self._open = False  # the handle's pipe is open (its fd may be polled)

    @property
    def pid(self) -> int | None:
        return self.handle.pid

    def start(self, timeout: float) -> None:
        """Start the worker and wait until it is ready (raises what ``wait_ready`` raises)."""
        self.launch()
        self.handle.wait_ready(timeout)

    def launch(self) -> None:
        """Start the worker without waiting for it (``wait_ready`` or a ``WorkerReady`` follows)."""
        self.handle.start()
        self._open = True

    def free(self) -> int:
        ok = self.handle.ready and self.job_no is None and self._restart_at is None
        return 1 if ok else 0

    def submit(self, job: RunJob) -> None:
        self.job_no = job.job_no
        self.handle.submit(job)

    def cancel(self, job_no: int) -> None:
        if job_no == self.job_no:
            self.handle.cancel(job_no)

    def kill_job(self, job_no: int) -> None:
        if job_no == self.job_no:
            self._restart()

    def fds(self) -> list[int]:
        return [self.handle.fileno()] if self._open and self._restart_at is None else []

    def poll(self, budget: int = 256) -> list:
        if self._restart_at is not None:
            return []  # no worker until the delayed restart
        try:
            msgs = self.handle.read(budget)
        except WorkerDied as exc:
            return [self._died(exc)]
        out = []
        for m in msgs:
            if isinstance(m, WorkerReady):
                self.handle.ready = True
                self.handle.pid = m.pid
                self._failed_starts = 0
            elif isinstance(m, WorkerFatal):
                log.error("worker cannot start: %s", m.message)
            else:
                if isinstance(m, (JobResult, JobCancelled, JobFailed)) and m.job_no == self.job_no:
                    self.job_no = None
                out.append(m)
        return out

    def _died(self, exc: WorkerDied) -> WorkerLost:
        lost = WorkerLost(self.job_no, exc.exitcode, starting=not self.handle.ready,
                          reason=getattr(exc, "reason", ""))
        self.job_no = None
        if lost.starting:  # died before it was ready: back off (1, 2, 4 ... 30 s)
            self._failed_starts += 1
            delay = min(30.0, 2.0 ** (self._failed_starts - 1))
            log.error("the worker died while starting (exit code %s); retrying in %.0f s", exc.exitcode, delay)
            self._close()
            self._restart_at = time.monotonic() + delay
        else:
            self._restart()
        return lost

    def _close(self) -> None:
        self._open = False
        self.handle.kill()

    def _restart(self) -> None:
        self._close()
        self.job_no = None
        self.stats["worker_restarts"] += 1
        self.handle.start()
        self._open = True

    def tick(self, now: float) -> None:
        if self._restart_at is not None and now >= self._restart_at:
            self._restart_at = None
            self._restart()

    def stop(self, timeout: float = 2.0) -> None:
        self._open = False
        self.handle.stop(timeout)

    def describe(self) -> dict:
        return {"worker_pid": self.handle.pid, "worker_ready": bool(self.handle.ready)}

    def where(self) -> dict:
        """This worker: ``{"name", "kind", "host", "gpu", "pid", "ready", "job_no"}``."""
        h = self.handle
        return {"name": getattr(h, "name", "local-0"), "kind": getattr(h, "kind", "local"),
                "host": getattr(h, "host", "") or _hostname(), "gpu": getattr(h, "gpu", ""), "pid": h.pid,
                "ready": bool(h.ready), "job_no": self.job_no}

    def placement(self, job_no: int) -> dict | None:
        if job_no != self.job_no:
            return None
        w = self.where()
        return {k: w[k] for k in ("name", "kind", "host", "gpu", "pid")}


@dataclass
class Running:
    """A job handed to the pool: timings for progress/ETA and the cancel request time."""

    job_id: str
    job_no: int
    started: float
    stage: str = ""
    stage_started: float = 0.0
    fraction: float = 0.0
    cancel_requested: float | None = None
    checkpointed_seq: int = 0


class JobSupervisor:
    """Queue -> pool -> events and final states. See the module docstring.

    Args:
        store: the job store (records, journal).
        queue: FIFO of queued job ids.
        pool: the workers.
        delivery: where job events go.
        stats: the server's counter dict (``jobs_done``, ``jobs_failed``, ``jobs_cancelled``).
        cancel_timeout: seconds a cancelled job may run on before its worker is killed.
    """

    def __init__(self, store: JobStore, queue: JobQueue, pool: WorkerPool, delivery: Delivery, stats: dict,
                 cancel_timeout: float):
        self.store = store
        self.queue = queue
        self.pool = pool
        self.delivery = delivery
        self.stats = stats
        self.cancel_timeout = cancel_timeout
        self.running: dict[str, Running] = {}  # job id -> Running, in start order
        self._by_no: dict[int, str] = {}
        self.job_no = 0
        self.backlog: deque = deque()  # worker messages read but not handled yet
        self._last_checkpoint = 0.0

    # ------------------------------------------------------------------ queries
    def running_job(self, job_id: str) -> Running | None:
        return self.running.get(job_id)

    def first_running(self) -> Running | None:
        return next(iter(self.running.values()), None)

    def position(self, job_id: str) -> int | None:
        """How many jobs must end before ``job_id`` can start, counting every worker (0 = running,
        or starts as soon as a worker is free); None when it is neither queued nor running."""
        if job_id in self.running:
            return 0
        pos = self.queue.position(job_id)
        if pos is None:
            return None
        return self._ahead(pos - 1)

    def _ahead(self, queued_before: int) -> int:
        """Jobs that must end before a queued job with ``queued_before`` jobs queued ahead of it can
        start: those jobs plus the running ones, less the workers that can take one (1 worker: the
        plain count of jobs ahead)."""
        return max(0, queued_before + len(self.running) - (max(1, self.pool.capacity) - 1))

    # ------------------------------------------------------------------ requests
    def enqueue(self, rec: JobRecord) -> int:
        """Queue a new job (already in the store); returns :meth:`position` for it."""
        ahead = self._ahead(len(self.queue))
        self.queue.push(rec.job_id)
        return ahead

    def cancel_queued(self, rec: JobRecord) -> None:
        self.queue.remove(rec.job_id)
        self.stats["jobs_cancelled"] += 1
        self.delivery.append(rec, self.delivery.ensure_stream(rec), "cancelled",
                             {"message": "cancelled before it started", "state": "cancelled"}, final=True)
        try:
            self.store.set_state(rec, J.CANCELLED)
        except OSError as exc:  # full disk: cancelled in memory; a restart reports it as interrupted
            log.error("cannot record the cancel of job %s: %s", rec.job_id, exc)

    def request_cancel(self, rec: JobRecord) -> bool:
        """Ask the running job to stop; False if a cancel was already requested."""
        run = self.running[rec.job_id]
        if run.cancel_requested is not None:
            return False
        run.cancel_requested = time.monotonic()
        self.pool.cancel(run.job_no)
        self.delivery.append(rec, self.delivery.ensure_stream(rec), "cancelled",
                             {"message": "cancel requested; the job stops at its next step",
                              "state": "cancelling"}, final=True)
        return True

    # ------------------------------------------------------------------ scheduling
    def maybe_start(self) -> None:
        while self.pool.free() > 0 and len(self.running) < self.pool.capacity:
            job_id = self.queue.pop()
            if job_id is None:
                return
            rec = self.store.get(job_id)
            if rec is None or rec.state != J.QUEUED:
                continue
            self.job_no += 1
            now = time.monotonic()
            self.running[job_id] = Running(job_id, self.job_no, now, stage_started=now)
            self._by_no[self.job_no] = job_id
            try:
                self.store.set_state(rec, J.RUNNING)
            except OSError as exc:  # full disk: the job fails before it runs
                self.running.pop(job_id)
                self._by_no.pop(self.job_no)
                content = self._storage_failure(rec, exc)
                self.delivery.append(rec, self.delivery.ensure_stream(rec), "error", content, final=True)
                continue
            params = worker_params(rec.params_dict(), rec.kind, rec.upload)  # + kind/base_color for texture jobs
            self.pool.submit(RunJob(self.job_no, job_id, params, str(self.store.work_dir(job_id)),
                                    str(self.store.result_dir(job_id)),
                                    str(self.store.job_dir(job_id) / J.PREVIEW_FILE)))
            rec.worker = self.pool.placement(self.job_no)  # which worker (host, GPU) runs it
            try:
                self.store.write_record(rec)  # the state was journaled above; this adds the placement
            except OSError as exc:  # full disk: the job runs; its final write reports the failure
                log.warning("cannot record the worker of job %s: %s", job_id, exc)

    def pump(self, budget: int = 256) -> None:
        """Handle worker messages (at most one preview per call, so it is flushed before a newer one)."""
        backlog = self.backlog
        if not backlog:
            backlog.extend(self.pool.poll(budget))
        while backlog:
            m = backlog.popleft()
            if isinstance(m, WorkerLost):
                self._worker_lost(m)
                continue
            job_id = self._by_no.get(m.job_no)
            run = self.running.get(job_id) if job_id is not None else None
            if run is None:
                continue  # a late message of a job that was already ended (killed / cancelled)
            rec = self.store.get(run.job_id)
            stream = self.delivery.ensure_stream(rec)
            if isinstance(m, JobProgress):
                self._on_progress(rec, stream, run, m.event)
            elif isinstance(m, JobPreview):
                if run.cancel_requested is None:
                    ev = m.event
                    try:
                        meta, bufs = encode_mesh(ev.mesh)
                    except ProtocolError as exc:
                        log.warning("preview of %s dropped: %s", run.job_id, exc)
                        continue
                    self.delivery.set_preview(run.job_id, stream, {"stage": _stage_name(ev.stage),
                                                                   "step": max(0, int(ev.step)), "mesh": meta},
                                              tuple(bufs))
                    break  # flush this preview before a newer one can replace it
            elif isinstance(m, JobResult):
                self._finish_done(rec, m)
            elif isinstance(m, JobCancelled):
                self._finish_cancelled(rec)
            elif isinstance(m, JobFailed):
                log.warning("job %s failed: %s\n%s", run.job_id, m.message, m.traceback)
                if run.cancel_requested is not None:
                    self._finish_cancelled(rec)
                else:
                    self._finish_failed(rec, m.code, m.message, m.retriable)
            elif isinstance(m, JobStarted):
                pass
        self.maybe_start()

    def _worker_lost(self, m: WorkerLost) -> None:
        job_id = self._by_no.get(m.job_no) if m.job_no is not None else None
        run = self.running.get(job_id) if job_id is not None else None
        if run is None:
            return
        rec = self.store.get(run.job_id)
        if run.cancel_requested is not None:
            self._finish_cancelled(rec)
            return
        code = m.exitcode
        if m.reason:
            text = f"{m.reason}; a new worker was started"
        else:
            how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
            hint = " (signal 9 often means the system ran out of memory)" if code == -signal.SIGKILL else ""
            text = f"the worker process {how} while running the job{hint}; it was restarted"
        self._finish_failed(rec, "worker_crashed", text, True)

    def _on_progress(self, rec, stream, run: Running, ev) -> None:
        if run.cancel_requested is not None:
            return
        now = time.monotonic()
        stage = _stage_name(ev.stage)
        if stage != run.stage:
            _close_stage(rec, run, now)
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
        self.delivery.append(rec, stream, "progress", content)

    # ------------------------------------------------------------------ endings
    def _end(self, rec: JobRecord, state: str, msg_type: str, content: dict, buffers=()) -> None:
        """End a job: journal + job.json (fsynced) first, then its final event, so nothing reaches a
        client before the disk. When the disk refuses the write (full), the job ends ``failed`` with
        code ``disk_full`` instead; its partial files are removed and the server goes on."""
        run = self.running.pop(rec.job_id, None)
        if run is not None:
            _close_stage(rec, run, time.monotonic())
            self._by_no.pop(run.job_no, None)
        stream = self.delivery.ensure_stream(rec)
        stream.drop_preview()  # the final event supersedes any preview not sent yet
        if not stream.closed:
            rec.last_seq = stream.last_seq + 1  # the seq the final event gets (persisted with the state)
        try:
            self.store.set_state(rec, state)
        except OSError as exc:
            if state == J.DONE:
                self.stats["jobs_done"] -= 1
            elif state == J.FAILED:
                self.stats["jobs_failed"] -= 1
            elif state == J.CANCELLED:
                self.stats["jobs_cancelled"] -= 1
            msg_type, content, buffers = "error", self._storage_failure(rec, exc), ()
        self.delivery.append(rec, stream, msg_type, content, buffers, final=True)
        self.delivery.trim(keep=self.active_ids())

    def _storage_failure(self, rec: JobRecord, exc: OSError) -> dict:
        """The job's state could not be written: fail it (on disk if possible, else in memory) and
        return the content of its ``error`` event."""
        code = "disk_full" if J.is_disk_full(exc) else "storage_error"
        what = "the disk holding the data directory is full" if code == "disk_full" else \
            f"the data directory cannot be written ({exc.strerror or exc})"
        log.error("job %s: cannot record its final state: %s", rec.job_id, exc)
        rec.error = {"code": code, "message": f"{what}, so the job could not be saved; free some space and "
                     "submit it again", "retriable": True}
        rec.results = {}
        self.stats["jobs_failed"] += 1
        self.stats["storage_errors"] = self.stats.get("storage_errors", 0) + 1
        self.store.discard_partial(rec.job_id, results=True)
        try:
            self.store.set_state(rec, J.FAILED)  # often fits once the scratch folder is gone
        except OSError:
            rec.state = J.FAILED  # memory only; a restart reports the job as interrupted
        return {"code": rec.error["code"], "message": rec.error["message"], "retriable": True, "state": "failed"}

    def _finish_done(self, rec, m: JobResult) -> None:
        rec.results = m.files
        rec.info = json_safe(m.info or {})
        self.stats["jobs_done"] += 1
        content, buffers = result_content(rec, m.mesh)
        self._end(rec, J.DONE, "result_ready", content, buffers)

    def _finish_cancelled(self, rec) -> None:
        self.stats["jobs_cancelled"] += 1
        self._end(rec, J.CANCELLED, "cancelled", {"message": "cancelled", "state": "cancelled"})

    def _finish_failed(self, rec, code, message, retriable) -> None:
        message = str(message)[:MAX_TEXT]
        rec.error = {"code": code, "message": message, "retriable": bool(retriable)}
        self.stats["jobs_failed"] += 1
        if code == "disk_full":
            self.store.discard_partial(rec.job_id)
        self._end(rec, J.FAILED, "error", {"code": code, "message": message, "retriable": bool(retriable),
                                           "state": "failed"})

    # ------------------------------------------------------------------ timers / stop
    def timers(self, now: float) -> None:
        """Delayed restarts, the running jobs' seq checkpoints (every second), cancel time-outs."""
        self.pool.tick(now)
        if now - self._last_checkpoint > 1.0:
            self._last_checkpoint = now
            self.delivery.trim(keep=self.active_ids())
            for run in self.running.values():  # checkpoint the seq (no fsync: for crash recovery)
                rec = self.store.get(run.job_id)
                if rec is not None and rec.last_seq != run.checkpointed_seq:
                    try:
                        self.store.write_record(rec, durable=False)
                        run.checkpointed_seq = rec.last_seq
                    except OSError as exc:  # full disk: the job goes on; the final write decides
                        log.warning("cannot checkpoint job %s: %s", run.job_id, exc)
        for run in list(self.running.values()):
            if run.cancel_requested is not None and time.monotonic() - run.cancel_requested > self.cancel_timeout:
                log.warning("job %s did not stop within %.1f s of cancel; killing the worker", run.job_id,
                            self.cancel_timeout)
                self._finish_cancelled(self.store.get(run.job_id))
                self.pool.kill_job(run.job_no)

    def shutdown(self) -> None:
        """Running and queued jobs become ``interrupted``; the workers stop."""
        for run in list(self.running.values()):
            rec = self.store.get(run.job_id)
            if rec is not None and rec.state == J.RUNNING:
                rec.error = {"code": "interrupted", "message": "the server was stopped while the job ran"}
                self._set_state_quietly(rec, J.INTERRUPTED)
        self.running.clear()
        for job_id in self.queue.ids():
            rec = self.store.get(job_id)
            if rec is not None:
                rec.error = {"code": "interrupted", "message": "the server was stopped while the job was queued"}
                self._set_state_quietly(rec, J.INTERRUPTED)
        self.pool.stop(2.0)

    def _set_state_quietly(self, rec: JobRecord, state: str) -> None:
        try:
            self.store.set_state(rec, state)
        except OSError as exc:  # full disk at exit: the next start marks the job interrupted anyway
            log.error("cannot record job %s as %s: %s", rec.job_id, state, exc)

    def active_ids(self) -> set[str]:
        """Jobs whose streams must stay in memory: running (a cancelled one may still be waited for)
        and queued."""
        return set(self.running) | set(self.queue.ids())


def _close_stage(rec, run: Running, now: float) -> None:
    """Add the time spent in the current stage to ``rec.timings["stages"]`` (seconds)."""
    if run.stage:
        stages = rec.timings.setdefault("stages", {})
        stages[run.stage] = round(stages.get(run.stage, 0.0) + now - run.stage_started, 4)


def _stage_name(stage) -> str:
    """A stage name that fits the protocol (non-empty, at most 64 characters)."""
    text = str(stage or "run")
    return text[:64]


def _hostname() -> str:
    import socket

    return socket.gethostname()

"""The server's workers: N local processes, or N Ray actors. Builds them; the server supervises them.

``serve --workers N`` (default 1) starts N local worker processes
(:class:`backend.server.worker.WorkerHandle`), each pinned to one GPU with
``CUDA_VISIBLE_DEVICES`` (GPU i for worker i, round robin when there are more workers than
GPUs; on a machine without GPUs the N processes share the CPU cores).

``serve --ray ADDRESS|auto`` makes the workers Ray actors
(:class:`backend.server.ray_worker.RayWorkerHandle`): ``num_gpus=1`` each when the cluster has
GPUs (default count: the cluster's GPUs), else ``num_cpus=1`` each (default count: 1).
``--ray local`` starts a private one-machine Ray instance inside the server (for trying it out).

Every handle has the same interface (``start``, ``wait_ready``, ``fileno``, ``read``, ``run``,
``cancel``, ``kill``, ``stop``, ``ready``, ``pid``) plus ``name``, ``host`` and ``gpu`` (the GPU
it is pinned to, "" on CPU), so the server hands jobs to any free one, first in, first out.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
from dataclasses import dataclass

from .supervisor import LocalWorkerPool
from .worker import RunJob, WorkerHandle

log = logging.getLogger("conjure.server.pool")


def local_gpus() -> list[str]:
    """GPU ids this machine offers, without importing torch: ``$CUDA_VISIBLE_DEVICES`` if set (an
    empty value means none), else the indices ``nvidia-smi`` lists, else ``[]``."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


class PinnedWorkerHandle(WorkerHandle):
    """A local worker process that sees one GPU (``CUDA_VISIBLE_DEVICES=gpu``), or all cores on CPU."""

    def __init__(self, pipeline_spec: str, gpu: str = "", name: str = "local"):
        super().__init__(pipeline_spec)
        self.gpu = gpu
        self.name = name
        self.kind = "local"
        self.host = socket.gethostname()

    def start(self) -> None:
        if not self.gpu:
            super().start()
            return
        # the spawned interpreter copies os.environ at start: set it for that moment only, so
        # CUDA sees one device before torch is ever imported in the child
        old = os.environ.get("CUDA_VISIBLE_DEVICES")
        os.environ["CUDA_VISIBLE_DEVICES"] = self.gpu
        try:
            super().start()
        finally:
            if old is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = old


@dataclass
class PoolSpec:
    """What ``serve`` asked for: ``workers`` (None = the default), ``ray`` address or None."""

    pipeline: str
    workers: int | None = None
    ray: str | None = None


def make_workers(spec: PoolSpec) -> list:
    """The worker handles (not started). Raises ``ValueError`` for a bad count and
    :class:`backend.server.ray_worker.RayUnavailable` when Ray is asked for but missing/unreachable."""
    if spec.workers is not None and spec.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {spec.workers}")
    if spec.ray:
        from . import ray_worker

        resources = ray_worker.connect(spec.ray, num_cpus=spec.workers if spec.ray == "local" else None)
        gpus = int(resources.get("GPU", 0))
        if gpus:
            count = spec.workers or gpus
            if count > gpus:
                log.warning("%d Ray workers asked for, the cluster has %d GPUs: %d will wait for a GPU",
                            count, gpus, count - gpus)
            res = {"num_gpus": 1}
        else:
            count = spec.workers or 1
            res = {"num_cpus": 1}
        return [ray_worker.RayWorkerHandle(spec.pipeline, res, name=f"ray-{i}") for i in range(count)]
    count = spec.workers or 1
    gpus = local_gpus()
    if gpus and count > len(gpus):
        log.warning("%d workers on %d GPUs: some GPUs run two workers", count, len(gpus))
    if count == 1 and len(gpus) != 1:
        # one worker sees every GPU, as before --workers existed
        return [PinnedWorkerHandle(spec.pipeline, "", name="local-0")]
    return [PinnedWorkerHandle(spec.pipeline, gpus[i % len(gpus)] if gpus else "", name=f"local-{i}")
            for i in range(count)]


def shutdown_cluster(spec: PoolSpec) -> None:
    """Leave the Ray cluster after the workers stopped (nothing to do for local workers)."""
    if spec.ray:
        from . import ray_worker

        ray_worker.disconnect()


class MultiWorkerPool:
    """N workers behind the supervisor's :class:`~backend.server.supervisor.WorkerPool` seam.

    Each worker is a :class:`~backend.server.supervisor.LocalWorkerPool` slot around one handle
    (a local process or a Ray actor), which restarts it after a crash (with back-off while it
    fails to start) or a kill. A job goes to the first free slot; the queue stays in the
    supervisor, so jobs start first in, first out on whichever worker frees up first.
    The handles are made in :meth:`start` (joining the Ray cluster can fail: ``RayUnavailable``).
    """

    def __init__(self, spec: PoolSpec, stats: dict):
        self.spec = spec
        self.stats = stats
        self.slots: list[LocalWorkerPool] = []
        self._next_poll = 0  # round robin, so a chatty worker cannot starve the others

    @property
    def capacity(self) -> int:
        return len(self.slots)

    @property
    def pid(self) -> int | None:
        return self.slots[0].pid if self.slots else None

    def start(self, timeout: float) -> None:
        """Make and start every worker, then wait until all are ready (they load in parallel)."""
        self.slots = [LocalWorkerPool(self.spec.pipeline, self.stats, handle=h) for h in make_workers(self.spec)]
        for slot in self.slots:
            slot.launch()
        for slot in self.slots:
            slot.handle.wait_ready(timeout)

    def free(self) -> int:
        return sum(slot.free() for slot in self.slots)

    def submit(self, job: RunJob) -> None:
        slot = next(s for s in self.slots if s.free())
        slot.submit(job)

    def _slot_of(self, job_no: int) -> LocalWorkerPool | None:
        return next((s for s in self.slots if s.job_no == job_no), None)

    def cancel(self, job_no: int) -> None:
        slot = self._slot_of(job_no)
        if slot is not None:
            slot.cancel(job_no)

    def kill_job(self, job_no: int) -> None:
        slot = self._slot_of(job_no)
        if slot is not None:
            slot.kill_job(job_no)

    def poll(self, budget: int = 256) -> list:
        out: list = []
        n = len(self.slots)
        share = max(16, budget // max(1, n))
        for i in range(n):
            slot = self.slots[(self._next_poll + i) % n]
            out.extend(slot.poll(share))
        self._next_poll = (self._next_poll + 1) % max(1, n)
        return out

    def fds(self) -> list[int]:
        return [fd for slot in self.slots for fd in slot.fds()]

    def tick(self, now: float) -> None:
        for slot in self.slots:
            slot.tick(now)

    def placement(self, job_no: int) -> dict | None:
        slot = self._slot_of(job_no)
        return slot.placement(job_no) if slot is not None else None

    def stop(self, timeout: float = 2.0) -> None:
        for slot in self.slots:
            slot.stop(timeout)
        shutdown_cluster(self.spec)

    def describe(self) -> dict:
        """Stats: ``worker_pid`` / ``worker_ready`` of the first worker (as with one worker), and
        ``workers``: every worker's name, kind, host, GPU, pid, readiness and job number."""
        workers = [slot.where() for slot in self.slots]
        return {"worker_pid": workers[0]["pid"] if workers else None,
                "worker_ready": bool(workers) and all(w["ready"] for w in workers),
                "workers": workers}

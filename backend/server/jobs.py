"""Job records, the FIFO queue, the append-only journal and the data-directory layout.

Data directory (``--data-dir``; default :func:`default_data_dir`)::

    <data dir>/
        journal.jsonl          one JSON object per line: {"t", "job_id", "state", ...}; fsynced per line
        <job id>/
            job.json           the job record (prompt, params, seed, preset, timings, versions, state,
                               result files with size + SHA-256, error), rewritten atomically
                               (backend.fsutil: tmp -> fsync -> rename -> fsync folder)
            preview.npz        the latest preview mesh (written by the worker, tmp -> rename)
            input_mesh.npz     a texture job's uploaded mesh (written before the job is queued)
            work/              the pipeline's scratch folder (``JobContext.out_dir``)
            result/            finished files (GLB, OBJ, MTL, PNG), moved here tmp -> fsync -> rename
                               before ``result_ready`` is sent

Job states: ``queued`` -> ``running`` -> ``done`` | ``failed`` | ``cancelled``; ``interrupted`` is
given at start-up to jobs that were queued or running when the previous server died.
Nothing in this module knows about sockets or torch.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import shutil
import time
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from backend.fsutil import atomic_write_bytes, atomic_write_json, fsync_dir

QUEUED = "queued"
RUNNING = "running"
DONE = "done"
FAILED = "failed"
CANCELLED = "cancelled"
INTERRUPTED = "interrupted"
ACTIVE_STATES = frozenset({QUEUED, RUNNING})
FINAL_STATES = frozenset({DONE, FAILED, CANCELLED, INTERRUPTED})
STATES = ACTIVE_STATES | FINAL_STATES

#: seq jump for the final event of a job interrupted by a server crash (see JobStore.open)
INTERRUPTED_SEQ_GAP = 100_000

RESULT_DIR = "result"
WORK_DIR = "work"
JOB_FILE = "job.json"
PREVIEW_FILE = "preview.npz"
JOURNAL_FILE = "journal.jsonl"
LOCK_FILE = "server.lock"


class DataDirError(Exception):
    """The data directory cannot be used (not creatable, not writable, a file in the way)."""


class DataDirLocked(DataDirError):
    """Another server holds the data directory's lock."""


def is_disk_full(exc: BaseException) -> bool:
    """True for ENOSPC / EDQUOT (no space or quota left)."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def json_safe(obj):
    """A copy of ``obj`` that strict JSON can encode: NaN and ±inf become None (recursively)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def default_data_dir() -> Path:
    """``$CONJURE_DATA_DIR``, else ``$XDG_DATA_HOME/conjure/jobs``, else ``~/.local/share/conjure/jobs``."""
    env = os.environ.get("CONJURE_DATA_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "conjure" / "jobs"


def valid_job_id(job_id: object) -> bool:
    """True for a canonical UUID string (the only thing ever used as a folder name)."""
    if not isinstance(job_id, str) or len(job_id) != 36:
        return False
    try:
        return str(uuid.UUID(job_id)) == job_id.lower()
    except ValueError:
        return False


@dataclass
class JobRecord:
    """Everything the server knows about one job; ``to_json`` is what ``job.json`` holds.

    Times are UNIX seconds (float). ``results`` maps a kind ('glb', 'obj', 'mtl', 'png', ...) to
    ``{"name": file name in result/, "size": bytes, "sha256": hex}``.
    """

    job_id: str
    prompt: str
    negative_prompt: str = ""
    seed: int | None = None
    preset: str = "auto"
    overrides: dict = field(default_factory=dict)
    state: str = QUEUED
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    timings: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    results: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    error: dict | None = None
    pipeline: str = ""
    last_seq: int = 0
    #: the worker that ran it: {"name", "kind" ("local" | "ray"), "host", "gpu", "pid"}
    worker: dict | None = None
    #: 'generate' or 'texture'; a texture job's upload summary (sha256, vertices, faces, base_color)
    kind: str = "generate"
    upload: dict | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> JobRecord:
        """Build from ``job.json``; non-finite numbers an older server stored become None."""
        names = set(cls.__dataclass_fields__)
        return cls(**{k: json_safe(v) for k, v in obj.items() if k in names})

    def params_dict(self) -> dict:
        return {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "seed": self.seed,
            "preset": self.preset,
            "overrides": dict(self.overrides),
        }

    def duration_s(self) -> float | None:
        """Seconds from start to finish (None until the job ended after running)."""
        if self.started is None or self.finished is None:
            return None
        return round(max(0.0, self.finished - self.started), 3)

    def result_facts(self) -> dict:
        """What ran and how it went, for ``result_ready`` and ``jobs``: ``warnings`` (list of str),
        ``resolved_preset``, ``model``, ``device``, ``seed``, ``duration_s`` (those known)."""
        info = self.info or {}
        out = {"warnings": [str(w) for w in info.get("warnings") or []]}
        for key in ("resolved_preset", "model", "device"):
            if isinstance(info.get(key), str):
                out[key] = info[key]
        seed = info.get("seed", self.seed)
        if isinstance(seed, int) and not isinstance(seed, bool):
            out["seed"] = seed
        duration = self.duration_s()
        if duration is None and self.started is not None:  # the result event is built just before finishing
            duration = round(max(0.0, time.time() - self.started), 3)
        if duration is None and isinstance(info.get("seconds"), (int, float)):
            duration = round(float(info["seconds"]), 3)
        if duration is not None:
            out["duration_s"] = duration
        return out

    def summary(self) -> dict:
        """Short description for ``list_jobs`` / ``status`` replies and ``conjure-backend jobs``
        (times are UNIX seconds; ``thumbnail``: the job has a ``thumbnail.png`` to fetch)."""
        return {
            "job_id": self.job_id,
            "state": self.state,
            "kind": self.kind,
            "prompt": self.prompt,
            "preset": self.preset,
            "seed": self.seed,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "results": {k: {"size": v["size"], "sha256": v["sha256"]} for k, v in self.results.items()},
            "error": self.error,
            "last_seq": self.last_seq,
            "thumbnail": "thumbnail" in self.results,
            **self.result_facts(),  # the seed that ran (the requested one may be None)
            "worker": self.worker,
        }


class Journal:
    """Append-only JSONL file of job state changes; every line is flushed and fsynced.

    A torn last line (power loss, kill -9 mid-write) is ignored when reading.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._f = open(self.path, "ab")

    def append(self, job_id: str, state: str, **extra) -> None:
        """Append one line (flushed, fsynced). On a write error (full disk) the file is cut back to
        where it was, so no torn line is left for the next append to run into."""
        line = json.dumps(json_safe({"t": time.time(), "job_id": job_id, "state": state, **extra}),
                          sort_keys=True, allow_nan=False)
        end = self._f.tell()
        try:
            self._f.write(line.encode() + b"\n")
            self._f.flush()
            os.fsync(self._f.fileno())
        except OSError:
            self._reopen_at(end)
            raise

    def _reopen_at(self, end: int) -> None:
        try:
            self._f.close()  # may fail again flushing the buffer: the data is cut off below anyway
        except OSError:
            pass
        try:
            os.truncate(self.path, end)
        except OSError:
            pass
        self._f = open(self.path, "ab")

    @staticmethod
    def read(path: Path) -> OrderedDict[str, dict]:
        """Latest journal entry per job id, in first-seen order."""
        latest: OrderedDict[str, dict] = OrderedDict()
        try:
            raw = Path(path).read_bytes()
        except FileNotFoundError:
            return latest
        for line in raw.splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if not isinstance(entry, dict) or not valid_job_id(entry.get("job_id")):
                continue
            if entry.get("state") not in STATES:
                continue
            latest[entry["job_id"]] = entry
        return latest

    def rewrite(self, entries: list[dict]) -> None:
        """Replace the journal with ``entries`` (compaction at start-up), atomically."""
        self._f.close()
        data = b"".join(json.dumps(e, sort_keys=True).encode() + b"\n" for e in entries)
        atomic_write_bytes(self.path, data)
        self._f = open(self.path, "ab")

    def close(self) -> None:
        self._f.close()


class JobStore:
    """Job records in memory plus their folders and journal on disk.

    ``open`` recovers the previous run: replays the journal, reads each ``job.json``, and marks
    jobs that were queued or running as ``interrupted`` (journal and job.json both updated).
    """

    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.jobs: OrderedDict[str, JobRecord] = OrderedDict()
        self.journal: Journal | None = None
        self.recovered_interrupted: list[str] = []
        self._lock_fd: int | None = None

    # ---- layout -------------------------------------------------------------------------------
    def job_dir(self, job_id: str) -> Path:
        if not valid_job_id(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return self.data_dir / job_id

    def work_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / WORK_DIR

    def result_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / RESULT_DIR

    def result_path(self, job_id: str, kind: str) -> Path | None:
        rec = self.jobs.get(job_id)
        if rec is None or kind not in rec.results:
            return None
        return self.result_dir(job_id) / rec.results[kind]["name"]

    # ---- life cycle ---------------------------------------------------------------------------
    def open(self) -> JobStore:
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DataDirError(f"cannot create data directory {self.data_dir}: {exc.strerror or exc}") from exc
        if not self.data_dir.is_dir():
            raise DataDirError(f"data directory {self.data_dir} is not a directory")
        probe = self.data_dir / f".write-test-{os.getpid()}"
        try:
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            probe.unlink(missing_ok=True)
            raise DataDirError(f"data directory {self.data_dir} is not writable: {exc.strerror or exc}") from exc
        self._lock()  # before recovery: another live server's running jobs are not "interrupted"
        journal_path = self.data_dir / JOURNAL_FILE
        latest = Journal.read(journal_path)
        # job folders whose journal line was lost still count (job.json is the fuller record)
        for child in sorted(self.data_dir.iterdir()):
            if child.is_dir() and valid_job_id(child.name) and child.name not in latest:
                if (child / JOB_FILE).exists():
                    latest[child.name] = {"job_id": child.name, "state": None}
        self.journal = Journal(journal_path)
        compacted = []
        for job_id, entry in latest.items():
            rec = self._load_record(job_id)
            if rec is None:
                continue
            if entry.get("state") in STATES and rec.state != entry["state"]:
                # the journal is written before job.json: it wins
                rec.state = entry["state"]
            if rec.state in ACTIVE_STATES:
                rec.state = INTERRUPTED
                # events after the last checkpoint were lost with the server: number the final
                # event past anything it can have sent, so re-attached clients do not skip it
                rec.last_seq += INTERRUPTED_SEQ_GAP
                rec.finished = rec.finished or time.time()
                rec.error = {"code": "interrupted", "message": "the server stopped while this job was "
                             "queued or running; submit it again with a new job id"}
                self.recovered_interrupted.append(job_id)
                self.write_record(rec)
            if rec.state == DONE and not self._results_intact(rec):
                rec.state = FAILED
                rec.error = {"code": "result_missing", "message": "result files are missing or damaged"}
                self.write_record(rec)
            self.jobs[job_id] = rec
            compacted.append({"t": time.time(), "job_id": job_id, "state": rec.state})
        self.journal.rewrite(compacted)
        return self

    def _load_record(self, job_id: str) -> JobRecord | None:
        try:
            obj = json.loads((self.job_dir(job_id) / JOB_FILE).read_text())
            rec = JobRecord.from_json(obj)
        except (OSError, ValueError, TypeError):
            return None
        if rec.job_id != job_id or rec.state not in STATES:
            return None
        return rec

    def _results_intact(self, rec: JobRecord) -> bool:
        for info in rec.results.values():
            path = self.result_dir(rec.job_id) / info["name"]
            try:
                if path.stat().st_size != info["size"]:
                    return False
            except OSError:
                return False
        return bool(rec.results)

    def _lock(self) -> None:
        """Exclusive ``flock`` on ``<data dir>/server.lock`` (holds our PID) for the server's lifetime."""
        path = self.data_dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            try:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            finally:
                os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise DataDirLocked(f"data directory {self.data_dir} is in use by another conjure-backend server "
                                    f"(pid {holder}); stop that server, or give this one its own --data-dir"
                                    ) from None
            raise DataDirError(f"cannot lock data directory {self.data_dir}: {exc.strerror or exc}") from exc
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # the lock holds even when the PID cannot be written (full disk)
        self._lock_fd = fd

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()
            self.journal = None
        self.unlock()

    def unlock(self) -> None:
        """Release the data-directory lock (the kernel does this when the process dies)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def discard_partial(self, job_id: str, results: bool = False) -> None:
        """After a write failed (full disk): remove the job's ``*.tmp`` files and its scratch folder
        (and its ``result/`` folder when ``results``: a result whose record could not be written),
        leaving job.json and every other job as they were."""
        d = self.job_dir(job_id)
        for tmp in list(d.glob("*.tmp")) + list((d / RESULT_DIR).glob("*.tmp")):
            tmp.unlink(missing_ok=True)
        shutil.rmtree(d / WORK_DIR, ignore_errors=True)
        if results:
            shutil.rmtree(d / RESULT_DIR, ignore_errors=True)

    def remove(self, job_id: str) -> None:
        """Forget a job that could not be created (its folder is deleted)."""
        self.jobs.pop(job_id, None)
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)

    def add(self, rec: JobRecord) -> None:
        """Create the job folder, write job.json, journal ``queued``."""
        d = self.job_dir(rec.job_id)
        (d / WORK_DIR).mkdir(parents=True, exist_ok=True)
        self.jobs[rec.job_id] = rec
        self.write_record(rec)
        self.journal.append(rec.job_id, rec.state)

    def set_state(self, rec: JobRecord, state: str, **journal_extra) -> None:
        """Journal first (fsynced), then job.json."""
        assert state in STATES, state
        rec.state = state
        now = time.time()
        if state == RUNNING:
            rec.started = now
            rec.timings["queued_s"] = round(now - rec.created, 4)
        elif state in FINAL_STATES:
            rec.finished = now
            if rec.started is not None:
                rec.timings["run_s"] = round(now - rec.started, 4)
        self.journal.append(rec.job_id, state, **journal_extra)
        self.write_record(rec)

    def delete(self, job_id: str) -> None:
        """Forget a finished job and remove its folder (renamed aside first, so a crash midway
        leaves no half job: folders whose name is not a job id are ignored at start-up)."""
        rec = self.jobs.pop(job_id)
        src = self.job_dir(rec.job_id)
        trash = self.data_dir / f".deleted-{rec.job_id}"
        try:
            os.replace(src, trash)
        except FileNotFoundError:
            return
        fsync_dir(self.data_dir)
        shutil.rmtree(trash, ignore_errors=True)

    def write_record(self, rec: JobRecord, durable: bool = True) -> None:
        atomic_write_json(self.job_dir(rec.job_id) / JOB_FILE, json_safe(rec.to_json()), durable=durable)

    def get(self, job_id: str) -> JobRecord | None:
        return self.jobs.get(job_id)

    def list(self) -> list[JobRecord]:
        return list(self.jobs.values())


def read_data_dir(data_dir: Path) -> list[JobRecord]:
    """Read-only listing for ``conjure-backend jobs``: job.json of every job folder, newest first."""
    data_dir = Path(data_dir).expanduser()
    latest = Journal.read(data_dir / JOURNAL_FILE)
    out = []
    if not data_dir.is_dir():
        return out
    for child in data_dir.iterdir():
        if not (child.is_dir() and valid_job_id(child.name)):
            continue
        try:
            rec = JobRecord.from_json(json.loads((child / JOB_FILE).read_text()))
        except (OSError, ValueError, TypeError):
            continue
        entry = latest.get(child.name)
        if entry and entry.get("state") in STATES:
            rec.state = entry["state"]
        out.append(rec)
    out.sort(key=lambda r: r.created, reverse=True)
    return out


class JobQueue:
    """FIFO of job ids waiting for the worker, with a length limit (``queue_full`` past it)."""

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError("queue limit must be at least 1")
        self.limit = limit
        self._items: list[str] = []

    def __len__(self) -> int:
        return len(self._items)

    def full(self) -> bool:
        return len(self._items) >= self.limit

    def push(self, job_id: str) -> int:
        """Append; returns the 1-based position (1 = next to run)."""
        self._items.append(job_id)
        return len(self._items)

    def pop(self) -> str | None:
        return self._items.pop(0) if self._items else None

    def remove(self, job_id: str) -> bool:
        try:
            self._items.remove(job_id)
            return True
        except ValueError:
            return False

    def position(self, job_id: str) -> int | None:
        try:
            return self._items.index(job_id) + 1
        except ValueError:
            return None

    def ids(self) -> list[str]:
        return list(self._items)

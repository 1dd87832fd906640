"""Model downloads started by a client (Blender's preferences): background pulls with progress.

The server keeps one ``PullManager``; ``pull_model`` starts ``backend.models.cache.pull`` on a thread
(one pull per model at a time, any number of models) and ``list_models`` replies with the model list
plus every pull's state, so a client polls it for progress:
``{"id", "state": "running"|"done"|"failed", "done", "total", "unit": "B"|"it", "message", "seconds"}``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass

from backend.models.cache import ModelStoreError, pull
from backend.models.catalogue import BUNDLED_MODEL


@dataclass
class PullState:
    id: str
    state: str = "running"
    done: int = 0
    total: int = 0
    unit: str = "B"
    message: str = ""
    started: float = 0.0
    seconds: float = 0.0


class PullManager:
    """Runs pulls on daemon threads; ``start`` returns at once, ``snapshot`` reports them."""

    def __init__(self, pull_fn=pull) -> None:
        self._pull = pull_fn
        self._lock = threading.Lock()
        self._pulls: dict[str, PullState] = {}
        self._threads: dict[str, threading.Thread] = {}

    def start(self, model_id: str) -> PullState:
        """Start pulling ``model_id`` (or return the running pull). Raises ModelStoreError for a bad id."""
        if not isinstance(model_id, str) or model_id == BUNDLED_MODEL or model_id.count("/") != 1 \
                or model_id.startswith(("/", ".", "~")) or len(model_id) > 200:
            raise ModelStoreError(f"{str(model_id)[:80]!r} is not a Hugging Face model id that can be pulled")
        with self._lock:
            st = self._pulls.get(model_id)
            if st is not None and st.state == "running":
                return st
            st = self._pulls[model_id] = PullState(model_id, started=time.monotonic())
            thread = threading.Thread(target=self._run, args=(st,), name=f"pull-{model_id}", daemon=True)
            self._threads[model_id] = thread
        thread.start()
        return st

    def _run(self, st: PullState) -> None:
        def progress(done: int, total: int, unit: str) -> None:
            st.done, st.total, st.unit = done, total, unit

        try:
            path = self._pull(st.id, progress=False, on_progress=progress)
            st.state, st.message = "done", f"ready in {path}"
        except ModelStoreError as exc:
            st.state, st.message = "failed", str(exc)
        except Exception as exc:
            st.state, st.message = "failed", f"{type(exc).__name__}: {exc}"
        st.seconds = time.monotonic() - st.started

    def wait(self, model_id: str, timeout: float | None = None) -> PullState | None:
        with self._lock:
            thread = self._threads.get(model_id)
        if thread is not None:
            thread.join(timeout)
        return self._pulls.get(model_id)

    def snapshot(self) -> list[dict]:
        out = []
        with self._lock:
            for st in self._pulls.values():
                d = asdict(st)
                d.pop("started")
                if st.state == "running":
                    d["seconds"] = round(time.monotonic() - st.started, 1)
                out.append(d)
        return out


_MANAGER: PullManager | None = None


def manager() -> PullManager:
    """The process-wide pull manager."""
    global _MANAGER
    if _MANAGER is None:
        _MANAGER = PullManager()
    return _MANAGER


def models_reply() -> dict:
    """Content of the server's ``models`` reply: the hello model fields plus every pull's state."""
    from backend.models.info import safe_hello_model_fields

    return {**safe_hello_model_fields(), "pulls": manager().snapshot()}


def start_pull_or_protocol_error(model_id: str) -> dict:
    """Start a pull for a client and return the ``models`` reply; a bad id becomes a ``bad_content`` error."""
    from protocol.errors import ProtocolError

    try:
        manager().start(model_id)
    except ModelStoreError as exc:
        raise ProtocolError("bad_content", str(exc), field="model_id") from None
    return models_reply()

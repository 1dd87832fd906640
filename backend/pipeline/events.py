"""Events the pipeline emits while a job runs. Knows nothing of sockets.

The server turns these into protocol messages; the CLI turns them into a progress bar.
Meshes travel as ``protocol.mesh.MeshPayload`` (Blender frame: metres, Z up, front -Y).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from protocol.mesh import MeshPayload


class Cancelled(Exception):
    """Raised inside the pipeline (by ``JobContext.check_cancel``) when the job was cancelled."""


@dataclass(frozen=True)
class ProgressEvent:
    """One optimisation step done. ``stage`` is 'load', 'coarse', 'fine' or 'export'."""

    stage: str
    step: int
    total: int
    message: str = ""


@dataclass(frozen=True)
class PreviewEvent:
    """An intermediate mesh (vertex colours in the coarse stage, a texture in the fine stage)."""

    stage: str
    step: int
    mesh: MeshPayload


@dataclass(frozen=True)
class ResultEvent:
    """The finished asset. ``files`` maps 'glb' (always), 'obj', 'mtl', 'png' to paths in the job folder."""

    files: dict[str, Path]
    mesh: MeshPayload
    info: dict = field(default_factory=dict)


Event = ProgressEvent | PreviewEvent | ResultEvent


@dataclass
class JobContext:
    """What a running pipeline may touch: its output folder, an event sink and a cancel flag.

    Attributes:
        out_dir: the job's folder (created by the caller); the pipeline writes results here.
        emit: called with each event, from the pipeline's thread.
        cancelled: returns True once the job should stop; polled between steps.
    """

    out_dir: Path
    emit: Callable[[Event], None] = lambda event: None
    cancelled: Callable[[], bool] = lambda: False

    def check_cancel(self) -> None:
        """Raise ``Cancelled`` if the job was cancelled. Call between optimisation steps."""
        if self.cancelled():
            raise Cancelled()

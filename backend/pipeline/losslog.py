"""Per-step losses without a host synchronisation every step.

``float(loss)`` / ``torch.isfinite(loss)`` in an optimisation loop make the CPU wait for the GPU each
step, so the next step's kernels cannot be queued while the current ones run. ``LossLog`` keeps the
losses on the device and copies them to the host in one transfer every ``every`` steps (``every=1`` on
the CPU, where there is nothing to wait for), checking them for NaN/inf at that point.
"""

from __future__ import annotations

import math

import torch


class LossLog:
    """Collect scalar losses into ``out`` (a list of floats), ``every`` steps at a time.

    ``add(step, loss)`` records a 0-d tensor; ``flush()`` copies what is pending and raises
    ``FloatingPointError`` naming the first step whose loss is not finite; ``last`` is the newest
    value on the host (None before the first flush).
    """

    def __init__(self, out: list[float], device: torch.device | str, stage: str, every: int = 10) -> None:
        self.out = out
        self.stage = stage
        self.every = max(1, int(every)) if torch.device(device).type == "cuda" else 1
        self._pending: list[tuple[int, torch.Tensor]] = []

    def add(self, step: int, loss: torch.Tensor) -> None:
        self._pending.append((step, loss.detach()))
        if len(self._pending) >= self.every:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        steps = [s for s, _ in self._pending]
        values = torch.stack([v.float().reshape(()) for _, v in self._pending]).tolist()
        self._pending.clear()
        for step, value in zip(steps, values):
            if not math.isfinite(value):
                raise FloatingPointError(f"{self.stage} stage: non-finite loss {value} at step {step}")
        self.out.extend(values)

    @property
    def last(self) -> float | None:
        return self.out[-1] if self.out else None

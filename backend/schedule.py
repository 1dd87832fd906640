"""One helper for every annealed value in the pipeline (timesteps, learning rates, resolution, ...).

It sits below ``guidance/`` and ``pipeline/`` (both import it; it imports neither). A value that
changes over a run is ``anneal(start, end, step_ratio, kind, begin, finish)`` evaluated at the run's
progress ``step_ratio(step, total_steps)`` in [0, 1] (``step / (total_steps - 1)``).
Before ``begin`` the value is ``start``; after ``finish`` it is ``end``; in between it follows ``kind``:

* ``"constant"`` – always ``start``;
* ``"linear"``   – straight line from ``start`` to ``end``;
* ``"cosine"``   – half a cosine (slow at both ends);
* ``"exp"``      – log-linear (geometric) interpolation, for learning rates (``start``/``end`` > 0);
* ``"sqrt"``     – ``start + (end - start) * sqrt(u)`` (fast at first, as DreamFusion's timestep annealing);
* ``"step"``     – ``start`` until ``finish``, then ``end``.

Presets store schedules as plain fields so every value stays overridable
(``coarse.lr_means=0.002`` changes ``start``; ``coarse.lr_means_end=...`` the end).
"""

from __future__ import annotations

import math

KINDS = ("constant", "linear", "cosine", "exp", "sqrt", "step")


def anneal(start: float, end: float, step_ratio: float, kind: str = "linear",
           begin: float = 0.0, finish: float = 1.0) -> float:
    """Value of an annealed quantity at ``step_ratio`` (clamped to [0, 1]); see the module docstring."""
    if kind not in KINDS:
        raise ValueError(f"unknown schedule kind {kind!r}; expected one of {', '.join(KINDS)}")
    if kind == "constant":
        return float(start)
    r = min(max(float(step_ratio), 0.0), 1.0)
    if finish <= begin:
        u = 1.0 if r >= finish else 0.0
    else:
        u = min(max((r - begin) / (finish - begin), 0.0), 1.0)
    if kind == "step":
        return float(end if r >= finish else start)
    if kind == "linear":
        return float(start + (end - start) * u)
    if kind == "cosine":
        return float(start + (end - start) * 0.5 * (1.0 - math.cos(math.pi * u)))
    if kind == "sqrt":
        return float(start + (end - start) * math.sqrt(u))
    # exp
    if start <= 0 or end <= 0:
        raise ValueError(f"an 'exp' schedule needs positive start and end, got {start} and {end}")
    return float(math.exp(math.log(start) + (math.log(end) - math.log(start)) * u))


def step_ratio(step: int, total_steps: int) -> float:
    """Progress of 0-based ``step`` in a run of ``total_steps``: 0 at the first step, 1 at the last."""
    if total_steps <= 1:
        return 1.0
    return min(max(step / (total_steps - 1), 0.0), 1.0)

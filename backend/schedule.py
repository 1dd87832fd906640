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


def dreamtime_prior(t: float, m1: float, m2: float, s1: float, s2: float) -> float:
    """DreamTime's time prior W_p(t) (Huang et al. 2023, "DreamTime: An Improved Optimization
    Strategy for Diffusion-Guided 3D Generation", eq. 8): 1 on [m2, m1], a Gaussian fall-off with
    std ``s1`` above ``m1`` and ``s2`` below ``m2``. All arguments are fractions of the training
    timesteps (the paper's m1 = 800, m2 = 500, s1 = 300, s2 = 100 of 1000 are 0.8, 0.5, 0.3, 0.1)."""
    if t > m1:
        return math.exp(-((t - m1) ** 2) / (2.0 * s1 * s1))
    if t < m2:
        return math.exp(-((t - m2) ** 2) / (2.0 * s2 * s2))
    return 1.0


def dreamtime_timestep(step_ratio: float, t_lo: float, t_hi: float, m1: float = 0.8, m2: float = 0.5,
                       s1: float = 0.3, s2: float = 0.1, bins: int = 1000) -> float:
    """DreamTime's time-prioritised, monotonically non-increasing timestep at run progress ``step_ratio``.

    t(r) is the t where the prior's mass above t reaches r: t(r) = argmin_t |∑_{t' ≥ t} p(t') − r|
    with p = W_p normalised over [t_lo, t_hi] (fractions of the training timesteps). So t(0) = t_hi,
    t(1) = t_lo, and the run spends its steps at each t in proportion to W_p(t).
    """
    r = min(max(float(step_ratio), 0.0), 1.0)
    lo, hi = float(min(t_lo, t_hi)), float(max(t_lo, t_hi))
    if hi - lo < 1e-9:
        return lo
    ts = [hi - (hi - lo) * (i + 0.5) / bins for i in range(bins)]  # descending bin centres
    w = [dreamtime_prior(t, m1, m2, s1, s2) for t in ts]
    total = sum(w) or 1.0
    acc = 0.0
    for t, wi in zip(ts, w):
        acc += wi / total
        if acc >= r:
            return t
    return lo

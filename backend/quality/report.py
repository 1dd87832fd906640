"""The asset-quality judge's report: measures with their numbers, targets and verdicts; tables.

* ``Measure`` — one number (or name) with its target and ``passed`` (True/False; None = shown for
  information, no target).
* ``QualityReport`` — everything the judge found for one mesh: ``passed``, ``failures``,
  ``to_dict()`` (JSON-ready), ``to_markdown()`` (a table a person reads).
* ``runs_table(rows)`` / ``summary(reports)`` / ``summary_markdown(...)`` — many runs at once (the
  benchmark): a row per run, and the pass rate of every measure.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


@dataclass
class Measure:
    """key: short id ('iou', 'speckle', …); label: what it is; value: the number or name measured;
    target: the threshold in words ('≥ 0.80'); passed: True / False / None (information only);
    detail: a few words more (the yaw, the hue margin …)."""

    key: str
    label: str
    value: float | int | str | None
    target: str
    passed: bool | None
    detail: str = ""

    def value_text(self) -> str:
        v = self.value
        if v is None:
            return "—"
        if isinstance(v, float):
            if math.isnan(v):
                return "n/a"
            if math.isinf(v):
                return "inf"
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    def verdict_text(self) -> str:
        return {True: "pass", False: "**FAIL**", None: "info"}[self.passed]


@dataclass
class QualityReport:
    """The judge's findings for one mesh (``backend.quality.judge.judge_mesh``).

    prompt: the prompt (may be empty); shape/colour: the intent judged against; measures: in
    report order; info: extra numbers (mean HSV, face count, seconds the judge took …).
    """

    prompt: str
    shape: str
    colour: str | None
    measures: list[Measure]
    info: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """True when no measure failed (information-only measures never fail)."""
        return not self.failures

    @property
    def failures(self) -> list[str]:
        """Keys of the measures that failed, in report order."""
        return [m.key for m in self.measures if m.passed is False]

    def get(self, key: str) -> Measure | None:
        return next((m for m in self.measures if m.key == key), None)

    def value(self, key: str):
        m = self.get(key)
        return None if m is None else m.value

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "shape": self.shape, "colour": self.colour, "passed": self.passed,
                "failures": self.failures, "measures": [asdict(m) for m in self.measures],
                "info": _jsonable(self.info)}

    def to_markdown(self) -> str:
        head = f"**{self.prompt or self.shape}** (intended: {self.colour or 'any colour'} {self.shape}) — " + (
            "PASS" if self.passed else "FAIL: " + ", ".join(self.failures))
        lines = [head, "", "| measure | value | target | verdict | detail |", "|---|---|---|---|---|"]
        for m in self.measures:
            lines.append(f"| {m.label} | {m.value_text()} | {m.target} | {m.verdict_text()} | {m.detail} |")
        return "\n".join(lines)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if hasattr(x, "item") and callable(x.item):
        return _jsonable(x.item())
    return x


#: Columns of the many-runs table: (measure key, column title).
RUN_COLUMNS: tuple[tuple[str, str], ...] = (
    ("iou", "IoU"), ("hole", "hole"), ("apex", "apex"), ("components", "comp."), ("colour", "colour"),
    ("value", "V"), ("speckle", "speckle /255"), ("seam", "seam ×"), ("tunnels", "tunnels"),
    ("lit", "top/bottom"), ("atlas", "atlas use"),
)


#: Shape-independent names of the measures (summary rows).
KEY_LABELS: dict[str, str] = {
    "iou": "IoU with the intended solid", "hole": "torus hole occupancy", "apex": "apex up",
    "components": "one connected component", "colour": "colour right", "value": "white's value",
    "speckle": "texture speckle", "seam": "seam jump ratio",
}


def _cell(report: QualityReport, key: str) -> str:
    m = report.get(key)
    if m is None:
        return ""
    text = m.value_text()
    return f"**{text}** ✗" if m.passed is False else text


def runs_table(rows: list[tuple[QualityReport, int | None, float | None]]) -> str:
    """Markdown table, one line per run: (report, seed, seconds) → prompt, seed, time, measures, verdict."""
    head = "| prompt | seed | time (s) | " + " | ".join(t for _, t in RUN_COLUMNS) + " | verdict |"
    lines = [head, "|" + "---|" * (len(RUN_COLUMNS) + 4)]
    for rep, seed, seconds in rows:
        t = "" if seconds is None else f"{seconds:.0f}"
        cells = " | ".join(_cell(rep, k) for k, _ in RUN_COLUMNS)
        verdict = "pass" if rep.passed else "fail: " + ", ".join(rep.failures)
        lines.append(f"| {rep.prompt} | {'' if seed is None else seed} | {t} | {cells} | {verdict} |")
    return "\n".join(lines)


def summary(reports: list[QualityReport]) -> dict:
    """Pass counts per measure key over the runs where it applies, and runs passing everything."""
    out: dict[str, dict] = {}
    for rep in reports:
        for m in rep.measures:
            if m.passed is None:
                continue
            s = out.setdefault(m.key, {"label": KEY_LABELS.get(m.key, m.label), "target": m.target, "passed": 0,
                                       "judged": 0})
            s["judged"] += 1
            s["passed"] += bool(m.passed)
    all_ok = sum(r.passed for r in reports)
    return {"measures": out, "runs": len(reports), "runs_passing_all": all_ok}


def summary_markdown(reports: list[QualityReport], seconds: list[float] | None = None) -> str:
    """The summary as markdown: each measure's pass rate, all-pass runs, median time per prompt."""
    s = summary(reports)
    lines = ["| measure | target per run | runs passing | rate |", "|---|---|---|---|"]
    order = list(KEY_LABELS) + [k for k in s["measures"] if k not in KEY_LABELS]
    for key in order:
        m = s["measures"].get(key)
        if m is None:
            continue
        rate = m["passed"] / m["judged"] if m["judged"] else float("nan")
        target = m["target"] if key not in ("iou", "colour") else {"iou": "≥ 0.80 cube/sphere, ≥ 0.75 others",
                                                                  "colour": "the prompt's"}[key]
        lines.append(f"| {m['label']} (`{key}`) | {target} | {m['passed']}/{m['judged']} | {rate:.0%} |")
    n = s["runs"]
    lines.append(f"| every measure | | {s['runs_passing_all']}/{n} | {s['runs_passing_all'] / max(n, 1):.0%} |")
    if seconds:
        import statistics

        lines.append("")
        lines.append(f"Median time per prompt {statistics.median(seconds):.0f} s (target ≤ 90 s), "
                     f"min {min(seconds):.0f} s, max {max(seconds):.0f} s over {len(seconds)} runs.")
    return "\n".join(lines)

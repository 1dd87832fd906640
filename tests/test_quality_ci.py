"""CI subset of the asset-quality benchmark (issue 12 §4): the real pipeline (``cpu`` preset, the
bundled prior, seed 0) on two prompts, judged by the strict judge with its absolute thresholds.

The full benchmark (12 prompts × 3 seeds, contact sheets) is ``bench/bench_quality.py``. Each run
takes about a minute on an idle 2-core machine, hence ``slow``. Today's pipeline does not meet
every target (docs/benchmarks.md, "Issue 12 — after (session 14)"): the red cube's IoU is marginal
(0.770 / 0.785 / 0.805 at seeds 0–2 against 0.80; this run is seed 0), so the full check stays
``xfail``. Until session 14 a process's first job drew its SDS noise differently from later jobs of
the same seed (seeded before the model loaded), so this run's result depended on whether an earlier
test had loaded the bundled prior; it no longer does. The measures both prompts meet with a margin are
asserted strictly, and so are the torus's IoU and hole (IoU 0.81–0.85 against 0.75 in all six torus
runs of the benchmark; the orange torus's hole 0.07 at seed 0, 0.09 and 0.13 at seeds 1 and 2 against
0.15 since the z-variance came in, session 22; a yellow torus at seed 2 has 0.19).

The two runs go in two processes at once (``ProcessPoolExecutor``, spawned): each CPU job uses
``cpu_threads()`` threads (one on a 2-core machine), so side by side they take the time of one, the
same results as one after the other (the thread count, which is what decides the result, is the same).
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from backend.quality.judge import judge_prompt

CI_PROMPTS = ("a red cube", "an orange torus")
#: measures today's cpu preset meets on both prompts (docs/benchmarks.md, "Issue 12 — pipeline
#: ablation"): asserted strictly, so a regression fails CI; the rest stay under the xfail below
MET_TODAY = ("speckle", "colour", "components", "seam")
#: measures met by one prompt only, also asserted strictly
MET_TODAY_BY_PROMPT = {"an orange torus": ("iou", "hole")}


def run_and_judge(prompt: str, out: Path):
    """The QualityReport of one real cpu-preset run of ``prompt`` at seed 0 (in a worker process)."""
    from backend.pipeline.events import JobContext
    from backend.pipeline.run import run_job
    from protocol.params import GenerationParams

    result = run_job(GenerationParams(prompt=prompt, preset="cpu", seed=0), JobContext(out_dir=out))
    return judge_prompt(result.mesh, prompt)


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict:
    """{prompt: QualityReport} for every CI prompt, the runs side by side in spawned processes."""
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(len(CI_PROMPTS), mp_context=spawn) as pool:
        futures = {p: pool.submit(run_and_judge, p, tmp_path_factory.mktemp("quality")) for p in CI_PROMPTS}
        return {p: f.result() for p, f in futures.items()}


@pytest.fixture(params=CI_PROMPTS)
def judged(request, reports):
    """(prompt, QualityReport) of one CI prompt's run, shared by the tests below."""
    return request.param, reports[request.param]


@pytest.mark.slow
def test_cpu_preset_asset_keeps_the_targets_it_meets(judged):
    prompt, report = judged
    broken = [key for key in MET_TODAY + MET_TODAY_BY_PROMPT.get(prompt, ()) if key in report.failures]
    assert not broken, f"{prompt}: {broken}\n{report.to_markdown()}"


@pytest.mark.slow
@pytest.mark.xfail(strict=False, reason="issue 12 targets not yet met (the cube's IoU)")
def test_cpu_preset_asset_meets_the_quality_targets(judged):
    prompt, report = judged
    assert report.passed, report.to_markdown()

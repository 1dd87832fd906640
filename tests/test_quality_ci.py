"""CI subset of the asset-quality benchmark (issue 12 §4): the real pipeline (``cpu`` preset, the
bundled prior, seed 0) on two prompts, judged by the strict judge with its absolute thresholds.

The full benchmark (12 prompts × 3 seeds, contact sheets) is ``bench/bench_quality.py``. Each run
takes 1.5-4 minutes on a loaded 2-core machine, hence ``slow``. Today's pipeline does not meet the
targets (baseline in docs/benchmarks.md, "Issue 12"): the cube fails IoU, speckle and seams, the
torus also its hole; the mark below goes when the pipeline meets them.
"""

from __future__ import annotations

import pytest

from backend.quality.judge import judge_prompt

CI_PROMPTS = ("a red cube", "an orange torus")


@pytest.mark.slow
@pytest.mark.xfail(strict=False, reason="issue 12 targets not yet met")
@pytest.mark.parametrize("prompt", CI_PROMPTS)
def test_cpu_preset_asset_meets_the_quality_targets(prompt, tmp_path):
    from backend.pipeline.events import JobContext
    from backend.pipeline.run import run_job
    from protocol.params import GenerationParams

    result = run_job(GenerationParams(prompt=prompt, preset="cpu", seed=0), JobContext(out_dir=tmp_path))
    report = judge_prompt(result.mesh, prompt)
    assert report.passed, report.to_markdown()

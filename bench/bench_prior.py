"""Text to 3D with the bundled conjure-solids prior through the full pipeline (slow; not run in CI).

Its verdict is relative (best of six solids, no minimum IoU) and never looks at the texture; the
strict asset judge with absolute thresholds is ``bench/bench_quality.py`` (``backend/quality``).
This script remains for the prior's own 2D evaluation (``--prior-only``) and comparison with
older figures.

    python bench/bench_prior.py                 # 12 prompts, cpu preset, prints a table
    python bench/bench_prior.py --prompts 4 --preset cpu --seed 0
    python bench/bench_prior.py --prior-only    # only the 2D evaluation of the prior (every pair)

For each prompt: ``backend.pipeline.run.run_job`` with the given preset, then the result mesh is judged
by ``backend.priors.score3d.judge_mesh``: volumetric IoU with each canonical solid after scale
normalisation and the best rotation about +Z (the shape is right when the prompt's solid has the
highest IoU) and the area-weighted mean surface colour named by hue. Prints prompt, shape verdict,
IoU with the intended solid, colour verdict and wall time, and the success rates.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.quality.prompts import BENCH_PROMPTS

PROMPTS = list(BENCH_PROMPTS)


def run_prompts(prompts, preset: str, seed: int, overrides: dict | None = None) -> list[dict]:
    import importlib

    from backend.pipeline.events import JobContext
    from backend.priors.score3d import judge_mesh
    from protocol.params import GenerationParams

    run_job = importlib.import_module("backend.pipeline.run").run_job  # the coarse helper's module

    rows = []
    for prompt, shape, colour in prompts:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.time()
            params = GenerationParams(prompt=prompt, preset=preset, seed=seed, overrides=dict(overrides or {}))
            result = run_job(params, JobContext(out_dir=Path(tmp)))
            seconds = time.time() - t0
            j = judge_mesh(result.mesh)
        rows.append({"prompt": prompt, "shape": shape, "colour": colour, "judged_shape": j["shape"],
                     "iou": j["ious"][shape], "judged_colour": j["colour"], "seconds": seconds,
                     "faces": int(len(result.mesh.faces))})
        r = rows[-1]
        print(f"  {prompt:20s} -> {r['judged_shape']:8s} IoU {r['iou']:.2f} {str(r['judged_colour']):7s} "
              f"{seconds:6.1f}s", flush=True)
    return rows


def print_table(rows: list[dict]) -> None:
    print()
    print("| prompt | shape (judged) | IoU with intended solid | colour (judged) | time (s) | ok |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ok = r["judged_shape"] == r["shape"] and r["judged_colour"] == r["colour"]
        print(f"| {r['prompt']} | {r['judged_shape']} | {r['iou']:.2f} | {r['judged_colour']} | "
              f"{r['seconds']:.0f} | {'yes' if ok else 'no'} |")
    n = len(rows)
    shape_ok = sum(r["judged_shape"] == r["shape"] for r in rows)
    colour_ok = sum(r["judged_colour"] == r["colour"] for r in rows)
    both = sum(r["judged_shape"] == r["shape"] and r["judged_colour"] == r["colour"] for r in rows)
    times = [r["seconds"] for r in rows]
    print(f"\nshape right {shape_ok}/{n}, colour right {colour_ok}/{n}, both {both}/{n} ({both / n:.0%}); "
          f"time per prompt mean {sum(times) / n:.0f}s max {max(times):.0f}s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help="how many of the 12 prompts to run")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prior-only", action="store_true", help="only the 2D prior evaluation (every pair)")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="a preset override such as guidance.cfg_scale=40 (repeatable)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.prior_only:
        from backend.priors.evaluate import main as eval_main

        return eval_main(["--threads", str(args.threads)])
    from backend.cli import parse_sets

    try:
        overrides = parse_sets(args.override)  # the same KEY=VALUE syntax as `conjure-backend generate --set`
    except ValueError as e:
        ap.error(str(e))
    print(f"text to 3D, preset {args.preset}, seed {args.seed}, torch threads {args.threads}, overrides {overrides}")
    rows = run_prompts(PROMPTS[: args.prompts], args.preset, args.seed, overrides)
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Asset-quality benchmark (issue 12): the real pipeline over the 12-prompt list, judged strictly.

    python bench/bench_quality.py                          # 12 prompts × seeds 0,1,2, cpu preset
    python bench/bench_quality.py --seeds 0 --prompts 0,4  # a subset (indices or prompt texts)
    python bench/bench_quality.py --set fine.steps=80      # preset overrides (generate --set syntax)
    python bench/bench_quality.py --rejudge bench_out/quality/20261130-0620   # judge saved runs again

For each prompt and seed: ``backend.pipeline.run.run_job`` (what ``conjure-backend generate`` runs)
writes the asset; the run folder keeps ``asset.glb``/``.obj``/``.png``, ``mesh.npz`` (the
MeshPayload) and ``run.json`` (seconds, info). ``backend.quality.judge.judge_mesh`` then measures it
against the prompt's intended solid and colour with absolute thresholds, and
``backend.quality.contact_sheet`` writes ``sheet.png`` (four azimuths, the top view and the texture
atlas). The output folder (default ``bench_out/quality/<UTC timestamp>/``, git-ignored) gets
``report.md`` and ``report.json``: a row per run and the summary against the issue-12 targets.
The prompt list lives in ``backend.quality.prompts.BENCH_PROMPTS``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def select_prompts(spec: str | None) -> list[tuple[str, str, str]]:
    """``None`` → all of BENCH_PROMPTS; else comma-separated indices or prompt texts."""
    from backend.quality.prompts import BENCH_PROMPTS, parse_intent

    if not spec:
        return list(BENCH_PROMPTS)
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item.isdigit():
            idx = int(item)
            if idx >= len(BENCH_PROMPTS):
                raise ValueError(f"prompt index {idx} out of range 0..{len(BENCH_PROMPTS) - 1}")
            out.append(BENCH_PROMPTS[idx])
        else:
            intent = parse_intent(item)
            out.append((item, intent.shape, intent.colour))
    return out


def save_mesh_npz(mesh, path: Path) -> None:
    """The MeshPayload's arrays (positions, faces, uvs, texture_rgba, colors where present) as .npz."""
    arrays = {k: getattr(mesh, k) for k in ("positions", "faces", "uvs", "texture_rgba", "colors")
              if getattr(mesh, k, None) is not None}
    import numpy as np

    np.savez_compressed(path, **{k: np.asarray(v) for k, v in arrays.items()})


def generate_run(prompt: str, seed: int, preset: str, overrides: dict, run_dir: Path) -> dict:
    """Run the pipeline once; keep its files in ``run_dir``; return the run record (also run.json)."""
    from backend.pipeline.events import JobContext
    from backend.pipeline.run import run_job
    from protocol.params import GenerationParams

    run_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".job-", dir=run_dir) as tmp:
        t0 = time.perf_counter()
        params = GenerationParams(prompt=prompt, preset=preset, seed=seed, overrides=dict(overrides))
        result = run_job(params, JobContext(out_dir=Path(tmp)))
        seconds = time.perf_counter() - t0
        for path in result.files.values():
            shutil.copy2(path, run_dir / Path(path).name)
    save_mesh_npz(result.mesh, run_dir / "mesh.npz")
    info = {k: v for k, v in (result.info or {}).items() if k != "preset"}
    record = {"prompt": prompt, "seed": seed, "preset": preset, "overrides": overrides,
              "seconds": seconds, "info": info}
    (run_dir / "run.json").write_text(json.dumps(record, indent=1, default=str))
    return record


def judge_folder(out: Path, only: list[tuple[str, int]] | None = None, sheets: bool = True) -> list[dict]:
    """Judge every run in ``out/runs`` (or only the (prompt, seed) pairs given), write the contact
    sheets (``out/sheets/<prompt>_s<seed>.png``), ``report.md`` and ``report.json``; print the table."""
    from backend.quality.contact_sheet import write_contact_sheet
    from backend.quality.judge import judge_prompt, load_mesh
    from backend.quality.prompts import slug
    from backend.quality.report import runs_table, summary, summary_markdown

    dirs = sorted(d for d in (out / "runs").iterdir() if (d / "mesh.npz").exists() and (d / "run.json").exists())
    if only is not None:
        wanted = {f"{slug(p)}_s{seed}" for p, seed in only}
        dirs = [d for d in dirs if d.name in wanted]
    rows = []
    for d in dirs:
        rec = json.loads((d / "run.json").read_text())
        mesh = load_mesh(d / "mesh.npz")
        rep = judge_prompt(mesh, rec["prompt"])
        sheet = None
        if sheets:
            sheet = write_contact_sheet(mesh, out / "sheets" / f"{d.name}.png", rep,
                                        f"{rec['prompt']} - seed {rec['seed']} - {rec['seconds']:.0f} s")
        rows.append({"run": d.name, "prompt": rec["prompt"], "seed": rec["seed"], "seconds": rec["seconds"],
                     "sheet": None if sheet is None else str(sheet.relative_to(out)), "report": rep})
        print(f"  judged {rec['prompt']!r} seed {rec['seed']}: " + ("pass" if rep.passed else
              "FAIL " + ", ".join(rep.failures)), flush=True)
    reports = [r["report"] for r in rows]
    seconds = [r["seconds"] for r in rows]
    table = runs_table([(r["report"], r["seed"], r["seconds"]) for r in rows])
    summ = summary_markdown(reports, seconds)
    print()
    print(table)
    print()
    print(summ)
    overrides = rows and json.loads((out / "runs" / rows[0]["run"] / "run.json").read_text()).get("overrides")
    md = [f"# Asset quality — {out.name}", "", f"Preset overrides: `{overrides}`", "", "## Runs", "", table, "",
          "## Summary against the issue-12 targets", "", summ, "", "## Per run", ""]
    for r in rows:
        md += [r["report"].to_markdown(), "", f"![{r['run']}]({r['sheet']})" if r["sheet"] else "", ""]
    (out / "report.md").write_text("\n".join(md))
    (out / "report.json").write_text(json.dumps(
        {"summary": summary(reports), "median_seconds": statistics.median(seconds) if seconds else None,
         "runs": [dict({k: v for k, v in r.items() if k != "report"}, judge=r["report"].to_dict()) for r in rows]},
        indent=1))
    print(f"\nwrote {out / 'report.md'}, {out / 'report.json'} and {len(rows)} contact sheets in {out / 'sheets'}")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", default=None, help="comma-separated indices into the 12 prompts or prompt texts")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default %(default)s)")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--set", "--override", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="preset override such as fine.steps=80 (repeatable; generate --set syntax)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default bench_out/quality/<timestamp>)")
    ap.add_argument("--rejudge", type=Path, default=None, help="judge the runs already in this folder again")
    ap.add_argument("--generate-only", action="store_true", help="run the pipeline, skip judging and sheets")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (default 1)")
    ap.add_argument("--no-sheets", action="store_true", help="skip the contact sheets")
    args = ap.parse_args(argv)

    from backend.cli import parse_sets
    from backend.pipeline.presets import get_preset

    try:
        overrides = parse_sets(args.sets)
        get_preset(args.preset, overrides)  # unknown preset / key / value: refuse before any run
        prompts = select_prompts(args.prompts)
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError as e:
        ap.error(str(e))
    if args.jobs < 1:
        ap.error("--jobs must be >= 1")
    out = args.rejudge or args.out or ROOT / "bench_out" / "quality" / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    out.mkdir(parents=True, exist_ok=True)
    from backend.quality.prompts import slug

    tasks = [(p, shape, colour, seed) for seed in seeds for (p, shape, colour) in prompts]
    if args.rejudge is None:
        print(f"asset quality: {len(tasks)} runs, preset {args.preset}, overrides {overrides}, out {out}", flush=True)
        todo = [(p, seed, args.preset, overrides, out / "runs" / f"{slug(p)}_s{seed}") for p, _, _, seed in tasks]
        if args.jobs == 1:
            for t in todo:
                rec = generate_run(*t)
                print(f"  generated {rec['prompt']!r} seed {rec['seed']} in {rec['seconds']:.0f} s", flush=True)
        else:
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(args.jobs) as pool:
                for rec in pool.map(generate_run, *zip(*todo)):
                    print(f"  generated {rec['prompt']!r} seed {rec['seed']} in {rec['seconds']:.0f} s", flush=True)
    if args.generate_only:
        return 0
    judge_folder(out, [(p, seed) for p, _, _, seed in tasks] if args.rejudge is None else None,
                 sheets=not args.no_sheets)
    return 0


if __name__ == "__main__":
    sys.exit(main())

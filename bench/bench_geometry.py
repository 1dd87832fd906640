"""Geometry ablation on saved coarse Gaussians (issue 12): the fine stage alone, judged strictly.

    # 1. run the coarse stage once per prompt/seed and keep its Gaussians (what run_job would mesh)
    python bench/bench_geometry.py coarse --prompts "a red cube,a yellow cone" --seeds 0 --out bench_out/geo
    # 2. run the fine stage (extraction → clean-up → UVs → bake → refine → re-bake) on them, with overrides
    python bench/bench_geometry.py fine --out bench_out/geo --tag taubin --set fine.smooth_iterations=10
    # or judge the coarse shapes alone: the preset's extraction (grid, faces, iso level), no fine stage
    python bench/bench_geometry.py extract --out bench_out/geo

The coarse stage is the same call ``backend.pipeline.run.run_job`` makes (same seed, same RNG
draws, same preset), so a ``fine`` row differs from a full ``generate`` run only by the global
RNG state the fine stage's SDS noise starts from (re-seeded here with the job's seed). Extraction
and fine-stage settings can then be compared on identical coarse shapes, several times faster than
full runs. ``fine`` writes ``<out>/<tag>/<prompt>_s<seed>/`` (``mesh.npz``, ``sheet.png``) and
prints one row per run: IoU, components, torus hole, apex, tunnels, fine-stage seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _prompts(spec: str) -> list[str]:
    return [p.strip() for p in spec.split(",") if p.strip()]


def run_coarse(prompt: str, seed: int, preset_name: str, overrides: dict, out: Path) -> dict:
    """The coarse stage exactly as ``run_job`` runs it; saves ``<slug>_s<seed>.pt`` (GaussianModel state)."""
    import torch

    from backend.guidance import load_guidance
    from backend.guidance.loss import sds_loss_fn
    from backend.pipeline.coarse import run_coarse_stage
    from backend.pipeline.events import JobContext
    from backend.pipeline.presets import get_preset
    from backend.pipeline.run import configure_cpu, pick_device, seed_everything
    from backend.quality.prompts import slug

    preset = get_preset(preset_name, overrides)
    device = pick_device()
    if device.type == "cpu":
        configure_cpu()
    t0 = time.perf_counter()
    guidance = load_guidance(preset.guidance, device)
    guidance.set_prompt(prompt, preset.guidance.negative_prompt)
    generator = seed_everything(seed)  # after loading, as run_job seeds
    t1 = time.perf_counter()
    coarse = run_coarse_stage(sds_loss_fn(guidance), preset.coarse, JobContext(out_dir=None), device=device,
                              generator=generator, object_size=preset.object_size,
                              shading=preset.shading if preset.shading.coarse else None)
    t2 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    rec = {"prompt": prompt, "seed": seed, "preset": preset_name, "overrides": overrides,
           "load_seconds": t1 - t0, "coarse_seconds": t2 - t1, "gaussians": len(coarse.gaussians)}
    torch.save({"state": coarse.gaussians.state_dict(), "record": rec}, out / f"{slug(prompt)}_s{seed}.pt")
    return rec


def load_saved(path: Path, preset_name: str, overrides: dict):
    """(saved dict, its record, the preset) for a ``coarse`` output: the record's overrides, then ``overrides``."""
    import torch

    from backend.pipeline.presets import get_preset

    saved = torch.load(path, weights_only=False)
    rec = saved["record"]
    return saved, rec, get_preset(preset_name, dict(rec.get("overrides") or {}, **overrides))


def run_fine(path: Path, preset_name: str, overrides: dict, out: Path, sheets: bool = True) -> dict:
    """The fine stage on saved Gaussians, then ``fit_to_size`` and the judge (+ contact sheet)."""
    import torch

    from backend.gaussians.model import GaussianModel
    from backend.guidance import load_guidance
    from backend.mesh.extract import fit_to_size
    from backend.pipeline.events import JobContext
    from backend.pipeline.fine import run_fine_stage
    from backend.pipeline.run import configure_cpu, seed_everything
    from backend.quality.judge import judge_prompt

    saved, rec, preset = load_saved(path, preset_name, overrides)
    prompt, seed = rec["prompt"], int(rec["seed"])
    configure_cpu()
    guidance = load_guidance(preset.guidance, torch.device("cpu"))
    guidance.set_prompt(prompt, preset.guidance.negative_prompt)
    seed_everything(seed)
    gaussians = GaussianModel.from_state_dict(saved["state"])
    t0 = time.perf_counter()
    fine = run_fine_stage(gaussians, preset, guidance, JobContext(out_dir=None), seed)
    seconds = time.perf_counter() - t0
    mesh = fit_to_size(fine.mesh, preset.object_size)
    report = judge_prompt(mesh, prompt)
    run_dir = out / path.stem
    run_dir.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_quality import save_mesh_npz

    save_mesh_npz(mesh, run_dir / "mesh.npz")
    if sheets:
        from backend.quality.contact_sheet import write_contact_sheet

        write_contact_sheet(mesh, run_dir / "sheet.png", report,
                            f"{prompt} - seed {seed} - {out.name} - fine {seconds:.0f} s")
    m = {x.key: x.value for x in report.measures}
    row = {"prompt": prompt, "seed": seed, "tag": out.name, "overrides": overrides, "fine_seconds": seconds,
           "coarse_seconds": rec["coarse_seconds"], "iou": m.get("iou"), "components": m.get("components"),
           "hole": m.get("hole"), "apex": m.get("apex"), "tunnels": m.get("tunnels"), "speckle": m.get("speckle"),
           "seam": m.get("seam"), "colour": m.get("colour"), "failures": report.failures,
           "info": {k: v for k, v in fine.info.items() if isinstance(v, (int, float, str, bool))}}
    (run_dir / "row.json").write_text(json.dumps(row, indent=1, default=str))
    return row


def run_extract(path: Path, preset_name: str, overrides: dict) -> dict:
    """The coarse Gaussians' own mesh, judged: ``extract_mesh`` at the fine stage's grid, face budget and
    the coarse iso level (no clean-up, no refinement), so coarse settings can be compared without the
    fine stage's noise."""
    from backend.gaussians.model import GaussianModel
    from backend.mesh.carve import carve_views_for
    from backend.mesh.extract import extract_mesh, fit_to_size
    from backend.quality.judge import judge_prompt

    saved, rec, preset = load_saved(path, preset_name, overrides)
    fine = preset.fine
    grid = fine.grid_resolution if fine is not None else preset.coarse.mesh_grid
    faces = fine.face_budget if fine is not None else preset.coarse.mesh_faces
    gaussians = GaussianModel.from_state_dict(saved["state"]).activated().detach()
    mesh = extract_mesh(gaussians, grid_resolution=grid, face_budget=faces, threshold=preset.coarse.density_threshold,
                        carve=carve_views_for(preset.coarse))
    report = judge_prompt(fit_to_size(mesh, preset.object_size), rec["prompt"])
    m = {x.key: x.value for x in report.measures}
    return {"prompt": rec["prompt"], "seed": int(rec["seed"]), "tag": "extract", "overrides": rec.get("overrides"),
            "fine_seconds": 0.0, "coarse_seconds": rec["coarse_seconds"], "iou": m.get("iou"),
            "components": m.get("components"), "hole": m.get("hole"), "apex": m.get("apex"),
            "tunnels": m.get("tunnels"), "seam": None, "failures": [f for f in report.failures
                                                                    if f in ("iou", "hole", "apex", "components")]}


def fmt(row: dict) -> str:
    def f(v, p=3):
        return "" if v is None else (f"{v:.{p}f}" if isinstance(v, float) else str(v))

    return (f"| {row['prompt']} | {row['seed']} | {row['tag']} | {f(row['iou'])} | {f(row['components'])} | "
            f"{f(row['hole'])} | {f(row['apex'])} | {f(row['tunnels'])} | {f(row['seam'], 2)} | "
            f"{row['fine_seconds']:.0f} | {', '.join(row['failures']) or 'pass'} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("coarse", "fine", "extract"))
    ap.add_argument("--prompts", default="a red cube,a blue sphere,a green cylinder,a yellow cone,"
                                         "an orange torus,a purple pyramid")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", type=Path, default=ROOT / "bench_out" / "geo")
    ap.add_argument("--tag", default="default", help="fine: the variant's folder name under --out")
    ap.add_argument("--no-sheets", action="store_true")
    args = ap.parse_args(argv)

    from backend.cli import parse_sets
    from backend.pipeline.presets import get_preset
    from backend.quality.prompts import slug

    overrides = parse_sets(args.sets)
    get_preset(args.preset, overrides)
    prompts = _prompts(args.prompts)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    coarse_dir = args.out / "coarse"
    for seed in seeds:
        for prompt in prompts:
            if args.what == "coarse":
                rec = run_coarse(prompt, seed, args.preset, overrides, coarse_dir)
                print(f"coarse {prompt!r} seed {seed}: {rec['coarse_seconds']:.0f} s "
                      f"(+{rec['load_seconds']:.0f} s load), {rec['gaussians']} Gaussians", flush=True)
            elif args.what == "extract":
                print(fmt(run_extract(coarse_dir / f"{slug(prompt)}_s{seed}.pt", args.preset, overrides)), flush=True)
            else:
                path = coarse_dir / f"{slug(prompt)}_s{seed}.pt"
                row = run_fine(path, args.preset, overrides, args.out / args.tag, sheets=not args.no_sheets)
                print(fmt(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

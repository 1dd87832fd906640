"""2D SDS probe: the guidance's own optimum on a lone image, with no 3D in between (issue 12).

Each 32 × 32 image (RGB in [0, 1], sigmoid logits) starts from a grey disc on a light backdrop and is
optimised with ``DiffusionGuidance.sds_loss`` from a front camera (azimuth 0°, elevation 20°) for
``--steps`` Adam steps (lr 0.03), with the preset's guidance settings and the given overrides. One row of
the output PNG per setting (``;``-separated, each a ``,``-separated list of ``guidance.`` overrides), one
column per prompt and seed. Sessions 7 and 20 of docs/benchmarks.md use it: at CFG 20 it reproduced the
star-shaped pyramid, and interval score matching saturates here although it works in 3D.

``--inversion`` prints, instead, how well DDIM inversion with the unconditional prediction
(``DiffusionGuidance.invert``) round-trips one of the prior's own samples: the inverted image's std at t
and the mean absolute error after denoising it back with as many DDIM steps.

    python bench/bench_sds2d.py --out probe.png --settings "sds_form=eps;sds_form=ism"
    python bench/bench_sds2d.py --inversion
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.guidance import load_guidance
from backend.pipeline.presets import get_preset

FRONT = (torch.tensor([0.0]), torch.tensor([20.0]))


def load(preset: str, setting: str):
    overrides = dict(kv.split("=", 1) for kv in setting.split(",") if kv)
    overrides = {k if "." in k else f"guidance.{k}": v for k, v in overrides.items()}
    return load_guidance(get_preset(preset, overrides=overrides).guidance, "cpu")


def optimise(guidance, prompt: str, seed: int, steps: int) -> np.ndarray:
    """(32, 32, 3) uint8: the image after ``steps`` SDS steps from a grey disc."""
    guidance.set_prompt(prompt)
    torch.manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    disc = ((xx**2 + yy**2) < 0.35).float()
    start = 0.9 * (1 - disc) + 0.5 * disc
    logits = torch.logit(start.clamp(0.02, 0.98)).expand(1, 3, 32, 32).clone().requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=0.03)
    for i in range(steps):
        loss = guidance.sds_loss(torch.sigmoid(logits), *FRONT, i / steps)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (torch.sigmoid(logits)[0].permute(1, 2, 0).detach().numpy() * 255).astype(np.uint8)


def inversion_round_trip(guidance, prompt: str) -> None:
    guidance.set_prompt(prompt)
    torch.manual_seed(0)
    cond = guidance.view_embeddings(*FRONT)
    top = torch.tensor([guidance.bundle.num_train_timesteps - 1])
    x = torch.randn(1, 3, 32, 32)
    alphas = guidance.bundle.alphas_cumprod
    uncond = guidance._uncond.expand(1, -1, -1)
    with torch.no_grad():
        z = guidance.denoise(x, top, guidance.predict_noise(x, top, cond, None, 3.0), cond, None, 50, 3.0)
        for stride in (200, 50, 10):
            for t in (300, 600, 900):
                steps = -(-t // stride)
                z_t, _ = guidance.invert(z, torch.tensor([t]), torch.tensor([t]), steps, None)
                x_k, t_k = z_t, torch.tensor([t])
                for k in range(1, steps + 1):  # back down the same marks, unconditional and unclamped
                    t_next = torch.tensor([round(t * (1 - k / steps))])
                    x_k = guidance.ddim_step(x_k, guidance.unet_noise(x_k, t_k, uncond), t_k, t_next)
                    t_k = t_next
                err = (x_k / alphas[0].sqrt() - z).abs().mean()
                print(f"stride {stride:3d}  t {t}: inverted std {float(z_t.std()):.3f}  round-trip error {float(err):.3f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--settings", default="", help="';'-separated rows, each ','-separated guidance overrides")
    ap.add_argument("--prompts", default="a red cube|a purple pyramid|a yellow cone", help="'|'-separated")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--steps", type=int, default=350)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("sds2d_probe.png"))
    ap.add_argument("--inversion", action="store_true", help="print DDIM inversion round-trip errors instead")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    prompts = [p for p in args.prompts.split("|") if p]
    if args.inversion:
        inversion_round_trip(load(args.preset, args.settings.split(";")[0]), prompts[0])
        return 0
    from PIL import Image

    rows = []
    for setting in args.settings.split(";"):
        guidance = load(args.preset, setting)
        t0 = time.perf_counter()
        row = [optimise(guidance, p, int(s), args.steps) for p in prompts for s in args.seeds.split(",")]
        print(f"{setting or 'preset'}: {time.perf_counter() - t0:.1f} s", flush=True)
        rows.append(np.concatenate(row, 1))
    grid = np.concatenate(rows, 0)
    Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

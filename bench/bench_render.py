"""The pure-PyTorch Gaussian renderer: forward + backward time, against autograd's compositing.

Prints figures, asserts nothing. The scene is what the ``cpu`` preset's coarse stage renders in one
step: N Gaussians (default 3000, the preset's cap; std about 0.05 world units, on and inside the
surface of a 1-unit box) seen by 4 random orbit cameras at 48 px (the preset's final resolution). Each
repeat renders and back-propagates a weighted sum of image, alpha and depth.

Two compositing backwards run on the same scene, interleaved:
  * ``autograd``: the tiles composited by plain tensor ops, differentiated by autograd (the renderer
    before session 22; kept here as the baseline);
  * ``hand``: ``backend.gaussians.render._CompositeTiles``, the shipped compositing with its own backward.
It also prints the largest difference between the two's gradients, relative to the gradient's norm.

Usage: python bench/bench_render.py [--gaussians N] [--size PX] [--views C] [--repeats R] [--threads T]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.gaussians import render
from backend.gaussians.cameras import sample_cameras

SHIPPED_COMPOSITE = render._composite


def autograd_composite(tiles, idx, splats, local_px, tw, T, ts):
    """The renderer's compositing as it was before its hand-written backward: per-pixel differences,
    then alpha, transmittance and weights as tensor ops that autograd differentiates (no depth variance)."""
    assert splats.shape[-1] == render.SPLAT_COLUMNS
    g = idx.clamp_min(0)
    m2, con, opa, col, dep = splats[:, :2], splats[:, 2:5], splats[:, 5].exp(), splats[:, 6:9], splats[:, 9]
    cam_tile = tiles % T
    origin = torch.stack([(cam_tile % tw) * ts, (cam_tile // tw) * ts], -1).to(m2.dtype)
    px = origin[:, None, :] + local_px[None]
    mu = m2[g]
    dx = mu[:, :, None, 0] - px[:, None, :, 0]
    dy = mu[:, :, None, 1] - px[:, None, :, 1]
    cc = con[g]
    sigma = (0.5 * cc[..., 0, None]) * dx * dx + (0.5 * cc[..., 2, None]) * dy * dy + cc[..., 1, None] * dx * dy
    o = torch.where(idx >= 0, opa[g], torch.zeros_like(opa[g]))
    alpha = (o[..., None] * torch.exp(-sigma)).clamp(max=render.ALPHA_MAX)
    alpha = alpha * (alpha.detach() >= render.ALPHA_MIN)
    log1m = torch.log1p(-alpha)
    cum = torch.cumsum(log1m, dim=1)
    alive = cum.detach() > math.log(render.T_MIN)
    w = alpha * torch.exp(cum - log1m) * alive
    rgb = torch.einsum("nkp,nkc->npc", w, col[g])
    acc = w.sum(1)
    dsum = torch.einsum("nkp,nk->np", w, dep[g])
    return rgb, acc, dsum, None


def scene(n: int, seed: int = 0):
    """N Gaussians, half on the surface of the box [-0.5, 0.5]³ and half inside it, as a coarse stage's."""
    g = torch.Generator().manual_seed(seed)
    means = torch.rand(n, 3, generator=g) - 0.5
    on_face = torch.arange(n) % 2 == 0
    axis = torch.randint(0, 3, (n,), generator=g)
    side = torch.where(torch.rand(n, generator=g) < 0.5, -0.5, 0.5)
    means[on_face, axis[on_face]] = side[on_face]
    quats = torch.randn(n, 4, generator=g)
    scales = torch.exp(torch.randn(n, 3, generator=g) * 0.3 - 3.0)
    opacities = torch.sigmoid(torch.randn(n, generator=g) * 2.0)
    colors = torch.rand(n, 3, generator=g)
    return means, quats, scales, opacities, colors


def step(params, cams):
    out = render.render_gaussians(*params, cams, torch.ones(3), backend="torch", retain_means2d=True)
    weights = torch.linspace(-1.0, 1.0, out.image.numel()).reshape(out.image.shape)
    loss = (out.image * weights).sum() + out.alpha.square().sum() + 0.1 * (out.depth * out.alpha).sum()
    t0 = time.perf_counter()
    loss.backward()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gaussians", type=int, default=3000)
    ap.add_argument("--size", type=int, default=48, help="render width = height (pixels)")
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = scene(args.gaussians)
    gen = torch.Generator().manual_seed(1)
    cams = [sample_cameras(args.views, args.size, gen) for _ in range(args.repeats)]
    variants = {"autograd": autograd_composite, "hand": SHIPPED_COMPOSITE}
    times = {k: {"forward": [], "backward": []} for k in variants}
    grads = {}
    for i in range(-1, args.repeats):  # -1: warm-up, not timed
        for name, fn in variants.items():
            render._composite = fn
            params = [t.clone().requires_grad_(True) for t in base]
            t0 = time.perf_counter()
            backward_s = step(params, cams[max(i, 0)])
            total = time.perf_counter() - t0
            if i >= 0:
                times[name]["forward"].append(total - backward_s)
                times[name]["backward"].append(backward_s)
            if i == 0:
                grads[name] = [p.grad for p in params]
    render._composite = SHIPPED_COMPOSITE
    figures = {"gaussians": args.gaussians, "size": args.size, "views": args.views, "threads": args.threads,
               "repeats": args.repeats}
    for name in variants:
        f = statistics.median(times[name]["forward"]) * 1e3
        b = statistics.median(times[name]["backward"]) * 1e3
        figures[name] = {"forward_ms": round(f, 1), "backward_ms": round(b, 1), "total_ms": round(f + b, 1)}
    figures["speedup_total"] = round(figures["autograd"]["total_ms"] / figures["hand"]["total_ms"], 2)
    figures["speedup_backward"] = round(figures["autograd"]["backward_ms"] / figures["hand"]["backward_ms"], 2)
    figures["grad_rel_diff"] = {name: float((a - b).norm() / b.norm().clamp_min(1e-30)) for name, a, b in zip(
        ("means", "quats", "scales", "opacities", "colors"), grads["hand"], grads["autograd"])}
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

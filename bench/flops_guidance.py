"""FLOPs of one SDS guidance step with SD 2.1-base's architecture, counted on meta tensors (no weights, no GPU).

    python3 bench/flops_guidance.py [--time]

Prints the UNet's classifier-free-guidance forward (2B latents of 4x64x64) at batch 1/2/4 and the image
encoder's forward+backward (w.r.t. the image; weights frozen) at 4 x 512^2 for SD's AutoencoderKL and for
TAESD (diffusers AutoencoderTiny), then the per-step totals. ``--time`` also times both encoders on this CPU
at 1 x 128^2 (one thread).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def tflops(fn) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops() / 1e12


def main() -> None:
    from bench_coarse import SD21_BASE_UNET_CONFIG, SD21_BASE_VAE_CONFIG
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(SD21_BASE_UNET_CONFIG).requires_grad_(False)
        encoders = {"AutoencoderKL": AutoencoderKL.from_config(SD21_BASE_VAE_CONFIG).requires_grad_(False),
                    "TAESD": AutoencoderTiny().requires_grad_(False)}
    unet_tf = {}
    for b in (1, 2, 4):
        def fwd(b=b):
            with torch.no_grad():
                unet(torch.empty(2 * b, 4, 64, 64, device="meta"), torch.zeros(2 * b, dtype=torch.long, device="meta"),
                     encoder_hidden_states=torch.empty(2 * b, 77, 1024, device="meta"))
        unet_tf[b] = tflops(fwd)
        print(f"UNet CFG forward, batch {b}: {unet_tf[b]:.2f} TFLOP")
    enc_tf = {}
    for name, vae in encoders.items():
        vae.decoder = None

        def fb(vae=vae):
            x = torch.empty(4, 3, 512, 512, device="meta", requires_grad=True)
            out = vae.encode(x)
            z = out.latents if hasattr(out, "latents") else out.latent_dist.mean
            z.sum().backward()
        enc_tf[name] = tflops(fb)
        print(f"{name} encoder forward+backward, 4 x 512^2: {enc_tf[name]:.2f} TFLOP")
    for name, tf in enc_tf.items():
        total = unet_tf[4] + tf
        print(f"SDS step at batch 4 with {name}: {total:.2f} TFLOP (encoder {100 * tf / total:.0f} %)")
    print(f"TAESD: {enc_tf['AutoencoderKL'] / enc_tf['TAESD']:.1f}x fewer encoder FLOPs, "
          f"{(unet_tf[4] + enc_tf['AutoencoderKL']) / (unet_tf[4] + enc_tf['TAESD']):.2f}x fewer per step")
    if "--time" in sys.argv:
        torch.set_num_threads(1)
        for name, make in (("AutoencoderKL", lambda: AutoencoderKL.from_config(SD21_BASE_VAE_CONFIG)),
                           ("TAESD", AutoencoderTiny)):
            vae = make().eval().requires_grad_(False)
            vae.decoder = None
            x = torch.rand(1, 3, 128, 128, requires_grad=True)

            def step(vae=vae, x=x):
                x.grad = None
                out = vae.encode(x * 2 - 1)
                z = out.latents if hasattr(out, "latents") else out.latent_dist.sample()
                z.sum().backward()
            step()
            t0 = time.perf_counter()
            for _ in range(3):
                step()
            print(f"{name} encoder fwd+bwd on this CPU, 1 x 128^2, 1 thread: "
                  f"{(time.perf_counter() - t0) / 3 * 1000:.0f} ms")


if __name__ == "__main__":
    main()

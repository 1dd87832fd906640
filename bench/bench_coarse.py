"""Coarse-stage benchmark: prints figures, asserts nothing.

Wall seconds (``*_s``) and process CPU seconds (``*_cpu_s``) are printed; on a shared machine the CPU
figure is the steadier one.

CPU (default):
  * steps per second of the coarse stage at the ``cpu`` preset with its guidance ('auto' → the bundled
    prior; a tiny random pixel model when the prior cannot be loaded), split into render
    forward+backward vs the rest;
  * preview-mesh extraction time (preview grid and final grid) and its ratio to one step, measured on
    the Gaussians the run produced;
  * with ``--whole``: the whole ``cpu`` preset through ``run_job`` (coarse + fine + export).

GPU (``--gpu``, CUDA): a random-weight model folder with Stable Diffusion 2.1-base's real UNet
configuration (the config dict below; VAE and text encoder with SD 2.1-base's configs too) is written
and loaded through ``load_guidance`` (the production path), then the ``draft`` preset runs through
``run_job``: seconds per coarse step, peak CUDA memory, time to first preview, whole draft time.

Usage:
  python3 bench/bench_coarse.py [--steps N] [--whole] [--threads T]
  python3 bench/bench_coarse.py --gpu [--model <hub id or folder>] [--steps N]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.guidance import load_guidance  # noqa: E402
from backend.guidance.loss import sds_loss_fn  # noqa: E402
from backend.mesh.extract import extract_mesh  # noqa: E402
from backend.pipeline.coarse import run_coarse_stage  # noqa: E402
from backend.pipeline.events import JobContext, PreviewEvent, ProgressEvent  # noqa: E402
from backend.pipeline.presets import get_preset  # noqa: E402

#: Stable Diffusion 2.1-base's UNet2DConditionModel configuration (unet/config.json of the hub model).
SD21_BASE_UNET_CONFIG = {
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "use_linear_projection": True,
}

SD21_BASE_VAE_CONFIG = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "sample_size": 768, "scaling_factor": 0.18215,
}


def write_sd21_base_random(folder: Path) -> Path:
    """A diffusers-layout folder with SD 2.1-base's architecture and random weights (fp16 on disk)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from tests.tiny_models import write_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(folder / "tokenizer")
    vocab = len(CLIPTokenizer.from_pretrained(str(folder / "tokenizer")))
    CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
        max_position_embeddings=77, hidden_act="gelu", projection_dim=512, bos_token_id=vocab - 2,
        eos_token_id=vocab - 1, pad_token_id=vocab - 1,
    )).half().save_pretrained(str(folder / "text_encoder"))
    UNet2DConditionModel.from_config(SD21_BASE_UNET_CONFIG).half().save_pretrained(str(folder / "unet"))
    AutoencoderKL.from_config(SD21_BASE_VAE_CONFIG).half().save_pretrained(str(folder / "vae"))
    DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  prediction_type="epsilon").save_pretrained(str(folder / "scheduler"))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDPMScheduler"],
    }))
    return folder


def cpu_guidance(preset):
    try:
        return load_guidance(preset.guidance, "cpu")
    except Exception as exc:  # the bundled prior may be missing on this checkout
        from tests.tiny_models import build_tiny_model

        folder = build_tiny_model(Path(tempfile.mkdtemp()) / "tiny", latent=False)
        preset.guidance.model = str(folder)
        g = load_guidance(preset.guidance, "cpu")
        g.description = f"tiny random pixel model (bundled prior unavailable: {type(exc).__name__}: {exc})"
        return g


def timed(fn, repeat=3):
    best_w, best_c, out = float("inf"), float("inf"), None
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        best_w, best_c = min(best_w, time.perf_counter() - w), min(best_c, time.process_time() - c)
    return best_w, best_c, out


def bench_cpu(steps: int | None, whole: bool, threads: int) -> dict:
    torch.set_num_threads(threads)
    preset = get_preset("cpu")
    if steps:
        preset.coarse.steps = steps
    guidance = cpu_guidance(preset)
    guidance.set_prompt("a red cube")
    render_time = [0.0]

    def loss_fn(images, cams, bg, ratio):
        return sds_loss_fn(guidance)(images, cams, bg, ratio)

    torch.manual_seed(0)
    w0, c0 = time.perf_counter(), time.process_time()
    previews = []
    result = run_coarse_stage(loss_fn, preset.coarse, JobContext(out_dir=None, emit=lambda e: previews.append(e)
                                                                 if isinstance(e, PreviewEvent) else None),
                              generator=torch.Generator().manual_seed(0))
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    model = result.gaussians
    # render-only forward+backward at the final resolution, same batch
    from backend.gaussians.cameras import sample_cameras

    cams = sample_cameras(preset.coarse.batch_size, preset.coarse.render_resolution_end,
                          torch.Generator().manual_seed(1))

    def render_fb():
        out = model.render(cams, torch.ones(3), backend="torch")
        out.image.sum().backward()

    rw, rc, _ = timed(render_fb)
    render_time[0] = rw
    gw, gc, _ = timed(lambda: guidance.sds_loss(torch.rand(preset.coarse.batch_size, 3, 64, 64, requires_grad=True),
                                                 cams.azimuth_deg, cams.elevation_deg, 0.5).backward())
    pw, pc, pm = timed(lambda: extract_mesh(model, preset.coarse.preview_grid, preset.coarse.preview_faces,
                                            preset.coarse.density_threshold))
    fw, fc, fm = timed(lambda: extract_mesh(model, preset.coarse.mesh_grid, preset.coarse.mesh_faces,
                                            preset.coarse.density_threshold), repeat=1)
    step_s = result.step_seconds
    figures = {
        "threads": torch.get_num_threads(), "guidance": guidance.description, "steps": preset.coarse.steps, "gaussians": len(model),
        "coarse_wall_s": round(wall, 2), "coarse_cpu_s": round(cpu, 2),
        "steps_per_s": round(preset.coarse.steps / wall, 3), "step_s": round(step_s, 4),
        "render_fwd_bwd_s": round(rw, 4), "render_fwd_bwd_cpu_s": round(rc, 4),
        "guidance_sds_fwd_bwd_s": round(gw, 4), "guidance_sds_cpu_s": round(gc, 4),
        "preview_extract_s": round(pw, 4), "preview_extract_cpu_s": round(pc, 4),
        "preview_grid": preset.coarse.preview_grid, "preview_faces": int(pm.faces.shape[0]),
        "preview_extract_over_step": round(pw / step_s, 3),
        "final_extract_s": round(fw, 4), "final_grid": preset.coarse.mesh_grid, "final_faces": int(fm.faces.shape[0]),
        "final_extract_over_step": round(fw / step_s, 3),
        "previews_emitted": len(previews), "first_preview_s": round(result.first_preview_seconds or -1, 2),
    }
    if whole:
        figures.update(bench_whole("cpu", "a red cube", {}, torch.device("cpu")))
    return figures


def bench_whole(preset_name: str, prompt: str, overrides: dict, device: torch.device) -> dict:
    from backend.pipeline.run import run_job
    from protocol.params import GenerationParams

    stage_first: dict[str, float] = {}
    first_preview = [None]
    t0 = time.perf_counter()
    c0 = time.process_time()

    def emit(event):
        now = time.perf_counter() - t0
        if isinstance(event, ProgressEvent):
            stage_first.setdefault(event.stage, now)
        if isinstance(event, PreviewEvent) and first_preview[0] is None:
            first_preview[0] = now

    with tempfile.TemporaryDirectory() as out:
        result = run_job(GenerationParams(prompt=prompt, seed=0, preset=preset_name, overrides=overrides),
                         JobContext(out_dir=Path(out), emit=emit))
    total = time.perf_counter() - t0
    return {
        f"whole_{preset_name}_s": round(total, 2), f"whole_{preset_name}_cpu_s": round(time.process_time() - c0, 2),
        "stage_start_s": {k: round(v, 2) for k, v in stage_first.items()},
        "time_to_first_preview_s": round(first_preview[0] or -1, 2),
        "coarse_step_s": round(result.info["coarse_step_seconds"], 4),
        "renderer": result.info["renderer"], "faces": result.info["faces"],
    }


def bench_gpu(model: str | None, steps: int | None) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs CUDA")
    device = torch.device("cuda")
    if model is None:
        t = time.perf_counter()
        model = str(write_sd21_base_random(Path(tempfile.mkdtemp()) / "sd21-base-random"))
        print(f"wrote random SD 2.1-base folder in {time.perf_counter() - t:.1f} s", flush=True)
    overrides = {"guidance.model": model}
    if steps:
        overrides["coarse.steps"] = steps
    preset = get_preset("draft", overrides)
    # load once outside the timing (models stay resident, as on a running server)
    t = time.perf_counter()
    load_guidance(preset.guidance, device)
    load_s = time.perf_counter() - t
    torch.cuda.reset_peak_memory_stats(device)
    figures = bench_whole("draft", "a wooden chair", overrides, device)
    figures.update({
        "device": torch.cuda.get_device_name(device), "date": datetime.datetime.now(datetime.UTC).isoformat(),
        "model": model, "model_load_s": round(load_s, 1), "batch": preset.coarse.batch_size,
        "steps": preset.coarse.steps, "peak_mem_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
        "targets": "draft < 60 s on one H100, < 12 GB",
    })
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="CUDA: draft preset with SD 2.1-base's architecture")
    ap.add_argument("--model", default=None, help="--gpu: a hub id or folder instead of random weights")
    ap.add_argument("--steps", type=int, default=None, help="coarse steps (default: the preset's)")
    ap.add_argument("--whole", action="store_true", help="CPU: also time the whole cpu preset via run_job")
    ap.add_argument("--threads", type=int, default=2, help="CPU: torch threads (default 2)")
    args = ap.parse_args()
    figures = bench_gpu(args.model, args.steps) if args.gpu else bench_cpu(args.steps, args.whole, args.threads)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

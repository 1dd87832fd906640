"""Fine-stage benchmark: prints figures, asserts nothing.

Wall-clock seconds (``*_s``) and, where given, process CPU seconds (``*_cpu_s``, summed over
threads) are printed: on a shared machine the CPU figure is the steadier one.

CPU (default):
  * seconds per refinement step at the ``cpu`` preset (render + guidance + Adam), with the split
    render forward+backward vs guidance, and the ratio against a plain rasteriser forward pass
    measured in the same run;
  * extraction (density grid + marching cubes) + clean-up/decimation + xatlas UVs + bake time for
    meshes of ~50k and ~200k faces.

GPU (``--gpu``, CUDA):
  * seconds per step at 512² with Stable Diffusion 2.1-base (``--model``, default the hub id; with
    ``--random-weights`` a random-weight folder with SD 2.1-base's real UNet/VAE/text-encoder
    configuration is written and used, for machines without the weights), peak CUDA memory,
    nvdiffrast vs torch rasteriser ratio.

Usage:
  python3 bench/bench_fine.py                 # CPU figures
  python3 bench/bench_fine.py --skip-large    # only the 50k mesh
  python3 bench/bench_fine.py --gpu [--model stabilityai/stable-diffusion-2-1-base | --random-weights] [--whole]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.guidance.loss import sds_loss_fn  # noqa: E402
from backend.mesh import rasterize as rz  # noqa: E402
from backend.mesh.bake import gaussian_color_fn  # noqa: E402
from backend.pipeline.fine import (  # noqa: E402
    TexturedMesh,
    prepare_textured_mesh,
    random_camera_fn,
    refine,
)
from backend.pipeline.presets import GuidanceConfig, get_preset  # noqa: E402

#: (face budget, extraction grid, texture side, Gaussians) per mesh size
SIZES = ((50_000, 192, 1024, 20_000), (200_000, 384, 2048, 100_000))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bumpy_gaussians(n: int, bumps: int, device: torch.device, seed: int = 0):
    """Activated Gaussians on a bumpy closed surface (more bumps → more marching-cubes faces)."""
    from backend.gaussians.model import Gaussians

    g = torch.Generator().manual_seed(seed)
    d = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1)
    theta = torch.atan2(d[:, 1], d[:, 0])
    phi = torch.acos(d[:, 2].clamp(-1, 1))
    r = 0.6 + 0.08 * torch.sin(bumps * theta) * torch.sin(bumps * phi)
    means = d * r.unsqueeze(-1)
    colors = 0.5 + 0.4 * torch.stack([torch.sin(3 * means[:, 0]), torch.cos(3 * means[:, 1]),
                                      torch.sin(3 * means[:, 2] + 1)], -1)
    scale = 2.2 * math.sqrt(4 * math.pi * 0.6 ** 2 / n)
    return Gaussians(means.to(device), torch.tensor([1.0, 0, 0, 0]).repeat(n, 1).to(device),
                     torch.full((n, 3), scale).to(device), torch.full((n,), 0.9).to(device), colors.to(device))


def bench_prepare(faces_target: int, grid: int, tex_res: int, device: torch.device, n_gauss: int, bumps: int) -> dict:
    """Extraction + clean-up/decimation + UV + bake for one mesh size."""
    from backend.pipeline.fine import extract_surface

    gs = bumpy_gaussians(n_gauss, bumps, device)
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    pos, faces = extract_surface(gs, grid, threshold=0.5)
    _sync(device)
    t1 = time.perf_counter()
    color_fn = gaussian_color_fn(gs.means, gs.quats, gs.scales, gs.opacities, gs.colors)
    mesh = prepare_textured_mesh(pos, faces, color_fn, face_budget=faces_target, texture_resolution=tex_res,
                                 device=device, backend="auto")
    _sync(device)
    t2 = time.perf_counter()
    info = mesh.info
    return {
        "faces_extracted": int(len(faces)), "faces": int(mesh.faces.shape[0]), "grid": grid, "texture": tex_res,
        "gaussians": n_gauss, "extract_s": round(t1 - t0, 2), "cleanup_decimate_s": round(info["seconds_cleanup"], 2),
        "uv_s": round(info["seconds_uv"], 2), "bake_s": round(info["seconds_bake"], 2),
        "total_s": round(t2 - t0, 2), "total_cpu_s": round(time.process_time() - c0, 2),
    }


def _load_guidance(model: str, device: torch.device, fp16: bool):
    from backend.guidance import load_guidance

    return load_guidance(GuidanceConfig(model=model, fp16=fp16), device)


def bench_steps(preset_name: str, device: torch.device, guidance, steps: int, faces: int,
                overrides: dict | None = None) -> dict:
    """Seconds per refinement step at a preset's fine settings on a sphere-like mesh."""
    import trimesh

    preset = get_preset(preset_name, overrides or {})
    cfg = preset.fine
    sub = max(1, min(7, int(round(math.log(max(faces, 80) / 20, 4)))))
    sphere = trimesh.creation.icosphere(subdivisions=sub, radius=0.6)
    mesh: TexturedMesh = prepare_textured_mesh(sphere.vertices, sphere.faces, None, face_budget=faces,
                                               texture_resolution=cfg.texture_resolution, device=device)
    batch = int(cfg.batch_size)
    cam_fn = random_camera_fn(batch, cfg.render_resolution, preset.coarse, seed=0, device=device)
    loss_fn = sds_loss_fn(guidance)
    settings = dataclasses.replace(cfg, steps=1, preview_every=0, rasterizer="auto")
    refine(mesh, loss_fn, cam_fn, settings)  # warm-up (kernels, caches)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    refine(mesh, loss_fn, cam_fn, dataclasses.replace(settings, steps=steps))
    _sync(device)
    step_s = (time.perf_counter() - t0) / steps
    step_cpu_s = (time.process_time() - c0) / steps

    # split: render forward+backward alone, guidance alone, and plain rasteriser forward
    cams = cam_fn(0)
    tex = mesh.texture.clone().requires_grad_(True)
    reps = max(3, steps)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        out = mesh.render(cams, texture=tex)
        out.image.sum().backward()
    _sync(device)
    render_s = (time.perf_counter() - t0) / reps
    images = out.image.detach().clone().requires_grad_(True)
    t0 = time.perf_counter()
    for _ in range(reps):
        loss_fn(images, cams, torch.ones(len(cams), 3), 0.5).backward()
    _sync(device)
    guidance_s = (time.perf_counter() - t0) / reps
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(reps):
            pos = rz.to_clip(mesh.positions, cams)
            rz.rasterize(pos, mesh.faces.int(), (cams.height, cams.width))
    _sync(device)
    raster_s = (time.perf_counter() - t0) / reps
    res = {
        "preset": preset_name, "device": str(device), "render_resolution": cfg.render_resolution,
        "texture": cfg.texture_resolution, "batch": batch, "faces": int(mesh.faces.shape[0]),
        "guidance_resolution": int(guidance.resolution), "rasteriser": rz.resolve_backend("auto", device),
        "step_s": round(step_s, 4), "step_cpu_s": round(step_cpu_s, 4), "render_fwd_bwd_s": round(render_s, 4), "guidance_s": round(guidance_s, 4),
        "rasterise_fwd_s": round(raster_s, 4), "step_over_rasterise": round(step_s / max(raster_s, 1e-9), 1),
    }
    if device.type == "cuda":
        res["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        # the same rasterisation with the PyTorch twin, for the ratio
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(reps):
                rz.rasterize(rz.to_clip(mesh.positions, cams), mesh.faces.int(), (cams.height, cams.width),
                             backend="torch")
        _sync(device)
        res["torch_over_nvdiffrast_rasterise"] = round((time.perf_counter() - t0) / reps / max(raster_s, 1e-9), 1)
    return res


def bench_whole(prompt: str, model: str, device: torch.device) -> dict:
    """The whole ``standard`` preset (coarse + fine + export) through ``run_job``: seconds, peak memory."""
    from backend.pipeline.events import JobContext, ProgressEvent
    from backend.pipeline.run import run_job
    from protocol.params import GenerationParams

    out = Path(tempfile.mkdtemp()) / "job"
    out.mkdir()
    stage_time: dict[str, float] = {}
    last = {"stage": None, "t": time.perf_counter()}

    def emit(event) -> None:
        if isinstance(event, ProgressEvent):
            now = time.perf_counter()
            if last["stage"] is not None:
                stage_time[last["stage"]] = stage_time.get(last["stage"], 0.0) + now - last["t"]
            last.update(stage=event.stage, t=now)

    torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    overrides = {} if model == "auto" else {"guidance.model": model}
    result = run_job(GenerationParams(prompt=prompt, seed=0, preset="standard", overrides=overrides),
                     JobContext(out_dir=out, emit=emit))
    total = time.perf_counter() - t0
    return {"whole_standard_s": round(total, 1), "stage_s": {k: round(v, 1) for k, v in stage_time.items()},
            "peak_mem_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
            "faces": result.info.get("faces"), "files": sorted(result.files)}


def write_sd21_random(folder: Path) -> Path:
    """A random-weight model folder with Stable Diffusion 2.1-base's real architecture.

    UNet: 4→4 channels at 64² latents, blocks (320, 640, 1280, 1280), 2 layers per block, linear
    projections, head dims (5, 10, 20, 20), cross-attention 1024. VAE: the SD autoencoder (factor 8,
    4 latent channels, scaling 0.18215). Text encoder: OpenCLIP ViT-H/14 text tower (1024 wide, 23
    layers, 16 heads, GELU). The tokenizer is the tests' character-level one (ids only matter for shape).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.tiny_models import _write_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    _write_tokenizer(folder / "tokenizer")
    vocab = len(CLIPTokenizer.from_pretrained(str(folder / "tokenizer")))
    CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                 num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu",
                                 projection_dim=512, bos_token_id=vocab - 2, eos_token_id=vocab - 1,
                                 pad_token_id=vocab - 1)).save_pretrained(str(folder / "text_encoder"))
    UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
        use_linear_projection=True,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ).save_pretrained(str(folder / "unet"))
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
        scaling_factor=0.18215,
    ).save_pretrained(str(folder / "vae"))
    DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False,
                  steps_offset=1).save_pretrained(str(folder / "scheduler"))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }))
    return folder


def cpu_guidance():
    """The cpu preset's guidance ('auto' → bundled prior); a tiny random model when the prior is absent."""
    try:
        g = _load_guidance("auto", torch.device("cpu"), fp16=False)
        return g, g.description
    except Exception as exc:  # the bundled prior may not be trained on this checkout
        from tests.tiny_models import build_tiny_model

        folder = build_tiny_model(Path(tempfile.mkdtemp()) / "tiny", latent=False)
        g = _load_guidance(str(folder), torch.device("cpu"), fp16=False)
        return g, f"tiny random pixel model (bundled prior unavailable: {exc.__class__.__name__})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--model", default="stabilityai/stable-diffusion-2-1-base")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--skip-large", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--whole", action="store_true", help="with --gpu: also time run_job with the standard preset")
    ap.add_argument("--prompt", default="a ceramic teapot")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# bench_fine  {time.strftime('%Y-%m-%d %H:%M:%S')}  torch {torch.__version__}")

    if args.gpu:
        if not torch.cuda.is_available():
            sys.exit("--gpu needs CUDA")
        device = torch.device("cuda")
        print(f"# device: {torch.cuda.get_device_name(device)}")
        model = args.model
        if args.random_weights:
            model = str(write_sd21_random(Path(tempfile.mkdtemp()) / "sd21-random"))
        guidance = _load_guidance(model, device, fp16=True)
        guidance.set_prompt("a ceramic teapot")
        print("# guidance:", guidance.description)
        print(json.dumps(bench_steps("standard", device, guidance, args.steps, faces=50_000)))
        for faces, grid, tex, n in SIZES:
            if args.skip_large and faces > 50_000:
                continue
            print(json.dumps(bench_prepare(faces, grid, tex, device, n_gauss=n, bumps=24)))
        if args.whole:
            print(json.dumps(bench_whole(args.prompt, model, device)))
        return

    device = torch.device("cpu")
    guidance, why = cpu_guidance()
    guidance.set_prompt("a red cube")
    print("# guidance:", why)
    preset = get_preset("cpu")
    print(json.dumps(bench_steps("cpu", device, guidance, args.steps, faces=preset.fine.face_budget)))
    for faces, grid, tex, n in SIZES:
        if args.skip_large and faces > 50_000:
            continue
        print(json.dumps(bench_prepare(faces, grid, tex, device, n_gauss=n, bumps=24)))


if __name__ == "__main__":
    main()

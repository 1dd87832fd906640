"""Pipeline entry point: ``run_job(params: GenerationParams, ctx) -> ResultEvent``.

Stages (each reported with ``ProgressEvent``): 'load' (preset, guidance model), 'coarse'
(``run_coarse_stage`` → :class:`~backend.pipeline.coarse.CoarseResult`, previews every N steps),
'fine' (``run_fine_stage`` → :class:`~backend.pipeline.fine.FineResult`, a textured mesh, when the
preset has one; otherwise the coarse Gaussians are meshed with vertex colours), 'export'.
This module does all the writing: ``asset.glb`` + OBJ/MTL/PNG in ``ctx.out_dir`` and, when there is
a fine stage, ``coarse.glb`` (the coarse Gaussians meshed like a coarse-only preset).
Every exported mesh is centred and scaled so its largest dimension is ``preset.object_size`` metres.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from backend.models.device import describe_device
from backend.pipeline.events import JobContext, ProgressEvent, ResultEvent
from backend.pipeline.presets import Preset, get_preset, preset_to_dict
from backend.priors import prompt_words
from protocol.params import GenerationParams

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (CPU and CUDA); return a CPU generator for the pipeline's own draws."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    return torch.Generator().manual_seed(seed)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_threads() -> int:
    """Torch intra-op threads for CPU runs: ``$CONJURE_CPU_THREADS``, else half the cores (1..4).

    The CPU preset's tensors are small (32–64 px images, a few thousand Gaussians), so extra threads
    mostly spin; on a 2-core machine one thread was 7× faster than two while anything else ran
    (0.34 s against 2.34 s per coarse step), and it leaves a core for the server and Blender.
    """
    env = os.environ.get("CONJURE_CPU_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def configure_cpu() -> None:
    """Set up torch for a CPU job: :func:`cpu_threads` intra-op threads, and PyTorch's deterministic
    algorithms (``torch.use_deterministic_algorithms``, the "Reproducibility" notes of the PyTorch docs).

    With more than one thread, CPU accumulations such as ``index_put_(accumulate=True)`` / ``index_add_``
    (the backward of the Gaussian rasteriser's gathers) add in whatever order the threads finish, and
    SDS amplifies those last-bit differences over a run: the same prompt and seed gave a different asset
    every time with two threads (vertex sums 2788.7 and 2760.8 for two runs of "a red cube" seed 0).
    With the flag the sums are ordered and runs repeat exactly, at no measured cost (48–49 s a job either
    way at two threads; at one thread the results are bit-identical with and without it). ``warn_only``:
    an op without a deterministic CPU kernel warns instead of failing the job. CUDA runs are left as
    they are: gsplat's and nvdiffrast's backward passes accumulate with atomics, which this flag does not
    reach, so a GPU asset is reproducible only up to them (unverified on a GPU).
    """
    torch.set_num_threads(cpu_threads())
    torch.use_deterministic_algorithms(True, warn_only=True)


def unknown_words(prompt: str, vocabulary) -> list[str]:
    """Words of ``prompt`` (lower-case letters/digits) that are not in ``vocabulary``."""
    return [w for w in dict.fromkeys(prompt_words(prompt)) if w not in vocabulary]


def warm_up() -> None:
    """Worker start-up hook (``backend/server/worker.py``): start building/loading the CUDA renderers
    (gsplat, nvdiffrast) in the background; returns at once (see ``backend.cuda_ext``)."""
    from backend import cuda_ext

    for line in cuda_ext.start_warm_up():
        log.info("%s", line)


def renderer_notes(ctx: JobContext) -> list[str]:
    """Start the CUDA renderer warm-up if nobody has (``generate``), tell the client where it stands on CUDA
    ("renderer: building gsplat (40 s so far) ..."), and return the failures as warnings."""
    from backend import cuda_ext

    lines = cuda_ext.start_warm_up()
    if torch.cuda.is_available():
        for line in lines:
            ctx.emit(ProgressEvent("load", 1, 1, line))
    return cuda_ext.warnings()


def export_coarse_mesh(gaussians, preset: Preset, out_dir: Path | None, name: str = "coarse") -> dict | None:
    """Keep the coarse stage's result in the job folder: ``<name>.glb`` with vertex colours.

    Meshed like a coarse-only preset (``coarse.mesh_grid`` / ``coarse.mesh_faces``) and scaled to
    ``preset.object_size``. A failure here is logged, never fatal (the fine result matters more).
    """
    if out_dir is None:
        return None
    try:
        from backend.mesh.carve import carve_views_for
        from backend.mesh.export import export_mesh
        from backend.mesh.extract import extract_mesh, fit_to_size

        c = preset.coarse
        mesh = extract_mesh(gaussians, c.mesh_grid, c.mesh_faces, c.density_threshold, carve=carve_views_for(c))
        return export_mesh(fit_to_size(mesh, preset.object_size), out_dir, name)
    except Exception as exc:
        log.warning("could not save the coarse mesh: %s", exc)
        return None


def save_reference(reference, out_dir) -> None:
    """Write the reference view's image and its mask side by side as ``reference.png`` into ``out_dir``
    (``coarse.reference_weight``; ``backend.pipeline.reference_view``)."""
    if out_dir is None:
        return
    from PIL import Image

    img = torch.cat([reference.image[0], reference.mask[0].expand(3, -1, -1)], dim=2)
    arr = (img.permute(1, 2, 0).clamp(0, 1).numpy() * 255).astype(np.uint8)
    try:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(Path(out_dir) / "reference.png")
    except OSError as exc:  # a picture for the artist, not part of the asset: the job goes on
        log.warning("could not save the reference view: %s", exc)


def run_job(params: GenerationParams, ctx: JobContext) -> ResultEvent:
    """Run the whole pipeline for ``params`` and export the asset into ``ctx.out_dir``."""
    from backend.guidance import load_guidance
    from backend.guidance.loss import sds_loss_fn
    from backend.mesh.extract import extract_mesh, fit_to_size
    from backend.pipeline.coarse import run_coarse_stage

    t_start = time.perf_counter()
    preset = get_preset(params.preset, dict(params.overrides or {}))
    seed = params.seed if params.seed is not None else (preset.seed if preset.seed is not None
                                                        else random.SystemRandom().randrange(2**31))
    device = pick_device()
    if device.type == "cpu":
        configure_cpu()
    ctx.emit(ProgressEvent("load", 0, 1, f"preset {preset.name}, seed {seed}: loading the guidance model"))
    renderer_warnings = renderer_notes(ctx)
    ctx.check_cancel()
    guidance = load_guidance(preset.guidance, device)
    log.info("%s", guidance.description)
    ctx.emit(ProgressEvent("load", 1, 1, guidance.description))
    prompt_warnings: list[str] = []
    vocab = getattr(guidance, "vocabulary", None)
    if vocab:
        unknown = unknown_words(params.prompt, vocab)
        if unknown:
            msg = (f"the model does not know the word(s) {', '.join(unknown)}; it only knows: "
                   f"{', '.join(sorted(vocab))}")
            prompt_warnings.append(msg)
            log.warning("%s", msg)
            ctx.emit(ProgressEvent("load", 1, 1, "warning: " + msg))
    guidance.set_prompt(params.prompt, params.negative_prompt or preset.guidance.negative_prompt)
    ctx.check_cancel()
    # Seeded only now: building a model the first time draws from torch's global generator (module
    # initialisation before the weights are loaded), while a resident model draws nothing, and the SDS
    # noise comes from that generator. Seeded before loading, a server's first job of a seed differed
    # from every later job of the same seed.
    generator = seed_everything(int(seed))
    reference = None
    if preset.coarse.reference_weight > 0:
        from backend.pipeline.reference_view import draw_reference_view

        # its own generator, so the run's other draws are those of a run without a reference
        source = guidance
        if preset.coarse.reference_model:
            source = load_guidance(dataclasses.replace(preset.guidance, model=preset.coarse.reference_model), device)
            source.set_prompt(params.prompt, params.negative_prompt or preset.guidance.negative_prompt)
        reference = draw_reference_view(source, preset.coarse, torch.Generator().manual_seed(int(seed) + 7919))
        save_reference(reference, getattr(ctx, "out_dir", None))

    coarse = run_coarse_stage(sds_loss_fn(guidance), preset.coarse, ctx, device=device, generator=generator,
                              object_size=preset.object_size,
                              shading=preset.shading if preset.shading.coarse else None, reference=reference)
    ctx.check_cancel()
    if preset.fine is not None:
        from backend.pipeline.fine import run_fine_stage

        export_coarse_mesh(coarse.gaussians, preset, getattr(ctx, "out_dir", None))
        fine = run_fine_stage(coarse.gaussians, preset, guidance, ctx, int(seed))
        mesh = fine.mesh
    else:
        from backend.mesh.carve import carve_views_for

        mesh = extract_mesh(coarse.gaussians, preset.coarse.mesh_grid, preset.coarse.mesh_faces,
                            preset.coarse.density_threshold, carve=carve_views_for(preset.coarse))
    mesh = fit_to_size(mesh, preset.object_size)
    ctx.check_cancel()

    from backend.mesh.export import export_mesh

    ctx.emit(ProgressEvent("export", 0, 1, "writing GLB/OBJ"))
    files = export_mesh(mesh, ctx.out_dir, "asset")
    ctx.emit(ProgressEvent("export", 1, 1, "done"))
    info = {
        "seed": int(seed), "preset": preset_to_dict(preset), "model": guidance.model_id,
        "resolved_preset": preset.name, "device": describe_device() if device.type == "cuda" else "CPU",
        "warnings": prompt_warnings,
        "guidance": guidance.description, "renderer": coarse.renderer, "gaussians": len(coarse.gaussians),
        "coarse_step_seconds": coarse.step_seconds, "preview_seconds": coarse.preview_seconds,
        "first_preview_seconds": coarse.first_preview_seconds, "seconds": time.perf_counter() - t_start,
        "vertices": int(mesh.positions.shape[0]), "faces": int(mesh.faces.shape[0]),
    }
    from backend import cuda_ext

    warnings = renderer_warnings + [w for w in cuda_ext.warnings() if w not in renderer_warnings]
    warnings += list(getattr(getattr(guidance, "bundle", None), "warnings", []) or [])
    if warnings:
        info.setdefault("warnings", []).extend(warnings)
    return ResultEvent(files=files, mesh=mesh, info=info)


def run_texture(params, mesh, ctx: JobContext, base_color=None) -> ResultEvent:
    """Texture job entry (job kind ``texture``): see ``backend.pipeline.texture_job``."""
    from backend.pipeline.texture_job import run_texture_job

    return run_texture_job(params, mesh, ctx, base_color=base_color)

"""Texture job: paint an uploaded mesh from a prompt with the fine stage's texture SDS.

``run_texture_job(params, mesh, ctx)`` is the second job kind beside ``run_job`` (generate). The
mesh is the user's own (``protocol.mesh.MeshPayload``, Blender frame, metres, validated by
``protocol.mesh.decode_mesh`` + ``validate_upload_mesh``). Steps:

1. **Frame**: the mesh is centred on its bounding box and scaled so its largest half-extent is
   ``TARGET_HALF_EXTENT`` inside the optimisation volume [−1, 1]³ (the size at which the prior's
   objects are rendered). This copy is only what the cameras see: the result carries the
   uploaded ``positions`` and ``faces`` arrays themselves, bit for bit (no vertex ever moves; the
   fine stage's vertex offsets are forced off).
2. **UVs**: the mesh's own per-corner UVs when ``backend.mesh.uv_check.check_uvs`` accepts them
   (inside 0..1, measured overlap below 1 %, not degenerate); otherwise xatlas
   (``backend.mesh.uv.unwrap``), which keeps the face order, so UVs stay per uploaded corner.
3. **Start texture**: the uploaded texture when the own UVs are kept and one was sent, else the
   object's base colour (sRGB 0..1) when given, else neutral grey 0.5.
4. **Refine**: ``backend.pipeline.fine.refine`` with ``fine.fine_loss_fn`` (the fine stage's SDS
   texture loop with its own t_max / cfg_scale, shading, texture filter and chart padding:
   Magic3D's refine stage, DreamGaussian's texture pipeline) under the preset's ``fine`` settings,
   then the fine stage's seam-aware re-bake when ``fine.rebake_sigma`` > 0; previews stream
   as textured meshes at the uploaded positions, about ``PREVIEWS_PER_JOB`` of them (the whole
   job is this loop) unless ``fine.preview_every`` is overridden.
5. **Export**: ``textured.glb`` (+ OBJ/MTL/PNG) of the same mesh with its texture.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time

import numpy as np
import torch

from backend.pipeline.events import JobContext, PreviewEvent, ProgressEvent, ResultEvent
from protocol.mesh import MeshPayload, validate_upload_mesh

log = logging.getLogger(__name__)

#: Largest half-extent of the mesh inside the optimisation volume (the prior's solids: 0.6-0.75).
TARGET_HALF_EXTENT = 0.7
#: Side of the coverage grid that measures UV overlap (at most the texture's side).
UV_CHECK_RESOLUTION = 512
#: Live previews per texture job (``fine.preview_every`` = steps // this, unless overridden).
PREVIEWS_PER_JOB = 8
#: Stage name of the texture job's progress and previews.
STAGE = "texture"


def normalising_frame(positions: np.ndarray) -> tuple[np.ndarray, float]:
    """(centre (3,), scale) mapping the mesh's bounding box into the optimisation volume.

    ``(positions − centre) · scale`` has its largest half-extent at ``TARGET_HALF_EXTENT``; a
    mesh with no extent (one point) gets scale 1.
    """
    p = np.asarray(positions, np.float64)
    lo, hi = p.min(0), p.max(0)
    half = float((hi - lo).max()) / 2.0
    return (lo + hi) / 2.0, (TARGET_HALF_EXTENT / half if half > 0 else 1.0)


def start_texture(side: int, base_color=None, texture_rgba: np.ndarray | None = None) -> torch.Tensor:
    """(side, side, 3) float32 start texture in [0, 1] (row 0 at the top).

    ``texture_rgba`` (H, W, 4) uint8 is used as is (its own size) when given; else a flat
    ``base_color`` (3 or 4 sRGB floats in 0..1, alpha ignored); else neutral grey 0.5.
    """
    if texture_rgba is not None:
        return torch.as_tensor(np.asarray(texture_rgba)[..., :3].astype(np.float32) / 255.0)
    rgb = [0.5, 0.5, 0.5] if base_color is None else [float(c) for c in list(base_color)[:3]]
    return torch.tensor(rgb, dtype=torch.float32).clamp(0, 1).expand(side, side, 3).contiguous()


def choose_uvs(mesh: MeshPayload, norm_positions: np.ndarray, texture_resolution: int, padding: int
               ) -> tuple[np.ndarray, str, dict]:
    """(corner_uvs (F*3, 2) float32, source 'own' | 'xatlas' | 'xatlas-jitter' | 'grid', check dict)."""
    from backend.mesh.uv import unwrap
    from backend.mesh.uv_check import check_uvs

    faces = np.asarray(mesh.faces, np.int64)
    check = check_uvs(mesh.uvs, mesh.positions, faces, min(UV_CHECK_RESOLUTION, int(texture_resolution)))
    if check.valid:
        return np.ascontiguousarray(mesh.uvs, np.float32), "own", check.as_dict()
    log.info("re-unwrapping with xatlas: %s", check.reason)
    atlas = unwrap(norm_positions, faces, resolution=int(texture_resolution), padding=int(padding))
    return atlas.corner_uvs.astype(np.float32), atlas.method, check.as_dict()


def _preview_at_upload(ctx: JobContext, mesh: MeshPayload) -> JobContext:
    """A context whose previews carry the uploaded positions (the refinement sees a normalised copy)."""

    def emit(event):
        if isinstance(event, PreviewEvent):
            event = dataclasses.replace(event, mesh=dataclasses.replace(
                event.mesh, positions=mesh.positions, faces=mesh.faces, normals=None))
        ctx.emit(event)

    return JobContext(out_dir=ctx.out_dir, emit=emit, cancelled=ctx.cancelled)


def run_texture_job(params, mesh: MeshPayload, ctx: JobContext, *, base_color=None, loss_fn=None,
                    camera_fn=None) -> ResultEvent:
    """Texture ``mesh`` from ``params.prompt`` (a ``GenerationParams``); see the module docstring.

    Args:
        params: prompt, negative prompt, seed, preset, overrides (``fine.*`` keys shape the loop).
        mesh: the uploaded mesh (positions (N, 3) float32 metres, faces (F, 3), optional uvs
            (F*3, 2), optional texture_rgba).
        ctx: the job's context (events, cancel, ``out_dir``).
        base_color: the object's colour, 3 or 4 sRGB floats in 0..1, or None (grey).
        loss_fn, camera_fn: overrides for tests (default: SDS through the preset's guidance and
            random orbit cameras in the coarse stage's ranges).

    Returns:
        ResultEvent: files 'glb' (+ 'obj', 'mtl', 'png') named ``textured.*``; ``mesh`` with the
        uploaded positions and faces (the same arrays), per-corner uvs, normals and texture_rgba;
        ``info`` with the UV decision, timings and ``warnings``.
    """
    from backend.mesh.bake import texel_surface_points
    from backend.mesh.export import compute_vertex_normals, export_mesh
    from backend.mesh.uv import uv_from_corners
    from backend.pipeline.fine import (
        PREVIEW_TEXTURE_SIDE,
        TexturedMesh,
        fine_loss_fn,
        random_camera_fn,
        refine,
        seam_aware_rebake,
    )
    from backend.pipeline.presets import FineConfig, get_preset, preset_to_dict
    from backend.pipeline.run import configure_cpu, pick_device, seed_everything, unknown_words

    t_start = time.perf_counter()
    validate_upload_mesh(mesh)
    warnings: list[str] = []
    preset = get_preset(params.preset, dict(params.overrides or {}))
    cfg = preset.fine
    if cfg is None:
        cfg = FineConfig()
        warnings.append(f"preset {preset.name!r} has no fine stage; the texture uses the default fine settings")
    seed = params.seed if params.seed is not None else (preset.seed if preset.seed is not None
                                                        else random.SystemRandom().randrange(2**31))
    device = pick_device()
    if device.type == "cpu":
        configure_cpu()

    ctx.emit(ProgressEvent("load", 0, 1, f"preset {preset.name}, seed {seed}: loading the guidance model"))
    ctx.check_cancel()
    model_id, description = "custom loss", "custom loss"
    if loss_fn is None:
        from backend.guidance import load_guidance

        guidance = load_guidance(preset.guidance, device)
        model_id, description = guidance.model_id, guidance.description
        vocab = getattr(guidance, "vocabulary", None)
        unknown = unknown_words(params.prompt, vocab) if vocab else []
        if unknown:
            warnings.append(f"the prior does not know the word(s) {', '.join(unknown)}; it only knows: "
                            f"{', '.join(sorted(vocab or ()))}")
            ctx.emit(ProgressEvent("load", 1, 1, "warning: " + warnings[-1]))
        guidance.set_prompt(params.prompt, params.negative_prompt or preset.guidance.negative_prompt)
        loss_fn = fine_loss_fn(guidance, cfg)  # the fine stage's own t_max / cfg_scale
    ctx.emit(ProgressEvent("load", 1, 1, description))
    ctx.check_cancel()
    seed_everything(int(seed))  # after loading: a first load draws from the global generator (run.run_job)

    # 1. frame (a normalised copy for the cameras; the upload itself is never touched)
    centre, scale = normalising_frame(mesh.positions)
    norm = ((np.asarray(mesh.positions, np.float64) - centre) * scale).astype(np.float32)
    faces = np.asarray(mesh.faces, np.int64)
    # 2. UVs
    ctx.emit(ProgressEvent(STAGE, 0, cfg.steps, "checking UVs"))
    t_uv = time.perf_counter()
    corner_uvs, uv_source, uv_check = choose_uvs(mesh, norm, cfg.texture_resolution, cfg.uv_padding)
    if uv_source != "own" and mesh.uvs is not None:
        warnings.append(f"the mesh's own UVs were not used ({uv_check['reason']}); unwrapped with {uv_source}")
    seconds_uv = time.perf_counter() - t_uv
    ctx.check_cancel()
    # 3. start texture
    own_texture = mesh.texture_rgba if uv_source == "own" and mesh.texture_rgba is not None else None
    texture = start_texture(int(cfg.texture_resolution), base_color, own_texture)
    uv, uv_faces = uv_from_corners(corner_uvs)
    tm = TexturedMesh(
        positions=torch.as_tensor(norm, device=device), faces=torch.as_tensor(faces, device=device),
        corner_uvs=torch.as_tensor(corner_uvs, device=device), uv=torch.as_tensor(uv, device=device),
        uv_faces=torch.as_tensor(uv_faces, device=device), texture=texture.to(device))
    # the charts' texels: the padding outside them is refilled from the nearest chart texel after
    # every step (as in the fine stage), so mip levels never average stray padding in
    _, tm.texel_mask = texel_surface_points(tm.positions, tm.faces, tm.corner_uvs, (int(tm.texture.shape[0]), int(tm.texture.shape[1])),
                                            str(cfg.rasterizer))
    job_ctx = _preview_at_upload(ctx, mesh)
    job_ctx.emit(PreviewEvent(STAGE, 0, tm.to_payload(PREVIEW_TEXTURE_SIDE)))
    # 4. refine (texture only: vertex offsets off, whatever the preset says), as the fine stage does
    settings = dataclasses.replace(cfg, vertex_offsets=False)
    if "fine.preview_every" not in (params.overrides or {}):
        # the whole job is this loop: about 8 live previews unless the user asked otherwise
        settings = dataclasses.replace(settings, preview_every=max(1, int(cfg.steps) // PREVIEWS_PER_JOB))
    if camera_fn is None:
        camera_fn = random_camera_fn(int(cfg.batch_size), cfg.render_resolution, preset.coarse, seed=seed,
                                     device=device)
    shading = preset.shading if preset.shading.fine else None
    gen = torch.Generator().manual_seed(int(seed) + 2)
    t_refine = time.perf_counter()
    refine(tm, loss_fn, camera_fn, settings, job_ctx, stage=STAGE, shading=shading, generator=gen)
    if cfg.rebake_sigma > 0:  # both sides of every UV seam agree, as in the fine stage
        seam_aware_rebake(tm, float(cfg.rebake_sigma), dilation=int(cfg.bake_dilation), backend=str(cfg.rasterizer),
                          passes=int(cfg.rebake_passes))
    seconds_refine = time.perf_counter() - t_refine
    ctx.check_cancel()
    # 5. the same mesh with its texture
    baked = tm.to_payload()
    positions = mesh.positions
    result = MeshPayload(positions=positions, faces=mesh.faces, uvs=corner_uvs,
                         normals=compute_vertex_normals(np.asarray(positions), faces),
                         texture_rgba=baked.texture_rgba)
    ctx.emit(ProgressEvent("export", 0, 1, "writing GLB/OBJ"))
    files = export_mesh(result, ctx.out_dir, "textured")
    ctx.emit(ProgressEvent("export", 1, 1, "done"))
    for w in warnings:
        log.warning("%s", w)
    info = {
        "kind": "texture", "seed": int(seed), "preset": preset_to_dict(preset), "model": model_id,
        "guidance": description, "uv_source": uv_source, "uv_check": uv_check,
        "texture_resolution": int(tm.texture.shape[0]), "steps": int(settings.steps),
        "vertices": int(len(positions)), "faces": int(len(faces)), "frame_centre": [float(c) for c in centre],
        "frame_scale": float(scale), "seconds_uv": seconds_uv, "seconds_refine": seconds_refine,
        "seconds": time.perf_counter() - t_start, "warnings": warnings,
    }
    return ResultEvent(files=files, mesh=result, info=info)

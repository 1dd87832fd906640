"""Coarse stage: optimise 3D Gaussians against a 2D loss on random views, streaming preview meshes.

The loop is loss-agnostic: it takes a ``backend.guidance.loss.LossFn``
``(images, cameras, backgrounds, step_ratio) -> scalar``, the same type as the fine stage. The
pipeline plugs in Score Distillation Sampling (``backend.guidance.loss.sds_loss_fn``); tests plug in
a photometric loss against reference images of a known shape through the very same loop.

Per step: sample ``batch_size`` cameras (``cameras.sample_cameras`` within the preset's ranges) at
the progressive render resolution, random backgrounds, render, loss, backward, accumulate
view-space gradients, Adam step, densify/prune on schedule, ``ProgressEvent`` (stage 'coarse');
every ``preview_every`` steps and at the end a ``PreviewEvent`` with a vertex-coloured mesh.
``ctx.check_cancel()`` runs before every step.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch

from backend.gaussians.cameras import AZIMUTH_RANGE, as_range, sample_cameras
from backend.gaussians.densify import Densifier
from backend.gaussians.model import GaussianModel
from backend.gaussians.render import resolve_backend
from backend.guidance.loss import LossFn
from backend.mesh.extract import EmptyMeshError, extract_mesh, fit_to_size
from backend.pipeline.background import EnvironmentBackground, composite_backgrounds, draw_random_colours
from backend.pipeline.events import JobContext, PreviewEvent, ProgressEvent
from backend.pipeline.losslog import LossLog
from backend.pipeline.presets import CoarseConfig, ShadingConfig
from backend.pipeline.reference_view import ReferenceView, reference_mask_loss
from backend.pipeline.shading import apply_shading, depth_normals, normal_smoothness, sample_shading
from backend.schedule import anneal, step_ratio

log = logging.getLogger(__name__)


@dataclass
class CoarseResult:
    """What the coarse stage hands to the fine stage and to ``run_job``: the optimised Gaussians
    (world frame, the [-1, 1]^3 volume) and measurements for the job's info."""

    gaussians: GaussianModel
    losses: list[float] = field(default_factory=list)
    previews: int = 0
    step_seconds: float = 0.0        # mean wall time of one optimisation step
    preview_seconds: float = 0.0     # mean wall time of one preview extraction
    first_preview_seconds: float | None = None  # from the stage start
    renderer: str = "torch"
    densify_log: list[dict] = field(default_factory=list)


def binary_entropy(p: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Mean binary entropy −p·log p − (1 − p)·log(1 − p) (nats) of values in [0, 1]."""
    p = p.clamp(eps, 1.0 - eps)
    return -(p * p.log() + (1.0 - p) * (1.0 - p).log()).mean()


def ramped_weight(full: float, start: float, ratio: float) -> float:
    """A regulariser's weight at ``ratio`` of the run: 0 before ``start``, then a linear ramp over a
    tenth of the run to ``full`` (``full`` from the first step when ``start`` is 0)."""
    full, start = float(full), float(start)
    if full <= 0 or ratio < start:
        return 0.0
    return full * min(1.0, (ratio - start) / 0.1) if start > 0 else full


def alpha_entropy_weight(config, ratio: float) -> float:
    """The weight of the rendered alpha's entropy at ``ratio`` of the run (threestudio's ``lambda_opaque``;
    ``ramped_weight`` from ``alpha_entropy_from``). Starting late lets the shape change its topology first
    (a torus's hole opens through half-covered pixels, which the entropy term would hold at 0 or 1) and
    then makes its silhouette crisp."""
    return ramped_weight(config.alpha_entropy_weight, config.alpha_entropy_from, ratio)


def z_variance_weight(config, ratio: float) -> float:
    """The weight of HiFA's depth variance along the ray at ``ratio`` of the run (threestudio's
    ``lambda_z_variance``; ``ramped_weight`` from ``z_variance_from``)."""
    return ramped_weight(config.z_variance_weight, config.z_variance_from, ratio)


def z_variance(out) -> torch.Tensor:
    """HiFA's z-variance loss (Zhu et al. 2023, "HiFA: High-fidelity Text-to-3D Generation with Advanced
    Diffusion Guidance"; threestudio's ``loss_z_variance``): the mean of a render's ``depth_var`` (C, 1, H,
    W; world units²) over the pixels whose alpha is above 0.5, 0 when there are none."""
    solid = out.alpha.detach() > 0.5
    if not bool(solid.any()):
        return out.depth_var.sum() * 0.0
    return out.depth_var[solid].mean()


def normal_smooth_weight(config, ratio: float) -> float:
    """The weight of the depth normals' smoothness at ``ratio`` of the run (threestudio's
    ``lambda_normal_smooth``; ``ramped_weight`` from ``normal_smooth_from``)."""
    return ramped_weight(config.normal_smooth_weight, config.normal_smooth_from, ratio)


def progressive_camera_ranges(config, ratio: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """(azimuth_range, elevation_range) in degrees for the cameras at ``ratio`` of the run.

    threestudio's progressive views (``progressive_until``): with ``progressive_views_until`` u > 0
    the ranges grow linearly from the front view (azimuth 0°, ``progressive_views_elevation``) at the
    start to the full ranges (±180°, ``elevation_range``) at u of the run; with u = 0 they are full from
    the start."""
    lo, hi = as_range(config.elevation_range)
    until = float(config.progressive_views_until)
    r = 1.0 if until <= 0.0 else min(1.0, ratio / until)
    front = float(config.progressive_views_elevation)
    azimuth = (AZIMUTH_RANGE[0] * r, AZIMUTH_RANGE[1] * r)
    return azimuth, ((1.0 - r) * front + r * lo, (1.0 - r) * front + r * hi)


def render_resolution(config, ratio: float) -> int:
    """Progressive render size at ``ratio`` (multiple of 4 pixels)."""
    res = anneal(config.render_resolution, config.render_resolution_end, ratio, "linear",
                 finish=max(config.resolution_ramp_until, 1e-6))
    return max(8, int(round(res / 4.0)) * 4)


def random_backgrounds(batch: int, prob: float, generator: torch.Generator | None, device) -> torch.Tensor:
    """(B, 3) background colours: uniform random with probability ``prob``, white otherwise."""
    rand = torch.rand(batch, 3, generator=generator)
    use = torch.rand(batch, 1, generator=generator) < prob
    return torch.where(use, rand, torch.ones_like(rand)).to(device)


def _lrs(config, ratio: float) -> dict[str, float]:
    return {
        "means": anneal(config.lr_means, config.lr_means_end, ratio, "exp"),
        "log_scales": config.lr_scales, "quats": config.lr_quats,
        "opacity_logits": config.lr_opacities, "color_logits": config.lr_colors,
    }


def underside_smoothness(model: GaussianModel, config: CoarseConfig, resolution: int,
                         generator: torch.Generator | None, device: torch.device, backend: str) -> torch.Tensor:
    """The normal smoothness (``shading.normal_smoothness``) of ``config.normal_smooth_views`` extra
    renders of ``model`` from below: random azimuths, elevations in ``normal_smooth_elevation_range``,
    the guidance's distances and fields of view, ``resolution`` px. The guidance never sees these
    views; the term smooths the surface it leaves unshaped (an object's underside). Its cap is
    ``normal_smooth_views_cap`` where set, ``normal_smooth_cap`` otherwise."""
    cams = sample_cameras(config.normal_smooth_views, resolution, generator,
                          elevation_range=as_range(config.normal_smooth_elevation_range),
                          distance_range=as_range(config.distance_range), fovy_range=as_range(config.fovy_range),
                          device=device)
    out = model.render(cams, torch.zeros(config.normal_smooth_views, 3, device=device), backend=backend)
    normals = depth_normals(out.depth, out.alpha, cams)
    alpha = out.alpha
    if config.normal_smooth_views_max_nz < 1.0:  # only surface facing down (world +Z up)
        alpha = alpha * (normals[:, 2:3].detach() <= config.normal_smooth_views_max_nz)
    cap = config.normal_smooth_cap if config.normal_smooth_views_cap is None else config.normal_smooth_views_cap
    return normal_smoothness(normals, alpha, cap=cap)


def run_coarse_stage(loss_fn: LossFn, config: CoarseConfig, ctx: JobContext | None = None, *,
                     device: torch.device | str = "cpu",
                     generator: torch.Generator | None = None, object_size: float = 1.0,
                     stage: str = "coarse", init: GaussianModel | None = None,
                     shading: ShadingConfig | None = None,
                     reference: ReferenceView | None = None) -> CoarseResult:
    """Run the coarse stage (see module docstring) with a ``CoarseConfig`` and return the Gaussians.

    Args:
        loss_fn: ``(images, cameras, backgrounds, step_ratio) -> scalar`` (``backend.guidance.loss``).
        generator: CPU generator for cameras, backgrounds, initialisation and splits (reproducible).
        object_size: previews are scaled so their largest dimension is this many metres.
        init: start from these Gaussians instead of a random ball.
        shading: when given, every view is shaded before the loss (DreamFusion;
            ``backend/pipeline/shading.py``, normals from the rendered depth).
        reference: a view drawn before the run (``backend.pipeline.reference_view``); with
            ``config.reference_weight`` its mask loss is added until ``config.reference_until``.
    Raises:
        Cancelled: when ``ctx`` says so (checked before every step).
    """
    ctx = ctx or JobContext(out_dir=None)  # type: ignore[arg-type]
    device = torch.device(device)
    backend = resolve_backend(config.renderer, device)
    if init is None:
        init = GaussianModel.init_random(config.num_points, config.init_radius, config.init_shape,
                                         config.init_scale, config.init_opacity, generator, device)
    model = init
    optimizer = model.make_optimizer(_lrs(config, 0.0))
    densifier = Densifier(config, len(model), device)
    environment = env_optimizer = None
    if config.background == "learned":
        environment = EnvironmentBackground(device=device)
        env_optimizer = torch.optim.Adam(environment.parameters(), lr=float(config.lr_background))
    elif config.background != "solid":
        raise ValueError(f"coarse.background must be 'solid' or 'learned', got {config.background!r}")
    result = CoarseResult(model, renderer=backend)
    if reference is not None:
        reference = reference.to(device)  # once, not every step
    steps = int(config.steps)
    t_stage = time.perf_counter()
    step_time = 0.0
    preview_time = 0.0
    renderer_line = ("Gaussian renderer: gsplat (CUDA)" if backend == "gsplat"
                     else f"Gaussian renderer: pure PyTorch ({'no CUDA' if device.type != 'cuda' else 'gsplat unavailable'})")
    log.info("coarse stage: %d steps, batch %d, %d Gaussians; %s", steps, config.batch_size, len(model),
             renderer_line)
    ctx.emit(ProgressEvent(stage, 0, steps, renderer_line))
    loss_log = LossLog(result.losses, device, "coarse")
    for step in range(steps):
        ctx.check_cancel()
        t0 = time.perf_counter()
        ratio = step_ratio(step, steps)
        res = render_resolution(config, ratio)
        azimuth_range, elevation_range = progressive_camera_ranges(config, ratio)
        cams = sample_cameras(config.batch_size, res, generator, azimuth_range=azimuth_range,
                              elevation_range=elevation_range, distance_range=as_range(config.distance_range),
                              fovy_range=as_range(config.fovy_range), device=device,
                              stratified_azimuth=config.stratified_azimuth)
        for group in optimizer.param_groups:
            group["lr"] = _lrs(config, ratio)[group["name"]]
        densifying = config.densify_from <= ratio <= config.densify_until
        zvar_weight = z_variance_weight(config, ratio)
        if environment is None:
            bg = random_backgrounds(config.batch_size, config.random_bg_prob, generator, device)
            out = model.render(cams, bg, backend=backend, retain_means2d=densifying, depth_variance=zvar_weight > 0)
            images = out.image
        else:  # DreamFusion's learned background, a random solid colour for some views
            use_random, colours = draw_random_colours(config.batch_size, config.random_bg_prob, generator)
            out = model.render(cams, torch.zeros(config.batch_size, 3, device=device), backend=backend,
                               retain_means2d=densifying, depth_variance=zvar_weight > 0)
            images, bg = composite_backgrounds(out.image, out.alpha, environment(cams), colours.to(device),
                                               use_random.to(device))
        smooth_weight = normal_smooth_weight(config, ratio)
        normals = None
        if shading is not None or smooth_weight > 0:
            normals = depth_normals(out.depth, out.alpha, cams)
        if shading is not None and normals is not None:
            draw = sample_shading(cams, shading, generator)
            images = apply_shading(images, out.alpha, bg, normals, draw, shading.ambient, shading.diffuse)
        if bg.dim() == 4:
            bg = bg.mean(dim=(2, 3))  # the loss type's (B, 3) backgrounds
        loss = loss_fn(images, cams, bg, ratio)
        if config.opacity_entropy_weight > 0:
            loss = loss + config.opacity_entropy_weight * binary_entropy(model.activated().opacities)
        alpha_weight = alpha_entropy_weight(config, ratio)
        if alpha_weight > 0:
            loss = loss + alpha_weight * binary_entropy(out.alpha)
        if zvar_weight > 0:
            loss = loss + zvar_weight * z_variance(out)
        if smooth_weight > 0 and normals is not None:
            loss = loss + smooth_weight * normal_smoothness(normals, out.alpha, cap=config.normal_smooth_cap)
        if smooth_weight > 0 and config.normal_smooth_views > 0:
            loss = loss + config.normal_smooth_views_scale * smooth_weight * underside_smoothness(
                model, config, res, generator, device, backend)
        if reference is not None and config.reference_weight > 0 and ratio <= config.reference_until:
            loss = loss + config.reference_weight * reference_mask_loss(model, reference, backend)
        optimizer.zero_grad(set_to_none=True)
        if env_optimizer is not None:
            env_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if densifying:
            densifier.accumulate(out, res, res)
        optimizer.step()
        if env_optimizer is not None:
            env_optimizer.step()
        if config.max_scale > 0:
            with torch.no_grad():
                model.params["log_scales"].clamp_(max=math.log(config.max_scale))
        if (config.opacity_reset_every > 0 and (step + 1) % config.opacity_reset_every == 0
                and ratio <= config.densify_until):
            model.reset_opacity(optimizer)
        if densifying and (step + 1) % config.densify_interval == 0:
            info = densifier.step(model, optimizer, generator)
            info["step"] = step + 1
            result.densify_log.append(info)
            log.debug("densify at step %d: %s", step + 1, info)
        last = step + 1 == steps
        loss_log.add(step, loss)  # host copy (and NaN check) every few steps on CUDA, not every step
        if last or (config.preview_every and (step + 1) % config.preview_every == 0):
            loss_log.flush()
        step_time += time.perf_counter() - t0
        shown = f"loss {loss_log.last:.4g}, " if loss_log.last is not None else ""
        ctx.emit(ProgressEvent(stage, step + 1, steps, f"{shown}{len(model)} Gaussians, {res}px"))
        if last or (config.preview_every and (step + 1) % config.preview_every == 0):
            t1 = time.perf_counter()
            try:
                mesh = extract_mesh(model, config.preview_grid, config.preview_faces, config.density_threshold)
            except EmptyMeshError as exc:
                log.warning("no preview at step %d: %s", step + 1, exc)
            else:
                ctx.emit(PreviewEvent(stage, step + 1, fit_to_size(mesh, object_size)))
                result.previews += 1
                if result.first_preview_seconds is None:
                    result.first_preview_seconds = time.perf_counter() - t_stage
            preview_time += time.perf_counter() - t1
    result.step_seconds = step_time / max(steps, 1)
    result.preview_seconds = preview_time / max(result.previews, 1)
    result.gaussians = model
    return result

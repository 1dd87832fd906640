"""Fine stage: the coarse Gaussians become a UV-textured mesh refined at higher resolution.

Steps (Magic3D's refine stage with DreamGaussian's texture pipeline):

1. extract a mesh from the Gaussians' density grid at ``FineConfig.grid_resolution``
   (``backend.mesh.extract``, the coarse stage's extractor);
2. clean it up (largest components, holes, winding, outward normals) and decimate it to
   ``FineConfig.face_budget`` (``backend.mesh.cleanup``);
3. unwrap UVs with xatlas (``backend.mesh.uv``) and bake an initial texture from the Gaussians
   (``backend.mesh.bake``);
4. optimise the texture (and optionally small vertex offsets, regularised by a Laplacian and a
   normal-consistency term) with a loss on rasterised renders: a ``backend.guidance.loss.LossFn``
   (the coarse stage's type), SDS in the pipeline, target images in the reference tests;
5. re-bake the texture through 3D so UV seams agree (``seam_aware_rebake``), on new UVs of the
   refined geometry when ``FineConfig.rebake_reunwrap`` (the offsets shear the first unwrap).

``run_fine_stage`` returns a :class:`FineResult`; ``run.py`` exports it (and the coarse mesh).

Frames: meshes stay in Blender's frame (metres, +Z up, front −Y) in the optimisation volume
[−1, 1]³; ``run.py`` scales to ``object_size`` when exporting. Images are (B, 3, H, W) in [0, 1]
with row 0 at the top; the texture is (H, W, 3) float in [0, 1], row 0 at the top, UVs per corner
with origin bottom-left.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from backend.gaussians.cameras import Cameras, as_range, sample_cameras
from backend.guidance.loss import LossFn, sds_loss_fn
from backend.mesh import rasterize as rz
from backend.mesh.bake import (
    ColorFn,
    bake_texture,
    dilate,
    gaussian_color_fn,
    texel_surface_points,
    texel_surface_points_extrapolated,
)
from backend.mesh.cleanup import clean_mesh
from backend.mesh.export import compute_vertex_normals
from backend.mesh.uv import unwrap
from backend.pipeline.background import view_backgrounds
from backend.pipeline.events import JobContext, PreviewEvent, ProgressEvent
from backend.pipeline.losslog import LossLog
from backend.pipeline.presets import CoarseConfig, FineConfig, ShadingConfig
from backend.pipeline.shading import apply_shading, face_normals_image, sample_shading
from backend.schedule import step_ratio
from protocol.mesh import MeshPayload

if TYPE_CHECKING:
    from backend.gaussians.model import GaussianModel, Gaussians

log = logging.getLogger(__name__)

#: camera_fn(step) -> Cameras (image size = the render resolution)
CameraFn = Callable[[int], Cameras]
#: textures in preview meshes are area-downsampled to at most this side (pixels)
PREVIEW_TEXTURE_SIDE = 512

@dataclass
class TexturedMesh:
    """A mesh being refined (all tensors on one device).

    positions: (V, 3) float32 Blender-frame rest positions; faces: (F, 3) int64 CCW from outside;
    corner_uvs: (F*3, 2) float32 per-corner UVs (origin bottom-left);
    uv: (M, 2) float32 unique UVs and uv_faces (F, 3) int64 (index buffer for ``interpolate``);
    texture: (H, W, 3) float32 in [0, 1], row 0 at the top;
    offsets: (V, 3) float32 learned displacement (zeros unless vertex offsets are optimised);
    texel_mask: (H, W) bool texels inside the UV charts (the padding outside is refilled from the
    nearest chart texel after every refinement step, so mip levels never average in stray padding).
    """

    positions: torch.Tensor
    faces: torch.Tensor
    corner_uvs: torch.Tensor
    uv: torch.Tensor
    uv_faces: torch.Tensor
    texture: torch.Tensor
    offsets: torch.Tensor | None = None
    info: dict = field(default_factory=dict)
    texel_mask: torch.Tensor | None = None  # (H, W) bool: texels covered by a chart (None: unknown)

    @property
    def deformed(self) -> torch.Tensor:
        return self.positions if self.offsets is None else self.positions + self.offsets

    def render(self, cameras: Cameras, background: float | torch.Tensor = 1.0, backend: str = "auto",
               texture: torch.Tensor | None = None, positions: torch.Tensor | None = None,
               filter_mode: str = "linear") -> rz.MeshRender:
        """Rasterise with the current (or given) texture and positions."""
        return rz.render_mesh(self.deformed if positions is None else positions, self.faces, cameras,
                              texture_map=self.texture if texture is None else texture, uv=self.uv,
                              uv_faces=self.uv_faces, background=background, backend=backend,
                              filter_mode=filter_mode)

    def to_payload(self, max_texture_side: int | None = None) -> MeshPayload:
        """MeshPayload (Blender frame) with per-corner UVs, normals and the RGBA8 texture.

        ``max_texture_side`` area-downsamples the texture (previews stay light on the wire).
        """
        pos = self.deformed.detach().cpu().numpy().astype(np.float32)
        faces = self.faces.detach().cpu().numpy().astype(np.int64)
        t = self.texture.detach()
        if max_texture_side is not None and max(t.shape[:2]) > max_texture_side:
            f = max(t.shape[:2]) / max_texture_side
            size = (max(1, round(t.shape[0] / f)), max(1, round(t.shape[1] / f)))
            t = F.interpolate(t.permute(2, 0, 1)[None], size=size, mode="area")[0].permute(1, 2, 0)
        tex = (t.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).cpu().numpy()
        rgba = np.concatenate([tex, np.full(tex.shape[:2] + (1,), 255, np.uint8)], axis=2)
        return MeshPayload(
            positions=pos, faces=faces.astype(np.uint32),
            uvs=self.corner_uvs.detach().cpu().numpy().astype(np.float32),
            normals=compute_vertex_normals(pos, faces), texture_rgba=np.ascontiguousarray(rgba),
        )


# ----------------------------------------------------------------------------------------------
# building the starting mesh


def prepare_textured_mesh(positions: np.ndarray, faces: np.ndarray, color_fn: ColorFn | None, *,
                          face_budget: int, texture_resolution: int, uv_padding: int = 2, uv_fill: bool = True,
                          device: torch.device | str = "cpu", backend: str = "auto",
                          bake_dilation: int = 16, min_component_fraction: float = 0.02,
                          default_color: float = 0.5) -> TexturedMesh:
    """Clean-up → decimation → xatlas UVs → baked texture (flat ``default_color`` if no color_fn).

    Args:
        positions: (N, 3) Blender-frame vertices; faces: (F, 3) ints (an extracted surface).
        color_fn: (P, 3) points → (P, 3) colours in [0, 1], or None for a flat texture.
    """
    t0 = time.perf_counter()
    clean = clean_mesh(positions, faces, face_budget=face_budget, min_component_fraction=min_component_fraction)
    t1 = time.perf_counter()
    atlas = unwrap(clean.positions, clean.faces, resolution=texture_resolution, padding=uv_padding, fill=uv_fill)
    t2 = time.perf_counter()
    device = torch.device(device)
    pos = torch.as_tensor(clean.positions, dtype=torch.float32, device=device)
    fcs = torch.as_tensor(clean.faces, dtype=torch.int64, device=device)
    corner, uv, uv_faces = uv_tensors(atlas, device)
    if color_fn is not None:
        tex, mask = bake_texture(pos, fcs, corner, color_fn, texture_resolution,
                                 dilate_iterations=bake_dilation, backend=backend)
        coverage = float(mask.float().mean())
    else:
        tex = torch.full((texture_resolution, texture_resolution, 3), float(default_color), device=device)
        coverage = float("nan")
        mask = None
    t3 = time.perf_counter()
    info = dict(clean.stats, uv_charts_texels=texture_resolution, atlas_coverage=coverage, uv_method=atlas.method,
                seconds_cleanup=t1 - t0, seconds_uv=t2 - t1, seconds_bake=t3 - t2)
    return TexturedMesh(pos, fcs, corner, uv, uv_faces, tex, None, info, mask)


def uv_tensors(atlas, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A ``backend.mesh.uv.UVAtlas`` as TexturedMesh fields on ``device``: corner_uvs (F*3, 2)
    float32, uv (M, 2) and uv_faces (F, 3)."""
    return (torch.as_tensor(atlas.corner_uvs, dtype=torch.float32, device=device),
            torch.as_tensor(atlas.uv, device=device), torch.as_tensor(atlas.uv_faces, device=device))


def padding_source(mask: torch.Tensor) -> torch.Tensor:
    """(H, W) int64 flat index of the nearest chart texel for every texel (itself inside a chart)."""
    from scipy.ndimage import distance_transform_edt

    m = mask.detach().cpu().numpy()
    rows, cols = distance_transform_edt(~m, return_distances=False, return_indices=True)  # type: ignore[misc]
    return torch.as_tensor(rows * m.shape[1] + cols, dtype=torch.int64, device=mask.device)


# ----------------------------------------------------------------------------------------------
# regularisers for vertex offsets


def uniform_laplacian(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """(V, 3) v_i − mean of v_i's edge neighbours (uniform weights)."""
    V = vertices.shape[0]
    e = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]], dim=0)
    e = torch.cat([e, e.flip(1)], dim=0)
    summed = torch.zeros_like(vertices).index_add_(0, e[:, 0], vertices[e[:, 1]])
    deg = torch.zeros(V, dtype=vertices.dtype, device=vertices.device).index_add_(
        0, e[:, 0], torch.ones(e.shape[0], dtype=vertices.dtype, device=vertices.device))
    return vertices - summed / deg.clamp(min=1.0).unsqueeze(-1)


def texture_tv(texture: torch.Tensor) -> torch.Tensor:
    """Total-variation smoothness prior on texels: mean squared difference of (H, W, C) neighbours."""
    dy = (texture[1:] - texture[:-1]).square().mean()
    dx = (texture[:, 1:] - texture[:, :-1]).square().mean()
    return dx + dy


def face_adjacency(faces: torch.Tensor) -> torch.Tensor:
    """(E, 2) int64 pairs of faces sharing an edge (manifold edges only)."""
    f = faces.detach().cpu().numpy()
    edges = np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), axis=1)
    face_id = np.tile(np.arange(len(f)), 3)
    key = edges[:, 0] * (int(f.max()) + 1) + edges[:, 1]
    order = np.argsort(key, kind="stable")
    _, start, counts = np.unique(key[order], return_index=True, return_counts=True)
    two = counts == 2
    pairs = np.stack([face_id[order[start[two]]], face_id[order[start[two] + 1]]], axis=1)
    return torch.as_tensor(pairs, dtype=torch.int64, device=faces.device)


def normal_consistency(vertices: torch.Tensor, faces: torch.Tensor, adjacency: torch.Tensor,
                       cap: float = 0.0) -> torch.Tensor:
    """Mean (1 − cos) between the normals of adjacent faces (0 for a flat surface).

    ``cap`` > 0 truncates each pair's cost there (a weak membrane, Blake & Zisserman 1987, "Visual
    Reconstruction"): a dihedral bend beyond 1 − cos θ = cap costs a constant and has no gradient, so
    a crease is left to the guidance while small bumps are still flattened. The plain term prefers to
    spread a bend over many edges (a 90° edge over k edges costs about π²/(8k)), which rounds a
    box's edges; the capped one prefers it on as few edges as possible. 0: the plain mean.
    """
    tri = vertices[faces]
    n = F.normalize(torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1), dim=-1, eps=1e-12)
    if adjacency.numel() == 0:
        return vertices.new_zeros(())
    cost = 1.0 - (n[adjacency[:, 0]] * n[adjacency[:, 1]]).sum(-1)
    if cap > 0:
        cost = cost.clamp(max=float(cap))
    return cost.mean()


# ----------------------------------------------------------------------------------------------
# the refinement loop


def refine(mesh: TexturedMesh, loss_fn: LossFn, camera_fn: CameraFn, config: FineConfig,
           ctx: JobContext | None = None, stage: str = "fine", background: float = 1.0,
           shading: ShadingConfig | None = None, generator: torch.Generator | None = None) -> TexturedMesh:
    """Optimise ``mesh.texture`` (and offsets when enabled) against ``loss_fn`` on rendered views.

    ``config`` supplies steps, lr, vertex_offsets, lr_offsets, offset_limit, laplacian_weight,
    normal_weight, preview_every and rasterizer; ``background`` is the grey level behind the mesh.
    With ``shading`` every view is shaded with face normals before the loss (DreamFusion;
    ``backend/pipeline/shading.py``; lights drawn from ``generator``), so the texture learns albedo.
    Each step renders ``camera_fn(step)`` with the differentiable rasteriser, evaluates
    ``loss_fn(images, cameras, backgrounds, step_ratio)`` (+ offset regularisers), and takes an Adam step;
    the texture is clamped to [0, 1] and offsets to ±offset_limit. Between steps it calls
    ``ctx.check_cancel()``, emits ``ProgressEvent(stage, step, total)`` and, every
    ``preview_every`` steps and at the end, ``PreviewEvent(stage, step, mesh)``.

    Returns:
        the same TexturedMesh, updated in place (texture, offsets) with ``info['loss']`` history.
    """
    texture = mesh.texture.detach().clone().requires_grad_(True)
    groups = [{"params": [texture], "lr": float(config.lr)}]
    offsets = None
    adjacency = None
    if config.vertex_offsets:
        offsets = torch.zeros_like(mesh.positions, requires_grad=True)
        groups.append({"params": [offsets], "lr": float(config.lr_offsets)})
        adjacency = face_adjacency(mesh.faces)
    opt = torch.optim.Adam(groups, betas=(0.9, 0.99), eps=1e-8)
    losses: list[float] = []
    loss_log = LossLog(losses, mesh.positions.device, "fine")
    total = int(config.steps)
    backend = str(config.rasterizer)
    source = None
    if mesh.texel_mask is not None and bool(mesh.texel_mask.any()) and not bool(mesh.texel_mask.all()):
        source = padding_source(mesh.texel_mask).reshape(-1)
    for step in range(total):
        if ctx is not None:
            ctx.check_cancel()
        ratio = step_ratio(step, total)
        cams = camera_fn(step)
        pos = mesh.positions if offsets is None else mesh.positions + offsets
        out = mesh.render(cams, background=0.0, backend=backend, texture=texture, positions=pos,
                          filter_mode=str(config.texture_filter))
        backgrounds = view_backgrounds(len(cams), float(background), float(config.random_bg_prob), generator,
                                       out.image.device)
        images = out.image + backgrounds.view(-1, 3, 1, 1) * (1.0 - out.alpha)
        if shading is not None:
            draw = sample_shading(cams, shading, generator)
            normals = face_normals_image(pos, mesh.faces, out.rast, cams)
            images = apply_shading(images, out.alpha, backgrounds, normals, draw, shading.ambient, shading.diffuse)
        loss = loss_fn(images, cams, backgrounds, ratio)
        if config.tv_weight > 0:
            loss = loss + config.tv_weight * texture_tv(texture)
        if offsets is not None:
            assert adjacency is not None  # built with the offsets above
            lap = uniform_laplacian(offsets, mesh.faces).square().sum(-1).mean()
            loss = loss + config.laplacian_weight * lap + config.normal_weight * normal_consistency(
                pos, mesh.faces, adjacency, cap=float(config.normal_cap))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            texture.clamp_(0.0, 1.0)
            if source is not None:  # the padding follows the charts (mipmaps average it in)
                flat = texture.view(-1, texture.shape[-1])
                flat.copy_(flat[source])
            if offsets is not None:
                offsets.clamp_(-config.offset_limit, config.offset_limit)
        last = step == total - 1
        preview_due = last or (config.preview_every > 0 and (step + 1) % config.preview_every == 0)
        loss_log.add(step, loss)  # host copy (and NaN check) every few steps on CUDA, not every step
        if preview_due:
            loss_log.flush()
        mesh.texture = texture.detach()
        mesh.offsets = None if offsets is None else offsets.detach()
        if ctx is not None:
            ctx.emit(ProgressEvent(stage, step + 1, total,
                                   f"loss {loss_log.last:.4g}" if loss_log.last is not None else "optimising"))
            if preview_due:
                ctx.emit(PreviewEvent(stage, step + 1, mesh.to_payload(PREVIEW_TEXTURE_SIDE)))
    loss_log.flush()
    mesh.texture = texture.detach()
    mesh.offsets = None if offsets is None else offsets.detach()
    mesh.info["loss"] = losses
    return mesh


def seam_aware_rebake(mesh: TexturedMesh, sigma_texels: float = 1.0, neighbours: int = 16,
                      dilation: int = 16, backend: str = "auto", passes: int = 1,
                      reunwrap: dict | None = None) -> TexturedMesh:
    """Re-bake the texture through 3D so that both sides of every UV seam agree.

    Each covered texel's surface point (Blender frame) becomes an isotropic Gaussian carrying the
    texel's colour, with std ``sigma_texels`` × the mean texel size on the surface (world units,
    from the surface area over the covered texel count); the texture is then baked again from that
    colour field (:func:`~backend.mesh.bake.gaussian_color_fn`, ``neighbours`` nearest texels) and
    dilated. Texels on either side of a seam are neighbours in 3D though far apart in UV, so the
    seam jump becomes an ordinary step between neighbouring texels, and isolated speckles are
    averaged with their 3D neighbourhood (a Gaussian blur of ~``sigma_texels`` on the surface).
    The UV-space dilation alone (DreamGaussian, Magic3D) only pads charts; it cannot make the two
    sides of a seam agree.

    ``passes`` > 1 repeats the re-bake on its own result: the first pass's border texels come from
    the refined texture's charts, which still disagree a little across seams; a second pass bakes
    them from the already consistent field (on the cpu preset the seam ratio fell ~20 %, see
    docs/benchmarks.md).

    ``reunwrap`` (``unwrap`` keywords: resolution, padding, fill): the refined geometry is unwrapped
    again before the first pass, which bakes the refined texture's colour field into the new atlas.
    Vertex offsets (Magic3D) move the vertices after the first unwrap and shear the texels on the
    surface (texel aspect 1.7–2.7 on cpu outputs against ≤ 1.3 for a fresh unwrap).

    Returns the same mesh with ``texture`` (and with ``reunwrap`` the UVs) replaced.
    """
    source = None
    if reunwrap is not None:
        H, W = mesh.texture.shape[:2]
        points, mask = texel_surface_points(mesh.deformed, mesh.faces, mesh.corner_uvs, (H, W), backend)
        source = (points[mask].float(), mesh.texture[mask].float())
        atlas = unwrap(mesh.deformed.detach().cpu().numpy(), mesh.faces.cpu().numpy(), **reunwrap)
        mesh.corner_uvs, mesh.uv, mesh.uv_faces = uv_tensors(atlas, mesh.positions.device)
        mesh.info["rebake_uv_method"] = atlas.method
    for _ in range(max(1, int(passes))):
        _rebake_once(mesh, sigma_texels, neighbours, dilation, backend, source)
        source = None
    return mesh


def _rebake_once(mesh: TexturedMesh, sigma_texels: float, neighbours: int, dilation: int, backend: str,
                 source: tuple[torch.Tensor, torch.Tensor] | None = None) -> TexturedMesh:
    """One re-bake; ``source`` = (P, 3) surface points and (P, 3) colours of another layout's texels
    (default: this mesh's own covered texels)."""
    H, W = mesh.texture.shape[:2]
    points, mask = texel_surface_points(mesh.deformed, mesh.faces, mesh.corner_uvs, (H, W), backend)
    if source is None:
        source = (points[mask].float(), mesh.texture[mask].float())
    pts, cols = source
    n = int(pts.shape[0])
    if n < 4 or not bool(mask.any()):
        return mesh
    # texels just outside the charts get the 3D point beyond the chart edge (across the seam)
    ext_points, ext_mask = texel_surface_points_extrapolated(mesh.deformed, mesh.faces, mesh.corner_uvs, (H, W),
                                                             reach=2, backend=backend)
    tri = mesh.deformed[mesh.faces]
    area = 0.5 * torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1).norm(dim=-1).sum()
    texel = float((area / n).sqrt())
    ones = torch.ones(n, device=pts.device)
    quats = torch.zeros(n, 4, device=pts.device)
    quats[:, 0] = 1.0
    fn = gaussian_color_fn(pts, quats, torch.full((n, 3), max(texel * sigma_texels, 1e-6), device=pts.device),
                           ones * 0.99, cols, k=neighbours)
    tex = torch.zeros_like(mesh.texture)
    chunk = 65536
    query = ext_points[ext_mask].float()
    tex[ext_mask] = torch.cat([fn(query[i:i + chunk]) for i in range(0, query.shape[0], chunk)]).clamp(0.0, 1.0)
    mesh.texture = dilate(tex, ext_mask, dilation)
    mesh.texel_mask = mask
    return mesh


# ----------------------------------------------------------------------------------------------
# pipeline entry


def fine_loss_fn(guidance, cfg: FineConfig) -> LossFn:
    """SDS through ``guidance`` with the fine stage's own ``t_max`` / ``cfg_scale`` (Magic3D's refine
    stage) and ``sds_form`` (DreamGaussian's stage 2: ``"multistep"``) when set; shared by :func:`run_fine_stage` and the texture job."""
    changes = {}
    if cfg.t_max is not None:
        g = guidance.config
        changes.update(t_max=float(cfg.t_max), t_max_end=min(float(g.t_max_end), float(cfg.t_max)),
                       t_min=min(float(g.t_min), float(cfg.t_max)),
                       t_min_end=min(float(g.t_min_end), float(cfg.t_max)))
    if cfg.cfg_scale is not None:  # the fine stage's own scale is constant
        changes.update(cfg_scale=float(cfg.cfg_scale), cfg_scale_end=None)
    if cfg.sds_form is not None:
        changes["sds_form"] = str(cfg.sds_form)
    if changes:
        guidance = guidance.with_config(**changes)
    return sds_loss_fn(guidance)


def random_camera_fn(batch: int, resolution: int, coarse_cfg: CoarseConfig | None = None, seed: int | None = None,
                     device: torch.device | str = "cpu") -> CameraFn:
    """Random orbit cameras per step, in the coarse stage's sampling ranges (and its azimuth
    stratification) when given."""
    gen = torch.Generator().manual_seed(0 if seed is None else int(seed) + 1)
    kw = {}
    if coarse_cfg is not None:
        kw = dict(elevation_range=as_range(coarse_cfg.elevation_range),
                  distance_range=as_range(coarse_cfg.distance_range), fovy_range=as_range(coarse_cfg.fovy_range))
    stratified = bool(coarse_cfg is not None and coarse_cfg.stratified_azimuth)

    def fn(step: int) -> Cameras:
        return sample_cameras(batch, resolution, generator=gen, device=device, stratified_azimuth=stratified, **kw)

    return fn


def gaussian_fields(gaussians) -> dict[str, torch.Tensor]:
    """Activated, detached tensors (means, quats, scales, opacities, colors) of the coarse Gaussians.

    Accepts a ``GaussianModel`` (its ``activated()`` view), activated ``Gaussians``, any object with
    those attributes, or a mapping with those keys.
    """
    names = ("means", "quats", "scales", "opacities", "colors")
    g = gaussians.activated() if hasattr(gaussians, "activated") else gaussians
    out = {}
    for name in names:
        value = g.get(name) if isinstance(g, dict) else getattr(g, name, None)
        if value is None:
            raise TypeError(f"the Gaussians object has no {name!r}; need {names}")
        out[name] = value.detach() if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    return out


def extract_surface(gaussians, grid_resolution: int, threshold: float | None = None,
                    carve=None) -> tuple[np.ndarray, np.ndarray]:
    """The coarse stage's extractor at ``grid_resolution`` → (positions (N, 3), faces (F, 3)) numpy;
    ``carve``: ``backend.mesh.carve.CarveViews`` to fill what the coarse cameras never saw empty.

    Its own decimation is disabled (huge budget): :func:`prepare_textured_mesh` decimates after
    clean-up, so no faces are dropped before the winding/hole repair.
    """
    from backend.mesh.extract import extract_mesh

    kwargs = {"grid_resolution": int(grid_resolution), "face_budget": 1 << 30, "with_colors": False, "carve": carve}
    if threshold is not None:
        kwargs["threshold"] = float(threshold)
    mesh = extract_mesh(gaussians, **kwargs)
    return np.asarray(mesh.positions), np.asarray(mesh.faces).astype(np.int64)


@dataclass
class FineResult:
    """What the fine stage hands to ``run_job`` for export.

    mesh: MeshPayload in the Blender frame inside the [-1, 1]^3 volume (not yet scaled to
    ``object_size``) with per-corner UVs, vertex normals and ``texture_rgba``;
    losses: the refinement loss per step; info: clean-up / UV / bake statistics and timings.
    """

    mesh: MeshPayload
    losses: list[float] = field(default_factory=list)
    info: dict = field(default_factory=dict)


def run_fine_stage(gaussians: GaussianModel | Gaussians, preset, guidance, ctx: JobContext,
                   seed: int | None = None, *, loss_fn: LossFn | None = None,
                   camera_fn: CameraFn | None = None) -> FineResult:
    """Coarse Gaussians → textured, refined mesh (Blender frame, [−1, 1]³ volume).

    Args:
        gaussians: the coarse stage's result (``CoarseResult.gaussians``; see :func:`gaussian_fields`).
        preset: a ``Preset`` whose ``fine`` section is set.
        guidance: a ``Guidance`` with its prompt already set (used when ``loss_fn`` is None).
        ctx: the job's context (events, cancel).
        seed: the job's seed (picks the cameras).
        loss_fn, camera_fn: overrides for tests and tools.

    Returns:
        :class:`FineResult`; nothing is written to disk here (``run.py`` exports).
    """
    cfg = preset.fine
    if cfg is None:
        raise ValueError(f"preset {preset.name!r} has no fine stage")
    fields = gaussian_fields(gaussians)
    device = fields["means"].device
    backend = str(cfg.rasterizer)
    rz.resolve_backend(backend, device)  # a bad name or nvdiffrast without CUDA fails before any work
    ctx.emit(ProgressEvent("fine", 0, cfg.steps, "extracting mesh"))
    from backend.mesh.carve import carve_views_for

    positions, faces = extract_surface(gaussians, cfg.grid_resolution, preset.coarse.density_threshold,
                                       carve=carve_views_for(preset.coarse))
    ctx.check_cancel()
    color_fn = gaussian_color_fn(fields["means"], fields["quats"], fields["scales"], fields["opacities"],
                                 fields["colors"])
    mesh = prepare_textured_mesh(
        positions, faces, color_fn, face_budget=cfg.face_budget, texture_resolution=cfg.texture_resolution,
        uv_padding=int(cfg.uv_padding), uv_fill=bool(cfg.uv_fill), device=device, backend=backend,
        bake_dilation=int(cfg.bake_dilation),
        min_component_fraction=float(cfg.min_component_fraction))
    log.info("fine stage mesh: %s", {k: v for k, v in mesh.info.items() if k != "loss"})
    ctx.emit(PreviewEvent("fine", 0, mesh.to_payload(PREVIEW_TEXTURE_SIDE)))
    ctx.check_cancel()
    if loss_fn is None:
        loss_fn = fine_loss_fn(guidance, cfg)
    if camera_fn is None:
        camera_fn = random_camera_fn(int(cfg.batch_size), cfg.render_resolution, preset.coarse, seed=seed,
                                     device=device)
    shading = preset.shading if preset.shading.fine else None
    gen = torch.Generator().manual_seed(0 if seed is None else int(seed) + 2)
    refine(mesh, loss_fn, camera_fn, cfg, ctx, shading=shading, generator=gen)
    if cfg.rebake_sigma > 0:
        reunwrap = (dict(resolution=int(cfg.texture_resolution), padding=int(cfg.uv_padding), fill=bool(cfg.uv_fill))
                    if cfg.rebake_reunwrap and cfg.vertex_offsets else None)
        seam_aware_rebake(mesh, float(cfg.rebake_sigma), dilation=int(cfg.bake_dilation), backend=backend,
                          passes=int(cfg.rebake_passes), reunwrap=reunwrap)
    info = {k: v for k, v in mesh.info.items() if k != "loss"}
    return FineResult(mesh.to_payload(), list(mesh.info.get("loss", [])), info)

"""Presets: dataclasses for every pipeline setting, four named presets and dotted overrides.

A :class:`Preset` has nested sections ``coarse`` (:class:`CoarseConfig`), ``fine``
(:class:`FineConfig` or ``None`` for coarse-only presets) and ``guidance``
(:class:`GuidanceConfig`), plus ``object_size`` (largest dimension of the final asset in metres).

Every field can be overridden with a dotted key, from the CLI (``coarse.steps=300``) or a
submit message (``{"coarse.steps": 300}``)::

    preset = get_preset("draft", {"coarse.steps": "300", "guidance.cfg_scale": 50})

Values are checked and coerced by the one override parser, ``protocol.params`` (its
``OVERRIDE_SPECS`` table gives every key's type and documented range; strings from the CLI
included: ``"true"``/``"false"`` for booleans, ``"none"`` for optional fields, ``"64,256"`` for
tuples). A bad preset name, an unknown key or a bad value raises ``ValueError`` naming the key.

Annealed values are stored as ``<name>`` (start) and ``<name>_end`` and evaluated with
``backend.schedule``.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from protocol.errors import ProtocolError
from protocol.params import OVERRIDE_SPECS, coerce_value, parse_override_text, suggest_key


@dataclass
class GuidanceConfig:
    """Diffusion prior and SDS settings.

    Attributes:
        model: "auto" (SD 2.1-base with CUDA, the bundled CPU prior otherwise), a hub id or a
            local folder in the diffusers pipeline layout.
        cfg_scale: classifier-free guidance scale (DreamFusion-style SDS uses ~100 for SD).
        cfg_scale_end: when set, the scale falls linearly from ``cfg_scale`` at the start of a run to
            this at its end (None: constant). High guidance is mode-seeking and exaggerates a
            shape's salient features (DreamFusion §3.2, Poole et al. 2022; the over-saturation and
            over-smoothing ProlificDreamer, Wang et al. 2023, attributes to it); a lower scale late in
            the run lets the detail settle once the shape is there.
        negative_prompt: used when the job gives none.
        t_min, t_max: timestep range as fractions of the training timesteps at the start of the run;
        t_min_end, t_max_end: the same at the end of the run; t_anneal: schedule kind between them
            (these three shape ``t_sampling="random"`` only; an override of them on a DreamTime preset,
            every preset here, is refused by ``get_preset``).
        weighting: "sds" (w = 1 - alpha_bar_t, threestudio), "uniform" (w = 1) or
            "fantasia3d" (w = sqrt(alpha_bar_t) * (1 - alpha_bar_t)) or "sigma" (w = sqrt((1 - alpha_bar_t) /
            alpha_bar_t), LucidDreamer's weight for interval score matching).
        grad_clip: clamp each element of the SDS gradient to ±grad_clip (0 disables).
        t_sampling: "random" (t ~ U[t_lo, t_hi] of the annealed range) or "dreamtime"
            (DreamTime, Huang et al. 2023: a monotonically decreasing, time-prioritised t over the
            run within [t_min, t_max], prior W_p with dreamtime_m1/m2/s1/s2 as fractions of the
            training timesteps; each view jittered by ±t_jitter).
        sds_form: "eps" (the SDS gradient w(t)·(eps_hat − eps)), "ism" (below), "csd" (below) or "x0"
            (StableDreamer, Guo et al. 2023: reconstruction toward the one-step denoised image,
            x0_weight·(z − x0_hat)) or "multistep" (DreamGaussian, Tang et al. 2023, stage 2: toward the
            image denoised from t by ``denoise_steps`` DDIM steps, x0_weight·(z − x0)).
            ``sds_form="ism"`` is Interval Score Matching (LucidDreamer, Liang et al. 2024): the render
            reaches t by deterministic DDIM inversion instead of random noise, and the target is the
            unconditional prediction ``ism_interval`` timesteps below t on the same trajectory. Measured on
            the cpu preset (docs/benchmarks.md, session 20; stride 400, the fine stage on ``eps``): cones
            0.780 → 0.849 and green pyramids +0.05, but red cylinders and red cubes lose up to 0.07, so the
            same 24/36 IoU passes (mean 0.808 → 0.821) at 112 s a job instead of 67 s; off.
            ``sds_form="csd"`` is Classifier Score Distillation (Yu et al. 2024): w(t)·cfg·(eps_cond −
            eps_uncond), SDS without its eps_uncond − eps term, at SDS's cost.
        denoise_steps: DDIM steps of the multistep form (UNet passes per view and step).
        ism_interval: ISM's interval t − s in training timesteps (LucidDreamer: 25–100).
        ism_inversion_stride: the longest DDIM inversion step from 0 to s, in training timesteps
            (LucidDreamer's 200); the unconditional UNet passes per view are ceil(s / stride) + 1.
        ism_until: ISM for this fraction of the run, then plain SDS (fresh noise, the ``eps`` form): the
            high-noise steps early in the run decide the object's layout, which is where SDS's fresh noise
            lets each view pick its own (DreamTime's reading of the schedule, Huang et al. 2023); later, at
            low noise, the two differ little and SDS needs no inversion passes. 1 = the whole run.
        fp16: run the UNet/VAE in float16 on CUDA (always float32 on the CPU).
        attention_slicing: sliced attention; ignored where PyTorch SDPA exists (it would only be slower).
        cpu_offload: diffusers-style model offload: the models rest in CPU memory and each moves to the
            GPU for its own forward pass (the VAE encoder also for its backward).
        vae: the image encoder: "model" (the model's own AutoencoderKL) or "taesd" (``madebyollin/taesd``,
            diffusers AutoencoderTiny; falls back to the model's VAE with a warning when not downloaded),
            or a hub id / folder holding an AutoencoderTiny.
        view_dependent: append ", front view" / side / back / overhead to the prompt per camera.
    """

    model: str = "auto"
    cfg_scale: float = 100.0
    cfg_scale_end: float | None = None
    negative_prompt: str = ""
    t_min: float = 0.02
    t_max: float = 0.98
    t_min_end: float = 0.02
    t_max_end: float = 0.50
    t_anneal: str = "sqrt"
    weighting: str = "sds"
    grad_clip: float = 0.0
    t_sampling: str = "random"
    dreamtime_m1: float = 0.8
    dreamtime_m2: float = 0.5
    dreamtime_s1: float = 0.3
    dreamtime_s2: float = 0.1
    t_jitter: float = 0.0
    sds_form: str = "eps"
    x0_weight: float = 1.0
    denoise_steps: int = 4
    ism_interval: int = 50
    ism_inversion_stride: int = 200
    ism_until: float = 1.0
    fp16: bool = True
    attention_slicing: bool = False
    cpu_offload: bool = False
    vae: str = "model"
    view_dependent: bool = True


@dataclass
class CoarseConfig:
    """Gaussian SDS stage.

    Attributes:
        steps: optimisation steps; batch_size: views rendered per step.
        num_points: initial Gaussians; init_shape: "sphere" (uniform in a ball) or "shell";
            init_radius: ball radius (world units, the volume is [-1, 1]^3);
            init_scale: initial Gaussian std (world units); init_opacity: initial opacity in (0, 1).
        render_resolution, render_resolution_end: progressive render size (pixels, linear ramp
            that ends at ``resolution_ramp_until`` of the run).
        lr_means, lr_means_end: position learning rate (exp schedule); lr_scales, lr_quats,
            lr_opacities, lr_colors: constant Adam learning rates per parameter group.
        densify_from, densify_until: run fractions between which densify/prune happen every
            densify_interval steps; densify_fraction: fraction of Gaussians (largest view-space
            gradients) cloned/split each time; max_points: cap; prune_opacity: prune below it;
            prune_scale: prune Gaussians whose largest std exceeds it (world units);
            split_scale: Gaussians with a std above it (world units) are split, smaller ones cloned.
        random_bg_prob: probability of a random background colour per view (white otherwise).
        elevation_range, distance_range, fovy_range: camera sampling ranges (degrees / world units).
            Elevations reach 80° (DreamFusion samples −10°…90°): views from high above are what
            show a hole or a top face; with a 45° ceiling a torus's hole stayed filled by a film.
        preview_every: emit a preview mesh every N steps (0 = only at the end);
        preview_grid, preview_faces: density-grid resolution / face budget of previews;
        mesh_grid, mesh_faces: the same for the final mesh of coarse-only presets.
        density_threshold: iso level of the density grid (sum of opacity-weighted Gaussians).
        renderer: "auto", "gsplat" or "torch".
        opacity_entropy_weight: weight of the mean binary entropy of the Gaussians' opacities,
            which drives each opacity to 0 or 1 so half-transparent films and haze go (the opacity
            regulariser of GaussianDreamer-style / DreamGaussian-style Gaussian SDS); 0 disables.
        alpha_entropy_weight: the same on the rendered alpha per pixel (a crisp silhouette; threestudio's
            ``lambda_opaque``), from ``alpha_entropy_from`` of the run on (ramped in over a tenth of
            the run; ``coarse.alpha_entropy_weight()``). Measured on the cpu preset (docs/benchmarks.md,
            session 8): 300 from 0.25 makes cylinders and cubes boxier (+0.02 to +0.07 IoU) but costs
            cones 0.03 and films one torus hole in six; from the start it films every torus. Off.
        z_variance_weight: weight of the depth variance along each ray (HiFA's z-variance loss, Zhu et al.
            2023, threestudio's ``lambda_z_variance``): the mean, over the pixels whose rendered alpha is
            above 0.5, of Σ w (z − depth)² / Σ w, the spread of the splats' camera-space depths behind the
            pixel (world units²). It pulls each opaque pixel's opacity into one surface, so haze inside and
            in front of the object becomes surface, without the alpha entropy's barrier at half coverage
            that films a hole. From ``z_variance_from`` of the run on, ramped in over a tenth of the run
            (``coarse.z_variance_weight()``); 0 disables. Measured on the cpu preset (docs/benchmarks.md,
            session 22): from the start it films every torus hole (and makes plain boxes of the white cubes);
            1000 from 0.5 (on in ``cpu``) shrinks the white cubes' flaps, straightens the cones, and narrows the
            torus holes (one in six over 0.15).
        normal_smooth_weight: weight of the smoothness of the rendered depth normals (threestudio's
            ``lambda_normal_smooth``: the mean squared difference of neighbouring pixels' normals;
            ``shading.normal_smoothness``), from ``normal_smooth_from`` of the run on (ramped in over a
            tenth of the run like the alpha entropy); 0 disables. ``normal_smooth_cap`` > 0 truncates
            each pair's squared difference there (edge-preserving: creases and occlusion edges cost a
            constant), 0 leaves the plain square. Measured on the cpu preset (docs/benchmarks.md,
            session 9): from the start it films every torus hole, with or without the cap; 300 from
            0.5 (on in ``cpu``) smooths away warts and pits and raises the benchmark's IoU passes.
        normal_smooth_views: extra views per step, from below (``normal_smooth_elevation_range``),
            that only the normal smoothness sees, while it is on; 0 disables. The guidance's cameras
            stop at ``elevation_range``'s low end (the prior has seen nothing lower), so nothing shapes
            an object's underside and it stays as lumpy as the Gaussians started: its lowest bumps
            set the bounding box, under a base that sits a few voxels higher. A regulariser needs no
            prior, so it can look where the guidance cannot. ``normal_smooth_views_max_nz`` < 1 keeps
            only the pixels whose world normal points down (its z at most this) in those views' term:
            the faces no guidance camera sees face-on, not the walls of a hole seen from below.
            ``normal_smooth_views_scale`` multiplies the normal smoothness's weight for those views, and
            ``normal_smooth_views_cap`` is their cap (None: ``normal_smooth_cap``, as in the guidance's views).
            Measured on the cpu preset (docs/benchmarks.md, sessions 10–13): at scale 1 with cap 0.25
            the best mean IoU but every torus hole narrows (0.45–0.87), and the narrowing grows with
            the scale; with cap 0.05 in those views (``cpu``: scale 1) the holes stay open.
        max_scale: after every step each Gaussian's std is clamped to at most this (world units);
            0 disables. Large splats bridge holes and blur the surface. Measured on the cpu preset without
            densification (docs/benchmarks.md, session 6): 0.08 opens a torus's hole, and costs the pyramid,
            whose flat faces are a few splats 0.3 wide.
        opacity_reset_every: every this many steps (while densifying is still allowed) lower all
            opacities to 0.05 (3D Gaussian Splatting's opacity reset, Kerbl et al. 2023), so films
            and floaters the prior does not need fade and are pruned; 0 disables. Measured on the cpu
            preset (docs/benchmarks.md, session 6): without densification it prunes 15–60 % of 3000
            Gaussians; with the densifier on it half-closes a torus's hole.
        background: "solid" (white, or a random colour with ``random_bg_prob``) or "learned"
            (DreamFusion's environment background, optimised by ray direction at ``lr_background``;
            a random solid colour still replaces it with ``random_bg_prob``;
            ``backend/pipeline/background.py``).
        fill_unseen: mesh the Gaussians with the cells that none of this stage's cameras
            (``elevation_range``, ``distance_range``, ``fovy_range``) saw empty filled: space carving
            (Kutulakos & Seitz 2000; ``backend/mesh/carve.py``). Closes the hollow that SDS leaves under
            an object it only saw from above. Used by the final meshes (the fine stage's starting
            surface, the coarse GLB, a coarse-only result), not by previews.
        stratified_azimuth: each step's ``batch_size`` cameras come one from each of as many equal
            arcs of azimuth (threestudio's ``batch_uniform_azimuth``; ``cameras.sample_cameras``), so
            every step sees the object from all sides. Measured on the cpu preset (session 8): within
            noise; off.
        progressive_views_until: the camera ranges grow from one front view to the full ranges over
            this fraction of the run (threestudio's ``progressive_until``): at ``ratio`` r of the run the
            azimuth is drawn from ±180°·min(r / until, 1) and the elevation from ``elevation_range``
            pulled towards ``progressive_views_elevation`` by the same factor
            (``coarse.progressive_camera_ranges``). So the first views agree on which side of the object
            they see and the shape forms from them; later views meet a shape that is already there. 0
            disables (full ranges from the start). Measured on the cpu preset (session 20, until 0.3, 12
            runs): pyramids +0.01 to +0.05, cones and white cubes −0.04 to −0.08, mean 0.748 → 0.726; off.
        progressive_views_elevation: the front view's elevation (degrees) the ranges grow from
            (threestudio's ``eval_elevation_deg``).
        reference_weight: weight of a mask loss in one reference view drawn from the guidance model
            before the run (text → image → 3D, DreamCraft3D / Magic123; ``backend.pipeline.reference_view``):
            the mean squared error between the rendered alpha and the reference image's object mask, during
            the first ``reference_until`` of the run. The reference camera looks from azimuth 0 and
            ``reference_elevation`` degrees; the image is sampled with ``reference_steps`` ancestral steps at
            CFG ``reference_cfg``. Measured on the cpu preset (session 19, docs/benchmarks.md): pyramids and
            white cubes gain a little, cones lose up to 0.2 of IoU (also with a reference drawn by a 64 px
            prior: the prior does not know the elevation it drew), mean IoU 0.748 → 0.728 at best; off (0). ``reference_model``: draw the
            reference from this model (a folder or Hub id, e.g. a higher-resolution prior) instead of the
            guidance's own (None).
    """

    steps: int = 500
    batch_size: int = 4
    num_points: int = 4000
    init_shape: str = "sphere"
    init_radius: float = 0.5
    init_scale: float = 0.03
    init_opacity: float = 0.1
    render_resolution: int = 128
    render_resolution_end: int = 256
    resolution_ramp_until: float = 0.5
    lr_means: float = 1e-3
    lr_means_end: float = 2e-5
    lr_scales: float = 5e-3
    lr_quats: float = 5e-3
    lr_opacities: float = 5e-2
    lr_colors: float = 1e-2
    densify_from: float = 0.1
    densify_until: float = 0.6
    densify_interval: int = 50
    densify_fraction: float = 0.1
    max_points: int = 50000
    prune_opacity: float = 0.01
    prune_scale: float = 0.5
    split_scale: float = 0.04
    random_bg_prob: float = 0.5
    elevation_range: tuple[float, float] = (-10.0, 80.0)
    distance_range: tuple[float, float] = (2.8, 3.4)
    fovy_range: tuple[float, float] = (45.0, 55.0)
    preview_every: int = 100
    preview_grid: int = 64
    preview_faces: int = 20000
    mesh_grid: int = 128
    mesh_faces: int = 50000
    density_threshold: float = 0.5
    renderer: str = "auto"
    opacity_entropy_weight: float = 0.0
    alpha_entropy_weight: float = 0.0
    alpha_entropy_from: float = 0.0
    z_variance_weight: float = 0.0
    z_variance_from: float = 0.0
    normal_smooth_weight: float = 0.0
    normal_smooth_from: float = 0.0
    normal_smooth_cap: float = 0.0
    normal_smooth_views: int = 0
    normal_smooth_elevation_range: tuple[float, float] = (-80.0, -20.0)
    normal_smooth_views_max_nz: float = 1.0
    normal_smooth_views_scale: float = 1.0
    normal_smooth_views_cap: float | None = None
    max_scale: float = 0.0
    opacity_reset_every: int = 0
    background: str = "solid"
    lr_background: float = 1e-2
    fill_unseen: bool = False
    stratified_azimuth: bool = False
    progressive_views_until: float = 0.0
    progressive_views_elevation: float = 15.0
    reference_weight: float = 0.0
    reference_until: float = 1.0
    reference_elevation: float = 15.0
    reference_cfg: float = 3.0
    reference_steps: int = 30
    reference_model: str | None = None


@dataclass
class FineConfig:
    """Textured-mesh refinement stage.

    Attributes:
        steps: optimisation steps; render_resolution: rasterised view size (pixels);
        texture_resolution: texture side (pixels); grid_resolution: density grid used to
        extract the starting mesh; face_budget: faces after decimation; lr: texture learning
        rate; vertex_offsets: also optimise per-vertex offsets.
        batch_size: views rendered per step; preview_every: emit a textured preview every N steps
        (0 = only at the end); uv_padding: empty texels around each xatlas chart;
        uv_fill: refit xatlas's charts into exactly one atlas (padding exact in texels), best of three
            chart variants (one above 10k faces), stretched per axis to span the square
            (``backend.mesh.uv``; xatlas time about 0.5 → 2.5 s at 5k faces and 256², 23 → 29 s at 50k
            faces and 1024²); False: xatlas's own atlas normalised to the square;
        bake_dilation: texel rings filled beyond the charts when baking;
        min_component_fraction: clean-up keeps components with at least this fraction of faces;
        lr_offsets: vertex-offset learning rate; offset_limit: largest offset per axis (world
        units); laplacian_weight, normal_weight: offset regularisers; normal_cap: > 0 truncates each
        adjacent-face pair's normal-consistency cost there (a weak membrane that leaves creases to the
        guidance; ``fine.normal_consistency``), 0 the plain term; rasterizer: "auto",
        "nvdiffrast" or "torch".
        t_max: when set, the fine stage's SDS timesteps stay at or below this fraction (threestudio's
            Magic3D refine stage samples t in [0.02, 0.5]: the coarse shape is kept and only detail
            and colour are refined); None uses the guidance's own range.
        cfg_scale: the fine stage's classifier-free guidance scale (None: the guidance's).
        sds_form: the fine stage's SDS form (None: the guidance's); "multistep" is DreamGaussian's stage 2
            (Tang et al. 2023): the texture (and offsets) pulled toward multi-step denoised renders.
        texture_filter: "linear" (bilinear) or "linear-mipmap-linear" (mipmapped, antialiased
            minification with per-pixel UV derivatives; DreamGaussian's nvdiffrast mesh renderer):
            a texel then receives the gradient of every pixel whose footprint covers it.
        rebake_sigma: after refinement, re-bake the texture through 3D (each texel a Gaussian of
            this std in texels on the surface) so both sides of every UV seam agree and lone
            speckles average out (``fine.seam_aware_rebake``); 0 disables.
        tv_weight: weight of a total-variation smoothness prior on the texels (squared differences
            of neighbouring texels, mean over the texture), against speckle where few pixels
            constrain a texel.
        rebake_passes: how many times the seam-aware re-bake runs (each pass on the last one's result).
        rebake_reunwrap: with vertex offsets, unwrap the refined geometry again before the re-bake (the
            offsets shear the first unwrap's texels; ``fine.seam_aware_rebake``).
        random_bg_prob: probability that a view's background is a random colour instead of white
            (DreamFusion's background augmentation; ``background.view_backgrounds``).
    """

    steps: int = 300
    render_resolution: int = 512
    texture_resolution: int = 1024
    grid_resolution: int = 128
    face_budget: int = 50000
    lr: float = 1e-2
    vertex_offsets: bool = False
    batch_size: int = 4
    preview_every: int = 50
    uv_padding: int = 2
    uv_fill: bool = True
    bake_dilation: int = 16
    min_component_fraction: float = 0.02
    lr_offsets: float = 1e-4
    offset_limit: float = 0.05
    laplacian_weight: float = 1e4
    normal_weight: float = 1e2
    normal_cap: float = 0.0
    rasterizer: str = "auto"
    t_max: float | None = None
    cfg_scale: float | None = None
    sds_form: str | None = None
    tv_weight: float = 0.0
    texture_filter: str = "linear"
    rebake_sigma: float = 0.0
    rebake_passes: int = 1
    rebake_reunwrap: bool = False
    random_bg_prob: float = 0.0


@dataclass
class ShadingConfig:
    """Shading of the rendered views during SDS (DreamFusion, Poole et al. 2022; see
    ``backend/pipeline/shading.py``): the optimised colour becomes albedo, so the exported texture
    carries no baked light, and flat faces must be flat to shade evenly.

    Attributes:
        coarse, fine: shade the Gaussian renders (depth-map normals) / the mesh renders (face normals).
        ambient, diffuse: shade = ambient + diffuse · max(0, n·l).
        albedo_prob: probability that a view is rendered unshaded (albedo only);
        textureless_prob: probability that a view is rendered with a white albedo (shading only).
        light_elevation_range: light elevation above the horizon (degrees, uniform);
        light_azimuth_spread: light azimuth = camera azimuth ± this (degrees, uniform).
        light_frame: "camera" (the two settings above: DreamFusion's light around the camera) or
            "world": one light fixed in the world at ``world_light_azimuth``, ``world_light_elevation``
            (degrees), its unit vector jittered by Gaussian noise of std ``world_light_jitter`` and kept
            above the horizon, as the bundled prior's training renders are lit (``backend.priors.data``,
            ``priors.solids.DEFAULT_LIGHT``: 38°, 55°, jitter 0.25). Measured on the cpu preset
            (docs/benchmarks.md, session 8): cubes boxier, pyramids and cones worse; off.
    """

    coarse: bool = False
    fine: bool = False
    ambient: float = 0.4
    diffuse: float = 0.6
    albedo_prob: float = 0.2
    textureless_prob: float = 0.0
    light_elevation_range: tuple[float, float] = (20.0, 80.0)
    light_azimuth_spread: float = 90.0
    light_frame: str = "camera"
    world_light_azimuth: float = 38.0
    world_light_elevation: float = 55.0
    world_light_jitter: float = 0.25


@dataclass
class Preset:
    """A named set of pipeline settings. ``fine`` is None for coarse-only presets.

    ``object_size`` is the largest dimension of the final asset in metres (Blender units).
    """

    name: str
    coarse: CoarseConfig = field(default_factory=CoarseConfig)
    fine: FineConfig | None = field(default_factory=FineConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    shading: ShadingConfig = field(default_factory=ShadingConfig)
    object_size: float = 1.0
    seed: int | None = None


#: Issue-12 techniques every preset uses (see ``docs/benchmarks.md`` "Issue 12 — pipeline ablation"):
#: DreamFusion shading in both stages and its −10°…80° elevations, DreamTime timesteps, the Magic3D
#: refine stage's t_max 0.5, DreamGaussian's mipmapped texture lookups and the seam-aware re-bake; the
#: fine presets also refine the geometry (Magic3D vertex offsets, ``_geometry``) from a surface at
#: ``SURFACE_LEVEL``; the cpu preset also learns its background (DreamFusion), randomises the fine
#: stage's and unwraps the offset geometry again before its re-bake. Unverified on a GPU with Stable Diffusion in the sessions that set them (no GPU was
#: available); measured on the cpu preset.
def _shading() -> ShadingConfig:
    return ShadingConfig(coarse=True, fine=True)


#: Iso level of the summed Gaussian density for the meshes of the presets (``coarse.density_threshold``).
#: SDS leaves many half-transparent Gaussians (the cpu preset's median opacity is ~0.5, a quarter
#: below 0.1) whose stacks render as a solid face, and so look solid to the prior, while their summed
#: density at any one point stays under 0.5: the 0.5 level set then shows dents and lumps the renders
#: never had. Measured on the cpu preset (docs/benchmarks.md "Geometry (session 2)"): 0.15 raised IoU
#: on 5 of 6 solids (+0.02..+0.07; the cone −0.02). Unverified on a GPU with Stable Diffusion.
SURFACE_LEVEL = 0.15


def _geometry() -> dict:
    """Magic3D's refine-stage geometry (Lin et al. 2023, "Magic3D: High-Resolution Text-to-3D Content
    Creation", §4.2): per-vertex offsets optimised under SDS on the shaded renders, with a Laplacian on
    the offsets and normal consistency between neighbouring faces. Measured on the cpu preset with the
    lower surface level (docs/benchmarks.md "Geometry (session 2)"); unverified on a GPU."""
    return dict(vertex_offsets=True, lr_offsets=3e-3, offset_limit=0.05, laplacian_weight=1e4, normal_weight=1e3)


def _guidance(**kw) -> GuidanceConfig:
    return GuidanceConfig(t_sampling="dreamtime", **kw)


def _draft() -> Preset:
    return Preset(
        name="draft",
        coarse=CoarseConfig(steps=500, batch_size=4, num_points=4000, render_resolution=128,
                            render_resolution_end=256, preview_every=50, mesh_grid=128, mesh_faces=30000,
                            fill_unseen=True),
        fine=None, guidance=_guidance(vae="taesd"), shading=_shading(),
    )


def _standard() -> Preset:
    return Preset(
        name="standard",
        coarse=CoarseConfig(steps=800, batch_size=4, num_points=5000, preview_every=100,
                            density_threshold=SURFACE_LEVEL, fill_unseen=True),
        fine=FineConfig(steps=300, render_resolution=512, texture_resolution=1024, t_max=0.5,
                        texture_filter="linear-mipmap-linear", rebake_sigma=1.0, **_geometry()),
        guidance=_guidance(), shading=_shading(),
    )


def _high() -> Preset:
    return Preset(
        name="high",
        coarse=CoarseConfig(steps=1500, batch_size=4, num_points=5000, render_resolution=256,
                            render_resolution_end=512, max_points=100000, preview_every=150,
                            mesh_grid=192, mesh_faces=100000, density_threshold=SURFACE_LEVEL, fill_unseen=True),
        fine=FineConfig(steps=600, render_resolution=512, texture_resolution=2048, grid_resolution=192,
                        face_budget=100000, t_max=0.5, texture_filter="linear-mipmap-linear", rebake_sigma=1.0,
                        **_geometry()),
        guidance=_guidance(), shading=_shading(),
    )


def _cpu() -> Preset:
    """Finishes on 2 CPU cores in a few minutes with the bundled pixel-space prior.

    Four views per coarse step, as the GPU presets: the SDS gradient of each step is the mean over
    four random cameras, so a prior that does not know the camera's yaw (the bundled one) pulls fewer
    rotations of a square into one step's silhouette; measured: cube IoU 0.675 → 0.715, pyramid 0.551 →
    0.596 over 4 seeds of the coarse stage alone, coarse stage 32 → 48 s. Three views in four get a random
    solid backdrop instead of the learned one (DreamFusion's augmentation, ``random_bg_prob`` 0.75, was
    0.5): with the longer-trained prior, Gaussians painted in the learned backdrop's colour spanned the
    torus hole (hole 0.77–1.00 in 4 of 4 runs; 0.00–0.15 at 0.75). Both measured in docs/benchmarks.md
    "Coarse-stage sweep and DreamGaussian's multi-step target (session 4)".

    The second half of the coarse run smooths the Gaussians' depth normals (threestudio's
    ``lambda_normal_smooth``, ``coarse.normal_smooth_weight`` 300 from ``normal_smooth_from`` 0.5, so a
    torus's hole has opened first): on the 12-prompt × 3-seed benchmark mean IoU 0.767 → 0.787, IoU
    passes 19 → 22 of 36, the warts and pits gone from the sheets; one torus hole in six half-filmed
    (docs/benchmarks.md "Normal smoothness on the Gaussians' depth normals (session 9)").

    One extra view per step from below (``coarse.normal_smooth_views`` 1) lets the normal smoothness
    shape the underside no guidance camera sees, counting only downward-facing pixels
    (``normal_smooth_views_max_nz`` 0); the extra render costs about a tenth of a job's time (+6 % and
    +11 % in interleaved pairs; docs/benchmarks.md "Issue 12 — after (session 12)").

    Each pixel pair's cost is capped (``normal_smooth_cap``: a weak membrane): at 0.1 (18°) in the
    guidance's views and 0.05 (13°) in the view from below (``normal_smooth_views_cap``), which then
    has the full weight (``normal_smooth_views_scale`` 1). At 48 px a torus's tube bends about 18–20°
    from pixel to pixel, so with the earlier cap of 0.25 (29°) the term fattened the tube into the hole
    and the view from below had to stay at a tenth of the weight. With the low caps the tube's bend
    costs a constant while small bumps are still smoothed. On the 12-prompt × 3-seed benchmark,
    against cap 0.25 with a tenth of the weight from below: IoU passes 24 → 27 and every-measure passes
    23 → 26 of 36 (26 and 25 once every job is seeded after the model loads, session 14), torus holes
    5/6 → 6/6 (at most 0.10), pyramids 0.719 → 0.758 (1/6 → 4/6); mean IoU 0.808 either way, the blue
    cones lose (0.67–0.73) and the white cubes stay at 0.68–0.70 (docs/benchmarks.md "A cap of their
    own for the views from below (session 13)"). The GPU presets leave all of it off: unmeasured with
    Stable Diffusion, and the term's scale depends on the render resolution.

    The texels' total-variation prior weighs 1e5 (``fine.tv_weight``, was 1e4). The coarse Gaussians'
    colours are clean (a white cube's share of off-colour samples is 0.001 before the fine stage), and
    the fine stage's 40 SDS steps on the texels, with this 32 px prior, paint tinted blotches on them:
    pastel on 0.20–0.25 of the white cubes' surface, dark on 0.14–0.17 of the orange tori's. At 1e5
    those shares fall to 0.05–0.10 and 0.02–0.04, the seams and speckle drop, and the IoU moves by at
    most 0.006 (docs/benchmarks.md, "Session 21"). The GPU presets keep their own weights.

    The second half of the coarse run also pulls each opaque pixel's opacity into one surface along its ray
    (HiFA's z-variance, ``coarse.z_variance_weight`` 1000 from ``z_variance_from`` 0.5): the flaps along the
    white cubes' top edges shrink (with the pastel mottling painted on them), and the cones lose their "kiss"
    tips and concave flanks. On
    the 12-prompt × 3-seed benchmark, against the same code without it (session 22): IoU passes 26 → 29 of 36,
    every measure 26 → 28, mean IoU 0.811 → 0.820, cones 4/6 → 6/6; but the torus holes narrow (0.01–0.06 →
    0.04–0.19), and one in six goes over the 0.15 target. From the start it films every torus hole, as the
    alpha entropy does (a ray through the hole crosses two depths); from 0.25 it films three in four
    (docs/benchmarks.md, "Session 22"). Off in the GPU presets: unmeasured with Stable Diffusion."""
    return Preset(
        name="cpu",
        coarse=CoarseConfig(steps=350, batch_size=4, num_points=1000, init_scale=0.05, init_opacity=0.2,
                            render_resolution=32, render_resolution_end=48, resolution_ramp_until=0.5,
                            lr_means=2e-3, lr_means_end=1e-4, densify_interval=40, densify_fraction=0.1,
                            max_points=3000, split_scale=0.06, preview_every=50, preview_grid=48,
                            preview_faces=5000, mesh_grid=64, mesh_faces=10000, background="learned",
                            random_bg_prob=0.75, density_threshold=SURFACE_LEVEL, fill_unseen=True,
                            normal_smooth_weight=300.0, normal_smooth_from=0.5, normal_smooth_cap=0.1,
                            normal_smooth_views=1, normal_smooth_views_max_nz=0.0,
                            normal_smooth_views_scale=1.0, normal_smooth_views_cap=0.05,
                            z_variance_weight=1000.0, z_variance_from=0.5),
        fine=FineConfig(steps=40, render_resolution=64, texture_resolution=256, grid_resolution=64,
                        face_budget=5000, lr=2e-2, t_max=0.5,
                        texture_filter="linear-mipmap-linear", tv_weight=1e5, rebake_sigma=1.5,
                        rebake_passes=2, rebake_reunwrap=True, random_bg_prob=0.5, **_geometry()),
        guidance=_guidance(model="auto", cfg_scale=20.0, fp16=False),
        shading=_shading(),
    )


PRESETS = {"draft": _draft, "standard": _standard, "high": _high, "cpu": _cpu}


#: Not a preset of its own: ``standard`` where CUDA is present, ``cpu`` elsewhere.
AUTO_PRESET = "auto"


def preset_names() -> list[str]:
    """The names accepted by :func:`get_preset` (``auto`` included)."""
    return [AUTO_PRESET, *PRESETS]


def resolve_preset_name(name: str) -> str:
    """``auto`` → ``standard`` with CUDA, ``cpu`` without; any other name is returned unchanged."""
    if name != AUTO_PRESET:
        return name
    import torch

    return "standard" if torch.cuda.is_available() else "cpu"


def get_preset(name: str, overrides: dict[str, Any] | None = None) -> Preset:
    """A fresh copy of preset ``name`` with dotted ``overrides`` applied (see the module docstring).

    ``auto`` resolves to ``standard`` with CUDA and ``cpu`` without; the returned preset's
    ``name`` is the resolved one.

    Raises:
        ValueError: unknown preset, unknown override key, a value that does not fit the field, or an
            override that the preset's timestep sampling would ignore (``ANNEALED_RANGE_KEYS`` with
            DreamTime).
    """
    if not isinstance(name, str) or name not in preset_names():
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(preset_names())}")
    preset = PRESETS[resolve_preset_name(name)]()
    for key, value in (overrides or {}).items():
        apply_override(preset, key, value)
    validate_preset(preset)
    ignored = sorted(set(overrides or {}) & set(ANNEALED_RANGE_KEYS))
    if ignored and preset.guidance.t_sampling == "dreamtime":
        verb = "has" if len(ignored) == 1 else "have"
        raise ValueError(f"{', '.join(ignored)} {verb} no effect with guidance.t_sampling=dreamtime (DreamTime's "
                         "schedule runs over [guidance.t_min, guidance.t_max]); set guidance.t_sampling=random "
                         "to anneal the range instead")
    return preset


#: Overrides that only shape the annealed range of ``t_sampling="random"``; DreamTime ignores them.
ANNEALED_RANGE_KEYS = ("guidance.t_min_end", "guidance.t_max_end", "guidance.t_anneal")


def validate_preset(preset: Preset) -> None:
    """Raise ValueError naming the field when a value is out of its range."""
    c, g = preset.coarse, preset.guidance
    checks = [
        ("coarse.steps", c.steps >= 1, "must be >= 1"),
        ("coarse.batch_size", c.batch_size >= 1, "must be >= 1"),
        ("coarse.num_points", c.num_points >= 1, "must be >= 1"),
        ("coarse.render_resolution", c.render_resolution >= 8, "must be >= 8"),
        ("coarse.render_resolution_end", c.render_resolution_end >= 8, "must be >= 8"),
        ("coarse.init_shape", c.init_shape in ("sphere", "shell"), "must be 'sphere' or 'shell'"),
        ("coarse.init_opacity", 0.0 < c.init_opacity < 1.0, "must be in (0, 1)"),
        ("coarse.init_scale", c.init_scale > 0, "must be > 0"),
        ("coarse.init_radius", c.init_radius > 0, "must be > 0"),
        ("coarse.densify_interval", c.densify_interval >= 1, "must be >= 1"),
        ("coarse.max_points", c.max_points >= c.num_points, "must be >= coarse.num_points"),
        ("coarse.preview_every", c.preview_every >= 0, "must be >= 0"),
        ("coarse.renderer", c.renderer in ("auto", "gsplat", "torch"), "must be auto, gsplat or torch"),
        ("coarse.progressive_views_until", 0.0 <= c.progressive_views_until <= 1.0, "must be in [0, 1]"),
        ("coarse.progressive_views_elevation", -90.0 <= c.progressive_views_elevation <= 90.0,
         "must be in [-90, 90] degrees"),
        ("guidance.t_min", 0.0 <= g.t_min <= g.t_max <= 1.0, "need 0 <= t_min <= t_max <= 1"),
        ("guidance.t_min_end", 0.0 <= g.t_min_end <= g.t_max_end <= 1.0,
         "need 0 <= t_min_end <= t_max_end <= 1"),
        ("guidance.weighting", g.weighting in ("sds", "uniform", "fantasia3d", "sigma"),
         "must be sds, uniform, fantasia3d or sigma"),
        ("guidance.t_anneal", g.t_anneal in ("constant", "linear", "cosine", "sqrt", "step"),
         "must be constant, linear, cosine, sqrt or step"),
        ("guidance.grad_clip", g.grad_clip >= 0, "must be >= 0"),
        ("guidance.vae", isinstance(g.vae, str) and bool(g.vae.strip()),
         "must be model, taesd, or a hub id / folder holding an AutoencoderTiny"),
        ("guidance.t_sampling", g.t_sampling in ("random", "dreamtime"), "must be random or dreamtime"),
        ("guidance.sds_form", g.sds_form in ("eps", "x0", "multistep", "ism", "csd"),
         "must be eps, x0, multistep, ism or csd"),
        ("guidance.ism_interval", 1 <= g.ism_interval <= 500, "must be 1..500 timesteps"),
        ("guidance.ism_inversion_stride", 10 <= g.ism_inversion_stride <= 1000, "must be 10..1000 timesteps"),
        ("guidance.ism_until", 0.0 <= g.ism_until <= 1.0, "must be in [0, 1] (a fraction of the run)"),
        ("fine.sds_form", preset.fine is None or preset.fine.sds_form in (None, "eps", "x0", "multistep"),
         "must be none, eps, x0 or multistep"),
        ("guidance.t_jitter", 0.0 <= g.t_jitter <= 0.5, "must be in [0, 0.5]"),
        ("object_size", preset.object_size > 0, "must be > 0 (metres)"),
        ("shading.ambient", preset.shading.ambient >= 0, "must be >= 0"),
        ("shading.diffuse", preset.shading.diffuse >= 0, "must be >= 0"),
        ("shading.albedo_prob", 0.0 <= preset.shading.albedo_prob + preset.shading.textureless_prob <= 1.0
         and preset.shading.albedo_prob >= 0 and preset.shading.textureless_prob >= 0,
         "albedo_prob and textureless_prob must be >= 0 with a sum <= 1"),
    ]
    if preset.fine is not None:
        checks += [
            ("fine.steps", preset.fine.steps >= 0, "must be >= 0"),
            ("fine.render_resolution", preset.fine.render_resolution >= 8, "must be >= 8"),
            ("fine.texture_resolution", preset.fine.texture_resolution >= 8, "must be >= 8"),
            ("fine.face_budget", preset.fine.face_budget >= 4, "must be >= 4"),
            ("fine.normal_cap", preset.fine.normal_cap >= 0, "must be >= 0 (0: no cap)"),
            ("fine.texture_filter", preset.fine.texture_filter in ("linear", "linear-mipmap-linear"),
             "must be linear or linear-mipmap-linear"),
            ("fine.t_max", preset.fine.t_max is None or 0.0 < preset.fine.t_max <= 1.0, "must be in (0, 1]"),
            ("fine.tv_weight", preset.fine.tv_weight >= 0, "must be >= 0"),
            ("fine.rebake_sigma", preset.fine.rebake_sigma >= 0, "must be >= 0"),
        ]
    for key, ok, why in checks:
        if not ok:
            raise ValueError(f"bad value for {key!r} in preset {preset.name!r}: {why}")


def parse_override(text: str) -> tuple[str, str]:
    """Split a CLI override ``"coarse.steps=300"`` into ``("coarse.steps", "300")``
    (``protocol.params.parse_override_text``)."""
    if "=" not in text:  # checked here too: ";" inside a single override is not a separator
        raise ValueError(f"override {text!r} must look like section.field=value (e.g. coarse.steps=300)")
    key, value = text.split("=", 1)
    try:
        parsed = parse_override_text(f"{key}=x")
    except ProtocolError as exc:
        raise ValueError(exc.message) from None
    return next(iter(parsed)), value.strip()


def parse_overrides(items: list[str]) -> dict[str, str]:
    """Several CLI overrides into a dict (later ones win)."""
    return dict(parse_override(item) for item in items)


def override_keys(preset: Preset | None = None) -> list[str]:
    """Every dotted key that can be overridden (for help texts and validation)."""
    preset = preset or get_preset("standard")
    keys: list[str] = []

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            elif f.name != "name":
                keys.append(prefix + f.name)

    walk(preset, "")
    if preset.fine is None:
        keys.extend(f"fine.{f.name}" for f in dataclasses.fields(FineConfig))
    return keys


def apply_override(preset: Preset, key: str, value: Any) -> None:
    """Set dotted ``key`` on ``preset`` in place, coercing ``value`` to the field's type."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"override key must be a non-empty string, got {key!r}")
    parts = key.split(".")
    if parts == ["fine"] and _is_none(value):
        preset.fine = None
        return
    obj: Any = preset
    for i, part in enumerate(parts[:-1]):
        if part == "fine" and i == 0 and preset.fine is None:
            preset.fine = FineConfig()  # overriding a fine field enables the fine stage
        sub = getattr(obj, part, None) if dataclasses.is_dataclass(obj) else None
        if sub is None or not dataclasses.is_dataclass(sub):
            raise ValueError(f"unknown override key {key!r} (in preset {preset.name!r}): "
                             f"{'.'.join(parts[:i + 1])!r} is not a section")
        obj = sub
    fields = {f.name: f for f in dataclasses.fields(obj)}
    leaf = parts[-1]
    if leaf not in fields or (obj is preset and leaf == "name") or dataclasses.is_dataclass(getattr(obj, leaf)):
        raise ValueError(f"{suggest_key(key, OVERRIDE_SPECS)} (preset {preset.name!r})")
    spec = OVERRIDE_SPECS.get(key)
    if spec is None:
        raise ValueError(f"override {key!r} has no entry in protocol.params.OVERRIDE_SPECS")
    try:
        coerced = coerce_value(key, value, spec, allow_local_paths=True)  # the CLI/local side: paths allowed
    except ProtocolError as exc:
        raise ValueError(exc.message) from None
    setattr(obj, leaf, coerced)


def _is_none(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "off"))


def preset_to_dict(preset: Preset) -> dict[str, Any]:
    """A JSON-friendly dict of a preset (for job records and logs)."""
    return dataclasses.asdict(copy.deepcopy(preset))

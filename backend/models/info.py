"""What the server tells clients about models in ``hello_reply`` (``device``, ``model``, ``models``, ``vocabulary``).

``model`` is the id ``guidance.model = "auto"`` resolves to on this machine (the SD 2.1-base mirror on
CUDA, ``conjure-solids`` otherwise); ``models`` lists the catalogue plus every other cached diffusers
model as ``{"id", "name", "present"}``; ``vocabulary`` is the word list of the default model when it
is closed-vocabulary (``conjure-solids``), else empty; ``versions`` the packages that run (python, conjure,
torch, diffusers, gsplat, diffrp-nvdiffrast; None when missing). No torch import, no network.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from backend.models.cache import cached_models
from backend.models.catalogue import BUNDLED_MODEL, CATALOGUE, DEFAULT_GPU_MODEL
from backend.models.device import describe_device, has_cuda

log = logging.getLogger(__name__)

MAX_MODELS = 256


def default_model_id(cuda: bool | None = None) -> str:
    """The model ``auto`` picks: the SD 2.1-base mirror with CUDA, the bundled prior without."""
    return DEFAULT_GPU_MODEL if (has_cuda() if cuda is None else cuda) else BUNDLED_MODEL


def bundled_vocabulary() -> list[str]:
    """The words the bundled prior knows (its ``vocabulary.json``, else the priors package's word lists)."""
    from backend.priors import BUNDLED_PRIOR_DIR

    vocab_file = Path(BUNDLED_PRIOR_DIR) / "vocabulary.json"
    words: list[str] = []
    if vocab_file.is_file():
        data = json.loads(vocab_file.read_text())
        words = [w for group in data.values() for w in group] if isinstance(data, dict) else list(data)
    if not words:
        from backend.priors import COLOURS, FILLER_WORDS, SHAPES, VIEWS

        words = [*SHAPES, *COLOURS, *VIEWS, *FILLER_WORDS]
    return sorted({str(w).lower() for w in words})


def model_list() -> list[dict]:
    """Catalogue entries (pipelines and the bundled prior) then other cached diffusers pipelines."""
    try:
        cached = {m.id: m for m in cached_models()}
    except Exception as exc:
        log.warning("could not scan the model cache: %s", exc)
        cached = {}
    out = []
    for entry in CATALOGUE:
        if entry.kind == "vae":
            continue  # an encoder option, not a guidance model a user picks
        present = entry.id == BUNDLED_MODEL or bool(cached.get(entry.id) and cached[entry.id].diffusers)
        out.append({"id": entry.id, "name": entry.name, "present": present})
    known = {e.id for e in CATALOGUE}
    for mid, m in cached.items():
        if mid not in known and m.snapshot is not None and (m.snapshot / "model_index.json").is_file():
            out.append({"id": mid, "name": mid, "present": True})
    return out[:MAX_MODELS]


def versions() -> dict[str, str | None]:
    """Versions of what runs (package metadata only; nothing is imported): the panel shows them."""
    from backend import __version__
    from backend.server.worker import package_versions

    keep = ("python", "conjure", "torch", "diffusers", "gsplat", "diffrp-nvdiffrast")
    out = {k: v for k, v in package_versions().items() if k in keep}
    out["conjure"] = out.get("conjure") or __version__  # a source checkout has no package metadata
    return out


def hello_model_fields() -> dict:
    """``{"device", "model", "models", "vocabulary", "versions"}`` for ``hello_reply``."""
    model = default_model_id()
    return {"device": describe_device(), "model": model, "models": model_list(),
            "vocabulary": bundled_vocabulary() if model == BUNDLED_MODEL else [], "versions": versions()}


def safe_hello_model_fields() -> dict:
    """:func:`hello_model_fields`, or just ``{"device": ...}`` if anything goes wrong (hello must always answer)."""
    try:
        return hello_model_fields()
    except Exception as exc:
        log.warning("hello model fields unavailable: %s", exc)
        try:
            return {"device": describe_device()}
        except Exception:
            return {}

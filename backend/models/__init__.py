"""Model management: the catalogue of known-good models, the Hugging Face cache, the device line.

* ``catalogue.py`` — ``CATALOGUE`` (SD 2.1-base mirror = default on CUDA, SD 1.5 mirror, TAESD, the
  bundled ``conjure-solids``), ``pull_command(id)``;
* ``cache.py`` — ``cached_models()``, ``is_present(id)``, ``pull(id)``, ``remove(id)``, licences;
* ``device.py`` — ``describe_device()`` ("CPU" / "CUDA · NVIDIA H200");
* ``info.py`` — ``hello_model_fields()`` for the server's ``hello_reply``.

CLI: ``conjure-backend models list | pull ID | remove ID`` and ``conjure-backend doctor``.
"""

from backend.models.cache import (
    CachedModel,
    ModelStoreError,
    cached_models,
    hub_cache_dir,
    is_present,
    pull,
    remove,
    snapshot_path,
)
from backend.models.catalogue import (
    BUNDLED_MODEL,
    CATALOGUE,
    DEFAULT_GPU_MODEL,
    TAESD_MODEL,
    CatalogueEntry,
    catalogue_entry,
    pull_command,
)
from backend.models.device import describe_device
from backend.models.info import default_model_id, hello_model_fields, model_list

__all__ = [
    "BUNDLED_MODEL", "CATALOGUE", "DEFAULT_GPU_MODEL", "TAESD_MODEL", "CachedModel", "CatalogueEntry",
    "ModelStoreError", "cached_models", "catalogue_entry", "default_model_id", "describe_device",
    "hello_model_fields", "hub_cache_dir", "is_present", "model_list", "pull", "pull_command", "remove",
    "snapshot_path",
]

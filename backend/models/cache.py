"""The local Hugging Face cache as Conjure's model store: list, licence, presence, pull, remove.

Everything goes through huggingface_hub (``scan_cache_dir``, ``snapshot_download``,
``try_to_load_from_cache``, ``DeleteCacheStrategy``), so the layout is the one ``from_pretrained``
reads: ``$HF_HUB_CACHE`` (default ``$HF_HOME/hub``, ``~/.cache/huggingface/hub``) /
``models--<owner>--<name>/{blobs,refs,snapshots/<commit>/...}``. The cache directory is read from
the environment on every call, so a test (or a user) can point ``HF_HOME`` / ``HF_HUB_CACHE`` elsewhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from backend.models.catalogue import BUNDLED_MODEL, PIPELINE_IGNORE, catalogue_entry, pull_command


class ModelStoreError(RuntimeError):
    """A model-store operation failed with a message meant for the user."""


@dataclass
class CachedModel:
    """One model repository in the cache.

    id: hub id; size_bytes: bytes on disk (all revisions); revisions: number of snapshots;
    snapshot: path of the newest snapshot folder; licence: the model card's ``license`` (None if
    the card is not cached); diffusers: True when the snapshot has ``model_index.json`` or a
    diffusers ``config.json`` (a loadable model rather than a stray download).
    """

    id: str
    size_bytes: int
    revisions: int
    snapshot: Path | None
    licence: str | None
    diffusers: bool


def hub_cache_dir() -> Path:
    """``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub`` (read now, not at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set (hub ids are then only looked up in the local cache)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def licence_of(snapshot: Path | None) -> str | None:
    """The ``license`` field of the model card's YAML front matter (``README.md``), if cached."""
    if snapshot is None:
        return None
    card = snapshot / "README.md"
    if not card.is_file():
        return None
    from huggingface_hub.repocard import metadata_load

    try:
        meta = metadata_load(card) or {}
    except Exception:
        return None
    lic = meta.get("license")
    if isinstance(lic, list):
        lic = ", ".join(str(x) for x in lic)
    return str(lic) if lic else None


def _is_diffusers(snapshot: Path | None) -> bool:
    return snapshot is not None and ((snapshot / "model_index.json").is_file() or (snapshot / "config.json").is_file())


def cached_models(cache_dir: Path | None = None) -> list[CachedModel]:
    """Every model repository in the cache (sorted by id); an empty list when the cache does not exist."""
    from huggingface_hub import scan_cache_dir

    cache_dir = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
    if not cache_dir.is_dir():
        return []
    info = scan_cache_dir(cache_dir)
    out = []
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        revs = sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True)
        snap = Path(revs[0].snapshot_path) if revs else None
        out.append(CachedModel(repo.repo_id, int(repo.size_on_disk), len(revs), snap, licence_of(snap),
                               _is_diffusers(snap)))
    return sorted(out, key=lambda m: m.id)


def snapshot_path(model_id: str, cache_dir: Path | None = None) -> Path | None:
    """The newest cached snapshot folder of ``model_id`` holding a diffusers model, or None."""
    for m in cached_models(cache_dir):
        if m.id == model_id and m.diffusers:
            return m.snapshot
    return None


def is_present(model_id: str, cache_dir: Path | None = None) -> bool:
    """True when ``model_id`` can load without the network (bundled, a folder, or in the cache)."""
    if model_id == BUNDLED_MODEL:
        return True
    if Path(model_id).expanduser().is_dir():
        return True
    return snapshot_path(model_id, cache_dir) is not None


def human_size(n: int) -> str:
    """Bytes as '1.2 GB' / '335.0 MB' / '12 B' (decimal units, like the Hub)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def progress_tqdm(callback, show: bool = False):
    """A ``tqdm`` class for ``snapshot_download(tqdm_class=...)`` that reports ``callback(done, total, unit)``.

    It follows one bar: the first byte bar ("B", recent huggingface_hub), else the file-count bar (older
    versions only pass ``tqdm_class`` to that one). ``show=False`` draws nothing.
    """
    from tqdm.auto import tqdm

    followed: list[object] = []

    class ProgressTqdm(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.pop("name", None)
            if not show:
                kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            self._unit = kwargs.get("unit", "it")
            self._done = float(kwargs.get("initial", 0) or 0)
            if not followed or (self._unit == "B" and getattr(followed[0], "_unit", "") != "B"):
                followed[:] = [self]

        def update(self, n=1):
            self._done += float(n or 0)
            out = super().update(n)
            if followed and followed[0] is self:
                callback(int(self._done), int(self.total or 0), self._unit)
            return out

    return ProgressTqdm


def pull(model_id: str, progress: bool = True, cache_dir: Path | None = None, on_progress=None) -> Path:
    """Download (or finish downloading) ``model_id`` into the cache; return its snapshot folder.

    ``snapshot_download`` resumes partial files (``.incomplete`` blobs) and skips complete ones, so a
    second pull after an interruption only fetches what is missing. Catalogue entries leave out files
    SDS does not need (single-file checkpoints, fp16 duplicates, the safety checker). ``on_progress(done,
    total, unit)`` is called as bytes (or, with older huggingface_hub, files) arrive.

    Raises:
        ModelStoreError: offline mode, the bundled model, an unknown repository or a network failure.
    """
    if model_id == BUNDLED_MODEL:
        raise ModelStoreError(f"{BUNDLED_MODEL} is bundled with Conjure; there is nothing to download")
    if not isinstance(model_id, str) or model_id.count("/") != 1 or model_id.startswith(("/", ".", "~")):
        raise ModelStoreError(f"{model_id!r} is not a Hugging Face model id (owner/name)")
    if hub_offline():
        raise ModelStoreError(f"HF_HUB_OFFLINE is set, so {model_id} cannot be downloaded; unset it (or run "
                              f"`{pull_command(model_id)}` on a machine with network access and copy "
                              f"{hub_cache_dir()} over)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    entry = catalogue_entry(model_id)
    ignore = list(entry.ignore) if entry is not None else list(PIPELINE_IGNORE[:6])
    (disable_progress_bars if not progress else enable_progress_bars)()
    extra = {"tqdm_class": progress_tqdm(on_progress, show=progress)} if on_progress is not None else {}
    try:
        path = snapshot_download(model_id, cache_dir=str(cache_dir or hub_cache_dir()), ignore_patterns=ignore,
                                 **extra)
    except Exception as exc:
        raise ModelStoreError(f"could not download {model_id}: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    finally:
        enable_progress_bars()
    return Path(path)


def remove(model_id: str, cache_dir: Path | None = None) -> int:
    """Delete every cached revision of ``model_id``; return the bytes freed.

    Raises:
        ModelStoreError: the bundled model, or a model that is not in the cache.
    """
    from huggingface_hub import scan_cache_dir

    if model_id == BUNDLED_MODEL:
        raise ModelStoreError(f"{BUNDLED_MODEL} is bundled with Conjure and cannot be removed")
    cache_dir = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
    if not cache_dir.is_dir():
        raise ModelStoreError(f"{model_id} is not in the model cache ({cache_dir} does not exist)")
    info = scan_cache_dir(cache_dir)
    for repo in info.repos:
        if repo.repo_id == model_id and repo.repo_type == "model":
            strategy = info.delete_revisions(*[r.commit_hash for r in repo.revisions])
            freed = int(strategy.expected_freed_size)
            strategy.execute()
            return freed
    raise ModelStoreError(f"{model_id} is not in the model cache {cache_dir}")

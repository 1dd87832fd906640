"""Shared pytest set-up: repo root on sys.path, artifact folder, markers that skip cleanly."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO_ROOT / "artifacts"

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# Child processes (servers, bpy subprocesses) import the repo's packages too.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
)


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """A folder (gitignored) where tests leave screenshots, logs and meshes for people to look at."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


class TinyModels:
    """Tiny random diffusers model folders (see ``tests/tiny_models.py``), by kind: ``"latent"``
    (VAE + UNet on 4×16×16 latents) or ``"pixel"`` (UNet on 3×32×32 RGB). Each is built on first use
    and shared by every test in the session; tests must not modify them (copy first)."""

    KINDS = ("latent", "pixel")

    def __init__(self, root: Path):
        self.root = root
        self._built: dict[str, Path] = {}

    def __getitem__(self, kind: str) -> Path:
        if kind not in self.KINDS:
            raise KeyError(f"tiny model kind {kind!r}; known: {', '.join(self.KINDS)}")
        if kind not in self._built:
            from tests.tiny_models import build_tiny_model

            self._built[kind] = build_tiny_model(self.root / kind, latent=kind == "latent")
        return self._built[kind]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> TinyModels:
    """The one place tests get tiny random models from (built lazily, once per session)."""
    return TinyModels(tmp_path_factory.mktemp("tiny-models"))


def pytest_collection_modifyitems(config, items):
    have_blender = shutil.which("blender") is not None and shutil.which("xvfb-run") is not None
    try:
        import torch

        have_cuda = torch.cuda.is_available()
    except ImportError:
        have_cuda = False
    for item in items:
        if "blender34" in item.keywords and not have_blender:
            item.add_marker(pytest.mark.skip(reason="Debian's blender 3.4 / xvfb-run not installed"))
        if "gpu" in item.keywords and not have_cuda:
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))

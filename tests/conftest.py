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

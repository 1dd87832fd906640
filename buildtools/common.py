"""What every build step shares: repository paths, the supported Blender platforms and Pythons,
manifest rules, the build error, logging, a clean child environment, and the project's facts
(version from pyproject.toml, protocol version from protocol/*.py, git commit)."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import tomllib
from pathlib import Path

#: the repository root (this package sits in it)
ROOT = Path(__file__).resolve().parent.parent
ADDON_SRC = ROOT / "blender_addon"
PROTOCOL_SRC = ROOT / "protocol"
BACKEND_SRC = ROOT / "backend"
PYPROJECT = ROOT / "pyproject.toml"

ADDON_MODULE = "conjure"  # legacy folder name == extension id
PYZMQ_VERSION = "26.4.0"  # the last pyzmq with per-version cp313 wheels: Blender reads abi3 wheels as "3.x"
#: Blender 4.2-5.0 ship CPython 3.11, 5.1+ ship 3.13.
EXTENSION_PYTHONS = ("3.11", "3.13")
#: Official 3.4-4.1 builds ship 3.10; Debian's 3.4 runs the system 3.11; a legacy install in 5.1+ runs 3.13.
LEGACY_PYTHONS = ("3.10", "3.11", "3.13")
#: Blender platform -> the pip ``--platform`` tags to ask for (pip also accepts older glibc/macOS tags
#: and universal2). Blender's official Linux builds need glibc 2.28, macOS builds need 11.
PLATFORMS: dict[str, tuple[str, ...]] = {
    "linux-x64": ("manylinux_2_28_x86_64",),
    "linux-arm64": ("manylinux_2_28_aarch64",),
    "macos-arm64": ("macosx_11_0_arm64",),
    "macos-x64": ("macosx_11_0_x86_64",),
    "windows-x64": ("win_amd64",),
    "windows-arm64": ("win_arm64",),
}
#: A build fails without these; the others are included when pyzmq publishes a fitting wheel.
REQUIRED_PLATFORMS = ("linux-x64", "macos-arm64", "macos-x64", "windows-x64")
#: Blender platform -> the wheel platform tag of the running interpreter there (for the fit check).
PLATFORM_INTERPRETER_TAG = {
    "linux-x64": "linux_x86_64",
    "linux-arm64": "linux_aarch64",
    "macos-arm64": "macosx_11_0_arm64",
    "macos-x64": "macosx_11_0_x86_64",
    "windows-x64": "win_amd64",
    "windows-arm64": "win_arm64",
}

#: Never packaged from the add-on folder (the manifest template is regenerated; ``protocol`` and
#: ``wheels``/``backend_src`` are added by the build).
ADDON_SKIP_NAMES = {"__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache", "tests", "wheels",
                    "backend_src", "protocol", "blender_manifest.toml", "_build_info.py", ".DS_Store"}
TREE_SKIP_NAMES = {"__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache", ".DS_Store", ".hypothesis"}
SKIP_SUFFIXES = (".pyc", ".pyo", ".orig", ".rej", ".swp", "~")
#: Absolute imports the add-on part of a zip must not make (it imports ``protocol`` relatively).
REPO_PACKAGES = ("protocol", "backend", "blender_addon")

MANIFEST_REQUIRED = ("schema_version", "id", "version", "name", "tagline", "maintainer", "type",
                     "blender_version_min", "license")
MANIFEST_DEFAULTS = {
    "schema_version": "1.0.0",
    "id": ADDON_MODULE,
    "name": "Conjure",
    "tagline": "Text to editable, textured 3D meshes with live previews",
    "maintainer": "Conjure contributors",
    "type": "add-on",
    "blender_version_min": "4.2.0",
    "license": ["SPDX:MIT"],
    "permissions": {"network": "Talk to the Conjure backend over ZeroMQ",
                    "files": "Read the backend connection file and start the local backend"},
}
SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")


class BuildError(RuntimeError):
    """A build or check step failed; the message says which and why."""


def log(msg: str) -> None:
    print(msg, flush=True)


def clean_env(**extra: str) -> dict[str, str]:
    """``os.environ`` without the variables that would let the repository (or another Python) leak
    into a child process: builds and install checks must see only what they ship."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP",
                                                           "PYTHONUSERBASE", "PIP_TARGET", "PIP_PREFIX")}
    env.update(extra)
    return env


def project_version() -> str:
    """``[project].version`` from pyproject.toml (must be semantic: X.Y.Z)."""
    with open(PYPROJECT, "rb") as f:
        version = tomllib.load(f)["project"]["version"]
    if not SEMVER.match(version):
        raise BuildError(f"pyproject.toml version {version!r} is not X.Y.Z, which Blender's manifest requires")
    return version


def protocol_version() -> tuple[str, int]:
    """(PROTOCOL_VERSION, PROTOCOL_MAJOR) read from protocol/*.py without importing it."""
    found: dict[str, object] = {}
    for path in sorted(PROTOCOL_SRC.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in tree.body:
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
                for target in node.targets:
                    if isinstance(target, ast.Name) and target.id in ("PROTOCOL_VERSION", "PROTOCOL_MAJOR"):
                        found.setdefault(target.id, node.value.value)
    version = str(found.get("PROTOCOL_VERSION", ""))
    if not version:
        raise BuildError("protocol/: no PROTOCOL_VERSION = \"X.Y\" found")
    major = found.get("PROTOCOL_MAJOR")
    if not isinstance(major, int):
        major = int(version.split(".")[0])
    return version, major


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""

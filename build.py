#!/usr/bin/env python3
"""Build Conjure's installable Blender zips and the backend wheel, and prove they install.

    python build.py                          # dist/: extension zip (all platforms), legacy zip, backend wheel
    python build.py --platform linux-x64     # one extension zip (and legacy zip) per named platform
    python build.py --split-platforms        # one zip per supported platform
    python build.py --check                  # build, then validate and install into bpy 5.0.1 + Blender 3.4
    python build.py --check --no-build       # validate what is already in dist/

Outputs (version from pyproject.toml, the one source of truth):

- ``conjure-<version>.zip`` (or ``conjure-<version>-<platform>.zip``): a Blender 4.2+ extension.
  ``blender_manifest.toml`` is generated from ``blender_addon/blender_manifest.toml`` with the
  version, ``platforms`` and ``wheels`` filled in; the add-on; ``protocol/`` vendored (real files;
  in the repository it is a symlink); ``_build_info.py`` (VERSION, PROTOCOL_VERSION, PROTOCOL_MAJOR,
  ...); ``wheels/``: pyzmq for CPython 3.11 (Blender 4.2-5.0) and 3.13 (5.1+); ``backend_src/``:
  backend/, protocol/, pyproject.toml, README.md, so the add-on can run ``python -m backend serve``
  with the interpreter the user names (or ``pip install`` it there).
- ``conjure-<version>-legacy.zip``: the same add-on as ``conjure/...`` for Blender 3.4-4.1
  (``bl_info`` version rewritten from pyproject), with pyzmq for CPython 3.10, 3.11 and 3.13;
  ``_deps.py`` unpacks the fitting wheel when the host Python has no pyzmq.
- ``conjure-<version>-py3-none-any.whl``: the backend (``pip install dist/conjure-*.whl[gpu]``
  gives the ``conjure-backend`` command).

pyzmq wheels come from ``pip download --only-binary=:all: --no-deps`` into a cache
(``$CONJURE_BUILD_CACHE`` or ``~/.cache/conjure-build``); a warm build needs no network.
Standard library only (Python 3.11+).
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent
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


# ---------------------------------------------------------------------------------------------
# Project facts


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


# ---------------------------------------------------------------------------------------------
# pyzmq wheels


def cache_dir() -> Path:
    return Path(os.environ.get("CONJURE_BUILD_CACHE") or Path.home() / ".cache" / "conjure-build")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class WheelSet:
    """pyzmq wheels by (python "3.11", Blender platform); ``None`` = pyzmq publishes none."""

    files: dict[tuple[str, str], Path | None] = field(default_factory=dict)
    downloaded: int = 0

    def get(self, python: str, platform: str) -> Path | None:
        return self.files.get((python, platform))

    def platforms_covering(self, pythons, platforms) -> list[str]:
        return [p for p in platforms if all(self.get(py, p) for py in pythons)]


def _pip_download(python: str, platform: str, dest: Path) -> Path | None:
    """Download the one pyzmq wheel for (python, platform) into ``dest``; None if none exists."""
    with tempfile.TemporaryDirectory(prefix="conjure-pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--only-binary=:all:",
               "--no-deps", "--implementation", "cp", "--python-version", python, "-d", tmp]
        for tag in PLATFORMS[platform]:
            cmd += ["--platform", tag]
        cmd.append(f"pyzmq=={PYZMQ_VERSION}")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=clean_env())
        if proc.returncode != 0:
            if "No matching distribution" in proc.stderr or "Could not find a version" in proc.stderr:
                return None
            raise BuildError(f"pip download failed for pyzmq {PYZMQ_VERSION} python {python} {platform}:\n"
                             + proc.stderr[-2000:])
        got = [p for p in Path(tmp).iterdir() if p.suffix == ".whl"]
        if len(got) != 1:
            raise BuildError(f"pip download for python {python} {platform} gave {[p.name for p in got]}")
        dest.mkdir(parents=True, exist_ok=True)
        target = dest / got[0].name
        if not target.exists():
            shutil.copy2(got[0], target.with_suffix(".part"))
            os.replace(target.with_suffix(".part"), target)
        return target


def fetch_wheels(pythons, platforms, *, offline: bool = False, jobs: int = 6) -> WheelSet:
    """Find or download pyzmq wheels for every (python, platform).

    The cache keeps the wheels and ``index.json`` ({"3.11|linux-x64": [file, sha256] or null});
    a cached wheel is re-hashed before use, so a damaged file is fetched again.
    """
    folder = cache_dir() / f"pyzmq-{PYZMQ_VERSION}"
    index_path = folder / "index.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    result = WheelSet()
    missing = []
    for py in pythons:
        for plat in platforms:
            key = f"{py}|{plat}"
            if key in index:
                entry = index[key]
                if entry is None:
                    result.files[(py, plat)] = None
                    continue
                path = folder / entry[0]
                if path.is_file() and _sha256(path) == entry[1]:
                    result.files[(py, plat)] = path
                    continue
            missing.append((py, plat))
    if missing and offline:
        raise BuildError(f"--offline, but the wheel cache {folder} lacks {missing}")
    if missing:
        log(f"fetching {len(missing)} pyzmq {PYZMQ_VERSION} wheel(s) into {folder}")
        with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = {pool.submit(_pip_download, py, plat, folder): (py, plat) for py, plat in missing}
            for fut in concurrent.futures.as_completed(futures):
                py, plat = futures[fut]
                path = fut.result()
                result.files[(py, plat)] = path
                index[f"{py}|{plat}"] = [path.name, _sha256(path)] if path else None
                result.downloaded += 1
        folder.mkdir(parents=True, exist_ok=True)
        tmp = index_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(index, indent=1, sort_keys=True))
        os.replace(tmp, index_path)
    for plat in REQUIRED_PLATFORMS:
        if plat in platforms:
            lacking = [py for py in pythons if result.get(py, plat) is None]
            if lacking:
                raise BuildError(f"pyzmq {PYZMQ_VERSION} has no wheel for {plat} on Python {lacking}")
    return result


# ---------------------------------------------------------------------------------------------
# Zip assembly


def _skip(path: Path, skip_names) -> bool:
    return path.name in skip_names or path.name.endswith(SKIP_SUFFIXES) or path.name.startswith(".#")


def walk_files(top: Path, skip_names=TREE_SKIP_NAMES, top_skip=()):
    """(absolute path, path relative to ``top``) of every regular file under ``top``, sorted;
    symlinks are not followed (the add-on's ``protocol`` link is vendored separately)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(top):
        d = Path(dirpath)
        keep = []
        for name in sorted(dirnames):
            p = d / name
            if _skip(p, skip_names) or p.is_symlink() or (d == top and name in top_skip):
                continue
            keep.append(name)
        dirnames[:] = keep
        for name in sorted(filenames):
            p = d / name
            if _skip(p, skip_names) or p.is_symlink() or (d == top and name in top_skip):
                continue
            out.append((p, p.relative_to(top).as_posix()))
    return out


def drop_git_ignored(files: list[tuple[Path, str]]) -> list[tuple[Path, str]]:
    """Leave out files git ignores (caches, generated meshes, local data); a no-op outside a checkout."""
    if not files or not (ROOT / ".git").exists():
        return files
    try:
        proc = subprocess.run(["git", "check-ignore", "--stdin", "-z"], cwd=ROOT,
                              input="\0".join(str(p.relative_to(ROOT)) for p, _ in files) + "\0",
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError, ValueError):
        return files
    if proc.returncode not in (0, 1):  # 1 = nothing ignored
        return files
    ignored = {ROOT / x for x in proc.stdout.split("\0") if x}
    return [(p, rel) for p, rel in files if p not in ignored]


def addon_files() -> list[tuple[Path, str]]:
    """The add-on's own files (zip-relative names), without the build-made parts."""
    if not (ADDON_SRC / "__init__.py").is_file():
        raise BuildError(f"{ADDON_SRC}/__init__.py is missing: nothing to package")
    return drop_git_ignored(walk_files(ADDON_SRC, TREE_SKIP_NAMES, top_skip=ADDON_SKIP_NAMES))


def protocol_files() -> list[tuple[Path, str]]:
    return drop_git_ignored(walk_files(PROTOCOL_SRC))


def backend_source_files() -> list[tuple[Path, str]]:
    """backend/, protocol/, pyproject.toml, README.md (and LICENSE if present) as ``backend_src/...``."""
    files = [(p, "backend/" + rel) for p, rel in drop_git_ignored(walk_files(BACKEND_SRC))]
    files += [(p, "protocol/" + rel) for p, rel in protocol_files()]
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).is_file():
            files.append((ROOT / name, name))
    return files


def manifest_template() -> dict:
    path = ADDON_SRC / "blender_manifest.toml"
    data = dict(MANIFEST_DEFAULTS)
    if path.is_file():
        with open(path, "rb") as f:
            data.update(tomllib.load(f))
    return data


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        if len(value) > 3:
            return "[\n" + "".join(f"  {_toml_value(v)},\n" for v in value) + "]"
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise BuildError(f"manifest value of type {type(value).__name__} cannot be written")


def render_manifest(data: dict) -> str:
    """A ``blender_manifest.toml`` text: plain keys first, then tables (one level)."""
    lines = ["# Generated by build.py from blender_addon/blender_manifest.toml and pyproject.toml.", ""]
    for key, value in data.items():
        if not isinstance(value, dict):
            lines.append(f"{key} = {_toml_value(value)}")
    for key, value in data.items():
        if isinstance(value, dict):
            lines += ["", f"[{key}]"]
            for k, v in value.items():
                if isinstance(v, dict):
                    raise BuildError(f"manifest table [{key}.{k}] nests too deep for build.py")
                lines.append(f"{json.dumps(k) if not re.match(r'^[A-Za-z0-9_-]+$', k) else k} = {_toml_value(v)}")
    return "\n".join(lines) + "\n"


def build_info_source(*, version, proto_version, proto_major, kind, platforms, wheels, commit) -> str:
    return (
        '"""Made by build.py; not in the repository. Facts about this build of the add-on."""\n\n'
        f"VERSION = {version!r}\n"
        f"VERSION_TUPLE = {tuple(int(x) for x in version.split('-')[0].split('+')[0].split('.'))!r}\n"
        f"PROTOCOL_VERSION = {proto_version!r}\n"
        f"PROTOCOL_MAJOR = {proto_major!r}\n"
        f"PYZMQ_VERSION = {PYZMQ_VERSION!r}\n"
        f"BUILD_KIND = {kind!r}  # 'extension' (Blender 4.2+) or 'legacy' (3.4-4.1)\n"
        f"PLATFORMS = {tuple(platforms)!r}\n"
        f"WHEELS = {tuple(wheels)!r}\n"
        f"BACKEND_SOURCE_DIR = 'backend_src'  # backend/, protocol/, pyproject.toml beside this file\n"
        f"GIT_COMMIT = {commit!r}\n"
    )


_BL_INFO_VERSION = re.compile(r'("version"\s*:\s*)\([^)]*\)')


def legacy_init_source(text: str, version: str) -> str:
    """``__init__.py`` with ``bl_info["version"]`` set from pyproject (Blender reads it with ast)."""
    parts = tuple(int(x) for x in version.split("-")[0].split("+")[0].split("."))
    new, n = _BL_INFO_VERSION.subn(lambda m: m.group(1) + repr(parts), text, count=1)
    if n != 1:
        raise BuildError('blender_addon/__init__.py: no bl_info "version": (x, y, z) to stamp')
    return new


class ZipWriter:
    """Adds files under a prefix; wheels are stored (already compressed), the rest deflated."""

    def __init__(self, path: Path, prefix: str = ""):
        self.path = path
        self.prefix = prefix
        self.names: set[str] = set()
        self.zf = zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6)

    def add_file(self, src: Path, name: str) -> None:
        self.add_bytes(src.read_bytes(), name, mtime=src.stat().st_mtime)

    def add_bytes(self, data: bytes, name: str, mtime: float | None = None) -> None:
        arc = self.prefix + name
        if arc in self.names:
            raise BuildError(f"{self.path.name}: {arc} added twice")
        self.names.add(arc)
        t = time.localtime(mtime if mtime is not None else time.time())
        info = zipfile.ZipInfo(arc, date_time=tuple(max(v, lo) for v, lo in zip(t[:6], (1980, 1, 1, 0, 0, 0))))
        info.external_attr = 0o644 << 16
        info.compress_type = zipfile.ZIP_STORED if arc.endswith(".whl") else zipfile.ZIP_DEFLATED
        self.zf.writestr(info, data)

    def close(self) -> None:
        self.zf.close()


@dataclass
class Artifact:
    kind: str  # "extension" | "legacy" | "backend-wheel"
    path: Path
    platforms: tuple[str, ...] = ()
    wheels: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def _wheels_for(ws: WheelSet, pythons, platforms) -> list[Path]:
    seen: dict[str, Path] = {}
    for plat in platforms:
        for py in pythons:
            p = ws.get(py, plat)
            if p is not None:
                seen.setdefault(p.name, p)
    return [seen[k] for k in sorted(seen)]


def _add_addon(zw: ZipWriter, *, version: str, legacy: bool, info_src: str) -> None:
    for src, rel in addon_files():
        if legacy and rel == "__init__.py":
            zw.add_bytes(legacy_init_source(src.read_text(encoding="utf-8"), version).encode(), rel,
                         mtime=src.stat().st_mtime)
        else:
            zw.add_file(src, rel)
    for src, rel in protocol_files():
        zw.add_file(src, "protocol/" + rel)
    zw.add_bytes(info_src.encode(), "_build_info.py")
    for src, rel in backend_source_files():
        zw.add_file(src, "backend_src/" + rel)


def build_extension_zip(dist: Path, ws: WheelSet, platforms: list[str], *, split: bool, version: str,
                        proto: tuple[str, int], commit: str) -> Artifact:
    wheels = _wheels_for(ws, EXTENSION_PYTHONS, platforms)
    manifest = {}
    for key, value in manifest_template().items():  # keep the template's order, version after id
        manifest[key] = value
        if key == "id":
            manifest["version"] = version
    manifest["version"] = version
    manifest["platforms"] = list(platforms)
    manifest["wheels"] = [f"./wheels/{w.name}" for w in wheels]
    ext_id = manifest.get("id", ADDON_MODULE)
    name = f"{ext_id}-{version}-{platforms[0].replace('-', '_')}.zip" if split else f"{ext_id}-{version}.zip"
    path = dist / name
    zw = ZipWriter(path)
    try:
        zw.add_bytes(render_manifest(manifest).encode(), "blender_manifest.toml")
        info = build_info_source(version=version, proto_version=proto[0], proto_major=proto[1],
                                 kind="extension", platforms=platforms, wheels=[w.name for w in wheels],
                                 commit=commit)
        _add_addon(zw, version=version, legacy=False, info_src=info)
        for w in wheels:
            zw.add_file(w, "wheels/" + w.name)
    finally:
        zw.close()
    return Artifact("extension", path, tuple(platforms), tuple(w.name for w in wheels))


def build_legacy_zip(dist: Path, ws: WheelSet, platforms: list[str], *, split: bool, version: str,
                     proto: tuple[str, int], commit: str) -> Artifact:
    wheels = _wheels_for(ws, LEGACY_PYTHONS, platforms)
    suffix = f"-legacy-{platforms[0].replace('-', '_')}" if split else "-legacy"
    path = dist / f"{ADDON_MODULE}-{version}{suffix}.zip"
    zw = ZipWriter(path, prefix=ADDON_MODULE + "/")
    try:
        info = build_info_source(version=version, proto_version=proto[0], proto_major=proto[1],
                                 kind="legacy", platforms=platforms, wheels=[w.name for w in wheels],
                                 commit=commit)
        _add_addon(zw, version=version, legacy=True, info_src=info)
        for w in wheels:
            zw.add_file(w, "wheels/" + w.name)
    finally:
        zw.close()
    return Artifact("legacy", path, tuple(platforms), tuple(w.name for w in wheels))


def build_backend_wheel(dist: Path) -> Artifact:
    """``pip wheel --no-deps`` on a clean copy of the backend sources (the tree is not touched)."""
    with tempfile.TemporaryDirectory(prefix="conjure-wheel-") as tmp:
        src = Path(tmp) / "src"
        for path, rel in backend_source_files():
            out = src / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, out)
        out_dir = Path(tmp) / "out"
        base = [sys.executable, "-m", "pip", "wheel", "--disable-pip-version-check", "--no-deps", "-q",
                "-w", str(out_dir), str(src)]
        proc = subprocess.run(base[:4] + ["--no-build-isolation"] + base[4:], capture_output=True, text=True,
                              timeout=600, env=clean_env(), cwd=tmp)
        if proc.returncode != 0:  # no local setuptools/wheel: let pip fetch them
            proc = subprocess.run(base, capture_output=True, text=True, timeout=600, env=clean_env(), cwd=tmp)
        if proc.returncode != 0:
            raise BuildError("pip wheel failed for the backend:\n" + (proc.stderr or proc.stdout)[-3000:])
        wheels = list(out_dir.glob("conjure-*.whl"))
        if len(wheels) != 1:
            raise BuildError(f"pip wheel made {[w.name for w in out_dir.iterdir()]}, expected one conjure wheel")
        target = dist / wheels[0].name
        shutil.copy2(wheels[0], target)
    return Artifact("backend-wheel", target)


@dataclass
class BuildResult:
    artifacts: list[Artifact]
    seconds: float
    wheels_downloaded: int

    def of_kind(self, kind: str) -> list[Artifact]:
        return [a for a in self.artifacts if a.kind == kind]


def build(dist: Path | None = None, platforms: list[str] | None = None, *, split: bool = False,
          legacy: bool = True, backend_wheel: bool = True, offline: bool = False) -> BuildResult:
    """Build everything into ``dist`` (default ``<repo>/dist``). ``platforms``: Blender platform
    names (default: all with wheels); ``split``: one zip per platform. Old conjure outputs in
    ``dist`` are removed first. Returns the artifacts made."""
    t0 = time.perf_counter()
    dist = Path(dist or ROOT / "dist")
    version = project_version()
    proto = protocol_version()
    commit = git_commit()
    wanted = list(platforms or PLATFORMS)
    unknown = [p for p in wanted if p not in PLATFORMS]
    if unknown:
        raise BuildError(f"unknown platform(s) {unknown}; known: {', '.join(PLATFORMS)}")
    pythons = sorted(set(EXTENSION_PYTHONS) | (set(LEGACY_PYTHONS) if legacy else set()))
    ws = fetch_wheels(pythons, wanted, offline=offline)
    ext_platforms = ws.platforms_covering(EXTENSION_PYTHONS, wanted)
    skipped = [p for p in wanted if p not in ext_platforms]
    if skipped:
        log(f"note: pyzmq {PYZMQ_VERSION} publishes no wheels for {', '.join(skipped)}; left out")
    if not ext_platforms:
        raise BuildError("no platform has pyzmq wheels for every Blender Python")

    dist.mkdir(parents=True, exist_ok=True)
    for old in list(dist.glob(f"{ADDON_MODULE}-*.zip")) + list(dist.glob("conjure-*.whl")):
        old.unlink()
    artifacts = []
    groups = [[p] for p in ext_platforms] if split else [ext_platforms]
    for group in groups:
        artifacts.append(build_extension_zip(dist, ws, group, split=split, version=version, proto=proto,
                                             commit=commit))
        if legacy:
            artifacts.append(build_legacy_zip(dist, ws, group, split=split, version=version, proto=proto,
                                              commit=commit))
    if backend_wheel:
        artifacts.append(build_backend_wheel(dist))
    return BuildResult(artifacts, time.perf_counter() - t0, ws.downloaded)


# ---------------------------------------------------------------------------------------------
# Checks


@dataclass
class Check:
    target: str
    name: str
    ok: bool | None  # None = skipped
    detail: str = ""


def _load_deps_module():
    """The add-on's ``_deps.py`` (stdlib only at import) for its wheel-fit rule."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_conjure_deps_for_build", ADDON_SRC / "_deps.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def blender_ext_cli() -> Path | None:
    """Blender's own extension command-line tool from the installed ``bpy`` (stdlib-only script)."""
    import importlib.util

    spec = importlib.util.find_spec("bpy")
    if spec is None or not spec.origin:
        return None
    base = Path(spec.origin).resolve().parent  # .../site-packages/bpy/5.0/scripts/modules/bpy or .../bpy
    for cand in [base, *base.parents][:6]:
        hits = sorted(cand.glob("*/scripts/addons_core/bl_pkg/cli/blender_ext.py")) + sorted(
            cand.glob("scripts/addons_core/bl_pkg/cli/blender_ext.py"))
        if hits:
            return hits[0]
    return None


def scan_absolute_imports(source: str, filename: str) -> list[str]:
    """Absolute imports of repository packages (``import protocol``, ``from backend.x import y``...).

    An import inside an ``except ImportError`` handler is a repository fallback that the vendored
    copy makes unreachable, so it is allowed. Returns "file:line: statement" strings.
    """
    tree = ast.parse(source, filename)
    allowed: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try):
            for handler in node.handlers:
                names = []
                t = handler.type
                for n in (t.elts if isinstance(t, ast.Tuple) else [t]):
                    if isinstance(n, ast.Name):
                        names.append(n.id)
                if {"ImportError", "ModuleNotFoundError"} & set(names):
                    for sub in handler.body:
                        for inner in ast.walk(sub):
                            allowed.add(id(inner))
    bad = []
    for node in ast.walk(tree):
        if id(node) in allowed:
            continue
        mods = []
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            mods = [node.module]
        for m in mods:
            if m.split(".")[0] in REPO_PACKAGES:
                bad.append(f"{filename}:{node.lineno}: {ast.unparse(node)}")
    return bad


def blender_python_versions(wheel_names) -> set[str]:
    """The ``python_versions`` Blender derives from a manifest's wheels (bl_pkg's rule: a stable-ABI
    wheel counts as plain "3", and "3" is dropped when any "3.x" is present)."""
    major_only, major_minor = set(), set()
    for name in wheel_names:
        parts = name[:-4].split("-")
        py, abi = parts[-3], parts[-2]
        if any(t.startswith("abi") and t[3:].isdigit() for t in abi.split(".")):
            major_only.update(t[3:] for t in abi.split(".") if t.startswith("abi") and t[3:].isdigit())
            continue
        for t in py.split("."):
            digits = t[2:]
            if len(digits) > 1:
                major_minor.add(f"{digits[0]}.{digits[1:]}")
            else:
                major_only.add(digits)
    major_only -= {v.split(".")[0] for v in major_minor}
    return major_only | major_minor


def check_zip_contents(art: Artifact, version: str, proto: tuple[str, int]) -> list[Check]:
    """Static checks of one add-on zip (extension or legacy)."""
    t = art.path.name
    checks: list[Check] = []
    prefix = f"{ADDON_MODULE}/" if art.kind == "legacy" else ""
    with zipfile.ZipFile(art.path) as zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        bad_names = [n for n in names if "__pycache__" in n.split("/") or n.endswith((".pyc", ".pyo"))]
        checks.append(Check(t, "no __pycache__/.pyc", not bad_names, ", ".join(bad_names[:5])))
        unsafe = [n for n in names if n.startswith("/") or ".." in n.split("/") or "\\" in n
                  or not n.startswith(prefix)]
        links = [i.filename for i in infos if (i.external_attr >> 16) & 0o170000 == 0o120000]
        checks.append(Check(t, "paths relative, under one root, no links", not unsafe and not links,
                            ", ".join((unsafe + links)[:5])))
        bad_dupes = len(names) != len(set(names))
        checks.append(Check(t, "no duplicate entries", not bad_dupes))

        def read(rel: str) -> bytes | None:
            try:
                return zf.read(prefix + rel)
            except KeyError:
                return None

        init = read("__init__.py")
        ok = init is not None
        detail = ""
        if init is not None:
            tree = ast.parse(init, "__init__.py")
            funcs = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
            ok = {"register", "unregister"} <= funcs
            detail = "" if ok else f"functions: {sorted(funcs)}"
        checks.append(Check(t, "__init__.py with register/unregister", ok, detail))

        required = ["protocol/__init__.py", "_build_info.py", "_deps.py", "backend_src/pyproject.toml",
                    "backend_src/backend/__init__.py", "backend_src/protocol/__init__.py"]
        missing = [r for r in required if read(r) is None]
        checks.append(Check(t, "vendored protocol, build info, backend sources", not missing,
                            "missing " + ", ".join(missing) if missing else ""))

        info_src = read("_build_info.py")
        if info_src is not None:
            ns: dict = {}
            exec(compile(info_src, "_build_info.py", "exec"), ns)  # our own generated constants
            ok = (ns.get("VERSION") == version and ns.get("PROTOCOL_MAJOR") == proto[1]
                  and ns.get("BUILD_KIND") == art.kind)
            checks.append(Check(t, "_build_info VERSION/PROTOCOL_MAJOR", ok,
                                f"{ns.get('VERSION')} / protocol {ns.get('PROTOCOL_MAJOR')}"))

        # Absolute imports of repo packages in the add-on part (wheels and backend sources excluded).
        offenders: list[str] = []
        n_py = 0
        for n in names:
            rel = n[len(prefix):]
            if not rel.endswith(".py") or rel.startswith(("backend_src/", "wheels/")):
                continue
            n_py += 1
            try:
                offenders += scan_absolute_imports(zf.read(n).decode("utf-8"), rel)
            except SyntaxError as e:
                offenders.append(f"{rel}: syntax error {e}")
        checks.append(Check(t, "no absolute imports of protocol/backend", not offenders,
                            "; ".join(offenders[:5]) or f"{n_py} .py files scanned"))

        wheel_files = sorted(n[len(prefix) + len("wheels/"):] for n in names
                             if n.startswith(prefix + "wheels/") and n.endswith(".whl"))
        if art.kind == "legacy":
            stamped = None
            if init is not None:
                for node in ast.parse(init).body:
                    if isinstance(node, ast.Assign) and any(getattr(x, "id", "") == "bl_info" for x in node.targets):
                        stamped = ast.literal_eval(node.value)
            want = tuple(int(x) for x in version.split("-")[0].split("+")[0].split("."))
            ok = bool(stamped) and tuple(stamped.get("version", ())) == want and tuple(
                stamped.get("blender", (9,))) <= (3, 4, 0)
            checks.append(Check(t, "bl_info version == pyproject, blender <= 3.4", ok,
                                f"{stamped.get('version') if stamped else None}, blender "
                                f"{stamped.get('blender') if stamped else None}"))
            checks += _check_wheel_coverage(t, wheel_files, LEGACY_PYTHONS, art.platforms)
        else:
            raw = zf.read("blender_manifest.toml") if "blender_manifest.toml" in names else None
            checks += check_manifest(t, raw, wheel_files, version)
            checks += _check_wheel_coverage(t, wheel_files, EXTENSION_PYTHONS, art.platforms)
    checks.append(Check(t, "size", True, f"{art.size / 1e6:.2f} MB"))
    return checks


def check_manifest(t: str, raw: bytes | None, wheel_files: list[str], version: str) -> list[Check]:
    if raw is None:
        return [Check(t, "blender_manifest.toml at the zip root", False)]
    try:
        m = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        return [Check(t, "manifest parses", False, str(e))]
    out = []
    missing = [k for k in MANIFEST_REQUIRED if not m.get(k)]
    out.append(Check(t, "manifest required keys", not missing, ", ".join(missing)))
    out.append(Check(t, "manifest version == pyproject, semver",
                     m.get("version") == version and bool(SEMVER.match(str(m.get("version")))),
                     str(m.get("version"))))
    out.append(Check(t, "manifest type add-on, id", m.get("type") == "add-on" and m.get("id") == ADDON_MODULE,
                     f"{m.get('type')} / {m.get('id')}"))
    perms = m.get("permissions") or {}
    ok = isinstance(perms, dict) and all(isinstance(perms.get(k), str) and perms.get(k) for k in ("network",
                                                                                                 "files"))
    out.append(Check(t, "permissions network + files with reasons", ok, ", ".join(sorted(perms))))
    listed = [w for w in m.get("wheels", [])]
    listed_names = sorted(w.rsplit("/", 1)[-1] for w in listed)
    missing_w = [w for w in listed if w.rsplit("/", 1)[-1] not in wheel_files or not w.startswith("./wheels/")]
    extra_w = [w for w in wheel_files if w not in listed_names]
    out.append(Check(t, "every listed wheel present (and none unlisted)", bool(listed) and not missing_w
                     and not extra_w, f"{len(listed)} wheels" + (f"; missing {missing_w}" if missing_w else "")
                     + (f"; unlisted {extra_w}" if extra_w else "")))
    pv = blender_python_versions(listed_names)
    want = set(EXTENSION_PYTHONS)
    out.append(Check(t, "Blender reads python_versions 3.11 + 3.13", want <= pv, ", ".join(sorted(pv))))
    plats = m.get("platforms") or []
    out.append(Check(t, "platforms listed", bool(plats) and all(p in PLATFORMS for p in plats), ", ".join(plats)))
    return out


def _check_wheel_coverage(t: str, wheel_files, pythons, platforms) -> list[Check]:
    """Every (platform, python) gets exactly one fitting pyzmq wheel by the add-on's own rule."""
    try:
        deps = _load_deps_module()
    except Exception as e:  # noqa: BLE001 - reported as a failed check
        return [Check(t, "pyzmq wheel for every platform x python", False, f"_deps.py: {e}")]
    gaps = []
    for plat in platforms:
        for py in pythons:
            vi = tuple(int(x) for x in py.split("."))
            fits = [w for w in wheel_files if deps.wheel_fits(w, vi, PLATFORM_INTERPRETER_TAG[plat])]
            if not fits:
                gaps.append(f"{plat}/py{py}")
    return [Check(t, "pyzmq wheel for every platform x python", not gaps,
                  ("none for " + ", ".join(gaps)) if gaps else f"{len(platforms)} platforms x {len(pythons)}")]


def check_with_blender_validator(art: Artifact) -> Check:
    cli = blender_ext_cli()
    if cli is None:
        return Check(art.path.name, "Blender's own validator", None, "bpy not installed")
    proc = subprocess.run([sys.executable, str(cli), "validate", "--valid-tags=", str(art.path)],
                          capture_output=True, text=True, timeout=120, env=clean_env())
    text = (proc.stdout + proc.stderr).strip().replace("\n", " ")
    return Check(art.path.name, "Blender's own validator (bl_pkg validate)", proc.returncode == 0, text[-300:])


def check_backend_wheel(art: Artifact, version: str) -> list[Check]:
    t = art.path.name
    out = []
    with zipfile.ZipFile(art.path) as zf:
        names = zf.namelist()
        dist_info = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = zf.read(dist_info[0]).decode() if dist_info else ""
        eps = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        ep_text = zf.read(eps[0]).decode() if eps else ""
    out.append(Check(t, "wheel version == pyproject", f"\nVersion: {version}\n" in meta, version))
    m = re.search(r"^conjure-backend\s*=\s*([\w.]+):(\w+)", ep_text, re.M)
    target = m.group(1).replace(".", "/") + ".py" if m else ""
    out.append(Check(t, "conjure-backend entry point", bool(m) and target in names,
                     f"{m.group(1)}:{m.group(2)}" + ("" if target in names else f" ({target} not in wheel)")
                     if m else "no console script"))
    out.append(Check(t, "extra [gpu] declared", "Provides-Extra: gpu" in meta))
    pkgs = {n.split("/")[0] for n in names if n.endswith("/__init__.py") and n.count("/") == 1}
    out.append(Check(t, "packages backend + protocol", {"backend", "protocol"} <= pkgs, ", ".join(sorted(pkgs))))
    out.append(Check(t, "size", True, f"{art.size / 1e6:.2f} MB"))
    return out


def check_backend_wheel_installs(art: Artifact) -> Check:
    """``pip install --no-deps --prefix`` into a temp folder and run ``conjure-backend --help``."""
    t = art.path.name
    with tempfile.TemporaryDirectory(prefix="conjure-whl-inst-") as tmp:
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                               "--disable-pip-version-check", "--prefix", tmp, str(art.path)],
                              capture_output=True, text=True, timeout=300, env=clean_env(), cwd=tmp)
        if proc.returncode != 0:
            return Check(t, "installs; conjure-backend --help runs", False, proc.stderr[-300:])
        script = Path(tmp) / "bin" / "conjure-backend"
        if not script.exists():
            return Check(t, "installs; conjure-backend --help runs", False, "no bin/conjure-backend script")
        site = next(Path(tmp).glob("lib/python*/site-packages"))
        env = clean_env(PYTHONPATH=str(site), PYTHONNOUSERSITE="1")
        run = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                             timeout=120, env=env, cwd=tmp)
        first = (run.stdout or run.stderr).strip().splitlines()[:1]
        return Check(t, "installs; conjure-backend --help runs", run.returncode == 0,
                     first[0][:80] if first else f"exit {run.returncode}: {run.stderr[-200:]}")


# The tail both install scripts share: with the add-on enabled as `mod_name` (and the user folder in
# `user`), record its panels, operators, build stamp and where zmq came from; disable it; print
# one JSON line after RESULT:.
_PROBE_SCRIPT = r'''
import importlib
mod = sys.modules.get(mod_name)
res["module_file"] = getattr(mod, "__file__", None)
res["panels"] = sorted(n for n in dir(bpy.types) if n.startswith(("CONJURE_PT", "VIEW3D_PT_conjure")))
res["operators"] = sorted(dir(bpy.ops.conjure))
try:
    res["build_version"] = importlib.import_module(mod_name + "._build_info").VERSION
except Exception as e:
    res["build_version"] = repr(e)
try:
    deps = importlib.import_module(mod_name + "._deps")
    zmq = deps.ensure_zmq()
    res["zmq_file"] = zmq.__file__
    res["zmq_version"] = zmq.__version__
    res["zmq_source"] = deps.ZMQ_SOURCE
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.PAIR); port = s.bind_to_random_port("tcp://127.0.0.1"); s.close(0)
    res["zmq_socket"] = port > 0
except Exception as e:
    res["zmq_error"] = repr(e)
res["zmq_under_user"] = bool(res.get("zmq_file")) and os.path.realpath(res["zmq_file"]).startswith(
    os.path.realpath(user) + os.sep)
if res["zmq_under_user"]:
    res["zmq_rel"] = os.path.relpath(os.path.dirname(os.path.realpath(res["zmq_file"])), os.path.realpath(user))
bpy.ops.preferences.addon_disable(module=mod_name)
res["panels_after_disable"] = sorted(n for n in dir(bpy.types) if n.startswith(("CONJURE_PT", "VIEW3D_PT_conjure")))
print("RESULT:" + json.dumps(res))
sys.stdout.flush()
'''

# Runs in a fresh interpreter with bpy 5.0.1; prints one JSON line after RESULT:.
_BPY_SCRIPT = r'''
import json, os, sys
zip_path, ext_id = sys.argv[1], sys.argv[2]
user = os.environ["BLENDER_USER_RESOURCES"]
res = {}
# This interpreter's own site-packages may hold a pyzmq (bpy is pip-installed beside it); Blender's
# Python has none. Hide the host copy so `import zmq` must come from the wheels the extension
# system installed under BLENDER_USER_RESOURCES.
import importlib, importlib.machinery, site
_host = {os.path.realpath(p) for p in site.getsitepackages() + [site.getusersitepackages()]}
class _HideHostZmq:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != "zmq":
            return None
        spec = importlib.machinery.PathFinder.find_spec(
            name, [p for p in sys.path if os.path.realpath(p) not in _host])
        if spec is None:
            raise ModuleNotFoundError("No module named 'zmq' outside the host site-packages", name=name)
        return spec
sys.meta_path.insert(0, _HideHostZmq)
import bpy, addon_utils
r = bpy.ops.extensions.package_install_files(filepath=zip_path, repo="user_default", enable_on_install=True)
res["install"] = sorted(r)
mod_name = "bl_ext.user_default." + ext_id
res["enabled"] = mod_name in bpy.context.preferences.addons
''' + _PROBE_SCRIPT + r'''os._exit(0)  # skip bpy's atexit (quicker, and no stray output)
'''

# Runs inside `blender -b`; argv after "--": zip path, module name.
_LEGACY_SCRIPT = r'''
import json, os, sys
argv = sys.argv[sys.argv.index("--") + 1:]
zip_path, module = argv[0], argv[1]
user = os.environ["BLENDER_USER_SCRIPTS"]
res = {"blender": ".".join(map(str, __import__("bpy").app.version)), "python": sys.version.split()[0]}
import bpy, addon_utils
try:
    r = bpy.ops.preferences.addon_install(filepath=zip_path, overwrite=True)
    res["install"] = sorted(r)
    r = bpy.ops.preferences.addon_enable(module=module)
    res["enable"] = sorted(r)
except Exception as e:
    res["error"] = repr(e)
res["enabled"] = module in bpy.context.preferences.addons
mod_name = module
''' + _PROBE_SCRIPT


def _parse_result(proc: subprocess.CompletedProcess) -> dict | None:
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT:"):
            return json.loads(line[len("RESULT:"):])
    return None


def _install_checks(t: str, res: dict | None, proc, seconds: float, want_version: str) -> list[Check]:
    if res is None:
        tail = (proc.stdout + proc.stderr)[-800:].replace("\n", " | ")
        return [Check(t, "install + enable", False, f"exit {proc.returncode}: {tail}")]
    out = [
        Check(t, "install + enable", bool(res.get("enabled")) and not res.get("error"),
              f"{seconds:.1f} s" + (f"; {res.get('error')}" if res.get("error") else "")),
        Check(t, "panel registered", bool(res.get("panels")), ", ".join(res.get("panels") or [])),
        Check(t, "operators registered", {"generate", "cancel"} <= set(res.get("operators") or []),
              f"{len(res.get('operators') or [])} in bpy.ops.conjure"),
        Check(t, "_build_info.VERSION", res.get("build_version") == want_version, str(res.get("build_version"))),
        Check(t, "zmq from the bundled wheel", bool(res.get("zmq_under_user"))
              and res.get("zmq_version") == PYZMQ_VERSION and bool(res.get("zmq_socket")),
              f"pyzmq {res.get('zmq_version')} from <user>/{res.get('zmq_rel')}" if res.get("zmq_rel") else
              f"pyzmq {res.get('zmq_version')} from {res.get('zmq_file')} (NOT under the user folder) "
              f"{res.get('zmq_error', '')}".strip()),
        Check(t, "disable unregisters the panel", not res.get("panels_after_disable"),
              ", ".join(res.get("panels_after_disable") or [])),
    ]
    return out


def check_install_bpy(art: Artifact, want_version: str) -> list[Check]:
    t = f"bpy 5.0.1 ← {art.path.name}"
    import importlib.util

    if importlib.util.find_spec("bpy") is None:
        return [Check(t, "install into bpy", None, "bpy not installed (pip install bpy==5.0.1)")]
    with tempfile.TemporaryDirectory(prefix="conjure-bpy-user-") as user:
        script = Path(user) / "check_install.py"
        script.write_text(_BPY_SCRIPT)
        env = clean_env(BLENDER_USER_RESOURCES=str(Path(user) / "resources"), PYTHONNOUSERSITE="1")
        env.pop("CONJURE_BUNDLED_ZMQ", None)  # the extension path must load Blender's own wheel install
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(script), str(art.path), ADDON_MODULE], capture_output=True,
                              text=True, timeout=300, env=env, cwd=user)
        res = _parse_result(proc)
        checks = _install_checks(t, res, proc, time.perf_counter() - t0, want_version)
    return checks


def check_install_legacy(art: Artifact, want_version: str, blender: str | None = None) -> list[Check]:
    blender = blender or os.environ.get("CONJURE_BLENDER") or shutil.which("blender")
    t = f"blender 3.4 ← {art.path.name}"
    if not blender:
        return [Check(t, "install into Blender 3.4", None, "no `blender` on PATH (apt-get install blender)")]
    with tempfile.TemporaryDirectory(prefix="conjure-b34-user-") as user:
        script = Path(user) / "check_legacy.py"
        script.write_text(_LEGACY_SCRIPT)
        env = clean_env(BLENDER_USER_SCRIPTS=str(Path(user) / "scripts"),
                   BLENDER_USER_CONFIG=str(Path(user) / "config"), BLENDER_USER_DATAFILES=str(Path(user) / "data"),
                   CONJURE_BUNDLED_ZMQ="1")  # the host may have python3-zmq; prove the bundled copy loads
        env.pop("CONJURE_DEPS_DIR", None)
        env.pop("PYTHONNOUSERSITE", None)
        # Debian's Blender embeds the system Python and finds its prefix through `python3` on PATH; a
        # pyenv/venv python3 first on PATH would hand it a foreign stdlib with no dist-packages.
        env["PATH"] = os.pathsep.join([str(Path(blender).resolve().parent), "/usr/bin", env.get("PATH", "")])
        t0 = time.perf_counter()
        proc = subprocess.run([blender, "-b", "--factory-startup", "-noaudio", "--python-exit-code", "1",
                               "--python", str(script), "--", str(art.path), ADDON_MODULE],
                              capture_output=True, text=True, timeout=300, env=env, cwd=user)
        res = _parse_result(proc)
        checks = _install_checks(t, res, proc, time.perf_counter() - t0, want_version)
        if res is not None:
            checks[0].detail = f"Blender {res.get('blender')}, Python {res.get('python')}; " + checks[0].detail
    return checks


def run_checks(result: BuildResult, *, blender: str | None = None, install: bool = True) -> list[Check]:
    version = project_version()
    proto = protocol_version()
    checks: list[Check] = []
    zips = result.of_kind("extension") + result.of_kind("legacy")
    if not zips:
        checks.append(Check("dist", "zips present", False, "no conjure zips; run build.py first"))
    for art in zips:
        checks += check_zip_contents(art, version, proto)
        if art.kind == "extension":
            checks.append(check_with_blender_validator(art))
    for art in result.of_kind("backend-wheel"):
        checks += check_backend_wheel(art, version)
    if install:
        here = "linux-x64"  # the check machines; pick the zip that serves this one
        ext = [a for a in result.of_kind("extension") if here in a.platforms]
        leg = [a for a in result.of_kind("legacy") if here in a.platforms]
        with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
            f_whl = [pool.submit(check_backend_wheel_installs, a) for a in result.of_kind("backend-wheel")]
            f_bpy = pool.submit(check_install_bpy, ext[0], version) if ext else None
            f_leg = pool.submit(check_install_legacy, leg[0], version, blender) if leg else None
            checks += [f.result() for f in f_whl]
            if f_bpy:
                checks += f_bpy.result()
            else:
                checks.append(Check("bpy 5.0.1", "install into bpy", None, "no extension zip for linux-x64 built"))
            if f_leg:
                checks += f_leg.result()
            else:
                checks.append(Check("blender 3.4", "install into Blender 3.4", None,
                                    "no legacy zip for linux-x64 built"))
    return checks


def artifacts_in(dist: Path) -> BuildResult:
    """Artifacts already in ``dist`` (for ``--check --no-build``): platforms read back from each zip."""
    arts = []
    for path in sorted(dist.glob(f"{ADDON_MODULE}-*.zip")):
        with zipfile.ZipFile(path) as zf:
            legacy = "-legacy" in path.name
            name = f"{ADDON_MODULE}/_build_info.py" if legacy else "_build_info.py"
            ns: dict = {}
            try:
                exec(compile(zf.read(name), name, "exec"), ns)
            except KeyError:
                pass
        arts.append(Artifact("legacy" if legacy else "extension", path, tuple(ns.get("PLATFORMS", ())),
                             tuple(ns.get("WHEELS", ()))))
    arts += [Artifact("backend-wheel", p) for p in sorted(dist.glob("conjure-*.whl"))]
    return BuildResult(arts, 0.0, 0)


def print_table(rows: list[Check]) -> None:
    mark = {True: "PASS", False: "FAIL", None: "skip"}
    w1 = max(len(r.target) for r in rows)
    w2 = max(len(r.name) for r in rows)
    log("")
    log(f"{'result':6}  {'target':{w1}}  {'check':{w2}}  detail")
    log(f"{'-' * 6}  {'-' * w1}  {'-' * w2}  {'-' * 30}")
    for r in rows:
        log(f"{mark[r.ok]:6}  {r.target:{w1}}  {r.name:{w2}}  {r.detail}")
    failed = sum(r.ok is False for r in rows)
    skipped = sum(r.ok is None for r in rows)
    log(f"\n{len(rows) - failed - skipped} passed, {failed} failed, {skipped} skipped")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dist", type=Path, default=ROOT / "dist", help="output folder (default: dist/)")
    ap.add_argument("--platform", action="append", choices=sorted(PLATFORMS), default=None,
                    help="build one zip for this Blender platform (repeatable)")
    ap.add_argument("--split-platforms", action="store_true", help="one zip per supported platform")
    ap.add_argument("--no-legacy", action="store_true", help="skip the Blender 3.4-4.1 legacy zip")
    ap.add_argument("--no-backend-wheel", action="store_true", help="skip the backend wheel")
    ap.add_argument("--offline", action="store_true", help="fail instead of downloading missing wheels")
    ap.add_argument("--check", action="store_true", help="validate the outputs and install them into Blender")
    ap.add_argument("--no-build", action="store_true", help="with --check: check what is in --dist")
    ap.add_argument("--no-install", action="store_true", help="with --check: static checks only")
    ap.add_argument("--blender", default=None, help="Blender 3.4 executable (default: `blender` on PATH)")
    args = ap.parse_args(argv)

    try:
        if args.no_build:
            result = artifacts_in(args.dist)
        else:
            split = bool(args.platform) or args.split_platforms
            result = build(args.dist, args.platform, split=split, legacy=not args.no_legacy,
                           backend_wheel=not args.no_backend_wheel, offline=args.offline)
            log(f"built in {result.seconds:.1f} s ({result.wheels_downloaded} wheel(s) downloaded):")
            for a in result.artifacts:
                plats = f"  [{', '.join(a.platforms)}]" if a.platforms else ""
                log(f"  {a.path.relative_to(args.dist.parent) if args.dist.parent in a.path.parents else a.path}"
                    f"  {a.size / 1e6:6.2f} MB{plats}")
        if not args.check:
            return 0
        rows = run_checks(result, blender=args.blender, install=not args.no_install)
        print_table(rows)
        return 1 if any(r.ok is False for r in rows) else 0
    except BuildError as e:
        log(f"build.py: error: {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())

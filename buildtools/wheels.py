"""pyzmq wheels for every Blender Python and platform: a hash-checked cache filled by
``pip download --only-binary=:all: --no-deps`` (a warm cache needs no network)."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .common import PLATFORMS, PYZMQ_VERSION, REQUIRED_PLATFORMS, BuildError, clean_env, log


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

    def platforms_covering(self, pythons: Iterable[str], platforms: Iterable[str]) -> list[str]:
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


def fetch_wheels(pythons: Sequence[str], platforms: Sequence[str], *, offline: bool = False, jobs: int = 6) -> WheelSet:
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

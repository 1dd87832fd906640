"""Conjure's backend: the process that owns the GPU and turns prompts into textured meshes."""

from __future__ import annotations


def _read_version() -> str:
    """The package version from one place: the installed metadata, else the repo's pyproject.toml."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("conjure")
    except PackageNotFoundError:
        import tomllib
        from pathlib import Path

        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        try:
            return tomllib.loads(pyproject.read_text())["project"]["version"]
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "0+unknown"


__version__ = _read_version()

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
Standard library only (Python 3.11+). The work is done by ``buildtools/``: ``wheels.py`` (the
pyzmq cache), ``package.py`` (zips and the wheel), ``checks.py`` (validation and installs, with
the scripts it runs inside Blender in ``buildtools/probes/``); this file is the command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:  # run as a script from elsewhere, or loaded by file path
    sys.path.insert(0, str(ROOT))

from buildtools.checks import print_table, run_checks  # noqa: E402
from buildtools.common import PLATFORMS, BuildError, log  # noqa: E402
from buildtools.package import artifacts_in, build  # noqa: E402


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

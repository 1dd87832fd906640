#!/usr/bin/env bash
# Set up everything the tests need on a fresh Debian machine, then lint (ruff), type-check
# (pyright, basic mode, the paths in pyproject.toml's [tool.pyright]) and run the tests.
# Any lint or type error fails the run before pytest starts.
#   bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
# Debian's Blender 3.4 (a real window under xvfb-run) for the add-on's end-to-end tests.
if ! command -v blender >/dev/null || ! command -v xvfb-run >/dev/null; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            blender xvfb python3-zmq python3-numpy >/dev/null) || echo "warning: could not install blender/xvfb"
    fi
fi
PY=${PYTHON:-python3}
echo "== ruff check"
"$PY" -m ruff check .
echo "== pyright"
PYRIGHT_PYTHON_IGNORE_WARNINGS=1 "$PY" -m pyright  # no PyPI version check: works offline
echo "== pytest"
exec "$PY" -m pytest -q -ra "$@"

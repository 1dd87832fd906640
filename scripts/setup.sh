#!/usr/bin/env bash
# Install Conjure's backend into the current Python (3.11+): `bash scripts/setup.sh [--dev]`.
# PyTorch goes first so nothing that depends on it pulls a multi-GB CUDA build; on a machine
# that already has a torch (e.g. a CUDA build) it is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q "torch==2.13.0"
fi
if [ "${1:-}" = "--dev" ]; then
    "$PY" -m pip install -q -e ".[dev]"
else
    "$PY" -m pip install -q -e .
fi

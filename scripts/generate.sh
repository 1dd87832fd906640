#!/usr/bin/env bash
# The main job on a fresh machine: set up, then turn a prompt into a textured GLB.
#   bash scripts/generate.sh "a red cube" red_cube.glb [extra conjure-backend generate options]
set -euo pipefail
cd "$(dirname "$0")/.."
prompt=${1:-"a red cube"}
out=${2:-red_cube.glb}
shift $(( $# < 2 ? $# : 2 ))
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m backend generate "$prompt" --out "$out" "$@"

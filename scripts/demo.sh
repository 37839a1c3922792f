#!/usr/bin/env bash
# Sets up .venv (see env.sh) and runs the main job: the paper's 2D experiment, written to out/demo.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec "$ROOT/.venv/bin/fastguide" demo --out "${1:-out/demo}" "${@:2}"

#!/usr/bin/env bash
# Sets up .venv (see env.sh) and runs the whole test suite.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec "$VPY" -m pytest -q -p no:cacheprovider tests "$@"

#!/usr/bin/env bash
# Sets up .venv (see env.sh) and runs the whole test suite, or the tests named
# (scripts/test.sh tests/test_sample_cli.py; with options only, pytest.ini's testpaths).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec "$VPY" -m pytest -q -p no:cacheprovider "$@"

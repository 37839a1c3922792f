# Sourced by scripts/demo.sh and scripts/test.sh: creates or updates .venv, installs
# torch==2.13.0 (CPU build here) and the rest, and builds the fastguide._C extension.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY="$ROOT/.venv/bin/python"
STAMP=.venv/.fastguide-deps
REQS="torch==2.13.0 triton==3.7.1 numpy tqdm safetensors pillow matplotlib pytest hypothesis pytest-benchmark diffusers ninja setuptools wheel"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$REQS" ]; then
    # (this machine's pip config names local indexes that may be absent: drop those warnings)
    "$VPY" -m pip install -q --disable-pip-version-check $REQS 2> >(grep -v "^WARNING: Location" >&2)
    echo "$REQS" > "$STAMP"
fi
# Editable install (package + the `fastguide` console command) once; the extension itself is
# built in place, incrementally with ninja, on every call.
# (redone when setup.py, pyproject.toml or the set of top-level packages changes: the editable finder
# maps packages)
EDITABLE_KEY="$(cat setup.py pyproject.toml; ls -d */__init__.py)"
if [ "$(cat .venv/.fastguide-editable 2>/dev/null)" != "$EDITABLE_KEY" ]; then
    FASTGUIDE_NO_EXT=1 "$VPY" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e . \
        2> >(grep -v "^WARNING: Location" >&2)
    echo "$EDITABLE_KEY" > .venv/.fastguide-editable
fi
if ! MAX_JOBS="${MAX_JOBS:-2}" "$VPY" setup.py build_ext --inplace > .venv/build.log 2>&1; then
    cat .venv/build.log >&2; echo "env.sh: building fastguide._C failed (log above)" >&2; exit 1
fi
export PATH="$ROOT/.venv/bin:$PATH"

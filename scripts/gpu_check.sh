#!/usr/bin/env bash
# The GPU check of fastguide's kernels: one command for a machine WITH an NVIDIA GPU.
#
# NOT RUN YET: written on the project's machine, which has no GPU, so this script has never been
# executed end to end; its first run on a GPU machine is also its own test.
#
#   scripts/gpu_check.sh            # from anywhere; Python: $PYTHON, else .venv/bin/python, else python3
#
# In under 8 minutes on one H100/H200 (each stage has its own time limit):
#   1. refuses to run, with a non-zero exit and a clear message, unless torch has CUDA, a GPU is
#      visible, and nvcc is found (never a silent skip);
#   2. builds fastguide._C with the CUDA kernels in place (setup.py build_ext --inplace) and checks
#      that every guided op has a CUDA kernel;
#   3. runs every test file that has GPU cases (those that look at HAS_CUDA / requires_cuda /
#      torch.cuda.is_available) with Triton compiled for the GPU (TRITON_INTERPRET=0: tests/conftest.py
#      would otherwise interpret it), and fails if any test still skips for want of a GPU;
#   4. runs benchmarks/bench_ops.py on the GPU (backends cuda and triton, no torch.compile: its
#      kernel compilation would not fit the budget) and benchmarks/bench_batching.py --quick
#      (which has no device option: it measures the host CPU of the GPU machine);
#   5. appends the numbers, under a dated section, to benchmarks/RESULTS.md.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
LOG="$(mktemp -d)/gpu_check"
mkdir -p "$LOG"

fail() { echo "gpu_check.sh: FAILED: $*" >&2; exit 1; }
stage() { echo; echo "== $* ($(date -u +%H:%M:%S) UTC)"; }

stage "1. GPU, torch with CUDA, nvcc"
"$PY" - <<'EOF' || fail "this machine cannot run the GPU check (see the message above)"
import shutil, sys
import torch
if torch.version.cuda is None:
    sys.exit(f"torch {torch.__version__} was built without CUDA: install a CUDA build of torch")
if not torch.cuda.is_available():
    sys.exit("torch has CUDA but sees no GPU (nvidia-smi? CUDA_VISIBLE_DEVICES?)")
from torch.utils.cpp_extension import CUDA_HOME
if CUDA_HOME is None and shutil.which("nvcc") is None:
    sys.exit("nvcc not found (set CUDA_HOME): the CUDA kernels of fastguide._C cannot be built")
for module in ("pytest", "hypothesis", "triton"):
    __import__(module)
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), {torch.cuda.get_device_name(0)}, "
      f"{torch.cuda.device_count()} device(s)")
EOF
GPU_NAME="$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))')"

stage "2. build fastguide._C with CUDA kernels"
if ! MAX_JOBS="${MAX_JOBS:-$(nproc)}" timeout 300 "$PY" setup.py build_ext --inplace > "$LOG/build.log" 2>&1; then
    tail -40 "$LOG/build.log" >&2
    fail "building the extension (log above, full log in $LOG/build.log)"
fi
"$PY" - <<'EOF' || fail "fastguide._C has no CUDA kernels (was it built without CUDA? see $LOG/build.log)"
import sys
import torch
import fastguide._C  # noqa: F401
ops = ("guided_euler_out", "guided_heun_out", "guided_dpmpp_2m_out", "guided_euler", "guided_dpmpp_2m")
missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fastguide::{op}", "CUDA")]
if missing:
    sys.exit(f"no CUDA kernel for {missing}")
print("CUDA kernels registered for", ", ".join(ops))
EOF

stage "3. GPU tests"
mapfile -t GPU_TESTS < <(grep -l -E "HAS_CUDA|requires_cuda|cuda\.is_available" tests/test_*.py)
[ "${#GPU_TESTS[@]}" -gt 0 ] || fail "no test file with GPU cases found under tests/"
echo "test files: ${GPU_TESTS[*]}"
set +e
TRITON_INTERPRET=0 timeout 330 "$PY" -m pytest -q -rs -p no:cacheprovider "${GPU_TESTS[@]}" 2>&1 | tee "$LOG/tests.log"
TEST_STATUS=${PIPESTATUS[0]}
set -e
[ "$TEST_STATUS" -eq 0 ] || fail "GPU tests (exit $TEST_STATUS; 124 = over the time limit); log in $LOG/tests.log"
if grep -E "^SKIPPED" "$LOG/tests.log" | grep -i -E "cuda|gpu"; then
    fail "tests above still skip for want of a GPU"
fi

stage "4. benchmarks"
BENCH_OPS="benchmarks/bench_ops.py --device cuda --sizes 1M 16M --repeats 30 --no-compile"
for backend in cuda triton; do
    TRITON_INTERPRET=0 PYTHONPATH="$ROOT" timeout 120 "$PY" $BENCH_OPS --backend "$backend" \
        > "$LOG/bench_ops_$backend.md" 2>&1 || { cat "$LOG/bench_ops_$backend.md" >&2; fail "bench_ops.py --backend $backend"; }
    cat "$LOG/bench_ops_$backend.md"
done
BENCH_BATCHING="benchmarks/bench_batching.py --quick"
PYTHONPATH="$ROOT" timeout 150 "$PY" $BENCH_BATCHING > "$LOG/bench_batching.md" 2>&1 \
    || { cat "$LOG/bench_batching.md" >&2; fail "bench_batching.py"; }
cat "$LOG/bench_batching.md"

stage "5. benchmarks/RESULTS.md"
{
    echo
    echo "## GPU check $(date -u '+%Y-%m-%d %H:%M UTC'): $GPU_NAME"
    echo
    echo "Measured by \`scripts/gpu_check.sh\` (commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown));"
    echo "GPU tests: \`TRITON_INTERPRET=0 $PY -m pytest ${GPU_TESTS[*]}\`: $(tail -1 "$LOG/tests.log")"
    for backend in cuda triton; do
        echo
        echo "### Fused epilogues, backend $backend: \`python $BENCH_OPS --backend $backend\`"
        echo
        cat "$LOG/bench_ops_$backend.md"
    done
    echo
    echo "### Batched evaluation (host CPU: bench_batching.py has no device option): \`python $BENCH_BATCHING\`"
    echo
    cat "$LOG/bench_batching.md"
} >> benchmarks/RESULTS.md
echo "appended to benchmarks/RESULTS.md; logs in $LOG"
echo "gpu_check.sh: OK"

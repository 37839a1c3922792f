"""GPU code is compiled here even without a GPU: every csrc/cuda/*.cu with nvcc for sm_80 and
sm_90 (-Xptxas -v: no errors, no spills, 16-byte accesses, the flags' atomic OR), the CUDA
bindings against torch's headers, and the Triton kernels (Euler/ancestral, Heun, DPM-Solver++(2M),
with and without flags) with triton.compile for sm_80 and sm_90."""
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
CU_FILES = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
ARCHS = ("80", "90")
NVCC = shutil.which("nvcc") or (os.path.exists("/usr/local/cuda/bin/nvcc") and "/usr/local/cuda/bin/nvcc")
# What torch's CUDAExtension passes to nvcc, so the kernels compile as they will in a real build.
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                "--expt-relaxed-constexpr", "--use_fast_math"]
requires_nvcc = pytest.mark.skipif(not NVCC, reason="nvcc is not installed")


def nvcc(source, arch, kind, output):
    command = [NVCC, "-std=c++17", "-O3", f"-I{CSRC}", f"-arch=sm_{arch}", f"-{kind}", "-Xptxas", "-v",
           *TORCH_NVCC_FLAGS, "-o", str(output), source]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


@requires_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", CU_FILES, ids=os.path.basename)
def test_cu_compiles_without_spills(source, arch, tmp_path):
    result = nvcc(source, arch, "cubin", tmp_path / "kernel.cubin")
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    assert "error" not in log.lower(), log
    assert "warning" not in log.lower(), log
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    assert spills and not any(spills), f"register spills (or no ptxas report) for sm_{arch}:\n{log}"


@requires_nvcc
@pytest.mark.parametrize("arch", ARCHS)
def test_guided_ops_cu_uses_16_byte_accesses(arch, tmp_path):
    result = nvcc(os.path.join(CSRC, "cuda", "guided_ops.cu"), arch, "ptx", tmp_path / "guided_ops.ptx")
    assert result.returncode == 0, result.stderr
    ptx = (tmp_path / "guided_ops.ptx").read_text()
    accesses = ("ld.global.v4.f32", "st.global.v4.f32", "ld.global.v2.f64", "ld.global.v4.u32", "atom.global.or.b32")
    for access in accesses:
        assert access in ptx, f"no {access} in the PTX for sm_{arch}"
    kernels = re.findall(r"^(?:\.visible\s+)?\.entry\s+(\w+)", ptx, re.MULTILINE)
    # euler and dpmpp_2m: 4 dtypes x guide x (noise or D_prev); heun: 4 dtypes x guide
    assert len(kernels) == 16 + 16 + 8, kernels


def cuda_include_dir():
    homes = [os.environ.get("CUDA_HOME"), os.path.dirname(os.path.dirname(os.path.realpath(NVCC))), "/usr/local/cuda"]
    for home in filter(None, homes):
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return os.path.join(home, "include")
    return None


def torch_cuda_headers_stub(tmp_path):
    """A CPU build of torch ships c10/cuda headers but not the generated cuda_cmake_macros.h."""
    stub = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("#define C10_CUDA_BUILD_SHARED_LIBS\n")
    return tmp_path


@requires_nvcc
def test_cuda_bindings_compile_against_torch_headers(tmp_path):
    """The CUDA-key bindings cannot be built into _C here (CPU torch), so they are syntax-checked."""
    include = os.path.join(os.path.dirname(torch.__file__), "include")
    if not os.path.exists(os.path.join(include, "c10", "cuda", "CUDAGuard.h")):
        pytest.skip("this torch has no c10/cuda headers")
    cuda_include = cuda_include_dir()
    if cuda_include is None:
        pytest.skip("cuda_runtime.h not found (set CUDA_HOME)")
    stub = torch_cuda_headers_stub(tmp_path)
    command = ["g++", "-fsyntax-only", "-Wall", "-Wextra", "-std=c++17", "-DFASTGUIDE_WITH_CUDA=1", f"-I{CSRC}", f"-I{include}",
           f"-I{os.path.join(include, 'torch', 'csrc', 'api', 'include')}", f"-I{stub}", f"-I{cuda_include}",
           f"-I{sysconfig.get_paths()['include']}"]
    for source in sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cpp"))):
        result = subprocess.run(command + [source], capture_output=True, text=True, timeout=300)
        errors = [line for line in result.stderr.splitlines() if "error" in line]
        assert result.returncode == 0 and not errors, result.stderr[-4000:]
        ours = [line for line in result.stderr.splitlines() if line.startswith(CSRC) and "warning" in line]
        assert not ours, "\n".join(ours)


# Triton: compiled in a fresh interpreter, since the test process runs Triton under TRITON_INTERPRET=1.
TRITON_COMPILE = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from tritonkernels._common import BLOCK, NUM_WARPS
    from tritonkernels.guided_dpmpp_2m import guided_dpmpp_2m_kernel as dpm
    from tritonkernels.guided_euler import guided_euler_kernel as euler
    from tritonkernels.guided_heun import guided_heun_kernel as heun

    # Each kernel for both archs, with and without each optional input and the flags, and between
    # them every dtype.
    CASES = [
        (euler, "90", "fp32", dict(HAS_GUIDE=True, HAS_NOISE=False, HAS_FLAGS=False)),
        (euler, "80", "fp32", dict(HAS_GUIDE=False, HAS_NOISE=False, HAS_FLAGS=False)),
        (euler, "80", "fp64", dict(HAS_GUIDE=True, HAS_NOISE=True, HAS_FLAGS=True)),
        (euler, "90", "fp16", dict(HAS_GUIDE=False, HAS_NOISE=True, HAS_FLAGS=True)),
        (euler, "80", "bf16", dict(HAS_GUIDE=True, HAS_NOISE=True, HAS_FLAGS=True)),
        (heun, "80", "fp32", dict(HAS_GUIDE=True, HAS_FLAGS=True)),
        (heun, "90", "bf16", dict(HAS_GUIDE=True, HAS_FLAGS=False)),
        (heun, "90", "fp64", dict(HAS_GUIDE=False, HAS_FLAGS=True)),
        (dpm, "90", "fp32", dict(HAS_GUIDE=True, HAS_PREV=True, HAS_FLAGS=True)),
        (dpm, "80", "fp32", dict(HAS_GUIDE=True, HAS_PREV=True, HAS_FLAGS=False)),
        (dpm, "80", "fp16", dict(HAS_GUIDE=True, HAS_PREV=False, HAS_FLAGS=True)),
        (dpm, "90", "bf16", dict(HAS_GUIDE=False, HAS_PREV=True, HAS_FLAGS=False)),
        (dpm, "90", "fp64", dict(HAS_GUIDE=True, HAS_PREV=True, HAS_FLAGS=True)),
    ]
    VECTOR = {"fp32": "v4.b32", "bf16": "v4.b32", "fp16": "v4.b32", "fp64": "v2.b64"}


    def arg_type(name, dtype):
        if name.isupper():
            return "constexpr"
        if name == "flags_ptr":
            return "*i32"
        return "*" + dtype if name.endswith("_ptr") else "i64" if name == "n" else "fp32"


    for kernel, arch, dtype, options in CASES:
        names = kernel.arg_names
        signature = {name: arg_type(name, dtype) for name in names}
        constexprs = dict(options, COMPUTE_F64=dtype == "fp64", BLOCK=BLOCK)
        # The JIT marks 16-byte aligned pointers and sizes divisible by 16 the same way.
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names)
                 if (name.endswith("_ptr") and name != "flags_ptr") or name == "n"}
        source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(source, target=GPUTarget("cuda", int(arch), 32),
                                  options={"num_warps": NUM_WARPS})
        case = (kernel.__name__, arch, dtype, options)
        assert compiled.asm.get("cubin"), case
        ptx = compiled.asm["ptx"]
        assert f".target sm_{arch}" in ptx, case
        for op in ("ld", "st"):
            assert f"{op}.global.{VECTOR[dtype]}" in ptx, (case, op)
        atomics = [line for line in ptx.splitlines() if ("atom." in line or "red." in line) and ".or." in line]
        assert bool(atomics) == options["HAS_FLAGS"], (case, atomics)
        print("compiled", *case)
""")


def test_triton_kernels_compile_for_sm80_and_sm90():
    pytest.importorskip("triton")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, "-c", TRITON_COMPILE], capture_output=True, text=True, env=env,
                            cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.count("compiled") == 13, result.stdout

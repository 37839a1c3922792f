"""Builds fastguide's extensions fastguide._C and fastguide.toy._C; the package's metadata is in
pyproject.toml.

fastguide._C: CPU kernels every csrc/*.cpp; CUDA kernels csrc/cuda/*.cu (torch-free) plus their
bindings csrc/cuda/*.cpp, built only when the installed torch has CUDA and nvcc is found.
fastguide.toy._C: the toy experiment's CPU kernels, fastguide/toy/csrc/*.cpp (they include the
shared per-element math of csrc/guided_math.h).
The extensions are compiled against the torch of the environment they are installed into, so install
torch first; then `pip install .`, `pip wheel .` or `pip install --no-build-isolation -e .`.
FASTGUIDE_NO_EXT=1 builds without the extensions (the "reference" and "triton" backends remain);
FASTGUIDE_NO_CUDA=1 builds the CPU kernels only.
"""
import glob
import os
import site
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _import_torch():
    """The torch of the environment being installed into.  pip's build isolation (`pip install .`,
    `pip wheel .`) hides that environment's packages from this process: they are looked up there."""
    try:
        import torch
    except ModuleNotFoundError:
        sys.path.extend(path for path in site.getsitepackages() if path not in sys.path)
        try:
            import torch
        except ModuleNotFoundError:
            raise SystemExit(f"fastguide: its extension is compiled against the installed torch, and "
                             f"{sys.executable} has none: install torch first (or set FASTGUIDE_NO_EXT=1 "
                             "to build without the extension)") from None
    return torch


def _extensions():
    if os.environ.get("FASTGUIDE_NO_EXT") == "1":
        return [], {}
    torch = _import_torch()
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cpu_sources = sorted(glob.glob("csrc/*.cpp"))
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp", "-mavx2", "-mfma", "-mf16c",
                 "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None \
        and os.environ.get("FASTGUIDE_NO_CUDA") != "1"
    if with_cuda:
        sources = cpu_sources + sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
        ext = CUDAExtension(
            "fastguide._C", sources, include_dirs=include_dirs,
            define_macros=[("FASTGUIDE_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
            extra_link_args=["-fopenmp"],
            py_limited_api=False)
    else:
        ext = CppExtension(
            "fastguide._C", cpu_sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])
    toy_ext = CppExtension(
        "fastguide.toy._C", sorted(glob.glob("fastguide/toy/csrc/*.cpp")), include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])
    return [ext, toy_ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

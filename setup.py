"""Builds fastguide and its extensions fastguide._C and fastguide.toy._C.

fastguide._C: CPU kernels every csrc/*.cpp; CUDA kernels csrc/cuda/*.cu (torch-free) plus their
bindings csrc/cuda/*.cpp, built only when the installed torch has CUDA and nvcc is found.
fastguide.toy._C: the toy experiment's CPU kernels, fastguide/toy/csrc/*.cpp (they include the
shared per-element math of csrc/guided_math.h).
Install with `pip install --no-build-isolation -e .` (setup.py imports torch).
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("FASTGUIDE_NO_EXT") == "1":
        return [], {}
    import torch
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

setup(
    name="fastguide",
    version="0.1.0",
    description="Kernel-backed guided diffusion sampling: CFG, autoguidance, guidance interval.",
    packages=find_packages(include=["fastguide", "fastguide.*", "tritonkernels", "tritonkernels.*"]),
    package_data={"fastguide": ["toy/weights/*.safetensors"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "tqdm"],
    extras_require={
        "test": ["pytest", "hypothesis", "pytest-benchmark"],
        "triton": ["triton"],
        "toy": ["matplotlib", "safetensors"],
        "diffusers": ["diffusers"],
    },
    entry_points={"console_scripts": ["fastguide=fastguide.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

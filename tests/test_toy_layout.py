"""The foundation knows no experiment: the toy's kernels live in fastguide/toy and register
their own family of fused ops, and fastguide's core neither names nor loads them."""
import ast
import os
import subprocess
import sys

import pytest

from fastguide import dispatch
from fastguide.toy import extension, fused

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every top-level module of fastguide but the command table (cli.py routes `demo` and `toy` there).
CORE_MODULES = sorted(name[:-3] for name in os.listdir(os.path.join(ROOT, "fastguide"))
                      if name.endswith(".py") and name != "cli.py")


def code_names(path):
    """Identifiers, attribute names, imported module names and non-docstring string constants of a file."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            yield node.id
        elif isinstance(node, ast.Attribute):
            yield node.attr
        elif isinstance(node, ast.alias):
            yield node.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.value


@pytest.mark.parametrize("module", CORE_MODULES)
def test_core_code_does_not_name_the_toy(module):
    path = os.path.join(ROOT, "fastguide", f"{module}.py")
    named = sorted({name for name in code_names(path) if "toy" in name.lower()})
    assert not named, f"fastguide/{module}.py names the toy experiment: {named}"


def test_core_kernel_folders_hold_no_toy_sources():
    for folder in ("csrc", "csrc/cuda", "tritonkernels"):
        for name in os.listdir(os.path.join(ROOT, folder)):
            path = os.path.join(ROOT, folder, name)
            if os.path.isfile(path):
                assert "toy" not in name.lower(), f"{folder}/{name} belongs in fastguide/toy"
                assert "toy" not in open(path, encoding="utf-8").read().lower(), f"{folder}/{name} mentions the toy"


def test_toy_family_is_registered_with_its_own_extension():
    family = dispatch.FAMILIES[fused.FAMILY]
    assert family.extension == "fastguide.toy._C" and family.ops == ("fastguide_toy::sample",)
    assert set(family.modules) == {"reference", "cpp", "triton"}
    assert all(module.startswith("fastguide.toy.") for module in family.modules.values())
    assert dispatch.implementation("reference", fused.FAMILY).__name__ == "fastguide.toy.reference_sampler"
    if extension.has_cpu_kernel("sample"):
        assert dispatch.resolve("auto", "cpu", fused.FAMILY) == "cpp"
        assert dispatch.implementation("cpp", fused.FAMILY).__name__ == "fastguide.toy.cpp_sampler"


def test_importing_and_sampling_fastguide_loads_nothing_of_the_toy():
    """In a fresh interpreter: fastguide and a guided sample run without importing fastguide.toy, and
    the core extension fastguide._C registers no toy op."""
    script = ("import sys, torch, fastguide\n"
              "net = lambda x, s, labels=None: x / (1 + s[:, None] ** 2)\n"
              "fastguide.sample(net, torch.randn(4, 2), guide=lambda x, s, labels=None: 0.9 * x, guidance=2.0,"
              " num_steps=3)\n"
              "print(sorted(m for m in sys.modules if 'toy' in m))\n"
              "import fastguide._C\n"
              "print(sorted(op for op in torch._C._dispatch_get_all_op_names() if 'toy' in op))\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[:2] == ["[]", "[]"], result.stdout


def test_toy_kernels_use_the_shared_math():
    """The C++ toy sampler includes csrc/guided_math.h instead of its own copy of the update math,
    and the Triton one imports tritonkernels._common's guidance helper."""
    cpp = open(os.path.join(ROOT, "fastguide", "toy", "csrc", "sampler.cpp"), encoding="utf-8").read()
    assert '#include "guided_math.h"' in cpp
    for helper in ("guided_denoised(", "euler_update(", "heun_update("):
        assert f"fastguide::{helper}" in cpp
    triton_source = open(os.path.join(ROOT, "fastguide", "toy", "triton_sampler.py"), encoding="utf-8").read()
    assert "from tritonkernels._common import guided_denoised" in triton_source

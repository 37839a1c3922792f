"""Installing fastguide.

The wheel built from this tree (with this environment's torch, reusing the in-place build's objects)
holds every module, the toy models' weights and the extension, and works installed elsewhere.  The
install commands the README names, in a fresh virtual environment that has only torch, take minutes:
FASTGUIDE_TEST_INSTALL=1 runs them."""
import email
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
CHECK_INSTALLED = """
import sys, fastguide, fastguide.toy
assert fastguide.__file__.startswith(sys.argv[1]), fastguide.__file__
assert fastguide.backends()["cpp"]["available"], fastguide.backends()
fastguide.toy.load_model("main")
print("ok")
"""


def run(command, **kwargs):
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=900, **kwargs)
    assert result.returncode == 0, f"{command}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def quiet_env(**extra):
    """Without this environment's settings that would point Python at the source tree."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return dict(env, PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)


def build_wheel(python, source, out, *options):
    run([python, "-m", "pip", "wheel", "-q", "--no-deps", "--no-cache-dir", *options, source, "-w", out],
        env=quiet_env(MAX_JOBS="2"))
    (wheel,) = Path(out).glob("fastguide-*.whl")
    return wheel


def source_files(pattern):
    return {str(p.relative_to(ROOT)) for p in ROOT.glob(pattern)}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    return build_wheel(sys.executable, ROOT, tmp_path_factory.mktemp("wheel"), "--no-build-isolation")


def check_wheel(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        requires = email.message_from_bytes(archive.read(metadata)).get_all("Requires-Dist")
        (entry_points,) = [archive.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt")]
    modules = source_files("fastguide/**/*.py") | source_files("tritonkernels/**/*.py")
    assert modules - names == set()
    assert "fastguide/sample_cli.py" in names and "tritonkernels/__init__.py" in names
    weights = source_files("fastguide/toy/weights/*.safetensors")
    assert len(weights) == 3 and weights <= names
    assert [n for n in names if n.startswith("fastguide/_C.") and n.endswith(".so")]
    assert {r.split(">")[0].split(";")[0].strip() for r in requires} >= {"torch", "numpy", "tqdm", "safetensors",
                                                                         "pillow"}
    assert "fastguide = fastguide.cli:main" in entry_points


def test_wheel_holds_the_modules_the_toy_weights_and_the_extension(wheel):
    check_wheel(wheel)


def test_installed_wheel_imports_its_extension_and_loads_the_toy_models(wheel, tmp_path):
    target = tmp_path / "site"
    run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", target, wheel],
        env=quiet_env())
    out = run([sys.executable, "-c", CHECK_INSTALLED, target], cwd=tmp_path, env=quiet_env(PYTHONPATH=str(target)))
    assert out.strip() == "ok"


@pytest.mark.skipif(os.environ.get("FASTGUIDE_TEST_INSTALL") != "1",
                    reason="makes a venv, installs torch and builds fastguide three times (minutes); "
                           "FASTGUIDE_TEST_INSTALL=1 runs it")
def test_readme_install_commands_in_a_fresh_venv_with_torch(tmp_path):
    """pip install . (build isolation), pip wheel . and pip install --no-build-isolation -e ."""
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "*.so", "__pycache__", "out", ".whl", ".gl"))
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv])
    python = venv / "bin" / "python"
    torch_version = torch.__version__.split("+")[0]  # the same release as here (on this machine: its CPU build)
    run([python, "-m", "pip", "install", "-q", f"torch=={torch_version}", "ninja"], env=quiet_env())
    site_packages = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip()

    run([python, "-m", "pip", "install", "-q", source], env=quiet_env(MAX_JOBS="2"))
    assert run([python, "-c", CHECK_INSTALLED, site_packages], cwd=tmp_path, env=quiet_env()).strip() == "ok"
    run([venv / "bin" / "fastguide", "sample", "--help"], cwd=tmp_path, env=quiet_env())

    check_wheel(build_wheel(python, source, tmp_path / "wheel"))

    run([python, "-m", "pip", "uninstall", "-q", "-y", "fastguide"], env=quiet_env())
    run([python, "-m", "pip", "install", "-q", "--no-build-isolation", "-e", source], env=quiet_env(MAX_JOBS="2"))
    assert run([python, "-c", CHECK_INSTALLED, source], cwd=tmp_path, env=quiet_env()).strip() == "ok"

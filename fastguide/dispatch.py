"""The one place that decides which backend runs the fused ops.

Backends: "reference" (plain PyTorch, fastguide.reference), "cpp" (fastguide._C, CPU tensors),
"cuda" (fastguide._C built with CUDA, CUDA tensors), "triton" (tritonkernels, CUDA tensors, or CPU
tensors under TRITON_INTERPRET=1).  "auto" picks, per device, the fastest one available.
"""
import functools
import importlib
import os
import warnings

import torch

NAMES = ("reference", "cpp", "triton", "cuda")
# Each family of fused ops: the backends it has, the fastguide._C ops a C++/CUDA backend needs,
# and the module of its Triton kernels.
FAMILIES = {
    "guided": dict(names=NAMES, ops=("guided_euler_out", "guided_heun_out"), triton="tritonkernels"),
    "toy_sample": dict(names=("reference", "cpp", "triton"), ops=("toy_sample",), triton="tritonkernels.toy_sampler"),
}
_warned = set()


@functools.lru_cache(maxsize=None)
def _load_extension():
    """Imports fastguide._C once; returns (loaded, reason)."""
    try:
        importlib.import_module("fastguide._C")
    except ImportError as exc:
        return False, f"fastguide._C is not built ({exc}); run scripts/test.sh or `python setup.py build_ext --inplace`"
    return True, ""


def _has_op(name, dispatch_key):
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastguide::{name}", dispatch_key)
    except RuntimeError:
        return False


@functools.lru_cache(maxsize=None)
def _availability(name, family="guided"):
    """(available, reason) for one backend of a family of ops, independent of the device."""
    ops = FAMILIES[family]
    if name == "reference":
        return True, "plain PyTorch"
    if name in ("cpp", "cuda"):
        loaded, reason = _load_extension()
        if not loaded:
            return False, reason
        key = "CPU" if name == "cpp" else "CUDA"
        if not all(_has_op(op, key) for op in ops["ops"]):
            return False, f"fastguide._C has no {key} kernels for {', '.join(ops['ops'])}" + (
                " (torch was built without CUDA)" if name == "cuda" and torch.version.cuda is None else "")
        if name == "cuda" and not torch.cuda.is_available():
            return False, "no CUDA device"
        return True, f"fastguide._C {key} kernels"
    if name == "triton":
        try:
            importlib.import_module(ops["triton"])
        except ImportError as exc:
            return False, f"triton kernels unavailable ({exc})"
        if torch.cuda.is_available():
            return True, "Triton on CUDA"
        if os.environ.get("TRITON_INTERPRET") == "1":
            return True, "Triton interpreter (TRITON_INTERPRET=1) on CPU tensors"
        return False, "no CUDA device (set TRITON_INTERPRET=1 to interpret on CPU)"
    raise ValueError(name)


def backends():
    """What each backend is: {name: {"available": bool, "reason": str}}."""
    return {name: dict(zip(("available", "reason"), _availability(name))) for name in NAMES}


def check_name(backend, argument="backend", family="guided"):
    names = FAMILIES[family]["names"]
    if backend != "auto" and backend not in names:
        raise ValueError(f"{argument} must be one of {('auto',) + names}, got {backend!r}")


def resolve(backend, device):
    """The backend name that runs on `device` for a requested name ("auto" or one of NAMES).

    torch.compile runs it eagerly and treats the name as a constant, so compiled code that calls
    fastguide.ops traces straight into the chosen kernel."""
    name = _resolve(backend, device)
    _load_implementation(name)
    return name


# What torch._dynamo.assume_constant_result does, without importing torch._dynamo at start-up
# (it costs seconds, on every `fastguide` command and every torchrun rank).
resolve._dynamo_marked_constant = True


def _resolve(backend, device, family="guided"):
    check_name(backend, family=family)
    device = torch.device(device)
    if backend != "auto":
        available, reason = _availability(backend, family)
        if not available:
            raise RuntimeError(f"backend {backend!r} is not available: {reason}")
        if backend == "cpp" and device.type != "cpu":
            raise ValueError(f"backend 'cpp' runs on CPU tensors, got device {device}")
        if backend == "cuda" and device.type != "cuda":
            raise ValueError(f"backend 'cuda' runs on CUDA tensors, got device {device}")
        if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"backend 'triton' runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), "
                             f"got device {device}")
        return backend
    names = FAMILIES[family]["names"]
    candidates = ("cuda", "triton") if device.type == "cuda" else ("cpp",) if device.type == "cpu" else ()
    candidates = tuple(name for name in candidates if name in names)
    for name in candidates:
        if _availability(name, family)[0]:
            return name
    if (family, device.type) not in _warned:
        _warned.add((family, device.type))
        reasons = "; ".join(f"{n}: {_availability(n, family)[1]}" for n in candidates) or "no fused backend for this device"
        warnings.warn(f"fastguide: no fused {family} backend for {device.type} tensors ({reasons}); "
                      "using the reference backend", RuntimeWarning, stacklevel=4)
    return "reference"


def resolve_family(backend, device, family):
    """Like resolve, for another family of fused ops (see FAMILIES): the backend that runs on device."""
    return _resolve(backend, device, family)


_MODULES = {"reference": "fastguide.reference", "cpp": "fastguide._extension_ops",
            "cuda": "fastguide._extension_ops", "triton": "tritonkernels"}
_implementations = {}


def _load_implementation(name):
    if name not in _implementations:
        _implementations[name] = importlib.import_module(_MODULES[name])
    return _implementations[name]


def implementation(name):
    """The module whose guided_euler/guided_heun run backend `name` (all share one signature)."""
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; expected one of {NAMES}")
    implementation_module = _implementations.get(name)
    return implementation_module if implementation_module is not None else _load_implementation(name)

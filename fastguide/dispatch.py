"""The one place that decides which backend runs a family of fused ops.

Backends: "reference" (plain PyTorch), "cpp" (a C++ extension, CPU tensors), "cuda" (the same
extension built with CUDA, CUDA tensors), "triton" (Triton kernels: CUDA tensors, or CPU tensors
under TRITON_INTERPRET=1).  "auto" picks, per device, the fastest one available.

A family is a set of ops with one module per backend that implements them all with one
signature.  fastguide's own family is "guided" (the fused guidance + solver epilogues); other
packages built on fastguide add theirs with register_family and ask resolve/implementation
for it: nothing here knows them.
"""
import dataclasses
import functools
import importlib
import os
import warnings

import torch

NAMES = ("reference", "cpp", "triton", "cuda")


@dataclasses.dataclass(frozen=True)
class Family:
    modules: dict          # backend name -> module that implements the family's functions
    extension: str = ""    # the module whose import registers the C++/CUDA kernels
    ops: tuple = ()        # "namespace::op" names the cpp/cuda backends need kernels for

    @property
    def names(self):
        return tuple(name for name in NAMES if name in self.modules)


FAMILIES = {}
_warned = set()
_implementations = {}


def register_family(name, *, modules, extension="", ops=()):
    """Adds (or replaces) the family `name`: modules maps each backend name it has to the module
    implementing it; extension and ops say what the cpp/cuda backends need."""
    unknown = set(modules) - set(NAMES)
    if unknown:
        raise ValueError(f"register_family: unknown backend names {sorted(unknown)}; expected a subset of {NAMES}")
    FAMILIES[name] = Family(dict(modules), extension, tuple(ops))
    for key in [key for key in _implementations if key[0] == name]:
        del _implementations[key]


register_family("guided", modules={"reference": "fastguide.reference", "cpp": "fastguide._extension_ops",
                                   "cuda": "fastguide._extension_ops", "triton": "tritonkernels"},
                extension="fastguide._C",
                ops=("fastguide::guided_euler_out", "fastguide::guided_heun_out", "fastguide::guided_dpmpp_2m_out"))


@functools.lru_cache(maxsize=None)
def load_extension(module):
    """Imports a kernel extension once; returns (loaded, reason)."""
    try:
        importlib.import_module(module)
    except ImportError as exc:
        return False, f"{module} is not built ({exc}); run scripts/test.sh or `python setup.py build_ext --inplace`"
    return True, ""


def has_kernel(op, dispatch_key):
    """Whether the op "namespace::name" has a kernel for dispatch_key ("CPU", "CUDA")."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(op, dispatch_key)
    except RuntimeError:
        return False


@functools.lru_cache(maxsize=None)
def _availability(name, family="guided"):
    """(available, reason) for one backend of a family of ops, independent of the device."""
    spec = FAMILIES[family]
    if name not in spec.modules:
        return False, f"the {family!r} ops have no {name} backend"
    if name == "reference":
        return True, "plain PyTorch"
    if name in ("cpp", "cuda"):
        loaded, reason = load_extension(spec.extension)
        if not loaded:
            return False, reason
        key = "CPU" if name == "cpp" else "CUDA"
        if not all(has_kernel(op, key) for op in spec.ops):
            return False, f"{spec.extension} has no {key} kernels for {', '.join(spec.ops)}" + (
                " (torch was built without CUDA)" if name == "cuda" and torch.version.cuda is None else "")
        if name == "cuda" and not torch.cuda.is_available():
            return False, "no CUDA device"
        return True, f"{spec.extension} {key} kernels"
    try:
        importlib.import_module(spec.modules["triton"])
    except ImportError as exc:
        return False, f"triton kernels unavailable ({exc})"
    if torch.cuda.is_available():
        return True, "Triton on CUDA"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, "Triton interpreter (TRITON_INTERPRET=1) on CPU tensors"
    return False, "no CUDA device (set TRITON_INTERPRET=1 to interpret on CPU)"


def backends(family="guided"):
    """What each backend of a family is: {name: {"available": bool, "reason": str}}."""
    return {name: dict(zip(("available", "reason"), _availability(name, family))) for name in FAMILIES[family].names}


def check_name(backend, argument="backend", family="guided"):
    """Refuses a backend name the family does not have (before any work)."""
    names = FAMILIES[family].names
    if backend != "auto" and backend not in names:
        raise ValueError(f"{argument} must be one of {('auto',) + names}, got {backend!r}")
    return backend


def resolve(backend, device, family="guided"):
    """The backend name that runs `family` on `device` for a requested name ("auto" or one of NAMES).

    torch.compile runs it eagerly and treats the name as a constant, so compiled code that calls
    fastguide.ops traces straight into the chosen kernel."""
    name = _resolve(backend, torch.device(device), family)
    implementation(name, family)
    return name


# What torch._dynamo.assume_constant_result does, without importing torch._dynamo at start-up
# (it costs seconds, on every `fastguide` command and every torchrun rank).
resolve._dynamo_marked_constant = True


def _resolve(backend, device, family):
    check_name(backend, family=family)
    if backend != "auto":
        available, reason = _availability(backend, family)
        if not available:
            raise RuntimeError(f"backend {backend!r} is not available: {reason}")
        wanted = {"cpp": "cpu", "cuda": "cuda"}.get(backend)
        if wanted and device.type != wanted:
            raise ValueError(f"backend {backend!r} runs on {wanted.upper()} tensors, got device {device}")
        if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"backend 'triton' runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), "
                             f"got device {device}")
        return backend
    candidates = ("cuda", "triton") if device.type == "cuda" else ("cpp",) if device.type == "cpu" else ()
    candidates = tuple(name for name in candidates if name in FAMILIES[family].modules)
    for name in candidates:
        if _availability(name, family)[0]:
            return name
    if (family, device.type) not in _warned:
        _warned.add((family, device.type))
        reasons = "; ".join(f"{n}: {_availability(n, family)[1]}" for n in candidates) or "no fused backend for this device"
        warnings.warn(f"fastguide: no fused {family} backend for {device.type} tensors ({reasons}); "
                      "using the reference backend", RuntimeWarning, stacklevel=4)
    return "reference"


def implementation(name, family="guided"):
    """The module that runs backend `name` of `family` (every backend's module has one signature)."""
    module = _implementations.get((family, name))
    if module is None:
        modules = FAMILIES[family].modules
        if name not in modules:
            raise ValueError(f"unknown backend {name!r} for the {family!r} ops; expected one of {tuple(modules)}")
        module = _implementations[family, name] = importlib.import_module(modules[name])
    return module

"""The toy experiment's own C++ extension, fastguide.toy._C (fastguide/toy/csrc/*.cpp), whose ops
are torch.ops.fastguide_toy.*: mixture_score, silu_derivatives and the fused sampler `sample`."""
from fastguide import dispatch

MODULE = "fastguide.toy._C"
NAMESPACE = "fastguide_toy"


def has_cpu_kernel(op):
    """Whether fastguide.toy._C is built and registers a CPU kernel for torch.ops.fastguide_toy.<op>."""
    return dispatch.load_extension(MODULE)[0] and dispatch.has_kernel(f"{NAMESPACE}::{op}", "CPU")

"""The "cpp" and "cuda" backends: thin wrappers over torch.ops.fastguide.* from fastguide._C.

The kernels themselves make non-contiguous inputs contiguous and write through a temporary
when `out` is non-contiguous or partly overlaps an input, so the wrappers only forward.
The fake (meta) implementations below let the ops trace under torch.compile.
"""
import torch

import fastguide._C  # noqa: F401  (registers torch.ops.fastguide.*)

_euler_out = torch.ops.fastguide.guided_euler_out.default  # the overload itself: no overload lookup per call
_heun_out = torch.ops.fastguide.guided_heun_out.default


def guided_euler(x, d_main, d_guide, guidance, t_cur, t_next, *, out, deriv_out):
    _euler_out(x, d_main, d_guide, guidance, t_cur, t_next, out=out, deriv_out=deriv_out)
    return out, deriv_out


def guided_heun(x, deriv, d_main, d_guide, guidance, t_cur, t_next, *, out):
    _heun_out(x, deriv, d_main, d_guide, guidance, t_cur, t_next, out=out)
    return out


@torch.library.register_fake("fastguide::guided_euler")
def _guided_euler_fake(x, d_main, d_guide, guidance, t_cur, t_next):
    return torch.empty_like(x, memory_format=torch.contiguous_format), \
        torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("fastguide::guided_euler_out")
def _guided_euler_out_fake(x, d_main, d_guide, guidance, t_cur, t_next, *, out, deriv_out):
    return None


@torch.library.register_fake("fastguide::guided_heun")
def _guided_heun_fake(x, deriv, d_main, d_guide, guidance, t_cur, t_next):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("fastguide::guided_heun_out")
def _guided_heun_out_fake(x, deriv, d_main, d_guide, guidance, t_cur, t_next, *, out):
    return None


# Interim: noise and flags on top of the Euler/Heun kernels, DPM-Solver++(2M) by the reference,
# until the fused kernels that take them land.
from fastguide import reference as _ref
_old_euler, _old_heun = guided_euler, guided_heun


def guided_euler(x, d_main, d_guide, guidance, t_cur, t_next, *, out, deriv_out, noise=None, noise_scale=0.0, flags=None):
    _old_euler(x, d_main, d_guide, guidance, t_cur, t_next, out=out, deriv_out=deriv_out)
    if noise is not None:
        out.add_(noise, alpha=noise_scale)
    _ref._flag(flags, d_main, d_guide, out)
    return out, deriv_out


def guided_heun(x, deriv, d_main, d_guide, guidance, t_cur, t_next, *, out, flags=None):
    _old_heun(x, deriv, d_main, d_guide, guidance, t_cur, t_next, out=out)
    _ref._flag(flags, d_main, d_guide, out)
    return out


guided_dpmpp_2m = _ref.guided_dpmpp_2m

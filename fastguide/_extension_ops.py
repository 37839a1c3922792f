"""The "cpp" and "cuda" backends: thin wrappers over torch.ops.fastguide.* from fastguide._C.

The kernels themselves make non-contiguous inputs contiguous and write through a temporary
when `out` is non-contiguous or partly overlaps an input, so the wrappers only forward.
The fake (meta) implementations below let the ops trace under torch.compile.
"""
import torch

import fastguide._C  # noqa: F401  (registers torch.ops.fastguide.*)

_euler_out = torch.ops.fastguide.guided_euler_out.default  # the overload itself: no overload lookup per call
_heun_out = torch.ops.fastguide.guided_heun_out.default
_dpmpp_2m_out = torch.ops.fastguide.guided_dpmpp_2m_out.default


def guided_euler(x, d_main, d_guide, guidance, t_cur, t_next, *, out, deriv_out, noise=None, noise_scale=0.0,
                 flags=None):
    _euler_out(x, d_main, d_guide, guidance, t_cur, t_next, noise=noise, noise_scale=noise_scale, out=out,
               deriv_out=deriv_out, flags=flags)
    return out, deriv_out


def guided_heun(x, deriv, d_main, d_guide, guidance, t_cur, t_next, *, out, flags=None):
    _heun_out(x, deriv, d_main, d_guide, guidance, t_cur, t_next, out=out, flags=flags)
    return out


def guided_dpmpp_2m(x, d_main, d_guide, denoised_prev, guidance, x_coef, d_coef, prev_coef, *, out, denoised_out,
                    flags=None):
    _dpmpp_2m_out(x, d_main, d_guide, denoised_prev, guidance, x_coef, d_coef, prev_coef, out=out,
                  denoised_out=denoised_out, flags=flags)
    return out, denoised_out


def _fresh(x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("fastguide::guided_euler")
def _guided_euler_fake(x, d_main, d_guide, guidance, t_cur, t_next, *, noise=None, noise_scale=0.0):
    return _fresh(x), _fresh(x)


@torch.library.register_fake("fastguide::guided_euler_out")
def _guided_euler_out_fake(x, d_main, d_guide, guidance, t_cur, t_next, *, noise=None, noise_scale=0.0, out,
                           deriv_out, flags=None):
    return None


@torch.library.register_fake("fastguide::guided_heun")
def _guided_heun_fake(x, deriv, d_main, d_guide, guidance, t_cur, t_next):
    return _fresh(x)


@torch.library.register_fake("fastguide::guided_heun_out")
def _guided_heun_out_fake(x, deriv, d_main, d_guide, guidance, t_cur, t_next, *, out, flags=None):
    return None


@torch.library.register_fake("fastguide::guided_dpmpp_2m")
def _guided_dpmpp_2m_fake(x, d_main, d_guide, denoised_prev, guidance, x_coef, d_coef, prev_coef):
    return _fresh(x), _fresh(x)


@torch.library.register_fake("fastguide::guided_dpmpp_2m_out")
def _guided_dpmpp_2m_out_fake(x, d_main, d_guide, denoised_prev, guidance, x_coef, d_coef, prev_coef, *, out,
                              denoised_out, flags=None):
    return None

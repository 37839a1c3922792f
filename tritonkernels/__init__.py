"""Triton kernels of fastguide: the fused guidance + Euler/Heun ops for CUDA tensors (or CPU
tensors under TRITON_INTERPRET=1), one file per op.  Same signatures as fastguide.reference."""
from tritonkernels.guided_euler import guided_euler
from tritonkernels.guided_heun import guided_heun

__all__ = ["guided_euler", "guided_heun", "guided_dpmpp_2m"]

# Interim: noise and flags on top of the Euler/Heun kernels, DPM-Solver++(2M) by the reference,
# until the fused kernels that take them land.
from fastguide import reference as _ref  # noqa: E402
_euler_kernel, _heun_kernel = guided_euler, guided_heun


def guided_euler(x, d_main, d_guide, guidance, t_cur, t_next, *, out, deriv_out, noise=None, noise_scale=0.0,
                 flags=None):
    _euler_kernel(x, d_main, d_guide, guidance, t_cur, t_next, out=out, deriv_out=deriv_out)
    if noise is not None:
        out.add_(noise, alpha=noise_scale)
    _ref._flag(flags, d_main, d_guide, out)
    return out, deriv_out


def guided_heun(x, deriv, d_main, d_guide, guidance, t_cur, t_next, *, out, flags=None):
    _heun_kernel(x, deriv, d_main, d_guide, guidance, t_cur, t_next, out=out)
    _ref._flag(flags, d_main, d_guide, out)
    return out


guided_dpmpp_2m = _ref.guided_dpmpp_2m

"""Triton guided_heun: x_euler = x + h·deriv, deriv' = (x_euler − D')/t_next,
x_next = x + h/2·(deriv + deriv')."""
import torch
import triton
import triton.language as tl

from tritonkernels._common import (BLOCK, NUM_WARPS, contiguous, finish, flags_arg, grid, load_block,
                                   load_predictions, load_scalar, report_nonfinite, split_scalar, target_for)


@triton.jit
def guided_heun_kernel(x_ptr, deriv_ptr, main_ptr, guide_ptr, out_ptr, flags_ptr, n,
                       guidance_hi, guidance_lo, inv_t_hi, inv_t_lo, step_hi, step_lo, half_hi, half_lo,
                       HAS_GUIDE: tl.constexpr, HAS_FLAGS: tl.constexpr, COMPUTE_F64: tl.constexpr,
                       BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = load_block(x_ptr, offsets, mask, COMPUTE_F64)
    deriv = load_block(deriv_ptr, offsets, mask, COMPUTE_F64)
    d_main, d_guide, denoised = load_predictions(main_ptr, guide_ptr, offsets, mask, guidance_hi, guidance_lo,
                                                 HAS_GUIDE, COMPUTE_F64)
    x_euler = x + load_scalar(step_hi, step_lo, COMPUTE_F64) * deriv
    deriv_next = (x_euler - denoised) * load_scalar(inv_t_hi, inv_t_lo, COMPUTE_F64)
    x_next = x + load_scalar(half_hi, half_lo, COMPUTE_F64) * (deriv + deriv_next)
    stored = x_next.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offsets, stored, mask=mask)
    if HAS_FLAGS:
        report_nonfinite(flags_ptr, d_main, d_guide, stored, mask, HAS_GUIDE)


def scalar_args(guidance, t_cur, t_next):
    step = t_next - t_cur
    return (*split_scalar(guidance), *split_scalar(1.0 / t_next), *split_scalar(step), *split_scalar(0.5 * step))


def guided_heun(x, deriv, d_main, d_guide, guidance, t_cur, t_next, *, out, flags=None):
    inputs = contiguous([x, deriv, d_main, d_guide])
    x_c, deriv_c, main_c, guide_c = inputs
    next_buf = target_for(out, inputs)
    n = x.numel()
    if n > 0:
        guided_heun_kernel[grid(n)](
            x_c, deriv_c, main_c, main_c if guide_c is None else guide_c, next_buf, flags_arg(flags, x_c), n,
            *scalar_args(guidance, t_cur, t_next), HAS_GUIDE=guide_c is not None, HAS_FLAGS=flags is not None,
            COMPUTE_F64=x.dtype == torch.float64, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return finish(next_buf, out)

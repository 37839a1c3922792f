"""Triton guided_euler: D = D0 + w·(D1 − D0), deriv = (x − D)/t_cur, x_next = x + h·deriv
[+ noise_scale·noise: the ancestral step]."""
import torch
import triton
import triton.language as tl

from tritonkernels._common import (BLOCK, NUM_WARPS, contiguous, finish, flags_arg, grid, load_block,
                                   load_predictions, load_scalar, report_nonfinite, split_scalar, target_for)


@triton.jit
def guided_euler_kernel(x_ptr, main_ptr, guide_ptr, noise_ptr, out_ptr, deriv_ptr, flags_ptr, n,
                        guidance_hi, guidance_lo, inv_t_hi, inv_t_lo, step_hi, step_lo, noise_hi, noise_lo,
                        HAS_GUIDE: tl.constexpr, HAS_NOISE: tl.constexpr, HAS_FLAGS: tl.constexpr,
                        COMPUTE_F64: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = load_block(x_ptr, offsets, mask, COMPUTE_F64)
    d_main, d_guide, denoised = load_predictions(main_ptr, guide_ptr, offsets, mask, guidance_hi, guidance_lo,
                                                 HAS_GUIDE, COMPUTE_F64)
    deriv = (x - denoised) * load_scalar(inv_t_hi, inv_t_lo, COMPUTE_F64)
    x_next = x + load_scalar(step_hi, step_lo, COMPUTE_F64) * deriv
    if HAS_NOISE:
        x_next = x_next + load_scalar(noise_hi, noise_lo, COMPUTE_F64) * load_block(noise_ptr, offsets, mask,
                                                                                    COMPUTE_F64)
    stored = x_next.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offsets, stored, mask=mask)
    tl.store(deriv_ptr + offsets, deriv.to(deriv_ptr.dtype.element_ty), mask=mask)
    if HAS_FLAGS:
        report_nonfinite(flags_ptr, d_main, d_guide, stored, mask, HAS_GUIDE)


def scalar_args(guidance, t_cur, t_next, noise_scale):
    return (*split_scalar(guidance), *split_scalar(1.0 / t_cur), *split_scalar(t_next - t_cur),
            *split_scalar(noise_scale))


def guided_euler(x, d_main, d_guide, guidance, t_cur, t_next, *, out, deriv_out, noise=None, noise_scale=0.0,
                 flags=None):
    inputs = contiguous([x, d_main, d_guide, noise])
    x_c, main_c, guide_c, noise_c = inputs
    next_buf, deriv_buf = target_for(out, inputs), target_for(deriv_out, inputs)
    n = x.numel()
    if n > 0:
        guided_euler_kernel[grid(n)](
            x_c, main_c, main_c if guide_c is None else guide_c, x_c if noise_c is None else noise_c, next_buf,
            deriv_buf, flags_arg(flags, x_c), n, *scalar_args(guidance, t_cur, t_next, noise_scale),
            HAS_GUIDE=guide_c is not None, HAS_NOISE=noise_c is not None, HAS_FLAGS=flags is not None,
            COMPUTE_F64=x.dtype == torch.float64, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return finish(next_buf, out), finish(deriv_buf, deriv_out)

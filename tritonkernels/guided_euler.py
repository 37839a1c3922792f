"""Triton guided_euler: D = D0 + w·(D1 − D0), deriv = (x − D)/t_cur, x_next = x + h·deriv."""
import torch
import triton
import triton.language as tl

from tritonkernels._common import (BLOCK, NUM_WARPS, contiguous, finish, grid, guided_denoised, load_block,
                                   load_scalar, split_scalar, target_for)


@triton.jit
def guided_euler_kernel(x_ptr, main_ptr, guide_ptr, out_ptr, deriv_ptr, n,
                        guidance_hi, guidance_lo, inv_t_hi, inv_t_lo, step_hi, step_lo,
                        HAS_GUIDE: tl.constexpr, COMPUTE_F64: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = load_block(x_ptr, offsets, mask, COMPUTE_F64)
    denoised = load_block(main_ptr, offsets, mask, COMPUTE_F64)
    if HAS_GUIDE:
        guidance = load_scalar(guidance_hi, guidance_lo, COMPUTE_F64)
        denoised = guided_denoised(denoised, load_block(guide_ptr, offsets, mask, COMPUTE_F64), guidance)
    deriv = (x - denoised) * load_scalar(inv_t_hi, inv_t_lo, COMPUTE_F64)
    x_next = x + load_scalar(step_hi, step_lo, COMPUTE_F64) * deriv
    tl.store(out_ptr + offsets, x_next.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(deriv_ptr + offsets, deriv.to(deriv_ptr.dtype.element_ty), mask=mask)


def scalar_args(guidance, t_cur, t_next):
    return (*split_scalar(guidance), *split_scalar(1.0 / t_cur), *split_scalar(t_next - t_cur))


def guided_euler(x, d_main, d_guide, guidance, t_cur, t_next, *, out, deriv_out):
    inputs = contiguous([x, d_main, d_guide])
    x_c, main_c, guide_c = inputs
    next_buf, deriv_buf = target_for(out, inputs), target_for(deriv_out, inputs)
    n = x.numel()
    if n > 0:
        guided_euler_kernel[grid(n)](
            x_c, main_c, main_c if guide_c is None else guide_c, next_buf, deriv_buf, n,
            *scalar_args(guidance, t_cur, t_next), HAS_GUIDE=guide_c is not None,
            COMPUTE_F64=x.dtype == torch.float64, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return finish(next_buf, out), finish(deriv_buf, deriv_out)


"""Triton guided_dpmpp_2m: D = D0 + w·(D1 − D0), x_next = x_coef·x + d_coef·D [+ prev_coef·D_prev],
and D stored for the next step (D_prev unread when prev_coef == 0)."""
import torch
import triton
import triton.language as tl

from tritonkernels._common import (BLOCK, NUM_WARPS, contiguous, finish, flags_arg, grid, load_block,
                                   load_predictions, load_scalar, report_nonfinite, split_scalar, target_for)


@triton.jit
def guided_dpmpp_2m_kernel(x_ptr, main_ptr, guide_ptr, prev_ptr, out_ptr, denoised_ptr, flags_ptr, n,
                           guidance_hi, guidance_lo, x_coef_hi, x_coef_lo, d_coef_hi, d_coef_lo, prev_hi, prev_lo,
                           HAS_GUIDE: tl.constexpr, HAS_PREV: tl.constexpr, HAS_FLAGS: tl.constexpr,
                           COMPUTE_F64: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = load_block(x_ptr, offsets, mask, COMPUTE_F64)
    d_main, d_guide, denoised = load_predictions(main_ptr, guide_ptr, offsets, mask, guidance_hi, guidance_lo,
                                                 HAS_GUIDE, COMPUTE_F64)
    x_next = (load_scalar(x_coef_hi, x_coef_lo, COMPUTE_F64) * x
              + load_scalar(d_coef_hi, d_coef_lo, COMPUTE_F64) * denoised)
    if HAS_PREV:
        x_next = x_next + load_scalar(prev_hi, prev_lo, COMPUTE_F64) * load_block(prev_ptr, offsets, mask,
                                                                                  COMPUTE_F64)
    stored = x_next.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offsets, stored, mask=mask)
    tl.store(denoised_ptr + offsets, denoised.to(denoised_ptr.dtype.element_ty), mask=mask)
    if HAS_FLAGS:
        report_nonfinite(flags_ptr, d_main, d_guide, stored, mask, HAS_GUIDE)


def scalar_args(guidance, x_coef, d_coef, prev_coef):
    return (*split_scalar(guidance), *split_scalar(x_coef), *split_scalar(d_coef), *split_scalar(prev_coef))


def guided_dpmpp_2m(x, d_main, d_guide, denoised_prev, guidance, x_coef, d_coef, prev_coef, *, out, denoised_out,
                    flags=None):
    read_prev = denoised_prev if prev_coef != 0 else None  # first-order steps never read D_prev
    inputs = contiguous([x, d_main, d_guide, read_prev])
    x_c, main_c, guide_c, prev_c = inputs
    next_buf, denoised_buf = target_for(out, inputs), target_for(denoised_out, inputs)
    n = x.numel()
    if n > 0:
        guided_dpmpp_2m_kernel[grid(n)](
            x_c, main_c, main_c if guide_c is None else guide_c, x_c if prev_c is None else prev_c, next_buf,
            denoised_buf, flags_arg(flags, x_c), n, *scalar_args(guidance, x_coef, d_coef, prev_coef),
            HAS_GUIDE=guide_c is not None, HAS_PREV=prev_c is not None, HAS_FLAGS=flags is not None,
            COMPUTE_F64=x.dtype == torch.float64, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return finish(next_buf, out), finish(denoised_buf, denoised_out)

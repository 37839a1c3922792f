"""What the Triton guided ops share: launch sizes, scalar packing, the guided prediction, the
non-finite flags, contiguous inputs and safe outputs."""
import os

import numpy
import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# On a GPU 2048 elements per program (8 warps: 8 fp32 per thread, two 16-byte accesses each);
# the CPU interpreter pays per program, so it takes far bigger blocks.
BLOCK = 65536 if INTERPRETED else 2048
NUM_WARPS = 8


def split_scalar(value):
    """value as a float32 pair (hi, lo) with hi + lo ≈ value to ~48 bits: Triton passes Python
    floats as float32, so float64 kernels rebuild their scalars from the pair."""
    hi = float(numpy.float32(value))
    return hi, float(numpy.float32(value - hi))


@triton.jit
def load_scalar(hi, lo, COMPUTE_F64: tl.constexpr):
    """The step scalar in the math type: hi + lo in float64, hi alone in float32."""
    return tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64) if COMPUTE_F64 else hi


@triton.jit
def load_block(ptr, offsets, mask, COMPUTE_F64: tl.constexpr):
    """A block of elements in the math type: float64 for float64 tensors, else float32."""
    return tl.load(ptr + offsets, mask=mask).to(tl.float64 if COMPUTE_F64 else tl.float32)


@triton.jit
def guided_denoised(d_main, d_guide, guidance):
    """D = D0 + w·(D1 − D0)"""
    return d_guide + guidance * (d_main - d_guide)


@triton.jit
def load_predictions(main_ptr, guide_ptr, offsets, mask, guidance_hi, guidance_lo, HAS_GUIDE: tl.constexpr,
                     COMPUTE_F64: tl.constexpr):
    """(d_main, d_guide, D) for a block: D = d_main, and d_guide = d_main (unread), without a guide."""
    d_main = load_block(main_ptr, offsets, mask, COMPUTE_F64)
    d_guide = d_main
    denoised = d_main
    if HAS_GUIDE:
        d_guide = load_block(guide_ptr, offsets, mask, COMPUTE_F64)
        denoised = guided_denoised(d_main, d_guide, load_scalar(guidance_hi, guidance_lo, COMPUTE_F64))
    return d_main, d_guide, denoised


INF = tl.constexpr(float("inf"))


@triton.jit
def any_nonfinite(values, mask):
    """1 if an element under mask is NaN or ±inf, else 0 (NaN fails every comparison)."""
    return tl.max(tl.where(mask & ~(tl.abs(values) < INF), 1, 0), axis=0)


@triton.jit
def report_nonfinite(flags_ptr, d_main, d_guide, stored, mask, HAS_GUIDE: tl.constexpr):
    """ORs the flag bits into flags_ptr[0] (1: d_main, 2: d_guide, 4: x_next as stored): one
    atomic per program, and none when every value is finite."""
    bits = any_nonfinite(d_main, mask) | (any_nonfinite(stored, mask) << 2)
    if HAS_GUIDE:
        bits = bits | (any_nonfinite(d_guide, mask) << 1)
    tl.atomic_or(flags_ptr, bits, mask=bits != 0, sem="relaxed")


def flags_arg(flags, placeholder):
    """The flags pointer argument: a placeholder tensor (never touched) when there are no flags."""
    return placeholder if flags is None else flags


def contiguous(tensors):
    return [t if t is None else t.contiguous() for t in tensors]


def _overlaps(a, b):
    """For contiguous a and b: whether their memory ranges intersect."""
    a_end = a.data_ptr() + a.numel() * a.element_size()
    b_end = b.data_ptr() + b.numel() * b.element_size()
    return a.data_ptr() < b_end and b.data_ptr() < a_end


def target_for(out, inputs):
    """Where a kernel writes: `out` when contiguous and exactly one input or disjoint from all,
    else a fresh buffer (copied into out by finish)."""
    direct = out.is_contiguous() and all(
        t is None or t.data_ptr() == out.data_ptr() or not _overlaps(out, t) for t in inputs)
    return out if direct else torch.empty_like(out, memory_format=torch.contiguous_format)


def finish(target, out):
    if target is not out:
        out.copy_(target)
    return out


def grid(n):
    return (triton.cdiv(n, BLOCK),)

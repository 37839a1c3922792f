"""What both Triton ops share: launch sizes, scalar packing, contiguous inputs and safe outputs."""
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

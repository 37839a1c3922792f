"""Triton rule ops (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1): rule_moments and
rule_apply with the signatures and semantics of fastguide._rules_ops (see there).

Moments: one program per (block of MOMENT_BLOCK elements of a sample, sample); a block is summed
in the math type by tl.sum (a fixed tree), its five sums stored in float64, and a second kernel
adds each sample's block sums in chunks of a fixed size: no atomics, so the bits of a sample do not
depend on the batch around it.  Apply: one program per (block, sample), coefficients per sample.
"""
import os

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
MOMENT_BLOCK = 1024
SUM_CHUNK = 1024
APPLY_BLOCK = 65536 if INTERPRETED else 2048   # the interpreter pays per program
NUM_WARPS = 8


@triton.jit
def _load(ptr, offsets, mask, F64: tl.constexpr):
    return tl.load(ptr + offsets, mask=mask, other=0).to(tl.float64 if F64 else tl.float32)


@triton.jit
def _moments_kernel(x_ptr, d1_ptr, d0_ptr, m_ptr, c_ptr, part_ptr, n, blocks,
                    HAS_X: tl.constexpr, HAS_D0: tl.constexpr, HAS_M: tl.constexpr, F64: tl.constexpr,
                    BLOCK: tl.constexpr):
    block = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    index = block * BLOCK + tl.arange(0, BLOCK)
    mask = index < n
    offsets = b * n + index
    c = c_ptr + b * 8
    d1 = _load(d1_ptr, offsets, mask, F64)
    e1 = tl.load(c + 1) * d1
    e2 = tl.load(c + 5) * d1
    if HAS_X:
        x = _load(x_ptr, offsets, mask, F64)
        e1 += tl.load(c + 0) * x
        e2 += tl.load(c + 4) * x
    if HAS_D0:
        delta = d1 - _load(d0_ptr, offsets, mask, F64)
        e1 += tl.load(c + 2) * delta
        e2 += tl.load(c + 6) * delta
    if HAS_M:
        m = _load(m_ptr, offsets, mask, F64)
        e1 += tl.load(c + 3) * m
        e2 += tl.load(c + 7) * m
    out = part_ptr + (b * blocks + block) * 5
    tl.store(out + 0, tl.sum(e1, axis=0).to(tl.float64))
    tl.store(out + 1, tl.sum(e2, axis=0).to(tl.float64))
    tl.store(out + 2, tl.sum(e1 * e1, axis=0).to(tl.float64))
    tl.store(out + 3, tl.sum(e1 * e2, axis=0).to(tl.float64))
    tl.store(out + 4, tl.sum(e2 * e2, axis=0).to(tl.float64))


@triton.jit
def _sum_blocks_kernel(part_ptr, sums_ptr, blocks, CHUNK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    for k in tl.static_range(5):
        acc = tl.zeros([CHUNK], dtype=tl.float64)
        for start in range(0, blocks, CHUNK):
            index = start + tl.arange(0, CHUNK)
            acc += tl.load(part_ptr + (b * blocks + index) * 5 + k, mask=index < blocks, other=0.0)
        tl.store(sums_ptr + b * 5 + k, tl.sum(acc, axis=0))


@triton.jit
def _combine(c, x, d1, delta, m, e, noise, HAS_D0: tl.constexpr, HAS_M: tl.constexpr, HAS_E: tl.constexpr,
             HAS_NOISE: tl.constexpr):
    acc = tl.load(c + 0) * x + tl.load(c + 1) * d1
    if HAS_D0:
        acc += tl.load(c + 2) * delta
    if HAS_M:
        acc += tl.load(c + 3) * m
    if HAS_E:
        acc += tl.load(c + 4) * e
    if HAS_NOISE:
        acc += tl.load(c + 5) * noise
    return acc


@triton.jit
def _apply_kernel(x_ptr, d1_ptr, d0_ptr, m_ptr, e_ptr, noise_ptr, c_ptr, out_ptr, out2_ptr, m_out_ptr, flags_ptr, n,
                  HAS_D0: tl.constexpr, HAS_M: tl.constexpr, HAS_E: tl.constexpr, HAS_NOISE: tl.constexpr,
                  HAS_OUT2: tl.constexpr, HAS_M_OUT: tl.constexpr, HAS_FLAGS: tl.constexpr, F64: tl.constexpr,
                  BLOCK: tl.constexpr):
    block = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    index = block * BLOCK + tl.arange(0, BLOCK)
    mask = index < n
    offsets = b * n + index
    x = _load(x_ptr, offsets, mask, F64)
    d1 = _load(d1_ptr, offsets, mask, F64)
    delta = d1
    m = d1
    e = d1
    noise = d1
    bits = tl.max(((d1 - d1) != 0).to(tl.int32), axis=0)
    if HAS_D0:
        d0 = _load(d0_ptr, offsets, mask, F64)
        delta = d1 - d0
        bits = bits | (tl.max(((d0 - d0) != 0).to(tl.int32), axis=0) << 1)
    if HAS_M:
        m = _load(m_ptr, offsets, mask, F64)
    if HAS_E:
        e = _load(e_ptr, offsets, mask, F64)
    if HAS_NOISE:
        noise = _load(noise_ptr, offsets, mask, F64)
    c = c_ptr + b * 18
    out = _combine(c, x, d1, delta, m, e, noise, HAS_D0, HAS_M, HAS_E, HAS_NOISE)
    if HAS_OUT2:
        out2 = _combine(c + 6, x, d1, delta, m, e, noise, HAS_D0, HAS_M, HAS_E, HAS_NOISE)
        tl.store(out2_ptr + offsets, out2.to(out2_ptr.dtype.element_ty), mask=mask)
    if HAS_M_OUT:
        m_out = _combine(c + 12, x, d1, delta, m, e, noise, HAS_D0, HAS_M, HAS_E, HAS_NOISE)
        tl.store(m_out_ptr + offsets, m_out.to(m_out_ptr.dtype.element_ty), mask=mask)
    stored = out.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offsets, stored, mask=mask)
    if HAS_FLAGS:
        written = tl.where(mask, stored.to(tl.float64 if F64 else tl.float32), 0.0)
        bits = bits | (tl.max(((written - written) != 0).to(tl.int32), axis=0) << 2)
        tl.atomic_or(flags_ptr, bits)


def _contiguous(t):
    return None if t is None else t.contiguous()


def rule_moments(x, d1, d0, m, coefs):
    batch = d1.shape[0]
    n = d1.numel() // batch
    sums = torch.zeros(batch, 5, dtype=torch.float64, device=d1.device)
    if n == 0:
        return sums
    x, d1, d0, m, coefs = (_contiguous(t) for t in (x, d1, d0, m, coefs))
    blocks = triton.cdiv(n, MOMENT_BLOCK)
    partial = torch.empty(batch, blocks, 5, dtype=torch.float64, device=d1.device)
    _moments_kernel[(blocks, batch)](
        d1 if x is None else x, d1, d1 if d0 is None else d0, d1 if m is None else m, coefs, partial, n, blocks,
        HAS_X=x is not None, HAS_D0=d0 is not None, HAS_M=m is not None, F64=d1.dtype == torch.float64,
        BLOCK=MOMENT_BLOCK, num_warps=4)
    _sum_blocks_kernel[(batch,)](partial, sums, blocks, CHUNK=SUM_CHUNK, num_warps=4)
    return sums


def rule_apply(x, d1, d0, m, e, noise, coefs, *, out, out2=None, m_out=None, flags=None):
    batch = x.shape[0]
    n = x.numel() // batch
    if n == 0:
        return out
    for name, t in (("out", out), ("out2", out2), ("m_out", m_out)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"rule_apply: {name} must be contiguous")
    x, d1, d0, m, e, noise, coefs = (_contiguous(t) for t in (x, d1, d0, m, e, noise, coefs))
    _apply_kernel[(triton.cdiv(n, APPLY_BLOCK), batch)](
        x, d1, d1 if d0 is None else d0, d1 if m is None else m, d1 if e is None else e,
        d1 if noise is None else noise, coefs, out, out if out2 is None else out2, out if m_out is None else m_out,
        flags if flags is not None else torch.zeros(1, dtype=torch.int32, device=x.device), n,
        HAS_D0=d0 is not None, HAS_M=m is not None, HAS_E=e is not None, HAS_NOISE=noise is not None,
        HAS_OUT2=out2 is not None, HAS_M_OUT=m_out is not None, HAS_FLAGS=flags is not None,
        F64=x.dtype == torch.float64, BLOCK=APPLY_BLOCK, num_warps=NUM_WARPS)
    return out

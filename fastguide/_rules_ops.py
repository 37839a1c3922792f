"""The "reference" backend of the rule ops (plain PyTorch); the kernels (csrc/guided_rules.cpp,
csrc/cuda/guided_rules.cu, tritonkernels/guided_rules.py) implement the same two functions.

rule_moments(x, d1, d0, m, coefs) -> sums [B, 5] float64
    Per sample b, two streams e_j = c[b,j,0]·x + c[b,j,1]·d1 + c[b,j,2]·(d1 − d0) + c[b,j,3]·m
    (a term is left out where its tensor is None) and their sums over the sample's elements:
    (Σe1, Σe2, Σe1², Σe1·e2, Σe2²).  The kernels accumulate blocks of 1024 elements in float32
    (float64 for float64 tensors) and add the blocks' sums in float64 in a fixed order: the same
    bits for a sample whatever the batch and the thread count.

rule_apply(x, d1, d0, m, e, noise, coefs, *, out, out2=None, m_out=None, flags=None)
    Per sample b and output j (out, out2, m_out), over the inputs (x, d1, d1 − d0, m, e, noise):
    target_j = Σ_k c[b,j,k]·input_k (absent inputs left out), every output of an element computed
    before any is written (an output may be the very tensor of an input).  flags (int32 [1]) ORs
    1 where d1 is non-finite, 2 where d0 is, 4 where the written out is.
"""
import torch

from fastguide import reference


def _flat(t, batch, cdt):
    return None if t is None else t.reshape(batch, -1).to(cdt)


def _combination(c, inputs):
    total = None
    for k, t in enumerate(inputs):
        if t is None:
            continue
        term = c[:, k:k + 1] * t
        total = term if total is None else total + term
    return total


def rule_moments(x, d1, d0, m, coefs):
    batch = d1.shape[0]
    cdt = reference.compute_dtype(d1.dtype)
    xf, d1f, mf = _flat(x, batch, cdt), _flat(d1, batch, cdt), _flat(m, batch, cdt)
    delta = None if d0 is None else d1f - _flat(d0, batch, cdt)
    e1, e2 = (_combination(coefs[:, j].to(cdt), (xf, d1f, delta, mf)).double() for j in range(2))
    return torch.stack([e1.sum(1), e2.sum(1), (e1 * e1).sum(1), (e1 * e2).sum(1), (e2 * e2).sum(1)], dim=1)


def rule_apply(x, d1, d0, m, e, noise, coefs, *, out, out2=None, m_out=None, flags=None):
    batch = x.shape[0]
    cdt = reference.compute_dtype(x.dtype)
    d1f = _flat(d1, batch, cdt)
    delta = None if d0 is None else d1f - _flat(d0, batch, cdt)
    inputs = (_flat(x, batch, cdt), d1f, delta, _flat(m, batch, cdt), _flat(e, batch, cdt), _flat(noise, batch, cdt))
    coefs = coefs.to(cdt)
    results = [(target, _combination(coefs[:, j], inputs)) for j, target in enumerate((out, out2, m_out))
               if target is not None]
    for target, value in results:
        target.copy_(value.reshape(target.shape))
    reference.or_nonfinite_flags(flags, d1, d0, out)
    return out

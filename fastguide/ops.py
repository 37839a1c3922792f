"""The fused guidance + solver ops, with one validation and one dispatch point.

guided_euler(x, d_main, d_guide, guidance, t_cur, t_next) -> (x_next, deriv)
    D = d_guide + w·(d_main − d_guide)  (d_main when d_guide is None)
    deriv = (x − D)/t_cur,  x_next = x + (t_next − t_cur)·deriv
guided_heun(x, deriv, d_main, d_guide, guidance, t_cur, t_next) -> x_next
    x_euler = x + (t_next − t_cur)·deriv,  D' from the predictions at t_next,
    deriv' = (x_euler − D')/t_next,  x_next = x + (t_next − t_cur)·(deriv + deriv')/2
"""
import math
import numbers

import torch

from fastguide import dispatch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_real(name, value, *, minimum=None, strict=True, finite=True):
    """value as a float: a real Python number, finite (unless finite=False: ±inf allowed, NaN never),
    and > minimum (>= when strict=False); otherwise an error naming `name`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or (finite and math.isinf(value)):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value}")
    return value


def _check_tensors(x, **others):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x must have a dtype in {SUPPORTED_DTYPES}, got {x.dtype}")
    for name, t in others.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype}, expected x's dtype {x.dtype}")
        if t.shape != x.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected x's shape {tuple(x.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, expected x's device {x.device}")


def _output(name, out, x):
    if out is None:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    _check_tensors(x, **{name: out})
    return out


def guided_euler(x, d_main, d_guide, guidance, t_cur, t_next, *, out=None, deriv_out=None, backend="auto"):
    """Guidance + Euler step in one pass; returns (x_next, deriv).  See the module docstring."""
    _check_tensors(x, d_main=d_main, d_guide=d_guide)
    guidance = check_real("guidance", guidance)
    t_cur = check_real("t_cur", t_cur, minimum=0)
    t_next = check_real("t_next", t_next)
    out, deriv_out = _output("out", out, x), _output("deriv_out", deriv_out, x)
    impl = dispatch.implementation(dispatch.resolve(backend, x.device))
    return impl.guided_euler(x, d_main, d_guide, guidance, t_cur, t_next, out=out, deriv_out=deriv_out)


def guided_heun(x, deriv, d_main, d_guide, guidance, t_cur, t_next, *, out=None, backend="auto"):
    """Guidance + Heun correction in one pass; returns x_next.  See the module docstring."""
    _check_tensors(x, deriv=deriv, d_main=d_main, d_guide=d_guide)
    guidance = check_real("guidance", guidance)
    t_cur = check_real("t_cur", t_cur, minimum=0)
    t_next = check_real("t_next", t_next, minimum=0)
    out = _output("out", out, x)
    impl = dispatch.implementation(dispatch.resolve(backend, x.device))
    return impl.guided_heun(x, deriv, d_main, d_guide, guidance, t_cur, t_next, out=out)

"""The fused guidance + solver ops, with one validation and one dispatch point.

Each op computes D = d_guide + w·(d_main − d_guide) (d_main when d_guide is None) and a solver
update in one pass over memory (the math is fastguide.reference's):

guided_euler(x, d_main, d_guide, guidance, t_cur, t_next, *, noise=None, noise_scale=0) -> (x_next, deriv)
    deriv = (x − D)/t_cur,  x_next = x + (t_next − t_cur)·deriv [+ noise_scale·noise]
    (with noise: the ancestral step, t_next = σ_down, noise_scale = σ_up·S_noise)
guided_heun(x, deriv, d_main, d_guide, guidance, t_cur, t_next) -> x_next
    x_euler = x + (t_next − t_cur)·deriv,  D' from the predictions at t_next,
    deriv' = (x_euler − D')/t_next,  x_next = x + (t_next − t_cur)·(deriv + deriv')/2
guided_dpmpp_2m(x, d_main, d_guide, denoised_prev, guidance, x_coef, d_coef, prev_coef) -> (x_next, D)
    x_next = x_coef·x + d_coef·D + prev_coef·D_prev  (D_prev unread when prev_coef == 0),
    coefficients from reference.dpmpp_2m_coefficients; D is the next step's D_prev.

flags=: an int32 tensor of one element on x's device (a view into a bigger buffer is fine).  The
ops OR bits into it on the device, without a host sync: 1 if d_main has a NaN or inf, 2 if
d_guide has one, 4 if the written x_next has one (in its stored dtype: float16 overflow counts).
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


def _check_like(name, t, x):
    """t is a tensor with x's dtype, shape and device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {t.dtype}, expected x's dtype {x.dtype}")
    if t.shape != x.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected x's shape {tuple(x.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device}, expected x's device {x.device}")


def _check_tensors(x, required, optional=None):
    """x a tensor of a supported dtype; each of required {name: tensor} like x, and each of
    optional {name: tensor or None} like x when given."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x must have a dtype in {SUPPORTED_DTYPES}, got {x.dtype}")
    for name, t in required.items():
        _check_like(name, t, x)
    for name, t in (optional or {}).items():
        if t is not None:
            _check_like(name, t, x)


def _check_flags(flags, x):
    if flags is None:
        return
    if not isinstance(flags, torch.Tensor):
        raise TypeError(f"flags must be a tensor, got {type(flags).__name__}")
    if flags.dtype != torch.int32:
        raise TypeError(f"flags must be int32, got {flags.dtype}")
    if flags.numel() != 1:
        raise ValueError(f"flags must have one element, got {flags.numel()}")
    if flags.device != x.device:
        raise ValueError(f"flags is on {flags.device}, expected x's device {x.device}")


def _output(name, out, x):
    if out is None:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    _check_like(name, out, x)
    return out


def _implementation(backend, x):
    return dispatch.implementation(dispatch.resolve(backend, x.device))


def guided_euler(x, d_main, d_guide, guidance, t_cur, t_next, *, out=None, deriv_out=None, noise=None,
                 noise_scale=0.0, flags=None, backend="auto"):
    """Guidance + Euler (or, with noise, ancestral) step in one pass; returns (x_next, deriv).
    See the module docstring."""
    _check_tensors(x, {"d_main": d_main}, {"d_guide": d_guide, "noise": noise})
    guidance = check_real("guidance", guidance)
    t_cur = check_real("t_cur", t_cur, minimum=0)
    t_next = check_real("t_next", t_next)
    noise_scale = check_real("noise_scale", noise_scale)
    _check_flags(flags, x)
    out, deriv_out = _output("out", out, x), _output("deriv_out", deriv_out, x)
    return _implementation(backend, x).guided_euler(x, d_main, d_guide, guidance, t_cur, t_next, out=out,
                                                    deriv_out=deriv_out, noise=noise, noise_scale=noise_scale,
                                                    flags=flags)


def guided_heun(x, deriv, d_main, d_guide, guidance, t_cur, t_next, *, out=None, flags=None, backend="auto"):
    """Guidance + Heun correction in one pass; returns x_next.  See the module docstring."""
    _check_tensors(x, {"deriv": deriv, "d_main": d_main}, {"d_guide": d_guide})
    guidance = check_real("guidance", guidance)
    t_cur = check_real("t_cur", t_cur, minimum=0)
    t_next = check_real("t_next", t_next, minimum=0)
    _check_flags(flags, x)
    out = _output("out", out, x)
    return _implementation(backend, x).guided_heun(x, deriv, d_main, d_guide, guidance, t_cur, t_next, out=out,
                                                   flags=flags)


def guided_dpmpp_2m(x, d_main, d_guide, denoised_prev, guidance, x_coef, d_coef, prev_coef, *, out=None,
                    denoised_out=None, flags=None, backend="auto"):
    """Guidance + DPM-Solver++(2M) step in one pass; returns (x_next, D).  denoised_out may be
    denoised_prev itself (one history buffer).  See the module docstring."""
    _check_tensors(x, {"d_main": d_main}, {"d_guide": d_guide, "denoised_prev": denoised_prev})
    guidance = check_real("guidance", guidance)
    x_coef, d_coef = check_real("x_coef", x_coef), check_real("d_coef", d_coef)
    prev_coef = check_real("prev_coef", prev_coef)
    if prev_coef != 0 and denoised_prev is None:
        raise ValueError(f"denoised_prev must be a tensor when prev_coef != 0 (got None, prev_coef {prev_coef})")
    _check_flags(flags, x)
    out, denoised_out = _output("out", out, x), _output("denoised_out", denoised_out, x)
    return _implementation(backend, x).guided_dpmpp_2m(x, d_main, d_guide, denoised_prev, guidance, x_coef, d_coef,
                                                       prev_coef, out=out, denoised_out=denoised_out, flags=flags)

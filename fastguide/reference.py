"""The reference math of fastguide, in plain PyTorch.

Everything the sampler computes lives here once: the σ schedule, the guidance combination and
the fused Euler/Heun updates.  The fallback backend runs these functions, and the tests compare
every kernel against them (in float64).  Math runs in float32, or float64 for float64 tensors.
"""
import math

import torch


def compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def edm_sigmas(num_steps, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """EDM's schedule: num_steps noise levels from sigma_max down to sigma_min, then 0 (float64, CPU)."""
    i = torch.arange(num_steps, dtype=torch.float64)
    ramp = i / max(num_steps - 1, 1)
    inv_rho = 1.0 / rho
    sigmas = (sigma_max ** inv_rho + ramp * (sigma_min ** inv_rho - sigma_max ** inv_rho)) ** rho
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


def churn_gamma(t_cur, num_steps, S_churn, S_min, S_max):
    """EDM's stochastic churn factor γ for the step that starts at t_cur."""
    if S_churn > 0 and S_min <= t_cur <= S_max:
        return min(S_churn / num_steps, math.sqrt(2.0) - 1.0)
    return 0.0


def in_interval(sigma, guidance_interval):
    """Whether guidance applies at noise level sigma: sigma_lo < sigma <= sigma_hi."""
    if guidance_interval is None:
        return True
    sigma_lo, sigma_hi = guidance_interval
    return sigma_lo < sigma <= sigma_hi


def guide(d_main, d_guide, guidance):
    """D = D0 + w·(D1 − D0), or D1 alone when there is no guide prediction."""
    if d_guide is None:
        return d_main
    return d_guide + guidance * (d_main - d_guide)


def _write(result, out):
    if out is None:
        return result
    out.copy_(result)
    return out


def guided_euler(x, d_main, d_guide, guidance, t_cur, t_next, *, out=None, deriv_out=None):
    """Euler step: deriv = (x − D)/t_cur, x_next = x + (t_next − t_cur)·deriv.  Returns (x_next, deriv)."""
    cdt = compute_dtype(x.dtype)
    denoised = guide(d_main.to(cdt), None if d_guide is None else d_guide.to(cdt), guidance)
    deriv = (x.to(cdt) - denoised) / t_cur
    x_next = x.to(cdt) + (t_next - t_cur) * deriv
    return _write(x_next.to(x.dtype), out), _write(deriv.to(x.dtype), deriv_out)


def guided_heun(x, deriv, d_main, d_guide, guidance, t_cur, t_next, *, out=None):
    """Heun correction at t_next of the Euler step (x, deriv) taken from t_cur.  Returns x_next."""
    cdt = compute_dtype(x.dtype)
    x_c, deriv_c = x.to(cdt), deriv.to(cdt)
    x_euler = x_c + (t_next - t_cur) * deriv_c
    denoised = guide(d_main.to(cdt), None if d_guide is None else d_guide.to(cdt), guidance)
    deriv_next = (x_euler - denoised) / t_next
    x_next = x_c + (t_next - t_cur) * (0.5 * deriv_c + 0.5 * deriv_next)
    return _write(x_next.to(x.dtype), out)

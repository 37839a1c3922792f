"""The reference math of fastguide, in plain PyTorch.

Everything the sampler computes lives here once: the σ schedule, the guidance combination and
the fused solver epilogues (Euler, ancestral, Heun, DPM-Solver++(2M)).  The fallback backend runs these functions, and the tests compare
every kernel against them (in float64).  Math runs in float32, or float64 for float64 tensors.
"""
import math

import torch


def compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# EDM's defaults (Karras et al. 2022; EDM2's edm_sampler), in one place.
EDM_DEFAULTS = dict(num_steps=32, sigma_min=0.002, sigma_max=80.0, rho=7.0)


def edm_sigmas(num_steps, sigma_min=EDM_DEFAULTS["sigma_min"], sigma_max=EDM_DEFAULTS["sigma_max"],
               rho=EDM_DEFAULTS["rho"]):
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


def nonfinite_bits(d_main, d_guide, written):
    """The epilogues' non-finite flag bits as an int32 0-d tensor (no host read):
    1: d_main has a NaN or inf, 2: d_guide has one, 4: the written x_next has one."""
    bits = (~torch.isfinite(d_main)).any().to(torch.int32)
    if d_guide is not None:
        bits = bits | ((~torch.isfinite(d_guide)).any().to(torch.int32) << 1)
    return bits | ((~torch.isfinite(written)).any().to(torch.int32) << 2)


def or_nonfinite_flags(flags, d_main, d_guide, written):
    """ORs nonfinite_bits into the int32 flags tensor (on the device), when there is one."""
    if flags is not None:
        flags.bitwise_or_(nonfinite_bits(d_main, d_guide, written).reshape(flags.shape))


def guided_euler(x, d_main, d_guide, guidance, t_cur, t_next, *, out=None, deriv_out=None, noise=None,
                 noise_scale=0.0, flags=None):
    """Euler step: deriv = (x − D)/t_cur, x_next = x + (t_next − t_cur)·deriv [+ noise_scale·noise].
    Returns (x_next, deriv).  With noise it is the ancestral step (t_next = σ_down, noise_scale = σ_up·S_noise)."""
    cdt = compute_dtype(x.dtype)
    denoised = guide(d_main.to(cdt), None if d_guide is None else d_guide.to(cdt), guidance)
    deriv = (x.to(cdt) - denoised) / t_cur
    x_next = x.to(cdt) + (t_next - t_cur) * deriv
    if noise is not None:
        x_next = x_next + noise_scale * noise.to(cdt)
    x_next = _write(x_next.to(x.dtype), out)
    or_nonfinite_flags(flags, d_main, d_guide, x_next)
    return x_next, _write(deriv.to(x.dtype), deriv_out)


def guided_heun(x, deriv, d_main, d_guide, guidance, t_cur, t_next, *, out=None, flags=None):
    """Heun correction at t_next of the Euler step (x, deriv) taken from t_cur.  Returns x_next."""
    cdt = compute_dtype(x.dtype)
    x_c, deriv_c = x.to(cdt), deriv.to(cdt)
    x_euler = x_c + (t_next - t_cur) * deriv_c
    denoised = guide(d_main.to(cdt), None if d_guide is None else d_guide.to(cdt), guidance)
    deriv_next = (x_euler - denoised) / t_next
    x_next = _write((x_c + (t_next - t_cur) * (0.5 * deriv_c + 0.5 * deriv_next)).to(x.dtype), out)
    or_nonfinite_flags(flags, d_main, d_guide, x_next)
    return x_next


def guided_dpmpp_2m(x, d_main, d_guide, denoised_prev, guidance, x_coef, d_coef, prev_coef, *, out=None,
                    denoised_out=None, flags=None):
    """DPM-Solver++(2M) update: x_next = x_coef·x + d_coef·D + prev_coef·D_prev, and D written to
    denoised_out (the next step's D_prev).  D_prev is not read when prev_coef == 0 (first-order
    steps; it may be None then).  Coefficients: dpmpp_2m_coefficients.  Returns (x_next, D)."""
    cdt = compute_dtype(x.dtype)
    denoised = guide(d_main.to(cdt), None if d_guide is None else d_guide.to(cdt), guidance)
    x_next = x_coef * x.to(cdt) + d_coef * denoised
    if prev_coef != 0:
        x_next = x_next + prev_coef * denoised_prev.to(cdt)
    x_next = _write(x_next.to(x.dtype), out)
    or_nonfinite_flags(flags, d_main, d_guide, x_next)
    return x_next, _write(denoised.to(x.dtype), denoised_out)


def dpmpp_2m_coefficients(sigma_prev, sigma, sigma_next, signal_scale=None):
    """(x_coef, d_coef, prev_coef) of DPM-Solver++(2M) (Lu et al. 2022) for x_σ = α(σ)·x0 + σ·ε.

    α = signal_scale(σ), 1 when None (EDM's and k-diffusion's x = x0 + σ·ε, where this is
    k-diffusion's sample_dpmpp_2m); a flow-matching model sampled in t has α = 1 − t.  With
    λ = log(α/σ), h = λ_next − λ: x_next = (σ_next/σ)·x + α_next·(1 − e^−h)·D̂, where D̂ = D on the
    first step (sigma_prev None) and on a step to σ = 0, else D̂ = (1 + 1/2r)·D − (1/2r)·D_prev
    with r = h_last / h."""
    if sigma_next == 0:
        return 0.0, 1.0, 0.0
    alpha = signal_scale or (lambda _: 1.0)
    lam, lam_next = _log_snr(alpha(sigma), sigma), _log_snr(alpha(sigma_next), sigma_next)
    h = lam_next - lam
    x_coef = sigma_next / sigma
    d_scale = alpha(sigma_next) * -math.expm1(-h)   # α_next·(1 − e^−h), accurate for small h
    if sigma_prev is None or math.isinf(h) or h == 0:
        return x_coef, d_scale, 0.0
    lam_prev = _log_snr(alpha(sigma_prev), sigma_prev)
    if math.isinf(lam_prev) or lam_prev == lam:       # r = ∞ or r = 0: first order
        return x_coef, d_scale, 0.0
    r = (lam - lam_prev) / h
    return x_coef, d_scale * (1 + 1 / (2 * r)), -d_scale / (2 * r)


def _log_snr(alpha, sigma):
    """λ = log(α/σ); −∞ where α = 0 (a flow's pure-noise end, t = 1)."""
    return math.log(alpha / sigma) if alpha > 0 else -math.inf


def ancestral_step(sigma, sigma_next, eta=1.0):
    """k-diffusion's get_ancestral_step: (σ_down, σ_up) with σ_down² + σ_up² = σ_next²."""
    if not eta:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5)
    return (sigma_next ** 2 - sigma_up ** 2) ** 0.5, sigma_up

"""Drop-ins for k-diffusion's sample_euler, sample_heun, sample_dpmpp_2m and sample_euler_ancestral,
on fastguide's sampler core.

Same signatures, call convention (model(x, sigma * s_in, **extra_args) with s_in = x.new_ones([B])),
churn, callback dict and progress bar as k_diffusion.sampling.  When `model` is a GuidedDenoiser its
two predictions go to the fused epilogue separately, so the guidance combination costs no extra
pass, and its guidance rule (fastguide.rules) and per-sample weights apply fused with the update;
any other model's D goes in alone.  The input x is not modified; the callback gets copies,
as k-diffusion's callbacks may keep them.
"""

import torch

from fastguide import dispatch, ops
from fastguide.guidance import GuidedDenoiser, check_x
from fastguide.sampler import check_callable, check_sigmas, run_plan_on_core

LABEL_KEYS = ("labels", "class_labels", "cond")


def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                 s_tmax=float('inf'), s_noise=1.):
    """Euler steps over sigmas (Algorithm 2 of Karras et al. 2022 with Euler only), as k-diffusion's."""
    churn = _check_churn(s_churn, s_tmin, s_tmax, s_noise)
    return _sample(model, x, sigmas, extra_args, callback, disable, "euler", churn)


def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                s_tmax=float('inf'), s_noise=1.):
    """Heun steps over sigmas (Algorithm 2 of Karras et al. 2022), an Euler step where sigma_next == 0."""
    churn = _check_churn(s_churn, s_tmin, s_tmax, s_noise)
    return _sample(model, x, sigmas, extra_args, callback, disable, "heun", churn)


def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver++(2M) over sigmas, as k-diffusion's (one evaluation per step)."""
    return _sample(model, x, sigmas, extra_args, callback, disable, "dpmpp_2m", {})


def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                           noise_sampler=None):
    """Ancestral Euler steps over sigmas, as k-diffusion's: noise from noise_sampler(sigma, sigma_next)
    (default: torch.randn_like) where sigma_next > 0, scaled by s_noise·σ_up."""
    options = dict(eta=eta, S_noise=ops.check_real("s_noise", s_noise))
    check_callable("noise_sampler", noise_sampler)
    randn = None if noise_sampler is None else lambda x_, step: noise_sampler(step.sigma, step.sigma_next)
    return _sample(model, x, sigmas, extra_args, callback, disable, "euler_ancestral", options, randn)


def _check_churn(s_churn, s_tmin, s_tmax, s_noise):
    return dict(S_churn=ops.check_real("s_churn", s_churn, minimum=0.0, strict=False),
                S_min=ops.check_real("s_tmin", s_tmin, finite=False),
                S_max=ops.check_real("s_tmax", s_tmax, finite=False), S_noise=ops.check_real("s_noise", s_noise))


@torch.no_grad()  # as k-diffusion's samplers; a model that needs autograd enables it itself
def _sample(model, x, sigmas, extra_args, callback, disable, solver, options, randn=None):
    if not callable(model):
        raise TypeError(f"model must be callable, got {type(model).__name__}")
    check_x(x)
    t_steps = check_sigmas(sigmas, end_in_zero=False)
    if extra_args is not None and not isinstance(extra_args, dict):
        raise TypeError(f"extra_args must be a dict or None, got {type(extra_args).__name__}")
    check_callable("callback", callback)
    denoiser, labels = _guided_denoiser(model, x, extra_args or {})
    backend = dispatch.resolve("auto", x.device)
    x_start = x.clone(memory_format=torch.contiguous_format)
    randn = randn or (lambda x_, step: torch.randn_like(x_))
    from tqdm.auto import tqdm
    with tqdm(total=len(t_steps) - 1, disable=disable) as bar:
        def on_step(info):
            if callback is not None:
                callback({'x': info["x_hat"].clone(), 'i': info["i"], 'sigma': sigmas[info["i"]],
                          'sigma_hat': sigmas.new_tensor(info["sigma_hat"]), 'denoised': info["denoised"].clone()})
            bar.update(1)
        return run_plan_on_core(denoiser, x_start, labels, t_steps, solver, backend, randn=randn, callback=on_step,
                                **options)[0]


def _guided_denoiser(model, x, extra_args):
    """(GuidedDenoiser, labels): the model itself with its labels from extra_args, or a plain
    k-diffusion model (called as model(x, sigma, **extra_args)) as an unguided one."""
    if isinstance(model, GuidedDenoiser):
        labels = _guided_labels(extra_args)
        model.check_labels(labels, x.shape[0])
        return model, labels

    def plain(x_in, sigma, labels):
        return model(x_in, sigma, **extra_args)
    denoiser = GuidedDenoiser(plain)
    denoiser.evaluator.net_name = "model"
    if hasattr(model, "signal_scale"):
        plain.signal_scale = model.signal_scale
    return denoiser, None


def _guided_labels(extra_args):
    """The labels a GuidedDenoiser takes from k-diffusion's extra_args (labels, class_labels or cond)."""
    unknown = sorted(set(extra_args) - set(LABEL_KEYS))
    if unknown:
        raise TypeError(f"extra_args for a GuidedDenoiser may hold only one of {LABEL_KEYS}, got {unknown}")
    given = [extra_args[key] for key in LABEL_KEYS if key in extra_args]
    if len(given) > 1:
        raise TypeError(f"extra_args must hold at most one of {LABEL_KEYS}, got {sorted(extra_args)}")
    return given[0] if given else None

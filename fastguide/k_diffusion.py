"""Drop-ins for k-diffusion's sample_euler and sample_heun, running on fastguide's fused ops.

Same signature, call convention (model(x, sigma * s_in, **extra_args) with s_in = x.new_ones([B])),
churn, callback dict and progress bar as k_diffusion.sampling.  When `model` is a GuidedDenoiser its
two predictions go to the fused ops separately, so the guidance combination costs no extra pass;
any other model's D goes in alone.  The input x is not modified; the callback gets copies, as
k-diffusion's callbacks may keep them.
"""
import math

import torch

from fastguide import ops, reference
from fastguide.guidance import GuidedDenoiser, check_output

LABEL_KEYS = ("labels", "class_labels", "cond")


def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                 s_tmax=float('inf'), s_noise=1.):
    """Euler steps over sigmas (Algorithm 2 of Karras et al. 2022 with Euler only), as k-diffusion's."""
    return _sample(model, x, sigmas, extra_args, callback, disable, s_churn, s_tmin, s_tmax, s_noise, heun=False)


def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                s_tmax=float('inf'), s_noise=1.):
    """Heun steps over sigmas (Algorithm 2 of Karras et al. 2022), an Euler step where sigma_next == 0."""
    return _sample(model, x, sigmas, extra_args, callback, disable, s_churn, s_tmin, s_tmax, s_noise, heun=True)


def _check_inputs(model, x, sigmas, extra_args, callback):
    if not callable(model):
        raise TypeError(f"model must be callable, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor) or x.dtype not in ops.SUPPORTED_DTYPES or x.ndim < 1 or x.shape[0] < 1:
        raise TypeError(f"x must be a tensor [B, ...] with a dtype in {ops.SUPPORTED_DTYPES}, got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D tensor of at least 2 noise levels, got "
                         f"{tuple(sigmas.shape) if isinstance(sigmas, torch.Tensor) else type(sigmas).__name__}")
    values = sigmas.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(values).all()) or not bool((values[:-1] > 0).all()) or values[-1] < 0:
        raise ValueError("sigmas must be finite, > 0 except the last, and the last >= 0")
    if extra_args is not None and not isinstance(extra_args, dict):
        raise TypeError(f"extra_args must be a dict or None, got {type(extra_args).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
    return values.tolist()


@torch.no_grad()  # as k-diffusion's samplers; a model that needs autograd enables it itself
def _sample(model, x, sigmas, extra_args, callback, disable, s_churn, s_tmin, s_tmax, s_noise, heun):
    t_steps = _check_inputs(model, x, sigmas, extra_args, callback)
    s_churn = ops.check_real("s_churn", s_churn, minimum=0.0, strict=False)
    s_noise = ops.check_real("s_noise", s_noise)
    s_tmin = ops.check_real("s_tmin", s_tmin, finite=False)
    s_tmax = ops.check_real("s_tmax", s_tmax, finite=False)
    predict = _predictor(model, x, extra_args or {})
    num_steps = len(t_steps) - 1
    x_cur = x.clone(memory_format=torch.contiguous_format)
    x_next, deriv = torch.empty_like(x_cur), torch.empty_like(x_cur)
    from tqdm.auto import trange
    for i in trange(num_steps, disable=disable):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        gamma = reference.churn_gamma(t_cur, num_steps, s_churn, s_tmin, s_tmax)
        t_hat = t_cur * (gamma + 1)
        if gamma > 0:
            x_cur.add_(torch.randn_like(x_cur) * s_noise, alpha=math.sqrt(t_hat ** 2 - t_cur ** 2))
        d_main, d_guide, guidance = predict(x_cur, t_hat)
        if callback is not None:
            callback({'x': x_cur.clone(), 'i': i, 'sigma': sigmas[i], 'sigma_hat': sigmas.new_tensor(t_hat),
                      'denoised': reference.guide(d_main, d_guide, guidance)})
        ops.guided_euler(x_cur, d_main, d_guide, guidance, t_hat, t_next, out=x_next, deriv_out=deriv)
        if heun and t_next != 0:
            d_main, d_guide, guidance = predict(x_next, t_next)
            ops.guided_heun(x_cur, deriv, d_main, d_guide, guidance, t_hat, t_next, out=x_next)
        x_cur, x_next = x_next, x_cur
    return x_cur


def _predictor(model, x, extra_args):
    """predict(x, sigma) -> (d_main, d_guide, guidance) for the fused ops."""
    if isinstance(model, GuidedDenoiser):
        labels = _guided_labels(extra_args)

        def predict_guided(x_in, sigma):
            d_main, d_guide = model.predictions(x_in, sigma, labels)
            return d_main, d_guide, model.guidance
        return predict_guided

    s_in = x.new_ones([x.shape[0]])

    def predict(x_in, sigma):
        return check_output("model", model(x_in, sigma * s_in, **extra_args), x_in), None, 1.0
    return predict


def _guided_labels(extra_args):
    """The labels a GuidedDenoiser takes from k-diffusion's extra_args (labels, class_labels or cond)."""
    unknown = sorted(set(extra_args) - set(LABEL_KEYS))
    if unknown:
        raise TypeError(f"extra_args for a GuidedDenoiser may hold only one of {LABEL_KEYS}, got {unknown}")
    given = [extra_args[key] for key in LABEL_KEYS if key in extra_args]
    if len(given) > 1:
        raise TypeError(f"extra_args must hold at most one of {LABEL_KEYS}, got {sorted(extra_args)}")
    return given[0] if given else None

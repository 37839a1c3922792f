"""The guided EDM sampler (Karras et al. 2022) with guidance (CFG, autoguidance, interval).

Per step: optional churn t_cur -> t_hat, one guided evaluation at t_hat and the fused Euler
update; then (Heun, except on the last step) one guided evaluation at t_next and the fused
correction.  Two x buffers and one deriv buffer are allocated once and passed as out=.
"""
import math
import numbers

import torch

from fastguide import dispatch, ops, reference
from fastguide.guidance import DenoiserOutputError, GuidedDenoiser, check_labels

SOLVERS = ("euler", "heun")


def check_sigmas(sigmas):
    """A custom schedule: a finite, strictly decreasing 1-D tensor of noise levels ending in 0."""
    if not isinstance(sigmas, torch.Tensor):
        raise TypeError(f"sigmas must be a tensor, got {type(sigmas).__name__}")
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D tensor of at least 2 noise levels, got shape {tuple(sigmas.shape)}")
    values = sigmas.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(values).all()):
        raise ValueError("sigmas must be finite")
    if values[-1] != 0:
        raise ValueError(f"sigmas must end in 0, got {values[-1].item()}")
    if not bool((values[1:] < values[:-1]).all()):
        raise ValueError("sigmas must be strictly decreasing")
    return values


def schedule(num_steps, sigma_min, sigma_max, rho, sigmas=None):
    """The noise levels t_0 > ... > t_{N-1} > t_N = 0 as a list of floats, validated."""
    if sigmas is not None:
        return check_sigmas(sigmas).tolist()
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    sigma_min = ops.check_real("sigma_min", sigma_min, minimum=0.0)
    sigma_max = ops.check_real("sigma_max", sigma_max)
    if sigma_min >= sigma_max:
        raise ValueError(f"sigma_min must be < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    rho = ops.check_real("rho", rho, minimum=0.0)
    return reference.edm_sigmas(int(num_steps), sigma_min, sigma_max, rho).tolist()


def _check_noise(noise, dtype):
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
        raise TypeError(f"noise must be a floating-point tensor, got "
                        f"{noise.dtype if isinstance(noise, torch.Tensor) else type(noise).__name__}")
    if noise.ndim < 1 or noise.shape[0] < 1:
        raise ValueError(f"noise must have a batch dimension of at least 1, got shape {tuple(noise.shape)}")
    if dtype not in ops.SUPPORTED_DTYPES:
        raise TypeError(f"dtype must be one of {ops.SUPPORTED_DTYPES}, got {dtype}")


def sample(net, noise, *, labels=None, guide=None, guide_labels=None, guidance=1.0, guidance_interval=None,
           num_steps=32, sigma_min=0.002, sigma_max=80.0, rho=7.0, sigmas=None, solver="heun",
           S_churn=0.0, S_min=0.0, S_max=float("inf"), S_noise=1.0, randn_like=None,
           dtype=torch.float32, backend="auto", progress=False, callback=None, return_stats=False,
           strategy="auto", compile=False):
    """Draws samples from noise with the guided EDM sampler.

    net, guide: denoisers (x, sigma[B], labels) -> D(x).  guidance=w: D = D0 + w·(D1 − D0).
    guide_labels without guide: classifier-free guidance on one 2B batch of net.
    Returns x, or (x, stats) with evaluations per sample of net and guide when return_stats.
    strategy, compile: how net and guide are evaluated together (see GuidedDenoiser).
    The callback's x and denoised are the sampler's buffers: clone them to keep them.
    """
    denoiser = GuidedDenoiser(net, guide, guidance=guidance, guide_labels=guide_labels,
                              guidance_interval=guidance_interval, strategy=strategy, compile=compile)
    return run_sampler(denoiser, noise, labels=labels, num_steps=num_steps, sigma_min=sigma_min,
                       sigma_max=sigma_max, rho=rho, sigmas=sigmas, solver=solver, S_churn=S_churn,
                       S_min=S_min, S_max=S_max, S_noise=S_noise, randn_like=randn_like, dtype=dtype,
                       backend=backend, progress=progress, callback=callback, return_stats=return_stats)


def run_sampler(denoiser, noise, *, labels=None, num_steps=32, sigma_min=0.002, sigma_max=80.0, rho=7.0,
                sigmas=None, solver="heun", S_churn=0.0, S_min=0.0, S_max=float("inf"), S_noise=1.0,
                randn_like=None, dtype=torch.float32, backend="auto", progress=False, callback=None,
                return_stats=False):
    """The sampler loop over a GuidedDenoiser (validated before the first denoiser call)."""
    _check_noise(noise, dtype)
    batch = noise.shape[0]
    check_labels("labels", labels, batch)
    check_labels("guide_labels", denoiser.guide_labels, batch)
    if denoiser.guide is None and denoiser.guide_labels is not None and labels is None:
        raise ValueError("guide_labels (CFG with the same net) needs labels for the conditional half")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    t_steps = schedule(num_steps, sigma_min, sigma_max, rho, sigmas)
    num_steps = len(t_steps) - 1
    S_churn = ops.check_real("S_churn", S_churn, minimum=0.0, strict=False)
    S_noise = ops.check_real("S_noise", S_noise)
    S_min = ops.check_real("S_min", S_min, finite=False)
    S_max = ops.check_real("S_max", S_max, finite=False)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
    randn_like = torch.randn_like if randn_like is None else randn_like
    if not callable(randn_like):
        raise TypeError(f"randn_like must be callable, got {type(randn_like).__name__}")
    backend = dispatch.resolve(backend, noise.device)

    denoiser.reset_stats()
    check_finite, denoiser.check_finite = denoiser.check_finite, False  # checked once per step instead
    try:
        with torch.no_grad():  # a denoiser that needs autograd (e.g. an energy model) enables it itself
            x = _loop(denoiser, noise.to(dtype), labels, t_steps, solver, (S_churn, S_min, S_max, S_noise),
                      randn_like, dispatch.implementation(backend), progress, callback, check_finite)
    finally:
        denoiser.check_finite = check_finite
    if return_stats:
        return x, dict(denoiser.stats, steps=num_steps, solver=solver, backend=backend)
    return x


def _loop(denoiser, noise, labels, t_steps, solver, churn, randn_like, ops_impl, progress, callback, check_finite):
    """The steps themselves; inputs are validated, and every prediction's shape, dtype and device
    are checked by the denoiser, so the backend's ops are called directly into buffers allocated
    here once.  Finiteness is checked once per step on x (any non-finite prediction reaches it):
    one reduction and one device sync per step instead of one per prediction."""
    S_churn, S_min, S_max, S_noise = churn
    num_steps = len(t_steps) - 1
    guidance = denoiser.guidance
    x_cur = noise * t_steps[0]
    x_next = torch.empty_like(x_cur)
    deriv = torch.empty_like(x_cur)
    steps = range(num_steps)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="sampling", unit="step")
    for i in steps:
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        gamma = reference.churn_gamma(t_cur, num_steps, S_churn, S_min, S_max)
        t_hat = t_cur + gamma * t_cur
        if gamma > 0:
            x_cur.add_(randn_like(x_cur), alpha=math.sqrt(t_hat ** 2 - t_cur ** 2) * S_noise)
        predictions = [("Euler", t_hat, *_predict(denoiser, "Euler", i, x_cur, t_hat, labels))]
        ops_impl.guided_euler(x_cur, *predictions[0][2:], guidance, t_hat, t_next, out=x_next, deriv_out=deriv)
        if solver == "heun" and i < num_steps - 1:
            predictions.append(("Heun", t_next, *_predict(denoiser, "Heun", i, x_next, t_next, labels)))
            ops_impl.guided_heun(x_cur, deriv, *predictions[1][2:], guidance, t_hat, t_next, out=x_next)
        if check_finite and not bool(torch.isfinite(x_next).all()):
            _raise_non_finite(i, predictions, "guide" if denoiser.guide is not None else "net (guide_labels)")
        if callback is not None:
            callback(dict(i=i, sigma=t_cur, sigma_hat=t_hat, sigma_next=t_next, x=x_next,
                          denoised=x_cur - t_hat * deriv))
        x_cur, x_next = x_next, x_cur
    return x_cur


def _raise_non_finite(i, predictions, guide_name):
    """Names the prediction that made x non-finite at step i (or the step itself, if none did)."""
    for stage, sigma, d_main, d_guide in predictions:
        for name, prediction in (("net", d_main), (guide_name, d_guide)):
            if prediction is not None and not bool(torch.isfinite(prediction).all()):
                raise DenoiserOutputError(f"step {i} ({stage} evaluation at sigma={sigma:.6g}): "
                                          f"{name} returned non-finite values (NaN or inf)")
    raise FloatingPointError(f"step {i}: x became non-finite (NaN or inf) from finite predictions; "
                             "the values overflow the sampling dtype")


def _predict(denoiser, stage, i, x, sigma, labels):
    try:
        return denoiser.predictions(x, sigma, labels)
    except DenoiserOutputError as exc:
        raise DenoiserOutputError(f"step {i} ({stage} evaluation at sigma={sigma:.6g}): {exc}") from None


def edm_sampler(net, noise, labels=None, gnet=None, num_steps=32, sigma_min=0.002, sigma_max=80, rho=7,
                guidance=1, S_churn=0, S_min=0, S_max=float("inf"), S_noise=1, dtype=torch.float32,
                randn_like=torch.randn_like):
    """Drop-in for EDM2's edm_sampler (same signature, defaults and results), on fastguide's fused ops.

    Like EDM2, the networks' outputs are cast to dtype, and gnet is evaluated with the same labels."""
    denoiser = GuidedDenoiser(net, gnet, guidance=guidance, cast_outputs=True)
    return run_sampler(denoiser, noise, labels=labels, num_steps=num_steps, sigma_min=sigma_min,
                       sigma_max=sigma_max, rho=rho, solver="heun", S_churn=S_churn, S_min=S_min, S_max=S_max,
                       S_noise=S_noise, randn_like=randn_like, dtype=dtype)

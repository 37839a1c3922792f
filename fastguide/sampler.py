"""fastguide.sample and edm_sampler: the guided EDM sampler's public faces.

They validate every argument once, before the first model call, build the plan (fastguide.plan)
and hand it to the core loop (fastguide.core) with the evaluator of a GuidedDenoiser and the
backend's fused epilogues (fastguide.dispatch).
"""
import math
import numbers

import torch

from fastguide import core, dispatch, ops, plan, reference, rules
from fastguide.guidance import GuidedDenoiser

SOLVERS = plan.SOLVERS
EDM = plan.EDM_DEFAULTS


def check_sigmas(sigmas, *, end_in_zero=True):
    """A custom schedule as a list of floats: a finite, strictly decreasing 1-D tensor of at least
    2 noise levels, > 0 except the last, which is 0 (or >= 0 when end_in_zero is False)."""
    if not isinstance(sigmas, torch.Tensor):
        raise TypeError(f"sigmas must be a tensor, got {type(sigmas).__name__}")
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D tensor of at least 2 noise levels, got shape {tuple(sigmas.shape)}")
    if sigmas.numel() > plan.MAX_STEPS + 1:
        raise ValueError(f"sigmas holds {sigmas.numel()} noise levels; at most {plan.MAX_STEPS + 1} are supported")
    values = sigmas.detach().to("cpu", torch.float64).tolist()
    if not all(math.isfinite(v) for v in values):
        raise ValueError("sigmas must be finite")
    if not all(v > 0 for v in values[:-1]) or values[-1] < 0:
        raise ValueError(f"sigmas must be finite, > 0 except the last, and the last >= 0, got {values}")
    if end_in_zero and values[-1] != 0:
        raise ValueError(f"sigmas must end in 0, got {values[-1]}")
    if not all(a > b for a, b in zip(values[:-1], values[1:])):
        raise ValueError("sigmas must be strictly decreasing")
    return values


def schedule(num_steps, sigma_min, sigma_max, rho, sigmas=None):
    """The noise levels t_0 > ... > t_{N-1} > t_N = 0 as a list of floats, validated."""
    if sigmas is not None:
        return check_sigmas(sigmas)
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    if num_steps > plan.MAX_STEPS:
        raise ValueError(f"num_steps must be at most {plan.MAX_STEPS}, got {num_steps}")
    sigma_min = ops.check_real("sigma_min", sigma_min, minimum=0.0)
    sigma_max = ops.check_real("sigma_max", sigma_max)
    if sigma_min >= sigma_max:
        raise ValueError(f"sigma_min must be < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    rho = ops.check_real("rho", rho, minimum=0.0)
    return reference.edm_sigmas(int(num_steps), sigma_min, sigma_max, rho).tolist()


def check_noise(noise, dtype):
    """noise: a finite floating-point tensor [B, ...] (one host read: the finiteness check)."""
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
        raise TypeError(f"noise must be a floating-point tensor, got "
                        f"{noise.dtype if isinstance(noise, torch.Tensor) else type(noise).__name__}")
    if noise.ndim < 1 or noise.shape[0] < 1:
        raise ValueError(f"noise must have a batch dimension of at least 1, got shape {tuple(noise.shape)}")
    if dtype not in ops.SUPPORTED_DTYPES:
        raise TypeError(f"dtype must be one of {ops.SUPPORTED_DTYPES}, got {dtype}")
    if not bool(torch.isfinite(noise).all()):
        raise ValueError("noise must be finite; it holds NaN or inf")


def signal_scale_of(net):
    """The net's α(σ) of x_σ = α·x0 + σ·ε if it declares one (a flow-matching adapter: 1 − t), else None."""
    signal_scale = getattr(net, "signal_scale", None)
    if signal_scale is not None and not callable(signal_scale):
        raise TypeError(f"net.signal_scale must be callable (σ -> α), got {type(signal_scale).__name__}")
    return signal_scale


def check_solver(solver, S_churn, eta, signal_scale=None):
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if signal_scale is not None and (S_churn > 0 or solver == "euler_ancestral"):
        what = "S_churn" if S_churn > 0 else "solver='euler_ancestral'"
        raise ValueError(f"{what} adds noise as x = x0 + σ·ε, but net declares signal_scale (x = α(σ)·x0 + σ·ε, "
                         "a flow-matching model): use 'euler', 'heun' or 'dpmpp_2m' without churn")
    if S_churn > 0 and solver not in ("euler", "heun"):
        raise ValueError(f"S_churn={S_churn} applies to the 'euler' and 'heun' solvers only, not {solver!r}")
    eta = ops.check_real("eta", eta, minimum=0.0, strict=False)
    if eta != 1.0 and solver != "euler_ancestral":
        raise ValueError(f"eta={eta} applies to solver='euler_ancestral' only, not {solver!r}")
    return eta


def check_callable(name, fn, optional=True):
    if (fn is not None or not optional) and not callable(fn):
        raise TypeError(f"{name} must be callable{' or None' if optional else ''}, got {type(fn).__name__}")


def sample(net, noise, *, labels=None, guide=None, guide_labels=None, guidance=1.0, guidance_interval=None,
           num_steps=EDM["num_steps"], sigma_min=EDM["sigma_min"], sigma_max=EDM["sigma_max"], rho=EDM["rho"],
           sigmas=None, solver="heun", S_churn=0.0, S_min=0.0, S_max=float("inf"), S_noise=1.0, eta=1.0,
           randn_like=None, dtype=torch.float32, backend="auto", progress=False, callback=None,
           return_stats=False, strategy="auto", compile=False, guidance_rule=None):
    """Draws samples from noise with the guided sampler.

    net, guide: denoisers (x, sigma[B], labels) -> D(x).  guidance=w: D = D0 + w·(D1 − D0).
    guide_labels without guide: classifier-free guidance on one 2B batch of net.  labels,
    guide_labels: a tensor or a dict of tensors (keyword arguments of the model), batched on dim 0.
    solver: "heun" (EDM's default), "euler", "dpmpp_2m" or "euler_ancestral" (eta, S_noise; noise
    from randn_like); churn (S_churn, S_min, S_max, S_noise) with Euler and Heun only.
    Returns x, or (x, stats) with evaluations per sample of net and guide when return_stats.
    strategy, compile: how net and guide are evaluated together (see GuidedDenoiser).
    The callback's x, x_hat and denoised are the sampler's buffers: clone them to keep them.
    guidance may be a tensor [B] (one weight per sample).  guidance_rule: how the predictions
    combine, a fastguide.rules rule (None: Lerp(), D0 + w·(D1 − D0); CFGRescale, APG, CFGZeroStar)
    or its name; its state (APG's momentum) lives for one run, fused with the solver update.
    """
    denoiser = GuidedDenoiser(net, guide, guidance=guidance, guide_labels=guide_labels,
                              guidance_interval=guidance_interval, strategy=strategy, compile=compile,
                              guidance_rule=guidance_rule)
    return run_sampler(denoiser, noise, labels=labels, num_steps=num_steps, sigma_min=sigma_min,
                       sigma_max=sigma_max, rho=rho, sigmas=sigmas, solver=solver, S_churn=S_churn,
                       S_min=S_min, S_max=S_max, S_noise=S_noise, eta=eta, randn_like=randn_like, dtype=dtype,
                       backend=backend, progress=progress, callback=callback, return_stats=return_stats)


def run_sampler(denoiser, noise, *, labels=None, num_steps=EDM["num_steps"], sigma_min=EDM["sigma_min"],
                sigma_max=EDM["sigma_max"], rho=EDM["rho"], sigmas=None, solver="heun", S_churn=0.0, S_min=0.0,
                S_max=float("inf"), S_noise=1.0, eta=1.0, randn_like=None, dtype=torch.float32, backend="auto",
                progress=False, callback=None, return_stats=False):
    """The sampler over a GuidedDenoiser: validates, plans, runs the core loop."""
    check_noise(noise, dtype)
    denoiser.check_labels(labels, noise.shape[0])
    S_churn = ops.check_real("S_churn", S_churn, minimum=0.0, strict=False)
    t_steps = schedule(num_steps, sigma_min, sigma_max, rho, sigmas)
    S_noise = ops.check_real("S_noise", S_noise)
    S_min = ops.check_real("S_min", S_min, finite=False)
    S_max = ops.check_real("S_max", S_max, finite=False)
    check_callable("callback", callback)
    randn_like = torch.randn_like if randn_like is None else randn_like
    check_callable("randn_like", randn_like, optional=False)
    backend = dispatch.resolve(backend, noise.device)

    x, run_plan = run_plan_on_core(denoiser, noise.to(dtype) * t_steps[0], labels, t_steps, solver, backend,
                                   randn=lambda x, step: randn_like(x), callback=callback, progress=progress,
                                   S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise, eta=eta)
    if return_stats:
        return x, dict(denoiser.stats, steps=run_plan.num_steps, solver=solver, backend=backend)
    return x


def run_plan_on_core(denoiser, x_start, labels, t_steps, solver, backend, *, randn, callback=None, progress=False,
                     **plan_options):
    """Plans a validated request and runs it on the core: the one path of sample, edm_sampler and the
    k-diffusion faces.  x_start (owned by the run) is the noised start; backend a resolved name.
    Returns (x, plan)."""
    signal_scale = signal_scale_of(denoiser.net)
    plan_options["eta"] = check_solver(solver, plan_options.get("S_churn", 0.0), plan_options.get("eta", 1.0),
                                       signal_scale)
    rule_ops = None
    if rules.uses_rule_path(denoiser.rule, denoiser.guidance):
        rule_ops = rules.rule_ops(backend, x_start.device)
    run_plan = plan.build(t_steps, solver, denoiser.guided_at, guide_from_step=denoiser.guide_from_step,
                          signal_scale=signal_scale, **plan_options)
    with torch.no_grad():  # a denoiser that needs autograd (e.g. an energy model) enables it itself
        x = core.run(run_plan, denoiser.evaluator, x_start, labels, denoiser.guidance, dispatch.implementation(backend),
                     randn=randn, callback=callback, progress=progress, check_finite=denoiser.check_finite,
                     rule=denoiser.rule, rule_ops=rule_ops)
    return x, run_plan


def edm_sampler(net, noise, labels=None, gnet=None, num_steps=EDM["num_steps"], sigma_min=EDM["sigma_min"],
                sigma_max=EDM["sigma_max"], rho=EDM["rho"], guidance=1, S_churn=0, S_min=0, S_max=float("inf"), S_noise=1, dtype=torch.float32,
                randn_like=torch.randn_like):
    """Drop-in for EDM2's edm_sampler (same signature, defaults and results), on fastguide's fused ops.

    Like EDM2, the networks' outputs are cast to dtype, and gnet is evaluated with the same labels."""
    denoiser = GuidedDenoiser(net, gnet, guidance=guidance, cast_outputs=True)
    return run_sampler(denoiser, noise, labels=labels, num_steps=num_steps, sigma_min=sigma_min,
                       sigma_max=sigma_max, rho=rho, solver="heun", S_churn=S_churn, S_min=S_min, S_max=S_max,
                       S_noise=S_noise, randn_like=randn_like, dtype=dtype)

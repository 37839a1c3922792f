"""GuidedDenoiser: the public face of guided evaluation, D = D0 + w·(D1 − D0).

A denoiser is a callable (x, sigma, labels) -> D(x) with sigma of shape [B].  GuidedDenoiser is
itself such a denoiser (and accepts k-diffusion's model(x, sigma, **extra_args) call), so any
sampler can use fastguide as its guidance backend.  It validates its arguments, decides where
the guide runs (w ≠ 1, σ inside the interval) and leaves the evaluation to fastguide.evaluator;
fastguide.sample and fastguide.k_diffusion use that evaluator directly, so the two predictions
reach the fused epilogue separately.
"""
import math
import numbers

import torch
from torch import nn

from fastguide import batching, conditioning, ops, reference, rules
from fastguide.evaluator import DenoiserOutputError, Evaluator

__all__ = ["GuidedDenoiser", "DenoiserOutputError", "check_guidance", "check_interval", "check_sigma"]


def check_guidance(guidance, argument="guidance"):
    """A float, or a float64 CPU tensor [B] of per-sample weights (see fastguide.rules)."""
    return rules.check_guidance(guidance, argument)


def check_interval(guidance_interval):
    if guidance_interval is None:
        return None
    try:
        sigma_lo, sigma_hi = (float(v) for v in guidance_interval)
    except (TypeError, ValueError):
        raise TypeError(f"guidance_interval must be a pair (sigma_lo, sigma_hi), got {guidance_interval!r}") from None
    if math.isnan(sigma_lo) or math.isnan(sigma_hi) or sigma_lo >= sigma_hi:
        raise ValueError(f"guidance_interval must have sigma_lo < sigma_hi, got ({sigma_lo}, {sigma_hi})")
    return sigma_lo, sigma_hi


def check_sigma(sigma, batch):
    """The one noise level of a call as a float: a real number or a tensor of shape [], [1] or [B]
    holding one value, finite and > 0; otherwise an error naming sigma."""
    if isinstance(sigma, torch.Tensor):
        if not (sigma.is_floating_point() or sigma.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"sigma must be a real tensor, got dtype {sigma.dtype}")
        if sigma.ndim > 1 or sigma.numel() not in (1, batch):
            raise ValueError(f"sigma must have shape [], [1] or [{batch}] (the batch of x), got {tuple(sigma.shape)}")
        values = sigma.detach().reshape(-1).tolist()
        if any(v != values[0] for v in values):
            raise ValueError("GuidedDenoiser needs one noise level per call; sigma holds several")
        sigma = values[0]
    elif isinstance(sigma, bool) or not isinstance(sigma, numbers.Real):
        raise TypeError(f"sigma must be a real number or a tensor, got {type(sigma).__name__}")
    return ops.check_real("sigma", sigma, minimum=0.0)


def check_x(x):
    if not isinstance(x, torch.Tensor) or x.dtype not in ops.SUPPORTED_DTYPES or x.ndim < 1 or x.shape[0] < 1:
        raise TypeError(f"x must be a tensor [B, ...] with a dtype in {ops.SUPPORTED_DTYPES}, got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")


class GuidedDenoiser(nn.Module):
    """D = D0 + w·(D1 − D0) with D1 = net(x, σ, labels) and D0 the guide's prediction.

    guide given: D0 = guide(x, σ, guide_labels or labels) (autoguidance, or a separate
    unconditional net).  guide None, guide_labels given: classifier-free guidance, D0 = net(x, σ,
    guide_labels).  The guide is not evaluated when guidance == 1 or σ is outside
    guidance_interval = (sigma_lo, sigma_hi].  labels and guide_labels: a tensor or a dict of
    tensors (passed as keyword arguments), batched on dim 0.

    strategy: how the two predictions are evaluated together, one of fastguide.batching.STRATEGIES:
    "auto" (the default: one 2B batch for CFG, else two calls; reproducible), "tune" (times the
    candidates, keeps only those with identical bits), "separate", "cfg-batch", "stacked",
    "streams" (see fastguide.batching).  The one used last is stats["strategy"].  compile=True:
    torch.compile of the evaluation (mode "reduce-overhead", CUDA graphs, on CUDA tensors; then
    the predictions are valid until the next evaluation).  stats counts evaluations of net and
    guide (a CFG 2B call counts one of each).  check_finite: refuse non-finite predictions of
    direct calls (one host read per call; fastguide.sample checks on the device instead).

    guidance: one weight, or a tensor [B] of per-sample weights.  guidance_rule: how the two
    predictions combine (fastguide.rules: Lerp (the default, None), CFGRescale, APG, CFGZeroStar,
    or a name).  A rule with state (APG's momentum, CFG-Zero*'s step count) keeps it, across
    direct calls, for one run: a call at a higher σ than the previous one starts a new run, and
    each direct call counts as one sampler step.
    """

    def __init__(self, net, guide=None, guidance=1.0, guide_labels=None, guidance_interval=None,
                 strategy="auto", compile=False, check_finite=True, cast_outputs=False, guidance_rule=None):
        super().__init__()
        if not callable(net):
            raise TypeError(f"net must be callable, got {type(net).__name__}")
        if guide is not None and not callable(guide):
            raise TypeError(f"guide must be callable or None, got {type(guide).__name__}")
        self.guidance = check_guidance(guidance)
        self.rule = rules.resolve(guidance_rule)
        if not rules.all_one(self.guidance) and guide is None and guide_labels is None:
            raise ValueError(f"guidance={self.guidance} needs a guide or guide_labels (CFG); got neither")
        if not isinstance(compile, bool):
            raise TypeError(f"compile must be True or False, got {compile!r}")
        self.guidance_interval = check_interval(guidance_interval)
        self.check_finite = check_finite
        self.evaluator = Evaluator(net, guide, guide_labels, batching.check_strategy(strategy), compile,
                                   cast_outputs)
        self.net, self.guide = net, guide
        self._direct = None  # (RuleRun, x's shape, last σ, next step) of direct calls with a rule

    guide_labels = property(lambda self: self.evaluator.guide_labels)
    strategy = property(lambda self: self.evaluator.strategy)
    stats = property(lambda self: self.evaluator.stats)
    tuners = property(lambda self: self.evaluator.tuners)

    def reset_stats(self):
        self.evaluator.reset_stats()

    def guided_at(self, sigma):
        """Whether the guide is evaluated at noise level sigma (a float)."""
        return not rules.all_one(self.guidance) and reference.in_interval(sigma, self.guidance_interval)

    @property
    def guide_from_step(self):
        """The first sampler step where the rule reads the predictions (CFG-Zero*'s zero init)."""
        return self.rule.zero_init_steps

    def check_labels(self, labels, batch):
        """Validates labels (and guide_labels) and per-sample weights for a batch, before any model call."""
        conditioning.check("labels", labels, batch)
        rules.check_guidance_batch(self.guidance, batch)
        if rules.all_one(self.guidance):
            return
        conditioning.check("guide_labels", self.guide_labels, batch)
        if self.guide is None:
            if labels is None:
                raise ValueError("guide_labels (CFG with the same net) needs labels for the conditional half")
            conditioning.check_pair("guide_labels", self.guide_labels, "labels", labels)

    def predictions(self, x, sigma, labels=None):
        """(d_main, d_guide) at noise level sigma (a float, or a tensor of shape [], [1] or [B] holding
        one value); d_guide is None where the guide is skipped."""
        check_x(x)
        sigma = check_sigma(sigma, x.shape[0])
        self.check_labels(labels, x.shape[0])
        d_main, d_guide = self.evaluator.predictions(x, sigma, labels, self.guided_at(sigma))
        if self.check_finite:
            for name, prediction in ((self.evaluator.net_name, d_main), (self.evaluator.guide_name, d_guide)):
                if prediction is not None and not bool(torch.isfinite(prediction).all()):
                    raise DenoiserOutputError(f"{name} returned non-finite values (NaN or inf)")
        return d_main, d_guide

    def forward(self, x, sigma, labels=None, **extra_args):
        """The guided D(x).  sigma: a float or a tensor of shape [], [1] or [B] (one noise level per call)."""
        labels = extra_args.pop("class_labels", extra_args.pop("cond", labels)) if labels is None else labels
        if extra_args:
            raise TypeError(f"GuidedDenoiser got unexpected keyword arguments {sorted(extra_args)}")
        if rules.uses_rule_path(self.rule, self.guidance):
            return self._rule_forward(x, sigma, labels)
        d_main, d_guide = self.predictions(x, sigma, labels)
        if d_guide is None:
            return d_main
        combine = reference.guide
        if self.evaluator.compile:
            combine = self.evaluator._compiled_fn("combine", reference.guide, x.device)
        return combine(d_main, d_guide, self.guidance)

    def _rule_forward(self, x, sigma, labels):
        """A direct call with a rule: its state carries over calls of one run (see the class)."""
        check_x(x)
        sigma_value = check_sigma(sigma, x.shape[0])
        run, shape, last_sigma, step = self._direct or (None, None, None, 0)
        if run is None or sigma_value > last_sigma or shape != tuple(x.shape):
            run, step = rules.RuleRun(self.rule, self.guidance, rules.rule_ops("auto", x.device), x.device), 0
        if step < self.rule.zero_init_steps:  # the prediction is zero whatever the models say: no guide
            self.check_labels(labels, x.shape[0])
            d_main, d_guide = self.evaluator.predictions(x, sigma_value, labels, False)
        else:
            d_main, d_guide = self.predictions(x, sigma_value, labels)
        out = run.denoise(x, d_main, d_guide, sigma_value, step)
        self._direct = (run, tuple(x.shape), sigma_value, step + 1)
        return out


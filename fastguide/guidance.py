"""GuidedDenoiser: the main and the weak denoiser evaluated together, combined by guidance.

A denoiser is a callable (x, sigma, labels) -> D(x) with sigma of shape [B].  GuidedDenoiser is
itself such a denoiser (and accepts k-diffusion's model(x, sigma, **extra_args) call), so any
sampler can use fastguide as its guidance backend.  fastguide.sample uses `predictions`, which
returns the two predictions separately so that the fused ops combine them with the solver update.
"""
import math
import types

import torch
from torch import nn

from fastguide import batching, ops, reference


class DenoiserOutputError(RuntimeError):
    """A denoiser returned a tensor of the wrong shape, dtype or device, or non-finite values."""


def check_guidance(guidance, argument="guidance"):
    return ops.check_real(argument, guidance)


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


def check_labels(name, labels, batch):
    if labels is None:
        return
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or None, got {type(labels).__name__}")
    if labels.ndim == 0 or labels.shape[0] != batch:
        raise ValueError(f"{name} has batch {tuple(labels.shape)[:1] or '()'}, expected the batch of x ({batch})")


def check_output(name, out, x, check_finite=True, batch=None):
    """Refuses a prediction that is not a finite tensor of x's shape (batch rows), dtype and device."""
    shape = x.shape if batch is None else (batch, *x.shape[1:])
    if not isinstance(out, torch.Tensor):
        raise DenoiserOutputError(f"{name} returned {type(out).__name__}, expected a tensor")
    if out.shape != shape:
        raise DenoiserOutputError(f"{name} returned shape {tuple(out.shape)}, expected {tuple(shape)}")
    if out.dtype != x.dtype:
        raise DenoiserOutputError(f"{name} returned dtype {out.dtype}, expected {x.dtype}")
    if out.device != x.device:
        raise DenoiserOutputError(f"{name} returned a tensor on device {out.device}, expected device {x.device}")
    if check_finite and not bool(torch.isfinite(out).all()):
        raise DenoiserOutputError(f"{name} returned non-finite values (NaN or inf)")
    return out


_CODE_COPIES = {}


def _own_code(fn, owner):
    """fn (a function or bound method) running a copy of its code object, one copy per owner.

    Dynamo keeps its compiled graphs, and its limit of recompilations (8), per code object.  The
    strategies' evaluate methods and reference.guide serve every model class and shape in the
    process: with one code object, a few models times a few batch sizes exhaust the limit and
    compile=True silently falls back to eager.  A copy per (key, net class, guide class) keeps
    those apart, while GuidedDenoisers on the same classes (every call of fastguide.sample)
    share their graphs."""
    if isinstance(fn, nn.Module):
        return fn  # compiles its class's forward: per class already
    func = getattr(fn, "__func__", fn)
    if (func, owner) not in _CODE_COPIES:
        _CODE_COPIES[func, owner] = types.FunctionType(func.__code__.replace(), func.__globals__, func.__name__,
                                                       func.__defaults__, func.__closure__)
    copy = _CODE_COPIES[func, owner]
    return types.MethodType(copy, fn.__self__) if hasattr(fn, "__self__") else copy


class GuidedDenoiser(nn.Module):
    """D = D0 + w·(D1 − D0) with D1 = net(x, σ, labels) and D0 the guide's prediction.

    guide given: D0 = guide(x, σ, guide_labels or labels) (autoguidance, or a separate
    unconditional net).  guide None, guide_labels given: classifier-free guidance, D0 = net(x, σ,
    guide_labels).  The guide is not evaluated when guidance == 1 or σ is outside
    guidance_interval = (sigma_lo, sigma_hi].

    strategy: how the two predictions are evaluated together, one of fastguide.batching.STRATEGIES
    ("auto", "separate", "cfg-batch", "stacked", "streams"; see fastguide.batching).  The one used
    last is stats["strategy"].  compile=True: torch.compile of the evaluation (mode
    "reduce-overhead", CUDA graphs, on CUDA tensors; then the predictions are valid until the next
    evaluation) and of the guidance combination in forward.  stats counts evaluations of net and
    guide (a CFG 2B call counts one of each).
    """

    def __init__(self, net, guide=None, guidance=1.0, guide_labels=None, guidance_interval=None,
                 strategy="auto", compile=False, check_finite=True, cast_outputs=False):
        super().__init__()
        if not callable(net):
            raise TypeError(f"net must be callable, got {type(net).__name__}")
        if guide is not None and not callable(guide):
            raise TypeError(f"guide must be callable or None, got {type(guide).__name__}")
        self.guidance = check_guidance(guidance)
        if self.guidance != 1 and guide is None and guide_labels is None:
            raise ValueError(f"guidance={self.guidance} needs a guide or guide_labels (CFG); got neither")
        if not isinstance(compile, bool):
            raise TypeError(f"compile must be True or False, got {compile!r}")
        self.net, self.guide = net, guide
        self.guide_labels = guide_labels
        self.guidance_interval = check_interval(guidance_interval)
        self.strategy = batching.check_strategy(strategy)
        self.compile = compile
        self.check_finite = check_finite
        self.cast_outputs = cast_outputs
        self._strategies = {}
        self._compiled = {}
        self.tuners = {}  # auto: input key -> batching.AutoTuner (its .choice, .timings_ms)
        if strategy not in ("auto", "streams"):
            self._strategy(strategy)  # refuses a strategy that cannot apply, before any work
        self.reset_stats()

    def reset_stats(self):
        self.stats = {"net": 0, "guide": 0, "strategy": None}

    def guided_at(self, sigma):
        """Whether the guide is evaluated at noise level sigma (a float)."""
        return self.guidance != 1 and reference.in_interval(sigma, self.guidance_interval)

    def _checked(self, name, out, x, batch=None):
        if self.cast_outputs and isinstance(out, torch.Tensor):
            out = out.to(x.dtype)
        return check_output(name, out, x, self.check_finite, batch)

    def _guide_model(self):
        return self.net if self.guide is None else self.guide

    def _strategy(self, name):
        """The strategy object `name`, built once (its constructor refuses what it cannot run)."""
        if name not in self._strategies:
            net, guide = self.net, self._guide_model()
            if self.compile and name == "streams":  # compiled per network: one graph cannot span two streams
                net = torch.compile(net)
                guide = net if guide is self.net else torch.compile(guide)
            self._strategies[name] = batching.CLASSES[name](net, guide, self._checked)
        return self._strategies[name]

    def _compiled_fn(self, key, fn, device):
        """torch.compile of fn, once per key; the evaluations use CUDA graphs ("reduce-overhead") on CUDA."""
        graphs = device.type == "cuda" and key != "combine"
        if key not in self._compiled:
            fn = _own_code(fn, (key, type(self.net), type(self._guide_model())))
            self._compiled[key] = torch.compile(fn, mode="reduce-overhead" if graphs else None)
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        return self._compiled[key]

    def _evaluate_with(self, name, x, sigma, labels, guide_labels):
        strategy = self._strategy(name)
        evaluate = None
        if self.compile and name != "streams":
            evaluate = self._compiled_fn(name, strategy.evaluate, x.device)
        return strategy(x, sigma, labels, guide_labels, evaluate=evaluate)

    def _tuner(self, x, labels, guide_labels):
        """The AutoTuner of this input key (shared with other GuidedDenoisers on the same net and guide)."""
        key = batching.input_key(x, labels, guide_labels)
        guide = self._guide_model()
        tuner = self.tuners.get(key) or batching.TUNERS.get(self.net, guide, key)
        if tuner is None:
            names = []
            for name in batching.candidates(self.net, guide, x.device):
                try:
                    self._strategy(name)
                    names.append(name)
                except ValueError as exc:
                    batching.log.debug("fastguide auto: strategy %r not applicable: %s", name, exc)
            tuner = batching.AutoTuner(names)
            batching.TUNERS.put(self.net, guide, key, tuner)
        self.tuners[key] = tuner
        return tuner

    def _call_main(self, x, sigma, labels):
        net = self._compiled_fn("net", self.net, x.device) if self.compile else self.net
        d_main = self._checked("net", net(x, sigma, labels), x)
        self.stats["net"] += 1
        return d_main

    def _call_pair(self, x, sigma, labels):
        """(d_main, d_guide) for one batch, evaluated by the chosen strategy."""
        guide_labels = labels if self.guide_labels is None else self.guide_labels
        name = self.strategy
        if name == "auto":
            tuner = self._tuner(x, labels, guide_labels)
            name = tuner.choice
        if name is None:  # auto, still tuning: eager, whatever compile says
            strategies = {n: self._strategy(n) for n in tuner.names}
            name, outputs = tuner.evaluate(strategies, x, sigma, labels, guide_labels)
        else:
            outputs = self._evaluate_with(name, x, sigma, labels, guide_labels)
        self.stats["net"] += 1
        self.stats["guide"] += 1
        self.stats["strategy"] = name
        return outputs

    def predictions(self, x, sigma, labels=None):
        """(d_main, d_guide) at the float noise level sigma; d_guide is None where the guide is skipped."""
        check_labels("labels", labels, x.shape[0])
        sigma_t = torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device)
        if not self.guided_at(sigma):
            return self._call_main(x, sigma_t, labels), None
        check_labels("guide_labels", self.guide_labels, x.shape[0])
        if self.guide is None and labels is None:
            raise ValueError("guide_labels (CFG with the same net) needs labels for the conditional half")
        return self._call_pair(x, sigma_t, labels)

    def forward(self, x, sigma, labels=None, **extra_args):
        """The guided D(x).  sigma: a float or a tensor of shape [], [1] or [B] (one noise level per call)."""
        labels = extra_args.pop("class_labels", extra_args.pop("cond", labels)) if labels is None else labels
        if extra_args:
            raise TypeError(f"GuidedDenoiser got unexpected keyword arguments {sorted(extra_args)}")
        if isinstance(sigma, torch.Tensor):
            values = sigma.reshape(-1).tolist()
            if any(v != values[0] for v in values):
                raise ValueError("GuidedDenoiser needs one noise level per call; sigma holds several")
            sigma = values[0]
        d_main, d_guide = self.predictions(x, float(sigma), labels)
        if d_guide is None:
            return d_main
        combine = self._compiled_fn("combine", reference.guide, x.device) if self.compile else reference.guide
        return combine(d_main, d_guide, self.guidance)

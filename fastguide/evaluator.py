"""The evaluator: how the main and the guiding denoiser run together for one evaluation.

It owns the evaluation strategy (fastguide.batching: 2B CFG batch, stacked pair, two calls, two
CUDA streams, the opt-in tuner), torch.compile of the evaluation, the conditioning handed to each
model, the output checks (shape, dtype, device: no host reads) and the evaluation counts.  Its
inputs are validated by the public faces (fastguide.sample, GuidedDenoiser); it trusts them.
"""
import contextlib
import types

import torch
from torch import nn

from fastguide import batching, conditioning


class DenoiserOutputError(RuntimeError):
    """A denoiser returned a tensor of the wrong shape, dtype or device, or non-finite values."""


def check_output(name, out, x, batch=None):
    """Refuses a prediction that is not a tensor of x's shape (batch rows), dtype and device."""
    shape = x.shape if batch is None else (batch, *x.shape[1:])
    if not isinstance(out, torch.Tensor):
        raise DenoiserOutputError(f"{name} returned {type(out).__name__}, expected a tensor")
    if out.shape != shape:
        raise DenoiserOutputError(f"{name} returned shape {tuple(out.shape)}, expected {tuple(shape)}")
    if out.dtype != x.dtype:
        raise DenoiserOutputError(f"{name} returned dtype {out.dtype}, expected {x.dtype}")
    if out.device != x.device:
        raise DenoiserOutputError(f"{name} returned a tensor on device {out.device}, expected device {x.device}")
    return out


_CODE_COPIES = {}


def _own_code(fn, owner):
    """fn (a function or bound method) running a copy of its code object, one copy per owner.

    Dynamo keeps its compiled graphs, and its limit of recompilations (8), per code object.  The
    strategies' evaluate methods serve every model class and shape in the process: with one code
    object, a few models times a few batch sizes exhaust the limit and compile=True silently falls
    back to eager.  A copy per (key, net class, guide class) keeps those apart, while evaluators on
    the same classes (every call of fastguide.sample) share their graphs."""
    if isinstance(fn, nn.Module):
        return fn  # compiles its class's forward: per class already
    func = getattr(fn, "__func__", fn)
    if (func, owner) not in _CODE_COPIES:
        _CODE_COPIES[func, owner] = types.FunctionType(func.__code__.replace(), func.__globals__, func.__name__,
                                                       func.__defaults__, func.__closure__)
    copy = _CODE_COPIES[func, owner]
    return types.MethodType(copy, fn.__self__) if hasattr(fn, "__self__") else copy


class Evaluator:
    """predictions(x, σ, labels, guided) -> (D1, D0 or None) for net and guide.

    guide None: the guide is net itself with guide_labels (CFG).  guide_labels None: the guide
    gets the main labels (autoguidance).  stats counts evaluations of net and guide per sample
    (a CFG 2B call counts one of each) and names the strategy used last."""

    def __init__(self, net, guide=None, guide_labels=None, strategy="auto", compile=False, cast_outputs=False,
                 net_name="net"):
        self.net, self.guide, self.guide_labels = net, guide, guide_labels
        self.strategy, self.compile, self.cast_outputs = strategy, compile, cast_outputs
        self.net_name = net_name
        self.guide_name = "guide" if guide is not None else f"{net_name} (guide_labels)"
        self._strategies, self._compiled = {}, {}
        self._in_run = False
        self.tuners = {}  # strategy="tune": input key -> batching.AutoTuner (its .choice, .timings_ms)
        if strategy not in ("auto", "tune", "streams"):
            self._strategy(strategy)  # refuses a strategy that cannot apply, before any work
        self.reset_stats()

    def reset_stats(self):
        self.stats = {"net": 0, "guide": 0, "strategy": None}

    @property
    def guide_model(self):
        return self.net if self.guide is None else self.guide

    def guide_labels_for(self, labels):
        return labels if self.guide_labels is None else self.guide_labels

    @contextlib.contextmanager
    def run(self):
        """One sampler run: strategies may keep state (the stacked parameters) until it ends."""
        self.reset_stats()
        self._in_run = True
        for strategy in self._strategies.values():
            getattr(strategy, "begin_run", lambda: None)()
        try:
            yield self
        finally:
            self._in_run = False
            for strategy in self._strategies.values():
                getattr(strategy, "end_run", lambda: None)()

    def predictions(self, x, sigma, labels, guided):
        """(d_main, d_guide) at the float noise level sigma; d_guide is None when not guided."""
        sigma_t = torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device)
        if not guided:
            return self._call_main(x, sigma_t, labels), None
        return self._call_pair(x, sigma_t, labels)

    def _checked(self, name, out, x, batch=None):
        if self.cast_outputs and isinstance(out, torch.Tensor):
            out = out.to(x.dtype)
        return check_output(self.net_name if name == "net" else self.guide_name if name == "guide" else name,
                            out, x, batch)

    def _strategy(self, name):
        """The strategy object `name`, built once (its constructor refuses what it cannot run)."""
        if name not in self._strategies:
            net, guide = self.net, self.guide_model
            if self.compile and name == "streams":  # compiled per network: one graph cannot span two streams
                net = torch.compile(net)
                guide = net if guide is self.net else torch.compile(guide)
            self._strategies[name] = strategy = batching.CLASSES[name](net, guide, self._checked)
            if self._in_run:
                getattr(strategy, "begin_run", lambda: None)()
        return self._strategies[name]

    def _compiled_fn(self, key, fn, device):
        """torch.compile of fn, once per key; the evaluations use CUDA graphs ("reduce-overhead") on CUDA."""
        graphs = device.type == "cuda" and key != "combine"
        if key not in self._compiled:
            fn = _own_code(fn, (key, type(self.net), type(self.guide_model)))
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
        """The AutoTuner of this input key (shared with other evaluators on the same net and guide)."""
        key = batching.input_key(x, labels, guide_labels)
        guide = self.guide_model
        tuner = self.tuners.get(key) or batching.TUNERS.get(self.net, guide, key)
        if tuner is None:
            names = []
            for name in batching.candidates(self.net, guide, x.device):
                try:
                    self._strategy(name)
                    names.append(name)
                except ValueError as exc:
                    batching.log.debug("fastguide tune: strategy %r not applicable: %s", name, exc)
            tuner = batching.AutoTuner(names)
            batching.TUNERS.put(self.net, guide, key, tuner)
        self.tuners[key] = tuner
        return tuner

    def _call_main(self, x, sigma, labels):
        net = self._compiled_fn("net", self.net, x.device) if self.compile else self.net
        d_main = self._checked("net", conditioning.call(net, x, sigma, labels), x)
        self.stats["net"] += 1
        return d_main

    def _call_pair(self, x, sigma, labels):
        guide_labels = self.guide_labels_for(labels)
        name = self.strategy
        if name == "auto":
            name = batching.default_strategy(self.net, self.guide_model)
        elif name == "tune":
            tuner = self._tuner(x, labels, guide_labels)
            if tuner.choice is None:  # still tuning: eager, whatever compile says
                strategies = {n: self._strategy(n) for n in tuner.names}
                return self._counted(*tuner.evaluate(strategies, x, sigma, labels, guide_labels))
            name = tuner.choice
        return self._counted(name, self._evaluate_with(name, x, sigma, labels, guide_labels))

    def _counted(self, name, outputs):
        self.stats["net"] += 1
        self.stats["guide"] += 1
        self.stats["strategy"] = name
        return outputs

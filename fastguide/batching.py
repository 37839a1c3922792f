"""How GuidedDenoiser evaluates the main and the guiding denoiser together.

One guided evaluation needs D1 = net(x, σ, labels) and D0 = guide(x, σ, guide_labels); for CFG
the guide is net itself with other labels.  Strategies (names in STRATEGIES):

"separate"   two plain calls, one after the other.  Always applicable.
"cfg-batch"  the guide is net itself (CFG): one call on the 2B batch [x; x] with
             [labels; guide_labels] (every entry of a dict concatenated); the two halves are
             returned as views (no copy).
"stacked"    net and guide have the same architecture (same module classes, parameter and buffer
             names, shapes, dtypes and devices, same plain attributes): their parameters are
             stacked once (torch.func.stack_module_state) and one torch.func.vmap over
             torch.func.functional_call evaluates both; halves are views of the [2, B, ...] output.
             The stacked copy (twice the parameter memory) is made afresh for every call, and
             kept only for the duration of one sampler run (Evaluator.run): parameters written
             between calls, in place, through .data or by load_state_dict, are always seen (no
             change detection can see a write through .data).  It is detached: no gradient
             reaches the parameters through it.  It assumes forward depends only on the class, the parameters,
             buffers and plain attributes (an attribute that differs is refused) and has no Python
             side effects (it runs on a parameter-free copy of net).  vmap refuses models that call
             autograd inside forward (fastguide.toy's ToyModel): "auto" then drops "stacked".
"streams"    CUDA only: net on the current stream and the guide on a side stream, concurrently.
             On CPU tensors it is refused (use "separate", which is what "auto" does there).
"auto"       (the default) a fixed rule, so that the same call gives the same bits, first call
             or not: "cfg-batch" for CFG (the guide is net itself), else "separate".
"tune"       opt-in: times the applicable candidates (candidates()) once per input signature
             (shapes, dtypes, device, grad mode) on the first evaluations (AutoTuner).  Every
             tuning evaluation returns the "auto" strategy's outputs and runs one candidate
             besides it (extra model calls while tuning); a candidate whose outputs differ from
             those in a single bit is dropped, so the choice never changes results.  It caches
             the choice per net/guide pair across GuidedDenoiser instances and picks another
             strategy only when it is clearly faster (MARGIN).  The choice is in
             GuidedDenoiser.stats["strategy"] and in a debug line on logging.getLogger("fastguide").

Each strategy splits its work in two: `evaluate` (pure tensor code, what compile=True compiles)
and `finish` (output checks of shape, dtype and device, and the split into (d_main, d_guide)).
Inputs are validated once by the public faces (fastguide.sample, GuidedDenoiser); strategies trust them.
"""
import copy
import logging
import time
import weakref

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fastguide import conditioning

STRATEGIES = ("auto", "tune", "separate", "cfg-batch", "stacked", "streams")
MARGIN = 0.9           # a candidate must take at most MARGIN × the "auto" strategy's time to be chosen
WARMUP_REPS, TIMED_REPS = 1, 4   # tuning rounds per candidate: untimed, then timed (best of)

log = logging.getLogger("fastguide")


def check_strategy(strategy):
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    return strategy


class Separate:
    """Two plain calls: net, then guide."""
    name = "separate"

    def __init__(self, net, guide, check):
        self.net, self.guide, self.check = net, guide, check

    def evaluate(self, x, sigma, labels, guide_labels):
        return conditioning.call(self.net, x, sigma, labels), conditioning.call(self.guide, x, sigma, guide_labels)

    def finish(self, outputs, x):
        d_main, d_guide = outputs
        return self.check("net", d_main, x), self.check("guide", d_guide, x)

    def __call__(self, x, sigma, labels, guide_labels, evaluate=None):
        return self.finish((evaluate or self.evaluate)(x, sigma, labels, guide_labels), x)


class CfgBatch(Separate):
    """One call of net on [x; x] with [labels; guide_labels] (the guide is net itself)."""
    name = "cfg-batch"

    def __init__(self, net, guide, check):
        if guide is not net:
            raise ValueError("strategy 'cfg-batch' needs the guide to be net itself (classifier-free guidance: "
                             "guide=None with guide_labels); got a separate guide network")
        super().__init__(net, guide, check)

    def evaluate(self, x, sigma, labels, guide_labels):
        both_labels = conditioning.cat(labels, guide_labels)
        return (conditioning.call(self.net, torch.cat([x, x]), torch.cat([sigma, sigma]), both_labels),)

    def finish(self, outputs, x):
        batch = x.shape[0]
        both = self.check("net", outputs[0], x, batch=2 * batch)
        return both[:batch], both[batch:]


def _plain_attributes(module):
    """The public attributes of a module that are plain values (numbers, strings, tuples...)."""
    plain = (bool, int, float, complex, str, bytes, tuple, list, type(None))
    return {k: v for k, v in vars(module).items() if not k.startswith("_") and isinstance(v, plain)}


def architecture_difference(net, guide):
    """Why net and guide cannot be stacked (a sentence), or None when they have the same architecture."""
    for name, module in (("net", net), ("guide", guide)):
        if not isinstance(module, nn.Module):
            return f"{name} is a {type(module).__name__}, not an nn.Module"
    net_modules, guide_modules = dict(net.named_modules()), dict(guide.named_modules())
    if net_modules.keys() != guide_modules.keys():
        only = sorted(net_modules.keys() ^ guide_modules.keys())[:3]
        return f"their submodules differ (e.g. {only})"
    for path, module in net_modules.items():
        where = path or "the top module"
        other = guide_modules[path]
        if type(module) is not type(other):
            return f"{where} is a {type(module).__name__} in net but a {type(other).__name__} in guide"
        net_attrs, guide_attrs = _plain_attributes(module), _plain_attributes(other)
        for key in sorted(net_attrs.keys() | guide_attrs.keys()):
            if net_attrs.get(key, "<missing>") != guide_attrs.get(key, "<missing>"):
                return (f"attribute {key!r} of {where} differs: {net_attrs.get(key, '<missing>')!r} in net, "
                        f"{guide_attrs.get(key, '<missing>')!r} in guide")
    for kind in ("parameters", "buffers"):
        net_tensors = dict(getattr(net, f"named_{kind}")())
        guide_tensors = dict(getattr(guide, f"named_{kind}")())
        if net_tensors.keys() != guide_tensors.keys():
            only = sorted(net_tensors.keys() ^ guide_tensors.keys())[:3]
            return f"their {kind} differ in name (e.g. {only})"
        for key, tensor in net_tensors.items():
            other = guide_tensors[key]
            if (tensor.shape, tensor.dtype, tensor.device) != (other.shape, other.dtype, other.device):
                return (f"{kind[:-1]} {key!r} is {tuple(tensor.shape)} {tensor.dtype} on {tensor.device} in net "
                        f"but {tuple(other.shape)} {other.dtype} on {other.device} in guide")
    return None


class Stacked(Separate):
    """One vmap over functional_call on the stacked parameters and buffers of net and guide."""
    name = "stacked"

    def __init__(self, net, guide, check):
        difference = architecture_difference(net, guide)
        if difference is not None:
            raise ValueError(f"strategy 'stacked' needs net and guide of the same architecture: {difference}")
        super().__init__(net, guide, check)
        self.base = copy.deepcopy(net).to("meta")
        self.pinned = False          # inside a sampler run: keep the stacked copy between evaluations
        self.params = self.buffers = None

    def begin_run(self):
        self.pinned, self.params, self.buffers = True, None, None

    def end_run(self):
        self.pinned, self.params, self.buffers = False, None, None

    def stacked_state(self):
        """The stacked parameters and buffers: made now, or kept from earlier in this run."""
        if self.params is None or not self.pinned:
            with torch.no_grad():
                params, buffers = torch.func.stack_module_state([self.net, self.guide])
            self.params = {k: v.detach() for k, v in params.items()}
            self.buffers = {k: v.detach() for k, v in buffers.items()}
            for tensor in (*self.params.values(), *self.buffers.values()):
                if tensor.is_cuda:  # CUDA graphs (compile=True) then read them in place instead of copying
                    torch._dynamo.mark_static_address(tensor)
        return self.params, self.buffers

    def _one(self, params, buffers, x, sigma, labels):
        return conditioning.call(lambda *args, **kwargs: torch.func.functional_call(self.base, (params, buffers),
                                                                                    args, kwargs), x, sigma, labels)

    def evaluate(self, x, sigma, labels, guide_labels, params=None, buffers=None):
        if labels is None or labels is guide_labels:
            label_dim, both_labels = None, labels
        else:
            label_dim, both_labels = 0, conditioning.stack(labels, guide_labels)
        both = torch.func.vmap(self._one, in_dims=(0, 0, None, None, label_dim))(
            params, buffers, x, sigma, both_labels)
        return both[0], both[1]

    def __call__(self, x, sigma, labels, guide_labels, evaluate=None):
        params, buffers = self.stacked_state()
        outputs = (evaluate or self.evaluate)(x, sigma, labels, guide_labels, params, buffers)
        return self.finish(outputs, x)


class Streams(Separate):
    """net on the current CUDA stream, guide on a side stream; joined before returning."""
    name = "streams"

    def __init__(self, net, guide, check):
        super().__init__(net, guide, check)
        self.side = None

    def evaluate(self, x, sigma, labels, guide_labels):
        if x.device.type != "cuda":
            raise ValueError(f"strategy 'streams' runs on CUDA tensors, got x on {x.device} "
                             "(use 'separate' or 'auto' on CPU)")
        main = torch.cuda.current_stream(x.device)
        if self.side is None or self.side.device != x.device:
            self.side = torch.cuda.Stream(x.device)
        self.side.wait_stream(main)
        with torch.cuda.stream(self.side):
            d_guide = conditioning.call(self.guide, x, sigma, guide_labels)
        d_main = conditioning.call(self.net, x, sigma, labels)
        main.wait_stream(self.side)
        # The allocator must not reuse memory across streams before both are done with it.
        for cond in (x, sigma, labels, guide_labels):
            for tensor in (cond.values() if isinstance(cond, dict) else [cond]):
                if tensor is not None:
                    tensor.record_stream(self.side)
        if isinstance(d_guide, torch.Tensor):
            d_guide.record_stream(main)
        return d_main, d_guide


CLASSES = {cls.name: cls for cls in (Separate, CfgBatch, Stacked, Streams)}


def default_strategy(net, guide):
    """What "auto" runs: one 2B batch for CFG (the guide is net itself), else two calls."""
    return "cfg-batch" if guide is net else "separate"


def candidates(net, guide, device):
    """The strategy names that apply to (net, guide) on `device`, the "auto" one first."""
    names = [default_strategy(net, guide)]
    if guide is net:
        names.append("separate")
    elif architecture_difference(net, guide) is None:
        names.append("stacked")
    if torch.device(device).type == "cuda":
        names.append("streams")
    return names


def input_key(x, labels, guide_labels):
    """What the tuned choice depends on: shapes, dtypes and device of the inputs, and grad mode."""
    same_labels = labels is guide_labels
    return (conditioning.signature(x), conditioning.signature(labels),
            same_labels or conditioning.signature(guide_labels), torch.is_grad_enabled())


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _same_bits(a, b):
    return all(torch.equal(u, v) for u, v in zip(a, b))


class AutoTuner:
    """Times the candidate strategies on the first evaluations, then settles on one (strategy="tune").

    names[0] is the baseline, the strategy "auto" runs.  Each tuning evaluation runs the baseline
    (its outputs are the evaluation's result) and one other candidate in turn, WARMUP_REPS untimed
    rounds then TIMED_REPS timed ones; a candidate that raises, or whose outputs differ from the
    baseline's in any bit, is dropped.  Then `choice` is the fastest candidate (best time) if it
    takes at most MARGIN × the baseline's time, else the baseline: results never depend on it.
    """

    def __init__(self, names):
        self.names = list(names)
        self.times = {name: [] for name in self.names}
        self.turn = 0
        self.choice = self.names[0] if len(self.names) == 1 else None

    @property
    def timings_ms(self):
        return {name: 1e3 * min(t) for name, t in self.times.items() if t}

    def evaluate(self, strategies, x, sigma, labels, guide_labels):
        """(name of the strategy whose outputs are returned, (d_main, d_guide)) for one tuning evaluation."""
        baseline, others = self.names[0], self.names[1:]
        if not others:
            return baseline, strategies[baseline](x, sigma, labels, guide_labels)
        name = others[self.turn % len(others)]
        timed = self.turn >= WARMUP_REPS * len(others)
        outputs, seconds = _timed(strategies[baseline], x, sigma, labels, guide_labels)
        try:
            candidate_outputs, candidate_seconds = _timed(strategies[name], x, sigma, labels, guide_labels)
            same = _same_bits(outputs, candidate_outputs)
        except Exception as exc:  # noqa: BLE001 -- a candidate that cannot run is dropped, not fatal
            log.debug("fastguide tune: strategy %r dropped: %s: %s", name, type(exc).__name__, exc)
            same = False
        if not same:
            self._drop(name)
            return baseline, outputs
        if timed:
            self.times[baseline].append(seconds)
            self.times[name].append(candidate_seconds)
        self.turn += 1
        if self.turn >= (WARMUP_REPS + TIMED_REPS) * len(others):
            self._settle(x)
        return baseline, outputs

    def _drop(self, name):
        """Leaves `name` out and starts the rounds again with the other candidates."""
        self.names.remove(name)
        self.times = {n: [] for n in self.names}
        self.turn = 0
        if len(self.names) == 1:
            self.choice = self.names[0]

    def _settle(self, x):
        timings = self.timings_ms
        baseline = self.names[0]
        best = min(timings, key=timings.get)
        self.choice = best if timings[best] <= MARGIN * timings[baseline] else baseline
        log.debug("fastguide tune: chose %r for x %s %s on %s; best times (ms): %s", self.choice, tuple(x.shape),
                  x.dtype, x.device, {k: round(v, 3) for k, v in timings.items()})


def _timed(strategy, x, sigma, labels, guide_labels):
    _synchronize(x.device)
    start = time.perf_counter()
    outputs = strategy(x, sigma, labels, guide_labels)
    _synchronize(x.device)
    return outputs, time.perf_counter() - start


class _TunerCache:
    """Auto tuners per (net, guide, input key), shared by every GuidedDenoiser on the same pair.

    Keys hold ids; weak references check that the objects are still the same ones (ids are reused
    after garbage collection).  Callables that cannot be weakly referenced are not shared."""

    def __init__(self):
        self.entries = {}

    def get(self, net, guide, key):
        entry = self.entries.get((id(net), id(guide), key))
        if entry is None:
            return None
        net_ref, guide_ref, tuner = entry
        if net_ref() is not net or guide_ref() is not guide:
            del self.entries[(id(net), id(guide), key)]
            return None
        return tuner

    def put(self, net, guide, key, tuner):
        try:
            refs = weakref.ref(net), weakref.ref(guide)
        except TypeError:
            return
        self.entries[(id(net), id(guide), key)] = (*refs, tuner)

    def clear(self):
        self.entries.clear()


TUNERS = _TunerCache()


class ComputeOpCounter(TorchDispatchMode):
    """Records the compute operators dispatched inside its `with` block (a GPU kernel-launch proxy).

    Views are not counted: operators whose schema says the output aliases an input without
    writing it (view, reshape of a contiguous tensor, select, slice, expand, detach...), and
    _unsafe_view (a view the schema does not mark).  In-place operators are counted."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        aliases = [ret.alias_info for ret in func._schema.returns]
        is_view = any(a is not None and not a.is_write for a in aliases) or func is torch.ops.aten._unsafe_view.default
        if not is_view:
            self.ops.append(func)
        return func(*args, **(kwargs or {}))

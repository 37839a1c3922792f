"""How GuidedDenoiser evaluates the main and the guiding denoiser together.

One guided evaluation needs D1 = net(x, σ, labels) and D0 = guide(x, σ, guide_labels); for CFG
the guide is net itself with other labels.  Strategies (names in STRATEGIES):

"separate"   two plain calls, one after the other.  Always applicable; the baseline.
"cfg-batch"  the guide is net itself (CFG): one call on the 2B batch [x; x] with
             [labels; guide_labels]; the two halves are returned as views (no copy).
"stacked"    net and guide have the same architecture (same module classes, parameter and buffer
             names, shapes, dtypes and devices, same plain attributes): their parameters are
             stacked once (torch.func.stack_module_state) and one torch.func.vmap over
             torch.func.functional_call evaluates both; halves are views of the [2, B, ...] output.
             The stacked copy (twice the parameter memory) is rebuilt when any parameter or
             buffer of net or guide changes identity, storage (module.to) or version (in-place
             updates: optimizer steps, load_state_dict).  It is detached: no gradient reaches the
             parameters through it.  It assumes forward depends only on the class, the parameters,
             buffers and plain attributes (an attribute that differs is refused) and has no Python
             side effects (it runs on a parameter-free copy of net).  vmap refuses models that call
             autograd inside forward (fastguide.toy's ToyModel): "auto" then drops "stacked".
"streams"    CUDA only: net on the current stream and the guide on a side stream, concurrently.
             On CPU tensors it is refused (use "separate", which is what "auto" does there).
"auto"       times the applicable candidates (candidates()) once per input signature (shapes,
             dtypes, device, grad mode) on the first real evaluations, taking turns (AutoTuner: no
             extra model calls), caches the choice per net/guide pair across GuidedDenoiser
             instances, and picks another strategy than "separate" only when it is clearly faster
             (MARGIN).  The choice is in GuidedDenoiser.stats["strategy"] and in a debug line on
             logging.getLogger("fastguide").

Each strategy splits its work in two: `evaluate` (pure tensor code, what compile=True compiles)
and `finish` (output checks, which need host syncs, and the split into (d_main, d_guide)).
"""
import copy
import logging
import time
import weakref

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

STRATEGIES = ("auto", "separate", "cfg-batch", "stacked", "streams")
MARGIN = 0.9           # a candidate must take at most MARGIN × the "separate" time to be chosen
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

    def validate(self, x, labels, guide_labels):
        pass

    def evaluate(self, x, sigma, labels, guide_labels):
        return self.net(x, sigma, labels), self.guide(x, sigma, guide_labels)

    def finish(self, outputs, x):
        d_main, d_guide = outputs
        return self.check("net", d_main, x), self.check("guide", d_guide, x)

    def __call__(self, x, sigma, labels, guide_labels, evaluate=None):
        self.validate(x, labels, guide_labels)
        return self.finish((evaluate or self.evaluate)(x, sigma, labels, guide_labels), x)


class CfgBatch(Separate):
    """One call of net on [x; x] with [labels; guide_labels] (the guide is net itself)."""
    name = "cfg-batch"

    def __init__(self, net, guide, check):
        if guide is not net:
            raise ValueError("strategy 'cfg-batch' needs the guide to be net itself (classifier-free guidance: "
                             "guide=None with guide_labels); got a separate guide network")
        super().__init__(net, guide, check)

    def validate(self, x, labels, guide_labels):
        if (labels is None) != (guide_labels is None):
            raise ValueError("strategy 'cfg-batch' needs labels and guide_labels both given or both None")

    def evaluate(self, x, sigma, labels, guide_labels):
        both_labels = None if labels is None else torch.cat([labels, guide_labels])
        return (self.net(torch.cat([x, x]), torch.cat([sigma, sigma]), both_labels),)

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


def _tensor_state(tensor):
    """What changes when a tensor is replaced, moved or updated in place."""
    try:
        version = tensor._version
    except RuntimeError:  # inference tensors keep no version counter
        version = None
    return id(tensor), tensor.data_ptr(), version


class Stacked(Separate):
    """One vmap over functional_call on the stacked parameters and buffers of net and guide."""
    name = "stacked"

    def __init__(self, net, guide, check):
        difference = architecture_difference(net, guide)
        if difference is not None:
            raise ValueError(f"strategy 'stacked' needs net and guide of the same architecture: {difference}")
        super().__init__(net, guide, check)
        self.base = copy.deepcopy(net).to("meta")
        self.state_key = None
        self.params = self.buffers = None

    def _current_key(self):
        tensors = [*self.net.parameters(), *self.net.buffers(), *self.guide.parameters(), *self.guide.buffers()]
        return tuple(_tensor_state(t) for t in tensors)

    def refresh(self):
        """Re-stacks the parameters and buffers if any of them changed since the last stacking."""
        key = self._current_key()
        if key != self.state_key:
            with torch.no_grad():
                params, buffers = torch.func.stack_module_state([self.net, self.guide])
            self.params = {k: v.detach() for k, v in params.items()}
            self.buffers = {k: v.detach() for k, v in buffers.items()}
            for tensor in (*self.params.values(), *self.buffers.values()):
                if tensor.is_cuda:  # CUDA graphs (compile=True) then read them in place instead of copying
                    torch._dynamo.mark_static_address(tensor)
            self.state_key = self._current_key()  # the stacking itself leaves the originals unchanged
        return self.params, self.buffers

    def validate(self, x, labels, guide_labels):
        if (labels is None) != (guide_labels is None):
            raise ValueError("strategy 'stacked' needs labels and guide_labels both given or both None")

    def _one(self, params, buffers, x, sigma, labels):
        return torch.func.functional_call(self.base, (params, buffers), (x, sigma, labels))

    def evaluate(self, x, sigma, labels, guide_labels, params=None, buffers=None):
        if labels is None or labels is guide_labels:
            label_dim, both_labels = None, labels
        else:
            label_dim, both_labels = 0, torch.stack([labels, guide_labels])
        both = torch.func.vmap(self._one, in_dims=(0, 0, None, None, label_dim))(
            params, buffers, x, sigma, both_labels)
        return both[0], both[1]

    def __call__(self, x, sigma, labels, guide_labels, evaluate=None):
        self.validate(x, labels, guide_labels)
        params, buffers = self.refresh()
        outputs = (evaluate or self.evaluate)(x, sigma, labels, guide_labels, params, buffers)
        return self.finish(outputs, x)


class Streams(Separate):
    """net on the current CUDA stream, guide on a side stream; joined before returning."""
    name = "streams"

    def __init__(self, net, guide, check):
        super().__init__(net, guide, check)
        self.side = None

    def validate(self, x, labels, guide_labels):
        if x.device.type != "cuda":
            raise ValueError(f"strategy 'streams' runs on CUDA tensors, got x on {x.device} "
                             "(use 'separate' or 'auto' on CPU)")

    def evaluate(self, x, sigma, labels, guide_labels):
        main = torch.cuda.current_stream(x.device)
        if self.side is None or self.side.device != x.device:
            self.side = torch.cuda.Stream(x.device)
        self.side.wait_stream(main)
        with torch.cuda.stream(self.side):
            d_guide = self.guide(x, sigma, guide_labels)
        d_main = self.net(x, sigma, labels)
        main.wait_stream(self.side)
        # The allocator must not reuse memory across streams before both are done with it.
        for tensor in (x, sigma, labels, guide_labels):
            if tensor is not None:
                tensor.record_stream(self.side)
        if isinstance(d_guide, torch.Tensor):
            d_guide.record_stream(main)
        return d_main, d_guide


CLASSES = {cls.name: cls for cls in (Separate, CfgBatch, Stacked, Streams)}


def candidates(net, guide, device):
    """The strategy names that apply to (net, guide) on `device`, "separate" first."""
    names = ["separate"]
    if guide is net:
        names.append("cfg-batch")
    elif architecture_difference(net, guide) is None:
        names.append("stacked")
    if torch.device(device).type == "cuda":
        names.append("streams")
    return names


def _signature(tensor):
    if tensor is None:
        return None
    return tuple(tensor.shape), tensor.dtype, tensor.device


def input_key(x, labels, guide_labels):
    """What the auto choice depends on: shapes, dtypes and device of the inputs, and grad mode."""
    same_labels = labels is guide_labels
    return _signature(x), _signature(labels), same_labels or _signature(guide_labels), torch.is_grad_enabled()


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class AutoTuner:
    """Times the candidate strategies on real evaluations, then settles on one.

    The first evaluations with one input key take turns over the candidates (WARMUP_REPS untimed
    rounds, then TIMED_REPS timed ones); each turn's result is the evaluation's result, so tuning
    calls net and guide no more often than any other strategy.  Then `choice` is the fastest
    candidate (best time of its rounds) if it takes at most MARGIN × the time of "separate", else
    "separate".  A candidate that raises is dropped and the evaluation is redone with "separate".
    """

    def __init__(self, names):
        self.names = list(names)              # "separate" first
        self.times = {name: [] for name in self.names}
        self.turn = 0
        self.choice = self.names[0] if len(self.names) == 1 else None

    @property
    def timings_ms(self):
        return {name: 1e3 * min(t) for name, t in self.times.items() if t}

    def evaluate(self, strategies, x, sigma, labels, guide_labels):
        """(name of the strategy used, (d_main, d_guide)) for one evaluation during tuning."""
        name = self.names[self.turn % len(self.names)]
        timed = self.turn >= WARMUP_REPS * len(self.names)
        try:
            _synchronize(x.device)
            start = time.perf_counter()
            outputs = strategies[name](x, sigma, labels, guide_labels)
            _synchronize(x.device)
            seconds = time.perf_counter() - start
        except Exception as exc:  # noqa: BLE001 -- a candidate that cannot run is dropped, not fatal
            if name == "separate":
                raise
            log.debug("fastguide auto: strategy %r dropped: %s: %s", name, type(exc).__name__, exc)
            self._drop(name)
            return "separate", strategies["separate"](x, sigma, labels, guide_labels)
        if timed:
            self.times[name].append(seconds)
        self.turn += 1
        if self.turn >= (WARMUP_REPS + TIMED_REPS) * len(self.names):
            self._settle(x)
        return name, outputs

    def _drop(self, name):
        """Leaves `name` out and starts the rounds again with the other candidates."""
        self.names.remove(name)
        self.times = {n: [] for n in self.names}
        self.turn = 0
        if len(self.names) == 1:
            self.choice = self.names[0]

    def _settle(self, x):
        timings = self.timings_ms
        best = min(timings, key=timings.get)
        self.choice = best if timings[best] <= MARGIN * timings["separate"] else "separate"
        log.debug("fastguide auto: chose %r for x %s %s on %s; best times (ms): %s", self.choice, tuple(x.shape),
                  x.dtype, x.device, {k: round(v, 3) for k, v in timings.items()})


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

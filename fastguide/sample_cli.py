"""`fastguide sample`: sample a denoiser for a list of seeds, one file per seed, resumable.

Every seed's noise (and, for class-conditional nets without --class, its class), then the noise that
churn and euler_ancestral add while sampling, come from its own torch.Generator; conditioning that a
--net factory gives (see Source) is made per seed too.  The seeds are cut into the same batches whatever
the number of processes, and the evaluation strategy is fixed rather than tuned by timing, so the files
are byte-identical between a one-process run and `torchrun --nproc_per_node=N -m fastguide sample ...`
(batches go to ranks round-robin, by RANK).

A file on disk is complete or absent: each is written to a temporary name of its own writer, flushed
to disk and renamed.  outdir/manifest.json holds the settings that decide the samples; a rerun with
other settings is refused (unless --force), and a rerun with the same ones skips batches whose files
are all complete, samples again a batch with a missing or unreadable file (whole, so its files stay
identical to an uninterrupted run), and writes only those files.  A batch whose samples come out
non-finite is not written; the run goes on and ends naming its seeds (exit code 1).
"""
import datetime
import importlib
import inspect
import io
import json
import math
import os
import platform
import re
import secrets
import socket
import sys
import time
import zipfile
from typing import NamedTuple

import numpy as np
import torch

from fastguide import conditioning, dispatch, ops, rules
from fastguide.batching import STRATEGIES
from fastguide.guidance import DenoiserOutputError
from fastguide.noise import SeededRandn
from fastguide.plan import EDM_DEFAULTS as EDM
from fastguide.sampler import SOLVERS, check_sigmas, check_solver, sample, schedule, signal_scale_of

FORMATS = ("npz", "png")
PNG_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
MAX_SEEDS = 10 ** 7
MAX_SEED = 2 ** 32  # seeds below it, as EDM's generate.py takes them (seed % 2**32)
MANIFEST = "manifest.json"
NPZ_MEMBERS = ["class_label.npy", "seed.npy", "x.npy"]
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk that closes every PNG file
HOST = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())
STALE_AFTER_S = 3600  # another machine's temporary file this old has lost its writer
DEFAULT_RULE = {"name": "lerp"}  # the manifest setting of no --rule: fastguide.rules.Lerp()
SAMPLE_DEFAULTS = {name: parameter.default for name, parameter in inspect.signature(sample).parameters.items()}
SOLVER_OPTIONS = {"--eta": "eta", "--churn": "S_churn", "--s-min": "S_min", "--s-max": "S_max",
                  "--s-noise": "S_noise"}  # the options of the solver's added noise: sample()'s keywords
SETTING_NAMES = {"sigmas": "the --net factory's sigmas", "rule": "--rule"}


class UsageError(ValueError):
    """Bad input to `fastguide sample`: reported as one line on stderr, exit code 2."""


class OutputError(OSError):
    """A result could not be written: reported as one line on stderr, exit code 1."""


def add_arguments(parser):
    parser.add_argument("--net", required=True, metavar="MODULE:FACTORY",
                        help="a callable returning the denoiser (x, sigma[B], labels) -> D(x), or a dict (or object) "
                             "with the denoiser and, optionally, conditioning(seeds, device), shape and "
                             "sigmas(num_steps): see the README")
    parser.add_argument("--guide", metavar="MODULE:FACTORY", help="a callable returning the guiding denoiser")
    parser.add_argument("--guidance", type=float, default=1.0, help="guidance weight w (default 1: no guidance)")
    parser.add_argument("--interval", type=float, nargs=2, metavar=("LO", "HI"),
                        help="guide only for sigma in (LO, HI]")
    parser.add_argument("--rule", metavar="NAME",
                        help=f"how the predictions combine, a rule of fastguide.rules: {', '.join(rules.RULES)} "
                             f"(default lerp: D0 + w·(D1 − D0))")
    parser.add_argument("--rule-arg", action="append", default=[], metavar="PARAM=VALUE",
                        help="a parameter of --rule, e.g. --rule apg --rule-arg momentum=0.5 "
                             "--rule-arg norm_threshold=15 (repeatable)")
    parser.add_argument("--steps", type=int, default=EDM["num_steps"],
                        help=f"sampling steps (default {EDM['num_steps']})")
    parser.add_argument("--solver", choices=SOLVERS, default="heun")
    parser.add_argument("--eta", type=float,
                        help="euler_ancestral only: scale of the noise added per step (default 1)")
    parser.add_argument("--churn", type=float,
                        help="euler and heun only: EDM's S_churn, noise added before each step (default 0: none)")
    parser.add_argument("--s-min", type=float, help="with --churn: churn only where sigma >= S_MIN (default 0)")
    parser.add_argument("--s-max", type=float, help="with --churn: churn only where sigma <= S_MAX (default inf)")
    parser.add_argument("--s-noise", type=float,
                        help="with --churn or euler_ancestral: scale of the added noise, EDM's S_noise (default 1)")
    parser.add_argument("--sigma-min", type=float,
                        help=f"default {EDM['sigma_min']}; clamped to the net's sigma_min if it has one")
    parser.add_argument("--sigma-max", type=float,
                        help=f"default {EDM['sigma_max']}; clamped to the net's sigma_max if it has one")
    parser.add_argument("--rho", type=float, help=f"default {EDM['rho']}")
    parser.add_argument("--seeds", default="0-63", help="seeds: ranges and lists, e.g. 0-49999 or 0,5,10-19")
    parser.add_argument("--batch", type=int, default=32, help="samples per batch (default 32)")
    parser.add_argument("--num-classes", type=int, metavar="N",
                        help="one-hot labels of size N (default: the net's label_dim, if any)")
    parser.add_argument("--class", type=int, dest="class_idx", metavar="K",
                        help="class K for every seed (default: one drawn from each seed's generator)")
    parser.add_argument("--null-class", type=int, metavar="K",
                        help="CFG without --guide: the unconditional label is class K (default: all-zero labels)")
    parser.add_argument("--shape", help="sample shape C,H,W (default: the factory's shape, or the net's "
                                        "img_channels and img_resolution)")
    parser.add_argument("--outdir", required=True, help="where the files go (created if missing)")
    parser.add_argument("--format", choices=FORMATS, default="png",
                        help="png: 8-bit images of x in [-1, 1] (1, 3 or 4 channels); npz: the float32 sample itself")
    parser.add_argument("--force", action="store_true",
                        help=f"sample into an --outdir whose {MANIFEST} names other settings: its files that hold "
                             "samples of this --shape and --format are kept, others sampled again; the manifest is "
                             "replaced")
    parser.add_argument("--device", help="default: cuda (this rank's GPU) if available, else cpu")
    parser.add_argument("--backend", default="auto", help="fused-op backend (default auto)")
    parser.add_argument("--strategy", choices=STRATEGIES,
                        help="how net and guide are evaluated together (default: cfg-batch for CFG, else separate; "
                             "not auto, whose timing-based choice could make files differ between runs)")


def run(args):
    started = time.perf_counter()
    rank, world_size, local_rank = _distributed_env()
    try:
        plan = _prepare(args, local_rank)
    except UsageError as exc:
        return _error(exc, 2)
    if plan["device"].type == "cuda":
        torch.cuda.set_device(plan["device"])
    if world_size > 1:
        torch.distributed.init_process_group("nccl" if plan["device"].type == "cuda" else "gloo")
    try:
        counts = _sample_batches(plan, rank, world_size)
        counts["setup_s"] = plan["setup_s"]
        all_counts = _gather(counts, world_size)
        if rank == 0:
            _write_record(args, plan, all_counts, world_size, time.perf_counter() - started)
    except OutputError as exc:
        return _error(exc, 1)
    finally:
        if world_size > 1:
            torch.distributed.destroy_process_group()
    return _report_failures(all_counts, rank)


def _error(exc, code):
    print(f"fastguide sample: error: {' '.join(str(exc).split())}", file=sys.stderr)
    return code


def _distributed_env():
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


# ---------------------------------------------------------------- validation (nothing written yet)

def parse_seeds(text):
    """'0-3,7,10-11' -> [0, 1, 2, 3, 7, 10, 11]; each seed once.  Items are ASCII digits, spaces only
    around them ('1 2' is no seed 12, nor '1 - 3' a range)."""
    seeds = []
    for item in str(text).split(","):
        match = re.fullmatch(r"([0-9]{1,19})(?:-([0-9]{1,19}))?", item.strip())
        if match is None:
            raise UsageError(f"--seeds: malformed item {item!r} in {text!r} (expected e.g. 0-49999 or 0,5,10-19)")
        first, last = int(match[1]), int(match[2] if match[2] is not None else match[1])
        if last < first:
            raise UsageError(f"--seeds: range {item!r} ends before it starts")
        if last >= MAX_SEED:
            raise UsageError(f"--seeds: seed {last} is too large (must be < 2**32: torch's CPU generator keeps 32 "
                             f"bits of a seed, so seed {last} would draw the noise of seed {last % MAX_SEED})")
        if len(seeds) + last - first + 1 > MAX_SEEDS:
            raise UsageError(f"--seeds: {text!r} names more than {MAX_SEEDS} seeds; split the run")
        seeds.extend(range(first, last + 1))
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds: {text!r} names some seeds more than once")
    return seeds


def format_seeds(seeds):
    """[0, 1, 2, 7] -> '0-2,7': the --seeds form of a list of seeds."""
    seeds, items = sorted(seeds), []
    for seed in seeds:
        if items and items[-1][1] == seed - 1:
            items[-1][1] = seed
        else:
            items.append([seed, seed])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in items)


class Source(NamedTuple):
    """What a --net factory returns: a denoiser, or a dict (or an object with these attributes) holding

    denoiser      (x, sigma[B], labels) -> D(x); a dict of labels arrives as keyword arguments
    conditioning  optional: conditioning(seeds, device) -> (labels, guide_labels), each None, a tensor or
                  a dict of tensors with one row per seed; row k must depend on seed k only, so that a
                  sample does not depend on its batch.  guide_labels are the unconditional labels of CFG
                  (no --guide); a --guide sees labels.
    shape         optional: the shape of one sample, e.g. (16, 128, 128) (default: --shape, or the
                  denoiser's img_channels and img_resolution)
    sigmas        optional: sigmas(num_steps) -> the noise levels, a decreasing 1-D tensor of num_steps + 1
                  ending in 0 (a flow model's t's: flow_sigmas); default EDM's, from --sigma-min ...
    Of a --guide factory's result only the denoiser is used."""
    denoiser: object
    conditioning: object = None
    shape: tuple = None
    sigmas: object = None


def load_factory(option, spec):
    """Imports MODULE, calls FACTORY() and returns what it made as a Source (checked)."""
    factory = _import_factory(option, spec)
    try:
        made = factory()
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - a factory that fails (or exits) is bad input
        raise UsageError(f"{option}: {spec}() raised {type(exc).__name__}: {exc}") from None
    return _as_source(f"{option}: {spec}()", made)


def _import_factory(option, spec):
    module_name, sep, attr_path = (spec or "").partition(":")
    if not sep or not module_name or not attr_path:
        raise UsageError(f"{option}: expected MODULE:FACTORY, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        factory = importlib.import_module(module_name)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - any import failure is bad input
        raise UsageError(f"{option}: cannot import module {module_name!r}: {type(exc).__name__}: {exc}") from None
    for name in attr_path.split("."):
        if not hasattr(factory, name):
            raise UsageError(f"{option}: {module_name!r} has no attribute {attr_path!r}")
        factory = getattr(factory, name)
    if not callable(factory):
        raise UsageError(f"{option}: {spec} is a {type(factory).__name__}, not a callable factory")
    return factory


def _as_source(what, made):
    """A factory's result: a denoiser, a dict with Source's fields, or an object with a denoiser attribute
    (and, optionally, the other fields)."""
    if isinstance(made, dict):
        unknown = sorted(set(made) - set(Source._fields))
        if unknown:
            raise UsageError(f"{what} returned a dict with key {unknown[0]!r}; expected keys among "
                             f"{', '.join(Source._fields)}")
        if "denoiser" not in made:
            raise UsageError(f"{what} returned a dict without a 'denoiser'")
        fields = made
    elif hasattr(made, "denoiser"):
        fields = {name: getattr(made, name, None) for name in Source._fields}
    else:
        fields = {"denoiser": made}
    source = Source(**fields)
    if not callable(source.denoiser):
        raise UsageError(f"{what} returned a {type(source.denoiser).__name__}, expected a callable denoiser")
    for name in ("conditioning", "sigmas"):
        value = getattr(source, name)
        if value is not None and not callable(value):
            raise UsageError(f"{what}: its {name} is a {type(value).__name__}, expected a callable")
    if source.shape is not None:
        source = source._replace(shape=_check_shape(f"{what}: its shape", source.shape))
    return source


def _prepare(args, local_rank):
    """Validates every argument, the device and the output folders (loading nothing), then loads the
    nets and checks what depends on them; the last step creates the output folders and the manifest."""
    started = time.perf_counter()
    seeds = parse_seeds(args.seeds)
    _check_positive("--steps", args.steps)
    _check_positive("--batch", args.batch)
    if not math.isfinite(args.guidance):
        raise UsageError(f"--guidance must be finite, got {args.guidance}")
    if args.interval is not None and not args.interval[0] < args.interval[1]:
        raise UsageError(f"--interval needs LO < HI, got {args.interval[0]} {args.interval[1]}")
    solver_options = _solver_options(args)
    rule, rule_setting = guidance_rule(args.rule, args.rule_arg)
    device = _device(args.device, local_rank)
    try:
        dispatch.check_name(args.backend, "--backend")
        dispatch.resolve(args.backend, device)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"--backend: {exc}") from None
    shape = _parse_shape(args.shape)
    if shape is not None:
        _check_format(args.format, shape)
    _check_outdir(args.outdir, seeds, args.format)
    source = load_factory("--net", args.net)
    _check_solver_for(source.denoiser, solver_options)
    guide = load_factory("--guide", args.guide).denoiser if args.guide else None
    num_classes, cfg_labels = _conditioning_kind(args, source, seeds, device)
    if args.guidance != 1 and guide is None and not cfg_labels:
        raise UsageError("--guidance != 1 needs --guide, or unconditional labels for CFG: --num-classes, or "
                         "guide_labels from the --net factory's conditioning")
    if shape is None:
        shape = source.shape or _net_shape(source.denoiser)
        _check_format(args.format, shape)
    strategy = args.strategy or ("separate" if guide is not None else "cfg-batch")
    if strategy == "cfg-batch" and guide is not None:
        raise UsageError("--strategy cfg-batch is for CFG (no --guide)")
    plan = dict(seeds=seeds, device=device, net=source.denoiser, guide=guide, conditioning=source.conditioning,
                num_classes=num_classes, shape=shape, strategy=strategy, outdir=args.outdir, args=args,
                schedule=_schedule(args, source), solver_options=solver_options, rule=rule,
                rule_setting=rule_setting)
    _open_outdir(plan)
    plan["net"], plan["guide"] = (_to_device(m, device) for m in (plan["net"], guide))
    plan["setup_s"] = time.perf_counter() - started
    return plan


def _solver_options(args):
    """sample()'s solver keywords from --solver, --eta, --churn, --s-min, --s-max and --s-noise (defaults:
    sample's).  An option that does not apply to the solver is refused (so none is recorded that changes
    nothing)."""
    solver, churn = args.solver, args.churn is not None
    applies = {"--eta": (solver == "euler_ancestral", "--solver euler_ancestral"),
               "--churn": (solver in ("euler", "heun"), "--solver euler or heun"),
               "--s-min": (churn, "--churn"), "--s-max": (churn, "--churn"),
               "--s-noise": (churn or solver == "euler_ancestral", "--churn or --solver euler_ancestral")}
    options = dict(solver=solver)
    for option, keyword in SOLVER_OPTIONS.items():
        value = getattr(args, option[2:].replace("-", "_"))
        ok, needs = applies[option]
        if value is not None and not ok:
            raise UsageError(f"{option} applies with {needs} only (here --solver {solver})")
        options[keyword] = _given(value, SAMPLE_DEFAULTS[keyword])
    try:
        ops.check_real("--eta", options["eta"], minimum=0.0, strict=False)
        ops.check_real("--churn", options["S_churn"], minimum=0.0, strict=False)
        ops.check_real("--s-min", options["S_min"])
        ops.check_real("--s-max", options["S_max"], finite=False)
        ops.check_real("--s-noise", options["S_noise"])
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if options["S_min"] > options["S_max"]:
        raise UsageError(f"--s-min must be <= --s-max, got {options['S_min']} > {options['S_max']}")
    return options


def solver_settings(options):
    """The manifest's settings of the solver's noise options (an unbounded S_max as None: JSON has no inf)."""
    settings = {option[2:].replace("-", "_"): options[keyword] for option, keyword in SOLVER_OPTIONS.items()}
    if math.isinf(settings["s_max"]):
        settings["s_max"] = None
    return settings


def _check_solver_for(net, options):
    """Solvers that add noise as x0 + σ·ε are refused for a net that declares another signal scale (flow models)."""
    try:
        check_solver(options["solver"], options["S_churn"], options["eta"], signal_scale_of(net))
    except (TypeError, ValueError) as exc:
        option = "--churn" if options["S_churn"] > 0 else f"--solver {options['solver']}"
        raise UsageError(f"{option} does not suit the --net denoiser: {exc}") from None


def _given(value, default):
    return default if value is None else value


def guidance_rule(name, rule_args):
    """(rule for sample's guidance_rule, or None for the default, and the rule's manifest setting) from
    --rule NAME and its --rule-arg PARAM=VALUE items; each value is parsed as the type of the
    parameter's default (a number, or a word such as space=eps)."""
    if name is None:
        if rule_args:
            raise UsageError(f"--rule-arg {rule_args[0]} needs --rule NAME")
        return None, dict(DEFAULT_RULE)
    if name not in rules.RULES:
        raise UsageError(f"--rule: unknown rule {name!r}; choose one of {', '.join(rules.RULES)}")
    cls = rules.RULES[name]
    parameters = inspect.signature(cls).parameters
    kwargs = {}
    for item in rule_args:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--rule-arg: expected PARAM=VALUE, got {item!r}")
        key = key.strip()
        if key not in parameters:
            raise UsageError(f"--rule-arg {item}: rule {name} has no parameter {key!r} "
                             f"(it takes: {', '.join(parameters) or 'none'})")
        if key in kwargs:
            raise UsageError(f"--rule-arg: parameter {key!r} is given more than once")
        kwargs[key] = _rule_value(item, text.strip(), parameters[key].default)
    try:
        rule = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--rule {name}: {exc}") from None
    return rule, dict(name=rule.name, **rule.params())


def _rule_value(item, text, default):
    """text as the type of the parameter's default: an integer, a number or a word."""
    expected = {int: "an integer", float: "a number", str: "a word"}.get(type(default))
    if expected is None:
        raise UsageError(f"--rule-arg {item}: the CLI cannot set this parameter (its default is {default!r})")
    try:
        return type(default)(text)
    except ValueError:
        raise UsageError(f"--rule-arg {item}: expected {expected}") from None


def _conditioning_kind(args, source, seeds, device):
    """(number of classes for one-hot labels, whether CFG has unconditional labels).  A factory that gives
    its conditioning is called once here, on the first two seeds, to check what it returns."""
    if source.conditioning is None:
        num_classes = _num_classes(args, source.denoiser)
        return num_classes, bool(num_classes)
    for option, value in (("--num-classes", args.num_classes), ("--class", args.class_idx),
                          ("--null-class", args.null_class)):
        if value is not None:
            raise UsageError(f"{option} does not apply: the --net factory gives the conditioning")
    _, guide_labels = factory_conditioning(source.conditioning, seeds[:2], device, args.net)
    return 0, guide_labels is not None


def factory_conditioning(function, seeds, device, spec):
    """(labels, guide_labels) of the factory's conditioning(seeds, device): each None, a tensor or a
    dict of tensors with one row per seed (row k must depend on seed k only), moved to device."""
    what = f"--net: {spec}'s conditioning({format_seeds(seeds)})"
    try:
        result = function(list(seeds), device)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - the factory's code failing is bad input
        raise UsageError(f"{what} raised {type(exc).__name__}: {exc}") from None
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise UsageError(f"{what} returned a {type(result).__name__}; expected a pair (labels, guide_labels)")
    labels, guide_labels = (_to(value, device) for value in result)
    try:
        conditioning.check("labels", labels, len(seeds))
        conditioning.check("guide_labels", guide_labels, len(seeds))
        if guide_labels is not None:
            conditioning.check_pair("guide_labels", guide_labels, "labels", labels)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{what}: {exc}") from None
    return labels, guide_labels


def _to(cond, device):
    if isinstance(cond, torch.Tensor):
        return cond.to(device)
    if isinstance(cond, dict):
        return {key: _to(value, device) for key, value in cond.items()}
    return cond


def _schedule(args, source):
    """sample()'s schedule keywords: the factory's sigmas(--steps), or EDM's (--sigma-min, --sigma-max,
    --rho; defaults fastguide.plan.EDM_DEFAULTS) clamped to the net's sigma range."""
    edm_options = {"--sigma-min": args.sigma_min, "--sigma-max": args.sigma_max, "--rho": args.rho}
    if source.sigmas is not None:
        given = [option for option, value in edm_options.items() if value is not None]
        if given:
            raise UsageError(f"{given[0]} does not apply: the --net factory gives the schedule (sigmas)")
        return dict(sigmas=_factory_sigmas(source.sigmas, args.steps, args.net))
    net = source.denoiser
    sigma_min = max(_given(args.sigma_min, EDM["sigma_min"]), float(getattr(net, "sigma_min", 0.0)))
    sigma_max = min(_given(args.sigma_max, EDM["sigma_max"]), float(getattr(net, "sigma_max", math.inf)))
    rho = _given(args.rho, EDM["rho"])
    try:
        schedule(args.steps, sigma_min, sigma_max, rho)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"the noise schedule (--sigma-min, --sigma-max, --rho, clamped to the net's "
                         f"sigma range): {exc}") from None
    return dict(num_steps=args.steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)


def _factory_sigmas(function, steps, spec):
    what = f"--net: {spec}'s sigmas({steps})"
    try:
        sigmas = function(steps)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - the factory's code failing is bad input
        raise UsageError(f"{what} raised {type(exc).__name__}: {exc}") from None
    try:
        values = check_sigmas(sigmas)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{what}: {exc}") from None
    if len(values) != steps + 1:
        raise UsageError(f"{what} gave {len(values)} noise levels; expected --steps + 1 = {steps + 1}")
    return sigmas.detach().cpu()


def _check_positive(option, value):
    if value < 1:
        raise UsageError(f"{option} must be >= 1, got {value}")


def _device(name, local_rank):
    if name is None:
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"--device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available")
    try:  # the samples' noise is drawn there, and the samples are read back from there
        torch.Generator(device)
        torch.zeros(1, device=device).cpu()
    except Exception as exc:  # noqa: BLE001 - any failure here means the device cannot be sampled on
        raise UsageError(f"--device {name}: cannot sample there ({type(exc).__name__}: {exc}); "
                         "expected a device holding data, e.g. cpu, cuda or cuda:1") from None
    return device


def _num_classes(args, net):
    num_classes = args.num_classes if args.num_classes is not None else int(getattr(net, "label_dim", 0) or 0)
    if num_classes < 0:
        raise UsageError(f"--num-classes must be >= 0, got {num_classes}")
    for option, value in (("--class", args.class_idx), ("--null-class", args.null_class)):
        if value is not None and not 0 <= value < max(num_classes, 0):
            raise UsageError(f"{option} {value} needs --num-classes N with 0 <= {value} < N (got N={num_classes})")
    return num_classes


def _parse_shape(text):
    if text is None:
        return None
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise UsageError(f"--shape: expected positive integers like 3,64,64, got {text!r}")
    return shape


def _check_shape(what, shape):
    """A factory's shape as a tuple of positive integers."""
    try:
        items = list(shape)
    except TypeError:
        items = []
    if not items or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in items):
        raise UsageError(f"{what} must be a sequence of positive integers like (4, 64, 64), got {shape!r}")
    return tuple(items)


def _net_shape(net):
    channels, resolution = getattr(net, "img_channels", None), getattr(net, "img_resolution", None)
    if channels is None or resolution is None:
        raise UsageError("--shape C,H,W is needed: the net has no img_channels/img_resolution attributes")
    return (int(channels), int(resolution), int(resolution))


def _check_format(fmt, shape):
    if fmt == "png" and (len(shape) != 3 or shape[0] not in PNG_MODES):
        raise UsageError(f"--format png needs samples of shape C,H,W with C = 1, 3 or 4 channels, the samples "
                         f"have shape {','.join(map(str, shape))} (use --format npz, or another --shape)")


def _to_device(module, device):
    if isinstance(module, torch.nn.Module):
        module = module.to(device).eval()
    return module


# ---------------------------------------------------------------- the output folder

def seed_path(outdir, seed, fmt):
    """outdir/000000/000123.png: one folder per thousand seeds, as EDM2 lays them out."""
    return os.path.join(outdir, f"{seed // 1000 * 1000:06d}", f"{seed:06d}.{fmt}")


def _seed_folders(outdir, seeds, fmt):
    return sorted({os.path.dirname(seed_path(outdir, seed, fmt)) for seed in seeds})


def _check_outdir(outdir, seeds, fmt):
    """Before anything is loaded or written: every folder the run writes to is, or can be made, a
    writable folder, and no seed's path is taken by a folder."""
    for folder in [outdir, *_seed_folders(outdir, seeds, fmt)]:
        existing = os.path.abspath(folder)
        while not os.path.lexists(existing):  # the nearest part of the path that exists
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise UsageError(f"--outdir: cannot write to {folder!r}: {existing!r} is not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UsageError(f"--outdir: cannot write to {folder!r}: {existing!r} is not writable")
    taken = [seed for seed in seeds if os.path.isdir(seed_path(outdir, seed, fmt))]
    if taken:
        raise UsageError(f"--outdir: the paths of seeds {format_seeds(taken)} are folders, e.g. "
                         f"{seed_path(outdir, taken[0], fmt)!r}; move them away")


def sample_settings(plan):
    """What decides the samples (the manifest's settings; a rerun into the same outdir must match).

    Not here, as they do not change which samples are drawn: --seeds (which seeds, each sampled alike
    whatever the others), --outdir, and how the same computation is carried out: --batch, --device,
    --backend, --strategy and the number of processes (these can change the last float bits, never
    more).  The dtype is float32, always.  The schedule is EDM's (sigma_min, sigma_max, rho) or the
    --net factory's (sigmas, the list of noise levels); an unbounded --s-max is None."""
    args, schedule = plan["args"], plan["schedule"]
    sigmas = schedule.get("sigmas")
    return dict(net=args.net, guide=args.guide, guidance=args.guidance, interval=args.interval,
                rule=plan["rule_setting"], steps=args.steps, solver=args.solver,
                **solver_settings(plan["solver_options"]), sigma_min=schedule.get("sigma_min"), sigma_max=schedule.get("sigma_max"), rho=schedule.get("rho"),
                sigmas=None if sigmas is None else check_sigmas(sigmas),
                num_classes=plan["num_classes"], **{"class": args.class_idx}, null_class=args.null_class,
                shape=list(plan["shape"]), format=args.format)


def _open_outdir(plan):
    """Checks the manifest, makes the folders (proving each writable), writes the manifest and
    removes temporary files that their writers left behind."""
    args, outdir = plan["args"], plan["outdir"]
    settings = sample_settings(plan)
    path = os.path.join(outdir, MANIFEST)
    found = _read_manifest(path, args.force)
    if found is not None and not args.force:
        _check_settings(path, found, settings)
    folders = _seed_folders(outdir, plan["seeds"], args.format)
    for folder in [outdir, *folders]:
        _make_folder(folder)
    data = json.dumps(dict(manifest=1, settings=settings), indent=2).encode()
    if args.force and found != settings:
        write_atomically(path, data)
    elif found is None:
        try:
            write_atomically(path, data, exclusive=True)
        except FileExistsError:  # another process made it since: its settings must match too
            _check_settings(path, _read_manifest(path, force=False), settings)
    for folder in folders:
        remove_stale_temporaries(folder)


def _read_manifest(path, force):
    """The manifest's settings, or None if there is none (or, with --force, it cannot be read)."""
    try:
        with open(path, "rb") as f:
            settings = json.loads(f.read())["settings"]
        if not isinstance(settings, dict):
            raise ValueError(f"its settings are a {type(settings).__name__}, not a mapping")
        return settings
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if force:
            return None
        raise UsageError(f"--outdir: cannot read {path} ({type(exc).__name__}: {exc}); "
                         "pass --force to replace it") from None


def _check_settings(path, found, settings):
    differing = [f"{SETTING_NAMES.get(key, '--' + key.replace('_', '-'))} {_found(found, key)!r} there, "
                 f"{value!r} here" for key, value in settings.items() if _found(found, key) != value]
    if differing:
        raise UsageError(f"--outdir holds samples made with other settings ({path}): {'; '.join(differing)}. "
                         "Use another --outdir, or pass --force to sample into it anyway")


def _found(found, key):
    """A manifest's setting; one added since it was written (absent) is what its run used, the default."""
    return found[key] if key in found else SETTINGS_ADDED.get(key)


# Settings added to the manifest since its first version, with the values that runs before them used.
SETTINGS_ADDED = dict(rule=DEFAULT_RULE, sigmas=None, **solver_settings(SAMPLE_DEFAULTS))


def _make_folder(folder):
    """Creates the folder and proves that a file can be written there."""
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = _create_temporary(folder, "write-test")
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise UsageError(f"--outdir: {folder!r} is not writable: {exc.strerror or exc}") from None


# ---------------------------------------------------------------- files

def write_atomically(path, data, *, exclusive=False):
    """Writes data to a temporary name of this writer's own in the same folder, flushes it to disk,
    then renames it to path: the file is whole or absent, and writers of the same path never share a
    temporary file.  exclusive: raise FileExistsError rather than replace an existing file."""
    fd, temporary = _create_temporary(*os.path.split(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            os.link(temporary, path)
        else:
            os.replace(temporary, path)
            temporary = None
    finally:
        if temporary is not None:
            _remove_if_present(temporary)


def _create_temporary(folder, name):
    """A new hidden file '.NAME~HOST~PID~RANDOM.tmp' in folder: (open descriptor, path)."""
    while True:
        path = os.path.join(folder, f".{name}~{HOST}~{os.getpid()}~{secrets.token_hex(4)}.tmp")
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path
        except FileExistsError:
            continue


def remove_stale_temporaries(folder):
    """Removes the temporary files in folder whose writers are gone: on this machine, processes that
    no longer run (or this one); on others, files older than STALE_AFTER_S."""
    for entry in os.scandir(folder):
        match = re.fullmatch(r"\..+~([^~]+)~([0-9]+)~[0-9a-f]+\.tmp", entry.name)
        if match is None:
            continue
        if _is_stale(entry, host=match[1], pid=int(match[2])):
            _remove_if_present(entry.path)


def _is_stale(entry, host, pid):
    if host == HOST:
        return pid == os.getpid() or not _process_exists(pid)
    try:
        return time.time() - entry.stat(follow_symlinks=False).st_mtime > STALE_AFTER_S
    except FileNotFoundError:  # removed meanwhile (by its writer, or another run's clean-up)
        return False


def _process_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        pass
    return True


def _remove_if_present(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def is_complete(path, fmt, shape):
    """Whether path holds a whole result file of this shape (what a rerun may skip)."""
    try:
        return _npz_is_complete(path, shape) if fmt == "npz" else _png_is_complete(path, shape)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return False


def _npz_is_complete(path, shape):
    with zipfile.ZipFile(path) as archive:  # the central directory is the file's end: a cut file has none
        if sorted(archive.namelist()) != NPZ_MEMBERS:
            return False
        with archive.open("x.npy") as member:
            version = np.lib.format.read_magic(member)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            array_shape, _, dtype = read_header(member)
    return array_shape == tuple(shape) and dtype == np.float32


def _png_is_complete(path, shape):
    from PIL import Image
    with Image.open(path) as image:
        if image.format != "PNG" or image.mode != PNG_MODES[shape[0]] or image.size != (shape[2], shape[1]):
            return False
    with open(path, "rb") as f:
        f.seek(-len(PNG_END), os.SEEK_END)
        return f.read() == PNG_END


def _write_sample(outdir, seed, fmt, sample_chw, class_label):
    path = seed_path(outdir, seed, fmt)
    data = _png_bytes(sample_chw) if fmt == "png" else _npz_bytes(sample_chw, seed, int(class_label))
    try:
        write_atomically(path, data)
    except OSError as exc:
        raise OutputError(f"seed {seed}: cannot write {path}: {exc.strerror or exc}") from exc


def _npz_bytes(sample_chw, seed, class_label):
    """An .npz (x: float32 C×H×W, seed, class_label or -1) with fixed zip timestamps: same input, same bytes."""
    arrays = dict(x=sample_chw.numpy().astype(np.float32), seed=np.int64(seed), class_label=np.int64(class_label))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), member.getvalue())
    return buffer.getvalue()


def _png_bytes(sample_chw):
    """8-bit PNG of x in [-1, 1] (EDM2's conversion: x·127.5 + 128, clipped); 1, 3 or 4 channels."""
    from PIL import Image
    pixels = (sample_chw * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    image = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------- sampling

def _sample_batches(plan, rank, world_size):
    args = plan["args"]
    batches = [plan["seeds"][i:i + args.batch] for i in range(0, len(plan["seeds"]), args.batch)]
    my_batches = batches[rank::world_size]
    counts = dict(rank=rank, written=0, skipped=0, batches_run=0, net_calls=0, guide_calls=0,
                  evaluations_per_sample=None, sampling_s=0.0, backend=None, failed={})
    from tqdm.auto import tqdm
    with tqdm(total=sum(len(b) for b in my_batches), unit="img", desc="fastguide sample", disable=rank != 0) as bar:
        for batch_seeds in my_batches:
            missing = [s for s in batch_seeds
                       if not is_complete(seed_path(plan["outdir"], s, args.format), args.format, plan["shape"])]
            if missing:
                _run_batch(plan, batch_seeds, missing, counts)
            counts["skipped"] += len(batch_seeds) - len(missing)
            bar.update(len(batch_seeds))
    return counts


def _run_batch(plan, batch_seeds, missing, counts):
    """Samples one batch and writes its missing files; a failed batch or non-finite sample is counted
    in counts["failed"] (reason -> seeds) and not written."""
    started = time.perf_counter()
    try:
        samples, labels, stats = _sample_batch(plan, batch_seeds)
    except (DenoiserOutputError, FloatingPointError, UsageError) as exc:  # UsageError: the factory's conditioning
        counts["failed"].setdefault(str(exc), []).extend(missing)
        return
    finally:
        counts["sampling_s"] += time.perf_counter() - started
        counts["batches_run"] += 1
    for row, seed in enumerate(batch_seeds):
        if seed not in missing:
            continue
        if not bool(torch.isfinite(samples[row]).all()):
            counts["failed"].setdefault("the sample is not finite (NaN or inf)", []).append(seed)
            continue
        _write_sample(plan["outdir"], seed, plan["args"].format, samples[row], labels[row])
        counts["written"] += 1
    counts["net_calls"] += stats["net"]
    counts["guide_calls"] += stats["guide"]
    counts["evaluations_per_sample"] = dict(net=stats["net"], guide=stats["guide"])
    counts["backend"] = stats["backend"]


def class_labels(plan, generators):
    """Class per seed (--class K, or one drawn from the seed's generator after its noise, as EDM2 does)."""
    args, num_classes = plan["args"], plan["num_classes"]
    if args.class_idx is not None:
        return torch.full((len(generators),), args.class_idx, dtype=torch.long)
    return torch.stack([torch.randint(num_classes, size=(), generator=g, device=g.device) for g in generators]).cpu()


def _labels(plan, batch_seeds, randn):
    """(labels, guide_labels, class per row or -1) of a batch: the --net factory's conditioning, or
    one-hot classes.  guide_labels (the unconditional labels) only for CFG: a --guide sees labels."""
    args, device, num_classes = plan["args"], plan["device"], plan["num_classes"]
    classes = torch.full((len(batch_seeds),), -1, dtype=torch.long)
    cfg = plan["guide"] is None and args.guidance != 1
    if plan["conditioning"] is not None:
        labels, guide_labels = factory_conditioning(plan["conditioning"], batch_seeds, device, args.net)
        return labels, guide_labels if cfg else None, classes
    if not num_classes:
        return None, None, classes
    classes = class_labels(plan, randn.generators)
    labels = torch.eye(num_classes, device=device)[classes.to(device)]
    guide_labels = None
    if cfg:
        guide_labels = torch.zeros_like(labels)
        if args.null_class is not None:
            guide_labels[:, args.null_class] = 1
    return labels, guide_labels, classes


def _sample_batch(plan, batch_seeds):
    """(samples [B, *shape] on CPU, class per row or -1, sampler stats) for one batch.

    Each seed's generator draws its noise, then its class (if drawn), then the noise that churn and
    euler_ancestral add during sampling: that noise continues the seed's own stream, so it is not a
    replay of the initial noise, depends on the seed only, and is the noise EDM's generate.py draws
    (randn_like=StackedRandomGenerator.randn_like)."""
    args = plan["args"]
    randn = SeededRandn(batch_seeds, plan["device"])
    noise = randn.randn(plan["shape"])
    labels, guide_labels, classes = _labels(plan, batch_seeds, randn)
    with torch.no_grad():
        samples, stats = sample(plan["net"], noise, labels=labels, guide=plan["guide"], guide_labels=guide_labels,
                                guidance=args.guidance, guidance_interval=args.interval, randn_like=randn,
                                backend=args.backend, strategy=plan["strategy"], return_stats=True,
                                guidance_rule=plan["rule"], **plan["schedule"], **plan["solver_options"])
    return samples.float().cpu(), classes, stats


def _report_failures(all_counts, rank):
    """Exit code 1 (every rank) if any seed failed; rank 0 names them, one line per reason."""
    failed = {}
    for counts in all_counts:
        for reason, seeds in counts["failed"].items():
            failed.setdefault(reason, []).extend(seeds)
    if rank == 0:
        for reason, seeds in failed.items():
            _error(f"seeds {format_seeds(seeds)} were not written: {reason}", 1)
    return 1 if failed else 0


# ---------------------------------------------------------------- run record

def _gather(counts, world_size):
    if world_size == 1:
        return [counts]
    gathered = [None] * world_size
    torch.distributed.all_gather_object(gathered, counts)
    return gathered


def _versions():
    import fastguide
    versions = dict(fastguide=fastguide.__version__, torch=torch.__version__, numpy=np.__version__,
                    python=platform.python_version())
    if "diffusers" in sys.modules:
        versions["diffusers"] = sys.modules["diffusers"].__version__
    return versions


def _write_record(args, plan, all_counts, world_size, total_s):
    """outdir/run-<UTC time>.json: arguments, versions, backend, timings and evaluation counts."""
    arguments = {k: v for k, v in vars(args).items() if k != "func"}
    written = sum(c["written"] for c in all_counts)
    sampling_s = max(c["sampling_s"] for c in all_counts)
    record = dict(
        command="fastguide sample", arguments=arguments, versions=_versions(),
        device=str(plan["device"]), world_size=world_size,
        backend=next((c["backend"] for c in all_counts if c["backend"]), None),
        resolved=dict(shape=list(plan["shape"]), num_classes=plan["num_classes"],
                      sigma_min=plan["schedule"].get("sigma_min"), sigma_max=plan["schedule"].get("sigma_max"),
                      strategy=plan["strategy"], seeds=len(plan["seeds"])),
        timings=dict(total_s=total_s, sampling_s=sampling_s, setup_s=max(c["setup_s"] for c in all_counts),
                     samples_per_s=written / sampling_s if sampling_s > 0 else None),
        counts=dict(written=written, skipped=sum(c["skipped"] for c in all_counts),
                    failed=sum(len(s) for c in all_counts for s in c["failed"].values()),
                    batches_run=sum(c["batches_run"] for c in all_counts),
                    net_calls=sum(c["net_calls"] for c in all_counts),
                    guide_calls=sum(c["guide_calls"] for c in all_counts),
                    evaluations_per_sample=next((c["evaluations_per_sample"] for c in all_counts
                                                 if c["evaluations_per_sample"]), None)),
        ranks=all_counts,
    )
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    data = json.dumps(record, indent=2, default=str).encode()
    try:
        write_atomically(os.path.join(plan["outdir"], f"run-{stamp}.json"), data)
    except OSError as exc:
        raise OutputError(f"cannot write the run record to {plan['outdir']}: {exc.strerror or exc}") from exc

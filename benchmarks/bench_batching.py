"""Guided evaluation strategies against the naive two calls, all measured in one run.

Prints markdown tables: milliseconds per guided evaluation (D = D0 + w·(D1 − D0)) and per 32-step
Heun run (best of several rounds; the variants take turns in each round so that all see the same
load), and each one's speed relative to the naive version (naive time / time: > 1 is faster):
naive = two plain calls and an eager combination (the Heun run: a plain PyTorch loop), then
fastguide's strategies, "auto", and compile=True.  Then the guidance-interval check (time of a
run with guidance_interval=(0.28, 5.42) relative to the full guided run, against what its
evaluation counts predict) and compute operators per evaluation (the GPU kernel-launch proxy).

    python benchmarks/bench_batching.py                       # batches 1, 8, 64
    python benchmarks/bench_batching.py --batches 8 --quick   # a smoke run
"""
import argparse
import statistics
import sys
import time

import torch
from torch import nn
from torch.nn import functional as F

import fastguide
from fastguide import batching, reference
from fastguide.sampler import run_sampler, schedule

INTERVAL = (0.28, 5.42)
NUM_CLASSES = 10


class ConvDenoiser(nn.Module):
    """A small EDM-style conv denoiser: 4 convolutions of 64 channels on 3×32×32 images, class labels."""

    def __init__(self, width=64, channels=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.convs = nn.ModuleList([nn.Conv2d(channels, width, 3, padding=1), nn.Conv2d(width, width, 3, padding=1),
                                    nn.Conv2d(width, width, 3, padding=1), nn.Conv2d(width, channels, 3, padding=1)])
        self.noise_proj = nn.Linear(1, width)
        self.label_emb = nn.Embedding(NUM_CLASSES, width)
        self.sigma_data = 0.5

    def forward(self, x, sigma, labels=None):
        sigma = sigma.reshape(-1, 1, 1, 1)
        norm = (sigma ** 2 + self.sigma_data ** 2).sqrt()
        emb = self.noise_proj(sigma.log().reshape(-1, 1) / 4)
        if labels is not None:
            emb = emb + self.label_emb(labels)
        h = F.silu(self.convs[0](x / norm) + emb[:, :, None, None])
        h = F.silu(self.convs[2](F.silu(self.convs[1](h))))
        return self.sigma_data ** 2 / norm ** 2 * x + sigma * self.sigma_data / norm * self.convs[3](h)


class PlainMLP(nn.Module):
    """The toy model's size (5 linear layers of 64, SiLU) with an explicit output, so that vmap can stack it."""

    def __init__(self, hidden=64, layers=5, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        dims = [3] + [hidden] * (layers - 1) + [2]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.label_emb = nn.Embedding(NUM_CLASSES, hidden)

    def forward(self, x, sigma, labels=None):
        c_in = 1 / (0.25 + sigma ** 2).sqrt()
        h = self.layers[0](torch.cat([x * c_in[:, None], sigma.log()[:, None] / 4], dim=1))
        if labels is not None:
            h = h + self.label_emb(labels)
        for layer in self.layers[1:]:
            h = layer(F.silu(h))
        return x * (0.25 * c_in ** 2)[:, None] + (sigma * 0.5 * c_in)[:, None] * h


def toy_model(seed):
    from fastguide.toy.model import ToyModel
    torch.manual_seed(seed)
    model = ToyModel(hidden=64).eval()
    with torch.no_grad():
        model.gain.fill_(1.0)
    return model


def make_cases():
    """(name, net, guide, guide_labels?, sample shape, strategies to time)."""
    return [
        ("conv autoguidance", ConvDenoiser(seed=1).eval(), ConvDenoiser(seed=2).eval(), False, (3, 32, 32),
         ["separate", "stacked", "auto"]),
        ("conv CFG", ConvDenoiser(seed=1).eval(), None, True, (3, 32, 32), ["separate", "cfg-batch", "auto"]),
        ("MLP autoguidance", PlainMLP(seed=1).eval(), PlainMLP(seed=2).eval(), False, (2,),
         ["separate", "stacked", "auto"]),
        ("toy ToyModel autoguidance", toy_model(1), toy_model(2), False, (2,), ["separate", "auto"]),
    ]


def inputs(shape, batch, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *shape, generator=gen)
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=gen)
    return x, labels, torch.zeros_like(labels)


def timed(fns, reps, budget_s=60.0):
    """{name: best seconds} of the callables in fns, called in turn (round robin), so that every
    variant sees the same machine load; rounds stop after reps, or once budget_s is spent."""
    best = {name: float("inf") for name in fns}
    spent = 0.0
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            seconds = time.perf_counter() - start
            best[name] = min(best[name], seconds)
            spent += seconds
        if spent > budget_s:
            break
    return best


def naive_eval(net, guide, guidance, null_labels):
    """Two plain calls and the eager combination."""
    guide_net = net if guide is None else guide

    def evaluate(x, sigma, labels):
        d_main = net(x, sigma, labels)
        d_guide = guide_net(x, sigma, labels if null_labels is None else null_labels)
        return reference.guide(d_main, d_guide, guidance)
    return evaluate


def naive_heun(denoise, noise, labels, num_steps=32):
    """EDM's deterministic Heun sampler in plain PyTorch around a guided denoiser (x, sigma[B], labels)."""
    t_steps = schedule(num_steps, 0.002, 80.0, 7.0)
    x = noise * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        d_cur = (x - denoise(x, torch.full((x.shape[0],), t_cur), labels)) / t_cur
        x_next = x + (t_next - t_cur) * d_cur
        if i < num_steps - 1:
            d_next = (x_next - denoise(x_next, torch.full((x.shape[0],), t_next), labels)) / t_next
            x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_next)
        x = x_next
    return x


def guided_kwargs(guide, null_labels, guidance=2.0):
    return dict(guide=guide, guide_labels=null_labels, guidance=guidance)


def bench_case(case, batch, args):
    """({variant: seconds per guided evaluation}, {variant: seconds per Heun run}, {variant: strategy used})."""
    name, net, guide, cfg, shape, strategies = case
    x, labels, null = inputs(shape, batch)
    null_labels = null if cfg else None
    sigma = torch.full((batch,), 1.3)
    naive = naive_eval(net, guide, 2.0, null_labels)
    evals = {"naive": lambda: naive(x, sigma, labels)}
    runs = {"naive": lambda: naive_heun(naive, x, labels, args.steps)}
    denoisers = {}
    for variant in strategies + ([] if args.skip_compile else ["compile"]):
        options = dict(strategy="auto", compile=True) if variant == "compile" else dict(strategy=variant)
        kwargs = dict(**guided_kwargs(guide, null_labels), **options)
        denoisers[variant] = denoiser = fastguide.GuidedDenoiser(net, **kwargs)
        evals[variant] = lambda d=denoiser: d(x, sigma, labels)
        runs[variant] = lambda kw=kwargs: fastguide.sample(net, x, labels=labels, num_steps=args.steps, **kw)
    tuning = (batching.WARMUP_REPS + batching.TIMED_REPS) * 3 + 1
    for variant, fn in evals.items():  # warm-up, auto's tuning rounds and compilation: untimed
        for _ in range(tuning if variant in ("auto", "compile") else 2):
            fn()
    chosen = {variant: d.stats["strategy"] for variant, d in denoisers.items()}
    return timed(evals, args.reps), timed(runs, args.run_reps), chosen


def interval_check(case, batch, args):
    """(measured time ratio interval/full, ratio predicted by evaluation counts)."""
    name, net, guide, cfg, shape, _ = case
    x, labels, null = inputs(shape, batch)
    kwargs = dict(labels=labels, num_steps=args.steps, return_stats=True, **guided_kwargs(guide, null if cfg else None))
    stats = {}
    runs = {key: lambda key=key, interval=interval: stats.__setitem__(
        key, fastguide.sample(net, x, guidance_interval=interval, **kwargs)[1])
        for key, interval in (("full", None), ("interval", INTERVAL))}  # auto is tuned already (bench_case)
    seconds = timed(runs, args.run_reps)
    t_full, t_int, s_full, s_int = seconds["full"], seconds["interval"], stats["full"], stats["interval"]
    # With the guide as costly as net, time follows net + guide evaluations (a 2B call counts as two).
    predicted = (s_int["net"] + s_int["guide"]) / (s_full["net"] + s_full["guide"])
    return t_int / t_full, predicted, s_int


def op_counts(case, batch):
    """Compute operators dispatched per guided evaluation (the GPU launch proxy) for each strategy."""
    name, net, guide, cfg, shape, strategies = case
    x, labels, null = inputs(shape, batch)
    counts = {}
    for strategy in ["naive"] + [s for s in strategies if s != "auto"]:
        if strategy == "naive":
            fn = naive_eval(net, guide, 2.0, null if cfg else None)
            call = lambda: fn(x, torch.full((batch,), 1.3), labels)  # noqa: E731
        else:
            denoiser = fastguide.GuidedDenoiser(net, **guided_kwargs(guide, null if cfg else None),
                                                strategy=strategy, check_finite=False)
            call = lambda: denoiser(x, 1.3, labels)  # noqa: E731
        try:
            call()
            with batching.ComputeOpCounter() as counter:
                call()
        except RuntimeError as exc:
            counts[strategy] = f"n/a ({str(exc)[:40]}…)"
            continue
        counts[strategy] = len(counter.ops)
    return counts


def step_op_counts(case, batch=1):
    """Compute operators per middle Heun step (a 3-step run minus a 2-step run), for each variant."""
    name, net, guide, cfg, shape, strategies = case
    x, labels, null = inputs(shape, batch)
    null_labels = null if cfg else None

    def per_step(run):
        counts = []
        for num_steps in (2, 3):
            with batching.ComputeOpCounter() as counter:
                run(num_steps)
            counts.append(len(counter.ops))
        return counts[1] - counts[0]

    naive = naive_eval(net, guide, 2.0, null_labels)
    counts = {"naive loop": per_step(lambda n: naive_heun(naive, x, labels, n))}
    for strategy in [s for s in strategies if s != "auto"]:
        for check in (True, False):
            label = strategy + ("" if check else ", check_finite=False")
            try:
                counts[label] = per_step(lambda n: run_sampler(
                    fastguide.GuidedDenoiser(net, **guided_kwargs(guide, null_labels), strategy=strategy,
                                             check_finite=check), x, labels=labels, num_steps=n))
            except RuntimeError:
                counts[label] = "n/a"
    return counts


def fmt_row(label, times, baseline, chosen=None):
    cells = []
    for key, seconds in times.items():
        cell = f"{1e3 * seconds:.3g} ms ({baseline / seconds:.2f}×)"
        if chosen and key in ("auto", "compile") and chosen.get(key):
            cell += f" → {chosen[key]}"
        cells.append(cell)
    return f"| {label} | " + " | ".join(cells) + " |"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=10, help="rounds of timed guided evaluations (best of)")
    parser.add_argument("--run-reps", type=int, default=3, help="rounds of timed Heun runs (best of; fewer "
                                                                   "once a minute is spent)")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="few reps, 8 steps: a smoke run")
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--cases", nargs="+", default=["conv", "MLP", "toy"],
                        help="the cases whose name starts with one of these words")
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.run_reps, args.steps = 2, 1, 8
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), device cpu, fused-op backend "
          f"{fastguide.dispatch.resolve('auto', 'cpu')}, Heun with {args.steps} steps\n")
    cases = [case for case in make_cases() if case[0].split()[0] in args.cases]
    with torch.no_grad():
        for case in cases:
            headers = None
            for batch in args.batches:
                evals, runs, chosen = bench_case(case, batch, args)
                if headers is None:
                    headers = list(evals)
                    print(f"### {case[0]}\n")
                    print("| batch, measure | " + " | ".join(headers) + " |")
                    print("|---" * (len(headers) + 1) + "|")
                print(fmt_row(f"{batch}, per evaluation", evals, evals["naive"], chosen))
                print(fmt_row(f"{batch}, per Heun run", runs, runs["naive"], chosen))
                sys.stdout.flush()
            print()
        print("### guidance interval (0.28, 5.42]: time of the run relative to the full guided run\n")
        print("| case, batch | measured | predicted by evaluation counts | within +10 % | net, guide evals |")
        print("|---|---|---|---|---|")
        for case in cases:
            for batch in args.batches:
                measured, predicted, stats = interval_check(case, batch, args)
                ok = "yes" if measured <= predicted * 1.10 else "NO"
                print(f"| {case[0]}, {batch} | {measured:.3f} | {predicted:.3f} | {ok} | "
                      f"{stats['net']}, {stats['guide']} |")
                sys.stdout.flush()
        print("\n### compute operators per guided evaluation (GPU kernel-launch proxy, views excluded), batch 8\n")
        print("| case | " + " | ".join(["naive", "separate", "cfg-batch / stacked"]) + " |")
        print("|---|---|---|---|")
        for case in cases:
            counts = op_counts(case, 8)
            other = counts.get("cfg-batch", counts.get("stacked", "n/a (no vmap: autograd score inside)"))
            ratio = f" ({other / counts['naive']:.2f}×)" if isinstance(other, int) else ""
            print(f"| {case[0]} | {counts['naive']} | {counts['separate']} | {other}{ratio} |")
        print("\n### compute operators per Heun step (Euler + Heun evaluations and updates), batch 1\n")
        for case in cases:
            counts = step_op_counts(case)
            print(f"- {case[0]}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()

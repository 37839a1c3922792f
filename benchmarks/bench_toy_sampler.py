"""The fused toy sampler against fastguide.sample with the reference backend, same models, same run.

    .venv/bin/python benchmarks/bench_toy_sampler.py [--points 16384] [--steps 32] [--guidance 3]
        [--repeats 3] [--threads 2]

Prints a markdown table: wall time (best of --repeats) of the reference sampler (ToyModel with
autograd + reference ops) and of sample_toy with the C++ kernel, their ratio, and the achieved
GFLOP/s of each (nominal count: per point and model evaluation 4·(4H + L·H²) FLOPs — forward
and input-gradient — for L hidden layers of width H; the C++ kernel folds the output layer's
forward and backward into one product, so it performs 1/8 fewer FLOPs than counted).
The shipped models "main" and "guide_auto" are used when their weights exist.
"""
import argparse
import time

import torch

from fastguide import sample
from fastguide.sampler import schedule
from fastguide.toy.fused import sample_toy, step_table
from fastguide.toy.model import ToyModel, load_model


def models():
    try:
        return load_model("main"), load_model("guide_auto"), "shipped main (H=64) + guide_auto (H=32)"
    except (OSError, FileNotFoundError, ImportError):
        torch.manual_seed(0)
        main, guide = ToyModel(64), ToyModel(32)
        with torch.no_grad():
            main.gain.fill_(0.15)
            guide.gain.fill_(0.1)
        return main.eval(), guide.eval(), "random ToyModels (H=64 + H=32)"


def flop_count(main, guide, points, num_steps, guidance):
    """Nominal FLOPs of the guided Heun run: forward + input-gradient of every evaluated model."""
    def per_eval(model):
        return 4 * (4 * model.hidden + model.num_layers * model.hidden ** 2)
    table = step_table(schedule(num_steps, 0.002, 80.0, 7.0), guidance, None, "heun")
    evals = len(table) + int(table[:, 4].sum())
    guided = int(table[:, 2].sum() + table[:, 3].sum())
    return points * (evals * per_eval(main) + guided * per_eval(guide))


def best_time(run, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main_cli():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference-repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    main, guide, description = models()
    noise = torch.randn(args.points, 2, generator=torch.Generator().manual_seed(0))
    options = dict(guidance=args.guidance, num_steps=args.steps)

    fused = sample_toy(main, guide, noise, backend="cpp", **options)  # warm-up, and the result to compare
    t_cpp = best_time(lambda: sample_toy(main, guide, noise, backend="cpp", **options), args.repeats)
    with torch.no_grad():
        reference = sample(main, noise, guide=guide, backend="reference", **options)
        t_ref = best_time(lambda: sample(main, noise, guide=guide, backend="reference", **options),
                          args.reference_repeats)
    flops = flop_count(main, guide, args.points, args.steps, args.guidance)
    error = (fused - reference).abs().max().item()

    print(f"{description}; {args.points} points, {args.steps} Heun steps, autoguidance w={args.guidance}, "
          f"{args.threads} threads; {flops / 1e9:.1f} GFLOP nominal; max |cpp − reference| = {error:.2g}\n")
    print("| sampler | time (s) | speed-up vs reference | GFLOP/s |")
    print("|---|---:|---:|---:|")
    print(f"| fastguide.sample, backend='reference' | {t_ref:.3f} | 1.0x | {flops / t_ref / 1e9:.1f} |")
    print(f"| sample_toy, backend='cpp' (fused) | {t_cpp:.3f} | {t_ref / t_cpp:.1f}x | {flops / t_cpp / 1e9:.1f} |")


if __name__ == "__main__":
    main_cli()

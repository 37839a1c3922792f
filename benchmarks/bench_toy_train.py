"""Toy-model training speed: the ground-truth score and the training step, fused against naive.

Prints markdown tables (best of several rounds, the variants taking turns in each round so that
all see the same load; ratio = naive time / time, > 1 is faster):
  1. the ground-truth score of one training batch (4096 points × 1016 components):
     naive PyTorch (the same eigen-form 2×2 math as [N, K] tensors, float32) vs fastguide_toy::mixture_score;
  2. one training step of the main model (hidden 64, batch 4096) without the score: autograd
     double backward vs the hand-written gradients of fastguide.toy.train.loss_and_grads;
  3. one whole iteration (batch sampling + ground-truth score + step + EMA), naive vs fastguide,
     and the main model's projected training time (× 4096 iterations).
With --full it also trains the main model end to end (4096 iterations) and reports the wall time.

    python benchmarks/bench_toy_train.py                 # tables 1-3
    python benchmarks/bench_toy_train.py --full          # ... and a full training of the main model
    python benchmarks/bench_toy_train.py --quick         # a smoke run (fewer repeats)
"""
import argparse
import time

import torch

from fastguide.toy import train as T
from fastguide.toy.mixture import score_and_logp_reference, tree_mixture
from fastguide.toy.model import ToyModel

BATCH = 4096


def best_times(variants, rounds, repeats):
    """{name: (best wall seconds, best CPU seconds) per call}, the variants interleaved in every round.
    CPU time (all threads) is what a shared machine's load inflates least."""
    best = {name: (float("inf"), float("inf")) for name in variants}
    for fn in variants.values():
        fn()
    for _ in range(rounds):
        for name, fn in variants.items():
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(repeats):
                fn()
            wall, cpu = (time.perf_counter() - wall) / repeats, (time.process_time() - cpu) / repeats
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    return best


def table(title, times, naive):
    lines = [f"### {title}", "", "| variant | wall ms | CPU ms | speed vs naive (wall) | (CPU) |",
             "|---|---:|---:|---:|---:|"]
    for name, (wall, cpu) in times.items():
        lines.append(f"| {name} | {wall * 1e3:.2f} | {cpu * 1e3:.2f} | {times[naive][0] / wall:.2f}× "
                     f"| {times[naive][1] / cpu:.2f}× |")
    print("\n".join(lines) + "\n")


def naive_score(mixture, x, sigma):
    return score_and_logp_reference(x, sigma, *mixture.components(), torch.float32)[0]


def autograd_step(model, optimizer, x, sigma, target):
    model.normalize_weights()
    optimizer.zero_grad(set_to_none=True)
    loss = T.score_matching_loss(model, x, sigma, target)
    loss.backward()
    optimizer.step()
    return loss


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument("--full", action="store_true", help="also train the main model end to end")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds, repeats = (2, 1) if args.quick else (5, 3)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {BATCH}\n")

    mixture = tree_mixture("A")
    generator = torch.Generator().manual_seed(0)
    x, sigma, target = T.sample_batch(mixture, BATCH, generator)
    times = best_times({"naive PyTorch (float32)": lambda: naive_score(mixture, x, sigma),
                        "fastguide_toy::mixture_score": lambda: mixture.score(x, sigma)}, rounds, repeats)
    table("Ground-truth score, 4096 points × 1016 components", times, "naive PyTorch (float32)")

    torch.manual_seed(0)
    model = ToyModel(64, 4)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    times = best_times({"autograd (double backward)": lambda: autograd_step(model, optimizer, x, sigma, target),
                        "hand-written gradients": lambda: T.training_step(model, optimizer, x, sigma, target)},
                       rounds, repeats)
    table("Training step of the main model (hidden 64), without the ground truth", times, "autograd (double backward)")

    ema = T.PowerEMA(model, 0.010)

    def iteration(score_fn, step_fn):
        y = mixture.sample(BATCH, generator=generator)
        s = torch.exp(torch.randn(BATCH, generator=generator) * T.P_STD + T.P_MEAN)
        noisy = y + s[:, None] * torch.randn(BATCH, 2, generator=generator)
        step_fn(model, optimizer, noisy, s, score_fn(noisy, s))
        ema.update(model, 100)

    times = best_times({"naive (PyTorch score + autograd)": lambda: iteration(lambda a, b: naive_score(mixture, a, b),
                                                                              autograd_step),
                        "fastguide (kernel + hand-written)": lambda: iteration(mixture.score, T.training_step)},
                       rounds, repeats)
    table("One training iteration (sample, ground truth, step, EMA)", times, "naive (PyTorch score + autograd)")
    for name, (wall, cpu) in times.items():
        print(f"- {name}: main model (4096 iterations) projected {wall * 4096:.0f} s wall, {cpu * 4096:.0f} s CPU")
    if args.full:
        wall, cpu = time.perf_counter(), time.process_time()
        T.train_shipped("main")
        print(f"\n- full training of the main model (4096 iterations): {time.perf_counter() - wall:.1f} s wall, "
              f"{time.process_time() - cpu:.1f} s CPU")


if __name__ == "__main__":
    main()

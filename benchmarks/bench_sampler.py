"""The sampler's own overhead: whole guided runs with nearly free denoisers, fastguide.sample against
the same loop written the k-diffusion way in eager PyTorch, per solver, in one run.

    python benchmarks/bench_sampler.py [--elements 4M] [--steps 16] [--repeats 5] [--threads N]

The denoisers return precomputed tensors (no model work), so what is timed is the sampler: the
guidance combination, the solver update, history, noise.  Both sides draw the same noise with
torch.randn_like.  Each fastguide run is checked against the naive loop before it is timed.
Prints a markdown table: the best time per run over the repeats, and naive / fastguide.
"""
import argparse
import math
import time

import torch

import fastguide
from fastguide import reference

GUIDANCE = 2.5


class Constant:
    """A nearly free denoiser: the same prediction tensor every call."""

    def __init__(self, value):
        self.value = value

    def __call__(self, x, sigma, labels=None):
        return self.value


def naive_run(net, guide, noise, sigmas, solver, guidance=GUIDANCE):
    """The guided loop as k-diffusion's samplers and a CFG wrapper write it (eager, one op per term)."""
    x = noise * sigmas[0]
    s_in = x.new_ones([x.shape[0]])

    def denoise(x, sigma):
        cond, uncond = net(x, sigma * s_in), guide(x, sigma * s_in)
        return uncond + (cond - uncond) * guidance

    old_denoised = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        if solver == "dpmpp_2m":
            t, t_next = -math.log(sigma), -math.log(sigma_next) if sigma_next > 0 else math.inf
            h = t_next - t
            if old_denoised is None or sigma_next == 0:
                x = (sigma_next / sigma) * x - math.expm1(-h) * denoised
            else:
                r = (t + math.log(sigmas[i - 1])) / h
                denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
                x = (sigma_next / sigma) * x - math.expm1(-h) * denoised_d
            old_denoised = denoised
            continue
        if solver == "euler_ancestral":
            sigma_down, sigma_up = reference.ancestral_step(sigma, sigma_next)
            d = (x - denoised) / sigma
            x = x + d * (sigma_down - sigma)
            if sigma_next > 0:
                x = x + torch.randn_like(x) * sigma_up
            continue
        d = (x - denoised) / sigma
        dt = sigma_next - sigma
        if solver == "euler" or sigma_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - denoise(x_2, sigma_next)) / sigma_next
            x = x + (d + d_2) / 2 * dt
    return x


def best_time(fn, repeats, seed):
    best = math.inf
    for _ in range(repeats):
        torch.manual_seed(seed)
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(elements, steps, repeats):
    shape = (4, elements // 4)
    gen = torch.Generator().manual_seed(0)
    noise, cond, uncond = (torch.randn(shape, generator=gen) for _ in range(3))
    net, guide = Constant(cond), Constant(uncond)
    sigmas = reference.edm_sigmas(steps).tolist()
    rows = []
    for solver in fastguide.sampler.SOLVERS:
        def fast():
            return fastguide.sample(net, noise, guide=guide, guidance=GUIDANCE, solver=solver,
                                    sigmas=torch.tensor(sigmas, dtype=torch.float64))

        def naive():
            with torch.no_grad():
                return naive_run(net, guide, noise, sigmas, solver)
        torch.manual_seed(1)
        got = fast()
        torch.manual_seed(1)
        torch.testing.assert_close(got, naive(), rtol=1e-4, atol=1e-4)
        t_naive, t_fast = best_time(naive, repeats, 1), best_time(fast, repeats, 1)
        rows.append((solver, t_naive, t_fast))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", default="4M", help="elements of x, e.g. 4M or 1048576")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    elements = int(float(args.elements[:-1]) * 2 ** 20) if args.elements.endswith("M") else int(args.elements)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = measure(elements, args.steps, args.repeats)
    print(f"\nWhole guided runs, {args.steps} steps, x of {elements:,} float32 elements, nearly free denoisers, "
          f"{torch.get_num_threads()} threads, backend {fastguide.dispatch.resolve('auto', 'cpu')}, "
          f"best of {args.repeats}\n")
    print("| solver | naive k-diffusion-style loop (s) | fastguide.sample (s) | naive / fastguide |")
    print("|---|---|---|---|")
    for solver, t_naive, t_fast in rows:
        print(f"| {solver} | {t_naive:.3f} | {t_fast:.3f} | {t_naive / t_fast:.2f}× |")


if __name__ == "__main__":
    main()

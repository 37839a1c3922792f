"""Each guidance rule fused with the Euler update (fastguide.rules: pass 1 moments, pass 2 rule +
Euler) against the naive path: diffusers' guider forward on the ε predictions, then the Euler
update in eager PyTorch (EulerDiscreteScheduler.step's expressions), and a plain copy.

    python benchmarks/bench_rules.py [--shape 4 4 1024 1024] [--repeats 7] [--backend cpp] [--threads N]

Prints a markdown table: best time per step over the repeats, speed-up over naive, and the
bandwidth over the bytes the fused path must move (pass 1 reads x, D1, D0; pass 2 reads them
again and writes x_next and deriv: 32 bytes per float32 element; APG with momentum also reads m
twice and writes it: 44), next to the copy's (read + write: 8 bytes per element).
"""
import argparse
import time

import torch

from fastguide import rules
from fastguide.core import Buffers
from fastguide.plan import Evaluation

SIGMA, SIGMA_NEXT, GUIDANCE = 2.0, 1.6, 5.0


def make_inputs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * (1 + SIGMA ** 2) ** 0.5
    d1 = torch.randn(shape, generator=g)
    d0 = 0.9 * d1 + 0.3 * torch.randn(shape, generator=g)
    return x, d1, d0


def rule_cases():
    return [("CFGRescale(phi=0.7)", rules.CFGRescale(phi=0.7, space="eps")),
            ("APG(eta=0.5, norm_threshold=15, momentum=-0.5)",
             rules.APG(eta=0.5, norm_threshold=15.0, momentum=-0.5, space="eps")),
            ("CFGZeroStar()", rules.CFGZeroStar(zero_init_steps=0, space="eps"))]


def diffusers_guider(rule):
    from diffusers.guiders import AdaptiveProjectedGuidance, ClassifierFreeGuidance, ClassifierFreeZeroStarGuidance
    if isinstance(rule, rules.CFGRescale):
        return ClassifierFreeGuidance(guidance_scale=GUIDANCE, guidance_rescale=rule.phi)
    if isinstance(rule, rules.APG):
        return AdaptiveProjectedGuidance(guidance_scale=GUIDANCE, adaptive_projected_guidance_momentum=rule.momentum,
                                         adaptive_projected_guidance_rescale=rule.norm_threshold, eta=rule.eta)
    return ClassifierFreeZeroStarGuidance(guidance_scale=GUIDANCE, zero_init_steps=rule.zero_init_steps)


def naive_step(guider, step, x, eps1, eps0):
    """diffusers' guider on the ε outputs, then EulerDiscreteScheduler.step's update, eager."""
    guider.set_state(step=step, num_inference_steps=1000, timestep=torch.tensor(500))
    guider.prepare_inputs({})
    eps = guider.forward(eps1, eps0).pred
    denoised = x - SIGMA * eps
    derivative = (x - denoised) / SIGMA
    return x + derivative * (SIGMA_NEXT - SIGMA)


def best_of(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", type=int, nargs="+", default=[4, 4, 1024, 1024])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--backend", default="cpp")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = tuple(args.shape)
    numel = torch.Size(shape).numel()
    x, d1, d0 = make_inputs(shape)
    eps1, eps0 = (x - d1) / SIGMA, (x - d0) / SIGMA
    ops = rules.rule_ops(args.backend, "cpu")
    ev = Evaluation(step=1, stage="euler", sigma=SIGMA, guided=True, t_cur=SIGMA, t_next=SIGMA_NEXT)
    copy_out = torch.empty_like(x)
    copy_s = best_of(lambda: copy_out.copy_(x), args.repeats)
    copy_gbs = 8 * numel / copy_s / 1e9
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, backend {args.backend}, shape {shape} "
          f"({numel:,} float32 elements), best of {args.repeats}\n")
    print("| rule | naive (ms) | fused (ms) | speed-up | fused GB/s | % of copy GB/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, rule in rule_cases():
        guider = diffusers_guider(rule)
        naive_step(guider, 0, x, eps1, eps0)   # step 0 creates APG's momentum buffer
        naive_s = best_of(lambda: naive_step(guider, 1, x, eps1, eps0), args.repeats)
        run = rules.RuleRun(rule, GUIDANCE, ops, x.device)
        bufs = Buffers.allocate(x.clone(), "euler")
        flag = torch.zeros(1, dtype=torch.int32)
        run.epilogue(None, ev, bufs, bufs.x, d1, d0, flag, None, None)   # creates the momentum state
        fused_s = best_of(lambda: run.epilogue(None, ev, bufs, bufs.x, d1, d0, flag, None, None), args.repeats)
        fused_bytes = (44 if rule.stateful else 32) * numel
        gbs = fused_bytes / fused_s / 1e9
        print(f"| {name} | {naive_s * 1e3:.1f} | {fused_s * 1e3:.1f} | {naive_s / fused_s:.1f}x | {gbs:.1f} | "
              f"{100 * gbs / copy_gbs:.0f} % |")
    print(f"| copy (read + write) | | {copy_s * 1e3:.1f} | | {copy_gbs:.1f} | 100 % |")


if __name__ == "__main__":
    main()

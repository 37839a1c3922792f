"""The fused guided step (guided_euler + guided_heun) against the naive eager expressions of an
EDM2-style sampler loop, torch.compile of the same expressions, and a plain copy, in one run.

    python benchmarks/bench_ops.py [--sizes 1M 16M] [--repeats 15] [--backend cpp] [--no-compile] [--threads N]

Prints a markdown table: the best time per step over the repeats (on a shared, noisy machine
the minimum is the steadiest estimate of what the code costs), speed-up over naive eager, and the bandwidth
achieved over the bytes the fused ops must move (5 tensors each: 40 bytes per float32 element
per step), next to the copy's bandwidth (read + write: 8 bytes per element).
"""
import argparse
import time

import torch

from fastguide import ops

GUIDANCE, T_CUR, T_NEXT = 2.5, 1.3, 0.9
FUSED_BYTES_PER_ELEMENT = 40  # Euler: read x, d_main, d_guide, write x_next, deriv; Heun: read 4, write 1
COPY_BYTES_PER_ELEMENT = 8
H100_BANDWIDTH = 3.0e12  # bytes/s, HBM3 (H100 SXM, 3.35 TB/s peak; 3.0 as an achievable figure)


def make_inputs(numel, seed=0):
    """x and the two predictions at each of the step's two evaluations (float32, random)."""
    generator = torch.Generator().manual_seed(seed)
    names = ("x", "d_main", "d_guide", "d_main_next", "d_guide_next")
    return {name: torch.randn(numel, generator=generator) for name in names}


def naive_euler(x, d_main, d_guide, guidance=GUIDANCE, t_cur=T_CUR, t_next=T_NEXT):
    """The Euler half of an EDM2-style guided Heun step, as eager PyTorch writes it."""
    denoised = d_guide.lerp(d_main, guidance)
    d_cur = (x - denoised) / t_cur
    return x + (t_next - t_cur) * d_cur, d_cur


def naive_heun(x, x_next, d_cur, d_main_next, d_guide_next, guidance=GUIDANCE, t_cur=T_CUR, t_next=T_NEXT):
    """The Heun correction, with the predictions made at x_next (by a model call in between)."""
    denoised = d_guide_next.lerp(d_main_next, guidance)
    d_prime = (x_next - denoised) / t_next
    return x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)


def naive_step(x, d_main, d_guide, d_main_next, d_guide_next, euler=naive_euler, heun=naive_heun):
    """One step. The model call between the halves means x_next and d_cur exist in memory, so a
    compiler sees (and may fuse) each half, not the whole step."""
    x_next, d_cur = euler(x, d_main, d_guide)
    return heun(x, x_next, d_cur, d_main_next, d_guide_next)


def fused_step_fn(inputs, backend):
    """The same step with the fused ops into buffers allocated once (as fastguide.sample does)."""
    x = inputs["x"]
    x_next, deriv, out = torch.empty_like(x), torch.empty_like(x), torch.empty_like(x)

    def step():
        ops.guided_euler(x, inputs["d_main"], inputs["d_guide"], GUIDANCE, T_CUR, T_NEXT, out=x_next,
                         deriv_out=deriv, backend=backend)
        return ops.guided_heun(x, deriv, inputs["d_main_next"], inputs["d_guide_next"], GUIDANCE, T_CUR, T_NEXT,
                               out=out, backend=backend)
    return step


def copy_fn(inputs):
    x = inputs["x"]
    target = torch.empty_like(x)
    return lambda: target.copy_(x)


def best_seconds(fn, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def check_same_result(inputs, fused, compiled):
    """The variants compute the same step (float32 rounding apart), so the timings compare like with like."""
    want = naive_step(*inputs.values())
    for name, fn in (("fused", fused), ("torch.compile", compiled)):
        if fn is not None:
            torch.testing.assert_close(fn(), want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def measure(numel, repeats, backend, with_compile):
    """{variant: seconds per step} for one size."""
    inputs = make_inputs(numel)
    fused = fused_step_fn(inputs, backend)
    compiled = None
    if with_compile:
        euler, heun = (torch.compile(fn, fullgraph=True, dynamic=False) for fn in (naive_euler, naive_heun))
        compiled = lambda: naive_step(*inputs.values(), euler=euler, heun=heun)  # noqa: E731
    check_same_result(inputs, fused, compiled)
    variants = {"naive eager": lambda: naive_step(*inputs.values())}
    if compiled is not None:
        variants["torch.compile (inductor)"] = compiled
    variants[f"fused ({backend})"] = fused
    variants["copy (same bytes/element: r+w)"] = copy_fn(inputs)
    return {name: best_seconds(fn, repeats) for name, fn in variants.items()}


def table(numel, seconds):
    naive = seconds["naive eager"]
    copy_name = next(name for name in seconds if name.startswith("copy"))
    copy_bandwidth = COPY_BYTES_PER_ELEMENT * numel / seconds[copy_name]
    rows = ["| elements | variant | time/step (ms) | speed-up vs naive | GB/s over fused bytes | % of copy GB/s |",
            "|---:|---|---:|---:|---:|---:|"]
    for name, t in seconds.items():
        bytes_moved = (COPY_BYTES_PER_ELEMENT if name == copy_name else FUSED_BYTES_PER_ELEMENT) * numel
        bandwidth = bytes_moved / t
        rows.append(f"| {numel:,} | {name} | {t * 1e3:.2f} | {naive / t:.2f}x | {bandwidth / 1e9:.1f} | "
                    f"{100 * bandwidth / copy_bandwidth:.0f} % |")
    return "\n".join(rows)


def h100_roofline(numel):
    fused = FUSED_BYTES_PER_ELEMENT * numel
    return (f"H100 roofline at {numel:,} float32 elements: fused step moves {fused / 1e6:.0f} MB -> "
            f"{fused / H100_BANDWIDTH * 1e3:.3f} ms at {H100_BANDWIDTH / 1e12:.1f} TB/s "
            f"({fused / 2 / H100_BANDWIDTH * 1e6:.0f} us per op)")


def parse_size(text):
    units = {"K": 2 ** 10, "M": 2 ** 20}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["1M", "16M"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--backend", default="cpp")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for every variant (default: torch's); 1 on an oversubscribed machine")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, backend {args.backend}, "
          f"best of {args.repeats}\n")
    for size in args.sizes:
        numel = parse_size(size)
        print(table(numel, measure(numel, args.repeats, args.backend, not args.no_compile)))
        print(f"\n{h100_roofline(numel)}\n")


if __name__ == "__main__":
    main()

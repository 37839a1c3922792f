"""The fused guided epilogues against the naive eager expressions of the samplers they serve,
torch.compile of the same expressions, and a plain copy, in one run per epilogue:

- heun: one guided EDM2-style Heun step (guided_euler, then guided_heun after the model call),
- ancestral: one guided step of k-diffusion's sample_euler_ancestral (guided_euler with noise),
- dpmpp_2m: one guided second-order step of k-diffusion's sample_dpmpp_2m (guided_dpmpp_2m, its
  D written over the one history buffer that held D_prev).

    python benchmarks/bench_ops.py [--epilogues heun ancestral dpmpp_2m] [--sizes 1M 16M] [--repeats 15]
                                   [--backend cpp] [--device cpu] [--no-compile] [--threads N] [--clock wall]

Prints a markdown table per epilogue and size: the best time per step over the repeats (on a
shared, noisy machine the minimum is the steadiest estimate of what the code costs), speed-up
over naive eager, and the bandwidth achieved over the bytes the fused ops must move (heun: 40,
ancestral and dpmpp_2m: 24 bytes per float32 element per step), next to the copy's bandwidth
(read + write: 8 bytes per element).  The fused ops run twice: without and with the non-finite
flags (the sampler passes them).  The noise of the ancestral step is drawn before timing, for
every variant alike.
"""
import argparse
import dataclasses
import math
import time

import torch

from fastguide import ops, reference

GUIDANCE, T_CUR, T_NEXT = 2.5, 1.3, 0.9
SIGMA_PREV = 1.8  # the previous step's σ, for the second-order DPM-Solver++(2M) step
S_NOISE = 1.0
COPY_BYTES_PER_ELEMENT = 8
H100_BANDWIDTH = 3.0e12  # bytes/s, HBM3 (H100 SXM, 3.35 TB/s peak; 3.0 as an achievable figure)


# ---- the naive expressions (as the samplers write them in eager PyTorch) ----

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


def cfg_denoised(cond, uncond, cond_scale):
    """k-diffusion-style classifier-free guidance: uncond + (cond − uncond)·scale."""
    return uncond + (cond - uncond) * cond_scale


def to_d(x, sigma, denoised):
    """k-diffusion's to_d: the ODE derivative (x − D)/σ."""
    return (x - denoised) / sigma


def naive_ancestral(x, cond, uncond, noise, cond_scale=GUIDANCE, sigma=T_CUR, sigma_next=T_NEXT, s_noise=S_NOISE):
    """One step of k-diffusion's sample_euler_ancestral on a CFG-combined prediction."""
    denoised = cfg_denoised(cond, uncond, cond_scale)
    sigma_down, sigma_up = reference.ancestral_step(sigma, sigma_next)
    d = to_d(x, sigma, denoised)
    dt = sigma_down - sigma
    x = x + d * dt
    return x + noise * s_noise * sigma_up


def naive_dpmpp_2m(x, cond, uncond, old_denoised, cond_scale=GUIDANCE, sigma_prev=SIGMA_PREV, sigma=T_CUR,
                   sigma_next=T_NEXT):
    """One second-order step of k-diffusion's sample_dpmpp_2m on a CFG-combined prediction;
    returns (x_next, D) (D is the next step's old_denoised)."""
    denoised = cfg_denoised(cond, uncond, cond_scale)
    t, t_next = -math.log(sigma), -math.log(sigma_next)
    h = t_next - t
    h_last = t + math.log(sigma_prev)
    r = h_last / h
    denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
    return (math.exp(-t_next) / math.exp(-t)) * x - math.expm1(-h) * denoised_d, denoised


# ---- the fused ops into buffers allocated once (as the sampler does) ----

def flags_buffer(inputs, with_flags):
    return torch.zeros(1, dtype=torch.int32, device=inputs["x"].device) if with_flags else None


def fused_step_fn(inputs, backend, with_flags=False):
    """The Heun step with the fused ops."""
    x = inputs["x"]
    x_next, deriv, out = torch.empty_like(x), torch.empty_like(x), torch.empty_like(x)
    flags = flags_buffer(inputs, with_flags)

    def step():
        ops.guided_euler(x, inputs["d_main"], inputs["d_guide"], GUIDANCE, T_CUR, T_NEXT, out=x_next,
                         deriv_out=deriv, flags=flags, backend=backend)
        return ops.guided_heun(x, deriv, inputs["d_main_next"], inputs["d_guide_next"], GUIDANCE, T_CUR, T_NEXT,
                               out=out, flags=flags, backend=backend)
    step.flags = flags  # (None without flags)
    return step


def fused_ancestral_fn(inputs, backend, with_flags=False):
    x = inputs["x"]
    x_next, deriv = torch.empty_like(x), torch.empty_like(x)
    flags = flags_buffer(inputs, with_flags)
    sigma_down, sigma_up = reference.ancestral_step(T_CUR, T_NEXT)

    def step():
        return ops.guided_euler(x, inputs["cond"], inputs["uncond"], GUIDANCE, T_CUR, sigma_down, out=x_next,
                                deriv_out=deriv, noise=inputs["noise"], noise_scale=sigma_up * S_NOISE, flags=flags,
                                backend=backend)[0]
    step.flags = flags  # (None without flags)
    return step


def fused_dpmpp_2m_fn(inputs, backend, with_flags=False):
    """D is written over the history buffer that holds D_prev (read, then written, per element):
    the first call reads old_denoised, later ones the D of the call before (same cost)."""
    x = inputs["x"]
    x_next, history = torch.empty_like(x), inputs["old_denoised"].clone()
    flags = flags_buffer(inputs, with_flags)
    coefs = reference.dpmpp_2m_coefficients(SIGMA_PREV, T_CUR, T_NEXT)

    def step():
        return ops.guided_dpmpp_2m(x, inputs["cond"], inputs["uncond"], history, GUIDANCE, *coefs, out=x_next,
                                   denoised_out=history, flags=flags, backend=backend)
    step.flags = flags  # (None without flags)
    return step


@dataclasses.dataclass(frozen=True)
class Epilogue:
    inputs: tuple        # names of the float32 inputs
    fused_bytes: int     # bytes per element the fused ops must move
    naive: object        # (*inputs) -> result(s)
    fused: object        # (inputs, backend, with_flags) -> step function returning the same result(s)
    compiled: object     # () -> the naive step with torch.compile'd pieces


def compiled_heun_step():
    euler, heun = (torch.compile(fn, fullgraph=True, dynamic=False) for fn in (naive_euler, naive_heun))
    return lambda *tensors: naive_step(*tensors, euler=euler, heun=heun)


EPILOGUES = {
    # Euler: read x, d_main, d_guide, write x_next, deriv; Heun: read x, deriv, d_main, d_guide, write x_next
    "heun": Epilogue(("x", "d_main", "d_guide", "d_main_next", "d_guide_next"), 40, naive_step, fused_step_fn,
                     compiled_heun_step),
    # read x, cond, uncond, noise; write x_next, deriv
    "ancestral": Epilogue(("x", "cond", "uncond", "noise"), 24, naive_ancestral, fused_ancestral_fn,
                          lambda: torch.compile(naive_ancestral, fullgraph=True, dynamic=False)),
    # read x, cond, uncond, D_prev; write x_next, D
    "dpmpp_2m": Epilogue(("x", "cond", "uncond", "old_denoised"), 24, naive_dpmpp_2m, fused_dpmpp_2m_fn,
                         lambda: torch.compile(naive_dpmpp_2m, fullgraph=True, dynamic=False)),
}


def make_inputs(numel, seed=0, names=EPILOGUES["heun"].inputs, device="cpu"):
    """The named inputs, float32, random."""
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(numel, generator=generator).to(device) for name in names}


def copy_fn(inputs):
    x = inputs["x"]
    target = torch.empty_like(x)
    return lambda: target.copy_(x)


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# wall: elapsed time.  cpu: the calling thread's CPU time (user + system), which on a shared,
# oversubscribed machine leaves out the time slices other processes took (meaningful with one
# torch thread, where the ops run on the calling thread; CPU tensors only).
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def best_seconds(fn, repeats, warmup=2, device="cpu", clock="wall"):
    now = CLOCKS[clock]
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = now()
        fn()
        synchronize(device)
        times.append(now() - start)
    return min(times)


def check_same_result(epilogue, inputs, variants):
    """The variants compute the same step (float32 rounding apart), so the timings compare like
    with like.  Runs before any timing: each variant's first call."""
    want = epilogue.naive(*inputs.values())
    for name, fn in variants.items():
        got = fn()
        for a, b in zip(*(r if isinstance(r, tuple) else (r,) for r in (got, want))):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def measure(name, numel, repeats, backend, with_compile, device="cpu", clock="wall"):
    """{variant: seconds per step} for one epilogue and size."""
    epilogue = EPILOGUES[name]
    inputs = make_inputs(numel, names=epilogue.inputs, device=device)
    variants = {"naive eager": lambda: epilogue.naive(*inputs.values())}
    if with_compile:
        compiled = epilogue.compiled()
        variants["torch.compile (inductor)"] = lambda: compiled(*inputs.values())
    variants[f"fused ({backend})"] = epilogue.fused(inputs, backend)
    variants[f"fused ({backend}) + flags"] = epilogue.fused(inputs, backend, with_flags=True)
    check_same_result(epilogue, inputs, {k: v for k, v in variants.items() if k != "naive eager"})
    variants["copy (r+w of one tensor)"] = copy_fn(inputs)
    return {variant: best_seconds(fn, repeats, device=device, clock=clock) for variant, fn in variants.items()}


def table(name, numel, seconds):
    naive = seconds["naive eager"]
    fused_bytes = EPILOGUES[name].fused_bytes
    copy_name = next(variant for variant in seconds if variant.startswith("copy"))
    copy_bandwidth = COPY_BYTES_PER_ELEMENT * numel / seconds[copy_name]
    rows = [f"{name}, {fused_bytes} fused bytes/element",
            "",
            "| elements | variant | time/step (ms) | speed-up vs naive | GB/s over fused bytes | % of copy GB/s |",
            "|---:|---|---:|---:|---:|---:|"]
    for variant, t in seconds.items():
        bytes_moved = (COPY_BYTES_PER_ELEMENT if variant == copy_name else fused_bytes) * numel
        bandwidth = bytes_moved / t
        rows.append(f"| {numel:,} | {variant} | {t * 1e3:.2f} | {naive / t:.2f}x | {bandwidth / 1e9:.1f} | "
                    f"{100 * bandwidth / copy_bandwidth:.0f} % |")
    return "\n".join(rows)


def h100_roofline(name, numel):
    fused = EPILOGUES[name].fused_bytes * numel
    return (f"H100 roofline at {numel:,} float32 elements: the fused {name} step moves {fused / 1e6:.0f} MB -> "
            f"{fused / H100_BANDWIDTH * 1e3:.3f} ms at {H100_BANDWIDTH / 1e12:.1f} TB/s")


def parse_size(text):
    units = {"K": 2 ** 10, "M": 2 ** 20}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epilogues", nargs="+", default=list(EPILOGUES), choices=list(EPILOGUES))
    parser.add_argument("--sizes", nargs="+", default=["1M", "16M"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--backend", default="cpp")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (with --backend cuda or triton)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for every variant (default: torch's); 1 on an oversubscribed machine")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="wall time, or the thread's CPU time (needs --threads 1 and --device cpu)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and (torch.get_num_threads() != 1 or args.device != "cpu"):
        parser.error("--clock cpu counts the calling thread only: use it with --threads 1 on --device cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
          f"backend {args.backend}, best of {args.repeats}, {args.clock} clock\n")
    for name in args.epilogues:
        for size in args.sizes:
            numel = parse_size(size)
            print(table(name, numel, measure(name, numel, args.repeats, args.backend, not args.no_compile,
                                             args.device, args.clock)))
            print(f"\n{h100_roofline(name, numel)}\n", flush=True)


if __name__ == "__main__":
    main()

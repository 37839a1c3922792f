"""fastguide against diffusers' own sampling loop, end to end on tiny but real diffusers models (CPU).

Two models, batch 8, 32 steps, classifier-free guidance w = 4:
  unet  a class-conditional UNet2DModel (ε-prediction, 3×32×32, EulerDiscreteScheduler)
  sd3   an SD3-style SD3Transformer2DModel (flow matching, 4×32×32 latent, FlowMatchEulerDiscreteScheduler shift 3,
        prompt embeddings [8, 16, 64] and pooled embeddings [8, 64] as a dict of conditioning)
Variants, each on the same noise and conditioning:
  diffusers         the plain loop: CFG on one 2B batch, scheduler.scale_model_input (ε) and scheduler.step
  fastguide         fastguide.sample, Euler on the scheduler's own σ's / t's: the same evaluations
  fastguide+interval  the same with the guide only inside the guidance interval (EDM2's (0.28, 5.42] for the UNet,
                    the same range as t = σ/(1+σ) for the flow model)
  fastguide dpm++   DPM-Solver++(2M) at 16 steps (half the evaluations)
Prints a markdown table: best-of-rounds seconds per run, wall clock and this process's CPU time (with one
thread the CPU time is what the run itself costs, less disturbed by other processes on a shared machine;
the variants take turns in every round, so they see the same load), evaluations per sample (net + guide;
a 2B CFG call counts one of each), the time relative to diffusers' loop (diffusers / variant: > 1 is
faster) and the final x's difference from diffusers' (relative max error: the first two variants compute
the same thing).

    python benchmarks/bench_diffusers.py                  # both models, 5 rounds, 1 thread
    python benchmarks/bench_diffusers.py --quick          # a smoke run (batch 2, 4 steps, 1 round)
"""
import argparse
import time

import torch

import diffusers
import fastguide
from fastguide.adapters import DiffusersDenoiser, FlowMatchDenoiser, flow_sigmas

NUM_CLASSES = 10
GUIDANCE = 4.0
EDM_INTERVAL = (0.28, 5.42)


def tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, num_class_embeds=NUM_CLASSES + 1).eval()


def tiny_sd3():
    torch.manual_seed(0)
    return diffusers.SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=64, pooled_projection_dim=64,
        pos_embed_max_size=32).eval()


class UnetCase:
    """UNet2DModel (ε), class labels; the null class is the extra index NUM_CLASSES."""
    name = "unet"

    def __init__(self, batch, steps):
        self.model = tiny_unet()
        self.scheduler = diffusers.EulerDiscreteScheduler(num_train_timesteps=1000)
        self.steps = steps
        generator = torch.Generator().manual_seed(1)
        self.noise = torch.randn(batch, 3, 32, 32, generator=generator)
        self.labels = torch.randint(0, NUM_CLASSES, (batch,), generator=generator)
        self.null = torch.full((batch,), NUM_CLASSES)
        self.denoiser = DiffusersDenoiser(self.model, self.scheduler)
        self.interval = EDM_INTERVAL

    def sigmas(self, steps):
        self.scheduler.set_timesteps(steps)
        return self.scheduler.sigmas

    def diffusers_loop(self):
        scheduler = self.scheduler
        scheduler.set_timesteps(self.steps)
        latents = self.noise * scheduler.init_noise_sigma
        both = torch.cat([self.labels, self.null])
        for t in scheduler.timesteps:
            out = self.model(scheduler.scale_model_input(torch.cat([latents] * 2), t), t, class_labels=both).sample
            cond, uncond = out.chunk(2)
            latents = scheduler.step(uncond + GUIDANCE * (cond - uncond), t, latents).prev_sample
        return latents

    def start(self, sigmas):
        return self.noise  # fastguide starts at noise·σ_0 = diffusers' noise·init_noise_sigma


class Sd3Case:
    """SD3Transformer2DModel (flow), prompt and pooled embeddings as a dict."""
    name = "sd3"

    def __init__(self, batch, steps):
        self.model = tiny_sd3()
        self.scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
        self.steps = steps
        generator = torch.Generator().manual_seed(1)
        self.noise = torch.randn(batch, 4, 32, 32, generator=generator)
        self.labels, self.null = ({"encoder_hidden_states": torch.randn(batch, 16, 64, generator=generator),
                                   "pooled_projections": torch.randn(batch, 64, generator=generator)}
                                  for _ in range(2))
        self.denoiser = FlowMatchDenoiser(self.model, self.scheduler)
        self.interval = tuple(s / (1 + s) for s in EDM_INTERVAL)

    def sigmas(self, steps):
        return flow_sigmas(self.scheduler, steps)

    def diffusers_loop(self):
        scheduler = self.scheduler
        scheduler.set_timesteps(self.steps)
        latents = self.noise
        both = {key: torch.cat([self.null[key], self.labels[key]]) for key in self.labels}
        for t in scheduler.timesteps:
            v = self.model(hidden_states=torch.cat([latents] * 2), timestep=t.expand(2 * latents.shape[0]),
                           return_dict=False, **both)[0]
            uncond, cond = v.chunk(2)
            latents = scheduler.step(uncond + GUIDANCE * (cond - uncond), t, latents, return_dict=False)[0]
        return latents

    def start(self, sigmas):
        return self.noise  # t_0 = 1: fastguide's noise·t_0 is diffusers' noise


def variants(case):
    """(name, run() -> (x, evaluations of net + guide per sample))."""
    steps = case.steps

    def diffusers_run():
        return case.diffusers_loop(), 2 * steps

    def fastguide_run(solver="euler", num_steps=steps, interval=None):
        sigmas = case.sigmas(num_steps)
        x, stats = fastguide.sample(case.denoiser, case.start(sigmas), labels=case.labels, guide_labels=case.null,
                                    guidance=GUIDANCE, guidance_interval=interval, sigmas=sigmas, solver=solver,
                                    return_stats=True)
        return x, stats["net"] + stats["guide"]

    return [("diffusers loop", diffusers_run),
            ("fastguide", fastguide_run),
            ("fastguide + interval", lambda: fastguide_run(interval=case.interval)),
            (f"fastguide dpm++(2M), {steps // 2} steps", lambda: fastguide_run("dpmpp_2m", steps // 2))]


def measure(case, rounds):
    """{name: (best wall seconds, best CPU seconds, evaluations, x)}; the variants take turns in each round,
    and each round starts at the next variant (a fixed order let the one after diffusers' loop pay for it)."""
    runs = variants(case)
    wall, cpu, results = {}, {}, {}
    with torch.no_grad():
        for round_index in range(rounds):
            shift = round_index % len(runs)
            for name, run in runs[shift:] + runs[:shift]:
                start, start_cpu = time.perf_counter(), time.process_time()
                x, evaluations = run()
                wall[name] = min(wall.get(name, float("inf")), time.perf_counter() - start)
                cpu[name] = min(cpu.get(name, float("inf")), time.process_time() - start_cpu)
                results[name] = (evaluations, x)
    return {name: (wall[name], cpu[name], *results[name]) for name, _ in runs}  # table order: diffusers first


def table(case, results):
    base_wall, base_cpu, _, base_x = results["diffusers loop"]
    lines = [f"### {case.name}: {type(case.model).__name__}, batch {case.noise.shape[0]}, {case.steps} steps, "
             f"CFG w = {GUIDANCE}",
             "| variant | wall s | CPU s | evaluations / sample | diffusers / variant (wall) | (CPU) "
             "| rel. difference of x |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, (seconds, cpu, evaluations, x) in results.items():
        error = ((x - base_x).abs().max() / base_x.abs().max()).item()
        lines.append(f"| {name} | {seconds:.3f} | {cpu:.3f} | {evaluations} | {base_wall / seconds:.2f} "
                     f"| {base_cpu / cpu:.2f} | {error:.1e} |")
    return "\n".join(lines)


def main_cli(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=["unet", "sd3"], default=["unet", "sd3"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="batch 2, 4 steps, 1 round")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.steps, args.rounds = 2, 4, 1
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, {args.threads} thread(s), "
          f"best of {args.rounds} round(s)\n")
    cases = {"unet": UnetCase, "sd3": Sd3Case}
    outputs = []
    for name in args.models:
        case = cases[name](args.batch, args.steps)
        outputs.append(table(case, measure(case, args.rounds)))
        print(outputs[-1] + "\n", flush=True)
    return outputs


if __name__ == "__main__":
    main_cli()

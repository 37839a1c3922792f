"""EDM2's toy sampling protocol, and the runs of the demo and the benchmarks that follow it.

EDM2's toy example (toy_example.py of NVlabs/edm2) samples from ground-truth samples of class A
noised to σ_max = 5 (not from pure noise at σ = 80), with EDM's Heun sampler, 32 steps, ρ = 7,
σ_min = 0.002, and guides the main model (class A, width 64, 4096 iterations) with guide_auto
(class A, width 32, 512 iterations) for autoguidance or guide_cfg (classes A+B, width 32, 512
iterations) for classifier-free guidance.

fastguide's samplers start at noise·σ_max, so the start is handed to them as noise = x_start/σ_max:
every run from the same noise starts from the very same x (the samplers compute noise·σ_max).

Runs through fastguide.sample evaluate the ToyModels by autograd: many small ops, which one torch
thread runs fastest and steadiest (on a busy 2-core machine two threads were 10-70× slower).
"""
import numbers

import torch

from fastguide._threads import torch_threads

SIGMA_MAX = 5.0
SIGMA_MIN = 0.002
RHO = 7.0
NUM_STEPS = 32
GUIDES = {"none": None, "cfg": "guide_cfg", "autoguidance": "guide_auto"}
# Model evaluations per step (Heun: 2 per step, but none for the correction of the last step).
EVALUATIONS_PER_STEP = {"euler": 1, "heun": 2, "dpmpp_2m": 1, "euler_ancestral": 1}


def start_noise(ground_truth, n, seed):
    """noise [n, 2] float32 with noise·σ_max = ground-truth samples noised to σ_max (EDM2's start)."""
    return ground_truth.sample(n, generator=seed, sigma=SIGMA_MAX) / SIGMA_MAX


def evaluations(solver, num_steps):
    """Model evaluations of a run (of the main model; the guide runs at most as often)."""
    _check_solver(solver)
    return EVALUATIONS_PER_STEP[solver] * num_steps - (1 if solver == "heun" else 0)


def steps_for_budget(solver, budget):
    """The most steps whose run costs at most `budget` model evaluations (Heun: 2N − 1 <= budget)."""
    _check_solver(solver)
    if isinstance(budget, bool) or not isinstance(budget, numbers.Integral) or budget < 1:
        raise ValueError(f"budget must be an integer >= 1, got {budget!r}")
    return (budget + 1) // 2 if solver == "heun" else int(budget)


def _check_solver(solver):
    if solver not in EVALUATIONS_PER_STEP:
        raise ValueError(f"solver must be one of {tuple(EVALUATIONS_PER_STEP)}, got {solver!r}")


def device():
    """Where the demo's and benchmarks' runs go: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sample_models(main, guide, noise, *, guidance=1.0, guidance_interval=None, num_steps=NUM_STEPS,
                  solver="heun", sigma_max=SIGMA_MAX, backend="auto", seed=0, fused=True):
    """One guided run of ToyModels under the protocol; finite-or-not CPU samples [N, 2] float32.

    Euler and Heun run in the fused toy sampler (fastguide.toy.fused.sample_toy, `backend`) unless
    fused is False; other solvers, and every solver when fused is False, in fastguide.sample (the
    ToyModels' autograd scores; euler_ancestral's noise seeded by `seed`)."""
    from fastguide.toy.fused import SOLVERS, sample_toy

    target = device()
    main = main.to(target)
    guide = None if guide is None else guide.to(target)
    options = dict(guidance=guidance, guidance_interval=guidance_interval, num_steps=num_steps, sigma_min=SIGMA_MIN,
                   sigma_max=sigma_max, rho=RHO, solver=solver)
    if fused and solver in SOLVERS:
        return sample_toy(main, guide, noise.to(target), backend=backend, **options).cpu()
    from fastguide import sample
    with torch_threads(1):
        return sample(main, noise.to(target), guide=guide, randn_like=_seeded_randn_like(seed), **options).cpu()


def _seeded_randn_like(seed):
    """randn_like drawing, in order, from one CPU generator seeded with seed (any device, same numbers)."""
    generator = torch.Generator().manual_seed(seed)
    return lambda x: torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)


def sample_exact(ground_truth, noise, *, num_steps=NUM_STEPS, sigma_max=SIGMA_MAX, solver="heun"):
    """The ground truth's exact score sampled by the same sampler from the same start (fastguide.sample
    with the mixture as the denoiser, float32); CPU samples [N, 2]."""
    from fastguide import sample
    return sample(ground_truth, noise, num_steps=num_steps, sigma_min=SIGMA_MIN, sigma_max=sigma_max, rho=RHO,
                  solver=solver)


def trajectories(main, guide, noise, *, guidance=1.0, sigma_max=SIGMA_MAX, num_steps=NUM_STEPS):
    """The path of every point through a Heun run of ToyModels: [num_steps + 1, N, 2] (CPU, float32),
    from noise·σ_max to the samples (fastguide.sample, recording x after each step)."""
    from fastguide import sample

    path = [noise.float() * sigma_max]
    with torch_threads(1):
        sample(main, noise, guide=guide, guidance=guidance, num_steps=num_steps, sigma_min=SIGMA_MIN,
               sigma_max=sigma_max, rho=RHO, callback=lambda info: path.append(info["x"].detach().cpu().clone()))
    return torch.stack(path)


def spread_out(points, min_distance):
    """The points kept, in order, when each must lie at least min_distance from every point kept
    before it (a greedy thinning, as EDM2's Figure 2 draws its start points)."""
    kept = torch.empty_like(points)
    count = 0
    for point in points:
        if count == 0 or float((kept[:count] - point).norm(dim=1).min()) >= min_distance:
            kept[count] = point
            count += 1
    return kept[:count].clone()

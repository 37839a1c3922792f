"""Quality per model evaluation on the toy: how close each solver gets, for a budget of model
evaluations, to the same guided model's converged solution from the same start.

    python benchmarks/bench_toy_quality.py [--points 4096] [--budgets 8 16 32 64]
        [--reference-steps 1024] [--guidance 3] [--seed 0]

The shipped main model guided by guide_auto (autoguidance, w = 3), EDM2's toy protocol (start: the
ground truth of class A noised to σ = 5; ρ = 7, σ_min = 0.002; fastguide.toy.protocol), every run in
fastguide.sample.  The converged solution is Heun with --reference-steps steps from the same start.
Per solver and budget the most steps that fit (Heun: 2N − 1 evaluations; euler, dpmpp_2m and
euler_ancestral: N), and the distance ‖x − x_converged‖ of the samples: mean and 99th percentile.
euler_ancestral draws fresh noise every step (seeded): it samples the same distribution, not the
ODE's solution, so its distance does not go to 0.  Prints a markdown table.
"""
import argparse
import time

import torch

from fastguide.toy import load_model, protocol, tree_mixture

SOLVERS = ("euler", "heun", "dpmpp_2m", "euler_ancestral")
BUDGETS = (8, 16, 32, 64)


def converged(main, guide, noise, guidance, steps):
    """The guided ODE's solution from noise: Heun with `steps` steps (fastguide.sample)."""
    return protocol.sample_models(main, guide, noise, guidance=guidance, num_steps=steps, solver="heun", fused=False)


def distance_stats(samples, reference):
    """(mean, 99th percentile) of the per-point distances ‖samples − reference‖."""
    distances = (samples.double() - reference.double()).norm(dim=1)
    return distances.mean().item(), torch.quantile(distances, 0.99).item()


def quality_rows(*, points=4096, budgets=BUDGETS, reference_steps=1024, guidance=3.0, seed=0, solvers=SOLVERS):
    """One row per (solver, budget): dict(solver, budget, evaluations, steps, mean, p99, seconds)."""
    main, guide = load_model("main"), load_model("guide_auto")
    noise = protocol.start_noise(tree_mixture("A"), points, seed)
    reference = converged(main, guide, noise, guidance, reference_steps)
    rows = []
    for solver in solvers:
        for budget in budgets:
            steps = protocol.steps_for_budget(solver, budget)
            started = time.perf_counter()
            samples = protocol.sample_models(main, guide, noise, guidance=guidance, num_steps=steps, solver=solver,
                                             seed=seed, fused=False)
            seconds = time.perf_counter() - started
            mean, p99 = distance_stats(samples, reference)
            rows.append(dict(solver=solver, budget=budget, evaluations=protocol.evaluations(solver, steps),
                             steps=steps, mean=mean, p99=p99, seconds=seconds))
    return rows


def best_per_budget(rows):
    """{budget: the solver with the smallest mean distance} among the deterministic (ODE) solvers."""
    best = {}
    for row in rows:
        if row["solver"] == "euler_ancestral":
            continue
        if row["budget"] not in best or row["mean"] < best[row["budget"]]["mean"]:
            best[row["budget"]] = row
    return {budget: row["solver"] for budget, row in best.items()}


def format_table(rows):
    lines = ["| solver | budget | evaluations | steps | mean distance | 99th pct distance |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['solver']} | {row['budget']} | {row['evaluations']} | {row['steps']} | "
                     f"{row['mean']:.2e} | {row['p99']:.2e} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=4096)
    parser.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS))
    parser.add_argument("--reference-steps", type=int, default=1024)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    rows = quality_rows(points=args.points, budgets=tuple(args.budgets), reference_steps=args.reference_steps,
                        guidance=args.guidance, seed=args.seed)
    print(f"autoguidance w = {args.guidance:g}, {args.points} points, converged: Heun {args.reference_steps} steps "
          f"({time.perf_counter() - started:.0f} s)\n")
    print(format_table(rows))
    print("\nsmallest mean distance per budget: "
          + ", ".join(f"{budget}: {solver}" for budget, solver in best_per_budget(rows).items()))


if __name__ == "__main__":
    main()

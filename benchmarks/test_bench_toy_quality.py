"""The quality-per-evaluation benchmark on a small size (see bench_toy_quality.py): its table is
complete, each run within its budget, and the ODE solvers converge to the reference as the budget grows."""
import bench_toy_quality as bench


def test_quality_rows_small():
    rows = bench.quality_rows(points=256, budgets=(8, 32), reference_steps=128, seed=1)
    assert [(row["solver"], row["budget"]) for row in rows] == [(s, b) for s in bench.SOLVERS for b in (8, 32)]
    by_run = {(row["solver"], row["budget"]): row for row in rows}
    for row in rows:
        assert 0 < row["evaluations"] <= row["budget"] and 0 <= row["mean"] <= row["p99"]
    assert by_run["heun", 8]["evaluations"] == 7 and by_run["heun", 32]["evaluations"] == 31
    for solver in ("euler", "heun", "dpmpp_2m"):                 # more evaluations, closer to the solution
        assert by_run[solver, 32]["mean"] < 0.5 * by_run[solver, 8]["mean"], solver
    # The stochastic sampler does not converge to the ODE's solution.
    assert by_run["euler_ancestral", 32]["mean"] > 10 * by_run["heun", 32]["mean"]
    assert set(bench.best_per_budget(rows)) == {8, 32}
    assert bench.format_table(rows).count("\n") == len(rows) + 1

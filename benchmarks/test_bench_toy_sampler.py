"""pytest-benchmark timings of the fused toy sampler against the reference sampler (same models).

    .venv/bin/python -m pytest benchmarks/test_bench_toy_sampler.py --benchmark-only

A smaller run than the goal (1024 points, 32 Heun steps, autoguidance w=3) so that the reference
takes seconds; the goal's size and the ratio table: benchmarks/bench_toy_sampler.py."""
import pytest
import torch

from fastguide import sample
from fastguide.toy.fused import sample_toy

import bench_toy_sampler as bench

POINTS = 1024
OPTIONS = dict(guidance=3.0, num_steps=32)


@pytest.fixture(scope="module")
def problem():
    main, guide, _ = bench.models()
    noise = torch.randn(POINTS, 2, generator=torch.Generator().manual_seed(0))
    return main, guide, noise


def test_reference_sampler(benchmark, problem):
    main, guide, noise = problem
    benchmark.extra_info["gflop"] = bench.flop_count(main, guide, POINTS, OPTIONS["num_steps"], 3.0) / 1e9
    with torch.no_grad():
        benchmark.pedantic(lambda: sample(main, noise, guide=guide, backend="reference", **OPTIONS), rounds=2)


def test_fused_cpp(benchmark, problem):
    main, guide, noise = problem
    benchmark.extra_info["gflop"] = bench.flop_count(main, guide, POINTS, OPTIONS["num_steps"], 3.0) / 1e9
    out = benchmark(lambda: sample_toy(main, guide, noise, backend="cpp", **OPTIONS))
    assert bool(torch.isfinite(out).all())

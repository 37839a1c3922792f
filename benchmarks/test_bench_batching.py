"""pytest-benchmark timings of guided evaluation strategies (batch 8), naive two calls first.

    .venv/bin/python -m pytest benchmarks/test_bench_batching.py --benchmark-only --benchmark-group-by=param:case

The full table with ratios, batches 1/8/64 and 32-step Heun runs: benchmarks/bench_batching.py."""
import pytest
import torch

import fastguide
from fastguide import batching

import bench_batching as bench

BATCH = 8
CASES = {case[0]: case for case in bench.make_cases()}


@pytest.fixture(autouse=True)
def one_thread_no_grad():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.no_grad():
        yield
    torch.set_num_threads(threads)


def evaluation(case_name, strategy):
    name, net, guide, cfg, shape, strategies = CASES[case_name]
    x, labels, null = bench.inputs(shape, BATCH)
    null_labels = null if cfg else None
    sigma = torch.full((BATCH,), 1.3)
    if strategy == "naive":
        naive = bench.naive_eval(net, guide, 2.0, null_labels)
        return lambda: naive(x, sigma, labels)
    denoiser = fastguide.GuidedDenoiser(net, **bench.guided_kwargs(guide, null_labels), strategy=strategy)
    for _ in range((batching.WARMUP_REPS + batching.TIMED_REPS) * 3):  # auto: finish tuning first
        denoiser(x, sigma, labels)
    return lambda: denoiser(x, sigma, labels)


@pytest.mark.parametrize("case, strategy", [
    (name, strategy) for name, case in CASES.items() for strategy in ["naive"] + case[5]])
def test_guided_evaluation(benchmark, case, strategy):
    benchmark.extra_info["strategy"] = strategy
    benchmark(evaluation(case, strategy))


@pytest.mark.parametrize("case", ["MLP autoguidance", "toy ToyModel autoguidance"])
@pytest.mark.parametrize("variant", ["naive", "auto", "auto, interval"])
def test_heun_run(benchmark, case, variant):
    name, net, guide, cfg, shape, _ = CASES[case]
    x, labels, _ = bench.inputs(shape, BATCH)
    if variant == "naive":
        naive = bench.naive_eval(net, guide, 2.0, None)
        benchmark(lambda: bench.naive_heun(naive, x, labels))
        return
    interval = bench.INTERVAL if "interval" in variant else None
    run = lambda: fastguide.sample(net, x, labels=labels, guide=guide, guidance=2.0,  # noqa: E731
                                   guidance_interval=interval)
    run()  # tuning
    benchmark(run)

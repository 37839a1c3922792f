"""pytest-benchmark of the fused guided step against naive eager and a copy (see bench_ops.py).

    .venv/bin/python -m pytest benchmarks/test_bench_ops.py --benchmark-only

Each variant's result is checked against the naive expressions before it is timed."""
import pytest
import torch

from bench_ops import copy_fn, fused_step_fn, make_inputs, naive_euler, naive_heun, naive_step

SIZES = {"1M": 2 ** 20, "16M": 2 ** 24}


@pytest.fixture(scope="module", params=list(SIZES))
def inputs(request):
    return make_inputs(SIZES[request.param])


def test_naive_eager_step(benchmark, inputs):
    benchmark.group = f"guided step {inputs['x'].numel():,}"
    benchmark(naive_step, *inputs.values())


def test_fused_cpp_step(benchmark, inputs):
    benchmark.group = f"guided step {inputs['x'].numel():,}"
    step = fused_step_fn(inputs, "cpp")
    torch.testing.assert_close(step(), naive_step(*inputs.values()), rtol=1e-5, atol=1e-5)
    benchmark(step)


def test_compiled_naive_step(benchmark, inputs):
    benchmark.group = f"guided step {inputs['x'].numel():,}"
    euler, heun = (torch.compile(fn, fullgraph=True, dynamic=False) for fn in (naive_euler, naive_heun))
    compiled = lambda: naive_step(*inputs.values(), euler=euler, heun=heun)  # noqa: E731
    torch.testing.assert_close(compiled(), naive_step(*inputs.values()), rtol=1e-5, atol=1e-5)
    benchmark(compiled)


def test_copy_same_elements(benchmark, inputs):
    benchmark.group = f"guided step {inputs['x'].numel():,}"
    benchmark(copy_fn(inputs))

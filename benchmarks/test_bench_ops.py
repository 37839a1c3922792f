"""pytest-benchmark of the fused guided epilogues (Heun step, Euler ancestral, DPM-Solver++(2M))
against naive eager, torch.compile and a copy (see bench_ops.py).

    .venv/bin/python -m pytest benchmarks/test_bench_ops.py --benchmark-only

Each variant's result is checked against the naive expressions before it is timed."""
import pytest

from bench_ops import EPILOGUES, check_same_result, copy_fn, make_inputs

SIZES = {"1M": 2 ** 20, "16M": 2 ** 24}


@pytest.fixture(scope="module", params=[(name, size) for name in EPILOGUES for size in SIZES],
                ids=lambda p: f"{p[0]}-{p[1]}")
def case(request):
    name, size = request.param
    return name, make_inputs(SIZES[size], names=EPILOGUES[name].inputs)


def group(name, inputs):
    return f"{name} step {inputs['x'].numel():,}"


def test_naive_eager(benchmark, case):
    name, inputs = case
    benchmark.group = group(name, inputs)
    benchmark(EPILOGUES[name].naive, *inputs.values())


@pytest.mark.parametrize("with_flags", [False, True], ids=["no_flags", "flags"])
def test_fused_cpp(benchmark, case, with_flags):
    name, inputs = case
    benchmark.group = group(name, inputs)
    step = EPILOGUES[name].fused(inputs, "cpp", with_flags)
    check_same_result(EPILOGUES[name], inputs, {"fused": step})
    benchmark(step)


def test_compiled_naive(benchmark, case):
    name, inputs = case
    benchmark.group = group(name, inputs)
    compiled = EPILOGUES[name].compiled()
    check_same_result(EPILOGUES[name], inputs, {"torch.compile": lambda: compiled(*inputs.values())})
    benchmark(compiled, *inputs.values())


def test_copy_same_elements(benchmark, case):
    name, inputs = case
    benchmark.group = group(name, inputs)
    benchmark(copy_fn(inputs))


def test_fused_ops_flag_nonfinite_predictions():
    """The benchmarked fused steps with flags report a NaN prediction (the flags path really runs)."""
    for name, epilogue in EPILOGUES.items():
        inputs = make_inputs(4099, names=epilogue.inputs)
        inputs[epilogue.inputs[1]][17] = float("nan")  # d_main / cond
        step = epilogue.fused(inputs, "cpp", True)
        step()
        assert step.flags.item() == 1 | 4, (name, step.flags)

"""compile=True (torch.compile of the evaluation and of the combination) gives the eager samples.

Compilation is slow on a small CPU machine, so the models are tiny and the runs short."""
import pytest
import torch
from torch._dynamo.utils import counters

import fastguide
from fastguide import batching
from tests.test_batching import NUM_CLASSES, MLPDenoiser, make_inputs


@pytest.fixture(autouse=True)
def fresh_compiler_state(one_thread):
    batching.TUNERS.clear()
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    batching.TUNERS.clear()


def compiled_graphs():
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("case", ["stacked", "cfg-batch"])
def test_compiled_sampling_equals_eager(case):
    net = MLPDenoiser(seed=1, hidden=16).eval()
    noise, _, labels = make_inputs("mlp", 3, labels=True, seed=9)
    if case == "stacked":
        kwargs = dict(guide=MLPDenoiser(seed=2, hidden=16).eval(), guidance=2.0)
    else:  # with an interval, so that the main-only evaluation is compiled too
        kwargs = dict(guide_labels=torch.full((3,), NUM_CLASSES - 1), guidance=3.0, guidance_interval=(0.3, 3.0))
    run = dict(labels=labels, num_steps=4, sigma_max=5.0, strategy=case, backend="reference", return_stats=True,
               **kwargs)
    with torch.no_grad():  # with grad, x's requires_grad flips after the first step: one more graph
        eager, eager_stats = fastguide.sample(net, noise, **run)
        before = compiled_graphs()
        compiled, compiled_stats = fastguide.sample(net, noise, compile=True, **run)
    assert compiled_graphs() - before == (1 if case == "stacked" else 2)  # compiled code really ran
    assert compiled_stats == eager_stats and compiled_stats["strategy"] == case
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_compiled_forward_equals_eager():
    net, guide = MLPDenoiser(seed=3, hidden=16).eval(), MLPDenoiser(seed=4, hidden=16).eval()
    x, sigma, labels = make_inputs("mlp", 2, labels=True, seed=10)
    eager = fastguide.GuidedDenoiser(net, guide, guidance=1.8, strategy="separate")
    compiled = fastguide.GuidedDenoiser(net, guide, guidance=1.8, strategy="separate", compile=True)
    before = compiled_graphs()
    for sigma in (sigma, 0.7 * sigma):  # a new noise level must not need a new graph
        torch.testing.assert_close(compiled(x, sigma, labels), eager(x, sigma, labels), rtol=1e-5, atol=1e-5)
    assert compiled_graphs() - before == 2  # the evaluation and the combination


def test_compile_must_be_a_bool():
    with pytest.raises(TypeError, match="compile must be True or False, got 'yes'"):
        fastguide.GuidedDenoiser(MLPDenoiser(), compile="yes")


def test_fused_ops_with_flags_trace_under_fullgraph_compile():
    """The fused epilogues (ancestral Euler, Heun, DPM-Solver++(2M)) with flags given as one-element
    views of a bigger buffer compile with fullgraph=True on the cpp backend: the graph calls the
    fastguide ops, and the functionalized (aot_eager) run gives eager's results and flag bits."""
    from fastguide import ops

    generator = torch.Generator().manual_seed(5)
    x, d_main, d_guide, noise, prev = (torch.randn(3, 17, generator=generator) for _ in range(5))
    d_guide[2, 9] = float("inf")  # bits 2 | 4 in every op

    def step(x, d_main, d_guide, noise, prev, flags_buffer):
        x_ancestral, _ = ops.guided_euler(x, d_main, d_guide, 2.5, 3.0, 1.2, noise=noise, noise_scale=0.7,
                                          flags=flags_buffer[0:1], backend="cpp")
        x_heun = ops.guided_heun(x, prev, d_main, None, 2.5, 3.0, 1.2, flags=flags_buffer[1:2], backend="cpp")
        x_dpm, denoised = ops.guided_dpmpp_2m(x, d_main, d_guide, prev, 2.5, 0.6, 0.5, -0.1,
                                              flags=flags_buffer[2:3], backend="cpp")
        return x_ancestral + x_heun + x_dpm, denoised

    graphs = []

    def record(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    inputs = (x, d_main, d_guide, noise, prev)
    eager_flags = torch.full((4,), 8, dtype=torch.int32)
    eager = step(*inputs, eager_flags)
    assert eager_flags.tolist() == [8 | 2 | 4, 8, 8 | 2 | 4, 8]
    for backend in (record, "aot_eager"):
        flags = torch.full((4,), 8, dtype=torch.int32)
        got = torch.compile(step, backend=backend, fullgraph=True)(*inputs, flags)
        for a, b in zip(got, eager):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
        assert flags.tolist() == eager_flags.tolist(), backend
    code = graphs[0].code
    for op in ("guided_euler_out", "guided_heun_out", "guided_dpmpp_2m_out"):
        assert f"fastguide.{op}" in code, code

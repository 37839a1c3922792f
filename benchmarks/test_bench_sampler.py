"""pytest-benchmark of whole guided runs with nearly free denoisers (see bench_sampler.py).

    .venv/bin/python -m pytest benchmarks/test_bench_sampler.py --benchmark-only

Each fastguide run is checked against the naive k-diffusion-style loop before it is timed."""
import pytest
import torch

import fastguide
from bench_sampler import GUIDANCE, Constant, naive_run
from fastguide import reference

STEPS = 16


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(0)
    noise, cond, uncond = (torch.randn(4, 2 ** 20, generator=gen) for _ in range(3))
    return noise, Constant(cond), Constant(uncond), reference.edm_sigmas(STEPS).tolist()


@pytest.mark.parametrize("solver", fastguide.sampler.SOLVERS)
@pytest.mark.parametrize("variant", ["naive", "fastguide"])
def test_whole_run(benchmark, inputs, solver, variant):
    noise, net, guide, sigmas = inputs
    benchmark.group = f"guided run {solver}, {noise.numel():,} elements"

    def fast():
        torch.manual_seed(1)
        return fastguide.sample(net, noise, guide=guide, guidance=GUIDANCE, solver=solver,
                                sigmas=torch.tensor(sigmas, dtype=torch.float64))

    def naive():
        torch.manual_seed(1)
        with torch.no_grad():
            return naive_run(net, guide, noise, sigmas, solver)
    torch.testing.assert_close(fast(), naive(), rtol=1e-4, atol=1e-4)
    benchmark(fast if variant == "fastguide" else naive)

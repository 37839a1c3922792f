"""A whole fastguide.sample run with each backend equals the run with the reference backend."""
import pytest
import torch

import fastguide
from tests.gaussian import GaussianDenoiser

HAS_CUDA = torch.cuda.is_available()
BACKENDS = [pytest.param("cpp", "cpu", id="cpp"),
            pytest.param("triton", "cuda" if HAS_CUDA else "cpu", id="triton"),
            pytest.param("cuda", "cuda", id="cuda",
                         marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (none on this machine)"))]
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}

RUNS = {
    "autoguidance_heun": dict(guidance=2.5, num_steps=10),
    "interval_euler": dict(guidance=3.0, num_steps=12, guidance_interval=(0.3, 5.0), solver="euler"),
    "negative_guidance_churn": dict(guidance=-0.5, num_steps=8, S_churn=20.0, S_min=0.05, S_max=50.0),
    "unguided": dict(guidance=1.0, num_steps=6),
}


def run(backend, device, dtype, options):
    generator = torch.Generator().manual_seed(7)
    noise = torch.randn(2, 3, 6, 5, generator=generator, dtype=torch.float64).to(device)
    net = GaussianDenoiser(mean=0.3, std=0.5)
    guide = GaussianDenoiser(mean=-0.2, std=0.8)
    churn = torch.Generator().manual_seed(11)

    def randn_like(x):
        return torch.randn(x.shape, generator=churn, dtype=torch.float64).to(x.device, x.dtype)

    x, stats = fastguide.sample(net, noise, guide=guide, dtype=dtype, backend=backend, randn_like=randn_like,
                                return_stats=True, **options)
    assert stats["backend"] == backend
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", list(RUNS))
@pytest.mark.parametrize("backend, device", BACKENDS)
def test_sample_equals_reference_run(backend, device, dtype, name):
    expected = run("reference", device, dtype, RUNS[name])
    got = run(backend, device, dtype, RUNS[name])
    assert got.dtype == dtype and torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, **TOLERANCE[dtype])
    assert expected.abs().max() > 0.1  # a real sample, not a run that collapsed to zeros


def test_auto_sample_on_cpu_uses_cpp():
    noise = torch.randn(1, 4)
    _, stats = fastguide.sample(GaussianDenoiser(), noise, num_steps=3, return_stats=True)
    assert stats["backend"] == "cpp"

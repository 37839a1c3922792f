"""fastguide.k_diffusion against a float64 transcription of k-diffusion's algorithm and against fastguide.sample."""
import math

import pytest
import torch

import fastguide
from fastguide.k_diffusion import sample_euler, sample_heun
from gaussian import GaussianDenoiser

SOLVERS = {"euler": sample_euler, "heun": sample_heun}


def k_diffusion_loop(model, x, sigmas, heun, extra_args, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0):
    """k-diffusion's Euler/Heun loop written out plainly (float64 when x is); returns (x, callback records)."""
    records = []
    s_in = torch.ones(x.shape[0], dtype=x.dtype)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        gamma = min(s_churn / (len(sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:
            x = x + torch.randn_like(x) * s_noise * (sigma_hat ** 2 - sigma ** 2) ** 0.5
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = (x - denoised) / sigma_hat
        records.append(dict(x=x.clone(), i=i, sigma=sigma, sigma_hat=sigma_hat, denoised=denoised.clone()))
        dt = sigma_next - sigma_hat
        if not heun or sigma_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - model(x_2, sigma_next * s_in, **extra_args)) / sigma_next
            x = x + (d + d_2) / 2 * dt
    return x, records


def class_gaussian(generator, num_classes=4, shape=(3, 5)):
    means = torch.randn(num_classes, math.prod(shape), generator=generator, dtype=torch.float64)
    return GaussianDenoiser(std=0.6, class_means=means)


def one_hot(classes, num_classes=4, dtype=torch.float64):
    return torch.eye(num_classes, dtype=dtype)[classes]


def rel_err(actual, expected):
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


@pytest.mark.parametrize("solver", ["euler", "heun"])
@pytest.mark.parametrize("churn", [0.0, 3.0])
@pytest.mark.parametrize("end", [0.0, 0.05])  # a schedule may stop short of 0 (then Heun corrects the last step)
def test_matches_k_diffusion_algorithm_in_float64(generator, solver, churn, end):
    net = class_gaussian(generator)
    labels = one_hot(torch.tensor([0, 3, 2]))
    sigmas = torch.cat([fastguide.sampler.reference.edm_sigmas(6, 0.1, 20.0, 7.0)[:-1], torch.tensor([end])])
    x = torch.randn(3, 3, 5, generator=generator, dtype=torch.float64) * sigmas[0]
    x_before = x.clone()
    records = []
    torch.manual_seed(7)
    actual = SOLVERS[solver](net, x, sigmas, extra_args={"labels": labels}, callback=records.append,
                             disable=True, s_churn=churn, s_tmin=0.5, s_tmax=10.0, s_noise=1.01)
    torch.manual_seed(7)
    expected, expected_records = k_diffusion_loop(net, x, sigmas.tolist(), solver == "heun", {"labels": labels},
                                                  churn, 0.5, 10.0, 1.01)
    assert torch.equal(x, x_before)  # the input is not modified
    assert rel_err(actual, expected) < 1e-12
    assert [r["i"] for r in records] == list(range(6))
    for got, want in zip(records, expected_records):
        assert isinstance(got["sigma"], torch.Tensor) and got["sigma"].item() == want["sigma"]
        assert got["sigma_hat"].item() == pytest.approx(want["sigma_hat"], rel=1e-15)
        assert rel_err(got["x"], want["x"]) < 1e-12
        assert rel_err(got["denoised"], want["denoised"]) < 1e-12
    if churn:
        assert any(r["sigma_hat"] > r["sigma"] for r in records)  # the churn branch ran


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 2e-6), (torch.float16, 4e-3), (torch.bfloat16, 3e-2)])
def test_low_precision_plain_model(generator, dtype, tolerance):
    net = GaussianDenoiser(mean=0.3, std=0.5)
    sigmas = fastguide.sampler.reference.edm_sigmas(5, 0.05, 10.0, 7.0)
    x = torch.randn(2, 7, generator=generator, dtype=torch.float64) * sigmas[0]
    expected, _ = k_diffusion_loop(net, x, sigmas.tolist(), True, {})
    actual = sample_heun(net, x.to(dtype), sigmas.to(torch.float32), disable=True)
    assert actual.dtype == dtype
    assert rel_err(actual, expected) < tolerance


@pytest.mark.parametrize("solver", ["euler", "heun"])
@pytest.mark.parametrize("kind", ["cfg", "autoguidance", "interval"])
def test_guided_denoiser_as_model_equals_fastguide_sample(generator, solver, kind):
    net = class_gaussian(generator, shape=(2, 3, 3))
    weak = GaussianDenoiser(std=0.9, class_means=net.class_means * 0.7)
    labels = one_hot(torch.tensor([1, 0]), dtype=torch.float32)
    options = dict(guidance=2.0)
    if kind == "cfg":
        options["guide_labels"] = torch.zeros_like(labels)
    else:
        options["guide"] = weak
    if kind == "interval":
        options["guidance_interval"] = (0.3, 4.0)
    sigmas = fastguide.sampler.reference.edm_sigmas(7, 0.02, 30.0, 7.0)
    noise = torch.randn(2, 2, 3, 3, generator=generator)
    expected = fastguide.sample(net, noise, labels=labels, sigmas=sigmas, solver=solver, **options)
    model = fastguide.GuidedDenoiser(net, options.pop("guide", None), **options)
    actual = SOLVERS[solver](model, noise * sigmas[0].item(), sigmas, extra_args={"class_labels": labels},
                             disable=True)
    assert rel_err(actual, expected) < 1e-6
    unguided = SOLVERS[solver](fastguide.GuidedDenoiser(net), noise * sigmas[0].item(), sigmas,
                               extra_args={"cond": labels}, disable=True)
    assert rel_err(unguided, actual) > 1e-3  # guidance changed the result


def test_bad_input(generator):
    net = GaussianDenoiser()
    x = torch.randn(2, 3, generator=generator)
    sigmas = torch.tensor([2.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="sigmas must be a 1-D tensor"):
        sample_euler(net, x, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="sigmas must be finite, > 0"):
        sample_euler(net, x, torch.tensor([2.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="sigmas must be finite"):
        sample_heun(net, x, torch.tensor([float("nan"), 0.0]))
    for increasing in (torch.tensor([1.0, 2.0, 0.0]), torch.tensor([0.5, 1.0]), torch.tensor([2.0, 2.0, 0.0])):
        with pytest.raises(ValueError, match="sigmas must be strictly decreasing"):  # issue 12: once accepted
            sample_euler(net, x, increasing)
    with pytest.raises(TypeError, match="model must be callable"):
        sample_euler(3, x, sigmas)
    with pytest.raises(TypeError, match="x must be a tensor"):
        sample_euler(net, x.long(), sigmas)
    with pytest.raises(TypeError, match="extra_args must be a dict"):
        sample_euler(net, x, sigmas, extra_args=[1])
    with pytest.raises(ValueError, match="s_churn must be >= 0"):
        sample_euler(net, x, sigmas, s_churn=-1.0)
    with pytest.raises(TypeError, match="extra_args for a GuidedDenoiser"):
        sample_euler(fastguide.GuidedDenoiser(net), x, sigmas, extra_args={"context": x})
    with pytest.raises(fastguide.DenoiserOutputError, match="model returned shape"):
        sample_euler(lambda x, sigma: x[:1], x, sigmas)

"""fastguide.sample and edm_sampler against an independent float64 statement of EDM's formulas."""
import math

import pytest
import torch

import fastguide
from tests.gaussian import GaussianDenoiser

SQRT2_MINUS_1 = math.sqrt(2.0) - 1.0


def edm_schedule(num_steps, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    steps = [(sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
             for i in range(num_steps)]
    return steps + [0.0]


def guided_denoiser(net, guide, guidance, interval):
    """denoise(x, σ): the guided D written out plainly, one call per model."""
    def denoise(x, sigma):
        sigma_vec = torch.full((x.shape[0],), sigma, dtype=x.dtype)
        d_main = net(x, sigma_vec, None)
        if guidance == 1 or (interval is not None and not interval[0] < sigma <= interval[1]):
            return d_main
        d_guide = guide(x, sigma_vec, None)
        return d_guide + guidance * (d_main - d_guide)
    return denoise


def expected_run(net, guide, noise, t_steps, *, guidance=1.0, interval=None, solver="heun",
                 S_churn=0.0, S_min=0.0, S_max=float("inf"), S_noise=1.0, draws=None):
    """The sampler written out from the formulas, in float64, with one plain call per model."""
    num_steps = len(t_steps) - 1
    denoise = guided_denoiser(net, guide, guidance, interval)
    x = noise.double() * t_steps[0]
    draws = iter(draws or [])
    for i in range(num_steps):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        gamma = min(S_churn / num_steps, SQRT2_MINUS_1) if S_churn > 0 and S_min <= t_cur <= S_max else 0.0
        t_hat = t_cur * (1 + gamma)
        if gamma > 0:
            x = x + math.sqrt(t_hat ** 2 - t_cur ** 2) * S_noise * next(draws)
        d = (x - denoise(x, t_hat)) / t_hat
        x_next = x + (t_next - t_hat) * d
        if solver == "heun" and i < num_steps - 1:
            d_prime = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x + (t_next - t_hat) * (d + d_prime) / 2
        x = x_next
    return x


def nonlinear_net(x, sigma, labels):
    s = sigma.reshape(-1, *[1] * (x.ndim - 1))
    return torch.tanh(x) * (0.5 / (1 + s)) + 0.1 * torch.sin(3 * x) * s / (1 + s ** 2)


def weak_net(x, sigma, labels):
    s = sigma.reshape(-1, *[1] * (x.ndim - 1))
    return 0.7 * torch.tanh(1.3 * x) / (1 + s) + 0.05


def fixed_draws(shape, count, seed=7):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(count)]


def replay(draws):
    it = iter(draws)
    return lambda x: next(it).to(x.dtype)


CASES = [
    dict(solver="euler"),
    dict(solver="heun"),
    dict(solver="heun", guidance=2.5),
    dict(solver="euler", guidance=-0.5),
    dict(solver="heun", guidance=3.0, interval=(0.28, 5.42)),
    dict(solver="euler", guidance=2.0, interval=(0.5, 10.0)),
    dict(solver="heun", S_churn=40.0, S_min=0.05, S_max=50.0, S_noise=1.003),
    dict(solver="heun", guidance=2.0, interval=(0.3, 20.0), S_churn=10.0),
    dict(solver="euler", S_churn=5.0, S_noise=0.9),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_sample_matches_formulas_float64(case):
    num_steps = 12
    shape = (3, 2, 5)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    draws = fixed_draws(shape, num_steps)
    t_steps = edm_schedule(num_steps)
    expected = expected_run(nonlinear_net, weak_net, noise, t_steps, draws=draws, **case)
    got = fastguide.sample(nonlinear_net, noise, guide=weak_net, guidance=case.get("guidance", 1.0),
                           guidance_interval=case.get("interval"), num_steps=num_steps, solver=case["solver"],
                           S_churn=case.get("S_churn", 0.0), S_min=case.get("S_min", 0.0),
                           S_max=case.get("S_max", float("inf")), S_noise=case.get("S_noise", 1.0),
                           randn_like=replay(draws), dtype=torch.float64, backend="reference")
    assert got.dtype == torch.float64 and got.shape == shape
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CASES[:6], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_sample_float32_close_to_float64(case):
    num_steps = 10
    noise = torch.randn(4, 6, generator=torch.Generator().manual_seed(5))
    t_steps = edm_schedule(num_steps)
    expected = expected_run(nonlinear_net, weak_net, noise, t_steps, **case)
    got = fastguide.sample(nonlinear_net, noise, guide=weak_net, guidance=case.get("guidance", 1.0),
                           guidance_interval=case.get("interval"), num_steps=num_steps, solver=case["solver"])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_custom_sigmas_replace_the_schedule():
    sigmas = torch.tensor([20.0, 7.0, 2.0, 0.6, 0.1, 0.0], dtype=torch.float64)
    noise = torch.randn(5, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    expected = expected_run(nonlinear_net, weak_net, noise, sigmas.tolist(), guidance=1.7)
    got = fastguide.sample(nonlinear_net, noise, guide=weak_net, guidance=1.7, sigmas=sigmas, dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_edm_sampler_is_edm2_compatible():
    """Same positional signature and results as EDM2's edm_sampler, float32 nets cast to dtype."""
    num_steps = 9
    noise = torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    draws = fixed_draws((4, 3, 2), num_steps, seed=2)
    churn = dict(S_churn=30.0, S_min=0.01, S_max=40.0, S_noise=1.007)
    expected = expected_run(nonlinear_net, weak_net, noise, edm_schedule(num_steps), guidance=2.2,
                            draws=draws, **churn)

    def float32_net(net):
        return lambda x, t, labels: net(x.float(), t.float(), labels)

    got = fastguide.edm_sampler(float32_net(nonlinear_net), noise, None, float32_net(weak_net), num_steps,
                                0.002, 80, 7, 2.2, dtype=torch.float64, randn_like=replay(draws), **churn)
    torch.testing.assert_close(got, expected, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("solver, expected_ratio", [("heun", 4.0), ("euler", 2.0)])
def test_convergence_order_on_gaussian_data(solver, expected_ratio):
    """With the exact denoiser of N(mu, s²I), the error to the exact ODE solution falls as N^-2 (Heun), N^-1 (Euler)."""
    net = GaussianDenoiser(mean=0.3, std=0.5)
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigma_max = 80.0
    exact = net.exact_flow(noise * sigma_max, sigma_max)
    errors = []
    for steps in (16, 32, 64, 128):
        x = fastguide.sample(net, noise, num_steps=steps, solver=solver, dtype=torch.float64, sigma_max=sigma_max)
        errors.append((x - exact).abs().max().item())
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert all(0.75 * expected_ratio < r < 1.35 * expected_ratio for r in ratios[1:]), (errors, ratios)


def test_samples_match_gaussian_moments():
    mean, std = torch.tensor([0.3, -1.0]), 0.5
    net = GaussianDenoiser(mean=mean, std=std)
    n = 20000
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(1))
    x = fastguide.sample(net, noise, num_steps=32)
    # standard errors: std/sqrt(n) for the mean, std/sqrt(2n) for the std; 5 sigma bounds
    assert torch.allclose(x.mean(0), mean, atol=5 * std / n ** 0.5)
    assert torch.allclose(x.std(0), torch.full((2,), std), atol=5 * std / (2 * n) ** 0.5)


def test_callback_and_progress(capfd):
    seen = []
    x = fastguide.sample(nonlinear_net, torch.randn(2, 3), num_steps=5, progress=True,
                         callback=lambda info: seen.append((info["i"], info["sigma"], info["sigma_next"],
                                                            info["x"].clone(), info["denoised"].clone())))
    progress = capfd.readouterr().err
    assert "sampling" in progress and "5/5" in progress and "0/5" in progress  # the bar counted every step
    assert torch.equal(seen[-1][3], x)  # the last step's x is the result
    assert [s[0] for s in seen] == list(range(5))
    t_steps = edm_schedule(5)
    assert [s[1] for s in seen] == pytest.approx(t_steps[:5]) and seen[-1][2] == 0.0
    # on the last step (Euler to 0) x_next equals the denoised prediction
    torch.testing.assert_close(seen[-1][3], seen[-1][4], rtol=1e-5, atol=1e-6)


def test_sampling_records_no_autograd_history_and_leaves_noise_alone():
    layer = torch.nn.Linear(3, 3)
    noise = torch.randn(4, 3)
    kept = noise.clone()
    x = fastguide.sample(lambda x, s, l: layer(x), noise, num_steps=4, S_churn=10.0)
    assert not x.requires_grad and x.grad_fn is None
    assert torch.equal(noise, kept)

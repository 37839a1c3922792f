"""EDM's stochastic churn in fastguide.sample against a float64 loop written here: γ = S_churn / num_steps
below the √2 − 1 cap, and S_min / S_max equal to a noise level of the schedule (the bounds are inclusive).

The churn noise comes from fastguide.SeededRandn in both, drawn in float32 (what the sampler draws)."""
import math

import pytest
import torch

import fastguide
from gaussian import GaussianDenoiser

SEEDS = [3, 14, 15]
SHAPE = (2, 4, 4)
SIGMAS = [80.0, 20.0, 5.0, 1.0, 0.2, 0.02, 0.0]  # a custom schedule, so that S_min / S_max can equal a level
NET = GaussianDenoiser(mean=0.3, std=0.5)


def edm_sigmas(num_steps, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    ramp = [i / (num_steps - 1) for i in range(num_steps)]
    return [(sigma_max ** (1 / rho) + r * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho for r in ramp] + [0.0]


def edm_churn_loop(sigmas, solver, S_churn, S_min, S_max, S_noise):
    """EDM2's edm_sampler in float64 (churn noise drawn only on steps that churn); returns (x, the noise
    levels of the steps that churned)."""
    randn = fastguide.SeededRandn(SEEDS)
    x = randn.randn(SHAPE).double() * sigmas[0]
    num_steps, churned = len(sigmas) - 1, []

    def derivative(x, sigma):
        return (x - NET(x, torch.full((x.shape[0],), sigma, dtype=torch.float64))) / sigma

    for i, (t_cur, t_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        t_hat = t_cur
        if S_churn > 0 and S_min <= t_cur <= S_max:
            t_hat = t_cur + min(S_churn / num_steps, math.sqrt(2) - 1) * t_cur
            x = x + math.sqrt(t_hat ** 2 - t_cur ** 2) * S_noise * randn.randn_like(x.float()).double()
            churned.append(t_cur)
        d_cur = derivative(x, t_hat)
        x_next = x + (t_next - t_hat) * d_cur
        if solver == "heun" and i < num_steps - 1:
            x_next = x + (t_next - t_hat) * (0.5 * d_cur + 0.5 * derivative(x_next, t_next))
        x = x_next
    return x, churned


def fastguide_run(solver, S_churn, S_min, S_max, S_noise, **schedule):
    randn = fastguide.SeededRandn(SEEDS)
    noise = randn.randn(SHAPE)
    return fastguide.sample(NET, noise, solver=solver, S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise,
                            randn_like=randn, **schedule)


def max_rel_err(actual, expected):
    return float((actual.double() - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("solver", ["euler", "heun"])
@pytest.mark.parametrize("S_churn", [0.6, 2.0])  # γ = 0.1 and 1/3 over 6 steps: both below √2 − 1 ≈ 0.414
def test_churn_below_the_cap(solver, S_churn):
    sigmas = torch.tensor(SIGMAS, dtype=torch.float64)
    expected, churned = edm_churn_loop(SIGMAS, solver, S_churn, 0.0, math.inf, 1.003)
    assert churned == SIGMAS[:-1]
    actual = fastguide_run(solver, S_churn, 0.0, math.inf, 1.003, sigmas=sigmas)
    assert max_rel_err(actual, expected) < 1e-5


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_churn_below_the_cap_on_edm_schedule(solver):
    """The generated schedule: γ = S_churn / num_steps with num_steps the sampler's step count."""
    expected, churned = edm_churn_loop(edm_sigmas(10), solver, 3.0, 0.0, math.inf, 1.0)  # γ = 0.3
    assert len(churned) == 10
    actual = fastguide_run(solver, 3.0, 0.0, math.inf, 1.0, num_steps=10)
    assert max_rel_err(actual, expected) < 1e-5


@pytest.mark.parametrize("solver", ["euler", "heun"])
@pytest.mark.parametrize("S_churn", [1.2, 40.0])  # below the cap and capped
def test_churn_bounds_are_inclusive(solver, S_churn):
    """S_min = 1 and S_max = 20 are noise levels of the schedule: the steps at 20, 5 and 1 churn."""
    sigmas = torch.tensor(SIGMAS, dtype=torch.float64)
    expected, churned = edm_churn_loop(SIGMAS, solver, S_churn, 1.0, 20.0, 1.0)
    assert churned == [20.0, 5.0, 1.0]
    actual = fastguide_run(solver, S_churn, 1.0, 20.0, 1.0, sigmas=sigmas)
    assert max_rel_err(actual, expected) < 1e-5

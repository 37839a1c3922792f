"""GuidedDenoiser as a denoiser for other samplers, and the work it skips."""
import pytest
import torch
from torch import nn

import fastguide
from fastguide import batching, reference
from fastguide.sampler import schedule
from tests.test_batching import NUM_CLASSES, ConvDenoiser, MLPDenoiser, make_inputs


@pytest.fixture(autouse=True)
def one_thread_and_fresh_tuners(one_thread):
    batching.TUNERS.clear()
    yield
    batching.TUNERS.clear()


class CountingModule(nn.Module):
    """Wraps a denoiser module and records the noise level of every call."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.sigmas, self.batches = inner, [], []

    def forward(self, x, sigma, labels=None):
        self.sigmas.append(sigma[0].item())
        self.batches.append(x.shape[0])
        return self.inner(x, sigma, labels)


def euler_loop(denoiser, noise, t_steps, labels):
    """A plain Euler sampler that knows nothing of guidance: it calls model(x, sigma[B], class_labels=...)."""
    x = noise * t_steps[0]
    for t_cur, t_next in zip(t_steps[:-1], t_steps[1:]):
        sigma = torch.full((x.shape[0],), t_cur)
        denoised = denoiser(x, sigma, class_labels=labels)
        x = x + (t_next - t_cur) * (x - denoised) / t_cur
    return x


@pytest.mark.parametrize("case", ["autoguidance", "cfg", "interval"])
def test_guided_denoiser_in_a_plain_euler_loop_equals_sample_euler(case):
    net = ConvDenoiser(seed=1).eval()
    noise, _, labels = make_inputs("conv", 3, labels=True, seed=5)
    kwargs = dict(guide=ConvDenoiser(seed=2).eval(), guidance=2.2)
    if case == "cfg":
        kwargs = dict(guide_labels=torch.full((3,), NUM_CLASSES - 1), guidance=3.0)
    if case == "interval":
        kwargs["guidance_interval"] = (0.3, 2.0)
    num_steps = 6
    t_steps = schedule(num_steps, 0.002, 80.0, 7.0)
    with torch.no_grad():
        expected = fastguide.sample(net, noise, labels=labels, num_steps=num_steps, solver="euler",
                                    backend="reference", **kwargs)
        denoiser = fastguide.GuidedDenoiser(net, **kwargs)
        got = euler_loop(denoiser, noise, t_steps, labels)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    guided = sum(reference.in_interval(t, kwargs.get("guidance_interval")) for t in t_steps[:-1])
    assert denoiser.stats["net"] == num_steps and denoiser.stats["guide"] == guided > 0


def test_forward_is_the_guidance_combination_in_float64():
    net, guide = MLPDenoiser(seed=1).double().eval(), MLPDenoiser(seed=2).double().eval()
    x, sigma, labels = make_inputs("mlp", 5, labels=True)
    x = x.double()
    sigma_t = torch.full((5,), sigma, dtype=torch.float64)
    expected = guide(x, sigma_t, labels) + 2.7 * (net(x, sigma_t, labels) - guide(x, sigma_t, labels))
    denoiser = fastguide.GuidedDenoiser(net, guide, guidance=2.7)
    for call in (lambda: denoiser(x, sigma_t, labels), lambda: denoiser(x, sigma, class_labels=labels),
                 lambda: denoiser(x, torch.tensor([sigma], dtype=torch.float64), cond=labels)):
        torch.testing.assert_close(call(), expected, rtol=1e-12, atol=1e-12)


def test_forward_refuses_several_noise_levels_and_unknown_arguments():
    denoiser = fastguide.GuidedDenoiser(MLPDenoiser(), MLPDenoiser(seed=3), guidance=2.0)
    x = torch.randn(2, 6)
    with pytest.raises(ValueError, match="one noise level per call"):
        denoiser(x, torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['mask'\]"):
        denoiser(x, 1.0, mask=None)


def heun_sigmas(num_steps):
    """The noise levels at which a Heun run evaluates: Euler at each t_cur, Heun at t_next but the last."""
    t_steps = schedule(num_steps, 0.002, 80.0, 7.0)
    return t_steps[:num_steps] + t_steps[1:num_steps]


@pytest.mark.parametrize("strategy", ["separate", "stacked"])
def test_the_guide_is_not_called_at_guidance_one(strategy):
    net, guide = CountingModule(MLPDenoiser(seed=1)), CountingModule(MLPDenoiser(seed=2))
    noise = make_inputs("mlp", 3, labels=False)[0]
    _, stats = fastguide.sample(net, noise, guide=guide, guidance=1.0, num_steps=5, return_stats=True,
                                strategy=strategy, backend="reference")
    assert guide.sigmas == [] and stats["guide"] == 0
    assert len(net.sigmas) == stats["net"] == 2 * 5 - 1


@pytest.mark.parametrize("strategy", ["separate", "auto"])
def test_the_guide_is_called_only_inside_the_interval(strategy):
    num_steps, interval = 16, (0.28, 5.42)
    net, guide = CountingModule(MLPDenoiser(seed=1)), CountingModule(MLPDenoiser(seed=2))
    noise = make_inputs("mlp", 3, labels=False)[0]
    _, stats = fastguide.sample(net, noise, guide=guide, guidance=2.0, guidance_interval=interval,
                                num_steps=num_steps, return_stats=True, strategy=strategy, backend="reference")
    inside = [s for s in heun_sigmas(num_steps) if interval[0] < s <= interval[1]]
    assert 0 < len(inside) < 2 * num_steps - 1
    assert len(guide.sigmas) == stats["guide"] == len(inside)  # tuning takes turns: no extra calls
    assert len(net.sigmas) == stats["net"] == 2 * num_steps - 1
    assert sorted(guide.sigmas) == sorted(torch.tensor(s).item() for s in inside)


def test_cfg_skips_the_unconditional_half_outside_the_interval():
    net = CountingModule(MLPDenoiser(seed=1))
    noise, _, labels = make_inputs("mlp", 2, labels=True)
    fastguide.sample(net, noise, labels=labels, guide_labels=torch.zeros(2, dtype=torch.long), guidance=2.0,
                     guidance_interval=(1.0, 10.0), num_steps=8, strategy="cfg-batch", backend="reference")
    # one call per evaluation: the 2B batch inside the interval, the B batch outside
    expected = [(s, 4 if 1.0 < s <= 10.0 else 2) for s in heun_sigmas(8)]
    assert sorted(zip(net.sigmas, net.batches)) == sorted((torch.tensor(s).item(), b) for s, b in expected)
    assert {b for _, b in expected} == {2, 4}


@pytest.mark.parametrize("strategy", ["separate", "cfg-batch", "stacked"])
def test_bad_outputs_are_refused_by_every_strategy(strategy):
    class WrongShape(MLPDenoiser):
        def forward(self, x, sigma, labels=None):
            return super().forward(x, sigma, labels)[:1]

    net = WrongShape(seed=1)
    x, sigma, labels = make_inputs("mlp", 3, labels=True)
    guide = None if strategy == "cfg-batch" else WrongShape(seed=2)
    denoiser = fastguide.GuidedDenoiser(net, guide, guide_labels=labels, guidance=2.0, strategy=strategy)
    with pytest.raises(fastguide.DenoiserOutputError, match=r"net returned shape \(1, 6\), expected \((3|6), 6\)"):
        denoiser.predictions(x, sigma, labels)


def test_stats_report_the_strategy_and_reset():
    denoiser = fastguide.GuidedDenoiser(MLPDenoiser(seed=1), MLPDenoiser(seed=2), guidance=2.0,
                                        guidance_interval=(0.5, 3.0), strategy="stacked")
    x = torch.randn(2, 6)
    denoiser.predictions(x, 5.0)
    assert denoiser.stats == {"net": 1, "guide": 0, "strategy": None}
    denoiser.predictions(x, 1.0)
    assert denoiser.stats == {"net": 2, "guide": 1, "strategy": "stacked"}
    denoiser.reset_stats()
    assert denoiser.stats == {"net": 0, "guide": 0, "strategy": None}


def test_cfg_without_labels_is_refused():
    denoiser = fastguide.GuidedDenoiser(MLPDenoiser(), guide_labels=torch.zeros(2, dtype=torch.long), guidance=2.0)
    with pytest.raises(ValueError, match="needs labels for the conditional half"):
        denoiser(torch.randn(2, 6), 1.0)


def test_predictions_take_a_batch_of_sigmas_the_documented_convention():
    """Issue 12: a [B] sigma tensor used to fail with "full(): fill_value must be Number"."""
    net = MLPDenoiser(seed=1).eval()
    x, sigma, labels = make_inputs("mlp", 3, labels=True)
    denoiser = fastguide.GuidedDenoiser(net, MLPDenoiser(seed=2).eval(), guidance=2.0)
    expected = denoiser.predictions(x, 1.5, labels)
    for sigma in (torch.full((3,), 1.5), torch.tensor(1.5), torch.tensor([1.5]), 1.5, 3 / 2):
        got = denoiser.predictions(x, sigma, labels)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.parametrize("sigma, error", [
    (-1.0, ValueError), (0.0, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
    ("1.5", TypeError), (True, TypeError), (torch.ones(2), ValueError), (torch.ones(3, 1), ValueError),
    (torch.tensor([1.0, 2.0, 1.0]), ValueError), (torch.tensor([-1.0, -1.0, -1.0]), ValueError),
    (torch.ones(3, dtype=torch.bool), TypeError),
])
def test_bad_sigma_is_refused_naming_sigma_before_any_call(sigma, error):
    calls = []

    def net(x, s, labels):
        calls.append(s)
        return x

    denoiser = fastguide.GuidedDenoiser(net, net, guidance=2.0)
    with pytest.raises(error, match="sigma"):
        denoiser.predictions(torch.randn(3, 4), sigma)
    with pytest.raises(error, match="sigma"):
        denoiser(torch.randn(3, 4), sigma)
    assert calls == []

"""Every bad input is refused before any denoiser call, with an error naming the argument."""
import math

import pytest
import torch

import fastguide
from tests.test_sampler import nonlinear_net, weak_net


class NeverCalled:
    def __call__(self, *args):
        raise AssertionError("a denoiser was called before the input was validated")


NOISE = torch.randn(3, 4)
LABELS = torch.zeros(3, 2)

BAD_INPUTS = [
    (dict(net="not a function"), TypeError, "net"),
    (dict(guide=5, guidance=2.0), TypeError, "guide"),
    (dict(noise=torch.ones(3, 4, dtype=torch.int64)), TypeError, "noise"),
    (dict(noise=[[1.0, 2.0]]), TypeError, "noise"),
    (dict(labels=torch.zeros(2, 2)), ValueError, "labels"),
    (dict(guide_labels=torch.zeros(5, 2), labels=LABELS, guidance=2.0), ValueError, "guide_labels"),
    (dict(guidance=2.0), ValueError, "guidance"),
    (dict(guidance=math.nan, guide="g"), ValueError, "guidance"),
    (dict(guidance=math.inf, guide="g"), ValueError, "guidance"),
    (dict(num_steps=0), ValueError, "num_steps"),
    (dict(num_steps=2.5), ValueError, "num_steps"),
    (dict(num_steps=10 ** 12), ValueError, "num_steps"),
    (dict(sigmas=torch.linspace(1.0, 0.0, 10 ** 6)), ValueError, "sigmas"),
    (dict(noise=torch.tensor([[1.0, math.nan], [0.0, 1.0]])), ValueError, "noise"),
    (dict(noise=torch.tensor([[1.0, math.inf], [0.0, 1.0]])), ValueError, "noise"),
    (dict(solver="dpmpp_2m", S_churn=1.0), ValueError, "S_churn"),
    (dict(solver="heun", eta=0.5), ValueError, "eta"),
    (dict(solver="euler_ancestral", eta=-1.0), ValueError, "eta"),
    (dict(labels={"a": torch.zeros(2, 2)}), ValueError, "labels\\['a'\\]"),
    (dict(labels={"a": torch.zeros(3, 2)}, guide_labels={"b": torch.zeros(3, 2)}, guidance=2.0), ValueError,
     "same keys"),
    (dict(sigma_min=0.0), ValueError, "sigma_min"),
    (dict(sigma_min=-1.0), ValueError, "sigma_min"),
    (dict(sigma_min=90.0), ValueError, "sigma_min"),
    (dict(rho=0.0), ValueError, "rho"),
    (dict(sigmas=torch.tensor([[3.0, 0.0]])), ValueError, "sigmas"),
    (dict(sigmas=torch.tensor([3.0, 4.0, 0.0])), ValueError, "sigmas"),
    (dict(sigmas=torch.tensor([3.0, 3.0, 0.0])), ValueError, "sigmas"),
    (dict(sigmas=torch.tensor([3.0, 1.0, 0.5])), ValueError, "sigmas"),
    (dict(sigmas=torch.tensor([math.inf, 1.0, 0.0])), ValueError, "sigmas"),
    (dict(sigmas=torch.tensor([math.nan, 1.0, 0.0])), ValueError, "sigmas"),
    (dict(guidance_interval=(5.0, 1.0), guide="g", guidance=2.0), ValueError, "guidance_interval"),
    (dict(guidance_interval=(1.0, 1.0), guide="g", guidance=2.0), ValueError, "guidance_interval"),
    (dict(solver="rk4"), ValueError, "solver"),
    (dict(backend="fastest"), ValueError, "backend"),
    (dict(dtype=torch.int32), TypeError, "dtype"),
]


@pytest.mark.parametrize("kwargs, error, argument", BAD_INPUTS, ids=[f"{a}-{i}" for i, (_, _, a) in enumerate(BAD_INPUTS)])
def test_bad_input_is_refused_before_any_call(kwargs, error, argument):
    kwargs = dict(kwargs)
    net = kwargs.pop("net", NeverCalled())
    noise = kwargs.pop("noise", NOISE)
    if kwargs.get("guide") == "g":
        kwargs["guide"] = NeverCalled()
    with pytest.raises(error, match=argument):
        fastguide.sample(net, noise, **kwargs)


@pytest.mark.parametrize("model", ["net", "guide"])
@pytest.mark.parametrize("fault, message", [
    (lambda d: d[:1], "shape"),
    (lambda d: d.double(), "dtype"),
    (lambda d: d.to("meta"), "device"),
    (lambda d: d * math.nan, "non-finite"),
    (lambda d: d + math.inf, "non-finite"),
    (lambda d: d.tolist(), "tensor"),
])
def test_bad_denoiser_output_stops_the_run_naming_model_and_step(model, fault, message):
    calls = {"n": 0}

    def faulty(fn):
        def call(x, sigma, labels):
            calls["n"] += 1
            out = fn(x, sigma, labels)
            return fault(out) if calls["n"] == 4 else out
        return call

    net = faulty(nonlinear_net) if model == "net" else nonlinear_net
    guide = faulty(weak_net) if model == "guide" else weak_net
    with pytest.raises(fastguide.DenoiserOutputError, match=rf"step \d+ .*{model} returned.*{message}"):
        fastguide.sample(net, torch.randn(2, 3), guide=guide, guidance=2.0, num_steps=6)


def test_bad_cfg_batch_output_is_caught():
    def halves(x, sigma, labels):
        return x[: x.shape[0] // 2]

    with pytest.raises(fastguide.DenoiserOutputError, match="net returned shape"):
        fastguide.sample(halves, torch.randn(2, 3), labels=torch.zeros(2, 1), guide_labels=torch.ones(2, 1),
                         guidance=2.0, num_steps=3)


def test_cfg_without_labels_is_refused():
    with pytest.raises(ValueError, match="labels"):
        fastguide.sample(NeverCalled(), torch.randn(2, 3), guide_labels=torch.ones(2, 1), guidance=2.0)


def test_edm_sampler_refuses_bad_input_too():
    with pytest.raises(ValueError, match="guidance"):
        fastguide.edm_sampler(NeverCalled(), NOISE, guidance=2.0)
    with pytest.raises(ValueError, match="num_steps"):
        fastguide.edm_sampler(NeverCalled(), NOISE, gnet=NeverCalled(), num_steps=0)


def test_cfg_non_finite_guide_half_is_named():
    def net(x, sigma, labels):
        out = x * 0.5
        return torch.where(labels[:, :1] > 0, out, out * math.nan)  # NaN in the guide_labels half

    with pytest.raises(fastguide.DenoiserOutputError, match=r"step 0 .*net \(guide_labels\) returned non-finite"):
        fastguide.sample(net, torch.randn(2, 3), labels=torch.ones(2, 1), guide_labels=torch.zeros(2, 1),
                         guidance=2.0, num_steps=3)


def test_overflow_from_finite_predictions_is_an_error_not_a_silent_inf():
    net = lambda x, s, l: torch.full_like(x, 6e4)  # noqa: E731  (finite in float16)
    guide = lambda x, s, l: torch.full_like(x, -6e4)  # noqa: E731
    with pytest.raises(FloatingPointError, match="step 0: x became non-finite"):
        fastguide.sample(net, torch.randn(2, 3), guide=guide, guidance=10.0, num_steps=3, dtype=torch.float16)


def test_finite_check_can_be_left_to_the_caller():
    denoiser = fastguide.GuidedDenoiser(lambda x, s, l: x * math.nan, check_finite=False)
    x = fastguide.sampler.run_sampler(denoiser, torch.randn(2, 3), num_steps=2)
    assert torch.isnan(x).all() and denoiser.check_finite is False

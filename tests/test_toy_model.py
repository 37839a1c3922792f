"""The toy energy-based MLP denoiser: the spec'd forward pass, D at initialisation, autograd score."""
import math

import pytest
import torch

from fastguide.toy.model import ToyModel, load_file, save_file


def spec_logp(model, x, sigma):
    """The contract's forward pass written out in float64, independently of ToyModel.logp."""
    weights = [w.detach().double() for w in model.weights]
    # EDM2's MPLinear: rows to unit variance (eps 1e-4 on the rms), then divided by √fan_in
    weights = [w / (1e-4 + torch.sqrt((w * w).mean(1, keepdim=True))) / math.sqrt(w.shape[1]) for w in weights]
    c_in = 1 / torch.sqrt(model.sigma_data ** 2 + sigma ** 2)
    h = torch.cat([x * c_in[:, None], torch.log(sigma)[:, None] / 4, torch.ones_like(sigma)[:, None]], 1)
    for w in weights[:-1]:
        pre = h @ w.T
        h = pre / (1 + torch.exp(-pre)) / 0.596
    y = h @ weights[-1].T
    return float(model.gain.detach()) * (y * y).mean(1) / sigma - 0.5 * ((x * c_in[:, None]) ** 2).sum(1)


def random_model(hidden=16, num_layers=4, seed=0):
    torch.manual_seed(seed)
    model = ToyModel(hidden, num_layers).double()
    with torch.no_grad():
        model.gain.fill_(0.8)
    return model


def inputs(generator, n=37):
    x = torch.randn(n, 2, generator=generator, dtype=torch.float64) * 0.6
    sigma = torch.exp(torch.randn(n, generator=generator, dtype=torch.float64) * 1.5 - 2.3)
    return x, sigma


def test_parameter_shapes():
    model = ToyModel(hidden=24, num_layers=4)
    assert [tuple(w.shape) for w in model.weights] == [(24, 4), (24, 24), (24, 24), (24, 24), (24, 24)]
    assert model.gain_value() == 0.0 and model.sigma_data == 0.5
    eff = model.effective_weights()
    assert len(eff) == 5 and all(w.dtype == torch.float32 and w.is_contiguous() for w in eff)
    for w, raw in zip(eff, model.weights):
        norms = raw.detach().norm(dim=1)                 # EDM2's MPLinear: w / (1e-4·√fan_in + ‖w‖)
        torch.testing.assert_close(w.norm(dim=1), norms / (1e-4 * math.sqrt(raw.shape[1]) + norms), rtol=1e-6, atol=0)


@pytest.mark.parametrize("hidden,num_layers", [(16, 4), (7, 2)])
def test_logp_matches_spec(generator, hidden, num_layers):
    model = random_model(hidden, num_layers)
    x, sigma = inputs(generator)
    torch.testing.assert_close(model.logp(x, sigma), spec_logp(model, x, sigma), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_denoiser_at_initialisation_is_c_skip_x(generator, dtype):
    model = ToyModel(hidden=32).to(dtype)
    x, sigma = inputs(generator)
    x, sigma = x.to(dtype), sigma.to(dtype)
    c_skip = model.sigma_data ** 2 / (sigma ** 2 + model.sigma_data ** 2)
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    torch.testing.assert_close(model(x, sigma), c_skip[:, None] * x, rtol=tol, atol=tol)


def test_autograd_score_matches_finite_differences(generator):
    model = random_model()
    x, sigma = inputs(generator)
    h = 1e-6
    grad = torch.stack([(model.logp(x + h * e, sigma) - model.logp(x - h * e, sigma)) / (2 * h)
                        for e in torch.eye(2, dtype=torch.float64)], dim=1).detach()
    score = model.score(x, sigma)
    torch.testing.assert_close(score, grad, rtol=1e-6, atol=1e-6 * float(grad.abs().max()))
    torch.testing.assert_close(model(x, sigma), x + sigma[:, None] ** 2 * score, rtol=1e-14, atol=1e-14)


def test_denoiser_contract(generator):
    model = random_model().float()
    x, sigma = (t.float() for t in inputs(generator, 5))
    with torch.no_grad():
        out = model(x, sigma)
    assert out.shape == x.shape and out.dtype == torch.float32 and not out.requires_grad
    # A 0-dim or [1] sigma is broadcast to the batch; labels are ignored.
    expected = model(x, torch.full((5,), 0.3))
    torch.testing.assert_close(model(x, torch.tensor(0.3)), expected, rtol=0, atol=0)
    torch.testing.assert_close(model(x, torch.tensor([0.3]), labels=torch.zeros(5)), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="sigma"):
        model(x, torch.ones(3))
    with pytest.raises(ValueError, match=r"x must be a \[N, 2\]"):
        model(torch.ones(5, 3), sigma)


def test_forced_weight_normalisation_keeps_the_function(generator):
    model = random_model()
    with torch.no_grad():
        model.weights[1].mul_(3.0)
    x, sigma = inputs(generator)
    before = model.logp(x, sigma)
    raw_norms = [w.detach().norm(dim=1) for w in model.weights]
    model.normalize_weights()
    for w, raw in zip(model.weights, raw_norms):             # EDM2's: √n·‖w‖/(1e-4·√n + ‖w‖)
        root_n = math.sqrt(w.shape[1])
        torch.testing.assert_close(w.detach().norm(dim=1), root_n * raw / (1e-4 * root_n + raw), rtol=1e-12, atol=0)
    # Only the 1e-4 in the normaliser sees the row norm: a change of ~1e-4·(1/4 − 1/12) per layer.
    torch.testing.assert_close(model.logp(x, sigma), before, rtol=0, atol=2e-4 * float(before.detach().abs().max()))


def test_save_and_load_roundtrip(tmp_path, generator):
    model = random_model(hidden=12, num_layers=3).float()
    path = str(tmp_path / "m.safetensors")
    save_file(model, path, {"iterations": 7})
    loaded = load_file(path)
    assert not loaded.training and loaded.hidden == 12 and loaded.num_layers == 3
    x, sigma = (t.float() for t in inputs(generator))
    torch.testing.assert_close(loaded(x, sigma), model(x, sigma), rtol=0, atol=0)

"""Conditioning as a dict of tensors through every evaluation strategy and every public face: the same
predictions as two separate calls of the models with keyword arguments; bad dicts refused, naming the key."""
import pytest
import torch
from torch import nn

import fastguide
from fastguide import k_diffusion
from fastguide.guidance import GuidedDenoiser

BATCH, TOKENS, WIDTH = 3, 4, 6


class KwargsDenoiser(nn.Module):
    """A denoiser that needs several conditioning tensors as keyword arguments (prompt tokens, a pooled
    vector, a mask over the tokens), each batched on dim 0, like a text-conditioned transformer."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(2, WIDTH)
        self.ctx = nn.Linear(WIDTH, WIDTH)
        self.pool = nn.Linear(3, WIDTH)
        self.out = nn.Linear(WIDTH, 2)

    def forward(self, x, sigma, *, context, pooled, mask):
        weights = mask / mask.sum(dim=1, keepdim=True)                          # [B, T]
        summary = self.ctx((weights[:, :, None] * context).sum(dim=1))          # [B, W]
        h = torch.tanh(self.inp(x) + summary + self.pool(pooled) + sigma.log()[:, None])
        return x / (1 + sigma[:, None] ** 2) + self.out(h)


def conditioning(seed, batch=BATCH):
    generator = torch.Generator().manual_seed(seed)
    return {"context": torch.randn(batch, TOKENS, WIDTH, generator=generator),
            "pooled": torch.randn(batch, 3, generator=generator),
            "mask": (torch.rand(batch, TOKENS, generator=generator) > 0.3).float().clamp_(min=0).add_(0.01)}


@pytest.fixture
def inputs():
    x = torch.randn(BATCH, 2, generator=torch.Generator().manual_seed(0)) * 3
    return x, torch.full((BATCH,), 2.5), conditioning(1), conditioning(2)


CFG_STRATEGIES = ["auto", "cfg-batch", "separate", "tune"]
AUTOGUIDANCE_STRATEGIES = ["auto", "separate", "stacked", "tune"]


def expected_pair(net, guide, x, sigma, labels, guide_labels):
    with torch.no_grad():
        return net(x, sigma, **labels), guide(x, sigma, **guide_labels)


def assert_pair(actual, expected, exact):
    for a, e in zip(actual, expected):
        if exact:
            assert torch.equal(a, e)
        else:  # one 2B batch or a vmap need not round as two B calls do
            torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("strategy", CFG_STRATEGIES)
def test_cfg_dict_through_every_strategy(strategy, inputs):
    x, sigma, labels, guide_labels = inputs
    net = KwargsDenoiser(seed=0)
    denoiser = GuidedDenoiser(net, guidance=3.0, guide_labels=guide_labels, strategy=strategy)
    expected = expected_pair(net, net, x, sigma, labels, guide_labels)
    with torch.no_grad():
        for _ in range(12):  # "tune" settles after a few evaluations; every one returns the baseline's bits
            actual = denoiser.predictions(x, sigma, labels)
        guided = denoiser(x, sigma, labels)
    assert_pair(actual, expected, exact=denoiser.stats["strategy"] == "separate")
    torch.testing.assert_close(guided, expected[1] + 3.0 * (expected[0] - expected[1]), rtol=1e-6, atol=1e-6)
    assert not torch.equal(expected[0], expected[1])  # the two conditionings do differ


@pytest.mark.parametrize("strategy", AUTOGUIDANCE_STRATEGIES)
@pytest.mark.parametrize("own_guide_labels", [False, True])
def test_autoguidance_dict_through_every_strategy(strategy, own_guide_labels, inputs):
    x, sigma, labels, other = inputs
    net, guide = KwargsDenoiser(seed=0), KwargsDenoiser(seed=1)
    guide_labels = other if own_guide_labels else None
    denoiser = GuidedDenoiser(net, guide, guidance=2.0, guide_labels=guide_labels, strategy=strategy)
    expected = expected_pair(net, guide, x, sigma, labels, guide_labels or labels)
    with torch.no_grad():
        for _ in range(12):
            actual = denoiser.predictions(x, sigma, labels)
    assert_pair(actual, expected, exact=denoiser.stats["strategy"] == "separate")


@pytest.mark.parametrize("strategy", ["cfg-batch", "separate"])
def test_sample_with_dict_equals_loop_of_separate_calls(strategy, inputs):
    """fastguide.sample and k_diffusion.sample_euler with dict labels: the plain Euler loop over two calls."""
    x, _, labels, guide_labels = inputs
    net = KwargsDenoiser(seed=0)
    sigmas = torch.tensor([5.0, 2.0, 0.7, 0.1, 0.0])
    expected = x * sigmas[0]
    with torch.no_grad():
        for t_cur, t_next in zip(sigmas[:-1], sigmas[1:]):
            sigma = t_cur.expand(BATCH)
            d_cond, d_uncond = net(expected, sigma, **labels), net(expected, sigma, **guide_labels)
            denoised = d_uncond + 3.0 * (d_cond - d_uncond)
            expected = expected + (t_next - t_cur) * (expected - denoised) / t_cur
        actual = fastguide.sample(net, x, labels=labels, guide_labels=guide_labels, guidance=3.0, sigmas=sigmas,
                                  solver="euler", strategy=strategy)
        guided = GuidedDenoiser(net, guidance=3.0, guide_labels=guide_labels, strategy=strategy)
        by_k = k_diffusion.sample_euler(guided, x * sigmas[0], sigmas, extra_args={"labels": labels}, disable=True)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(by_k, actual)


BAD = [
    (lambda c, u: (c, {k: v for k, v in u.items() if k != "mask"}), ValueError, "same keys; key 'mask'"),
    (lambda c, u: (c, dict(u, extra=u["mask"])), ValueError, "same keys; key 'extra'"),
    (lambda c, u: (dict(c, pooled=c["pooled"][:2]), u), ValueError,
     r"labels\['pooled'\] has batch 2 but labels\['context'\]"),
    (lambda c, u: (c, dict(u, context=u["context"][:1])), ValueError,
     r"guide_labels\['pooled'\] has batch 3 but guide_labels\['context'\] has batch 1"),
    (lambda c, u: (c, {k: v[:2] for k, v in u.items()}), ValueError,
     r"guide_labels\['context'\] has batch \(2,\), expected the batch of x \(3\)"),
    (lambda c, u: (c, dict(u, mask=[1.0, 2.0, 3.0])), TypeError, r"guide_labels\['mask'\] must be a tensor"),
    (lambda c, u: (c, dict(u, mask=torch.tensor(1.0))), ValueError, r"guide_labels\['mask'\] has batch \(\)"),
    (lambda c, u: (c, u["context"]), ValueError, "same kind"),
    (lambda c, u: ({}, u), ValueError, "labels is an empty dict"),
]


@pytest.mark.parametrize("make, error, match", BAD)
def test_bad_dicts_refused_before_any_call(make, error, match, inputs):
    x, _, cond, uncond = inputs
    labels, guide_labels = make(cond, uncond)
    calls = []

    def net(x, sigma, **kwargs):
        calls.append(1)
        return x

    with pytest.raises(error, match=match):
        fastguide.sample(net, x, labels=labels, guide_labels=guide_labels, guidance=2.0, num_steps=2)
    assert not calls


@pytest.mark.parametrize("strategy", ["cfg-batch", "stacked"])
def test_compiled_evaluation_with_dicts_equals_eager(strategy, inputs, one_thread):
    """compile=True traces the strategies with dict conditioning (keyword arguments, per-key cat / stack)."""
    from torch._dynamo.utils import counters

    from fastguide import batching
    x, _, labels, guide_labels = inputs
    net = KwargsDenoiser(seed=0)
    guides = dict(guide_labels=guide_labels) if strategy == "cfg-batch" else dict(guide=KwargsDenoiser(seed=1))
    run = dict(labels=labels, guidance=2.0, sigmas=torch.tensor([5.0, 1.0, 0.2, 0.0]), solver="euler",
               strategy=strategy, return_stats=True, **guides)
    torch._dynamo.reset()
    batching.TUNERS.clear()
    try:
        with torch.no_grad():
            eager, eager_stats = fastguide.sample(net, x, **run)
            before = counters["stats"]["unique_graphs"]
            compiled, compiled_stats = fastguide.sample(net, x, compile=True, **run)
            assert counters["stats"]["unique_graphs"] > before  # compiled code really ran
    finally:
        torch._dynamo.reset()
    assert compiled_stats == eager_stats and compiled_stats["strategy"] == strategy
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)

"""Evaluation strategies of GuidedDenoiser (fastguide.batching) against the naive two-call evaluation."""
import logging

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fastguide
from fastguide import batching
from tests.conftest import requires_cuda

NUM_CLASSES = 5


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add synchronisation


class ConvDenoiser(nn.Module):
    """A small EDM-style conv denoiser: D = c_skip·x + c_out·F(c_in·x, c_noise, labels)."""

    def __init__(self, channels=8, width=16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        self.conv_mid = nn.Conv2d(width, width, 3, padding=1)
        self.conv_out = nn.Conv2d(width, channels, 3, padding=1)
        self.noise_proj = nn.Linear(1, width)
        self.label_emb = nn.Embedding(NUM_CLASSES, width)
        self.sigma_data = 0.5

    def forward(self, x, sigma, labels=None):
        sigma = sigma.reshape(-1, 1, 1, 1)
        norm = (sigma ** 2 + self.sigma_data ** 2).sqrt()
        emb = self.noise_proj(sigma.log().reshape(-1, 1) / 4)
        if labels is not None:
            emb = emb + self.label_emb(labels)
        h = F.silu(self.conv_in(x / norm) + emb[:, :, None, None])
        h = F.silu(self.conv_mid(h))
        return self.sigma_data ** 2 / norm ** 2 * x + sigma * self.sigma_data / norm * self.conv_out(h)


class MLPDenoiser(nn.Module):
    """A small MLP denoiser on flat vectors."""

    def __init__(self, dim=6, hidden=32, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList([nn.Linear(dim + 1, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, dim)])
        self.label_emb = nn.Embedding(NUM_CLASSES, hidden)

    def forward(self, x, sigma, labels=None):
        h = self.layers[0](torch.cat([x / (1 + sigma[:, None] ** 2).sqrt(), sigma.log()[:, None] / 4], dim=1))
        if labels is not None:
            h = h + self.label_emb(labels)
        h = self.layers[1](F.silu(h))
        return x / (1 + sigma[:, None] ** 2) + self.layers[2](F.silu(h))


MODELS = {"conv": (ConvDenoiser, (8, 6, 6)), "mlp": (MLPDenoiser, (6,))}


def make_inputs(model, batch, labels, seed=1, non_contiguous=False):
    gen = torch.Generator().manual_seed(seed)
    shape = MODELS[model][1]
    x = torch.randn(2 * batch if non_contiguous else batch, *shape, generator=gen)
    if non_contiguous:
        x = x[::2]
    sigma = torch.rand((), generator=gen).item() * 5 + 0.1
    class_labels = torch.randint(0, NUM_CLASSES, (batch,), generator=gen) if labels else None
    return x, sigma, class_labels


def naive(net, guide, x, sigma, labels, guide_labels):
    sigma_t = torch.full((x.shape[0],), sigma)
    return net(x, sigma_t, labels), guide(x, sigma_t, guide_labels)


def assert_pair_close(got, expected):
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def predictions_twice(denoiser, x, sigma, labels):
    """Evaluates twice, so that a strategy built or tuned on the first call also runs once settled."""
    first = denoiser.predictions(x, sigma, labels)
    return first, denoiser.predictions(x, sigma, labels)


@pytest.fixture(autouse=True)
def fresh_tuners():
    batching.TUNERS.clear()
    yield
    batching.TUNERS.clear()


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("labels", [False, True])
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("strategy", ["separate", "stacked", "auto", "tune"])
def test_autoguidance_strategies_equal_two_calls(model, labels, batch, strategy):
    cls = MODELS[model][0]
    net, guide = cls(seed=1).eval(), cls(seed=2).eval()
    x, sigma, class_labels = make_inputs(model, batch, labels, non_contiguous=batch > 1)
    denoiser = fastguide.GuidedDenoiser(net, guide, guidance=2.5, strategy=strategy)
    expected = naive(net, guide, x, sigma, class_labels, class_labels)
    assert not torch.allclose(*expected, atol=1e-3)  # the two networks really differ
    for got in predictions_twice(denoiser, x, sigma, class_labels):
        assert_pair_close(got, expected)
    assert denoiser.stats["net"] == denoiser.stats["guide"] == 2
    assert denoiser.stats["strategy"] in ("separate", "stacked")


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("strategy", ["separate", "cfg-batch", "stacked", "auto", "tune"])
def test_cfg_strategies_equal_two_calls(model, batch, strategy):
    net = MODELS[model][0](seed=3).eval()
    x, sigma, labels = make_inputs(model, batch, labels=True)
    null_labels = torch.full((batch,), NUM_CLASSES - 1)
    denoiser = fastguide.GuidedDenoiser(net, guide_labels=null_labels, guidance=3.0, strategy=strategy)
    expected = naive(net, net, x, sigma, labels, null_labels)
    for got in predictions_twice(denoiser, x, sigma, labels):
        assert_pair_close(got, expected)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_stacked_with_different_guide_labels_equals_two_calls(model):
    cls = MODELS[model][0]
    net, guide = cls(seed=1).eval(), cls(seed=2).eval()
    x, sigma, labels = make_inputs(model, 4, labels=True)
    guide_labels = (labels + 1) % NUM_CLASSES
    denoiser = fastguide.GuidedDenoiser(net, guide, guidance=2.0, guide_labels=guide_labels, strategy="stacked")
    assert_pair_close(denoiser.predictions(x, sigma, labels), naive(net, guide, x, sigma, labels, guide_labels))


def test_cfg_batch_halves_are_views_of_one_call():
    calls = []
    net = MLPDenoiser(seed=4)
    net.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    x, sigma, labels = make_inputs("mlp", 3, labels=True)
    denoiser = fastguide.GuidedDenoiser(net, guide_labels=torch.zeros(3, dtype=torch.long), guidance=2.0,
                                        strategy="cfg-batch")
    d_main, d_guide = denoiser.predictions(x, sigma, labels)
    assert calls == [6]
    assert d_main.untyped_storage().data_ptr() == d_guide.untyped_storage().data_ptr()
    assert d_guide.data_ptr() == d_main.data_ptr() + 3 * 6 * d_main.element_size()


def test_stacked_halves_are_views_of_one_output():
    net, guide = ConvDenoiser(seed=1), ConvDenoiser(seed=2)
    x, sigma, labels = make_inputs("conv", 2, labels=True)
    d_main, d_guide = fastguide.GuidedDenoiser(net, guide, guidance=2.0, strategy="stacked").predictions(x, sigma,
                                                                                                         labels)
    assert d_main.untyped_storage().data_ptr() == d_guide.untyped_storage().data_ptr()


def test_stacked_follows_parameter_updates():
    net, guide = MLPDenoiser(seed=1), MLPDenoiser(seed=2)
    x, sigma, labels = make_inputs("mlp", 3, labels=True)
    denoiser = fastguide.GuidedDenoiser(net, guide, guidance=2.0, strategy="stacked")
    denoiser.predictions(x, sigma, labels)
    with torch.no_grad():
        guide.layers[2].bias.add_(0.5)                              # in place (an optimizer step)
    assert_pair_close(denoiser.predictions(x, sigma, labels), naive(net, guide, x, sigma, labels, labels))
    guide.load_state_dict(MLPDenoiser(seed=7).state_dict())         # copied in place
    assert_pair_close(denoiser.predictions(x, sigma, labels), naive(net, guide, x, sigma, labels, labels))
    net.layers[1].weight = nn.Parameter(torch.randn_like(net.layers[1].weight))  # replaced
    assert_pair_close(denoiser.predictions(x, sigma, labels), naive(net, guide, x, sigma, labels, labels))


class ScaledMLP(MLPDenoiser):
    pass


@pytest.mark.parametrize("guide, reason", [
    (lambda: MLPDenoiser(hidden=16).eval(), "attribute 'out_features' of layers.0 differs: 32 in net, 16 in guide"),
    (lambda: ScaledMLP().eval(), "the top module is a MLPDenoiser in net but a ScaledMLP in guide"),
    (lambda: MLPDenoiser().train(), "attribute 'training' of the top module differs: False in net, True in guide"),
    (lambda: MLPDenoiser().double().eval(), "parameter 'layers.0.weight' is (32, 7) torch.float32 on cpu in net "
                                            "but (32, 7) torch.float64 on cpu in guide"),
    (lambda: (lambda x, sigma, labels: x), "guide is a function, not an nn.Module"),
])
def test_stacked_refuses_other_architectures_and_says_what_differs(guide, reason):
    net = MLPDenoiser().eval()
    with pytest.raises(ValueError, match="strategy 'stacked' needs net and guide of the same architecture") as exc:
        fastguide.GuidedDenoiser(net, guide(), guidance=2.0, strategy="stacked")
    assert reason in str(exc.value)


def test_auto_handles_different_architectures_with_two_calls():
    net, guide = ConvDenoiser(width=16, seed=1).eval(), ConvDenoiser(width=8, seed=2).eval()  # "S" and "XS"
    x, sigma, labels = make_inputs("conv", 3, labels=True)
    denoiser = fastguide.GuidedDenoiser(net, guide, guidance=2.0)
    assert batching.candidates(net, guide, x.device) == ["separate"]
    for got in predictions_twice(denoiser, x, sigma, labels):
        assert_pair_close(got, naive(net, guide, x, sigma, labels, labels))
    assert denoiser.stats["strategy"] == "separate"


def test_strategy_errors_name_the_problem():
    net = MLPDenoiser()
    with pytest.raises(ValueError, match=r"strategy must be one of \('auto', 'tune', 'separate', 'cfg-batch', "
                                         r"'stacked', 'streams'\), got 'vmap'"):
        fastguide.GuidedDenoiser(net, MLPDenoiser(), guidance=2.0, strategy="vmap")
    with pytest.raises(ValueError, match="'cfg-batch' needs the guide to be net itself"):
        fastguide.GuidedDenoiser(net, MLPDenoiser(), guidance=2.0, strategy="cfg-batch")
    denoiser = fastguide.GuidedDenoiser(net, MLPDenoiser(), guidance=2.0, strategy="streams")
    x, sigma, labels = make_inputs("mlp", 2, labels=False)
    if x.device.type == "cpu":
        with pytest.raises(ValueError, match="'streams' runs on CUDA tensors, got x on cpu"):
            denoiser.predictions(x, sigma, labels)
        assert denoiser.stats["net"] == denoiser.stats["guide"] == 0


class FakeStrategy:
    """Takes `seconds` per call (or raises), returns outputs equal to every other one's unless told
    to differ, and records its calls."""

    def __init__(self, name, seconds, fail=False, differs=False):
        self.name, self.seconds, self.fail, self.differs, self.calls = name, seconds, fail, differs, 0

    def __call__(self, x, sigma, labels, guide_labels):
        self.calls += 1
        if self.fail:
            raise RuntimeError("vmap cannot run this model")
        deadline = batching.time.perf_counter() + self.seconds
        while batching.time.perf_counter() < deadline:
            pass
        value = torch.full((2,), 1.0 + (1e-7 if self.differs else 0.0))
        return value, value.clone()


def run_tuner(strategies, evaluations):
    tuner = batching.AutoTuner(list(strategies))
    results = [tuner.evaluate(strategies, torch.zeros(1), None, None, None) for _ in range(evaluations)]
    return tuner, [name for name, _ in results]


@pytest.mark.parametrize("fast", ["separate", "stacked"])
def test_tune_picks_the_faster_and_never_a_slower_one_than_the_default(fast):
    times = {"separate": 0.002, "stacked": 0.002}
    times[fast] = 0.0002
    strategies = {name: FakeStrategy(name, seconds) for name, seconds in times.items()}
    rounds = batching.WARMUP_REPS + batching.TIMED_REPS
    tuner, used = run_tuner(strategies, rounds)
    assert used == ["separate"] * rounds  # every tuning result is the default strategy's
    assert tuner.choice == fast and len(tuner.timings_ms) == 2
    assert strategies["separate"].calls == strategies["stacked"].calls == rounds


def test_tune_keeps_the_default_when_the_other_is_not_clearly_faster():
    strategies = {"separate": FakeStrategy("separate", 0.002), "stacked": FakeStrategy("stacked", 0.002)}
    strategies["separate"].seconds = 0.002 * batching.MARGIN * 0.99  # within the margin: not worth switching
    tuner, _ = run_tuner(strategies, batching.WARMUP_REPS + batching.TIMED_REPS)
    assert tuner.choice == "separate"


@pytest.mark.parametrize("fault", ["fail", "differs"])
def test_tune_drops_a_candidate_that_raises_or_changes_bits(fault):
    strategies = {"separate": FakeStrategy("separate", 0.002),
                  "stacked": FakeStrategy("stacked", 0.0, **{fault: True})}
    tuner, used = run_tuner(strategies, 3)
    assert used == ["separate"] * 3 and tuner.choice == "separate" and strategies["stacked"].calls == 1


def test_tuned_choice_is_cached_shared_visible_and_logged(caplog):
    net, guide = MLPDenoiser(seed=1).eval(), MLPDenoiser(seed=2).eval()
    x, sigma, labels = make_inputs("mlp", 3, labels=True)
    tuning = batching.WARMUP_REPS + batching.TIMED_REPS
    first = fastguide.GuidedDenoiser(net, guide, guidance=2.0, strategy="tune")
    with caplog.at_level(logging.DEBUG, logger="fastguide"):
        for _ in range(tuning + 1):  # the tuning rounds, then one evaluation with the choice
            first.predictions(x, sigma, labels)
    (tuner,) = first.tuners.values()
    assert tuner.choice in ("separate", "stacked") and first.stats["strategy"] == tuner.choice
    assert f"chose {tuner.choice!r} for x (3, 6) torch.float32 on cpu" in caplog.text
    second = fastguide.GuidedDenoiser(net, guide, guidance=3.0, strategy="tune")  # same pair: reused
    second.predictions(x, sigma, labels)
    assert second.stats["strategy"] == tuner.choice and list(second.tuners.values()) == [tuner]
    other_shape = make_inputs("mlp", 4, labels=True)
    second.predictions(*other_shape)
    assert len(second.tuners) == 2 and second.stats["strategy"] == "separate"  # a new key starts tuning


@pytest.mark.parametrize("strategy", ["auto", "tune"])
def test_the_default_and_tuned_strategies_give_the_same_bits_first_call_or_not(strategy):
    """Issue 12: strategy="auto" used to alternate strategies while timing them (4.6e-5 apart)."""
    net, guide = MLPDenoiser(seed=1).eval(), MLPDenoiser(seed=2).eval()
    noise = torch.randn(3, 6, generator=torch.Generator().manual_seed(3))
    labels = torch.arange(3) % NUM_CLASSES
    runs = [fastguide.sample(net, noise, labels=labels, guide=guide, guidance=2.5, num_steps=8, strategy=strategy)
            for _ in range(3)]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


def test_stacked_never_computes_with_stale_weights_written_through_data():
    """Issue 12: the stacked copy used to survive writes through .data (max error 2.09)."""
    net, guide = MLPDenoiser(seed=1).eval(), MLPDenoiser(seed=2).eval()
    x, sigma, labels = make_inputs("mlp", 3, labels=True)
    denoiser = fastguide.GuidedDenoiser(net, guide, guidance=2.0, strategy="stacked")
    denoiser.predictions(x, sigma, labels)
    noise = torch.randn(3, 6)
    fastguide.sample(net, noise, labels=labels, guide=guide, guidance=2.0, num_steps=3, strategy="stacked")
    for parameter in guide.parameters():
        parameter.data.mul_(0.5)  # no version bump, no new storage: undetectable
    got = denoiser.predictions(x, sigma, labels)
    assert_pair_close(got, naive(net, guide, x, sigma, labels, labels))
    expected = fastguide.sample(net, noise, labels=labels, guide=guide, guidance=2.0, num_steps=3,
                                strategy="separate")
    torch.testing.assert_close(fastguide.sample(net, noise, labels=labels, guide=guide, guidance=2.0, num_steps=3,
                                                strategy="stacked"), expected, rtol=1e-5, atol=1e-5)


ComputeOps = batching.ComputeOpCounter


# functorch's batching rule for addmm (every nn.Linear) emits bmm, bias·β and add: 3 operators for
# the 2 addmm of two calls, so an MLP gains only on its elementwise and parameter-free operators
# (about 0.70-0.71 here); convolutions batch into one grouped convolution.
@pytest.mark.parametrize("model, bound", [("conv", 0.7), ("mlp", 0.75)])
def test_stacked_dispatches_at_most_0_7_of_the_compute_ops_of_two_calls(model, bound):
    cls = MODELS[model][0]
    net, guide = cls(seed=1).eval(), cls(seed=2).eval()
    x, sigma, labels = make_inputs(model, 4, labels=True)
    counts = {}
    for strategy in ("separate", "stacked"):
        denoiser = fastguide.GuidedDenoiser(net, guide, guidance=2.0, strategy=strategy, check_finite=False)
        with denoiser.evaluator.run():  # a sampler run keeps the stacked state: built outside the count
            denoiser.predictions(x, sigma, labels)
            with torch.no_grad(), ComputeOps() as mode:
                denoiser.predictions(x, sigma, labels)
        counts[strategy] = len(mode.ops)
    assert counts["separate"] >= 10
    assert counts["stacked"] <= bound * counts["separate"], counts


def test_compute_op_counter_counts_compute_and_skips_views():
    a = torch.randn(4, 3)
    with ComputeOps() as mode:
        (a.reshape(12)[2:] + 1).view(5, 2).exp().sum()
    assert [str(op) for op in mode.ops] == ["aten.add.Tensor", "aten.exp.default", "aten.sum.default"]


@requires_cuda
@pytest.mark.parametrize("model", sorted(MODELS))
def test_streams_equal_two_calls_on_cuda(model):
    cls = MODELS[model][0]
    net, guide = cls(seed=1).cuda().eval(), cls(seed=2).cuda().eval()
    x, sigma, labels = make_inputs(model, 5, labels=True)
    x, labels = x.cuda(), labels.cuda()
    denoiser = fastguide.GuidedDenoiser(net, guide, guidance=2.0, strategy="streams")
    sigma_t = torch.full((5,), sigma, device="cuda")
    expected = net(x, sigma_t, labels), guide(x, sigma_t, labels)
    for got in predictions_twice(denoiser, x, sigma, labels):
        assert_pair_close(got, expected)

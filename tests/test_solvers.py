"""DPM-Solver++(2M) and Euler ancestral, and what every solver shares: float64 formulas written here,
k-diffusion-signature faces, convergence, moments, host reads per run, fullgraph tracing."""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastguide
from fastguide import core, dispatch, plan
from fastguide.k_diffusion import sample_dpmpp_2m, sample_euler, sample_euler_ancestral, sample_heun
from tests.gaussian import GaussianDenoiser
from tests.tiny_nets import SigmaLinear
from tests.test_sampler import edm_schedule, fixed_draws, guided_denoiser, nonlinear_net, replay, weak_net

SOLVERS = fastguide.sampler.SOLVERS
K_SAMPLERS = {"euler": sample_euler, "heun": sample_heun, "dpmpp_2m": sample_dpmpp_2m,
              "euler_ancestral": sample_euler_ancestral}
BACKENDS = [name for name in ("reference", "cpp", "triton") if dispatch.backends()[name]["available"]]


def dpmpp_2m_run(denoise, x, sigmas):
    """k-diffusion's sample_dpmpp_2m written out in float64: t = −log σ, h = t_next − t."""
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, t_next = -math.log(sigmas[i]), -math.log(sigmas[i + 1])
            h = t_next - t
            if old_denoised is None:
                x = (sigmas[i + 1] / sigmas[i]) * x - math.expm1(-h) * denoised
            else:
                r = (t - -math.log(sigmas[i - 1])) / h
                denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
                x = (sigmas[i + 1] / sigmas[i]) * x - math.expm1(-h) * denoised_d
        old_denoised = denoised
    return x


def euler_ancestral_run(denoise, x, sigmas, draws, eta=1.0, s_noise=1.0):
    """k-diffusion's sample_euler_ancestral in float64, noise from `draws` where σ_next > 0."""
    draws = iter(draws)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        sigma_up = min(sigma_next, eta * math.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2))
        sigma_down = math.sqrt(sigma_next ** 2 - sigma_up ** 2)
        x = x + (x - denoised) / sigma * (sigma_down - sigma)
        if sigma_next > 0:
            x = x + next(draws) * s_noise * sigma_up
    return x


CASES = [
    dict(),
    dict(guidance=2.5),
    dict(guidance=3.0, interval=(0.28, 5.42)),
    dict(guidance=-0.5, custom=True),
]


def run_case(solver, case, backend, dtype=torch.float64, eta=1.0, s_noise=1.0):
    noise = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    t_steps = [12.0, 7.0, 3.0, 1.5, 0.6, 0.2, 0.05, 0.0] if case.get("custom") else edm_schedule(9)
    guidance, interval = case.get("guidance", 1.0), case.get("interval")
    draws = fixed_draws(noise.shape, len(t_steps))
    got = fastguide.sample(nonlinear_net, noise.to(dtype), guide=weak_net if guidance != 1 else None,
                           guidance=guidance, guidance_interval=interval, solver=solver, dtype=dtype,
                           sigmas=torch.tensor(t_steps, dtype=torch.float64), randn_like=replay(draws),
                           eta=eta, S_noise=s_noise, backend=backend)
    denoise = guided_denoiser(nonlinear_net, weak_net, guidance, interval)
    if solver == "dpmpp_2m":
        expected = dpmpp_2m_run(denoise, noise * t_steps[0], t_steps)
    else:
        expected = euler_ancestral_run(denoise, noise * t_steps[0], t_steps, draws, eta, s_noise)
    return got, expected


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=["plain", "guided", "interval", "custom_sigmas"])
@pytest.mark.parametrize("solver", ["dpmpp_2m", "euler_ancestral"])
def test_new_solvers_match_their_float64_formulas(solver, case, backend):
    got, expected = run_case(solver, case, backend)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    got32, _ = run_case(solver, case, backend, dtype=torch.float32)
    torch.testing.assert_close(got32.double(), expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("eta, s_noise", [(0.0, 1.0), (0.5, 1.0), (1.0, 0.9)])
def test_euler_ancestral_eta_and_s_noise(eta, s_noise):
    got, expected = run_case("euler_ancestral", dict(guidance=2.0), "auto", eta=eta, s_noise=s_noise)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("kind", ["unguided", "autoguidance", "cfg", "interval"])
def test_k_diffusion_faces_equal_fastguide_sample(solver, kind):
    gen = torch.Generator().manual_seed(2)
    net = GaussianDenoiser(std=0.6, class_means=torch.randn(4, 6, generator=gen, dtype=torch.float64))
    labels = torch.eye(4, dtype=torch.float32)[[1, 3]]
    options = {}
    if kind != "unguided":
        options = dict(guidance=2.0, guide_labels=torch.zeros_like(labels)) if kind == "cfg" else \
            dict(guidance=2.0, guide=GaussianDenoiser(std=0.9, class_means=net.class_means * 0.7))
    if kind == "interval":
        options["guidance_interval"] = (0.3, 4.0)
    sigmas = fastguide.reference.edm_sigmas(7, 0.02, 30.0, 7.0)
    noise = torch.randn(2, 2, 3, generator=gen)
    draws = fixed_draws(noise.shape, 8, seed=3)
    expected = fastguide.sample(net, noise, labels=labels, sigmas=sigmas, solver=solver,
                                randn_like=replay(draws), **options)
    model = fastguide.GuidedDenoiser(net, options.pop("guide", None), **options)
    extra = {}
    if solver == "euler_ancestral":
        it = iter(draws)
        extra = dict(noise_sampler=lambda sigma, sigma_next: next(it).float())
    records = []
    actual = K_SAMPLERS[solver](model, noise * sigmas[0].item(), sigmas, extra_args={"class_labels": labels},
                                disable=True, callback=records.append, **extra)
    assert torch.equal(actual, expected)
    assert [r["i"] for r in records] == list(range(7))
    assert all(torch.isfinite(r["denoised"]).all() for r in records)


def test_k_diffusion_callback_gives_dpmpp_2m_the_step_input_and_denoised():
    net = GaussianDenoiser(mean=0.2, std=0.5)
    sigmas = fastguide.reference.edm_sigmas(5, 0.05, 10.0, 7.0)
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64) * sigmas[0]
    records = []
    sample_dpmpp_2m(net, x, sigmas, callback=records.append, disable=True)
    xs = [x] + [None] * 5
    for r in records:
        sigma = r["sigma"].item()
        torch.testing.assert_close(r["denoised"], net(r["x"], torch.full((2,), sigma, dtype=torch.float64)))
    torch.testing.assert_close(records[0]["x"], x)


def test_dpmpp_2m_converges_at_second_order_on_gaussian_data():
    net = GaussianDenoiser(mean=0.3, std=0.5)
    noise = torch.randn(64, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = net.exact_flow(noise * 80.0, 80.0)
    errors = []
    for n in (16, 32, 64, 128):
        x = fastguide.sample(net, noise, num_steps=n, solver="dpmpp_2m", dtype=torch.float64)
        errors.append((x - exact).abs().max().item())
    ratios = [a / b for a, b in zip(errors[:-1], errors[1:])]
    assert all(r > 3.0 for r in ratios), (errors, ratios)  # first order would halve the error: ~2


def test_euler_ancestral_samples_match_gaussian_moments():
    mean, std, n = 0.4, 0.7, 20000
    net = GaussianDenoiser(mean=mean, std=std)
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    # ancestral steps are first order: the std's bias is ~8 % at 64 steps, ~0.3 % at 1024
    x = fastguide.sample(net, noise, num_steps=1024, solver="euler_ancestral")
    assert torch.allclose(x.mean(0), torch.full((2,), mean), atol=5 * std / n ** 0.5)
    assert torch.allclose(x.std(0), torch.full((2,), std), atol=5 * std / (2 * n) ** 0.5 + 0.005 * std)


@pytest.mark.parametrize("solver", SOLVERS)
def test_stats_callback_and_interval_for_every_solver(solver):
    interval = (0.3, 5.0)
    t_steps = edm_schedule(6)
    seen = []
    x, stats = fastguide.sample(nonlinear_net, torch.randn(2, 3), guide=weak_net, guidance=2.0,
                                guidance_interval=interval, num_steps=6, solver=solver, return_stats=True,
                                callback=lambda info: seen.append((info["i"], info["sigma"], info["x"].clone())))
    sigmas = [t for t in t_steps[:-1]]
    evals = sigmas + (t_steps[1:-1] if solver == "heun" else [])
    assert stats["net"] == len(evals) and stats["solver"] == solver
    assert stats["guide"] == sum(interval[0] < s <= interval[1] for s in evals)
    assert [s[0] for s in seen] == list(range(6)) and [s[1] for s in seen] == pytest.approx(sigmas)
    assert torch.equal(seen[-1][2], x)


@pytest.mark.parametrize("solver", ["dpmpp_2m", "euler_ancestral"])
def test_churn_and_eta_are_refused_where_they_do_not_apply(solver):
    with pytest.raises(ValueError, match="S_churn"):
        fastguide.sample(nonlinear_net, torch.randn(2, 3), solver=solver, S_churn=1.0)
    if solver == "dpmpp_2m":
        with pytest.raises(ValueError, match="eta"):
            fastguide.sample(nonlinear_net, torch.randn(2, 3), solver=solver, eta=0.5)
    with pytest.raises(ValueError, match="eta"):
        fastguide.sample(nonlinear_net, torch.randn(2, 3), solver="euler_ancestral", eta=-0.1)


class HostReads(TorchDispatchMode):
    """Counts aten::_local_scalar_dense: every read of a tensor's value to the host (.item(), bool())."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("guide", ["autoguidance", "cfg"])
def test_a_16_step_run_reads_the_device_at_most_twice(solver, guide):
    options = dict(guide=weak_net) if guide == "autoguidance" else \
        dict(labels=torch.ones(2, 1), guide_labels=torch.zeros(2, 1))
    with HostReads() as reads:
        fastguide.sample(nonlinear_net, torch.randn(2, 3), guidance=2.0, guidance_interval=(0.1, 10.0),
                         num_steps=16, solver=solver, **options)
    assert reads.count <= 2


@pytest.mark.parametrize("solver", SOLVERS)
def test_non_finite_predictions_are_named_after_the_run(solver):
    calls = {"n": 0}

    def late_nan(x, sigma, labels):
        calls["n"] += 1
        return weak_net(x, sigma, labels) * (math.nan if calls["n"] == 3 else 1.0)

    with pytest.raises(fastguide.DenoiserOutputError, match=r"step 2 \(\w+ evaluation at sigma=.*\): guide returned non-finite"):
        fastguide.sample(nonlinear_net, torch.randn(2, 3), guide=late_nan, guidance=2.0, num_steps=6,
                         solver="euler" if solver == "heun" else solver)


@pytest.mark.parametrize("stage_solver", ["euler", "heun", "dpmpp_2m", "euler_ancestral"])
def test_one_guided_step_traces_whole_with_fullgraph(stage_solver):
    torch._dynamo.reset()
    net, guide = SigmaLinear(1), SigmaLinear(2)
    denoiser = fastguide.GuidedDenoiser(net, guide, guidance=2.0)
    sigmas = edm_schedule(4)
    run_plan = plan.build(sigmas, stage_solver, denoiser.guided_at)
    ev = run_plan.evaluations[1]
    ops = dispatch.implementation(dispatch.resolve("auto", "cpu"))
    x = torch.randn(3, 5)
    results = []
    for step in (core.guided_step, torch.compile(core.guided_step, fullgraph=True)):
        bufs = core.Buffers.allocate(x.clone(), stage_solver)
        bufs.x_next.copy_(x * 0.5)
        if bufs.deriv is not None:
            bufs.deriv.copy_(x * 0.1)
        if bufs.denoised is not None:
            bufs.denoised.copy_(x * 0.3)
        flags = torch.zeros(1, dtype=torch.int32)
        noise = torch.ones_like(x) if ev.noise_scale is not None else None
        with torch.no_grad():
            step(denoiser.evaluator, ops, ev, bufs, None, 2.0, flags, noise)
        results.append((bufs.x_next.clone(), flags.clone()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-6)
    assert torch.equal(results[1][1], results[0][1])


class FlowGaussian:
    """Exact D = E[x0 | x_t] of data N(mean, std²) under a flow x_t = (1 − t)·x0 + t·ε."""

    def __init__(self, mean=0.3, std=0.5, declare=True):
        self.mean, self.std = mean, std
        if declare:
            self.signal_scale = lambda t: 1.0 - t

    def __call__(self, x, t, labels=None):
        t = t.reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype)
        alpha = 1 - t
        gain = alpha * self.std ** 2 / (alpha ** 2 * self.std ** 2 + t ** 2)
        return self.mean + gain * (x - alpha * self.mean)

    def flow(self, x_start, t):
        """Where the flow ODE carries x at t = 1 (pure noise) to at t."""
        return (1 - t) * self.mean + ((1 - t) ** 2 * self.std ** 2 + t ** 2) ** 0.5 * x_start


def test_dpmpp_2m_on_a_flow_model_uses_its_signal_scale():
    """A flow model (x_t = (1 − t)·x0 + t·ε) declares α(t) = 1 − t; DPM-Solver++(2M) in its log-SNR
    is second order and beats the same solver in EDM's form (α = 1) at every budget."""
    noise = torch.randn(256, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    errors = {}
    for declare in (True, False):
        net = FlowGaussian(declare=declare)
        errors[declare] = []
        for n in (8, 16, 32, 64, 128):
            sigmas = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)
            # every solver's last step is x = D at t_{N-1}: compare with D of the exact ODE state there
            t_last = sigmas[-2].item()
            exact = net(net.flow(noise, t_last), torch.full((256,), t_last, dtype=torch.float64))
            x = fastguide.sample(net, noise, sigmas=sigmas, solver="dpmpp_2m", dtype=torch.float64)
            errors[declare].append((x - exact).abs().max().item())
    flow = errors[True]  # measured: 7.4e-3, 3.3e-2, 1.5e-2, 4.7e-3, 1.4e-3 (EDM's form: 7.8e-2 ... 1.7e-3)
    assert all(a / b > 2.8 for a, b in zip(flow[2:-1], flow[3:])), flow  # second order from 32 steps on
    assert all(f < e for f, e in zip(flow, errors[False])), errors


def test_a_flow_model_refuses_noise_injection_that_assumes_x0_plus_sigma_eps():
    net = FlowGaussian()
    sigmas = torch.linspace(1.0, 0.0, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="signal_scale"):
        fastguide.sample(net, torch.randn(2, 3), sigmas=sigmas, solver="euler_ancestral")
    with pytest.raises(ValueError, match="S_churn"):
        fastguide.sample(net, torch.randn(2, 3), sigmas=sigmas, solver="heun", S_churn=1.0)


def test_dpmpp_2m_coefficients_stay_finite_where_a_log_step_is_zero():
    """Adjacent noise levels whose logs are equal (h = 0, or h_last = 0) give a first-order step."""
    sigma = 1e10
    sigma_next = math.nextafter(sigma, 0.0)
    assert math.log(sigma) == math.log(sigma_next)  # distinct levels, equal logs
    for prev, cur, nxt in ((2e10, sigma, sigma_next), (sigma, sigma_next, 0.5)):
        coefs = fastguide.reference.dpmpp_2m_coefficients(prev, cur, nxt)
        assert all(math.isfinite(c) for c in coefs), (prev, cur, nxt, coefs)


def test_seeds_outside_32_bits_are_refused():
    """torch's generator keeps 32 bits of a seed: 5 and 5 + 2**32 would draw the same noise."""
    for bad in (2 ** 32, -1, 5 + 2 ** 32, 1.5, True):
        with pytest.raises(ValueError, match="seeds"):
            fastguide.seeded_noise([0, bad], (2,))
    assert fastguide.seeded_noise([2 ** 32 - 1], (2,)).shape == (1, 2)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("rule", [None, "cfg_rescale", "apg", "cfg_zero_star"])
def test_same_bits_twice_and_in_a_batch_of_one(solver, rule):
    """Same inputs, same bits: a run repeated, and sample k alone, give sample k's bits exactly
    (per-sample models, per-seed noise; every solver, with and without a guidance rule)."""
    from fastguide import rules
    guidance_rule = {None: None, "cfg_rescale": rules.CFGRescale(), "apg": rules.APG(momentum=0.3),
                     "cfg_zero_star": rules.CFGZeroStar(zero_init_steps=1)}[rule]
    seeds = list(range(7))
    noise = fastguide.seeded_noise(seeds, (2, 3))

    def run(rows):
        randn_like = fastguide.SeededRandn([seeds[i] for i in rows]) if solver == "euler_ancestral" else None
        return fastguide.sample(nonlinear_net, noise[rows], guide=weak_net, guidance=2.5, num_steps=8, solver=solver,
                                guidance_rule=guidance_rule, randn_like=randn_like)
    everything = run(list(range(7)))
    assert torch.equal(everything, run(list(range(7))))
    assert torch.equal(everything[3:4], run([3]))


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("kind, strategy", [("autoguidance", "stacked"), ("autoguidance", "tune"),
                                            ("cfg", "cfg-batch"), ("cfg", "separate"), ("cfg", "tune")])
def test_every_strategy_runs_every_solver(solver, kind, strategy):
    """Each evaluation strategy gives the two-calls result (to rounding) with every solver, interval included."""
    from tests.test_batching import NUM_CLASSES, MLPDenoiser
    net = MLPDenoiser(seed=1).eval()
    labels = torch.arange(3) % NUM_CLASSES
    options = dict(guide=MLPDenoiser(seed=2).eval()) if kind == "autoguidance" else \
        dict(guide_labels=torch.full((3,), NUM_CLASSES - 1))
    noise = torch.randn(3, 6, generator=torch.Generator().manual_seed(8))

    def run(strategy):
        torch.manual_seed(3)  # ancestral noise
        return fastguide.sample(net, noise, labels=labels, guidance=2.0, guidance_interval=(0.3, 20.0), num_steps=6,
                                solver=solver, strategy=strategy, return_stats=True, **options)
    expected, expected_stats = run("separate")
    actual, stats = run(strategy)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert (stats["net"], stats["guide"]) == (expected_stats["net"], expected_stats["guide"])


def test_k_diffusion_faces_honour_a_flow_models_signal_scale():
    """The k-diffusion-signature samplers run the same core: a plain model that declares signal_scale gets
    the flow DPM-Solver++(2M) (equal to fastguide.sample) and is refused noise injection."""
    net = FlowGaussian()
    sigmas = torch.linspace(1.0, 0.0, 9, dtype=torch.float64)
    noise = torch.randn(4, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected = fastguide.sample(net, noise, sigmas=sigmas, solver="dpmpp_2m", dtype=torch.float64)
    assert torch.equal(sample_dpmpp_2m(net, noise, sigmas, disable=True), expected)
    edm_form = sample_dpmpp_2m(FlowGaussian(declare=False), noise, sigmas, disable=True)
    assert (edm_form - expected).abs().max() > 1e-3  # the parametrization mattered
    with pytest.raises(ValueError, match="signal_scale"):
        sample_euler_ancestral(net, noise, sigmas, disable=True)

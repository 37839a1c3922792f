"""Guidance rules (fastguide.rules) against diffusers' guiders, whole runs against the plain
diffusers loop, every fused backend against the float64 reference, per-sample weights, batch
invariance and bad input."""
import math

import pytest
import torch

import fastguide
from fastguide import dispatch, reference, rules
from fastguide.guidance import GuidedDenoiser
from fastguide._threads import torch_threads

diffusers = pytest.importorskip("diffusers")
from diffusers.guiders import (AdaptiveProjectedGuidance, ClassifierFreeGuidance,  # noqa: E402
                               ClassifierFreeZeroStarGuidance)
from fastguide.adapters import DiffusersDenoiser  # noqa: E402

SHAPES = [(1, 3, 5, 7), (3, 4, 8, 8), (2, 3, 2, 5, 7), (5, 17)]
FUSED = [name for name, info in dispatch.backends("rules").items() if info["available"]]
RULE_BACKENDS = [name for name in ("reference", "cpp", "triton") if name in FUSED]


def relative_error(actual, expected):
    scale = expected.double().abs().max().clamp_min(1e-30)
    return ((actual.double() - expected.double()).abs().max() / scale).item()


def make_rule(kind, **overrides):
    params = dict(
        cfg_rescale=dict(phi=0.7),
        apg=dict(eta=0.3, norm_threshold=4.0, momentum=-0.5),
        cfg_zero_star=dict(zero_init_steps=1),
        lerp={},
    )[kind]
    params.update(overrides)
    return rules.RULES[kind](**params)


def make_guider(rule, w):
    """The diffusers guider with the rule's semantics (use_original_formulation=False)."""
    if isinstance(rule, rules.CFGRescale):
        return ClassifierFreeGuidance(guidance_scale=w, guidance_rescale=rule.phi)
    if isinstance(rule, rules.APG):
        return AdaptiveProjectedGuidance(guidance_scale=w, adaptive_projected_guidance_momentum=rule.momentum,
                                         adaptive_projected_guidance_rescale=rule.norm_threshold, eta=rule.eta)
    if isinstance(rule, rules.CFGZeroStar):
        return ClassifierFreeZeroStarGuidance(guidance_scale=w, zero_init_steps=rule.zero_init_steps)
    return ClassifierFreeGuidance(guidance_scale=w)


def guider_steps(guider, preds, num_steps):
    """The guider's forward on a sequence of (cond, uncond), one per sampler step."""
    outs = []
    for step, (cond, uncond) in enumerate(preds):
        guider.set_state(step=step, num_inference_steps=num_steps, timestep=torch.tensor(999 - step))
        guider.prepare_inputs({})
        outs.append(guider.forward(cond, uncond).pred)
    return outs


def fused_steps(rule, preds, w, backend):
    """The fused path (pass 1 + pass 2 of fastguide.rules) on predictions in "x0" space, where the
    rule acts on the predictions themselves; one RuleRun for the sequence (APG's momentum)."""
    run = rules.RuleRun(rule, w, rules.rule_ops(backend, "cpu"), torch.device("cpu"))
    return [run.denoise(torch.zeros_like(cond), cond, uncond, 1.0, step) for step, (cond, uncond) in enumerate(preds)]


def reference_steps(rule, preds, w):
    momentum, outs = None, []
    for step, (cond, uncond) in enumerate(preds):
        out, momentum = rules.reference_guide(rule, torch.zeros_like(cond), cond, uncond, w, 1.0, step, momentum)
        outs.append(out)
    return outs


def random_predictions(shape, dtype, generator, num_steps=3):
    preds = []
    for _ in range(num_steps):
        cond = torch.randn(shape, generator=generator, dtype=torch.float64) + 0.3
        uncond = 0.8 * cond + 0.5 * torch.randn(shape, generator=generator, dtype=torch.float64)
        preds.append((cond.to(dtype), uncond.to(dtype)))
    return preds


# ---------------------------------------------------------------------------------------------
# Each rule against diffusers' guider


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["cfg_rescale", "apg", "cfg_zero_star", "lerp"])
def test_rule_equals_diffusers_guider_float32(kind, shape, generator):
    rule = make_rule(kind, **({"space": "x0"} if kind != "lerp" else {}))
    w = 4.5
    preds = random_predictions(shape, torch.float32, generator)
    expected = guider_steps(make_guider(rule, w), preds, len(preds))
    for outs in [reference_steps(rule, preds, w)] + [fused_steps(rule, preds, w, b) for b in RULE_BACKENDS]:
        for actual, wanted in zip(outs, expected):
            assert actual.dtype == torch.float32
            assert relative_error(actual, wanted) < 1e-5


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("params", [dict(), dict(momentum=0.6, norm_threshold=2.0, eta=0.0),
                                    dict(momentum=-0.5, norm_threshold=0.5, eta=1.5)])
def test_apg_equals_diffusers_float64(shape, params, generator):
    rule = rules.APG(space="x0", **params)
    w = 7.0
    preds = random_predictions(shape, torch.float64, generator, num_steps=4)
    expected = guider_steps(make_guider(rule, w), preds, len(preds))
    for outs in [reference_steps(rule, preds, w)] + [fused_steps(rule, preds, w, b) for b in RULE_BACKENDS]:
        for actual, wanted in zip(outs, expected):
            assert relative_error(actual, wanted) < 1e-10


def test_zero_star_zero_init_and_weight_one(generator):
    rule = rules.CFGZeroStar(zero_init_steps=2, space="x0")
    preds = random_predictions((2, 3, 4, 4), torch.float32, generator, num_steps=3)
    for w in (1.0, 3.0):
        expected = guider_steps(make_guider(rule, w), preds, 3)
        assert torch.equal(expected[0], torch.zeros_like(expected[0]))
        for backend in RULE_BACKENDS:
            outs = fused_steps(rule, preds, w, backend)
            assert torch.equal(outs[0], torch.zeros_like(outs[0])) and torch.equal(outs[1], outs[0])
            assert relative_error(outs[2], expected[2]) < 1e-5


@pytest.mark.parametrize("space", rules.SPACES)
def test_spaces_convert_both_ways(space, generator):
    x = torch.randn(2, 3, 4, 4, generator=generator, dtype=torch.float64) * 3
    d = torch.randn(2, 3, 4, 4, generator=generator, dtype=torch.float64)
    sigma = 2.7
    converted = rules.to_space(space, x, d, sigma)
    a_x, a_d = rules.space_coefficients(space, sigma)
    assert torch.allclose(converted, a_x * x + a_d * d, rtol=1e-13, atol=1e-13)
    assert torch.allclose(rules.from_space(space, x, converted, sigma), d, rtol=1e-12, atol=1e-12)
    if space == "v":  # the v of a VP model with x = x0 + σ·ε: v = α·ε − s·x0
        eps = (x - d) / sigma
        alpha, s = 1 / math.sqrt(1 + sigma ** 2), sigma / math.sqrt(1 + sigma ** 2)
        assert torch.allclose(converted, alpha * eps - s * d, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("backend", RULE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["cfg_rescale", "apg", "cfg_zero_star"])
@pytest.mark.parametrize("space", rules.SPACES)
def test_fused_rule_equals_float64_reference(backend, dtype, kind, space, generator):
    """One guided D through the fused passes against the float64 reference, per-sample weights."""
    rule = make_rule(kind, space=space)
    shape = (3, 3, 5, 7)
    x = (torch.randn(shape, generator=generator, dtype=torch.float64) * 2).to(dtype)
    preds = random_predictions(shape, dtype, generator, num_steps=3)
    w = torch.tensor([3.0, 1.0, 6.5], dtype=torch.float64)
    sigma = 1.7
    run = rules.RuleRun(rule, w, rules.rule_ops(backend, "cpu"), torch.device("cpu"))
    momentum = None
    tolerance = {torch.float32: 2e-5, torch.float64: 1e-11, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    for step, (cond, uncond) in enumerate(preds):
        actual = run.denoise(x, cond, uncond, sigma, step)
        expected, momentum = rules.reference_guide(rule, x.double(), cond.double(), uncond.double(), w, sigma, step,
                                                   momentum)
        assert actual.dtype == dtype
        assert relative_error(actual, expected) < tolerance, (step, relative_error(actual, expected))
        if step >= rule.zero_init_steps:
            assert torch.equal(actual[1], cond[1])  # weight 1: D1, whatever the rule


# ---------------------------------------------------------------------------------------------
# Whole runs against the plain diffusers loop

NUM_CLASSES = 5
NULL_CLASS = NUM_CLASSES - 1


def tiny_unet(seed=0, width=(8, 16)):
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=width,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4, num_class_embeds=NUM_CLASSES).eval()


def euler_scheduler(prediction_type, num_steps):
    scheduler = diffusers.EulerDiscreteScheduler(num_train_timesteps=1000, prediction_type=prediction_type,
                                                 use_karras_sigmas=True)
    scheduler.set_timesteps(num_steps)
    return scheduler


def diffusers_guided_loop(unet, guide_unet, scheduler, guider, noise, labels, null_labels):
    """The plain diffusers loop: the guider on the model outputs (ε or v), EulerDiscreteScheduler's step."""
    latents = noise * scheduler.init_noise_sigma
    num_steps = len(scheduler.timesteps)
    for i, t in enumerate(scheduler.timesteps):
        guider.set_state(step=i, num_inference_steps=num_steps, timestep=t)
        guider.prepare_inputs({})
        model_input = scheduler.scale_model_input(latents, t)
        cond = unet(model_input, t, class_labels=labels).sample
        if guide_unet is None:
            uncond = unet(model_input, t, class_labels=null_labels).sample
        else:
            uncond = guide_unet(model_input, t, class_labels=labels).sample
        latents = scheduler.step(guider.forward(cond, uncond).pred, t, latents).prev_sample
    return latents


@pytest.mark.parametrize("kind", ["cfg_rescale", "apg", "cfg_zero_star"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("autoguidance", [False, True])
def test_sample_equals_diffusers_guider_loop(kind, prediction_type, autoguidance):
    space = "eps" if prediction_type == "epsilon" else "v"
    rule = make_rule(kind, space=space, **({"zero_init_steps": 2} if kind == "cfg_zero_star" else {}))
    unet = tiny_unet()
    guide_unet = tiny_unet(seed=3, width=(4, 8)) if autoguidance else None
    generator = torch.Generator().manual_seed(len(kind) + autoguidance)
    batch, w, num_steps = 3, 3.5, 6
    noise = torch.randn(batch, 3, 8, 8, generator=generator)
    labels = torch.randint(0, NULL_CLASS, (batch,), generator=generator)
    null_labels = torch.full((batch,), NULL_CLASS)
    with torch.no_grad():
        expected = diffusers_guided_loop(unet, guide_unet, euler_scheduler(prediction_type, num_steps),
                                         make_guider(rule, w), noise, labels, null_labels)
        scheduler = euler_scheduler(prediction_type, num_steps)
        net = DiffusersDenoiser(unet, scheduler)
        guide = DiffusersDenoiser(guide_unet, scheduler) if autoguidance else None
        actual = fastguide.sample(net, noise, labels=labels, guide=guide,
                                  guide_labels=None if autoguidance else null_labels, guidance=w,
                                  sigmas=scheduler.sigmas, solver="euler", guidance_rule=rule)
    assert relative_error(actual, expected) < 1e-5


# ---------------------------------------------------------------------------------------------
# Whole runs of every solver against a plain loop over the float64 reference


class Net:
    """A smooth toy denoiser with labels: D(x; σ, c) = x/(1+σ²) + c·u(x) for a fixed field u."""

    def __init__(self, shape, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.u = torch.randn(shape, generator=g, dtype=torch.float64)

    def __call__(self, x, sigma, labels):
        s = sigma.reshape(-1, *[1] * (x.ndim - 1))
        c = labels.reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype)
        return x / (1 + s * s) + (0.3 * c * torch.tanh(x + self.u.to(x.dtype))) / (1 + s)


def plain_loop(net, noise, labels, null, w, rule, sigmas, solver, noises=None):
    """The sampler written out with the reference rule and the reference epilogues (float64)."""
    x = noise.double() * sigmas[0]
    momentum, prev, deriv = None, None, None
    num = len(sigmas) - 1
    for i in range(num):
        t, t_next = sigmas[i], sigmas[i + 1]

        def guided(x_in, sigma, step):
            nonlocal momentum
            s = torch.full((x.shape[0],), sigma, dtype=x.dtype)
            d1 = net(x_in, s, labels)
            d0 = None if (step < rule.zero_init_steps or rules.all_one(w)) else net(x_in, s, null)
            d, momentum = rules.reference_guide(rule, x_in, d1, d0, w, sigma, step, momentum)
            return d
        if solver == "dpmpp_2m":
            d = guided(x, t, i)
            coefs = reference.dpmpp_2m_coefficients(sigmas[i - 1] if i > 0 else None, t, t_next)
            x, prev = reference.guided_dpmpp_2m(x, d, None, prev, 1.0, *coefs)
            continue
        if solver == "euler_ancestral":
            d = guided(x, t, i)
            down, up = reference.ancestral_step(t, t_next)
            x, _ = reference.guided_euler(x, d, None, 1.0, t, down, noise=noises[i] if t_next > 0 else None,
                                          noise_scale=up)
            continue
        d = guided(x, t, i)
        x_next, deriv = reference.guided_euler(x, d, None, 1.0, t, t_next)
        if solver == "heun" and t_next > 0:
            d2 = guided(x_next, t_next, i)
            x_next = reference.guided_heun(x, deriv, d2, None, 1.0, t, t_next)
        x = x_next
    return x


@pytest.mark.parametrize("backend", RULE_BACKENDS)
@pytest.mark.parametrize("solver", ["euler", "heun", "dpmpp_2m", "euler_ancestral"])
@pytest.mark.parametrize("kind", ["cfg_rescale", "apg", "cfg_zero_star", "lerp"])
def test_sample_every_solver_equals_plain_reference_loop(backend, solver, kind, generator):
    rule = make_rule(kind, **({"space": "v"} if kind == "apg" else {}))
    shape = (3, 2, 5, 3)
    net = Net(shape[1:])
    noise = torch.randn(shape, generator=generator)
    labels, null = torch.tensor([1, 2, 3]), torch.zeros(3, dtype=torch.long)
    w = torch.tensor([2.5, 1.0, 4.0])
    sigmas = reference.edm_sigmas(5, 0.05, 20.0, 7.0)
    noises = [torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(5)]
    draws = iter(noises)
    actual = fastguide.sample(net, noise.double(), labels=labels, guide_labels=null, guidance=w, sigmas=sigmas,
                              solver=solver, guidance_rule=rule, backend=backend, dtype=torch.float64,
                              randn_like=lambda t: next(draws).to(t.dtype))
    expected = plain_loop(net, noise, labels, null, w.double(), rule, sigmas.tolist(), solver, noises)
    assert relative_error(actual, expected) < 1e-10


# ---------------------------------------------------------------------------------------------
# Per-sample weights, batch invariance, guide skipping, the other faces


@pytest.mark.parametrize("kind", ["lerp", "cfg_rescale", "apg", "cfg_zero_star"])
@pytest.mark.parametrize("solver", ["heun", "dpmpp_2m"])
def test_per_sample_weights_equal_separate_runs(kind, solver, generator):
    rule = make_rule(kind)
    shape = (4, 2, 6, 5)
    net = Net(shape[1:], seed=2)
    noise = torch.randn(shape, generator=generator)
    labels, null = torch.tensor([1, 2, 3, 1]), torch.zeros(4, dtype=torch.long)
    weights = [2.0, 1.0, 5.5, 0.5]
    options = dict(num_steps=6, solver=solver, guidance_rule=rule)
    together = fastguide.sample(net, noise, labels=labels, guide_labels=null, guidance=torch.tensor(weights),
                                **options)
    for b, w in enumerate(weights):
        alone = fastguide.sample(net, noise[b:b + 1], labels=labels[b:b + 1], guide_labels=null[b:b + 1],
                                 guidance=w, **options)
        if kind == "lerp" or w == 1:
            # A scalar Lerp, and a lone sample of weight 1 (its guide skipped), run today's kernels:
            # the same D, the solver's update rounded differently.
            assert relative_error(together[b:b + 1], alone) < 1e-5
        else:
            assert torch.equal(together[b:b + 1], alone), (b, relative_error(together[b:b + 1], alone))


@pytest.mark.skipif("cpp" not in FUSED, reason="the C++ rule kernels are not built")
@pytest.mark.parametrize("kind", ["cfg_rescale", "apg", "cfg_zero_star", "lerp"])
def test_batch_invariance_cpp_threads(kind, generator):
    rule = make_rule(kind, space="eps") if kind != "lerp" else rules.Lerp()
    shape = (7, 3, 67, 129)  # per sample 25,929 elements: several blocks and a partial one
    net = Net(shape[1:], seed=4)
    noise = torch.randn(shape, generator=generator)
    labels, null = torch.arange(7) % 3 + 1, torch.zeros(7, dtype=torch.long)
    weights = torch.linspace(1.5, 6.0, 7)
    options = dict(num_steps=4, solver="heun", guidance_rule=rule, backend="cpp")
    results = []
    for threads in (1, 2):
        with torch_threads(threads):
            batch = fastguide.sample(net, noise, labels=labels, guide_labels=null, guidance=weights, **options)
            for k in (0, 3, 6):
                alone = fastguide.sample(net, noise[k:k + 1], labels=labels[k:k + 1], guide_labels=null[k:k + 1],
                                         guidance=weights[k:k + 1], **options)
                assert torch.equal(batch[k:k + 1], alone), (threads, k)
            results.append(batch)
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("backend", [b for b in ("cpp", "triton") if b in FUSED])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_moments_are_batch_and_thread_invariant(backend, dtype, generator):
    fused = rules.rule_ops(backend, "cpu")
    shape = (7, 5, 33, 65)  # 10,725 elements per sample: 10 whole blocks and a partial one
    x, d1, d0, m = (torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype) for _ in range(4))
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    coefs = torch.randn(7, 2, 4, generator=generator, dtype=torch.float64).to(cdt)
    with torch_threads(2):
        together = fused.rule_moments(x, d1, d0, m, coefs)
    for k in range(7):
        with torch_threads(1):
            alone = fused.rule_moments(x[k:k + 1], d1[k:k + 1], d0[k:k + 1], m[k:k + 1], coefs[k:k + 1])
        assert torch.equal(together[k:k + 1], alone)
    expected = rules.rule_ops("reference", "cpu").rule_moments(x, d1, d0, m, coefs)
    scale = expected.abs().amax(dim=0)  # the sums of squares: sums of up to 10^4 terms of size ~1
    assert ((together - expected).abs() / scale).max() < (1e-12 if dtype == torch.float64 else 1e-5)


def test_weight_one_skips_the_guide_for_every_rule(generator):
    shape = (2, 2, 4, 4)
    net = Net(shape[1:])
    noise = torch.randn(shape, generator=generator)
    labels, null = torch.tensor([1, 2]), torch.zeros(2, dtype=torch.long)
    plain = fastguide.sample(net, noise, labels=labels, num_steps=4, solver="heun")
    for kind in ("cfg_rescale", "apg", "cfg_zero_star"):
        for w in (1.0, torch.ones(2)):
            x, stats = fastguide.sample(net, noise, labels=labels, guide_labels=null, guidance=w, num_steps=4,
                                        solver="heun", guidance_rule=make_rule(kind, zero_init_steps=0)
                                        if kind == "cfg_zero_star" else make_rule(kind), return_stats=True)
            assert stats["guide"] == 0
            assert torch.equal(x, plain)


def test_zero_init_skips_the_guide(generator):
    shape = (2, 2, 4, 4)
    net = Net(shape[1:])
    noise = torch.randn(shape, generator=generator)
    labels, null = torch.tensor([1, 2]), torch.zeros(2, dtype=torch.long)
    _, stats = fastguide.sample(net, noise, labels=labels, guide_labels=null, guidance=3.0, num_steps=5,
                                solver="heun", guidance_rule=rules.CFGZeroStar(zero_init_steps=2), return_stats=True)
    assert stats["net"] == 9 and stats["guide"] == 9 - 4


def test_apg_momentum_lives_for_one_run(generator):
    shape = (2, 2, 4, 4)
    net = Net(shape[1:])
    noise = torch.randn(shape, generator=generator)
    labels, null = torch.tensor([1, 2]), torch.zeros(2, dtype=torch.long)
    options = dict(labels=labels, guide_labels=null, guidance=3.0, num_steps=5, solver="euler",
                   guidance_rule=rules.APG(momentum=0.7))
    first = fastguide.sample(net, noise, **options)
    assert torch.equal(fastguide.sample(net, noise, **options), first)
    denoiser = GuidedDenoiser(net, guide_labels=null, guidance=3.0, guidance_rule=rules.APG(momentum=0.7))
    first = fastguide.k_diffusion.sample_euler(denoiser, noise * 20, reference.edm_sigmas(5, 0.002, 20.0, 7.0),
                                               extra_args={"labels": labels}, disable=True)
    again = fastguide.k_diffusion.sample_euler(denoiser, noise * 20, reference.edm_sigmas(5, 0.002, 20.0, 7.0),
                                               extra_args={"labels": labels}, disable=True)
    assert torch.equal(first, again)


@pytest.mark.parametrize("kind", ["cfg_rescale", "apg", "cfg_zero_star"])
def test_k_diffusion_and_direct_calls_equal_sample(kind, generator):
    import fastguide.k_diffusion as kd
    rule = make_rule(kind)
    shape = (3, 2, 5, 4)
    net = Net(shape[1:], seed=5)
    noise = torch.randn(shape, generator=generator)
    labels, null = torch.tensor([1, 2, 3]), torch.zeros(3, dtype=torch.long)
    w = torch.tensor([3.0, 2.0, 1.0])
    # σ_min well above 0.002: the toy net's x − D stays O(1), so its ε = (x − D)/σ grows as 1/σ and
    # float32 rounding with it (the same in every path).
    sigmas = reference.edm_sigmas(6, 0.05, 80.0, 7.0)
    expected = fastguide.sample(net, noise, labels=labels, guide_labels=null, guidance=w, sigmas=sigmas,
                                solver="euler", guidance_rule=rule)
    denoiser = GuidedDenoiser(net, guide_labels=null, guidance=w, guidance_rule=rule)
    assert torch.equal(kd.sample_euler(denoiser, noise * sigmas[0], sigmas, extra_args={"labels": labels},
                                       disable=True), expected)
    # An outside sampler calling the GuidedDenoiser: each call one step, the run restarting at σ_max.
    for _ in range(2):
        x = noise * sigmas[0]
        for i in range(len(sigmas) - 1):
            d = denoiser(x, sigmas[i] * torch.ones(3), labels=labels)
            x = x + (sigmas[i + 1] - sigmas[i]) * (x - d) / sigmas[i]
        assert relative_error(x, expected) < 1e-5


# ---------------------------------------------------------------------------------------------
# Bad input, refused before any work


def test_bad_rule_arguments_are_refused():
    with pytest.raises(ValueError, match="phi"):
        rules.CFGRescale(phi=-0.1)
    with pytest.raises(ValueError, match="norm_threshold"):
        rules.APG(norm_threshold=-1.0)
    for momentum in (1.0, -1.0, 2.5):
        with pytest.raises(ValueError, match="momentum"):
            rules.APG(momentum=momentum)
    with pytest.raises(ValueError, match="space"):
        rules.CFGRescale(space="epsilon")
    with pytest.raises(ValueError, match="space"):
        rules.APG(space="x")
    with pytest.raises(ValueError, match="zero_init_steps"):
        rules.CFGZeroStar(zero_init_steps=-1)
    with pytest.raises(ValueError, match="eta"):
        rules.APG(eta=float("nan"))


def test_bad_sample_arguments_are_refused_before_any_model_call(generator):
    calls = []

    def net(x, sigma, labels):
        calls.append(1)
        return x

    noise = torch.randn(3, 2, 4, 4, generator=generator)
    labels, null = torch.tensor([1, 2, 3]), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="guidance_rule"):
        fastguide.sample(net, noise, labels=labels, guide_labels=null, guidance=2.0, guidance_rule="rescale")
    with pytest.raises(ValueError, match="guidance_rule"):
        fastguide.sample(net, noise, labels=labels, guide_labels=null, guidance=2.0, guidance_rule=object())
    with pytest.raises(ValueError, match="guidance"):
        fastguide.sample(net, noise, labels=labels, guide_labels=null, guidance=torch.tensor([2.0, 3.0]))
    with pytest.raises(ValueError, match="guidance"):
        fastguide.sample(net, noise, labels=labels, guide_labels=null, guidance=torch.tensor([2.0, float("nan"), 1.0]))
    with pytest.raises(ValueError, match="guidance"):
        fastguide.sample(net, noise, labels=labels, guide_labels=null, guidance=torch.tensor([2.0, float("inf"), 1.0]),
                         guidance_rule=rules.APG())
    with pytest.raises(ValueError, match="guidance"):
        fastguide.sample(net, noise, labels=labels, guide_labels=null, guidance=torch.ones(3, 1))
    with pytest.raises(ValueError, match="guidance"):
        GuidedDenoiser(net, guide_labels=null, guidance=torch.tensor([2.0, 3.0]))(noise, 1.0, labels)
    with pytest.raises(ValueError, match="guidance_rule"):
        GuidedDenoiser(net, guide_labels=null, guidance=2.0, guidance_rule="nope")
    assert calls == []


def test_rule_names_resolve_to_defaults():
    assert rules.resolve(None) == rules.Lerp()
    assert rules.resolve("apg") == rules.APG()
    assert rules.resolve("cfg_rescale") == rules.CFGRescale(phi=0.7, space="eps")
    assert rules.resolve("cfg_zero_star") == rules.CFGZeroStar()


def test_non_finite_guide_is_named_on_the_rule_path(generator):
    shape = (2, 2, 4, 4)
    net = Net(shape[1:])

    def guide(x, sigma, labels):
        d = net(x, sigma, labels)
        return d if sigma[0] > 1 else d * float("nan")
    noise = torch.randn(shape, generator=generator)
    labels = torch.tensor([1, 2])
    for backend in RULE_BACKENDS:
        with pytest.raises(fastguide.DenoiserOutputError, match="guide returned non-finite"):
            fastguide.sample(net, noise, labels=labels, guide=guide, guidance=2.0, num_steps=6, solver="euler",
                             guidance_rule=rules.CFGRescale(), backend=backend)


def test_callback_denoised_is_the_rules_d(generator):
    shape = (2, 2, 4, 4)
    net = Net(shape[1:])
    noise = torch.randn(shape, generator=generator, dtype=torch.float64)
    labels, null = torch.tensor([1, 2]), torch.zeros(2, dtype=torch.long)
    rule = rules.APG(momentum=0.5, norm_threshold=3.0)
    seen = []
    fastguide.sample(net, noise, labels=labels, guide_labels=null, guidance=3.0, num_steps=4, solver="heun",
                     guidance_rule=rule, dtype=torch.float64,
                     callback=lambda info: seen.append((info["x_hat"].clone(), info["sigma_hat"],
                                                        info["denoised"].clone())))
    x, sigma, denoised = seen[0]  # the first step: APG's momentum starts from nothing
    s = torch.full((2,), sigma, dtype=torch.float64)
    expected, _ = rules.reference_guide(rule, x, net(x, s, labels), net(x, s, null), 3.0, sigma, 0, None)
    assert len(seen) == 4
    assert relative_error(denoised, expected) < 1e-9


def test_scalar_lerp_keeps_todays_path(generator):
    shape = (2, 2, 4, 4)
    net = Net(shape[1:])
    noise = torch.randn(shape, generator=generator)
    labels, null = torch.tensor([1, 2]), torch.zeros(2, dtype=torch.long)
    for solver in ("heun", "dpmpp_2m"):
        plain = fastguide.sample(net, noise, labels=labels, guide_labels=null, guidance=2.5, num_steps=4, solver=solver)
        for rule in (None, rules.Lerp(), "lerp"):
            assert torch.equal(fastguide.sample(net, noise, labels=labels, guide_labels=null, guidance=2.5,
                                                num_steps=4, solver=solver, guidance_rule=rule), plain)


@pytest.mark.skipif("cpp" not in FUSED, reason="the C++ rule kernels are not built")
def test_rule_step_traces_whole_with_fullgraph():
    """The core's guided step with a rule (APG with momentum: state written each call) under
    torch.compile(fullgraph=True), two calls, the same bits as eager."""
    from fastguide import core, plan

    class Linear(torch.nn.Module):
        def __init__(self, seed):
            super().__init__()
            torch.manual_seed(seed)
            self.layer = torch.nn.Linear(5, 5)

        def forward(self, x, sigma, labels):
            return self.layer(x) / (1 + sigma[:, None])

    torch._dynamo.reset()
    rule = rules.APG(momentum=0.5, norm_threshold=2.0, eta=0.5)
    denoiser = GuidedDenoiser(Linear(1), Linear(2), guidance=2.0, guidance_rule=rule)
    ev = plan.build(reference.edm_sigmas(4).tolist(), "heun", denoiser.guided_at).evaluations[1]
    solver_ops = dispatch.implementation(dispatch.resolve("auto", "cpu"))
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    results = []
    for step in (core.guided_step, torch.compile(core.guided_step, fullgraph=True)):
        run = rules.RuleRun(rule, 2.0, rules.rule_ops("cpp", "cpu"), x.device)
        bufs = core.Buffers.allocate(x.clone(), "heun")
        bufs.x_next.copy_(x * 0.5)
        bufs.deriv.copy_(x * 0.1)
        flags = torch.zeros(1, dtype=torch.int32)
        with torch.no_grad():
            for _ in range(2):
                step(denoiser.evaluator, solver_ops, ev, bufs, None, 2.0, flags, None, run)
        results.append((bufs.x_next.clone(), run.momentum.clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("backend", RULE_BACKENDS)
def test_channels_last_and_non_contiguous_predictions(backend, generator):
    shape = (2, 3, 5, 4)
    net = Net(shape[1:], seed=6)

    def strided(x, sigma, labels):  # a prediction that is a view with gaps (like a learned-variance slice)
        return torch.cat([net(x, sigma, labels), x], dim=1)[:, :3]
    noise = torch.randn(shape, generator=generator)
    labels, null = torch.tensor([1, 2]), torch.zeros(2, dtype=torch.long)
    options = dict(labels=labels, guide_labels=null, guidance=torch.tensor([3.0, 4.0]), num_steps=4, solver="heun",
                   guidance_rule=rules.APG(momentum=0.3), backend=backend)
    expected = fastguide.sample(net, noise, **options)
    actual = fastguide.sample(strided, noise.to(memory_format=torch.channels_last), **options)
    assert relative_error(actual, expected) < 1e-6


@pytest.mark.parametrize("offset", [3.0, 10.0])
def test_rescale_keeps_accuracy_with_a_large_mean(offset, generator):
    """The standard deviations come from raw sums (Σe, Σe²); with a mean 10 × the std the float32
    result still matches diffusers' float64 guider within 1e-5 (the error grows as (mean/std)²)."""
    shape = (2, 4, 32, 32)
    cond = torch.randn(shape, generator=generator, dtype=torch.float64) + offset
    uncond = 0.8 * cond + 0.5 * torch.randn(shape, generator=generator, dtype=torch.float64)
    rule = rules.CFGRescale(phi=0.7, space="x0")
    expected = guider_steps(make_guider(rule, 4.5), [(cond, uncond)], 1)[0]
    for backend in RULE_BACKENDS:
        actual = fused_steps(rule, [(cond.float(), uncond.float())], 4.5, backend)[0]
        assert relative_error(actual, expected) < 1e-5


@pytest.mark.parametrize("backend", RULE_BACKENDS)
def test_overflow_from_finite_predictions_is_refused(backend, generator):
    shape = (2, 2, 4, 4)
    net = Net(shape[1:])
    noise = torch.randn(shape, generator=generator)
    labels, null = torch.tensor([1, 2]), torch.zeros(2, dtype=torch.long)
    # float16 predictions, a weight of 1e8 on the rule path: D overflows float16 on the first step.
    with pytest.raises(FloatingPointError, match=r"step 0: x became non-finite .* overflow"):
        fastguide.sample(net, noise, labels=labels, guide_labels=null, guidance=torch.tensor([3.0, 1e8]),
                         num_steps=4, solver="euler", guidance_rule=rules.Lerp(), backend=backend,
                         dtype=torch.float16)

"""FlowMatchDenoiser and flow_sigmas against diffusers' own flow-matching loops (tiny random SD3 and Flux
transformers, FlowMatchEulerDiscreteScheduler): CFG on the velocity, scheduler.step, 2B batch."""
import ast
import importlib.util
import types

import numpy as np
import pytest
import torch

import fastguide
from fastguide.adapters import (FlowMatchDenoiser, flow_shift_mu, flow_sigmas, latent_image_ids, pack_latents,
                                unpack_latents)

diffusers = pytest.importorskip("diffusers")


def flux_pipeline_functions():
    """calculate_shift and FluxPipeline's packing helpers, taken from diffusers' pipeline_flux.py itself.

    Importing the pipeline module needs transformers (its text encoders), which fastguide does not
    depend on; these functions use torch only, so they are compiled from the file's source instead."""
    path = importlib.util.find_spec("diffusers.pipelines.flux.pipeline_flux").origin
    tree = ast.parse(open(path).read())
    wanted = {"calculate_shift", "_pack_latents", "_unpack_latents", "_prepare_latent_image_ids"}
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name in wanted:
            node.decorator_list = []
            namespace = {"torch": torch}
            exec(compile(ast.Module([node], type_ignores=[]), path, "exec"), namespace)
            found[node.name] = namespace[node.name]
    assert found.keys() == wanted, f"diffusers' pipeline_flux.py changed: found {sorted(found)}"
    return types.SimpleNamespace(**found)


FLUX = flux_pipeline_functions()
calculate_shift = FLUX.calculate_shift

TEXT_LEN, TEXT_DIM, POOLED_DIM = 5, 16, 8


def tiny_sd3(num_layers=2, seed=0):
    torch.manual_seed(seed)
    return diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=num_layers, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=TEXT_DIM, caption_projection_dim=16,
        pooled_projection_dim=POOLED_DIM, pos_embed_max_size=16).eval()


def tiny_flux(seed=0):
    torch.manual_seed(seed)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM, guidance_embeds=True,
        axes_dims_rope=(2, 2, 4)).eval()


def prompt(batch, seed):
    """Random stand-ins for (prompt embeddings, pooled embeddings)."""
    generator = torch.Generator().manual_seed(seed)
    return {"encoder_hidden_states": torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=generator),
            "pooled_projections": torch.randn(batch, POOLED_DIM, generator=generator)}


def relative_error(actual, expected):
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def sd3_loop(model, scheduler, noise, cond, uncond, guidance, combine=None):
    """diffusers' SD3 pipeline loop: [uncond; cond] in one 2B batch, CFG on the velocity, scheduler.step."""
    latents = noise
    text = torch.cat([uncond["encoder_hidden_states"], cond["encoder_hidden_states"]])
    pooled = torch.cat([uncond["pooled_projections"], cond["pooled_projections"]])
    for i, t in enumerate(scheduler.timesteps):
        v = model(hidden_states=torch.cat([latents] * 2), timestep=t.expand(2 * latents.shape[0]),
                  encoder_hidden_states=text, pooled_projections=pooled, return_dict=False)[0]
        v_uncond, v_cond = v.chunk(2)
        v = v_uncond + guidance * (v_cond - v_uncond) if combine is None else combine(i, t, v_cond, v_uncond)
        latents = scheduler.step(v, t, latents, return_dict=False)[0]
    return latents


def flux_loop(model, scheduler, noise, cond, uncond, guidance):
    """diffusers' Flux pipeline loop with true CFG: packed latents and ids, timestep/1000, scheduler.step."""
    batch, channels, height, width = noise.shape
    latents = FLUX._pack_latents(noise, batch, channels, height, width)
    img_ids = FLUX._prepare_latent_image_ids(batch, height // 2, width // 2, noise.device, noise.dtype)
    txt_ids = torch.zeros(TEXT_LEN, 3)
    for t in scheduler.timesteps:
        timestep = t.expand(batch).to(latents.dtype)
        v_cond, v_uncond = (model(hidden_states=latents, timestep=timestep / 1000, txt_ids=txt_ids, img_ids=img_ids,
                                  return_dict=False, **c)[0] for c in (cond, uncond))
        latents = scheduler.step(v_uncond + guidance * (v_cond - v_uncond), t, latents, return_dict=False)[0]
    return FLUX._unpack_latents(latents, height * 8, width * 8, 8)  # VAE factor 8: back to H × W


# ---------------------------------------------------------------------------------------------------------------
# Schedules

SCHEDULES = [
    (dict(shift=3.0), {}),
    (dict(shift=1.0), {}),
    (dict(use_dynamic_shifting=True), dict(mu=0.8)),
    (dict(use_dynamic_shifting=True, time_shift_type="linear"), dict(mu=1.3)),
    (dict(shift=3.0, shift_terminal=0.02), {}),
    (dict(shift=3.0, use_karras_sigmas=True), {}),
    (dict(shift=3.0, use_exponential_sigmas=True), {}),
]


@pytest.mark.parametrize("config, kwargs", SCHEDULES)
@pytest.mark.parametrize("num_steps", [2, 7, 28])
@pytest.mark.parametrize("flux_base", [False, True])
def test_flow_sigmas_equal_scheduler(config, kwargs, num_steps, flux_base):
    """Bit for bit the scheduler's sigmas, for the default t's and for the Flux pipeline's linspace(1, 1/N, N)."""
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**config)
    if flux_base:
        kwargs = dict(kwargs, sigmas=np.linspace(1.0, 1 / num_steps, num_steps))
        scheduler.set_timesteps(**kwargs)
    else:
        scheduler.set_timesteps(num_steps, **kwargs)
    sigmas = flow_sigmas(scheduler, num_steps, **kwargs)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (num_steps + 1,)
    assert torch.equal(sigmas, scheduler.sigmas)
    assert sigmas[0] == 1 and sigmas[-1] == 0  # x starts at noise·t_0 = noise, as in diffusers


def test_flow_sigmas_one_step():
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(1)
    assert torch.equal(flow_sigmas(scheduler, 1), scheduler.sigmas)


def test_flow_shift_mu_equals_pipeline():
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                          base_image_seq_len=256, max_image_seq_len=4096)
    for seq_len in (16, 256, 1024, 4096):
        assert flow_shift_mu(scheduler, seq_len) == calculate_shift(seq_len, 256, 4096, 0.5, 1.15)


@pytest.mark.parametrize("config, kwargs, match", [
    (dict(use_dynamic_shifting=True), dict(num_steps=4), "pass mu"),
    (dict(shift=3.0), dict(num_steps=4, mu=0.5), "mu applies"),
    (dict(use_dynamic_shifting=True), dict(num_steps=4, mu=float("nan")), "mu must be finite"),
    (dict(shift=3.0), dict(num_steps=0), "num_steps"),
    (dict(shift=3.0), dict(num_steps=4, sigmas=[1.0, 0.5]), "sigmas must hold num_steps=4"),
    (dict(shift=3.0), dict(num_steps=2, sigmas=[1.5, 0.5]), r"sigmas .* must lie in \(0, 1\]"),
    (dict(invert_sigmas=True), dict(num_steps=4), "invert_sigmas"),
    (dict(shift=3.0, shift_terminal=0.1), dict(num_steps=1), "shift_terminal"),
])
def test_flow_sigmas_refuse_bad_input(config, kwargs, match):
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**config)
    with pytest.raises(ValueError, match=match):
        flow_sigmas(scheduler, **kwargs)


def test_flow_sigmas_refuse_vp_scheduler():
    with pytest.raises(ValueError, match="not a flow-matching scheduler"):
        flow_sigmas(diffusers.EulerDiscreteScheduler(), 4)
    with pytest.raises(ValueError, match="not a flow-matching scheduler"):
        FlowMatchDenoiser(tiny_sd3(), diffusers.EulerDiscreteScheduler())


# ---------------------------------------------------------------------------------------------------------------
# Parity with diffusers' loops


def test_sd3_cfg_equals_diffusers_loop(one_thread):
    """SD3: t·1000 as the timestep, shift 3.0, CFG on a 2B batch: fastguide.sample equals the pipeline's loop."""
    model = tiny_sd3()
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(6)
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond, uncond = prompt(3, seed=1), prompt(3, seed=2)
    with torch.no_grad():
        expected = sd3_loop(model, scheduler, noise, cond, uncond, guidance=4.0)
        actual, stats = fastguide.sample(FlowMatchDenoiser(model, scheduler), noise, labels=cond, guide_labels=uncond,
                                         guidance=4.0, sigmas=flow_sigmas(scheduler, 6), solver="euler",
                                         return_stats=True)
    assert stats["strategy"] == "cfg-batch" and stats["net"] == stats["guide"] == 6
    assert relative_error(actual, expected) < 1e-5
    assert relative_error(actual, noise) > 0.1  # the model did move x


def test_flux_cfg_equals_diffusers_loop(one_thread):
    """Flux: packed latents and ids, timestep/1000, dynamic shift (mu from the packed sequence length), the
    pipeline's sigmas, guidance embedding as conditioning; fastguide sees [B, C, H, W]."""
    model = tiny_flux()
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=16,
                                                          max_image_seq_len=256, base_shift=0.5, max_shift=1.15)
    num_steps = 5
    base = np.linspace(1.0, 1 / num_steps, num_steps)
    mu = flow_shift_mu(scheduler, 16)  # (8/2)·(8/2) packed tokens
    scheduler.set_timesteps(sigmas=base, mu=mu)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    distilled = torch.full((2,), 3.5)
    cond, uncond = (dict(prompt(2, seed=s), guidance=distilled) for s in (4, 5))
    denoiser = FlowMatchDenoiser(model, scheduler)
    assert denoiser.layout == "flux" and denoiser.img_channels == 4
    with torch.no_grad():
        expected = flux_loop(model, scheduler, noise, cond, uncond, guidance=2.5)
        actual = fastguide.sample(denoiser, noise, labels=cond, guide_labels=uncond, guidance=2.5,
                                  sigmas=flow_sigmas(scheduler, num_steps, mu=mu, sigmas=base), solver="euler")
    assert actual.shape == noise.shape
    assert relative_error(actual, expected) < 1e-5
    assert relative_error(actual, noise) > 0.1


def test_start_below_one_needs_scaled_noise(one_thread):
    """With custom t's that start below 1, diffusers starts from unscaled noise: pass noise / t_0."""
    model = tiny_sd3(seed=1)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    base = np.linspace(0.6, 0.1, 4)
    scheduler.set_timesteps(sigmas=base)
    sigmas = flow_sigmas(scheduler, 4, sigmas=base)
    assert sigmas[0] < 1
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    cond, uncond = prompt(2, seed=7), prompt(2, seed=8)
    with torch.no_grad():
        expected = sd3_loop(model, scheduler, noise, cond, uncond, guidance=3.0)
        actual = fastguide.sample(FlowMatchDenoiser(model, scheduler), noise / sigmas[0], labels=cond,
                                  guide_labels=uncond, guidance=3.0, sigmas=sigmas, solver="euler")
        unscaled = fastguide.sample(FlowMatchDenoiser(model, scheduler), noise, labels=cond,
                                    guide_labels=uncond, guidance=3.0, sigmas=sigmas, solver="euler")
    assert relative_error(actual, expected) < 1e-5
    assert relative_error(unscaled, expected) > 1e-3


def test_cfg_zero_star_equals_diffusers_guider(one_thread):
    """CFG-Zero* (zero-init first step, per-sample projection of the unconditional velocity) against diffusers'
    ClassifierFreeZeroStarGuidance on the velocities.  Runs once fastguide.rules exists."""
    rules = pytest.importorskip("fastguide.rules")
    from diffusers.guiders import ClassifierFreeZeroStarGuidance
    model = tiny_sd3(seed=2)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    num_steps, guidance = 6, 4.0
    scheduler.set_timesteps(num_steps)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    cond, uncond = prompt(2, seed=10), prompt(2, seed=11)
    guider = ClassifierFreeZeroStarGuidance(guidance_scale=guidance, zero_init_steps=1)

    def combine(i, t, v_cond, v_uncond):
        guider.set_state(step=i, num_inference_steps=num_steps, timestep=t)
        return guider.forward(pred_cond=v_cond, pred_uncond=v_uncond).pred

    with torch.no_grad():
        expected = sd3_loop(model, scheduler, noise, cond, uncond, guidance, combine=combine)
        actual = fastguide.sample(FlowMatchDenoiser(model, scheduler), noise, labels=cond, guide_labels=uncond,
                                  guidance=guidance, guidance_rule=rules.CFGZeroStar(zero_init_steps=1),
                                  sigmas=flow_sigmas(scheduler, num_steps), solver="euler")
    assert relative_error(actual, expected) < 1e-5


def test_autoguidance_with_smaller_transformer_equals_loop(one_thread):
    """Autoguidance: a 1-layer SD3 guides the 2-layer one with the same conditioning (v = v_g + w(v_m − v_g)),
    and with guide_labels the guide gets other conditioning (D0 = guide(x, σ, guide_labels))."""
    main, small = tiny_sd3(num_layers=2, seed=3), tiny_sd3(num_layers=1, seed=4)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(5)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(12))
    cond, uncond = prompt(2, seed=13), prompt(2, seed=14)
    net, guide = FlowMatchDenoiser(main, scheduler), FlowMatchDenoiser(small, scheduler)
    for guide_labels in (None, uncond):
        scheduler.set_timesteps(5)
        latents = noise
        with torch.no_grad():
            for t in scheduler.timesteps:
                timestep = t.expand(2)
                v_main = main(hidden_states=latents, timestep=timestep, return_dict=False, **cond)[0]
                v_guide = small(hidden_states=latents, timestep=timestep, return_dict=False,
                                **(guide_labels or cond))[0]
                latents = scheduler.step(v_guide + 2.0 * (v_main - v_guide), t, latents, return_dict=False)[0]
            actual = fastguide.sample(net, noise, labels=cond, guide=guide, guide_labels=guide_labels, guidance=2.0,
                                      sigmas=flow_sigmas(scheduler, 5), solver="euler")
        assert relative_error(actual, latents) < 1e-5


RULE_GUIDERS = {  # fastguide rule (space "eps": the velocity here) -> diffusers guider, both at w = 3
    "cfg_rescale": (lambda rules: rules.CFGRescale(phi=0.7),
                    lambda g: g.ClassifierFreeGuidance(guidance_scale=3.0, guidance_rescale=0.7)),
    "apg": (lambda rules: rules.APG(eta=0.5, norm_threshold=5.0, momentum=0.3),
            lambda g: g.AdaptiveProjectedGuidance(guidance_scale=3.0, adaptive_projected_guidance_momentum=0.3,
                                                  adaptive_projected_guidance_rescale=5.0, eta=0.5)),
    "cfg_zero_star": (lambda rules: rules.CFGZeroStar(zero_init_steps=1),
                      lambda g: g.ClassifierFreeZeroStarGuidance(guidance_scale=3.0, zero_init_steps=1)),
}


@pytest.mark.parametrize("rule", list(RULE_GUIDERS))
def test_autoguidance_with_every_rule_equals_diffusers_guiders_on_the_velocities(rule, one_thread):
    """Issue 11: autoguidance of a flow transformer by a smaller one, combined with each guidance rule,
    equals the loop that calls diffusers' guider on (v_main, v_guide) and steps with the scheduler."""
    rules = pytest.importorskip("fastguide.rules")
    import diffusers.guiders as guiders
    make_rule, make_guider = RULE_GUIDERS[rule]
    main, small = tiny_sd3(num_layers=2, seed=21), tiny_sd3(num_layers=1, seed=22)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    num_steps = 5
    scheduler.set_timesteps(num_steps)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(23))
    cond = prompt(2, seed=24)
    guider = make_guider(guiders)
    latents = noise
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            v_main, v_guide = (model(hidden_states=latents, timestep=t.expand(2), return_dict=False, **cond)[0]
                               for model in (main, small))
            guider.set_state(step=i, num_inference_steps=num_steps, timestep=t)
            guider.prepare_inputs({})  # where a guider starts its per-run state (APG's momentum) at step 0
            v = guider.forward(pred_cond=v_main, pred_uncond=v_guide).pred
            latents = scheduler.step(v, t, latents, return_dict=False)[0]
        actual = fastguide.sample(FlowMatchDenoiser(main, scheduler), noise, labels=cond,
                                  guide=FlowMatchDenoiser(small, scheduler), guidance=3.0,
                                  guidance_rule=make_rule(rules), sigmas=flow_sigmas(scheduler, num_steps),
                                  solver="euler")
    assert relative_error(actual, latents) < 1e-5


def smooth_in_time(model):
    """Zeroes the timestep features of period < ~1 in t (t·1000 through sinusoids of frequency 1 .. 1e-4).

    A random transformer weighs every frequency alike, so its velocity oscillates in t on the scale of
    1/1000: no ODE solver converges on that.  A trained model is smooth in t; so is this one."""
    linear = model.time_text_embed.timestep_embedder.linear_1  # input: [cos | sin] of 128 frequencies each
    with torch.no_grad():
        linear.weight[:, :80] = 0
        linear.weight[:, 128:208] = 0
    return model


def test_higher_order_solvers_approach_euler_limit(one_thread):
    """Heun and DPM-Solver++(2M) on the flow ODE (dx/dt = v = (x − D)/t) approach the endpoint of Euler with
    512 steps: Heun much closer than Euler at 8 steps, DPM-Solver++(2M) at second order (a large constant: it is
    the EDM-form method, λ = −log t, not one built on the flow's α = 1 − t)."""
    model = smooth_in_time(tiny_sd3(num_layers=1, seed=5))
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    denoiser = FlowMatchDenoiser(model, scheduler)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(15))
    cond, uncond = prompt(1, seed=16), prompt(1, seed=17)

    def error(solver, num_steps):
        x = fastguide.sample(denoiser, noise, labels=cond, guide_labels=uncond, guidance=3.0, solver=solver,
                             sigmas=flow_sigmas(scheduler, num_steps))
        return relative_error(x, limit)

    with torch.no_grad():
        limit = fastguide.sample(denoiser, noise, labels=cond, guide_labels=uncond, guidance=3.0, solver="euler",
                                 sigmas=flow_sigmas(scheduler, 512))
        euler, heun, heun_fine = error("euler", 8), error("heun", 8), error("heun", 32)
        dpm, dpm_fine = error("dpmpp_2m", 8), error("dpmpp_2m", 32)
    assert heun < 0.2 * euler and heun_fine < 2e-3, (euler, heun, heun_fine)
    assert dpm_fine < dpm / 8 and dpm_fine < 0.02, (dpm, dpm_fine)


# ---------------------------------------------------------------------------------------------------------------
# The adapter's pieces and its refusals


def test_packing_matches_flux_pipeline():
    x = torch.randn(2, 4, 6, 10, generator=torch.Generator().manual_seed(18))
    packed = pack_latents(x)
    assert torch.equal(packed, FLUX._pack_latents(x, 2, 4, 6, 10))
    assert torch.equal(unpack_latents(packed, x.shape), x)
    assert torch.equal(latent_image_ids(3, 5, x.device, torch.float32),
                       FLUX._prepare_latent_image_ids(2, 3, 5, x.device, torch.float32))


def test_denoiser_is_x_minus_t_v():
    """D = x − t·v with the model called at timestep t·1000 (SD3), as float64 arithmetic."""
    model = tiny_sd3(seed=6).double()
    denoiser = FlowMatchDenoiser(model, diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(19))
    cond = {k: v.double() for k, v in prompt(2, seed=20).items()}
    t = torch.tensor([0.7, 0.7], dtype=torch.float64)
    with torch.no_grad():
        v = model(hidden_states=x, timestep=(t.float() * 1000), return_dict=False, **cond)[0]
        assert torch.equal(denoiser(x, t, cond), x - t.reshape(-1, 1, 1, 1) * v)
        assert torch.equal(denoiser(x, t, **cond), denoiser(x, t, cond))  # keyword arguments, as sample passes them


def test_flow_denoiser_refuses_bad_conditioning():
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sd3, flux = FlowMatchDenoiser(tiny_sd3(), scheduler), FlowMatchDenoiser(tiny_flux(), scheduler)
    x, t = torch.randn(2, 4, 8, 8), torch.full((2,), 0.5)
    cond = prompt(2, seed=21)
    with pytest.raises(ValueError, match="'txt_ids' is set by the adapter"):
        flux(x, t, dict(cond, txt_ids=torch.zeros(2, 3)))
    with pytest.raises(ValueError, match="'prompt_mask' is not an argument of SD3Transformer2DModel.forward"):
        sd3(x, t, dict(cond, prompt_mask=torch.ones(2, TEXT_LEN)))
    with pytest.raises(ValueError, match="'encoder_hidden_states'"):
        flux(x, t, {"pooled_projections": cond["pooled_projections"]})
    with pytest.raises(ValueError, match="even H and W"):
        flux(torch.randn(2, 4, 7, 8), t, cond)
    with pytest.raises(ValueError, match="layout must be one of"):
        FlowMatchDenoiser(tiny_sd3(), scheduler, layout="packed")
    with pytest.raises(TypeError, match="not both"):
        sd3(x, t, cond, pooled_projections=cond["pooled_projections"])
    with pytest.raises(ValueError, match=r"labels\['pooled_projections'\] has batch"):  # before any model call
        fastguide.sample(sd3, torch.randn(2, 4, 8, 8), labels=dict(cond, pooled_projections=torch.zeros(3, 8)),
                         sigmas=flow_sigmas(scheduler, 2), solver="euler")


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap of CPU attention: a fallback, not an error
@pytest.mark.parametrize("make", [tiny_sd3, tiny_flux])
def test_stacked_autoguidance_of_same_architecture(make, one_thread):
    """Two transformers of one architecture (different weights) run as one vmap over stacked parameters:
    the adapter must survive the strategy's deepcopy and vmap, with dict conditioning."""
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    net, guide = FlowMatchDenoiser(make(seed=0), scheduler), FlowMatchDenoiser(make(seed=1), scheduler)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(22))
    cond = dict(prompt(2, seed=23), **({"guidance": torch.full((2,), 3.5)} if make is tiny_flux else {}))
    with torch.no_grad():
        expected = fastguide.GuidedDenoiser(net, guide, guidance=2.0, strategy="separate").predictions(x, 0.5, cond)
        actual = fastguide.GuidedDenoiser(net, guide, guidance=2.0, strategy="stacked").predictions(x, 0.5, cond)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_model_dtype_followed_after_conversion():
    """The adapter caches the model's dtype (diffusers' dtype property is slow) but follows model.double()."""
    model = tiny_sd3(seed=7)
    denoiser = FlowMatchDenoiser(model, diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
    x, t, cond = torch.randn(2, 4, 8, 8), torch.full((2,), 0.5), prompt(2, seed=24)
    with torch.no_grad():
        assert denoiser(x, t, cond).dtype == torch.float32
        model.double()
        d64 = denoiser(x.double(), t.double(), cond)  # x and the conditioning are cast to float64
        v = model(hidden_states=x.double(), timestep=t * 1000, return_dict=False,
                  **{k: c.double() for k, c in cond.items()})[0]
    assert d64.dtype == torch.float64
    assert torch.equal(d64, x.double() - 0.5 * v)


class VideoVelocity(torch.nn.Module):
    """Any module called with hidden_states, timestep and conditioning keyword arguments (here a video latent
    [B, C, F, H, W] and a masked prompt, as Wan or HunyuanVideo take them), returning a plain tensor."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(8)
        self.proj = torch.nn.Linear(TEXT_DIM, 4)

    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask):
        weights = encoder_attention_mask[:, :, None] / encoder_attention_mask.sum(1)[:, None, None]
        text = self.proj((weights * encoder_hidden_states).sum(1))                      # [B, C]
        return hidden_states * torch.cos(timestep / 1000)[:, None, None, None, None] + text[:, :, None, None, None]


def test_generic_module_with_video_latents_and_mask():
    model = VideoVelocity()
    denoiser = FlowMatchDenoiser(model, diffusers.FlowMatchEulerDiscreteScheduler(shift=5.0))
    assert denoiser.layout == "plain"
    x = torch.randn(2, 4, 3, 4, 4, generator=torch.Generator().manual_seed(25))
    cond = {"encoder_hidden_states": prompt(2, seed=26)["encoder_hidden_states"],
            "encoder_attention_mask": torch.tensor([[1.0] * TEXT_LEN, [1.0, 1.0, 0.0, 0.0, 0.0]])}
    t = torch.full((2,), 0.8)
    with torch.no_grad():
        expected = x - 0.8 * model(x, torch.full((2,), 800.0), **cond)
        assert torch.equal(denoiser(x, t, cond), expected)
        other = denoiser(x, t, dict(cond, encoder_attention_mask=torch.ones(2, TEXT_LEN)))
    assert not torch.equal(other[1], expected[1]) and torch.equal(other[0], expected[0])  # the mask reaches it

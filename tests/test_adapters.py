"""DiffusersDenoiser and karras_sigmas against diffusers itself (tiny randomly initialised models)."""
import pytest
import torch

import fastguide
from fastguide.adapters import DiffusersDenoiser, detect_cond_kwarg, karras_sigmas, sigma_to_timestep

diffusers = pytest.importorskip("diffusers")

NUM_CLASSES = 5
NULL_CLASS = NUM_CLASSES - 1


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4, num_class_embeds=NUM_CLASSES).eval()


def euler_karras(prediction_type, num_steps, **config):
    scheduler = diffusers.EulerDiscreteScheduler(num_train_timesteps=1000, prediction_type=prediction_type,
                                                 use_karras_sigmas=True, **config)
    scheduler.set_timesteps(num_steps)
    return scheduler


def diffusers_cfg_loop(unet, scheduler, noise, labels, null_labels, guidance):
    """The plain diffusers loop: CFG on the 2B batch, scale_model_input, step."""
    latents = noise * scheduler.init_noise_sigma
    both_labels = torch.cat([labels, null_labels])
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        out = unet(model_input, t, class_labels=both_labels).sample
        out_cond, out_uncond = out.chunk(2)
        out = out_uncond + guidance * (out_cond - out_uncond)
        latents = scheduler.step(out, t, latents).prev_sample
    return latents


def relative_error(actual, expected):
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


@pytest.mark.parametrize("prediction_type, batch", [("epsilon", 3), ("v_prediction", 2)])
def test_sample_equals_diffusers_euler_cfg_loop(prediction_type, batch):
    unet = tiny_unet()
    scheduler = euler_karras(prediction_type, num_steps=5)
    generator = torch.Generator().manual_seed(batch)
    noise = torch.randn(batch, 3, 8, 8, generator=generator)
    labels = torch.randint(0, NULL_CLASS, (batch,), generator=generator)
    null_labels = torch.full((batch,), NULL_CLASS)
    guidance = 2.5
    with torch.no_grad():
        expected = diffusers_cfg_loop(unet, scheduler, noise, labels, null_labels, guidance)
        actual = fastguide.sample(DiffusersDenoiser(unet, scheduler), noise, labels=labels,
                                  guide_labels=null_labels, guidance=guidance, sigmas=scheduler.sigmas,
                                  solver="euler")
    assert scheduler.init_noise_sigma == scheduler.sigmas[0]
    assert actual.shape == expected.shape
    assert relative_error(actual, expected) < 1e-5


def test_one_hot_labels_match_class_indices():
    unet = tiny_unet(seed=1)
    denoiser = DiffusersDenoiser(unet, euler_karras("epsilon", 4))
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 5
    sigma = torch.full((3,), 5.0)
    classes = torch.tensor([0, 3, 1])
    with torch.no_grad():
        by_index = denoiser(x, sigma, classes)
        by_one_hot = denoiser(x, sigma, torch.eye(NUM_CLASSES)[classes])
        other = denoiser(x, sigma, torch.tensor([2, 3, 1]))
    assert torch.equal(by_index, by_one_hot)
    assert not torch.equal(by_index[0], other[0])  # the labels do reach the model
    with pytest.raises(ValueError, match="one-hot"):
        denoiser(x, sigma, torch.full((3, NUM_CLASSES), 0.2))


def test_denoiser_matches_float64_formula_per_prediction_type():
    """D from ε, v and x0 outputs, with the model's timestep and input scaling, in float64."""
    unet = tiny_unet(seed=2).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 3
    sigma = torch.tensor([3.0, 0.7], dtype=torch.float64)  # one σ per row is allowed too
    labels = torch.tensor([1, 2])
    for prediction_type in ("epsilon", "v_prediction", "sample"):
        scheduler = euler_karras(prediction_type, 4)
        denoiser = DiffusersDenoiser(unet, scheduler)
        log_sigmas = ((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod).sqrt().double().log()
        t = sigma_to_timestep(sigma, log_sigmas).float()
        s = sigma.reshape(-1, 1, 1, 1)
        with torch.no_grad():
            out = unet(x / (s ** 2 + 1).sqrt(), t, class_labels=labels).sample
            expected = {"epsilon": x - s * out,
                        "v_prediction": x / (s ** 2 + 1) - s / (s ** 2 + 1).sqrt() * out,
                        "sample": out}[prediction_type]
            actual = denoiser(x, sigma, labels)
        assert actual.dtype == torch.float64
        assert relative_error(actual, expected) < 1e-12, prediction_type


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("num_steps", [1, 2, 7, 25])
def test_karras_sigmas_equal_diffusers(num_steps, spacing):
    config = dict(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    scheduler = euler_karras("epsilon", num_steps, **config)
    plain = diffusers.EulerDiscreteScheduler(num_train_timesteps=1000, **config)
    sigmas = karras_sigmas(plain, num_steps)
    assert sigmas.dtype == torch.float32
    assert sigmas[-1] == 0 and sigmas.shape == (num_steps + 1,)
    torch.testing.assert_close(sigmas, scheduler.sigmas, rtol=1.2e-7, atol=0)


def test_karras_sigmas_honour_config_range():
    scheduler = diffusers.EulerDiscreteScheduler(num_train_timesteps=1000, sigma_min=0.1, sigma_max=20.0,
                                                 use_karras_sigmas=True)
    scheduler.set_timesteps(5)
    sigmas = karras_sigmas(scheduler, 5)
    torch.testing.assert_close(sigmas, scheduler.sigmas, rtol=1.2e-7, atol=0)
    assert sigmas[0].item() == pytest.approx(20.0) and sigmas[-2].item() == pytest.approx(0.1)


def test_timesteps_equal_diffusers_interpolation():
    scheduler = euler_karras("epsilon", 9)
    log_sigmas = ((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod).sqrt().double().log()
    t = sigma_to_timestep(scheduler.sigmas[:-1], log_sigmas)
    # diffusers interpolates from the float64 σ before rounding it to float32: agree to ~1e-4 steps.
    torch.testing.assert_close(t.float(), scheduler.timesteps, rtol=0, atol=2e-4)
    edges = sigma_to_timestep(torch.tensor([1e-6, 1e6]), log_sigmas)
    assert edges.tolist() == [0.0, 999.0]  # clamped to the table's ends


def test_cross_attention_model_gets_encoder_hidden_states():
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=4, cross_attention_dim=6, attention_head_dim=2).eval()
    assert detect_cond_kwarg(unet) == "encoder_hidden_states"
    scheduler = euler_karras("epsilon", 4)
    denoiser = DiffusersDenoiser(unet, scheduler)
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 8, 8, generator=generator) * 2
    context = torch.randn(2, 4, 6, generator=generator)
    sigma = torch.full((2,), 2.0)
    log_sigmas = ((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod).sqrt().double().log()
    with torch.no_grad():
        out = unet(x / 5 ** 0.5, sigma_to_timestep(sigma, log_sigmas).float(), encoder_hidden_states=context).sample
        torch.testing.assert_close(denoiser(x, sigma, context), x - 2.0 * out, rtol=1e-6, atol=1e-6)


def test_dit_transformer_with_learned_variance():
    """A DiT: class indices through its class_embedder, and the first C of its 2C output channels."""
    torch.manual_seed(0)
    dit = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=3, out_channels=6,
                                          num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=NUM_CLASSES,
                                          norm_num_groups=1).eval()
    scheduler = euler_karras("epsilon", 4)
    denoiser = DiffusersDenoiser(dit, scheduler)
    assert (denoiser.cond_kwarg, denoiser.label_dim) == ("class_labels", NUM_CLASSES)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 3
    sigma = torch.full((2,), 3.0)
    classes = torch.tensor([4, 1])
    log_sigmas = ((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod).sqrt().double().log()
    with torch.no_grad():
        out = dit(x / 10 ** 0.5, sigma_to_timestep(sigma, log_sigmas).float(), class_labels=classes).sample
        expected = x - 3.0 * out[:, :3]
        torch.testing.assert_close(denoiser(x, sigma, torch.eye(NUM_CLASSES)[classes]), expected,
                                   rtol=1e-6, atol=1e-6)


def test_attributes_for_samplers_and_cli():
    denoiser = DiffusersDenoiser(tiny_unet(), euler_karras("epsilon", 4))
    assert (denoiser.img_channels, denoiser.img_resolution, denoiser.label_dim) == (3, 8, NUM_CLASSES)
    assert denoiser.cond_kwarg == "class_labels"
    assert 0.01 < denoiser.sigma_min < 0.05 and 100 < denoiser.sigma_max < 200


def test_bad_scheduler_and_arguments():
    unet = tiny_unet()
    with pytest.raises(ValueError, match="has no alphas_cumprod"):
        DiffusersDenoiser(unet, diffusers.FlowMatchEulerDiscreteScheduler())
    with pytest.raises(ValueError, match="has no alphas_cumprod"):
        karras_sigmas(object(), 4)
    with pytest.raises(ValueError, match="cond_kwarg must be one of"):
        DiffusersDenoiser(unet, euler_karras("epsilon", 4), cond_kwarg="context")
    with pytest.raises(ValueError, match="prediction_type"):
        DiffusersDenoiser(unet, diffusers.EulerDiscreteScheduler(prediction_type="flow"))
    with pytest.raises(ValueError, match="num_steps"):
        karras_sigmas(euler_karras("epsilon", 4), 0)


def tiny_sdxl_unet(seed=0):
    """A UNet2DConditionModel with SDXL's "text_time" added conditioning (pooled text embeds + 6 time ids)."""
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=4, cross_attention_dim=12, attention_head_dim=2, addition_embed_type="text_time",
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=8 + 6 * 4).eval()


def sdxl_prompt(batch, seed):
    generator = torch.Generator().manual_seed(seed)
    return {"encoder_hidden_states": torch.randn(batch, 3, 12, generator=generator),
            "text_embeds": torch.randn(batch, 8, generator=generator),
            "time_ids": torch.tensor([[8.0, 8.0, 0.0, 0.0, 8.0, 8.0]]).repeat(batch, 1)}


def test_sdxl_added_cond_kwargs_equal_diffusers_loop(one_thread):
    """SDXL-style conditioning as one flat dict: text_embeds and time_ids reach the UNet in added_cond_kwargs,
    and CFG on the 2B batch concatenates every entry, as diffusers' SDXL loop does."""
    unet = tiny_sdxl_unet()
    scheduler = euler_karras("epsilon", 5)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    cond, uncond = sdxl_prompt(2, seed=8), sdxl_prompt(2, seed=9)
    both = {key: torch.cat([uncond[key], cond[key]]) for key in cond}
    latents = noise * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            out = unet(model_input, t, encoder_hidden_states=both["encoder_hidden_states"],
                       added_cond_kwargs={"text_embeds": both["text_embeds"], "time_ids": both["time_ids"]}).sample
            out_uncond, out_cond = out.chunk(2)
            latents = scheduler.step(out_uncond + 3.0 * (out_cond - out_uncond), t, latents).prev_sample
        denoiser = DiffusersDenoiser(unet, scheduler)
        actual = fastguide.sample(denoiser, noise, labels=cond, guide_labels=uncond, guidance=3.0,
                                  sigmas=scheduler.sigmas, solver="euler")
        other = fastguide.sample(denoiser, noise, labels=dict(cond, text_embeds=uncond["text_embeds"]),
                                 guide_labels=uncond, guidance=3.0, sigmas=scheduler.sigmas, solver="euler")
    assert relative_error(actual, latents) < 1e-5
    assert relative_error(other, latents) > 1e-4  # text_embeds does reach the model


def test_dict_conditioning_refusals_name_the_key():
    sdxl = DiffusersDenoiser(tiny_sdxl_unet(), euler_karras("epsilon", 4))
    plain = DiffusersDenoiser(tiny_unet(), euler_karras("epsilon", 4))
    x, sigma = torch.randn(2, 4, 8, 8), torch.full((2,), 2.0)
    cond = sdxl_prompt(2, seed=1)
    with pytest.raises(ValueError, match="'text_embeds' is not an argument of UNet2DModel.forward"):
        plain(x[:, :3], sigma, {"class_labels": torch.tensor([0, 1]), "text_embeds": cond["text_embeds"]})
    with pytest.raises(ValueError, match="'added_cond_kwargs' is set by the adapter"):
        sdxl(x, sigma, dict(cond, added_cond_kwargs=cond["time_ids"]))
    with pytest.raises(ValueError, match="'timestep' is set by the adapter"):
        sdxl(x, sigma, dict(cond, timestep=sigma))
    with pytest.raises(ValueError, match=r"guide_labels and labels must have the same keys; key 'time_ids'"):
        fastguide.sample(sdxl, x, labels=cond, guide_labels={k: v for k, v in cond.items() if k != "time_ids"},
                         guidance=2.0, num_steps=2)
    with pytest.raises(ValueError, match=r"guide_labels\['text_embeds'\] has batch 3 but guide_labels\["):
        fastguide.sample(sdxl, x, labels=cond, guide_labels=dict(cond, text_embeds=torch.zeros(3, 8)),
                         guidance=2.0, num_steps=2)
    with torch.no_grad():  # a dict of class_labels goes through the one-hot rule too
        by_dict = plain(x[:, :3], sigma, {"class_labels": torch.eye(NUM_CLASSES)[[0, 1]]})
        assert torch.equal(by_dict, plain(x[:, :3], sigma, torch.tensor([0, 1])))

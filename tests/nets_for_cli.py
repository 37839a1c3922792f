"""Tiny denoiser factories for the `fastguide sample` tests (imported by name: nets_for_cli:FACTORY)."""
import os
import time

import torch
from torch import nn


class TinyNet(nn.Module):
    """A class-conditional denoiser with EDM preconditioning, a 3×3 conv and fixed random weights."""

    img_channels, img_resolution, label_dim = 3, 8, 4
    sigma_data = 0.5

    def __init__(self, seed=0, delay=0.0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.embed = nn.Linear(self.label_dim, 3)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
        self.delay = delay

    def forward(self, x, sigma, labels=None):
        if self.delay:
            time.sleep(self.delay)
        sigma = sigma.reshape(-1, 1, 1, 1)
        c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        c_in = 1 / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        h = self.conv(x * c_in)
        if labels is not None:
            h = h + self.embed(labels)[:, :, None, None]
        return c_skip * x + c_out * torch.tanh(h)


def tiny_net():
    return TinyNet(seed=0)


def tiny_guide():
    return TinyNet(seed=1)


def slow_net():
    """TinyNet (same weights) that sleeps per call, so that a run can be killed part-way."""
    return TinyNet(seed=0, delay=float(os.environ.get("FASTGUIDE_TEST_DELAY", "0.05")))


def gray_net():
    """One channel, no attributes: needs --shape."""
    return lambda x, sigma, labels=None: x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2)


def not_a_denoiser():
    return 42


def broken_factory():
    raise RuntimeError("weights not found")


def exiting_factory():
    raise SystemExit(3)


def lonely_nan_net():
    """TinyNet, but NaN for a batch of one sample (so, with --batch 2, for the last seed of an odd count)."""
    net = TinyNet(seed=0)

    def denoise(x, sigma, labels=None):
        out = net(x, sigma, labels)
        return out * float("nan") if x.shape[0] == 1 else out
    denoise.img_channels, denoise.img_resolution, denoise.label_dim = 3, 8, 4
    return denoise


NOT_CALLABLE = "just a string"


def diffusers_flow_match():
    """A diffusers model with a scheduler that has no alphas_cumprod (flow matching)."""
    import diffusers
    from fastguide.adapters import DiffusersDenoiser
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    return DiffusersDenoiser(unet, diffusers.FlowMatchEulerDiscreteScheduler())


def diffusers_unet():
    """A tiny class-conditional diffusers UNet (5 classes, class 4 trained as 'null') with its scheduler."""
    import diffusers
    from fastguide.adapters import DiffusersDenoiser
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4, num_class_embeds=5)
    return DiffusersDenoiser(unet, diffusers.EulerDiscreteScheduler(prediction_type="v_prediction"))


# ---------------------------------------------------------------- factories that give conditioning and a schedule

PROMPT_TABLE = torch.randn(5, 4, generator=torch.Generator().manual_seed(7))  # stand-in "prompt embeddings"


def prompt_conditioning(seeds, device):
    """Seed k gets row k mod 5 of PROMPT_TABLE (keyword 'emb'); the unconditional labels are zeros."""
    emb = PROMPT_TABLE[[seed % 5 for seed in seeds]].to(device)
    return {"emb": emb}, {"emb": torch.zeros_like(emb)}


def prompt_sigmas(num_steps):
    from fastguide.reference import edm_sigmas
    return edm_sigmas(num_steps, 0.01, 20.0, 5.0)


class KeywordNet(TinyNet):
    """TinyNet conditioned through the keyword argument emb [B, 4] (a dict of conditioning)."""

    def forward(self, x, sigma, emb=None):
        return super().forward(x, sigma, emb)


def prompted():
    """A factory dict: denoiser, per-seed conditioning, shape and schedule."""
    return dict(denoiser=KeywordNet(seed=0), conditioning=prompt_conditioning, shape=(3, 8, 8), sigmas=prompt_sigmas)


class PromptedModel:
    """The same as an object with attributes (no schedule: EDM's, clamped to sigma_max)."""

    def __init__(self):
        self.denoiser = KeywordNet(seed=0)
        self.denoiser.sigma_max = 20.0

    def conditioning(self, seeds, device):
        return prompt_conditioning(seeds, device)


def labels_only():
    """Conditioning without unconditional labels: no CFG possible."""
    def conditioning(seeds, device):
        return {"emb": PROMPT_TABLE[[0] * len(seeds)]}, None
    return dict(denoiser=KeywordNet(seed=0), conditioning=conditioning)


def one_row_conditioning():
    return dict(denoiser=KeywordNet(seed=0), conditioning=lambda seeds, device: prompt_conditioning(seeds[:1], device))


def failing_later_conditioning():
    """Conditioning that fails for seeds >= 4 (so, found while sampling rather than at the check)."""
    def conditioning(seeds, device):
        if max(seeds) >= 4:
            raise KeyError(f"no prompt for seed {max(seeds)}")
        return prompt_conditioning(seeds, device)
    return dict(denoiser=KeywordNet(seed=0), conditioning=conditioning, shape=(3, 8, 8))


def misspelt_dict():
    return dict(denoiser=KeywordNet(seed=0), sigma=prompt_sigmas)


def short_schedule():
    return dict(denoiser=TinyNet(seed=0), sigmas=lambda num_steps: prompt_sigmas(num_steps)[1:])


def zero_size_shape():
    return dict(denoiser=TinyNet(seed=0), shape=(3, 8, 0))


class FlowLikeNet(TinyNet):
    """TinyNet declaring a flow's signal scale α(t) = 1 − t (as FlowMatchDenoiser does)."""

    @staticmethod
    def signal_scale(t):
        return 1.0 - t


def flow_like_net():
    return FlowLikeNet(seed=0)

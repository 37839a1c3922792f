"""Adapters that turn other libraries' models into fastguide denoisers (x, sigma[B], labels) -> D(x).

DiffusersDenoiser wraps a diffusers model trained on a discrete VP schedule (ε-, v- or
x0-prediction) the way diffusers' EulerDiscreteScheduler drives it: with σ = √((1−ᾱ)/ᾱ), the
model sees x/√(σ²+1) and the timestep found by interpolating log σ over the training σ table.
"""
import inspect

import torch
from torch import nn

from fastguide import reference

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
COND_KWARGS = ("class_labels", "encoder_hidden_states")
CLASS_LOOKUPS = ("class_embedding", "class_embedder.embedding_table")


def training_sigmas(scheduler):
    """σ_t = √((1−ᾱ_t)/ᾱ_t) for the scheduler's training timesteps t = 0..T−1 (float64, increasing)."""
    alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
    if alphas_cumprod is None:
        raise ValueError(f"scheduler {type(scheduler).__name__} has no alphas_cumprod; DiffusersDenoiser needs a "
                         f"discrete VP scheduler (e.g. EulerDiscreteScheduler, DDIMScheduler)")
    alphas_cumprod = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float32)
    if alphas_cumprod.ndim != 1 or alphas_cumprod.numel() < 2:
        raise ValueError(f"scheduler.alphas_cumprod must be 1-D with at least 2 entries, "
                         f"got shape {tuple(alphas_cumprod.shape)}")
    if not bool(((alphas_cumprod > 0) & (alphas_cumprod <= 1)).all()):
        raise ValueError("scheduler.alphas_cumprod must lie in (0, 1]")
    # Computed in float32 like diffusers, so that σ_min and σ_max are the scheduler's own values.
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).to(torch.float64)


def karras_sigmas(scheduler, num_steps):
    """The σ schedule (float32, ending in 0) of EulerDiscreteScheduler(use_karras_sigmas=True) for num_steps.

    ρ = 7 between the σ of the last and the first timestep that the scheduler's timestep_spacing picks
    (so, like diffusers, num_steps=1 with "linspace" spacing gives σ at timestep 0), or the config's
    sigma_min/sigma_max when set."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    sigmas = training_sigmas(scheduler)
    config = getattr(scheduler, "config", {})
    if _config_get(config, "interpolation_type") == "log_linear":
        sigma_lo, sigma_hi = sigmas[0].item(), sigmas[-1].item()
    else:
        t_lo, t_hi = _spacing_endpoints(config, sigmas.numel(), num_steps)
        sigma_lo, sigma_hi = _interpolate(sigmas, t_lo), _interpolate(sigmas, t_hi)
    sigma_min = _config_value(config, "sigma_min", sigma_lo)
    sigma_max = _config_value(config, "sigma_max", sigma_hi)
    return reference.edm_sigmas(num_steps, sigma_min, sigma_max, 7.0).to(torch.float32)


def _spacing_endpoints(config, num_train, num_steps):
    """The lowest and highest timestep of diffusers' timestep_spacing (Table 2 of arXiv:2305.08891)."""
    spacing = _config_get(config, "timestep_spacing") or "linspace"
    if spacing == "linspace":
        return 0.0, float(num_train - 1) if num_steps > 1 else 0.0
    if spacing == "leading":
        ratio = num_train // num_steps
        offset = float(_config_get(config, "steps_offset") or 0)
        return offset, (num_steps - 1) * ratio + offset
    if spacing == "trailing":
        ratio = num_train / num_steps
        return float(round(num_train - (num_steps - 1) * ratio) - 1), float(num_train - 1)
    raise ValueError(f"scheduler timestep_spacing must be 'linspace', 'leading' or 'trailing', got {spacing!r}")


def _interpolate(sigmas, t):
    """σ at a fractional timestep t, linear between the table's integer timesteps (np.interp)."""
    t = min(max(t, 0.0), sigmas.numel() - 1.0)
    low = min(int(t), sigmas.numel() - 2)
    w = t - low
    return ((1 - w) * sigmas[low] + w * sigmas[low + 1]).item()


def _config_get(config, name):
    """A diffusers config entry (FrozenDict or attribute), None when absent."""
    return config.get(name) if hasattr(config, "get") else getattr(config, name, None)


def _config_value(config, name, default):
    value = _config_get(config, name)
    return default if value is None else float(value)


def sigma_to_timestep(sigma, log_sigmas):
    """The fractional training timestep of σ: log σ interpolated linearly over the log-σ table."""
    log_sigma = torch.log(sigma.to(torch.float64).clamp(min=1e-10))
    # low: the last table entry at or below log σ, kept one short of the end so that high exists.
    low = (log_sigmas[None, :] <= log_sigma[:, None]).sum(dim=1).sub(1).clamp(0, log_sigmas.numel() - 2)
    log_low, log_high = log_sigmas[low], log_sigmas[low + 1]
    w = ((log_low - log_sigma) / (log_low - log_high)).clamp(0, 1)
    return low + w


def _forward_parameters(model):
    try:
        return inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}


def detect_cond_kwarg(model):
    """How labels reach the model: encoder_hidden_states for cross-attention models, else class_labels."""
    parameters = _forward_parameters(model)
    config = getattr(model, "config", {})
    if "encoder_hidden_states" in parameters and _config_get(config, "cross_attention_dim") is not None:
        return "encoder_hidden_states"
    if "class_labels" in parameters:
        return "class_labels"
    if "encoder_hidden_states" in parameters:
        return "encoder_hidden_states"
    return None


class DiffusersDenoiser(nn.Module):
    """D(x; σ, labels) from a diffusers model and its (discrete VP) scheduler.

    labels go to the model as class_labels (class-embedding models; one-hot rows are turned into
    class indices for an nn.Embedding, as in UNet2DModel(num_class_embeds=N) and DiT) or as
    encoder_hidden_states (cross-attention models, cast to the model's dtype),
    detected from the model or set with cond_kwarg.  Learned-variance outputs (2C channels) keep
    their first C channels.  Attributes for samplers and the CLI: sigma_min, sigma_max (training
    range), img_channels, img_resolution, label_dim (number of classes, 0 if none).
    """

    def __init__(self, model, scheduler, *, cond_kwarg=None):
        super().__init__()
        if not callable(model):
            raise TypeError(f"model must be a callable diffusers model, got {type(model).__name__}")
        sigmas = training_sigmas(scheduler)
        config = getattr(scheduler, "config", {})
        self.prediction_type = _config_value_str(config, "prediction_type", "epsilon")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"scheduler prediction_type must be one of {PREDICTION_TYPES}, "
                             f"got {self.prediction_type!r}")
        self.continuous_timesteps = _config_value_str(config, "timestep_type", "discrete") == "continuous"
        if cond_kwarg is None:
            cond_kwarg = detect_cond_kwarg(model)
        elif cond_kwarg not in COND_KWARGS:
            raise ValueError(f"cond_kwarg must be one of {COND_KWARGS} or None, got {cond_kwarg!r}")
        self.model, self.cond_kwarg = model, cond_kwarg
        self.register_buffer("log_sigmas", sigmas.log(), persistent=False)
        self.sigma_min, self.sigma_max = sigmas[0].item(), sigmas[-1].item()
        model_config = getattr(model, "config", {})
        self.img_channels = _config_int(model_config, "in_channels")
        self.img_resolution = _config_int(model_config, "sample_size")
        self.label_dim = (_config_int(model_config, "num_class_embeds")
                          or _config_int(model_config, "num_embeds_ada_norm") or 0)
        self._embeds_classes = _has_class_lookup(model)
        self._passes_return_dict = "return_dict" in _forward_parameters(model)

    def timestep(self, sigma):
        """The model's timestep for each σ in sigma [B] (float64)."""
        if self.continuous_timesteps:
            return 0.25 * sigma.to(torch.float64).log()
        return sigma_to_timestep(sigma, self.log_sigmas.to(sigma.device))

    def forward(self, x, sigma, labels=None):
        sigma = torch.as_tensor(sigma, device=x.device).to(x.dtype).reshape(-1).expand(x.shape[0])
        sigma_b = sigma.reshape(-1, *[1] * (x.ndim - 1))
        model_dtype = getattr(self.model, "dtype", x.dtype)
        x_in = (x / (sigma_b ** 2 + 1) ** 0.5).to(model_dtype)
        t = self.timestep(sigma).to(torch.float32)
        out = self._call_model(x_in, t, labels).to(x.dtype)
        if out.ndim == x.ndim and out.shape[1] == 2 * x.shape[1]:
            out = out[:, :x.shape[1]]
        return self._denoised(x, sigma_b, out)

    def _call_model(self, x_in, t, labels):
        kwargs = {}
        if labels is not None:
            if self.cond_kwarg is None:
                raise ValueError(f"labels were given but {type(self.model).__name__} takes neither class_labels "
                                 f"nor encoder_hidden_states; pass cond_kwarg")
            kwargs[self.cond_kwarg] = self._model_labels(labels)
        if self._passes_return_dict:
            kwargs["return_dict"] = False
        out = self.model(x_in, t, **kwargs)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return getattr(out, "sample", out)

    def _model_labels(self, labels):
        """One-hot float rows become class indices when the model looks classes up in an nn.Embedding."""
        if self.cond_kwarg == "encoder_hidden_states" and labels.is_floating_point():
            return labels.to(getattr(self.model, "dtype", labels.dtype))
        if self.cond_kwarg != "class_labels" or not self._embeds_classes or not labels.is_floating_point():
            return labels
        if labels.ndim != 2 or not bool(((labels == 0) | (labels == 1)).all() and (labels.sum(1) == 1).all()):
            raise ValueError(f"float labels for a class-embedding model must be one-hot rows [B, classes], "
                             f"got shape {tuple(labels.shape)} with other values (pass class indices instead)")
        return labels.argmax(dim=1)

    def _denoised(self, x, sigma_b, out):
        if self.prediction_type == "epsilon":
            return x - sigma_b * out
        if self.prediction_type == "v_prediction":
            # x = x0 + σ·ε with v = α·ε − s·x0 at α = 1/√(σ²+1), s = σ/√(σ²+1), in the model's scaling.
            return x / (sigma_b ** 2 + 1) - out * sigma_b / (sigma_b ** 2 + 1) ** 0.5
        return out


def _has_class_lookup(model):
    """Whether the model embeds class_labels by index (UNet's class_embedding, DiT's class_embedder)."""
    if not isinstance(model, nn.Module):
        return False
    return any(isinstance(module, nn.Embedding) and name.endswith(CLASS_LOOKUPS)
               for name, module in model.named_modules())


def _config_value_str(config, name, default):
    value = _config_get(config, name)
    return default if value is None else str(value)


def _config_int(config, name):
    value = _config_get(config, name)
    if isinstance(value, (tuple, list)):
        value = value[0]
    return None if value is None else int(value)

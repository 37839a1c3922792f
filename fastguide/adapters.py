"""Adapters that turn other libraries' models into fastguide denoisers (x, sigma[B], labels) -> D(x).

DiffusersDenoiser wraps a diffusers model trained on a discrete VP schedule (ε-, v- or
x0-prediction) the way diffusers' EulerDiscreteScheduler drives it: with σ = √((1−ᾱ)/ᾱ), the
model sees x/√(σ²+1) and the timestep found by interpolating log σ over the training σ table.

FlowMatchDenoiser wraps a diffusers flow-matching transformer (SD3, Flux, Wan, ...): on
x_t = (1 − t)·x0 + t·ε the model predicts v = ε − x0, and D = x − t·v, so fastguide's σ is the
flow's t and Euler in σ is the flow-matching Euler step.  flow_sigmas gives the shifted t's of a
FlowMatchEulerDiscreteScheduler.

Conditioning is a tensor or a dict of tensors batched on dim 0 (fastguide.conditioning); a dict
reaches the model as keyword arguments.
"""
import inspect
import math

import numpy as np
import torch
from torch import nn

from fastguide import ops, reference

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
COND_KWARGS = ("class_labels", "encoder_hidden_states")
UNET_RESERVED = ("sample", "hidden_states", "timestep", "return_dict", "added_cond_kwargs")
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

    A tensor of labels goes to the model as class_labels (class-embedding models; one-hot rows are
    turned into class indices for an nn.Embedding, as in UNet2DModel(num_class_embeds=N) and DiT) or
    as encoder_hidden_states (cross-attention models, cast to the model's dtype), detected from the
    model or set with cond_kwarg.  A dict of tensors (or keyword arguments) goes by name; entries the
    forward does not take go into added_cond_kwargs when it takes that (SDXL: {"encoder_hidden_states",
    "text_embeds", "time_ids"}), else they are refused, naming the key.  Learned-variance outputs (2C channels) keep
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
        self._accepted = _accepted_kwargs(model)
        self._passes_return_dict = "return_dict" in _forward_parameters(model)
        self._model_dtype = _ModelDtype(model)

    def timestep(self, sigma):
        """The model's timestep for each σ in sigma [B] (float64)."""
        if self.continuous_timesteps:
            return 0.25 * sigma.to(torch.float64).log()
        return sigma_to_timestep(sigma, self.log_sigmas.to(sigma.device))

    def forward(self, x, sigma, labels=None, **cond):
        """D(x; σ) for conditioning labels (a tensor, sent as cond_kwarg) or keyword arguments cond."""
        model_dtype = self._model_dtype(x.dtype)
        kwargs = self._cond_kwargs(labels, cond, model_dtype)
        sigma = torch.as_tensor(sigma, device=x.device).to(x.dtype).reshape(-1).expand(x.shape[0])
        sigma_b = sigma.reshape(-1, *[1] * (x.ndim - 1))
        x_in = (x / (sigma_b ** 2 + 1) ** 0.5).to(model_dtype)
        t = self.timestep(sigma).to(torch.float32)
        if self._passes_return_dict:
            kwargs["return_dict"] = False
        out = _first_output(self.model(x_in, t, **kwargs)).to(x.dtype)
        if out.ndim == x.ndim and out.shape[1] == 2 * x.shape[1]:
            out = out[:, :x.shape[1]]
        return self._denoised(x, sigma_b, out)

    def _cond_kwargs(self, labels, cond, model_dtype):
        """The model's keyword arguments: a tensor goes to cond_kwarg, a dict's entries by name."""
        if isinstance(labels, torch.Tensor) and self.cond_kwarg is None:
            raise ValueError(f"labels were given but {type(self.model).__name__} takes neither class_labels "
                             f"nor encoder_hidden_states; pass cond_kwarg or a dict of keyword arguments")
        cond = _merge_conditioning(labels, cond, self.cond_kwarg)
        kwargs = _route_conditioning(self._accepted, self.model, cond, UNET_RESERVED, grouped="added_cond_kwargs")
        for key in ("class_labels", "encoder_hidden_states"):
            if key in kwargs:
                kwargs[key] = self._model_labels(key, kwargs[key], model_dtype)
        if "added_cond_kwargs" in kwargs:
            kwargs["added_cond_kwargs"] = {key: _cast(value, model_dtype)
                                           for key, value in kwargs["added_cond_kwargs"].items()}
        return kwargs

    def _model_labels(self, key, labels, model_dtype):
        """encoder_hidden_states in the model's dtype; one-hot float class_labels become class indices when
        the model looks classes up in an nn.Embedding."""
        if key == "encoder_hidden_states":
            return _cast(labels, model_dtype)
        if not self._embeds_classes or not labels.is_floating_point():
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


def _first_output(out):
    """The prediction in a diffusers model's output (a tuple with return_dict=False, or an output object)."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    return getattr(out, "sample", out)


def _cast(value, dtype):
    """A floating-point tensor in dtype (the model's); other tensors as they are."""
    return value.to(dtype) if value.is_floating_point() else value


class _ModelDtype:
    """model.dtype (or a default when the model has none), looked up again only when the dtype of the model's
    first parameter changes (model.half(), .to(...)): diffusers' dtype property walks every submodule,
    ~0.3 ms a call, which per evaluation is a few per cent of a small transformer's time."""

    def __init__(self, model):
        self.model, self.key, self.value, self.known = model, None, None, False

    def __call__(self, default):
        first = next(self.model.parameters(), None) if isinstance(self.model, nn.Module) else None
        key = None if first is None else first.dtype
        if not self.known or key != self.key:
            self.key, self.value, self.known = key, getattr(self.model, "dtype", None), True
        return default if self.value is None else self.value


def _merge_conditioning(labels, cond, tensor_kwarg):
    """One dict of conditioning from labels (None, a tensor sent as tensor_kwarg, or a dict) or keyword arguments."""
    if labels is not None and cond:
        raise TypeError(f"pass conditioning as labels or as keyword arguments, not both (got labels and "
                        f"keyword arguments {sorted(cond)})")
    if isinstance(labels, dict):
        return dict(labels)
    if labels is not None:
        return {tensor_kwarg: labels}
    return dict(cond)


def _accepted_kwargs(model):
    """The names the model's forward takes, or None when it takes any (**kwargs) or cannot be inspected."""
    parameters = _forward_parameters(model)
    if not parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return None
    return frozenset(parameters)


def _route_conditioning(accepted, model, cond, reserved, grouped=None):
    """cond's entries as the model's keyword arguments: by name, or gathered into the dict argument `grouped`
    when the forward does not take the name but takes `grouped`.  A reserved name (set by the adapter) or a
    name the model cannot take (accepted: _accepted_kwargs) is refused, naming the key."""
    kwargs, group = {}, {}
    for key, value in cond.items():
        if key in reserved:
            raise ValueError(f"conditioning key {key!r} is set by the adapter; it cannot be conditioning "
                             f"(reserved: {', '.join(reserved)})")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"conditioning key {key!r} must be a tensor, got {type(value).__name__}")
        if accepted is None or key in accepted:
            kwargs[key] = value
        elif grouped is not None and grouped in accepted:
            group[key] = value
        else:
            raise ValueError(f"conditioning key {key!r} is not an argument of {type(model).__name__}.forward")
    if group:
        kwargs[grouped] = group
    return kwargs


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


# ---------------------------------------------------------------------------------------------------------------
# Flow matching: x_t = (1 − t)·x0 + t·ε, the model predicts v = ε − x0, D = x − t·v.

FLOW_LAYOUTS = ("auto", "plain", "flux")
FLOW_RESERVED = ("hidden_states", "timestep", "img_ids", "txt_ids", "return_dict")


def _flow_config(scheduler):
    """num_train_timesteps of a FlowMatchEulerDiscreteScheduler-like scheduler (t ∈ (0, 1], timestep = t·T)."""
    config = getattr(scheduler, "config", {})
    num_train = _config_get(config, "num_train_timesteps")
    if num_train is None or getattr(scheduler, "alphas_cumprod", None) is not None:
        raise ValueError(f"scheduler {type(scheduler).__name__} is not a flow-matching scheduler (needs "
                         f"FlowMatchEulerDiscreteScheduler; for a VP scheduler use DiffusersDenoiser)")
    if _config_get(config, "invert_sigmas"):
        raise ValueError("scheduler has invert_sigmas=True (t runs from 0 to 1); FlowMatchDenoiser and flow_sigmas "
                         "need t decreasing to 0")
    return int(num_train)


def detect_flow_layout(model):
    """"flux" for models whose forward takes img_ids and txt_ids (packed latents), else "plain"."""
    parameters = _forward_parameters(model)
    return "flux" if "img_ids" in parameters and "txt_ids" in parameters else "plain"


def pack_latents(x):
    """[B, C, H, W] -> [B, (H/2)·(W/2), 4C]: 2×2 patches as tokens, the layout of diffusers' Flux pipeline."""
    batch, channels, height, width = x.shape
    patches = x.reshape(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_latents(tokens, shape):
    """The inverse of pack_latents, back to shape [B, C, H, W]."""
    batch, channels, height, width = shape
    patches = tokens.reshape(batch, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(batch, channels, height, width)


def latent_image_ids(height, width, device, dtype):
    """Flux's position ids of the packed tokens: rows (0, i, j) for the (height × width) token grid."""
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=1).to(dtype)


class FlowMatchDenoiser(nn.Module):
    """D = x − t·v from a diffusers flow-matching transformer and its FlowMatchEulerDiscreteScheduler.

    fastguide's σ is the flow's t (sample with sigmas=flow_sigmas(scheduler, ...)).  The model is called
    with hidden_states, timestep and the conditioning as keyword arguments, the way diffusers' pipelines
    call it, return_dict=False when it takes that:
      layout "plain" (SD3, Wan, HunyuanVideo, ...): hidden_states = x, timestep = t·T, T the scheduler's
        num_train_timesteps (the scheduler's own timesteps);
      layout "flux" (forward takes img_ids and txt_ids): x is packed into 2×2-patch tokens [B, H/2·W/2, 4C],
        img_ids are the token grid's positions, txt_ids zeros [seq, 3] for encoder_hidden_states' seq, and
        timestep = (t·T)/1000 (Flux multiplies by 1000 inside); the velocity is unpacked again.
    fastguide always sees the latent as [B, C, H, W] (for Flux: C = in_channels/4, H and W even), so noise
    is drawn in the shape diffusers' pipelines draw it before packing.
    "auto" picks "flux" when the forward takes img_ids and txt_ids.

    labels: a dict of tensors batched on dim 0, sent as keyword arguments (e.g. encoder_hidden_states,
    pooled_projections; guidance for guidance-distilled Flux), or a tensor, sent as encoder_hidden_states.
    x and floating-point conditioning are cast to the model's dtype; D is returned in x's dtype.
    """

    def __init__(self, model, scheduler, *, layout="auto"):
        super().__init__()
        if not callable(model):
            raise TypeError(f"model must be a callable diffusers transformer, got {type(model).__name__}")
        if layout not in FLOW_LAYOUTS:
            raise ValueError(f"layout must be one of {FLOW_LAYOUTS}, got {layout!r}")
        self.num_train_timesteps = _flow_config(scheduler)
        self.model = model
        self.layout = detect_flow_layout(model) if layout == "auto" else layout
        self._accepted = _accepted_kwargs(model)
        self._passes_return_dict = "return_dict" in _forward_parameters(model)
        self._model_dtype = _ModelDtype(model)
        self.sigma_min = float(getattr(scheduler, "sigma_min", 1.0 / self.num_train_timesteps))
        self.sigma_max = float(getattr(scheduler, "sigma_max", 1.0))
        model_config = getattr(model, "config", {})
        channels = _config_int(model_config, "in_channels")
        self.img_channels = channels // 4 if channels is not None and self.layout == "flux" else channels
        self.img_resolution = _config_int(model_config, "sample_size")
        self.label_dim = 0

    @staticmethod
    def signal_scale(t):
        """α(t) = 1 − t of x_t = (1 − t)·x0 + t·ε: fastguide.sample's DPM-Solver++(2M) uses it."""
        return 1.0 - t

    def forward(self, x, sigma, labels=None, **cond):
        kwargs = _route_conditioning(self._accepted, self.model,
                                     _merge_conditioning(labels, cond, "encoder_hidden_states"), FLOW_RESERVED)
        model_dtype = self._model_dtype(x.dtype)
        kwargs = {key: _cast(value, model_dtype) for key, value in kwargs.items()}
        sigma = torch.as_tensor(sigma, device=x.device).to(x.dtype).reshape(-1).expand(x.shape[0])
        velocity = self.velocity(x, sigma, kwargs, model_dtype).to(x.dtype)
        return x - sigma.reshape(-1, *[1] * (x.ndim - 1)) * velocity

    def velocity(self, x, sigma, kwargs, model_dtype):
        """The model's v at (x, t = sigma [B]) for conditioning kwargs (routed and cast), in model_dtype."""
        timestep = sigma.to(torch.float32) * self.num_train_timesteps  # the scheduler's timestep, float32
        if self._passes_return_dict:
            kwargs["return_dict"] = False
        if self.layout == "plain":
            return _first_output(self.model(hidden_states=x.to(model_dtype), timestep=timestep, **kwargs))
        tokens = self._flux_inputs(x, kwargs, model_dtype)
        out = _first_output(self.model(hidden_states=tokens, timestep=timestep.to(model_dtype) / 1000, **kwargs))
        if out.shape != tokens.shape:
            raise ValueError(f"{type(self.model).__name__} returned shape {tuple(out.shape)} for packed latents of "
                             f"shape {tuple(tokens.shape)}; expected the same")
        return unpack_latents(out, x.shape)

    def _flux_inputs(self, x, kwargs, model_dtype):
        """Packed latents, and img_ids / txt_ids added to kwargs, as diffusers' Flux pipeline makes them."""
        if x.ndim != 4 or x.shape[2] % 2 or x.shape[3] % 2:
            raise ValueError(f"layout 'flux' needs latents [B, C, H, W] with even H and W, got shape {tuple(x.shape)}")
        text = kwargs.get("encoder_hidden_states")
        if text is None or text.ndim != 3:
            raise ValueError("layout 'flux' needs conditioning key 'encoder_hidden_states' [B, seq, dim] "
                             "(its seq gives txt_ids)")
        kwargs["img_ids"] = latent_image_ids(x.shape[2] // 2, x.shape[3] // 2, x.device, model_dtype)
        kwargs["txt_ids"] = torch.zeros(text.shape[1], 3, device=x.device, dtype=model_dtype)
        return pack_latents(x).to(model_dtype)


def flow_shift_mu(scheduler, image_seq_len):
    """The dynamic shift mu for image_seq_len tokens: linear between (base_image_seq_len, base_shift) and
    (max_image_seq_len, max_shift) of the scheduler's config, as diffusers' SD3 and Flux pipelines compute it.
    (Flux: image_seq_len = (H/2)·(W/2) of the latent; SD3: (H/patch)·(W/patch).)"""
    if isinstance(image_seq_len, bool) or not isinstance(image_seq_len, int) or image_seq_len < 1:
        raise ValueError(f"image_seq_len must be an integer >= 1, got {image_seq_len!r}")
    config = getattr(scheduler, "config", {})
    base_len, max_len = (_config_value(config, name, default) for name, default in
                         (("base_image_seq_len", 256), ("max_image_seq_len", 4096)))
    base_shift, max_shift = (_config_value(config, name, default) for name, default in
                             (("base_shift", 0.5), ("max_shift", 1.15)))
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * slope + (base_shift - slope * base_len)


def flow_sigmas(scheduler, num_steps, *, mu=None, sigmas=None):
    """The t's of FlowMatchEulerDiscreteScheduler.set_timesteps(num_steps, mu=mu, sigmas=sigmas), float32,
    ending in 0 (computed here, equal to the scheduler's sigmas).

    The unshifted t's: sigmas (the Flux pipeline passes np.linspace(1, 1/num_steps, num_steps)), or by
    default num_steps points evenly from the scheduler's sigma_max to its sigma_min.  Then the shift:
    static, t' = s·t/(1 + (s − 1)·t) with s = scheduler.shift; or dynamic (config use_dynamic_shifting),
    t' = e^mu/(e^mu + 1/t − 1) ("exponential") or mu/(mu + 1/t − 1) ("linear"), mu required
    (see flow_shift_mu); then the config's shift_terminal stretch and Karras / exponential spacing.
    The first t is 1 for the default and the Flux t's (with any shift, terminal or respacing); when given
    sigmas start below 1, diffusers still starts from unscaled noise while fastguide.sample starts from
    noise·t_0: pass noise / t_0 to start where diffusers does.
    """
    num_train = _flow_config(scheduler)
    config = scheduler.config
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    if _config_get(config, "use_beta_sigmas"):
        raise ValueError("scheduler config use_beta_sigmas is not supported by flow_sigmas")
    t = _unshifted(scheduler, num_train, num_steps, sigmas)
    t = _shifted(scheduler, t, mu)
    terminal = _config_get(config, "shift_terminal")
    if terminal:
        if num_steps < 2:
            raise ValueError("num_steps must be >= 2 with the scheduler's shift_terminal (one step cannot end there)")
        t = 1 - (1 - t) / ((1 - t[-1]) / (1 - terminal))
    t_first, t_last = float(t[0]), float(t[-1])  # the respacings run in float64 between the ends
    if _config_get(config, "use_karras_sigmas"):
        ramp = np.linspace(0, 1, num_steps)
        t = (t_first ** (1 / 7.0) + ramp * (t_last ** (1 / 7.0) - t_first ** (1 / 7.0))) ** 7.0
    elif _config_get(config, "use_exponential_sigmas"):
        t = np.exp(np.linspace(math.log(t_first), math.log(t_last), num_steps))
    t = torch.from_numpy(np.asarray(t)).to(torch.float32)
    return torch.cat([t, t.new_zeros(1)])


def _unshifted(scheduler, num_train, num_steps, sigmas):
    """The t's before the shift: float64 from the scheduler's range, float32 when given (as diffusers keeps them)."""
    if sigmas is None:
        t_max, t_min = float(scheduler.sigma_max), float(scheduler.sigma_min)
        return np.linspace(t_max * num_train, t_min * num_train, num_steps) / num_train
    t = np.asarray(sigmas.detach().cpu() if isinstance(sigmas, torch.Tensor) else sigmas, dtype=np.float32)
    if t.shape != (num_steps,):
        raise ValueError(f"sigmas must hold num_steps={num_steps} unshifted t's, got shape {t.shape}")
    if not bool(np.all((t > 0) & (t <= 1))):
        raise ValueError("sigmas (the unshifted t's) must lie in (0, 1]")
    return t


def _shifted(scheduler, t, mu):
    config = scheduler.config
    if not _config_get(config, "use_dynamic_shifting"):
        if mu is not None:
            raise ValueError("mu applies to a scheduler with use_dynamic_shifting=True; this one has a static shift "
                             f"({scheduler.shift})")
        shift = float(getattr(scheduler, "shift", _config_value(config, "shift", 1.0)))
        return shift * t / (1 + (shift - 1) * t)
    if mu is None:
        raise ValueError("the scheduler uses dynamic shifting: pass mu (e.g. flow_shift_mu(scheduler, image_seq_len))")
    mu = ops.check_real("mu", mu)
    if _config_get(config, "time_shift_type") == "linear":
        return mu / (mu + (1 / t - 1))
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))

"""The toy experiment's energy-based MLP denoiser (a fixed contract shared with the fused kernels).

log p(x; σ) = gain·mean(y²)/σ − ½‖x·c_in‖², y an MLP of [x·c_in, ln σ/4, 1] built from
magnitude-preserving linear layers (rows normalised to unit norm) and SiLU/0.596;
score = ∂log p/∂x by autograd and D = x + σ²·score.  With gain = 0, D = c_skip·x.
This is EDM2's toy model (toy_example.py of NVlabs/edm2): the same layers, initialisation order,
normalisation and preconditioning, re-implemented.
"""
import os

import torch
from torch import nn

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
SHIPPED = ("main", "guide_auto", "guide_cfg")
SILU_SCALE = 0.596             # 1/0.596 restores unit magnitude after SiLU of unit-variance input


def normalized_rows(weight, eps=1e-4):
    """EDM2's magnitude-preserving weight w / (eps·√fan_in + ‖row‖₂): each output row at (almost
    exactly) unit norm."""
    return weight / (eps * weight.shape[1] ** 0.5 + weight.norm(dim=1, keepdim=True))


class ToyModel(nn.Module):
    def __init__(self, hidden=64, num_layers=4, sigma_data=0.5):
        super().__init__()
        if hidden < 1 or num_layers < 1:
            raise ValueError(f"hidden and num_layers must be >= 1, got {hidden}, {num_layers}")
        shapes = [(hidden, 4)] + [(hidden, hidden)] * (num_layers - 1) + [(hidden, hidden)]
        self.weights = nn.ParameterList([nn.Parameter(torch.randn(shape)) for shape in shapes])
        self.gain = nn.Parameter(torch.zeros([]))
        self.hidden, self.num_layers, self.sigma_data = hidden, num_layers, float(sigma_data)

    def _sigma(self, sigma, x):
        if not isinstance(sigma, torch.Tensor):
            sigma = torch.tensor(float(sigma))
        if sigma.ndim > 1 or (sigma.ndim == 1 and sigma.shape[0] not in (1, x.shape[0])):
            raise ValueError(f"sigma must be 0-dim, [1] or [{x.shape[0]}], got shape {tuple(sigma.shape)}")
        return sigma.to(device=x.device, dtype=x.dtype).reshape(-1).expand(x.shape[0])

    def _check(self, x):
        if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != 2:
            raise ValueError(f"x must be a [N, 2] tensor, got {getattr(x, 'shape', type(x).__name__)}")

    def logp(self, x, sigma):
        """Unnormalised log-density [N] of the noised data, as the model sees it."""
        self._check(x)
        sigma = self._sigma(sigma, x)
        c_in = 1 / torch.sqrt(self.sigma_data ** 2 + sigma ** 2)
        x_scaled = x * c_in[:, None]
        ones = torch.ones_like(sigma)
        h = torch.cat([x_scaled, (torch.log(sigma) / 4)[:, None], ones[:, None]], dim=1)
        for weight in self.weights[:-1]:
            h = torch.nn.functional.silu(h @ normalized_rows(weight.to(x.dtype)).T) / SILU_SCALE
        y = h @ normalized_rows(self.weights[-1].to(x.dtype)).T
        return self.gain.to(x.dtype) * y.square().mean(dim=1) / sigma - 0.5 * x_scaled.square().sum(dim=1)

    def score(self, x, sigma, create_graph=False):
        """∂log p/∂x [N,2] by autograd (create_graph=True to train through it)."""
        with torch.enable_grad():
            x_var = x.detach().requires_grad_(True)
            logp = self.logp(x_var, sigma)
            (score,) = torch.autograd.grad(logp.sum(), x_var, create_graph=create_graph)
        return score

    def forward(self, x, sigma, labels=None):
        """D(x; σ) = x + σ²·score, detached, x's dtype; labels are ignored (one network per class)."""
        self._check(x)
        sigma = self._sigma(sigma, x)
        score = self.score(x, sigma)
        return (x + sigma[:, None] ** 2 * score).detach()

    @torch.no_grad()
    def normalize_weights(self):
        """EDM2's forced weight normalisation: raw rows w → √fan_in·normalized_rows(w), norm ≈ √fan_in
        (the effective weights change only through eps, by ~1e-4)."""
        for weight in self.weights:
            weight.copy_(normalized_rows(weight) * weight.shape[1] ** 0.5)

    def effective_weights(self):
        """[w0 (H×4), w1.., w_out (H×H)] as detached contiguous float32 tensors."""
        return [normalized_rows(w.detach()).float().contiguous() for w in self.weights]

    def gain_value(self):
        return float(self.gain.detach())


def load_model(name="main"):
    """A shipped model ("main", "guide_auto", "guide_cfg") in eval mode, float32."""
    if name not in SHIPPED:
        raise ValueError(f"name must be one of {SHIPPED}, got {name!r}")
    return load_file(os.path.join(WEIGHTS_DIR, f"{name}.safetensors"))


def load_file(path):
    """A ToyModel from a safetensors file written by save_file."""
    from safetensors.torch import load_file as read_tensors
    from safetensors import safe_open
    with safe_open(path, framework="pt") as handle:
        meta = handle.metadata() or {}
    tensors = read_tensors(path)
    num_layers = sum(1 for key in tensors if key.startswith("weights.")) - 1
    hidden = tensors["weights.0"].shape[0]
    model = ToyModel(hidden, num_layers, float(meta.get("sigma_data", 0.5)))
    model.load_state_dict(tensors)
    return model.float().eval()


def save_file(model, path, metadata=None):
    """Writes the model's parameters (float32) and metadata to a safetensors file."""
    from safetensors.torch import save_file as write_tensors
    tensors = {key: value.detach().float().contiguous() for key, value in model.state_dict().items()}
    meta = {"sigma_data": str(model.sigma_data), **{k: str(v) for k, v in (metadata or {}).items()}}
    write_tensors(tensors, path, metadata=meta)

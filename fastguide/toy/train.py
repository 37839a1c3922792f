"""Training of the toy models by exact score matching against the ground-truth mixture.

EDM2's toy protocol (toy_example.py of NVlabs/edm2): loss σ²·mean over the 2 coordinates of
(score_model(x; σ) − score_true(x; σ))², averaged over the batch (4096), x = y + σ·n with y drawn
exactly from the mixture and ln σ ~ N(−2.3, 1.5²); Adam(0.9, 0.99) with lr 1e-2/√max(t/512, 1);
forced weight normalisation before each step; the returned model is the power-function EMA
(std 0.010) of the trained one, updated after each step.
The ground-truth score (4096 points × 1016 components per step) runs in fastguide_toy::mixture_score.
"""
import copy
import math
import time

import numpy as np
import torch

from fastguide.toy.extension import has_cpu_kernel
from fastguide.toy.mixture import tree_mixture
from fastguide.toy.model import SILU_SCALE, ToyModel, normalized_rows

# The shipped models: name -> (classes, hidden, iterations).
RECIPES = {
    "main": ("A", 64, 4096),
    "guide_auto": ("A", 32, 512),
    "guide_cfg": ("AB", 32, 512),
}
P_MEAN, P_STD = -2.3, 1.5


def ema_exponent(std):
    """γ of the power-function EMA whose relative std is `std`: the real root of
    σ_rel² = (γ+1)/((γ+2)²(γ+3)), i.e. σ_rel²·(γ³ + 7γ² + 16γ + 12) − γ − 1 = 0."""
    if not 0 < std < math.sqrt(1 / 12):
        raise ValueError(f"ema_std must be in (0, {math.sqrt(1 / 12):.4f}), got {std}")
    var = std * std
    roots = np.roots([var, 7 * var, 16 * var - 1, 12 * var - 1])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9 and r.real > -1))


class PowerEMA:
    """θ_ema ← β_t·θ_ema + (1 − β_t)·θ with β_t = (1 − 1/t)^(γ+1) after step t (t = 1, 2, ...)."""

    def __init__(self, model, std):
        self.gamma = ema_exponent(std)
        self.model = copy.deepcopy(model).eval()
        for param in self.model.parameters():
            param.requires_grad_(False)

    @torch.no_grad()
    def update(self, model, step):
        beta = (1 - 1 / step) ** (self.gamma + 1)
        for ema_param, param in zip(self.model.parameters(), model.parameters()):
            ema_param.lerp_(param.detach(), 1 - beta)


def learning_rate(step, lr=1e-2, lr_ref=512):
    """lr / √max(t/t_ref, 1) for the 0-based step t."""
    return lr / math.sqrt(max(step / lr_ref, 1.0))


def sample_batch(mixture, batch, generator):
    """(x, sigma, target score) for one training batch."""
    y = mixture.sample(batch, generator=generator)
    sigma = torch.exp(torch.randn(batch, generator=generator) * P_STD + P_MEAN)
    x = y + sigma[:, None] * torch.randn(batch, 2, generator=generator)
    return x, sigma, mixture.score(x, sigma)


def score_matching_loss(model, x, sigma, target):
    """Mean over the batch and the 2 coordinates of (σ·(score_model − score_true))²."""
    score = model.score(x, sigma, create_graph=True)
    return (sigma[:, None] * (score - target)).square().mean()


def silu_derivatives(z):
    """φ(z), φ'(z), φ''(z) for φ = silu/0.596 (one fused pass on CPU when fastguide.toy._C is built)."""
    if z.device.type == "cpu" and z.dtype in (torch.float32, torch.float64) and has_cpu_kernel("silu_derivatives"):
        return torch.ops.fastguide_toy.silu_derivatives(z)
    return silu_derivatives_reference(z)


def silu_derivatives_reference(z):
    """φ(z), φ'(z), φ''(z) for φ = silu/0.596 in plain PyTorch."""
    sig = torch.sigmoid(z)
    one_minus = 1 - sig
    phi = z * sig / SILU_SCALE
    d_phi = sig * (1 + z * one_minus) / SILU_SCALE
    dd_phi = sig * one_minus * (2 + z * (one_minus - sig)) / SILU_SCALE
    return phi, d_phi, dd_phi


def loss_and_grads(w_eff, gain, x, sigma, target, sigma_data=0.5):
    """Score-matching loss and its gradients w.r.t. the effective weights and the gain, by hand.

    Forward z_0 = u·w_0ᵀ, s_l = φ(z_l), z_l = s_{l−1}·w_lᵀ, y = s_{L−1}·w_outᵀ; the score is the
    backward pass δy = k·y (k = 2·gain/(H·σ)), δs_{L−1} = δy·w_out, δz_l = δs_l·φ'(z_l),
    δs_{l−1} = δz_l·w_l, score = c_in·(δz_0·w_0)[:, :2] − c_in²·x.  The loss gradient runs a
    tangent pass through that backward pass (a_l = ∂L/∂δz_l, forward in l) and then the ordinary
    backward pass through the forward chain, with the φ'' terms of the first joining the second.
    Returns (loss, [∂L/∂w_l], ∂L/∂gain); about 24 N×H×H products instead of autograd's 30.
    """
    n, hidden = x.shape[0], w_eff[-1].shape[0]
    hidden_w, w_out = w_eff[:-1], w_eff[-1]
    c_in = torch.rsqrt(sigma_data ** 2 + sigma * sigma)
    u = torch.cat([x * c_in[:, None], (torch.log(sigma) / 4)[:, None], torch.ones_like(sigma)[:, None]], 1)
    inputs, d_phis, dd_phis = [u], [], []
    h = u
    for w in hidden_w:
        phi, d_phi, dd_phi = silu_derivatives(h @ w.T)
        inputs.append(phi)
        d_phis.append(d_phi)
        dd_phis.append(dd_phi)
        h = phi
    y = h @ w_out.T
    k = (2 * gain / hidden) / sigma
    delta_y = y * k[:, None]
    delta_z = [None] * len(hidden_w)
    delta_s = delta_y @ w_out
    for layer in reversed(range(len(hidden_w))):
        delta_z[layer] = delta_s * d_phis[layer]
        if layer > 0:
            delta_s_prev = delta_z[layer] @ hidden_w[layer]
            dd_phis[layer].mul_(delta_s)          # keep δs_l·φ''(z_l) for the tangent pass
            delta_s = delta_s_prev
        else:
            dd_phis[layer].mul_(delta_s)
    delta_u = delta_z[0] @ hidden_w[0][:, :2]
    score = c_in[:, None] * delta_u - (c_in * c_in)[:, None] * x
    resid = score - target
    weight = sigma * sigma
    loss = (weight[:, None] * resid * resid).sum() / (2 * n)
    grad_score = resid * (weight / n)[:, None]
    grads = [torch.zeros_like(w) for w in w_eff]
    # Tangent pass: a_l = ∂L/∂δz_l, b_l = ∂L/∂δs_l = a_l·φ'(z_l); second-order terms zz_l = a_l·δs_l·φ''(z_l).
    grad_delta_u = grad_score * c_in[:, None]
    grads[0][:, :2] = delta_z[0].T @ grad_delta_u
    a = grad_delta_u @ hidden_w[0][:, :2].T
    second_order = []
    for layer in range(len(hidden_w)):
        b = a * d_phis[layer]
        second_order.append(a.mul_(dd_phis[layer]))
        if layer + 1 < len(hidden_w):
            a = b @ hidden_w[layer + 1].T
            grads[layer + 1] += delta_z[layer + 1].T @ b
    grad_delta_y = b @ w_out.T
    grads[-1] += delta_y.T @ b
    grad_gain = ((y * grad_delta_y).sum(1) * (2 / hidden / sigma)).sum()
    # Backward pass through the forward chain.
    grad_y = grad_delta_y.mul_(k[:, None])
    grads[-1] += grad_y.T @ inputs[-1]
    grad_s = grad_y @ w_out
    for layer in reversed(range(len(hidden_w))):
        grad_z = grad_s.mul_(d_phis[layer]).add_(second_order[layer])
        grads[layer] += grad_z.T @ inputs[layer]
        if layer > 0:
            grad_s = grad_z @ hidden_w[layer]
    return loss, grads, grad_gain


def training_step(model, optimizer, x, sigma, target):
    """Forced weight normalisation, then one Adam step on the hand-written gradients; returns the loss."""
    model.normalize_weights()
    optimizer.zero_grad(set_to_none=True)
    w_eff = [normalized_rows(w) for w in model.weights]
    loss, grads, grad_gain = loss_and_grads([w.detach() for w in w_eff], model.gain.detach(), x, sigma, target,
                                            model.sigma_data)
    torch.autograd.backward(w_eff, grads)     # through the (tiny) row normalisation
    model.gain.grad = grad_gain.reshape(model.gain.shape)
    optimizer.step()
    return loss


def train(classes="A", hidden=64, num_layers=4, iterations=4096, *, batch=4096, lr=1e-2, lr_ref=512,
          ema_std=0.010, seed=0, log=None, log_every=256):
    """Trains one toy model; returns (ema_model, raw_model, losses [iterations])."""
    for name, value in (("hidden", hidden), ("num_layers", num_layers), ("iterations", iterations), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    mixture = tree_mixture(classes)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = ToyModel(hidden, num_layers)          # normalised by the first step (β_1 = 0 discards the EMA's start)
    ema = PowerEMA(model, ema_std)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.99))
    losses = torch.empty(iterations)
    start = time.perf_counter()
    for step in range(iterations):
        x, sigma, target = sample_batch(mixture, batch, generator)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, lr, lr_ref)
        loss = training_step(model, optimizer, x, sigma, target)
        ema.update(model, step + 1)
        losses[step] = loss.detach()
        if log is not None and ((step + 1) % log_every == 0 or step + 1 == iterations):
            log(f"{classes} h{hidden}: step {step + 1}/{iterations}  loss {losses[max(0, step + 1 - log_every):step + 1].mean():.4f}"
                f"  {time.perf_counter() - start:.1f}s")
    return ema.model, model.eval(), losses


def train_shipped(name, iterations=None, **kwargs):
    """Trains a shipped model by its recipe (optionally with another iteration count)."""
    classes, hidden, default_iterations = RECIPES[name]
    return train(classes, hidden, 4, iterations or default_iterations, **kwargs)

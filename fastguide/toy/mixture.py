"""The ground truth of the toy experiment: the tree-shaped 2D Gaussian mixture of
"Guiding a Diffusion Model with a Bad Version of Itself" (Karras et al. 2024), built from the
paper's published parameters, with its exact noised log-density, score, denoiser and samples.

Noising a mixture by N(0, σ²I) keeps it a mixture: component k becomes N(μ_k, Σ_k + σ²I).
The score is the responsibility-weighted sum of the component scores −(Σ_k + σ²I)⁻¹(x − μ_k);
it runs in the fused kernel fastguide_toy::mixture_score when fastguide.toy._C is built, else in PyTorch.
"""
import math
import numbers

import numpy as np
import torch

from fastguide.toy.extension import has_cpu_kernel

SIGMA_DATA = 0.5
DEPTH = 7                      # levels 0..6: 127 branches per class
COMPONENTS_PER_BRANCH = 8
SEED = 2
ORIGIN = np.array([0.0030, 0.0325])
SCALE = np.array([1.3136, 1.3844])
START_ANGLES = {"A": math.pi / 4, "B": 5 * math.pi / 4}
_CHUNK = 2048                  # points per block in the PyTorch path (bounds the [N, K] temporaries)


def _grow_tree(rnd, start_angle):
    """Components (means, covs, weights) of one class's tree, drawn from RandomState `rnd`."""
    means, covs, weights = [], [], []
    t_along = np.linspace(0.07, 0.93, COMPONENTS_PER_BRANCH)

    def branch(depth, start, angle):
        if depth >= DEPTH:
            return
        length = 0.292 * 0.8 ** depth * (1 + 0.2 * rnd.randn())
        thickness = 0.2 * 0.8 ** depth / length
        size = SCALE * length * 0.06
        u = np.array([math.cos(angle), math.sin(angle)])
        along = np.outer(u, u)
        cov = (along + thickness ** 2 * (np.eye(2) - along)) * np.outer(size, size)
        for t in t_along:
            means.append(ORIGIN + SCALE * (start + t * length * u))
            covs.append(cov)
            weights.append(length * 0.5 ** depth)
        end = start + length * u
        for sign in (1.0, -1.0):
            branch(depth + 1, end, angle + sign * 0.7 ** depth * (1 + 0.2 * rnd.randn()))

    branch(0, np.zeros(2), start_angle)
    return np.array(means), np.array(covs), np.array(weights)


def _tree_components():
    """{class: (means, covs, weights)} for A and B, both drawn in order from one RandomState(2)."""
    rnd = np.random.RandomState(SEED)
    return {name: _grow_tree(rnd, START_ANGLES[name]) for name in ("A", "B")}


def tree_mixture(classes="A"):
    """The paper's mixture for classes "A", "B" or "AB" (1016 components per class)."""
    if classes not in ("A", "B", "AB"):
        raise ValueError(f"classes must be 'A', 'B' or 'AB', got {classes!r}")
    trees = _tree_components()
    parts = [trees[name] for name in classes]
    means, covs, weights = (np.concatenate([p[i] for p in parts]) for i in range(3))
    return GaussianMixture(torch.from_numpy(means), torch.from_numpy(covs), torch.from_numpy(weights))


def _sigma_vector(sigma, x):
    """σ as a [N] tensor of x's dtype from a float, a 0-dim/[1] tensor or a [N] tensor."""
    n = x.shape[0]
    if isinstance(sigma, torch.Tensor):
        if sigma.ndim > 1 or (sigma.ndim == 1 and sigma.shape[0] not in (1, n)):
            raise ValueError(f"sigma must be a float, a 0-dim/[1] tensor or a [{n}] tensor, got shape {tuple(sigma.shape)}")
        return sigma.to(device=x.device, dtype=x.dtype).reshape(-1).expand(n).contiguous()
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real):
        raise TypeError(f"sigma must be a float or a tensor, got {type(sigma).__name__}")
    return torch.full((n,), float(sigma), dtype=x.dtype, device=x.device)


def _check_points(x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"x must have shape [N, 2], got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")


def _use_kernel(x):
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and has_cpu_kernel("mixture_score")


def score_and_logp_reference(x, sigma, means, covs, log_weights, dtype=torch.float64):
    """(score [N,2], logp [N]) of the noised mixture in plain PyTorch (in `dtype`); sigma is a [N] tensor."""
    x, sigma = x.to(dtype), sigma.to(dtype)
    means, covs, log_weights = (t.to(x.device, dtype) for t in (means, covs, log_weights))
    scores, logps = [], []
    for lo in range(0, x.shape[0], _CHUNK):
        var = sigma[lo:lo + _CHUNK, None] ** 2                       # [n,1]
        a, b, d = covs[:, 0, 0] + var, covs[:, 0, 1], covs[:, 1, 1] + var   # [n,K]
        det = a * d - b * b
        diff = x[lo:lo + _CHUNK, None, :] - means                      # [n,K,2]
        dx, dy = diff[..., 0], diff[..., 1]
        quad = (d * dx * dx - 2 * b * dx * dy + a * dy * dy) / det
        logits = log_weights - 0.5 * quad - 0.5 * torch.log(det) - math.log(2 * math.pi)
        logp = torch.logsumexp(logits, dim=1)
        resp = torch.exp(logits - logp[:, None])
        grad_x = -(d * dx - b * dy) / det                              # −(Σ+σ²I)⁻¹(x−μ)
        grad_y = -(a * dy - b * dx) / det
        scores.append(torch.stack([(resp * grad_x).sum(1), (resp * grad_y).sum(1)], dim=1))
        logps.append(logp)
    return torch.cat(scores), torch.cat(logps)


class GaussianMixture:
    """A 2D Gaussian mixture (means [K,2], covs [K,2,2], weights [K], float64), itself a denoiser."""

    def __init__(self, means, covs, weights):
        self.means = means.to(torch.float64)
        self.covs = covs.to(torch.float64)
        self.weights = (weights / weights.sum()).to(torch.float64)
        self._log_weights = torch.log(self.weights)
        self._chol = torch.linalg.cholesky(self.covs)
        self._cdf = torch.cumsum(self.weights, 0)

    def __len__(self):
        return self.means.shape[0]

    def _score_logp(self, x, sigma):
        _check_points(x)
        sigma = _sigma_vector(sigma, x)
        if _use_kernel(x):
            params = [t.to(x.dtype) for t in (self.means, self.covs, self._log_weights)]
            return torch.ops.fastguide_toy.mixture_score(x.contiguous(), sigma, *params)
        score, logp = score_and_logp_reference(x, sigma, self.means, self.covs, self._log_weights)
        return score.to(x.dtype), logp.to(x.dtype)

    def logp(self, x, sigma=0.0):
        """Exact normalised log-density [N] of the mixture noised to σ."""
        return self._score_logp(x, sigma)[1]

    def score(self, x, sigma):
        """∇ₓ log p(x; σ), [N,2]."""
        return self._score_logp(x, sigma)[0]

    def denoise(self, x, sigma):
        """E[y | x] = x + σ²·score (Tweedie's formula), [N,2]."""
        score = self.score(x, sigma)
        sigma = _sigma_vector(sigma, x)
        return x + sigma[:, None] ** 2 * score

    def __call__(self, x, sigma, labels=None):
        return self.denoise(x, sigma)

    def sample(self, n, *, generator=None, sigma=0.0):
        """n exact draws [n,2] float32 of the mixture (noised to σ when sigma > 0)."""
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise ValueError(f"n must be a non-negative integer, got {n!r}")
        if isinstance(generator, numbers.Integral):
            generator = torch.Generator().manual_seed(int(generator))
        elif generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be None, an int seed or a torch.Generator, got {type(generator).__name__}")
        # Inverse-CDF component choice (exact, and far faster than torch.multinomial).
        uniform = torch.rand(n, dtype=torch.float64, generator=generator) * self._cdf[-1]
        index = torch.searchsorted(self._cdf, uniform, right=True).clamp_(max=len(self) - 1)
        z = torch.randn(n, 2, dtype=torch.float64, generator=generator)
        y = self.means[index] + (self._chol[index] @ z[:, :, None])[:, :, 0]
        if float(sigma) > 0:
            y = y + float(sigma) * torch.randn(n, 2, dtype=torch.float64, generator=generator)
        return y.float()

"""The ground truth of the toy experiment: the tree-shaped 2D Gaussian mixtures of classes A, B
and AB of EDM2's toy example ("Guiding a Diffusion Model with a Bad Version of Itself", Karras et
al. 2024; toy_example.py of NVlabs/edm2), re-implemented from its published construction and
constants, with the exact noised log-density, score, denoiser and samples.

The construction (EDM2's facts).  One numpy RandomState(2) grows class A's tree (trunk angle π/4),
then class B's (5π/4), both from ORIGIN.  A branch at depth d = 0..6 starting at pos with angle a
has length ℓ = 0.292·0.8^d·(1 + 0.2·n) and thickness 0.2·0.8^d/ℓ; it is 8 components at
t = 0.07 .. 0.93 (evenly spaced) with mean (pos + t·ℓ·u)·SCALE, u = (cos a, sin a), covariance
(uuᵀ + thickness²·(I − uuᵀ))·(s sᵀ) with s = SCALE·ℓ·0.06 (element-wise), and weight ℓ·0.5^d;
then its two children start at its end with angles a ± 0.7^d·(1 + 0.2·n), the + child's whole
subtree first (n: the next standard normal draw).

The precision (also EDM2's).  EDM2 holds a mixture in float32: the weights normalised (in float64)
and then rounded, the means and covariances rounded, and each covariance used through its float32
eigendecomposition Q diag(λ) Qᵀ — noised to σ it is Q diag(λ + σ²) Qᵀ with precision
Q diag(1/(λ + σ²)) Qᵀ and determinant Π(λ + σ²).  tree_mixture is that mixture exactly: the same
float32 values, evaluated in float64 (in the same eigen form), which reproduces EDM2's own float64
evaluation to ~1e-13 (tests/test_toy_mixture.py).

Noising a mixture by N(0, σ²I) keeps it a mixture; the score is the responsibility-weighted sum of
the component scores.  It runs in the fused kernel fastguide_toy::mixture_score when
fastguide.toy._C is built, else in PyTorch.
"""
import math
import numbers

import numpy as np
import torch

from fastguide.toy.extension import has_cpu_kernel

SIGMA_DATA = 0.5
CLASSES = ("A", "B", "AB")
DEPTH = 7                      # levels 0..6: 127 branches per class
COMPONENTS_PER_BRANCH = 8
SEED = 2
ORIGIN = np.array([0.0030, 0.0325])         # where both trunks start (before scaling)
SCALE = np.array([1.3136, 1.3844])
START_ANGLES = {"A": math.pi / 4, "B": 5 * math.pi / 4}
_CHUNK = 2048                  # points per block in the PyTorch path (bounds the [N, K] temporaries)


def _grow_tree(rnd, start_angle):
    """Components (means, covs, weights) of one class's tree in float64, drawn from RandomState `rnd`."""
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
            means.append((start + t * length * u) * SCALE)
            covs.append(cov)
            weights.append(length * 0.5 ** depth)
        end = start + length * u
        for sign in (1.0, -1.0):
            branch(depth + 1, end, angle + sign * 0.7 ** depth * (1 + 0.2 * rnd.randn()))

    branch(0, ORIGIN, start_angle)
    return np.array(means), np.array(covs), np.array(weights)


def tree_components(classes="A"):
    """(means [K,2], covs [K,2,2], weights [K]) of the classes' trees as constructed, float64 numpy
    (the weights not normalised); both trees are always drawn, A first, from one RandomState(2)."""
    _check_classes(classes)
    rnd = np.random.RandomState(SEED)
    trees = {name: _grow_tree(rnd, START_ANGLES[name]) for name in ("A", "B")}
    return tuple(np.concatenate([trees[name][i] for name in classes]) for i in range(3))


def _check_classes(classes):
    if classes not in CLASSES:
        raise ValueError(f"classes must be one of {CLASSES}, got {classes!r}")


def tree_mixture(classes="A"):
    """EDM2's ground-truth mixture for classes "A", "B" or "AB" (1016 components per class), with
    the parameters EDM2 holds (float32 values, covariances by their float32 eigendecomposition)."""
    means, covs, weights = tree_components(classes)
    eigenvalues, eigenvectors = torch.linalg.eigh(torch.from_numpy(covs).float())
    return GaussianMixture(torch.from_numpy(means).float(), eigenvalues, eigenvectors,
                           torch.from_numpy(weights / weights.sum()).float())


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


def score_and_logp_reference(x, sigma, means, eigenvalues, eigenvectors, log_weights, dtype=torch.float64):
    """(score [N,2], logp [N]) of the noised mixture in plain PyTorch (in `dtype`); sigma is a [N] tensor.

    Component k noised to σ: N(μ_k, Q_k diag(λ_k + σ²) Q_kᵀ), precision Q_k diag(1/(λ_k + σ²)) Q_kᵀ."""
    x, sigma = x.to(dtype), sigma.to(dtype)
    means, eigenvalues, eigenvectors, log_weights = (t.to(x.device, dtype)
                                                     for t in (means, eigenvalues, eigenvectors, log_weights))
    scores, logps = [], []
    for lo in range(0, x.shape[0], _CHUNK):
        noised = eigenvalues + sigma[lo:lo + _CHUNK, None, None] ** 2            # [n,K,2]
        diff = x[lo:lo + _CHUNK, None, :] - means                                # r = x − μ: [n,K,2]
        projected = torch.einsum("kij,nki->nkj", eigenvectors, diff) / noised    # diag(1/l)·Qᵀr
        precision_r = torch.einsum("kij,nkj->nki", eigenvectors, projected)      # P r
        quad = (diff * precision_r).sum(-1)
        logits = log_weights - 0.5 * quad - 0.5 * torch.log(noised.prod(-1)) - math.log(2 * math.pi)
        logp = torch.logsumexp(logits, dim=1)
        resp = torch.exp(logits - logp[:, None])
        scores.append(-(resp[..., None] * precision_r).sum(1))
        logps.append(logp)
    return torch.cat(scores), torch.cat(logps)


class GaussianMixture:
    """A 2D Gaussian mixture, itself a denoiser: means [K,2], the covariances by their
    eigendecompositions Σ_k = Q_k diag(λ_k) Q_kᵀ (eigenvalues [K,2] > 0, eigenvectors [K,2,2], the
    columns of Q_k) and weights [K] summing to 1, used as given (all held in float64).
    GaussianMixture.from_covariances builds one from covariance matrices."""

    def __init__(self, means, eigenvalues, eigenvectors, weights):
        self.means, self.eigenvalues, self.eigenvectors, self.weights = (
            t.to(torch.float64) for t in (means, eigenvalues, eigenvectors, weights))
        k = self.means.shape[0]
        if self.means.shape != (k, 2) or self.eigenvalues.shape != (k, 2) or self.eigenvectors.shape != (k, 2, 2) \
                or self.weights.shape != (k,):
            raise ValueError(f"expected means [K,2], eigenvalues [K,2], eigenvectors [K,2,2] and weights [K], got "
                             f"{[tuple(t.shape) for t in (self.means, self.eigenvalues, self.eigenvectors, self.weights)]}")
        if not bool((self.eigenvalues > 0).all()) or not bool((self.weights > 0).all()):
            raise ValueError("eigenvalues and weights must be positive")
        if abs(float(self.weights.sum()) - 1) > 1e-6:
            raise ValueError(f"weights must sum to 1 (within 1e-6), got {float(self.weights.sum())}")
        self._log_weights = torch.log(self.weights)
        self._root = self.eigenvectors * self.eigenvalues.sqrt()[:, None, :]     # Q diag(√λ): covs = root·rootᵀ
        self._cdf = torch.cumsum(self.weights, 0)
        self._kernel_params = {}

    @classmethod
    def from_covariances(cls, means, covs, weights):
        """A mixture from means [K,2], symmetric positive-definite covs [K,2,2] and positive weights [K]
        (normalised here), eigendecomposed in float64."""
        eigenvalues, eigenvectors = torch.linalg.eigh(covs.to(torch.float64))
        weights = weights.to(torch.float64)
        return cls(means, eigenvalues, eigenvectors, weights / weights.sum())

    def components(self):
        """(means, eigenvalues, eigenvectors, log weights): what score_and_logp_reference and the
        kernel fastguide_toy::mixture_score take after x and sigma."""
        return self.means, self.eigenvalues, self.eigenvectors, self._log_weights

    @property
    def covs(self):
        """The covariance matrices Q diag(λ) Qᵀ, [K,2,2]."""
        return self._root @ self._root.transpose(1, 2)

    def __len__(self):
        return self.means.shape[0]

    def _score_logp(self, x, sigma):
        _check_points(x)
        sigma = _sigma_vector(sigma, x)
        params = self.components()
        if _use_kernel(x):
            if x.dtype not in self._kernel_params:
                self._kernel_params[x.dtype] = [t.to(x.dtype).contiguous() for t in params]
            return torch.ops.fastguide_toy.mixture_score(x.contiguous(), sigma, *self._kernel_params[x.dtype])
        score, logp = score_and_logp_reference(x, sigma, *params)
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
        y = self.means[index] + (self._root[index] @ z[:, :, None])[:, :, 0]
        if float(sigma) > 0:
            y = y + float(sigma) * torch.randn(n, 2, dtype=torch.float64, generator=generator)
        return y.float()

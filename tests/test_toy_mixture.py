"""The ground-truth tree mixture: structure, moments, exact log-density / score / denoiser, samples,
and the fused mixture_score kernel against the float64 PyTorch path."""
import math
import os

import numpy as np
import pytest
import torch

from fastguide.toy.extension import has_cpu_kernel
from fastguide.toy import mixture as mixture_module
from fastguide.toy.mixture import GaussianMixture, score_and_logp_reference, tree_components, tree_mixture

HAS_KERNEL = has_cpu_kernel("mixture_score")
requires_kernel = pytest.mark.skipif(not HAS_KERNEL, reason="fastguide.toy._C with mixture_score is not built")


EDM2_REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "edm2-ground-truth.npz")
EDM2_SIGMAS = (0.0, 0.05, 0.5)
EDM2_TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def mixture_a():
    return tree_mixture("A")


@pytest.fixture(scope="module")
def edm2_reference():
    with np.load(EDM2_REFERENCE) as data:
        return {key: torch.from_numpy(data[key]) for key in data.files}


def edm2_sigma(s):
    """The noise level of EDM2's numbers at s: EDM2 casts σ to float32 and squares it in float32."""
    s32 = np.float32(s)
    return math.sqrt(float(s32 * s32))


def relative_errors(score, logp, ref_score, ref_logp):
    """Per point: |Δ log p| / max(|log p|, 1 nat) and ‖Δ score‖ / ‖score‖."""
    logp_error = (logp - ref_logp).abs() / ref_logp.abs().clamp_min(1.0)
    score_error = (score - ref_score).norm(dim=1) / ref_score.norm(dim=1)
    return float(logp_error.max()), float(score_error.max())


@pytest.mark.parametrize("classes", ["A", "B", "AB"])
@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_equals_edm2_ground_truth(edm2_reference, classes, path):
    """Log-density and score equal the values EDM2's own mixtures give (float64, 1500 points per class,
    σ = 0, 0.05, 0.5) to 1e-6 relative, in the fused kernel and in the PyTorch path."""
    if path == "kernel" and not HAS_KERNEL:
        pytest.skip("fastguide.toy._C with mixture_score is not built")
    mix = tree_mixture(classes)
    points = edm2_reference[f"{classes}_points"]
    assert points.shape == (1500, 2)
    for s in EDM2_SIGMAS:
        sigma = torch.full((len(points),), edm2_sigma(s), dtype=torch.float64)
        if path == "kernel":
            score, logp = torch.ops.fastguide_toy.mixture_score(points.contiguous(), sigma, *mix.components())
        else:
            score, logp = score_and_logp_reference(points, sigma, *mix.components())
        logp_error, score_error = relative_errors(score, logp, edm2_reference[f"{classes}_sigma{s}_score"],
                                                  edm2_reference[f"{classes}_sigma{s}_logp"])
        assert logp_error < EDM2_TOLERANCE and score_error < EDM2_TOLERANCE, (classes, s, logp_error, score_error)


def test_edm2_oracle_tells_constructions_apart(edm2_reference):
    """The oracle is sharp: the same tree with the trunk starting at ORIGIN after scaling (instead
    of before), or held in float64 instead of EDM2's float32, misses the 1e-6 tolerance."""
    means, covs, weights = (torch.from_numpy(t) for t in tree_components("A"))
    shift = torch.from_numpy(mixture_module.ORIGIN * (1 - mixture_module.SCALE))
    points = edm2_reference["A_points"]
    sigma = torch.zeros(len(points), dtype=torch.float64)
    reference = edm2_reference["A_sigma0.0_score"], edm2_reference["A_sigma0.0_logp"]
    for mix in (GaussianMixture.from_covariances(means + shift, covs, weights),
                GaussianMixture.from_covariances(means, covs, weights)):
        score, logp = score_and_logp_reference(points, sigma, *mix.components())
        assert max(relative_errors(score, logp, *reference)) > EDM2_TOLERANCE


def exact_moments(mix):
    """Mean [2] and covariance [2,2] of the mixture, from its parameters."""
    w = mix.weights
    mean = (w[:, None] * mix.means).sum(0)
    second = (w[:, None, None] * (mix.covs + mix.means[:, :, None] * mix.means[:, None, :])).sum(0)
    return mean, second - torch.outer(mean, mean)


def random_points(n, generator, dtype=torch.float64):
    return (torch.randn(n, 2, generator=generator, dtype=torch.float64) * 0.7).to(dtype)


def random_sigmas(n, generator, dtype=torch.float64):
    return torch.exp(torch.randn(n, generator=generator, dtype=torch.float64) * 1.5 - 2.3).to(dtype)


def test_component_counts_and_class_weights():
    a, b, ab = (tree_mixture(c) for c in ("A", "B", "AB"))
    assert len(a) == len(b) == 1016 and len(ab) == 2032
    for mix in (a, b, ab):
        assert mix.means.dtype == mix.covs.dtype == mix.weights.dtype == torch.float64
        assert mix.means.shape == (len(mix), 2) and mix.covs.shape == (len(mix), 2, 2)
        assert math.isclose(float(mix.weights.sum()), 1.0, rel_tol=1e-6)          # float32 weights, as EDM2's
        assert bool((mix.weights > 0).all())
    torch.testing.assert_close(ab.means, torch.cat([a.means, b.means]), rtol=0, atol=0)
    share_a = float(ab.weights[:1016].sum())
    assert 0.3 < share_a < 0.7 and share_a != 0.5          # the trees' own total weights decide
    torch.testing.assert_close(ab.weights[:1016] / share_a, a.weights, rtol=2e-7, atol=0)   # float32 weights
    # Each branch holds 8 equal-weight components; depth d weighs 0.5^d × its length.
    assert bool((a.weights.reshape(127, 8) == a.weights.reshape(127, 8)[:, :1]).all())
    assert bool((torch.linalg.eigvalsh(a.covs) > 0).all())


def test_classes_differ_and_start_where_the_paper_says():
    a, b = tree_mixture("A"), tree_mixture("B")
    scale = torch.tensor([1.3136, 1.3844], dtype=torch.float64)
    origin = torch.tensor([0.0030, 0.0325], dtype=torch.float64)
    # The trunk (first branch) points along π/4 for A and 5π/4 for B, from the scaled origin.
    for mix, angle in ((a, math.pi / 4), (b, 5 * math.pi / 4)):
        trunk = mix.means[7] - mix.means[0]
        unscaled = trunk / scale
        assert math.isclose(math.atan2(unscaled[1], unscaled[0]) % (2 * math.pi), angle, rel_tol=1e-6)
        start = mix.means[0] / scale - unscaled * 0.07 / 0.86               # t = 0.07 .. 0.93 along the trunk
        torch.testing.assert_close(start, origin, rtol=0, atol=1e-6)


def test_overall_std_is_sigma_data():
    _, cov = exact_moments(tree_mixture("AB"))
    std = math.sqrt(float(torch.trace(cov)) / 2)
    assert abs(std - 0.5) < 0.01, std


def test_rejects_bad_input(mixture_a):
    with pytest.raises(ValueError, match="classes must be one of"):
        tree_mixture("C")
    with pytest.raises(ValueError, match="weights must sum to 1"):
        GaussianMixture(mixture_a.means, mixture_a.eigenvalues, mixture_a.eigenvectors, 2 * mixture_a.weights)
    with pytest.raises(ValueError, match="eigenvalues and weights must be positive"):
        GaussianMixture(mixture_a.means, -mixture_a.eigenvalues, mixture_a.eigenvectors, mixture_a.weights)
    with pytest.raises(ValueError, match=r"x must have shape \[N, 2\]"):
        mixture_a.score(torch.zeros(4, 3), 0.1)
    with pytest.raises(ValueError, match="sigma"):
        mixture_a.score(torch.ones(4, 2), torch.ones(3))
    with pytest.raises(TypeError, match="x must be a floating-point"):
        mixture_a.logp(torch.ones(4, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="n must be"):
        mixture_a.sample(-1)


@pytest.mark.parametrize("sigma", [0.0, 0.003, 0.05, 0.4, 3.0])
def test_score_is_gradient_of_logp(mixture_a, generator, sigma):
    x = random_points(64, generator)
    h = 1e-6
    grad = torch.stack([(mixture_a.logp(x + h * e, sigma) - mixture_a.logp(x - h * e, sigma)) / (2 * h)
                        for e in torch.eye(2, dtype=torch.float64)], dim=1)
    score = mixture_a.score(x, sigma)
    scale = score.abs().max()
    torch.testing.assert_close(score, grad, rtol=1e-5, atol=1e-6 * float(scale))


@pytest.mark.parametrize("sigma", [0.05, 0.5])
def test_logp_is_normalised(sigma):
    """Midpoint rule on a grid of step σ: exact to ~1e-8 for Gaussians of std ≥ σ."""
    mix = tree_mixture("AB")
    step, half_width = sigma, 1.6 + 6 * sigma
    grid = torch.arange(-half_width, half_width, step, dtype=torch.float64) + step / 2
    points = torch.cartesian_prod(grid, grid)
    total = float(torch.exp(mix.logp(points, sigma)).sum()) * step ** 2
    assert abs(total - 1.0) < 1e-6, total


def test_denoiser_equals_tweedie_posterior_mean(mixture_a, generator):
    """E[y|x] from the per-component Gaussian posteriors, computed independently of the score."""
    # (tree_mixture's float32 eigenvectors are orthogonal only to ~1e-7: use float64 ones here)
    mix = GaussianMixture.from_covariances(mixture_a.means, mixture_a.covs, mixture_a.weights)
    x = random_points(40, generator)
    sigma = random_sigmas(40, generator)
    denoised = mix.denoise(x, sigma)
    eye = torch.eye(2, dtype=torch.float64)
    total = mix.covs[None] + sigma[:, None, None, None] ** 2 * eye     # [N,K,2,2]
    dist = torch.distributions.MultivariateNormal(mix.means[None], covariance_matrix=total)
    log_resp = torch.log(mix.weights) + dist.log_prob(x[:, None, :])
    resp = torch.softmax(log_resp, dim=1)
    gain = mix.covs[None] @ torch.linalg.inv(total)                        # Σ(Σ+σ²I)⁻¹
    post = mix.means[None] + (gain @ (x[:, None, :] - mix.means[None])[..., None])[..., 0]
    expected = (resp[..., None] * post).sum(1)
    torch.testing.assert_close(denoised, expected, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(mix(x, sigma), denoised, rtol=0, atol=0)
    torch.testing.assert_close(mix.logp(x, sigma), torch.logsumexp(log_resp, 1), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sigma", [0.0, 0.3])
def test_samples_match_moments(generator, sigma):
    mix = tree_mixture("AB")
    n = 200_000
    samples = mix.sample(n, generator=generator, sigma=sigma)
    assert samples.shape == (n, 2) and samples.dtype == torch.float32
    mean, cov = exact_moments(mix)
    cov = cov + sigma ** 2 * torch.eye(2, dtype=torch.float64)
    s = samples.double()
    # Standard errors: ≈ std/√n for the mean, ≈ var·√(2/n)·(heavy tails) for the covariance.
    torch.testing.assert_close(s.mean(0), mean, rtol=0, atol=5 * 0.6 / math.sqrt(n))
    torch.testing.assert_close(torch.cov(s.T), cov, rtol=0, atol=6 * 0.36 * math.sqrt(2 / n))
    if sigma > 0:
        return
    # Class A alone sits beyond the line through the trunks' common start, perpendicular to them.
    start = float((mixture_module.ORIGIN * mixture_module.SCALE).sum())
    frac_a = float((samples.double().sum(1) > start).double().mean())
    assert abs(frac_a - float(mix.weights[:1016].sum())) < 0.01


def test_samples_reproducible_by_seed(mixture_a):
    torch.testing.assert_close(mixture_a.sample(100, generator=5), mixture_a.sample(100, generator=5), rtol=0, atol=0)
    assert not torch.equal(mixture_a.sample(100, generator=5), mixture_a.sample(100, generator=6))


def test_samples_have_high_density(mixture_a, generator):
    """Exact draws sit where the density is: their mean log-density beats a shifted copy's by far."""
    samples = mixture_a.sample(2000, generator=generator).double()
    assert float(mixture_a.logp(samples).mean()) > float(mixture_a.logp(samples + 0.05).mean()) + 5


def test_float32_output_dtype(mixture_a, generator):
    x = random_points(33, generator, torch.float32)
    sigma = random_sigmas(33, generator, torch.float32)
    for out in (mixture_a.score(x, sigma), mixture_a.denoise(x, sigma), mixture_a.logp(x, sigma)):
        assert out.dtype == torch.float32


@requires_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 7, 257])
def test_kernel_matches_float64_reference(generator, dtype, n):
    mix = tree_mixture("AB")
    x_big = random_points(2 * n, generator, dtype)
    x = x_big[::2]                                               # non-contiguous view
    sigma = random_sigmas(n, generator, dtype)
    sigma[0] = 1e-3 if n > 1 else sigma[0]
    score, logp = torch.ops.fastguide_toy.mixture_score(x.contiguous(), sigma, *[t.to(dtype) for t in mix.components()])
    ref_score, ref_logp = score_and_logp_reference(x, sigma, *mix.components())
    assert score.dtype == logp.dtype == dtype and bool(torch.isfinite(score).all())
    # The score of a mixture at small σ is (Σ+σ²I)⁻¹(x−μ): large, so compare relative to its size.
    if dtype == torch.float64:
        torch.testing.assert_close(score.double(), ref_score, rtol=1e-10, atol=1e-10 * float(ref_score.abs().max()))
        torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-12, atol=1e-10)
    else:
        scale = ref_score.norm(dim=1, keepdim=True) + 1
        assert float(((score.double() - ref_score) / scale).abs().max()) < 2e-4
        torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=1e-4)


@requires_kernel
def test_kernel_handles_component_count_not_multiple_of_vector(generator):
    mix = tree_mixture("A")
    keep = 13
    few = [t[:keep].contiguous() for t in mix.components()]
    x = random_points(9, generator)
    sigma = random_sigmas(9, generator)
    score, logp = torch.ops.fastguide_toy.mixture_score(x, sigma, *few)
    ref_score, ref_logp = score_and_logp_reference(x, sigma, *few)
    torch.testing.assert_close(score, ref_score, rtol=1e-10, atol=1e-10 * float(ref_score.abs().max()))
    torch.testing.assert_close(logp, ref_logp, rtol=1e-12, atol=1e-10)


@requires_kernel
def test_kernel_rejects_bad_input():
    mix = tree_mixture("A")
    means, eigenvalues, eigenvectors, log_weights = mix.components()
    x, sigma = torch.zeros(3, 2, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    op = torch.ops.fastguide_toy.mixture_score
    with pytest.raises(RuntimeError, match="x must"):
        op(torch.zeros(3, 3, dtype=torch.float64), sigma, *mix.components())
    with pytest.raises(RuntimeError, match="sigma must"):
        op(x, torch.ones(4, dtype=torch.float64), *mix.components())
    with pytest.raises(RuntimeError, match="eigenvalues must"):
        op(x, sigma, means, eigenvalues[:5], eigenvectors, log_weights)
    with pytest.raises(RuntimeError, match="eigenvectors must"):
        op(x, sigma, means, eigenvalues, eigenvectors[:, :1], log_weights)
    with pytest.raises(RuntimeError, match="must have x's dtype"):
        op(x, sigma, means, eigenvalues.float(), eigenvectors, log_weights)


def test_reference_path_used_without_kernel(monkeypatch, mixture_a, generator):
    """The PyTorch path (the fallback) gives the same answers as the default path."""
    x = random_points(20, generator, torch.float32)
    sigma = random_sigmas(20, generator, torch.float32)
    default = mixture_a.score(x, sigma)
    monkeypatch.setattr(mixture_module, "_use_kernel", lambda x: False)
    fallback = mixture_a.score(x, sigma)
    assert fallback.dtype == torch.float32
    scale = fallback.norm(dim=1, keepdim=True) + 1
    assert float(((default - fallback) / scale).abs().max()) < 2e-4

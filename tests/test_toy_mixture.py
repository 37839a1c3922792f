"""The ground-truth tree mixture: structure, moments, exact log-density / score / denoiser, samples,
and the fused mixture_score kernel against the float64 PyTorch path."""
import math

import pytest
import torch

from fastguide.toy.extension import has_cpu_kernel
from fastguide.toy import mixture as mixture_module
from fastguide.toy.mixture import score_and_logp_reference, tree_mixture

HAS_KERNEL = has_cpu_kernel("mixture_score")
requires_kernel = pytest.mark.skipif(not HAS_KERNEL, reason="fastguide.toy._C with mixture_score is not built")


@pytest.fixture(scope="module")
def mixture_a():
    return tree_mixture("A")


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
        assert math.isclose(float(mix.weights.sum()), 1.0, rel_tol=1e-12)
        assert bool((mix.weights > 0).all())
    torch.testing.assert_close(ab.means, torch.cat([a.means, b.means]), rtol=0, atol=0)
    share_a = float(ab.weights[:1016].sum())
    assert 0.3 < share_a < 0.7 and share_a != 0.5          # the trees' own total weights decide
    torch.testing.assert_close(ab.weights[:1016] / share_a, a.weights, rtol=1e-12, atol=0)
    # Each branch holds 8 equal-weight components; depth d weighs 0.5^d × its length.
    assert bool((a.weights.reshape(127, 8) == a.weights.reshape(127, 8)[:, :1]).all())
    assert bool((torch.linalg.eigvalsh(a.covs) > 0).all())


def test_classes_differ_and_start_where_the_paper_says():
    a, b = tree_mixture("A"), tree_mixture("B")
    # The trunk (first branch) points along π/4 for A and 5π/4 for B.
    for mix, angle in ((a, math.pi / 4), (b, 5 * math.pi / 4)):
        trunk = mix.means[7] - mix.means[0]
        unscaled = trunk / torch.tensor([1.3136, 1.3844], dtype=torch.float64)
        assert math.isclose(math.atan2(unscaled[1], unscaled[0]) % (2 * math.pi), angle, rel_tol=1e-9)


def test_overall_std_is_sigma_data():
    _, cov = exact_moments(tree_mixture("AB"))
    std = math.sqrt(float(torch.trace(cov)) / 2)
    assert abs(std - 0.5) < 0.01, std


def test_rejects_bad_input(mixture_a):
    with pytest.raises(ValueError, match="classes"):
        tree_mixture("C")
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
    x = random_points(40, generator)
    sigma = random_sigmas(40, generator)
    denoised = mixture_a.denoise(x, sigma)
    eye = torch.eye(2, dtype=torch.float64)
    total = mixture_a.covs[None] + sigma[:, None, None, None] ** 2 * eye     # [N,K,2,2]
    dist = torch.distributions.MultivariateNormal(mixture_a.means[None], covariance_matrix=total)
    log_resp = torch.log(mixture_a.weights) + dist.log_prob(x[:, None, :])
    resp = torch.softmax(log_resp, dim=1)
    gain = mixture_a.covs[None] @ torch.linalg.inv(total)                        # Σ(Σ+σ²I)⁻¹
    post = mixture_a.means[None] + (gain @ (x[:, None, :] - mixture_a.means[None])[..., None])[..., 0]
    expected = (resp[..., None] * post).sum(1)
    torch.testing.assert_close(denoised, expected, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(mixture_a(x, sigma), denoised, rtol=0, atol=0)
    torch.testing.assert_close(mixture_a.logp(x, sigma), torch.logsumexp(log_resp, 1), rtol=1e-10, atol=1e-10)


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
    # Class A alone sits in the upper right half.
    frac_a = float((samples.sum(1) > 0).double().mean())
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
    params = [t.to(dtype) for t in (mix.means, mix.covs, torch.log(mix.weights))]
    score, logp = torch.ops.fastguide_toy.mixture_score(x.contiguous(), sigma, *params)
    ref_score, ref_logp = score_and_logp_reference(x, sigma, mix.means, mix.covs, torch.log(mix.weights))
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
    means, covs, log_w = mix.means[:keep], mix.covs[:keep], torch.log(mix.weights[:keep])
    x = random_points(9, generator)
    sigma = random_sigmas(9, generator)
    score, logp = torch.ops.fastguide_toy.mixture_score(x, sigma, means, covs, log_w)
    ref_score, ref_logp = score_and_logp_reference(x, sigma, means, covs, log_w)
    torch.testing.assert_close(score, ref_score, rtol=1e-10, atol=1e-10 * float(ref_score.abs().max()))
    torch.testing.assert_close(logp, ref_logp, rtol=1e-12, atol=1e-10)


@requires_kernel
def test_kernel_rejects_bad_input():
    mix = tree_mixture("A")
    params = (mix.means, mix.covs, torch.log(mix.weights))
    with pytest.raises(RuntimeError, match="x must"):
        torch.ops.fastguide_toy.mixture_score(torch.zeros(3, 3, dtype=torch.float64), torch.ones(3, dtype=torch.float64), *params)
    with pytest.raises(RuntimeError, match="sigma must"):
        torch.ops.fastguide_toy.mixture_score(torch.zeros(3, 2, dtype=torch.float64), torch.ones(4, dtype=torch.float64), *params)
    with pytest.raises(RuntimeError, match="covs must"):
        torch.ops.fastguide_toy.mixture_score(torch.zeros(3, 2, dtype=torch.float64), torch.ones(3, dtype=torch.float64),
                                          mix.means, mix.covs[:5], params[2])


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

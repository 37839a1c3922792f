"""Metrics of the toy experiment: exact k-NN search against brute force, precision/recall and the
outlier rate on cases whose answer is known."""
import math

import pytest
import torch

from fastguide.toy import metrics
from fastguide.toy.mixture import tree_mixture


def brute_knn_radii(points, k):
    d = torch.cdist(points.double(), points.double(), compute_mode="donot_use_mm_for_euclid_dist")
    return d.sort(dim=1).values[:, k]


def brute_inside(queries, centres, radii):
    d = torch.cdist(queries.double(), centres.double(), compute_mode="donot_use_mm_for_euclid_dist")
    return (d <= radii.double()[None, :]).any(1)


class StandardGaussian:
    """A ground truth with a known density: N(0, I) in 2D."""

    def sample(self, n, *, generator=None):
        return torch.randn(n, 2, generator=torch.Generator().manual_seed(generator))

    def logp(self, x):
        return -0.5 * (x.double() ** 2).sum(1) - math.log(2 * math.pi)


def clustered(n, generator):
    """Points in a few tight clusters and a sparse halo: the hard case for chunked neighbour search."""
    centres = torch.randn(5, 2, generator=generator) * 3
    which = torch.randint(0, 5, (n,), generator=generator)
    points = centres[which] + 0.01 * torch.randn(n, 2, generator=generator)
    halo = torch.rand(n, generator=generator) < 0.05
    return torch.where(halo[:, None], 6 * torch.randn(n, 2, generator=generator), points)


@pytest.mark.parametrize("n, k, chunk", [(4, 3, 128), (37, 1, 5), (37, 3, 7), (1001, 3, 64), (1001, 5, 128)])
def test_knn_radii_equal_brute_force(generator, n, k, chunk):
    for points in (torch.randn(n, 2, generator=generator), clustered(n, generator)):
        radii = metrics.knn_radii(points, k, chunk=chunk)
        torch.testing.assert_close(radii, brute_knn_radii(points, k), rtol=1e-12, atol=0)


def test_knn_radii_of_a_non_contiguous_float64_view(generator):
    storage = torch.randn(3, 301, generator=generator, dtype=torch.float64)
    points = storage[::2, :].T                                   # [301, 2], strided
    assert not points.is_contiguous()
    torch.testing.assert_close(metrics.knn_radii(points, 3, chunk=16), brute_knn_radii(points, 3),
                               rtol=1e-12, atol=0)


@pytest.mark.parametrize("nq, nc, chunk", [(1, 10, 128), (333, 517, 16), (2000, 1500, 128)])
def test_inside_manifold_equals_brute_force(generator, nq, nc, chunk):
    centres = clustered(nc, generator)
    radii = metrics.knn_radii(centres, 3) * (0.5 + torch.rand(nc, generator=generator, dtype=torch.float64))
    queries = clustered(nq, generator) + 0.02 * torch.randn(nq, 2, generator=generator)
    inside = metrics.inside_manifold(queries, centres, radii, chunk=chunk)
    expected = brute_inside(queries, centres, radii)
    assert inside.dtype == torch.bool and inside.shape == (nq,)
    assert torch.equal(inside, expected)
    assert 0 < int(expected.sum()) < nq or nq == 1          # the case is not trivial


def test_precision_recall_of_ground_truth_against_itself():
    truth = tree_mixture("A")
    real = truth.sample(4096, generator=1)
    assert metrics.precision_recall(real, real) == (1.0, 1.0)
    precision, recall = metrics.precision_recall(real, truth.sample(4096, generator=2))
    assert precision > 0.95 and recall > 0.95


def test_precision_recall_against_shifted_and_partial_copies():
    truth = tree_mixture("A")
    real, other = truth.sample(4096, generator=1), truth.sample(4096, generator=2)
    assert metrics.precision_recall(real, other + torch.tensor([3.0, 0.0])) == (0.0, 0.0)
    # A generator that drops the left half of the tree: precise, but recalls only what it kept.
    kept = other[other[:, 0] > 0.3]
    precision, recall = metrics.precision_recall(real, kept)
    kept_share = (real[:, 0] > 0.3).double().mean().item()
    assert precision > 0.95
    assert abs(recall - kept_share) < 0.05 and kept_share < 0.8


def test_outlier_rate_of_ground_truth_samples_is_one_percent():
    scorer = metrics.GroundTruthMetrics(StandardGaussian(), 20000, seed=3)
    # The 1 % quantile of N(0, I) log-density: ‖x‖² ~ χ²₂, whose 99 % quantile is −2 ln 0.01.
    exact = math.log(0.01) - math.log(2 * math.pi)
    assert abs(scorer.threshold - exact) < 0.25      # 3.5 standard errors of the quantile
    result = scorer(StandardGaussian().sample(20000, generator=11))
    assert abs(result["outliers"] - 0.01) < 0.003
    assert abs(result["loglik_median"] - (math.log(0.5) - math.log(2 * math.pi))) < 0.03
    assert result["precision"] > 0.9 and result["recall"] > 0.9


def test_ground_truth_metrics_on_the_tree():
    truth = tree_mixture("A")
    scorer = metrics.GroundTruthMetrics(truth, 8192, seed=0)
    own = scorer(truth.sample(8192, generator=7))
    assert set(own) == {"precision", "recall", "outliers", "loglik_median"}
    assert own["precision"] > 0.95 and own["recall"] > 0.95
    assert abs(own["outliers"] - 0.01) < 0.005        # ~3 standard errors (sample and threshold)
    # Samples noised to σ = 0.1 leave the thin branches: outliers, lower precision and likelihood.
    blurred = scorer(truth.sample(8192, generator=7, sigma=0.1))
    assert blurred["outliers"] > 0.5 and blurred["precision"] < 0.6
    assert blurred["loglik_median"] < own["loglik_median"] - 5


def test_outlier_threshold_comes_from_a_held_out_set():
    """The outlier line is the 1 % quantile of the ground-truth log-density of an independent draw
    (seed + 1), not of the precision/recall set (seed): with one set for both it would equal the
    real set's own quantile."""
    truth = tree_mixture("A")
    scorer = metrics.GroundTruthMetrics(truth, 4096, seed=5)
    assert torch.equal(scorer.real, truth.sample(4096, generator=5))
    held_out = truth.sample(4096, generator=6)
    assert scorer.threshold == metrics.outlier_threshold(truth.logp(held_out.double()))
    assert scorer.threshold != metrics.outlier_threshold(truth.logp(scorer.real.double()))
    assert not bool((torch.cdist(scorer.real.double(), held_out.double()) == 0).any())     # no shared point


def test_median_and_outlier_rate():
    values = torch.tensor([3.0, -1.0, 2.0, 10.0])
    assert metrics.median(values) == 2.5
    assert metrics.median(torch.tensor([5.0, 1.0, 4.0])) == 4.0
    assert metrics.median(torch.tensor([-math.inf, -math.inf, 1.0])) == -math.inf
    assert metrics.outlier_rate(values, 2.0) == 0.25
    assert metrics.outlier_threshold(torch.arange(101.0), 0.01) == pytest.approx(1.0)


@pytest.mark.parametrize("points, error, match", [
    (torch.zeros(5, 3), ValueError, r"points must have shape \[N, 2\]"),
    (torch.zeros(3, 2), ValueError, "points must hold at least 4 points"),
    (torch.tensor([[0.0, 1.0], [math.nan, 0.0], [1.0, 1.0], [2.0, 2.0]]), ValueError, "points must be finite"),
    (torch.zeros(5, 2, dtype=torch.long), TypeError, "points must be a floating-point tensor"),
    ([[0.0, 1.0]] * 5, TypeError, "points must be a floating-point tensor"),
])
def test_bad_points_are_refused(points, error, match):
    with pytest.raises(error, match=match):
        metrics.knn_radii(points, 3)


def test_bad_arguments_are_refused(generator):
    points = torch.randn(10, 2, generator=generator)
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        metrics.knn_radii(points, 0)
    with pytest.raises(ValueError, match=r"radii must be a tensor of shape \[10\]"):
        metrics.inside_manifold(points, points, torch.ones(9))
    with pytest.raises(ValueError, match="generated must hold at least 4 points"):
        metrics.precision_recall(points, points[:3])
    with pytest.raises(ValueError, match="num_points must be an integer > k"):
        metrics.GroundTruthMetrics(StandardGaussian(), 3)

"""Sample-quality metrics of the toy experiment, measured against exact ground-truth samples.

precision, recall: k-nearest-neighbour manifolds (Kynkäänniemi et al. 2019, k = 3).  A point set's
manifold is the union of balls around its points, each with the radius to that point's k-th
nearest neighbour in the set (itself excluded).  precision = fraction of generated samples inside
the real manifold; recall = fraction of real samples inside the generated manifold.
outliers: fraction of samples whose ground-truth log-density is below the 1 % quantile of the
ground truth's own (independent) samples.  loglik_median: median ground-truth log-density.

The neighbour searches are exact but visit only nearby pairs: points are sorted along a Z-order
curve and processed in chunks of neighbours; each chunk is compared only with the points whose
ball can reach its bounding box, which is what keeps 13 evaluations at 16384 points fast.
"""
import numbers

import torch

from fastguide._threads import torch_threads

K_NEIGHBOURS = 3
OUTLIER_QUANTILE = 0.01
CHUNK = 128


def check_points(name, points, minimum=1):
    """A finite [N, 2] floating-point tensor with N >= minimum."""
    if not isinstance(points, torch.Tensor) or not points.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got "
                        f"{points.dtype if isinstance(points, torch.Tensor) else type(points).__name__}")
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"{name} must have shape [N, 2], got {tuple(points.shape)}")
    if points.shape[0] < minimum:
        raise ValueError(f"{name} must hold at least {minimum} points, got {points.shape[0]}")
    if not bool(torch.isfinite(points).all()):
        raise ValueError(f"{name} must be finite (found NaN or inf)")
    return points


def _check_k(k):
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    return int(k)


def _spread_bits(v):
    """Inserts a zero bit between the 16 low bits of v (int64), for Morton codes."""
    v = (v | (v << 8)) & 0x00FF00FF
    v = (v | (v << 4)) & 0x0F0F0F0F
    v = (v | (v << 2)) & 0x33333333
    return (v | (v << 1)) & 0x55555555


def z_order(points):
    """Permutation that sorts points along a Z-order (Morton) curve: neighbours in it are near in 2D."""
    low = points.amin(0)
    extent = (points.amax(0) - low).clamp_min(1e-30)
    cells = ((points - low) / extent * 65535).long().clamp_(0, 65535)
    return torch.argsort(_spread_bits(cells[:, 0]) | (_spread_bits(cells[:, 1]) << 1))


def _squared_distances(queries, points):
    """[Q, P] squared distances, computed per coordinate (exact for near points, unlike the mm trick)."""
    points_x, points_y = points.T.contiguous()
    dx = queries[:, 0, None] - points_x
    dy = queries[:, 1, None] - points_y
    return dx.mul_(dx).addcmul_(dy, dy)


def _in_box(points, low, high):
    """Mask of the points inside the box [low, high]."""
    return ((points >= low) & (points <= high)).all(1)


def _near_box(points, reach, low, high):
    """Mask of the points whose box point ± reach overlaps the box [low, high]."""
    return ((points >= low - reach[:, None]) & (points <= high + reach[:, None])).all(1)


def knn_radii(points, k=K_NEIGHBOURS, chunk=CHUNK):
    """Distance of every point to its k-th nearest neighbour among the others (float64, [N])."""
    k = _check_k(k)
    points = check_points("points", points, minimum=k + 1).to(torch.float64)
    order = z_order(points)
    sorted_points = points[order]
    radii2 = torch.empty(len(points), dtype=torch.float64)
    with torch_threads(1):  # many small ops, which threads slow down (badly on a busy machine)
        for start in range(0, len(points), chunk):
            _knn_chunk(sorted_points, order, start, chunk, k, radii2)
    return radii2.sqrt()


def _knn_chunk(sorted_points, order, start, chunk, k, radii2):
    """Writes the squared k-NN radii of the points sorted_points[start:start + chunk] into radii2."""
    queries = sorted_points[start:start + chunk]
    # An upper bound of each radius: the k-th neighbour among its Z-order neighbours.
    window = sorted_points[max(0, start - chunk):start + 2 * chunk]
    bound = _squared_distances(queries, window).topk(k + 1, largest=False).values[:, k].sqrt()
    low = (queries - bound[:, None]).amin(0)
    high = (queries + bound[:, None]).amax(0)
    candidates = sorted_points[_in_box(sorted_points, low, high)]
    d2 = _squared_distances(queries, candidates)
    radii2[order[start:start + chunk]] = d2.topk(k + 1, largest=False).values[:, k]


def inside_manifold(queries, centres, radii, chunk=CHUNK):
    """Bool [Q]: whether each query lies in the union of the balls (centres[j], radii[j])."""
    queries = check_points("queries", queries).to(torch.float64)
    centres = check_points("centres", centres).to(torch.float64)
    if not isinstance(radii, torch.Tensor) or radii.shape != (len(centres),):
        raise ValueError(f"radii must be a tensor of shape [{len(centres)}] (one per centre), got "
                         f"{tuple(radii.shape) if isinstance(radii, torch.Tensor) else type(radii).__name__}")
    radii = radii.to(torch.float64)
    order = z_order(queries)
    inside = torch.empty(len(queries), dtype=torch.bool)
    with torch_threads(1):  # many small ops, which threads slow down (badly on a busy machine)
        for start in range(0, len(queries), chunk):
            rows = order[start:start + chunk]
            inside[rows] = _inside_block(queries[rows], centres, radii)
    return inside


def _inside_block(block, centres, radii):
    """Bool per point of block: inside one of the balls that can reach block's bounding box."""
    near = _near_box(centres, radii, block.amin(0), block.amax(0))
    if not bool(near.any()):
        return False
    d2 = _squared_distances(block, centres[near])
    return (d2 <= radii[near].square()).any(1)


def precision_recall(real, generated, k=K_NEIGHBOURS, real_radii=None):
    """(precision, recall) of generated against real, k-NN manifolds (real_radii: knn_radii(real, k))."""
    real = check_points("real", real, minimum=k + 1)
    generated = check_points("generated", generated, minimum=k + 1)
    if real_radii is None:
        real_radii = knn_radii(real, k)
    precision = inside_manifold(generated, real, real_radii).double().mean().item()
    recall = inside_manifold(real, generated, knn_radii(generated, k)).double().mean().item()
    return precision, recall


def outlier_threshold(reference_logp, quantile=OUTLIER_QUANTILE):
    """The quantile of ground-truth log-densities of ground-truth samples (the outlier line)."""
    return torch.quantile(reference_logp.to(torch.float64), quantile).item()


def outlier_rate(logp, threshold):
    """Fraction of samples whose ground-truth log-density lies below threshold."""
    return (logp.to(torch.float64) < threshold).double().mean().item()


def median(values):
    """The median (mean of the two middle values for an even count; −inf stays −inf, no NaN)."""
    ordered = values.to(torch.float64).flatten().sort().values
    n = len(ordered)
    return (0.5 * (ordered[(n - 1) // 2] + ordered[n // 2])).item()


class GroundTruthMetrics:
    """Precision, recall, outlier rate and median log-likelihood of sample sets against a ground truth.

    ground_truth: anything with sample(n, generator=seed) -> [n, 2] and logp(x) -> [n] (a
    GaussianMixture).  Draws num_points real samples (seed) for precision/recall and an
    independent set (seed + 1) for the outlier threshold, once; then each call scores one sample set.
    """

    def __init__(self, ground_truth, num_points, *, seed=0, k=K_NEIGHBOURS, quantile=OUTLIER_QUANTILE):
        if isinstance(num_points, bool) or not isinstance(num_points, numbers.Integral) or num_points <= k:
            raise ValueError(f"num_points must be an integer > k = {k}, got {num_points!r}")
        self.ground_truth = ground_truth
        self.k = _check_k(k)
        self.real = ground_truth.sample(int(num_points), generator=seed)
        self.real_radii = knn_radii(self.real, self.k)
        held_out = ground_truth.sample(int(num_points), generator=seed + 1)
        self.threshold = outlier_threshold(ground_truth.logp(held_out.to(torch.float64)), quantile)

    def __call__(self, samples):
        """dict(precision, recall, outliers, loglik_median) of samples [N, 2]."""
        samples = check_points("samples", samples, minimum=self.k + 1)
        precision, recall = precision_recall(self.real, samples, self.k, real_radii=self.real_radii)
        logp = self.ground_truth.logp(samples.to(torch.float64))
        return dict(precision=precision, recall=recall, outliers=outlier_rate(logp, self.threshold),
                    loglik_median=median(logp))

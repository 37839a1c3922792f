// fastguide_toy::mixture_score: the exact score and log-density of a 2D Gaussian mixture noised to σ,
// σ per point — the ground truth of the toy experiment.  Each covariance is given by its
// eigendecomposition Σ_k = Q_k diag(λ_k) Q_kᵀ (as EDM2's toy mixture holds it), so component k
// noised to σ is N(μ_k, Q_k diag(λ_k + σ²) Q_kᵀ) with precision Q_k diag(1/(λ_k + σ²)) Q_kᵀ.
//
// Per point x and component k, with r = x − μ_k, (u, v) = Q_kᵀr, l_i = λ_ki + σ², det = l_0·l_1:
//   a      = (u/l_0, v/l_1),                 P_k r = Q_k a,   rᵀP_k r = u·a_0 + v·a_1
//   e_k    = log w_k − ½ rᵀP_k r
//   p_k    = exp(e_k − max_j e_j) / √det     (the posterior weight up to a common factor)
//   score  = −Σ_k p_k P_k r / Σ_k p_k,       logp = max_j e_j + log Σ_k p_k − log 2π
// One pass over the components per point with an online logsumexp (one exp and one 1/√ per
// pair, no log); components are vectorised (at::vec, SoA, padded with weight 0), points are
// split over threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kPad = 16;  // components are padded to a multiple of every vector width

// The components as structure-of-arrays, padded with log-weight −inf (contributing exactly 0).
// q_ij is entry (i, j) of Q: column j is the eigenvector of eigenvalue λ_j.
template <typename scalar_t>
struct Components {
  int64_t count = 0;
  std::vector<scalar_t> mean_x, mean_y, lambda0, lambda1, q00, q01, q10, q11, log_weight;
};

template <typename scalar_t>
Components<scalar_t> pack(const at::Tensor& means, const at::Tensor& eigenvalues, const at::Tensor& eigenvectors,
                          const at::Tensor& log_weights) {
  const int64_t k = means.size(0);
  Components<scalar_t> c;
  c.count = (k + kPad - 1) / kPad * kPad;
  for (auto* v : {&c.mean_x, &c.mean_y, &c.q01, &c.q10}) v->assign(c.count, 0);
  for (auto* v : {&c.lambda0, &c.lambda1, &c.q00, &c.q11}) v->assign(c.count, 1);
  c.log_weight.assign(c.count, -std::numeric_limits<scalar_t>::infinity());
  auto m = means.accessor<scalar_t, 2>();
  auto l = eigenvalues.accessor<scalar_t, 2>();
  auto q = eigenvectors.accessor<scalar_t, 3>();
  auto w = log_weights.accessor<scalar_t, 1>();
  for (int64_t i = 0; i < k; ++i) {
    c.mean_x[i] = m[i][0];
    c.mean_y[i] = m[i][1];
    c.lambda0[i] = l[i][0];
    c.lambda1[i] = l[i][1];
    c.q00[i] = q[i][0][0];
    c.q01[i] = q[i][0][1];
    c.q10[i] = q[i][1][0];
    c.q11[i] = q[i][1][1];
    c.log_weight[i] = w[i];
  }
  return c;
}

template <typename scalar_t>
at::vec::Vectorized<scalar_t> fast_exp(const at::vec::Vectorized<scalar_t>& v) {
  return v.exp();
}

template <>
at::vec::Vectorized<float> fast_exp(const at::vec::Vectorized<float>& v) {
  return v.exp_u20();  // ≤ 20 ulp: far below the float32 error of the quadratic form
}

template <typename scalar_t>
scalar_t reduce_sum(const at::vec::Vectorized<scalar_t>& v) {
  return at::vec::vec_reduce_all<scalar_t>([](auto a, auto b) { return a + b; }, v);
}

// 1/√v for float: the hardware estimate (12 bits) refined by one Newton step (≈ 23 bits).
template <typename scalar_t>
at::vec::Vectorized<scalar_t> inv_sqrt(const at::vec::Vectorized<scalar_t>& v) {
  return v.rsqrt();
}

template <>
at::vec::Vectorized<float> inv_sqrt(const at::vec::Vectorized<float>& v) {
  const __m256 r = _mm256_rsqrt_ps(v);
  const __m256 half_v_r2 = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), v), _mm256_mul_ps(r, r));
  return _mm256_mul_ps(r, _mm256_sub_ps(_mm256_set1_ps(1.5f), half_v_r2));
}

// Score and log-density of the points [begin, end), one pass over the components per point.
// Each vector lane keeps its own running max of e_k (an online logsumexp): a new e either
// lies below the lane's max (weight exp(e − max)) or becomes the max (the lane's sums are
// rescaled by exp(max − e)) — one exp of −|e − max| serves both cases.
template <typename scalar_t>
void score_points(const Components<scalar_t>& c, const scalar_t* x, const scalar_t* sigma, scalar_t* score,
                  scalar_t* logp, int64_t begin, int64_t end) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int kLanes = Vec::size();
  const Vec half(scalar_t(0.5)), one(scalar_t(1));
  for (int64_t i = begin; i < end; ++i) {
    const Vec px(x[2 * i]), py(x[2 * i + 1]), var(sigma[i] * sigma[i]);
    Vec lane_max(-std::numeric_limits<scalar_t>::max()), total(0), grad_x(0), grad_y(0);
    for (int64_t k = 0; k < c.count; k += kLanes) {
      const Vec rx = px - Vec::loadu(&c.mean_x[k]), ry = py - Vec::loadu(&c.mean_y[k]);
      const Vec q00 = Vec::loadu(&c.q00[k]), q01 = Vec::loadu(&c.q01[k]);
      const Vec q10 = Vec::loadu(&c.q10[k]), q11 = Vec::loadu(&c.q11[k]);
      const Vec u = at::vec::fmadd(q00, rx, q10 * ry), v = at::vec::fmadd(q01, rx, q11 * ry);  // Qᵀr
      const Vec l0 = Vec::loadu(&c.lambda0[k]) + var, l1 = Vec::loadu(&c.lambda1[k]) + var;
      const Vec isqrt_det = inv_sqrt(l0 * l1);
      const Vec idet = isqrt_det * isqrt_det;
      const Vec a0 = u * l1 * idet, a1 = v * l0 * idet;                  // diag(1/l)·Qᵀr
      const Vec quad = at::vec::fmadd(u, a0, v * a1);                    // rᵀPr
      const Vec e = at::vec::fnmadd(half, quad, Vec::loadu(&c.log_weight[k]));
      const Vec gap = e - lane_max;
      const Vec shrink = fast_exp(-gap.abs());                 // exp(−|e − max|)
      const Vec below = gap <= Vec(0);                         // all-ones lanes where e ≤ max
      const Vec p = Vec::blendv(one, shrink, below) * isqrt_det;
      const Vec rescale = Vec::blendv(shrink, one, below);
      lane_max = at::vec::maximum(lane_max, e);
      total = at::vec::fmadd(total, rescale, p);
      grad_x = at::vec::fnmadd(p, at::vec::fmadd(q00, a0, q01 * a1), grad_x * rescale);  // −p·(Pr)_x
      grad_y = at::vec::fnmadd(p, at::vec::fmadd(q10, a0, q11 * a1), grad_y * rescale);
    }
    scalar_t lanes_max[kLanes], lanes_total[kLanes], lanes_gx[kLanes], lanes_gy[kLanes];
    lane_max.store(lanes_max);
    total.store(lanes_total);
    grad_x.store(lanes_gx);
    grad_y.store(lanes_gy);
    scalar_t m = lanes_max[0];
    for (int l = 1; l < kLanes; ++l) m = std::max(m, lanes_max[l]);
    scalar_t sum = 0, gx = 0, gy = 0;
    for (int l = 0; l < kLanes; ++l) {
      const scalar_t w = std::exp(lanes_max[l] - m);
      sum += w * lanes_total[l];
      gx += w * lanes_gx[l];
      gy += w * lanes_gy[l];
    }
    score[2 * i] = gx / sum;
    score[2 * i + 1] = gy / sum;
    logp[i] = m + std::log(sum) - std::log(scalar_t(2 * M_PI));
  }
}

void check_inputs(const at::Tensor& x, const at::Tensor& sigma, const at::Tensor& means,
                  const at::Tensor& eigenvalues, const at::Tensor& eigenvectors, const at::Tensor& log_weights) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == 2, "mixture_score: x must have shape [N, 2], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "mixture_score: x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(sigma.dim() == 1 && sigma.size(0) == x.size(0), "mixture_score: sigma must have shape [", x.size(0),
              "] (one σ per point), got ", sigma.sizes());
  TORCH_CHECK(means.dim() == 2 && means.size(1) == 2 && means.size(0) > 0,
              "mixture_score: means must have shape [K, 2] with K > 0, got ", means.sizes());
  const int64_t k = means.size(0);
  TORCH_CHECK(eigenvalues.dim() == 2 && eigenvalues.size(0) == k && eigenvalues.size(1) == 2,
              "mixture_score: eigenvalues must have shape [", k, ", 2], got ", eigenvalues.sizes());
  TORCH_CHECK(eigenvectors.dim() == 3 && eigenvectors.size(0) == k && eigenvectors.size(1) == 2 &&
                  eigenvectors.size(2) == 2,
              "mixture_score: eigenvectors must have shape [", k, ", 2, 2], got ", eigenvectors.sizes());
  TORCH_CHECK(log_weights.dim() == 1 && log_weights.size(0) == k,
              "mixture_score: log_weights must have shape [", k, "], got ", log_weights.sizes());
  for (const at::Tensor* t : {&sigma, &means, &eigenvalues, &eigenvectors, &log_weights}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "mixture_score: sigma, means, eigenvalues, eigenvectors and "
                "log_weights must have x's dtype ", x.scalar_type(), ", got ", t->scalar_type());
  }
  for (const at::Tensor* t : {&x, &sigma, &means, &eigenvalues, &eigenvectors, &log_weights}) {
    TORCH_CHECK(t->device().is_cpu(), "mixture_score: all inputs must be CPU tensors, got ", t->device());
  }
}

std::tuple<at::Tensor, at::Tensor> mixture_score_cpu(const at::Tensor& x_in, const at::Tensor& sigma_in,
                                                     const at::Tensor& means, const at::Tensor& eigenvalues,
                                                     const at::Tensor& eigenvectors, const at::Tensor& log_weights) {
  check_inputs(x_in, sigma_in, means, eigenvalues, eigenvectors, log_weights);
  const at::Tensor x = x_in.contiguous(), sigma = sigma_in.contiguous();
  at::Tensor score = at::empty_like(x), logp = at::empty({x.size(0)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mixture_score", [&] {
    const Components<scalar_t> c = pack<scalar_t>(means, eigenvalues, eigenvectors, log_weights);
    const scalar_t *xp = x.data_ptr<scalar_t>(), *sp = sigma.data_ptr<scalar_t>();
    scalar_t *score_p = score.data_ptr<scalar_t>(), *logp_p = logp.data_ptr<scalar_t>();
    at::parallel_for(0, x.size(0), 16, [&](int64_t begin, int64_t end) {
      score_points(c, xp, sp, score_p, logp_p, begin, end);
    });
  });
  return {score, logp};
}

// The toy model's activation φ = silu/0.596 and its first two derivatives in one pass (training):
//   φ = z·s/c,  φ' = s·(1 + z·(1 − s))/c,  φ'' = s·(1 − s)·(2 + z·(1 − 2s))/c,  s = sigmoid(z).
std::tuple<at::Tensor, at::Tensor, at::Tensor> silu_derivatives_cpu(const at::Tensor& z_in) {
  TORCH_CHECK(z_in.scalar_type() == at::kFloat || z_in.scalar_type() == at::kDouble,
              "silu_derivatives: z must be float32 or float64, got ", z_in.scalar_type());
  TORCH_CHECK(z_in.device().is_cpu(), "silu_derivatives: z must be a CPU tensor, got ", z_in.device());
  const at::Tensor z = z_in.contiguous();
  at::Tensor phi = at::empty_like(z), d_phi = at::empty_like(z), dd_phi = at::empty_like(z);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "silu_derivatives", [&] {
    using Vec = at::vec::Vectorized<scalar_t>;
    const scalar_t* zp = z.data_ptr<scalar_t>();
    scalar_t *p0 = phi.data_ptr<scalar_t>(), *p1 = d_phi.data_ptr<scalar_t>(), *p2 = dd_phi.data_ptr<scalar_t>();
    const int64_t n = z.numel();
    at::parallel_for(0, n, 16384, [&](int64_t begin, int64_t end) {
      const Vec inv_c(scalar_t(1) / scalar_t(0.596)), one(1), two(2);
      int64_t i = begin;
      for (; i + Vec::size() <= end; i += Vec::size()) {
        const Vec zv = Vec::loadu(zp + i);
        const Vec s = one / (one + zv.neg().exp());
        const Vec t = one - s;
        (zv * s * inv_c).store(p0 + i);
        (s * at::vec::fmadd(zv, t, one) * inv_c).store(p1 + i);
        (s * t * at::vec::fmadd(zv, t - s, two) * inv_c).store(p2 + i);
      }
      for (; i < end; ++i) {
        const scalar_t zs = zp[i], s = scalar_t(1) / (scalar_t(1) + std::exp(-zs)), t = scalar_t(1) - s;
        const scalar_t inv_c = scalar_t(1) / scalar_t(0.596);
        p0[i] = zs * s * inv_c;
        p1[i] = s * (scalar_t(1) + zs * t) * inv_c;
        p2[i] = s * t * (scalar_t(2) + zs * (t - s)) * inv_c;
      }
    });
  });
  return {phi, d_phi, dd_phi};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastguide_toy, m) {
  m.def("mixture_score(Tensor x, Tensor sigma, Tensor means, Tensor eigenvalues, Tensor eigenvectors, "
        "Tensor log_weights) -> (Tensor, Tensor)");
  m.def("silu_derivatives(Tensor z) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastguide_toy, CPU, m) {
  m.impl("mixture_score", &mixture_score_cpu);
  m.impl("silu_derivatives", &silu_derivatives_cpu);
}

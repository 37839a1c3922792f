// The fused toy sampler on CPU: the whole guided Euler/Heun run over a pair of toy MLP
// denoisers (fastguide/toy/model.py) in one op, for tiles of points kept in cache.
//
// Per evaluation of one model at noise level sigma, for a tile of T points x [T×2]:
//   forward   z_0 = x_in·w_0ᵀ,  s_l = silu(z_l),  z_l = s_{l-1}·(w_l/0.596)ᵀ,
//   output    y = s_{L-1}·(w_out/0.596)ᵀ,  logp = gain·mean(y²)/σ − ½‖x·c_in‖²
//   backward  ∂logp/∂s_{L-1} = (2·gain/(H·σ))·s_{L-1}·M  with M = (w_out/0.596)ᵀ(w_out/0.596),
//             ∂/∂z_l = ∂/∂s_l ⊙ silu'(z_l),  ∂/∂s_{l-1} = ∂/∂z_l·(w_l/0.596),
//             score = c_in·(∂/∂z_0·w_0)[:, :2] − c_in²·x,   D = x + σ²·score.
// (mp_silu = silu/0.596 is folded into the weights; the output layer and its backward are
// folded into the one product with M.)  All matrix products are [T×K]·[K×N] with both
// operands row-major, done by one register-blocked kernel whose epilogue applies the
// element-wise step.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "guided_math.h"

#include <cmath>
#include <memory>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int kVec = Vec::size();
constexpr int kColBlock = 2 * kVec;  // columns per register block
constexpr int kRowBlock = 6;         // rows per register block (12 accumulators)
constexpr int kTile = 48;            // points per tile (a multiple of kRowBlock; 24..96 measured equal)
constexpr float kSiluScale = 0.596f;

// One model's weights, prepared once per call.
struct Model {
  int hidden = 0;
  int layers = 0;                 // hidden layers L (w_0 .. w_{L-1})
  std::vector<float> w0;          // [H×4] as given
  std::vector<std::vector<float>> fwd;  // l = 1..L-1: (w_l/0.596)ᵀ, [H_in×H_out]
  std::vector<std::vector<float>> bwd;  // l = 1..L-1: w_l/0.596, [H_out×H_in]
  std::vector<float> gram;        // M = (w_out/0.596)ᵀ(w_out/0.596), [H×H]
  float gain = 0.f;
  double sigma_data = 0.5;
};

// Per-thread buffers for one model and one tile.
struct Scratch {
  std::vector<float> act_a, act_b;   // activations / gradients, [T×H]
  std::vector<float> slope;          // silu'(z_l) for every layer, [L×T×H]
  std::vector<float> col0, col1, bias;  // per evaluation: layer-0 weights for x, and the bias
  explicit Scratch(const Model& m)
      : act_a(kTile * m.hidden), act_b(kTile * m.hidden), slope((size_t)m.layers * kTile * m.hidden),
        col0(m.hidden), col1(m.hidden), bias(m.hidden) {}
};

#if defined(CPU_CAPABILITY_AVX2) && defined(__AVX2__) && defined(__FMA__)
// σ(z) = 1/(1 + e^−z) in ~17 AVX2 instructions (the Sleef exp and a division cost ~30% of the
// whole run): e^u = 2^n·e^r with n = round(u·log2 e), r = u − n·ln 2 (two-part ln 2), e^r by
// its degree-6 Taylor polynomial (|r| ≤ ln2/2: error < 1.2e-7 relative), 2^n by exponent bits;
// 1/d by the approximate reciprocal and one Newton step.  u is clamped so 2^n stays normal.
inline Vec sigmoid(Vec z) {
  const __m256 u = _mm256_min_ps(_mm256_max_ps(_mm256_sub_ps(_mm256_setzero_ps(), z), _mm256_set1_ps(-87.0f)),
                                 _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(u, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), u);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), r);
  __m256 p = _mm256_set1_ps(1.f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 d = _mm256_fmadd_ps(p, _mm256_castsi256_ps(two_n), _mm256_set1_ps(1.f));
  const __m256 y = _mm256_rcp_ps(d);
  return Vec(_mm256_mul_ps(y, _mm256_fnmadd_ps(d, y, _mm256_set1_ps(2.f))));
}
#else
inline Vec sigmoid(Vec z) {
  const Vec one(1.f);
  return one / (one + z.neg().exp());
}
#endif

inline void silu_and_slope(Vec z, Vec& s, Vec& slope) {
  const Vec one(1.f);
  Vec sig = sigmoid(z);
  s = z * sig;
  slope = sig * at::vec::fmadd(z, one - sig, one);
}

// C[T×N] = A[T×K]·B[K×N] (row-major, N a multiple of kColBlock); epi(row, col, acc0, acc1)
// receives each finished block of 2 vectors.  Each 6×16 block of C is accumulated in 12
// named registers (arrays of vectors made GCC spill the accumulators on every k).
#if defined(CPU_CAPABILITY_AVX2) && defined(__AVX2__) && defined(__FMA__)
template <class Epilogue>
inline void matmul_tile(const float* a, int k_dim, const float* b, int n_dim, Epilogue&& epi) {
  static_assert(kRowBlock == 6 && kColBlock == 16, "the AVX2 block is 6 rows × 2 vectors");
  for (int r0 = 0; r0 < kTile; r0 += kRowBlock) {
    const float* a0 = a + r0 * k_dim;
    const float *a1 = a0 + k_dim, *a2 = a1 + k_dim, *a3 = a2 + k_dim, *a4 = a3 + k_dim, *a5 = a4 + k_dim;
    for (int c0 = 0; c0 < n_dim; c0 += kColBlock) {
      __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
      __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
      const float* b_row = b + c0;
      for (int k = 0; k < k_dim; ++k, b_row += n_dim) {
        const __m256 b0 = _mm256_loadu_ps(b_row), b1 = _mm256_loadu_ps(b_row + 8);
#define TOY_ROW(i)                                \
  {                                               \
    const __m256 av = _mm256_broadcast_ss(a##i + k); \
    c##i##0 = _mm256_fmadd_ps(av, b0, c##i##0);   \
    c##i##1 = _mm256_fmadd_ps(av, b1, c##i##1);   \
  }
        TOY_ROW(0) TOY_ROW(1) TOY_ROW(2) TOY_ROW(3) TOY_ROW(4) TOY_ROW(5)
#undef TOY_ROW
      }
      epi(r0, c0, Vec(c00), Vec(c01));
      epi(r0 + 1, c0, Vec(c10), Vec(c11));
      epi(r0 + 2, c0, Vec(c20), Vec(c21));
      epi(r0 + 3, c0, Vec(c30), Vec(c31));
      epi(r0 + 4, c0, Vec(c40), Vec(c41));
      epi(r0 + 5, c0, Vec(c50), Vec(c51));
    }
  }
}
#else
template <class Epilogue>
inline void matmul_tile(const float* a, int k_dim, const float* b, int n_dim, Epilogue&& epi) {
  for (int r = 0; r < kTile; ++r) {
    for (int c0 = 0; c0 < n_dim; c0 += kColBlock) {
      Vec acc0(0.f), acc1(0.f);
      for (int k = 0; k < k_dim; ++k) {
        const Vec av(a[r * k_dim + k]);
        acc0 = at::vec::fmadd(av, Vec::loadu(b + k * n_dim + c0), acc0);
        acc1 = at::vec::fmadd(av, Vec::loadu(b + k * n_dim + c0 + kVec), acc1);
      }
      epi(r, c0, acc0, acc1);
    }
  }
}
#endif

// D(x) of one model at sigma for a tile: x [T×2] -> denoised [T×2].
void denoise_tile(const Model& m, Scratch& s, const float* x, double sigma, float* denoised) {
  const int H = m.hidden;
  const double c_in_d = 1.0 / std::sqrt(m.sigma_data * m.sigma_data + sigma * sigma);
  const float c_in = (float)c_in_d;
  const float log_sigma = (float)(std::log(sigma) / 4.0);
  for (int j = 0; j < H; ++j) {
    const float* w = &m.w0[j * 4];
    s.col0[j] = c_in * w[0];
    s.col1[j] = c_in * w[1];
    s.bias[j] = w[2] * log_sigma + w[3];
  }
  // Layer 0: z_0 = c_in·x·w_0[:, :2]ᵀ + bias.
  float* act = s.act_a.data();
  float* other = s.act_b.data();
  for (int p = 0; p < kTile; ++p) {
    const Vec x0(x[2 * p]), x1(x[2 * p + 1]);
    for (int j = 0; j < H; j += kVec) {
      Vec z = at::vec::fmadd(x0, Vec::loadu(&s.col0[j]),
                             at::vec::fmadd(x1, Vec::loadu(&s.col1[j]), Vec::loadu(&s.bias[j])));
      Vec act_v, slope_v;
      silu_and_slope(z, act_v, slope_v);
      act_v.store(act + p * H + j);
      slope_v.store(&s.slope[p * H + j]);
    }
  }
  // Hidden layers 1..L-1.
  for (int l = 1; l < m.layers; ++l) {
    float* slope = &s.slope[(size_t)l * kTile * H];
    matmul_tile(act, H, m.fwd[l - 1].data(), H, [&](int p, int c, Vec z0, Vec z1) {
      Vec a0, a1, d0, d1;
      silu_and_slope(z0, a0, d0);
      silu_and_slope(z1, a1, d1);
      a0.store(other + p * H + c);
      a1.store(other + p * H + c + kVec);
      d0.store(slope + p * H + c);
      d1.store(slope + p * H + c + kVec);
    });
    std::swap(act, other);
  }
  // Output layer and its backward in one product: ∂logp/∂z_{L-1}.
  const Vec coef((float)(2.0 * m.gain / (H * sigma)));
  {
    const float* slope = &s.slope[(size_t)(m.layers - 1) * kTile * H];
    matmul_tile(act, H, m.gram.data(), H, [&](int p, int c, Vec g0, Vec g1) {
      (coef * g0 * Vec::loadu(slope + p * H + c)).store(other + p * H + c);
      (coef * g1 * Vec::loadu(slope + p * H + c + kVec)).store(other + p * H + c + kVec);
    });
    std::swap(act, other);
  }
  // Backward through hidden layers L-1..1: ∂/∂z_{l-1} = (∂/∂z_l·w_l') ⊙ silu'(z_{l-1}).
  for (int l = m.layers - 1; l >= 1; --l) {
    const float* slope = &s.slope[(size_t)(l - 1) * kTile * H];
    matmul_tile(act, H, m.bwd[l - 1].data(), H, [&](int p, int c, Vec g0, Vec g1) {
      (g0 * Vec::loadu(slope + p * H + c)).store(other + p * H + c);
      (g1 * Vec::loadu(slope + p * H + c + kVec)).store(other + p * H + c + kVec);
    });
    std::swap(act, other);
  }
  // score = c_in·(∂/∂z_0·w_0[:, :2]) − c_in²·x;  D = x + σ²·score.
  const float sigma_sq = (float)(sigma * sigma);
  const float c_in_sq = (float)(c_in_d * c_in_d);
  for (int p = 0; p < kTile; ++p) {
    Vec acc0(0.f), acc1(0.f);
    for (int j = 0; j < H; j += kVec) {
      Vec g = Vec::loadu(act + p * H + j);
      acc0 = at::vec::fmadd(g, Vec::loadu(&s.col0[j]), acc0);  // col0 already holds c_in·w_0[:, 0]
      acc1 = at::vec::fmadd(g, Vec::loadu(&s.col1[j]), acc1);
    }
    float grad0 = at::vec::vec_reduce_all<float>(std::plus<Vec>(), acc0);
    float grad1 = at::vec::vec_reduce_all<float>(std::plus<Vec>(), acc1);
    for (int f = 0; f < 2; ++f) {
      const float xf = x[2 * p + f];
      const float score = (f == 0 ? grad0 : grad1) - c_in_sq * xf;
      denoised[2 * p + f] = xf + sigma_sq * score;
    }
  }
}

struct Step {
  double t_hat, t_next;
  bool guided_euler, guided_heun, heun;
};

// D = D_guide + w·(D_main − D_guide) at sigma for the tile (the guide only when `guided`).
void guided_denoise(const Model& main, const Model* guide, Scratch& s_main, Scratch* s_guide,
                    const float* x, double sigma, bool guided, float guidance, float* d_main, float* d_guide) {
  denoise_tile(main, s_main, x, sigma, d_main);
  if (!guided) return;
  denoise_tile(*guide, *s_guide, x, sigma, d_guide);
  for (int i = 0; i < 2 * kTile; ++i) d_main[i] = fastguide::guided_denoised(d_main[i], d_guide[i], guidance);
}

// The whole sampler run for one tile; x is updated in place.  The Euler step and the Heun
// correction are guided_math.h's, as in the fused guidance ops.
void run_tile(const Model& main, const Model* guide, const std::vector<Step>& steps, float guidance,
              Scratch& s_main, Scratch* s_guide, float* x) {
  float denoised[2 * kTile], d_guide[2 * kTile], deriv[2 * kTile], x_euler[2 * kTile];
  for (const Step& st : steps) {
    guided_denoise(main, guide, s_main, s_guide, x, st.t_hat, st.guided_euler, guidance, denoised, d_guide);
    const auto euler = fastguide::euler_scalars<float>(guidance, st.t_hat, st.t_next);
    for (int i = 0; i < 2 * kTile; ++i) fastguide::euler_update(x[i], denoised[i], euler, x_euler[i], deriv[i]);
    if (!st.heun) {
      std::copy(x_euler, x_euler + 2 * kTile, x);
      continue;
    }
    guided_denoise(main, guide, s_main, s_guide, x_euler, st.t_next, st.guided_heun, guidance, denoised,
                   d_guide);
    const auto heun = fastguide::heun_scalars<float>(guidance, st.t_hat, st.t_next);
    for (int i = 0; i < 2 * kTile; ++i) x[i] = fastguide::heun_update(x[i], deriv[i], denoised[i], heun);
  }
}

std::vector<float> to_vector(const at::Tensor& t) {
  at::Tensor c = t.to(at::kFloat).contiguous();
  return std::vector<float>(c.data_ptr<float>(), c.data_ptr<float>() + c.numel());
}

Model prepare_model(const std::vector<at::Tensor>& weights, double gain, double sigma_data, const char* name) {
  TORCH_CHECK(weights.size() >= 2, name, ": expected at least 2 weight matrices (w_0 .. w_out), got ",
              weights.size());
  Model m;
  m.layers = (int)weights.size() - 1;
  m.hidden = (int)weights[0].size(0);
  const int H = m.hidden;
  TORCH_CHECK(H > 0 && H % kColBlock == 0, name, ": hidden size must be a positive multiple of ", kColBlock,
              ", got ", H);
  TORCH_CHECK(weights[0].dim() == 2 && weights[0].size(1) == 4, name, ": w_0 must be [hidden, 4], got ",
              weights[0].sizes());
  for (size_t l = 1; l < weights.size(); ++l)
    TORCH_CHECK(weights[l].dim() == 2 && weights[l].size(0) == H && weights[l].size(1) == H, name, ": weight ", l,
                " must be [", H, ", ", H, "], got ", weights[l].sizes());
  for (const at::Tensor& w : weights)
    TORCH_CHECK(w.device().is_cpu() && w.is_floating_point(), name, ": weights must be floating-point CPU tensors, got ",
                w.scalar_type(), " on ", w.device());
  m.w0 = to_vector(weights[0]);
  for (int l = 1; l < m.layers; ++l) {
    at::Tensor w = weights[l].to(at::kFloat) / kSiluScale;
    m.bwd.push_back(to_vector(w));
    m.fwd.push_back(to_vector(w.t()));
  }
  at::Tensor w_out = weights.back().to(at::kDouble) / kSiluScale;
  m.gram = to_vector(w_out.t().matmul(w_out));
  m.gain = (float)gain;
  m.sigma_data = sigma_data;
  return m;
}

// x: [N, 2] float32 (noise·t_0); schedule: [S, 5] float64 rows (t_hat, t_next, guided_euler,
// guided_heun, heun).  Returns the sampled x.
at::Tensor toy_sample(const at::Tensor& x, at::TensorList main_weights, double main_gain, double main_sigma_data,
                      at::TensorList guide_weights, double guide_gain, double guide_sigma_data,
                      const at::Tensor& schedule, double guidance) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) == 2,
              "fastguide_toy::sample: x must be a CPU float32 tensor of shape [N, 2], got ", x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(schedule.dim() == 2 && schedule.size(1) == 5, "fastguide_toy::sample: schedule must be [steps, 5], got ",
              schedule.sizes());
  at::Tensor sched = schedule.to(at::kDouble).contiguous();
  std::vector<Step> steps;
  const double* row = sched.data_ptr<double>();
  bool any_guided = false;
  for (int64_t i = 0; i < sched.size(0); ++i, row += 5) {
    steps.push_back({row[0], row[1], row[2] != 0, row[3] != 0, row[4] != 0});
    TORCH_CHECK(row[0] > 0 && (!steps.back().heun || row[1] > 0), "fastguide_toy::sample: step ", i,
                " needs positive noise levels");
    any_guided = any_guided || steps.back().guided_euler || (steps.back().heun && steps.back().guided_heun);
  }
  const Model main = prepare_model(main_weights.vec(), main_gain, main_sigma_data, "main");
  TORCH_CHECK(!any_guided || !guide_weights.empty(), "fastguide_toy::sample: guided steps need guide weights");
  Model guide_model;
  if (!guide_weights.empty()) guide_model = prepare_model(guide_weights.vec(), guide_gain, guide_sigma_data, "guide");
  const Model* guide = guide_weights.empty() ? nullptr : &guide_model;

  const int64_t n = x.size(0);
  at::Tensor out = x.contiguous().clone();
  float* data = out.data_ptr<float>();
  const int64_t tiles = (n + kTile - 1) / kTile;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    float tile[2 * kTile];
    Scratch s_main(main);
    std::unique_ptr<Scratch> s_guide(guide ? new Scratch(*guide) : nullptr);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t first = t * kTile;
      const int64_t count = std::min<int64_t>(kTile, n - first);
      std::fill(tile, tile + 2 * kTile, 0.f);
      std::copy(data + 2 * first, data + 2 * (first + count), tile);
      run_tile(main, guide, steps, (float)guidance, s_main, s_guide.get(), tile);
      std::copy(tile, tile + 2 * count, data + 2 * first);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastguide_toy, m) {
  m.def("sample(Tensor x, Tensor[] main_weights, float main_gain, float main_sigma_data, "
        "Tensor[] guide_weights, float guide_gain, float guide_sigma_data, Tensor schedule, float guidance) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastguide_toy, CPU, m) { m.impl("sample", &toy_sample); }

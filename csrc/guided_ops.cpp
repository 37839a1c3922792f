// The fused guidance + solver ops (Euler and ancestral, Heun, DPM-Solver++(2M)): schemas
// (torch.ops.fastguide.guided_*) and CPU kernels.  One pass over memory: each element is loaded
// once, the math of guided_math.h runs in float32 (float64 for float64 tensors) on AVX2 vectors,
// and the results are stored once.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/floating_point_utils.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "guided_math.h"
#include "guided_ops_common.h"

namespace {

using at::vec::Vectorized;

constexpr int64_t kGrain = 1 << 15;  // elements per thread task: small inputs stay on one thread
// Outputs at least this large are written with non-temporal (streaming) stores: they will not be
// read again before they leave the cache, and streaming skips reading each line before writing it.
constexpr int64_t kStreamBytes = int64_t(8) << 20;

#if defined(CPU_CAPABILITY_AVX2)
inline void stream_vector(float* p, const Vectorized<float>& v) { _mm256_stream_ps(p, v); }
inline void stream_vector(double* p, const Vectorized<double>& v) { _mm256_stream_pd(p, v); }
template <typename half_t>
inline void stream_vector(half_t* p, const Vectorized<half_t>& v) {
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), v);
}
inline void stream_fence() { _mm_sfence(); }
#else
template <typename scalar_t, typename V>
inline void stream_vector(scalar_t* p, const V& v) { v.store(p); }
inline void stream_fence() {}
#endif

// Whether an output takes streaming (non-temporal) stores: it is large, 32-byte aligned (so that
// each full chunk, which starts at a multiple of the vector size, is aligned too), and not one of
// the inputs: an output written over an input finds its lines in cache, where streaming stores
// would only evict them.
template <typename scalar_t>
bool streams(const scalar_t* out, int64_t n, std::initializer_list<const scalar_t*> inputs) {
  if (n * int64_t(sizeof(scalar_t)) < kStreamBytes || reinterpret_cast<uintptr_t>(out) % 32 != 0) return false;
  return std::find(inputs.begin(), inputs.end(), out) == inputs.end();
}

// A chunk of kSize elements of scalar_t held as kParts math vectors (float for half types).
template <typename scalar_t>
struct Lanes {
  using Math = Vectorized<scalar_t>;
  static constexpr int64_t kSize = Math::size();
  static constexpr int kParts = 1;
  static void load(const scalar_t* p, int64_t count, Math* parts) {
    parts[0] = count == kSize ? Math::loadu(p) : Math::loadu(p, count);
  }
  static void store(scalar_t* p, int64_t count, const Math* parts, bool streaming) {
    if (count != kSize) return parts[0].store(p, count);
    streaming ? stream_vector(p, parts[0]) : parts[0].store(p);
  }
  // A value v stores as a finite scalar_t exactly when |v| < this (NaN fails the test too).
  static Math stored_limit() { return Math(std::numeric_limits<scalar_t>::infinity()); }
};

template <typename half_t>
struct HalfLanes {
  using Math = Vectorized<float>;
  using Storage = Vectorized<half_t>;
  static constexpr int64_t kSize = Storage::size();
  static constexpr int kParts = 2;
  static_assert(kSize == 2 * Math::size(), "one half-precision vector converts to two float vectors");
  static void load(const half_t* p, int64_t count, Math* parts) {
    Storage v = count == kSize ? Storage::loadu(p) : Storage::loadu(p, count);
    std::tie(parts[0], parts[1]) = at::vec::convert_to_float<half_t>(v);
  }
  static void store(half_t* p, int64_t count, const Math* parts, bool streaming) {
    Storage v = at::vec::convert_from_float<half_t>(parts[0], parts[1]);
    if (count != kSize) return v.store(p, count);
    streaming ? stream_vector(p, v) : v.store(p);
  }
  // A float v stores as a finite half_t exactly when |v| < this: the midpoint between the largest
  // finite half_t and the next power of two, which rounds (to even) to inf.
  static Math stored_limit() {
    return Math(std::is_same_v<half_t, at::Half> ? 65520.0f : c10::detail::fp32_from_bits(0x7f7f8000u));
  }
};

template <>
struct Lanes<at::Half> : HalfLanes<at::Half> {};
template <>
struct Lanes<at::BFloat16> : HalfLanes<at::BFloat16> {};

// Threads split the elements at whole chunks (multiples of the vector size).
template <typename L>
int64_t chunks(int64_t n) {
  return (n + L::kSize - 1) / L::kSize;
}

// Which of d_main, d_guide and the written x_next held a NaN or ±inf, over one thread's task.
// Inputs: v·0 is 0 for finite v and NaN otherwise, so each running sum of those (one FMA per
// vector) is NaN exactly when one of its values was not finite.  x_next: a mask of the lanes whose
// every value stored finitely (in scalar_t: a float16 overflow is not finite).
template <typename L>
struct NonFiniteSums {
  using Math = typename L::Math;
  Math main = Math(0), guide = Math(0);
  Math next_finite = Math(0) == Math(0);  // all bits set

  static void add(Math& sum, const Math* parts) {
    for (int k = 0; k < L::kParts; ++k) sum = at::vec::fmadd(parts[k], Math(0), sum);
  }
  void add_stored(const Math* next_parts) {
    for (int k = 0; k < L::kParts; ++k) next_finite = next_finite & (next_parts[k].abs() < L::stored_limit());
  }
};

template <typename Math>
int any_nan(const Math& v) {
  typename Math::value_type lanes[Math::size()];
  v.store(lanes);
  return std::any_of(lanes, lanes + Math::size(), [](auto lane) { return std::isnan(lane); }) ? 1 : 0;
}

template <typename Math>
int all_nan(const Math& v) {
  typename Math::value_type lanes[Math::size()];
  v.store(lanes);
  return std::all_of(lanes, lanes + Math::size(), [](auto lane) { return std::isnan(lane); }) ? 1 : 0;
}

// ORs the task's bits into *flags: one atomic, and only when a bit is set.  (The sums come by
// value, so that the compiler keeps them in registers through the loop.)
template <typename Math>
void report_nonfinite(int32_t* flags, Math main, Math guide, Math next_finite) {
  // (a mask lane with all bits set reads as a NaN; a cleared one as +0)
  int bits = any_nan(main) | any_nan(guide) << 1 | (1 - all_nan(next_finite)) << 2;
  if (bits != 0) __atomic_fetch_or(flags, bits, __ATOMIC_RELAXED);
}

// body(i, count, sums) for each chunk of L::kSize elements at i (count < kSize for the last),
// the chunks split between threads; sums collects the non-finite bits when flags is not null.
// streaming: whether body makes streaming stores (each task then ends with a fence).
template <typename L, typename Body>
void for_each_chunk(int64_t n, bool streaming, int32_t* flags, const Body& body) {
  at::parallel_for(0, chunks<L>(n), kGrain / L::kSize, [&](int64_t chunk_begin, int64_t chunk_end) {
    NonFiniteSums<L> sums;
    for (int64_t i = chunk_begin * L::kSize; i < chunk_end * L::kSize && i < n; i += L::kSize) {
      body(i, std::min(L::kSize, n - i), sums);
    }
    if (streaming) stream_fence();
    if (flags != nullptr) report_nonfinite(flags, sums.main, sums.guide, sums.next_finite);
  });
}

template <bool kHasGuide, typename Math, typename S>
Math denoised_of(const Math& d_main, const Math& d_guide, S guidance) {
  if constexpr (kHasGuide) return fastguide::guided_denoised(d_main, d_guide, guidance);
  return d_main;
}

template <typename scalar_t>
struct EulerArgs {
  const scalar_t *x, *d_main, *d_guide, *noise;  // d_guide, noise: null when absent
  scalar_t *out, *deriv_out;
  int64_t n;
};

template <typename scalar_t, bool kHasGuide, bool kHasNoise>
void euler_kernel(const EulerArgs<scalar_t>& a, fastguide::EulerScalars<at::opmath_type<scalar_t>> s,
                  int32_t* flags) {
  using L = Lanes<scalar_t>;
  const bool stream_next = streams(a.out, a.n, {a.x, a.d_main, a.d_guide, a.noise});
  const bool stream_deriv = streams(a.deriv_out, a.n, {a.x, a.d_main, a.d_guide, a.noise});
  for_each_chunk<L>(a.n, stream_next || stream_deriv, flags, [&](int64_t i, int64_t count, NonFiniteSums<L>& sums) {
    typename L::Math xv[L::kParts], main[L::kParts], guide[L::kParts], noise[L::kParts], next[L::kParts],
        deriv[L::kParts];
    L::load(a.x + i, count, xv);
    L::load(a.d_main + i, count, main);
    if constexpr (kHasGuide) L::load(a.d_guide + i, count, guide);
    if constexpr (kHasNoise) L::load(a.noise + i, count, noise);
    for (int k = 0; k < L::kParts; ++k) {
      fastguide::euler_update(xv[k], denoised_of<kHasGuide>(main[k], guide[k], s.guidance), s, next[k], deriv[k]);
      if constexpr (kHasNoise) next[k] = fastguide::add_noise(next[k], noise[k], s);
    }
    L::store(a.out + i, count, next, stream_next);
    L::store(a.deriv_out + i, count, deriv, stream_deriv);
    if (flags != nullptr) {
      sums.add(sums.main, main);
      if constexpr (kHasGuide) sums.add(sums.guide, guide);
      sums.add_stored(next);
    }
  });
}

template <typename scalar_t>
struct HeunArgs {
  const scalar_t *x, *deriv, *d_main, *d_guide;  // d_guide: null when absent
  scalar_t* out;
  int64_t n;
};

template <typename scalar_t, bool kHasGuide>
void heun_kernel(const HeunArgs<scalar_t>& a, fastguide::HeunScalars<at::opmath_type<scalar_t>> s, int32_t* flags) {
  using L = Lanes<scalar_t>;
  const bool stream_next = streams(a.out, a.n, {a.x, a.deriv, a.d_main, a.d_guide});
  for_each_chunk<L>(a.n, stream_next, flags, [&](int64_t i, int64_t count, NonFiniteSums<L>& sums) {
    typename L::Math xv[L::kParts], deriv[L::kParts], main[L::kParts], guide[L::kParts], next[L::kParts];
    L::load(a.x + i, count, xv);
    L::load(a.deriv + i, count, deriv);
    L::load(a.d_main + i, count, main);
    if constexpr (kHasGuide) L::load(a.d_guide + i, count, guide);
    for (int k = 0; k < L::kParts; ++k) {
      next[k] = fastguide::heun_update(xv[k], deriv[k], denoised_of<kHasGuide>(main[k], guide[k], s.guidance), s);
    }
    L::store(a.out + i, count, next, stream_next);
    if (flags != nullptr) {
      sums.add(sums.main, main);
      if constexpr (kHasGuide) sums.add(sums.guide, guide);
      sums.add_stored(next);
    }
  });
}

template <typename scalar_t>
struct DpmArgs {
  const scalar_t *x, *d_main, *d_guide, *denoised_prev;  // d_guide, denoised_prev: null when absent
  scalar_t *out, *denoised_out;
  int64_t n;
};

template <typename scalar_t, bool kHasGuide, bool kHasPrev>
void dpm_kernel(const DpmArgs<scalar_t>& a, fastguide::DpmScalars<at::opmath_type<scalar_t>> s, int32_t* flags) {
  using L = Lanes<scalar_t>;
  const bool stream_next = streams(a.out, a.n, {a.x, a.d_main, a.d_guide, a.denoised_prev});
  const bool stream_denoised = streams(a.denoised_out, a.n, {a.x, a.d_main, a.d_guide, a.denoised_prev});
  for_each_chunk<L>(a.n, stream_next || stream_denoised, flags,
                    [&](int64_t i, int64_t count, NonFiniteSums<L>& sums) {
    typename L::Math xv[L::kParts], main[L::kParts], guide[L::kParts], prev[L::kParts], denoised[L::kParts],
        next[L::kParts];
    L::load(a.x + i, count, xv);
    L::load(a.d_main + i, count, main);
    if constexpr (kHasGuide) L::load(a.d_guide + i, count, guide);
    if constexpr (kHasPrev) L::load(a.denoised_prev + i, count, prev);
    for (int k = 0; k < L::kParts; ++k) {
      denoised[k] = denoised_of<kHasGuide>(main[k], guide[k], s.guidance);
      if constexpr (kHasPrev) {
        next[k] = fastguide::dpm_update(xv[k], denoised[k], prev[k], s);
      } else {
        next[k] = fastguide::dpm_update(xv[k], denoised[k], s);
      }
    }
    L::store(a.out + i, count, next, stream_next);
    L::store(a.denoised_out + i, count, denoised, stream_denoised);
    if (flags != nullptr) {
      sums.add(sums.main, main);
      if constexpr (kHasGuide) sums.add(sums.guide, guide);
      sums.add_stored(next);
    }
  });
}

// f(std::true_type{}) or f(std::false_type{}): a runtime bool as a template argument.
template <typename F>
void with_flag(bool flag, const F& f) {
  flag ? f(std::true_type{}) : f(std::false_type{});
}

template <typename scalar_t>
const scalar_t* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr;
}

template <typename scalar_t>
void launch_euler(const std::vector<at::Tensor>& inputs, const at::Tensor& next, const at::Tensor& deriv,
                  int32_t* flags, double guidance, double t_cur, double t_next, double noise_scale) {
  auto s = fastguide::euler_scalars<at::opmath_type<scalar_t>>(guidance, t_cur, t_next, noise_scale);
  EulerArgs<scalar_t> a{inputs[0].const_data_ptr<scalar_t>(), inputs[1].const_data_ptr<scalar_t>(),
                        data_or_null<scalar_t>(inputs[2]),    data_or_null<scalar_t>(inputs[3]),
                        next.mutable_data_ptr<scalar_t>(),    deriv.mutable_data_ptr<scalar_t>(),
                        next.numel()};
  auto run = [&](auto has_guide, auto has_noise) { euler_kernel<scalar_t, has_guide(), has_noise()>(a, s, flags); };
  with_flag(a.d_guide != nullptr, [&](auto has_guide) {
    with_flag(a.noise != nullptr, [&](auto has_noise) { run(has_guide, has_noise); });
  });
}

template <typename scalar_t>
void launch_heun(const std::vector<at::Tensor>& inputs, const at::Tensor& next, int32_t* flags, double guidance,
                 double t_cur, double t_next) {
  auto s = fastguide::heun_scalars<at::opmath_type<scalar_t>>(guidance, t_cur, t_next);
  HeunArgs<scalar_t> a{inputs[0].const_data_ptr<scalar_t>(), inputs[1].const_data_ptr<scalar_t>(),
                       inputs[2].const_data_ptr<scalar_t>(), data_or_null<scalar_t>(inputs[3]),
                       next.mutable_data_ptr<scalar_t>(),    next.numel()};
  with_flag(a.d_guide != nullptr, [&](auto has_guide) { heun_kernel<scalar_t, has_guide()>(a, s, flags); });
}

template <typename scalar_t>
void launch_dpm(const std::vector<at::Tensor>& inputs, const at::Tensor& next, const at::Tensor& denoised,
                int32_t* flags, double guidance, double x_coef, double d_coef, double prev_coef) {
  auto s = fastguide::dpm_scalars<at::opmath_type<scalar_t>>(guidance, x_coef, d_coef, prev_coef);
  DpmArgs<scalar_t> a{inputs[0].const_data_ptr<scalar_t>(), inputs[1].const_data_ptr<scalar_t>(),
                      data_or_null<scalar_t>(inputs[2]),    data_or_null<scalar_t>(inputs[3]),
                      next.mutable_data_ptr<scalar_t>(),    denoised.mutable_data_ptr<scalar_t>(),
                      next.numel()};
  auto run = [&](auto has_guide, auto has_prev) { dpm_kernel<scalar_t, has_guide(), has_prev()>(a, s, flags); };
  with_flag(a.d_guide != nullptr, [&](auto has_guide) {
    with_flag(a.denoised_prev != nullptr, [&](auto has_prev) { run(has_guide, has_prev); });
  });
}

void guided_euler_out_cpu(const at::Tensor& x, const at::Tensor& d_main, const std::optional<at::Tensor>& d_guide,
                          double guidance, double t_cur, double t_next, const std::optional<at::Tensor>& noise,
                          double noise_scale, const at::Tensor& out, const at::Tensor& deriv_out,
                          const std::optional<at::Tensor>& flags) {
  auto launch = [&](const std::vector<at::Tensor>& inputs, const at::Tensor& next, const at::Tensor& deriv,
                    int32_t* flags_ptr) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "guided_euler_cpu", [&] {
      launch_euler<scalar_t>(inputs, next, deriv, flags_ptr, guidance, t_cur, t_next, noise_scale);
    });
  };
  fastguide::guided_euler_out_impl(c10::DeviceType::CPU, x, d_main, d_guide, guidance, t_cur, t_next, noise,
                                   noise_scale, out, deriv_out, flags, launch);
}

void guided_heun_out_cpu(const at::Tensor& x, const at::Tensor& deriv, const at::Tensor& d_main,
                         const std::optional<at::Tensor>& d_guide, double guidance, double t_cur, double t_next,
                         const at::Tensor& out, const std::optional<at::Tensor>& flags) {
  auto launch = [&](const std::vector<at::Tensor>& inputs, const at::Tensor& next, int32_t* flags_ptr) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "guided_heun_cpu", [&] {
      launch_heun<scalar_t>(inputs, next, flags_ptr, guidance, t_cur, t_next);
    });
  };
  fastguide::guided_heun_out_impl(c10::DeviceType::CPU, x, deriv, d_main, d_guide, guidance, t_cur, t_next, out,
                                  flags, launch);
}

void guided_dpmpp_2m_out_cpu(const at::Tensor& x, const at::Tensor& d_main, const std::optional<at::Tensor>& d_guide,
                             const std::optional<at::Tensor>& denoised_prev, double guidance, double x_coef,
                             double d_coef, double prev_coef, const at::Tensor& out, const at::Tensor& denoised_out,
                             const std::optional<at::Tensor>& flags) {
  auto launch = [&](const std::vector<at::Tensor>& inputs, const at::Tensor& next, const at::Tensor& denoised,
                    int32_t* flags_ptr) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "guided_dpmpp_2m_cpu", [&] {
      launch_dpm<scalar_t>(inputs, next, denoised, flags_ptr, guidance, x_coef, d_coef, prev_coef);
    });
  };
  fastguide::guided_dpmpp_2m_out_impl(c10::DeviceType::CPU, x, d_main, d_guide, denoised_prev, guidance, x_coef,
                                      d_coef, prev_coef, out, denoised_out, flags, launch);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastguide, m) {
  m.def("guided_euler(Tensor x, Tensor d_main, Tensor? d_guide, float guidance, float t_cur, float t_next,"
        " *, Tensor? noise=None, float noise_scale=0.) -> (Tensor, Tensor)");
  m.def("guided_euler_out(Tensor x, Tensor d_main, Tensor? d_guide, float guidance, float t_cur, float t_next,"
        " *, Tensor? noise=None, float noise_scale=0., Tensor(a!) out, Tensor(b!) deriv_out,"
        " Tensor(c!)? flags=None) -> ()");
  m.def("guided_heun(Tensor x, Tensor deriv, Tensor d_main, Tensor? d_guide, float guidance, float t_cur,"
        " float t_next) -> Tensor");
  m.def("guided_heun_out(Tensor x, Tensor deriv, Tensor d_main, Tensor? d_guide, float guidance, float t_cur,"
        " float t_next, *, Tensor(a!) out, Tensor(c!)? flags=None) -> ()");
  m.def("guided_dpmpp_2m(Tensor x, Tensor d_main, Tensor? d_guide, Tensor? denoised_prev, float guidance,"
        " float x_coef, float d_coef, float prev_coef) -> (Tensor, Tensor)");
  m.def("guided_dpmpp_2m_out(Tensor x, Tensor d_main, Tensor? d_guide, Tensor? denoised_prev, float guidance,"
        " float x_coef, float d_coef, float prev_coef, *, Tensor(a!) out, Tensor(b!) denoised_out,"
        " Tensor(c!)? flags=None) -> ()");
}

TORCH_LIBRARY_IMPL(fastguide, CPU, m) {
  m.impl("guided_euler", &fastguide::guided_euler_functional<&guided_euler_out_cpu>);
  m.impl("guided_euler_out", &guided_euler_out_cpu);
  m.impl("guided_heun", &fastguide::guided_heun_functional<&guided_heun_out_cpu>);
  m.impl("guided_heun_out", &guided_heun_out_cpu);
  m.impl("guided_dpmpp_2m", &fastguide::guided_dpmpp_2m_functional<&guided_dpmpp_2m_out_cpu>);
  m.impl("guided_dpmpp_2m_out", &guided_dpmpp_2m_out_cpu);
}

// The fused guidance + Euler/Heun ops: schemas (torch.ops.fastguide.guided_*) and CPU kernels.
// One pass over memory: each element is loaded once, the math of guided_math.h runs in float32
// (float64 for float64 tensors) on AVX2 vectors, and the results are stored once.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <optional>
#include <tuple>
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

// Whether every output can take streaming stores: large, and 32-byte aligned so that each full
// chunk (chunks start at multiples of the vector size) is aligned too.
template <typename scalar_t>
bool use_streaming(int64_t n, std::initializer_list<const scalar_t*> outputs) {
  if (n * int64_t(sizeof(scalar_t)) < kStreamBytes) return false;
  for (const scalar_t* p : outputs) {
    if (reinterpret_cast<uintptr_t>(p) % 32 != 0) return false;
  }
  return true;
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

template <typename scalar_t, bool kHasGuide>
void euler_kernel(const scalar_t* x, const scalar_t* d_main, const scalar_t* d_guide, scalar_t* out,
                  scalar_t* deriv_out, int64_t n, fastguide::EulerScalars<at::opmath_type<scalar_t>> s) {
  using L = Lanes<scalar_t>;
  const bool streaming = use_streaming<scalar_t>(n, {out, deriv_out});
  at::parallel_for(0, chunks<L>(n), kGrain / L::kSize, [&](int64_t chunk_begin, int64_t chunk_end) {
    typename L::Math xv[L::kParts], main[L::kParts], guide[L::kParts], next[L::kParts], deriv[L::kParts];
    for (int64_t i = chunk_begin * L::kSize; i < chunk_end * L::kSize && i < n; i += L::kSize) {
      int64_t count = std::min(L::kSize, n - i);
      L::load(x + i, count, xv);
      L::load(d_main + i, count, main);
      if constexpr (kHasGuide) L::load(d_guide + i, count, guide);
      for (int k = 0; k < L::kParts; ++k) {
        auto denoised = kHasGuide ? fastguide::guided_denoised(main[k], guide[k], s.guidance) : main[k];
        fastguide::euler_update(xv[k], denoised, s, next[k], deriv[k]);
      }
      L::store(out + i, count, next, streaming);
      L::store(deriv_out + i, count, deriv, streaming);
    }
    if (streaming) stream_fence();
  });
}

template <typename scalar_t, bool kHasGuide>
void heun_kernel(const scalar_t* x, const scalar_t* deriv_in, const scalar_t* d_main, const scalar_t* d_guide,
                 scalar_t* out, int64_t n, fastguide::HeunScalars<at::opmath_type<scalar_t>> s) {
  using L = Lanes<scalar_t>;
  const bool streaming = use_streaming<scalar_t>(n, {out});
  at::parallel_for(0, chunks<L>(n), kGrain / L::kSize, [&](int64_t chunk_begin, int64_t chunk_end) {
    typename L::Math xv[L::kParts], deriv[L::kParts], main[L::kParts], guide[L::kParts], next[L::kParts];
    for (int64_t i = chunk_begin * L::kSize; i < chunk_end * L::kSize && i < n; i += L::kSize) {
      int64_t count = std::min(L::kSize, n - i);
      L::load(x + i, count, xv);
      L::load(deriv_in + i, count, deriv);
      L::load(d_main + i, count, main);
      if constexpr (kHasGuide) L::load(d_guide + i, count, guide);
      for (int k = 0; k < L::kParts; ++k) {
        auto denoised = kHasGuide ? fastguide::guided_denoised(main[k], guide[k], s.guidance) : main[k];
        next[k] = fastguide::heun_update(xv[k], deriv[k], denoised, s);
      }
      L::store(out + i, count, next, streaming);
    }
    if (streaming) stream_fence();
  });
}

template <typename scalar_t>
void launch_euler(const std::vector<at::Tensor>& inputs, const at::Tensor& next, const at::Tensor& deriv,
                  double guidance, double t_cur, double t_next) {
  auto s = fastguide::euler_scalars<at::opmath_type<scalar_t>>(guidance, t_cur, t_next);
  const scalar_t* x = inputs[0].const_data_ptr<scalar_t>();
  const scalar_t* d_main = inputs[1].const_data_ptr<scalar_t>();
  scalar_t* next_p = next.mutable_data_ptr<scalar_t>();
  scalar_t* deriv_p = deriv.mutable_data_ptr<scalar_t>();
  int64_t n = next.numel();
  if (inputs.size() == 3) {
    euler_kernel<scalar_t, true>(x, d_main, inputs[2].const_data_ptr<scalar_t>(), next_p, deriv_p, n, s);
  } else {
    euler_kernel<scalar_t, false>(x, d_main, nullptr, next_p, deriv_p, n, s);
  }
}

template <typename scalar_t>
void launch_heun(const std::vector<at::Tensor>& inputs, const at::Tensor& next, double guidance, double t_cur,
                 double t_next) {
  auto s = fastguide::heun_scalars<at::opmath_type<scalar_t>>(guidance, t_cur, t_next);
  const scalar_t* x = inputs[0].const_data_ptr<scalar_t>();
  const scalar_t* deriv = inputs[1].const_data_ptr<scalar_t>();
  const scalar_t* d_main = inputs[2].const_data_ptr<scalar_t>();
  scalar_t* next_p = next.mutable_data_ptr<scalar_t>();
  int64_t n = next.numel();
  if (inputs.size() == 4) {
    heun_kernel<scalar_t, true>(x, deriv, d_main, inputs[3].const_data_ptr<scalar_t>(), next_p, n, s);
  } else {
    heun_kernel<scalar_t, false>(x, deriv, d_main, nullptr, next_p, n, s);
  }
}

void guided_euler_out_cpu(const at::Tensor& x, const at::Tensor& d_main, const std::optional<at::Tensor>& d_guide,
                          double guidance, double t_cur, double t_next, const at::Tensor& out,
                          const at::Tensor& deriv_out) {
  auto launch = [&](const std::vector<at::Tensor>& inputs, const at::Tensor& next, const at::Tensor& deriv) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "guided_euler_cpu", [&] {
      launch_euler<scalar_t>(inputs, next, deriv, guidance, t_cur, t_next);
    });
  };
  fastguide::guided_euler_out_impl(c10::DeviceType::CPU, x, d_main, d_guide, guidance, t_cur, t_next, out, deriv_out,
                                   launch);
}

void guided_heun_out_cpu(const at::Tensor& x, const at::Tensor& deriv, const at::Tensor& d_main,
                         const std::optional<at::Tensor>& d_guide, double guidance, double t_cur, double t_next,
                         const at::Tensor& out) {
  auto launch = [&](const std::vector<at::Tensor>& inputs, const at::Tensor& next) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "guided_heun_cpu", [&] {
      launch_heun<scalar_t>(inputs, next, guidance, t_cur, t_next);
    });
  };
  fastguide::guided_heun_out_impl(c10::DeviceType::CPU, x, deriv, d_main, d_guide, guidance, t_cur, t_next, out,
                                  launch);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastguide, m) {
  m.def("guided_euler(Tensor x, Tensor d_main, Tensor? d_guide, float guidance, float t_cur, float t_next)"
        " -> (Tensor, Tensor)");
  m.def("guided_euler_out(Tensor x, Tensor d_main, Tensor? d_guide, float guidance, float t_cur, float t_next,"
        " *, Tensor(a!) out, Tensor(b!) deriv_out) -> ()");
  m.def("guided_heun(Tensor x, Tensor deriv, Tensor d_main, Tensor? d_guide, float guidance, float t_cur,"
        " float t_next) -> Tensor");
  m.def("guided_heun_out(Tensor x, Tensor deriv, Tensor d_main, Tensor? d_guide, float guidance, float t_cur,"
        " float t_next, *, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(fastguide, CPU, m) {
  m.impl("guided_euler", &fastguide::guided_euler_functional<&guided_euler_out_cpu>);
  m.impl("guided_euler_out", &guided_euler_out_cpu);
  m.impl("guided_heun", &fastguide::guided_heun_functional<&guided_heun_out_cpu>);
  m.impl("guided_heun_out", &guided_heun_out_cpu);
}

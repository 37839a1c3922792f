// Vectors of the CPU kernels (fastguide._C's epilogues and rule passes): a chunk of elements of
// any supported dtype held as float/double math vectors, and streaming (non-temporal) stores.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/floating_point_utils.h>

#include <immintrin.h>

#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

namespace fastguide::cpu {

using at::vec::Vectorized;

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

// A chunk of kSize elements of scalar_t held as kParts math vectors (float for half types).
template <typename scalar_t>
struct Lanes {
  using Math = Vectorized<scalar_t>;
  static constexpr int64_t kSize = Math::size();
  static constexpr int kParts = 1;
  static void load(const scalar_t* p, int64_t count, Math* parts) {
    parts[0] = count == kSize ? Math::loadu(p) : Math::loadu(p, count);
  }
  static void store(scalar_t* p, int64_t count, const Math* parts, bool streaming = false) {
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
  static void store(half_t* p, int64_t count, const Math* parts, bool streaming = false) {
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

}  // namespace fastguide::cpu

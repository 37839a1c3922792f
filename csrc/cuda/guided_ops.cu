// CUDA kernels of the fused guidance + solver ops (Euler/ancestral, Heun, DPM-Solver++(2M)), free
// of torch headers.  One elementwise kernel runs every op: each thread moves 16-byte packs in a
// grid-stride loop; the last n % pack elements (or all of them, when a pointer is not 16-byte
// aligned) go through a scalar grid-stride tail.  An op (EulerOp, ...) says which of the up to
// four inputs it reads and does the per-element math of guided_math.h.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "guided_math.h"
#include "guided_ops.h"

namespace {

constexpr int kThreads = 256;
constexpr int kBlocksPerSM = 8;
constexpr int kMaxInputs = 4;
constexpr int kMaxOutputs = 2;

template <typename T> struct MathOf { using type = float; };
template <> struct MathOf<double> { using type = double; };
template <typename T> using MathT = typename MathOf<T>::type;

__device__ __forceinline__ float to_math(float v) { return v; }
__device__ __forceinline__ double to_math(double v) { return v; }
__device__ __forceinline__ float to_math(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_math(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_math(MathT<T> v) { return v; }
template <> __device__ __forceinline__ __half from_math<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_math<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// 1 when v (as stored) is NaN or ±inf: its exponent bits are all ones.  Bit tests, so that no
// fast-math option can fold them away.
__device__ __forceinline__ int nonfinite(float v) { return (__float_as_uint(v) & 0x7f800000u) == 0x7f800000u; }
__device__ __forceinline__ int nonfinite(double v) {
  return (__double_as_longlong(v) & 0x7ff0000000000000ll) == 0x7ff0000000000000ll;
}
__device__ __forceinline__ int nonfinite(__half v) { return (__half_as_ushort(v) & 0x7c00u) == 0x7c00u; }
__device__ __forceinline__ int nonfinite(__nv_bfloat16 v) {
  return (__bfloat16_as_ushort(v) & 0x7f80u) == 0x7f80u;
}

// The flag bits of one element: 1: d_main, 2: d_guide, 4: the stored x_next.
template <bool kHasGuide, typename T>
__device__ __forceinline__ int flag_bits(T d_main, T d_guide, T stored_next) {
  return nonfinite(d_main) | (kHasGuide ? nonfinite(d_guide) << 1 : 0) | nonfinite(stored_next) << 2;
}

template <bool kHasGuide, typename T>
__device__ __forceinline__ MathT<T> denoised_of(T d_main, T d_guide, MathT<T> guidance) {
  if (kHasGuide) return fastguide::guided_denoised(to_math(d_main), to_math(d_guide), guidance);
  return to_math(d_main);
}

// Inputs x, d_main, d_guide?, noise? -> outputs x_next, deriv.
template <typename T, bool kHasGuide, bool kHasNoise>
struct EulerOp {
  static constexpr int kInputs = 4, kOutputs = 2;
  static __host__ __device__ constexpr bool reads(int j) {
    return j < 2 || (j == 2 && kHasGuide) || (j == 3 && kHasNoise);
  }
  fastguide::EulerScalars<MathT<T>> s;
  __device__ __forceinline__ int operator()(const T* in, T* out) const {
    MathT<T> next, deriv;
    fastguide::euler_update(to_math(in[0]), denoised_of<kHasGuide>(in[1], in[2], s.guidance), s, next, deriv);
    if (kHasNoise) next = fastguide::add_noise(next, to_math(in[3]), s);
    out[0] = from_math<T>(next);
    out[1] = from_math<T>(deriv);
    return flag_bits<kHasGuide>(in[1], in[2], out[0]);
  }
};

// Inputs x, deriv, d_main, d_guide? -> output x_next.
template <typename T, bool kHasGuide>
struct HeunOp {
  static constexpr int kInputs = 4, kOutputs = 1;
  static __host__ __device__ constexpr bool reads(int j) { return j < 3 || kHasGuide; }
  fastguide::HeunScalars<MathT<T>> s;
  __device__ __forceinline__ int operator()(const T* in, T* out) const {
    MathT<T> denoised = denoised_of<kHasGuide>(in[2], in[3], s.guidance);
    out[0] = from_math<T>(fastguide::heun_update(to_math(in[0]), to_math(in[1]), denoised, s));
    return flag_bits<kHasGuide>(in[2], in[3], out[0]);
  }
};

// Inputs x, d_main, d_guide?, denoised_prev? -> outputs x_next, D.
template <typename T, bool kHasGuide, bool kHasPrev>
struct DpmOp {
  static constexpr int kInputs = 4, kOutputs = 2;
  static __host__ __device__ constexpr bool reads(int j) {
    return j < 2 || (j == 2 && kHasGuide) || (j == 3 && kHasPrev);
  }
  fastguide::DpmScalars<MathT<T>> s;
  __device__ __forceinline__ int operator()(const T* in, T* out) const {
    MathT<T> denoised = denoised_of<kHasGuide>(in[1], in[2], s.guidance);
    MathT<T> next = kHasPrev ? fastguide::dpm_update(to_math(in[0]), denoised, to_math(in[3]), s)
                             : fastguide::dpm_update(to_math(in[0]), denoised, s);
    out[0] = from_math<T>(next);
    out[1] = from_math<T>(denoised);
    return flag_bits<kHasGuide>(in[1], in[2], out[0]);
  }
};

template <typename T>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

// The arrays of one launch, in the op's order; an input the op does not read may be null.
template <typename T>
struct Arrays {
  const T* in[kMaxInputs];
  T* out[kMaxOutputs];
};

template <typename T, typename Op>
__global__ void guided_kernel(Arrays<T> a, int64_t n, int64_t packs, Op op, int32_t* flags) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  int bits = 0;
  for (int64_t i = first; i < packs; i += stride) {
    Pack<T> in[Op::kInputs] = {}, out[Op::kOutputs];  // (inputs the op does not read stay zero)
#pragma unroll
    for (int j = 0; j < Op::kInputs; ++j) {
      if (Op::reads(j)) in[j] = reinterpret_cast<const Pack<T>*>(a.in[j])[i];
    }
#pragma unroll
    for (int k = 0; k < Pack<T>::kSize; ++k) {
      T element_in[Op::kInputs] = {}, element_out[Op::kOutputs];
#pragma unroll
      for (int j = 0; j < Op::kInputs; ++j) element_in[j] = in[j].v[k];
      bits |= op(element_in, element_out);
#pragma unroll
      for (int j = 0; j < Op::kOutputs; ++j) out[j].v[k] = element_out[j];
    }
#pragma unroll
    for (int j = 0; j < Op::kOutputs; ++j) reinterpret_cast<Pack<T>*>(a.out[j])[i] = out[j];
  }
  for (int64_t e = packs * Pack<T>::kSize + first; e < n; e += stride) {
    T element_in[Op::kInputs] = {}, element_out[Op::kOutputs];
#pragma unroll
    for (int j = 0; j < Op::kInputs; ++j) {
      if (Op::reads(j)) element_in[j] = a.in[j][e];
    }
    bits |= op(element_in, element_out);
#pragma unroll
    for (int j = 0; j < Op::kOutputs; ++j) a.out[j][e] = element_out[j];
  }
  if (bits != 0 && flags != nullptr) atomicOr(flags, bits);  // rare: only where a value is not finite
}

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Number of 16-byte packs the vector loop covers: 0 unless every pointer is 16-byte aligned.
template <typename T>
int64_t pack_count(int64_t n, const Arrays<T>& a) {
  for (const void* p : a.in) {
    if (!aligned16(p)) return 0;
  }
  for (const void* p : a.out) {
    if (!aligned16(p)) return 0;
  }
  return n / Pack<T>::kSize;
}

int grid_size(int64_t work) {
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  int64_t wanted = (work + kThreads - 1) / kThreads;
  int64_t most = int64_t(sms > 0 ? sms : 1) * kBlocksPerSM;
  return int(wanted < 1 ? 1 : (wanted < most ? wanted : most));
}

template <typename T, typename Op>
int launch(const Arrays<T>& a, int64_t n, const Op& op, int32_t* flags, cudaStream_t stream) {
  int64_t packs = pack_count<T>(n, a);
  int blocks = grid_size(packs > 0 ? packs : n);
  guided_kernel<T><<<blocks, kThreads, 0, stream>>>(a, n, packs, op, flags);
  return int(cudaGetLastError());
}

// f(std::true_type{}) or f(std::false_type{}): a runtime bool as a template argument.
template <typename F>
int with_flag(bool flag, const F& f) {
  return flag ? f(std::true_type{}) : f(std::false_type{});
}

// f(T{}) for the element type named by dtype.
template <typename F>
int with_dtype(int dtype, const F& f) {
  switch (dtype) {
    case kFastguideFloat32: return f(float{});
    case kFastguideFloat64: return f(double{});
    case kFastguideFloat16: return f(__half{});
    case kFastguideBFloat16: return f(__nv_bfloat16{});
    default: return int(cudaErrorInvalidValue);
  }
}

}  // namespace

extern "C" int fastguide_guided_euler_cuda(int dtype, const void* x, const void* d_main, const void* d_guide,
                                           const void* noise, void* out, void* deriv_out, int32_t* flags, int64_t n,
                                           double guidance, double t_cur, double t_next, double noise_scale,
                                           void* stream) {
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto s = fastguide::euler_scalars<MathT<T>>(guidance, t_cur, t_next, noise_scale);
    Arrays<T> a{{static_cast<const T*>(x), static_cast<const T*>(d_main), static_cast<const T*>(d_guide),
                 static_cast<const T*>(noise)},
                {static_cast<T*>(out), static_cast<T*>(deriv_out)}};
    return with_flag(d_guide != nullptr, [&](auto has_guide) {
      return with_flag(noise != nullptr, [&](auto has_noise) {
        EulerOp<T, decltype(has_guide)::value, decltype(has_noise)::value> op{s};
        return launch(a, n, op, flags, static_cast<cudaStream_t>(stream));
      });
    });
  });
}

extern "C" int fastguide_guided_heun_cuda(int dtype, const void* x, const void* deriv, const void* d_main,
                                          const void* d_guide, void* out, int32_t* flags, int64_t n, double guidance,
                                          double t_cur, double t_next, void* stream) {
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto s = fastguide::heun_scalars<MathT<T>>(guidance, t_cur, t_next);
    Arrays<T> a{{static_cast<const T*>(x), static_cast<const T*>(deriv), static_cast<const T*>(d_main),
                 static_cast<const T*>(d_guide)},
                {static_cast<T*>(out), nullptr}};
    return with_flag(d_guide != nullptr, [&](auto has_guide) {
      HeunOp<T, decltype(has_guide)::value> op{s};
      return launch(a, n, op, flags, static_cast<cudaStream_t>(stream));
    });
  });
}

extern "C" int fastguide_guided_dpmpp_2m_cuda(int dtype, const void* x, const void* d_main, const void* d_guide,
                                              const void* denoised_prev, void* out, void* denoised_out,
                                              int32_t* flags, int64_t n, double guidance, double x_coef,
                                              double d_coef, double prev_coef, void* stream) {
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto s = fastguide::dpm_scalars<MathT<T>>(guidance, x_coef, d_coef, prev_coef);
    Arrays<T> a{{static_cast<const T*>(x), static_cast<const T*>(d_main), static_cast<const T*>(d_guide),
                 static_cast<const T*>(denoised_prev)},
                {static_cast<T*>(out), static_cast<T*>(denoised_out)}};
    return with_flag(d_guide != nullptr, [&](auto has_guide) {
      return with_flag(denoised_prev != nullptr, [&](auto has_prev) {
        DpmOp<T, decltype(has_guide)::value, decltype(has_prev)::value> op{s};
        return launch(a, n, op, flags, static_cast<cudaStream_t>(stream));
      });
    });
  });
}

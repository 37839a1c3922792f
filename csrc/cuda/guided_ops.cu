// CUDA kernels of the fused guidance + Euler/Heun ops, free of torch headers.
// Each thread moves 16-byte packs in a grid-stride loop; the last n % pack elements (or all of
// them, when a pointer is not 16-byte aligned) go through a scalar grid-stride tail.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "guided_math.h"
#include "guided_ops.h"

namespace {

constexpr int kThreads = 256;
constexpr int kBlocksPerSM = 8;

template <typename T> struct MathOf { using type = float; };
template <> struct MathOf<double> { using type = double; };

__device__ __forceinline__ float to_math(float v) { return v; }
__device__ __forceinline__ double to_math(double v) { return v; }
__device__ __forceinline__ float to_math(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_math(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_math(typename MathOf<T>::type v) { return v; }
template <> __device__ __forceinline__ __half from_math<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_math<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const T* p, int64_t pack_index) {
  return reinterpret_cast<const Pack<T>*>(p)[pack_index];
}

template <typename T>
__device__ __forceinline__ void store_pack(T* p, int64_t pack_index, const Pack<T>& pack) {
  reinterpret_cast<Pack<T>*>(p)[pack_index] = pack;
}

template <typename T, bool kHasGuide>
__device__ __forceinline__ void euler_element(T x, T d_main, T d_guide, const fastguide::EulerScalars<typename MathOf<T>::type>& s,
                                              T& next, T& deriv) {
  using M = typename MathOf<T>::type;
  M denoised = kHasGuide ? fastguide::guided_denoised(to_math(d_main), to_math(d_guide), s.guidance) : to_math(d_main);
  M next_m, deriv_m;
  fastguide::euler_update(to_math(x), denoised, s, next_m, deriv_m);
  next = from_math<T>(next_m);
  deriv = from_math<T>(deriv_m);
}

template <typename T, bool kHasGuide>
__device__ __forceinline__ T heun_element(T x, T deriv, T d_main, T d_guide,
                                          const fastguide::HeunScalars<typename MathOf<T>::type>& s) {
  using M = typename MathOf<T>::type;
  M denoised = kHasGuide ? fastguide::guided_denoised(to_math(d_main), to_math(d_guide), s.guidance) : to_math(d_main);
  return from_math<T>(fastguide::heun_update(to_math(x), to_math(deriv), denoised, s));
}

template <typename T, bool kHasGuide>
__global__ void euler_kernel(const T* x, const T* d_main, const T* d_guide, T* out, T* deriv_out, int64_t n,
                             int64_t packs, fastguide::EulerScalars<typename MathOf<T>::type> s) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t i = first; i < packs; i += stride) {
    Pack<T> xv = load_pack(x, i), main = load_pack(d_main, i), guide = main, next, deriv;
    if (kHasGuide) guide = load_pack(d_guide, i);
#pragma unroll
    for (int k = 0; k < Pack<T>::kSize; ++k) {
      euler_element<T, kHasGuide>(xv.v[k], main.v[k], guide.v[k], s, next.v[k], deriv.v[k]);
    }
    store_pack(out, i, next);
    store_pack(deriv_out, i, deriv);
  }
  for (int64_t j = packs * Pack<T>::kSize + first; j < n; j += stride) {
    euler_element<T, kHasGuide>(x[j], d_main[j], kHasGuide ? d_guide[j] : d_main[j], s, out[j], deriv_out[j]);
  }
}

template <typename T, bool kHasGuide>
__global__ void heun_kernel(const T* x, const T* deriv, const T* d_main, const T* d_guide, T* out, int64_t n,
                            int64_t packs, fastguide::HeunScalars<typename MathOf<T>::type> s) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t i = first; i < packs; i += stride) {
    Pack<T> xv = load_pack(x, i), dv = load_pack(deriv, i), main = load_pack(d_main, i), guide = main, next;
    if (kHasGuide) guide = load_pack(d_guide, i);
#pragma unroll
    for (int k = 0; k < Pack<T>::kSize; ++k) {
      next.v[k] = heun_element<T, kHasGuide>(xv.v[k], dv.v[k], main.v[k], guide.v[k], s);
    }
    store_pack(out, i, next);
  }
  for (int64_t j = packs * Pack<T>::kSize + first; j < n; j += stride) {
    out[j] = heun_element<T, kHasGuide>(x[j], deriv[j], d_main[j], kHasGuide ? d_guide[j] : d_main[j], s);
  }
}

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Number of 16-byte packs the vector loop covers: 0 unless every pointer is 16-byte aligned.
template <typename T>
int64_t pack_count(int64_t n, std::initializer_list<const void*> pointers) {
  for (const void* p : pointers) {
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

template <typename T>
int launch_euler(const void* x, const void* d_main, const void* d_guide, void* out, void* deriv_out, int64_t n,
                 double guidance, double t_cur, double t_next, cudaStream_t stream) {
  auto s = fastguide::euler_scalars<typename MathOf<T>::type>(guidance, t_cur, t_next);
  int64_t packs = pack_count<T>(n, {x, d_main, d_guide, out, deriv_out});
  int blocks = grid_size(packs > 0 ? packs : n);
  auto xp = static_cast<const T*>(x), mp = static_cast<const T*>(d_main), gp = static_cast<const T*>(d_guide);
  auto op = static_cast<T*>(out), dp = static_cast<T*>(deriv_out);
  if (d_guide) {
    euler_kernel<T, true><<<blocks, kThreads, 0, stream>>>(xp, mp, gp, op, dp, n, packs, s);
  } else {
    euler_kernel<T, false><<<blocks, kThreads, 0, stream>>>(xp, mp, gp, op, dp, n, packs, s);
  }
  return int(cudaGetLastError());
}

template <typename T>
int launch_heun(const void* x, const void* deriv, const void* d_main, const void* d_guide, void* out, int64_t n,
                double guidance, double t_cur, double t_next, cudaStream_t stream) {
  auto s = fastguide::heun_scalars<typename MathOf<T>::type>(guidance, t_cur, t_next);
  int64_t packs = pack_count<T>(n, {x, deriv, d_main, d_guide, out});
  int blocks = grid_size(packs > 0 ? packs : n);
  auto xp = static_cast<const T*>(x), dp = static_cast<const T*>(deriv), mp = static_cast<const T*>(d_main);
  auto gp = static_cast<const T*>(d_guide);
  auto op = static_cast<T*>(out);
  if (d_guide) {
    heun_kernel<T, true><<<blocks, kThreads, 0, stream>>>(xp, dp, mp, gp, op, n, packs, s);
  } else {
    heun_kernel<T, false><<<blocks, kThreads, 0, stream>>>(xp, dp, mp, gp, op, n, packs, s);
  }
  return int(cudaGetLastError());
}

}  // namespace

extern "C" int fastguide_guided_euler_cuda(int dtype, const void* x, const void* d_main, const void* d_guide,
                                           void* out, void* deriv_out, int64_t n, double guidance, double t_cur,
                                           double t_next, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFastguideFloat32: return launch_euler<float>(x, d_main, d_guide, out, deriv_out, n, guidance, t_cur, t_next, st);
    case kFastguideFloat64: return launch_euler<double>(x, d_main, d_guide, out, deriv_out, n, guidance, t_cur, t_next, st);
    case kFastguideFloat16: return launch_euler<__half>(x, d_main, d_guide, out, deriv_out, n, guidance, t_cur, t_next, st);
    case kFastguideBFloat16:
      return launch_euler<__nv_bfloat16>(x, d_main, d_guide, out, deriv_out, n, guidance, t_cur, t_next, st);
    default: return int(cudaErrorInvalidValue);
  }
}

extern "C" int fastguide_guided_heun_cuda(int dtype, const void* x, const void* deriv, const void* d_main,
                                          const void* d_guide, void* out, int64_t n, double guidance, double t_cur,
                                          double t_next, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFastguideFloat32: return launch_heun<float>(x, deriv, d_main, d_guide, out, n, guidance, t_cur, t_next, st);
    case kFastguideFloat64: return launch_heun<double>(x, deriv, d_main, d_guide, out, n, guidance, t_cur, t_next, st);
    case kFastguideFloat16: return launch_heun<__half>(x, deriv, d_main, d_guide, out, n, guidance, t_cur, t_next, st);
    case kFastguideBFloat16:
      return launch_heun<__nv_bfloat16>(x, deriv, d_main, d_guide, out, n, guidance, t_cur, t_next, st);
    default: return int(cudaErrorInvalidValue);
  }
}

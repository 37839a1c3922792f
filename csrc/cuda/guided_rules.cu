// CUDA kernels of the rule ops (see csrc/guided_rules.h), free of torch headers.
// Moments: one thread block per (block of 1024 elements of a sample, sample), each thread summing
// 4 elements in the math type, a fixed shared-memory tree per block, the five sums stored in
// float64; then one thread block per sample adds its blocks' sums (thread t takes blocks t, t+256,
// ..., then a fixed tree).  No atomics: a sample's bits do not depend on the batch around it.
// Apply: one thread per element of a sample (grid-stride over the sample), coefficients per sample.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/guided_rules_cuda.h"

namespace {

constexpr int kThreads = 256;
constexpr int kBlock = 1024;  // fastguide::kRuleBlock
constexpr int kPerThread = kBlock / kThreads;
constexpr int kApplyBlocksPerSample = 64;

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

template <typename M>
__device__ __forceinline__ bool non_finite(M v) { return !isfinite(v); }

// A fixed tree over kThreads values in shared memory; thread 0 gets the total.
template <typename M>
__device__ __forceinline__ M block_sum(M value, M* shared) {
  shared[threadIdx.x] = value;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
    __syncthreads();
  }
  M total = shared[0];
  __syncthreads();
  return total;
}

template <typename T>
__global__ void moments_kernel(const T* __restrict__ x, const T* __restrict__ d1, const T* __restrict__ d0,
                               const T* __restrict__ m, const typename MathOf<T>::type* __restrict__ coefs,
                               double* __restrict__ partial, int64_t n, int64_t blocks) {
  using M = typename MathOf<T>::type;
  __shared__ M shared[kThreads];
  const int64_t block = blockIdx.x, b = blockIdx.y;
  const M* c = coefs + b * 8;
  M s[5] = {0, 0, 0, 0, 0};
  const int64_t start = block * kBlock;
  for (int k = 0; k < kPerThread; ++k) {
    const int64_t index = start + k * kThreads + threadIdx.x;
    if (index >= n) break;
    const int64_t i = b * n + index;
    const M v1 = to_math(d1[i]);
    M e1 = c[1] * v1, e2 = c[5] * v1;
    if (x) {
      const M vx = to_math(x[i]);
      e1 = fma(c[0], vx, e1);
      e2 = fma(c[4], vx, e2);
    }
    if (d0) {
      const M delta = v1 - to_math(d0[i]);
      e1 = fma(c[2], delta, e1);
      e2 = fma(c[6], delta, e2);
    }
    if (m) {
      const M vm = to_math(m[i]);
      e1 = fma(c[3], vm, e1);
      e2 = fma(c[7], vm, e2);
    }
    s[0] += e1;
    s[1] += e2;
    s[2] = fma(e1, e1, s[2]);
    s[3] = fma(e1, e2, s[3]);
    s[4] = fma(e2, e2, s[4]);
  }
  for (int k = 0; k < 5; ++k) {
    const M total = block_sum(s[k], shared);
    if (threadIdx.x == 0) partial[(b * blocks + block) * 5 + k] = static_cast<double>(total);
  }
}

__global__ void sum_blocks_kernel(const double* __restrict__ partial, double* __restrict__ sums, int64_t blocks) {
  __shared__ double shared[kThreads];
  const int64_t b = blockIdx.x;
  for (int k = 0; k < 5; ++k) {
    double acc = 0;
    for (int64_t block = threadIdx.x; block < blocks; block += kThreads) acc += partial[(b * blocks + block) * 5 + k];
    const double total = block_sum(acc, shared);
    if (threadIdx.x == 0) sums[b * 5 + k] = total;
  }
}

template <typename M>
__device__ __forceinline__ M combine(const M* c, M x, M d1, M delta, M m, M e, M noise, bool has_d0, bool has_m,
                                     bool has_e, bool has_noise) {
  M acc = c[0] * x;
  acc = fma(c[1], d1, acc);
  if (has_d0) acc = fma(c[2], delta, acc);
  if (has_m) acc = fma(c[3], m, acc);
  if (has_e) acc = fma(c[4], e, acc);
  if (has_noise) acc = fma(c[5], noise, acc);
  return acc;
}

template <typename T>
__global__ void apply_kernel(const T* x, const T* d1, const T* d0, const T* m, const T* e, const T* noise,
                             const typename MathOf<T>::type* __restrict__ coefs, T* out, T* out2, T* m_out,
                             int* flags, int64_t n) {
  using M = typename MathOf<T>::type;
  const int64_t b = blockIdx.y;
  const M* c = coefs + b * 18;
  int bits = 0;
  for (int64_t index = int64_t(blockIdx.x) * kThreads + threadIdx.x; index < n;
       index += int64_t(gridDim.x) * kThreads) {
    const int64_t i = b * n + index;
    const M vx = to_math(x[i]), v1 = to_math(d1[i]);
    M delta = 0, vm = 0, ve = 0, vn = 0;
    if (non_finite(v1)) bits |= 1;
    if (d0) {
      const M v0 = to_math(d0[i]);
      if (non_finite(v0)) bits |= 2;
      delta = v1 - v0;
    }
    if (m) vm = to_math(m[i]);
    if (e) ve = to_math(e[i]);
    if (noise) vn = to_math(noise[i]);
    const bool hd = d0, hm = m, he = e, hn = noise;
    const T o = from_math<T>(combine(c, vx, v1, delta, vm, ve, vn, hd, hm, he, hn));
    if (out2) out2[i] = from_math<T>(combine(c + 6, vx, v1, delta, vm, ve, vn, hd, hm, he, hn));
    if (m_out) m_out[i] = from_math<T>(combine(c + 12, vx, v1, delta, vm, ve, vn, hd, hm, he, hn));
    out[i] = o;
    if (non_finite(to_math(o))) bits |= 4;
  }
  if (flags && bits) atomicOr(flags, bits);
}

template <typename T>
int launch_moments(const void* x, const void* d1, const void* d0, const void* m, const void* coefs, double* partial,
                   double* sums, int64_t batch, int64_t n, cudaStream_t stream) {
  using M = typename MathOf<T>::type;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  moments_kernel<T><<<dim3(unsigned(blocks), unsigned(batch)), kThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(d1), static_cast<const T*>(d0), static_cast<const T*>(m),
      static_cast<const M*>(coefs), partial, n, blocks);
  sum_blocks_kernel<<<unsigned(batch), kThreads, 0, stream>>>(partial, sums, blocks);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_apply(const void* x, const void* d1, const void* d0, const void* m, const void* e, const void* noise,
                 const void* coefs, void* out, void* out2, void* m_out, int* flags, int64_t batch, int64_t n,
                 cudaStream_t stream) {
  using M = typename MathOf<T>::type;
  int64_t grid_x = (n + kThreads - 1) / kThreads;
  if (grid_x > kApplyBlocksPerSample * 64) grid_x = kApplyBlocksPerSample * 64;
  apply_kernel<T><<<dim3(unsigned(grid_x), unsigned(batch)), kThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(d1), static_cast<const T*>(d0), static_cast<const T*>(m),
      static_cast<const T*>(e), static_cast<const T*>(noise), static_cast<const M*>(coefs), static_cast<T*>(out),
      static_cast<T*>(out2), static_cast<T*>(m_out), flags, n);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" int fastguide_rule_moments_cuda(int dtype, const void* x, const void* d1, const void* d0, const void* m,
                                           const void* coefs, double* partial, double* sums, int64_t batch,
                                           int64_t n, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kRuleFloat32: return launch_moments<float>(x, d1, d0, m, coefs, partial, sums, batch, n, s);
    case kRuleFloat64: return launch_moments<double>(x, d1, d0, m, coefs, partial, sums, batch, n, s);
    case kRuleFloat16: return launch_moments<__half>(x, d1, d0, m, coefs, partial, sums, batch, n, s);
    case kRuleBFloat16: return launch_moments<__nv_bfloat16>(x, d1, d0, m, coefs, partial, sums, batch, n, s);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

extern "C" int fastguide_rule_apply_cuda(int dtype, const void* x, const void* d1, const void* d0, const void* m,
                                         const void* e, const void* noise, const void* coefs, void* out, void* out2,
                                         void* m_out, int* flags, int64_t batch, int64_t n, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kRuleFloat32:
      return launch_apply<float>(x, d1, d0, m, e, noise, coefs, out, out2, m_out, flags, batch, n, s);
    case kRuleFloat64:
      return launch_apply<double>(x, d1, d0, m, e, noise, coefs, out, out2, m_out, flags, batch, n, s);
    case kRuleFloat16:
      return launch_apply<__half>(x, d1, d0, m, e, noise, coefs, out, out2, m_out, flags, batch, n, s);
    case kRuleBFloat16:
      return launch_apply<__nv_bfloat16>(x, d1, d0, m, e, noise, coefs, out, out2, m_out, flags, batch, n, s);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

// The torch-free launchers of the CUDA guided ops (csrc/cuda/guided_ops.cu).  Pointers are to
// contiguous device arrays of n elements of `dtype`; d_guide, noise and denoised_prev may be null
// (absent).  out may be exactly one of the inputs, or disjoint from them.  flags (may be null):
// one int32 on the device that the kernels OR their non-finite bits into (1: d_main, 2: d_guide,
// 4: the stored x_next).  Each returns a cudaError_t as an int.
#pragma once

#include <cstdint>

enum FastguideDtype : int { kFastguideFloat32 = 0, kFastguideFloat64 = 1, kFastguideFloat16 = 2,
                            kFastguideBFloat16 = 3 };

extern "C" {
int fastguide_guided_euler_cuda(int dtype, const void* x, const void* d_main, const void* d_guide,
                                const void* noise, void* out, void* deriv_out, int32_t* flags, int64_t n,
                                double guidance, double t_cur, double t_next, double noise_scale, void* stream);
int fastguide_guided_heun_cuda(int dtype, const void* x, const void* deriv, const void* d_main,
                               const void* d_guide, void* out, int32_t* flags, int64_t n, double guidance,
                               double t_cur, double t_next, void* stream);
int fastguide_guided_dpmpp_2m_cuda(int dtype, const void* x, const void* d_main, const void* d_guide,
                                   const void* denoised_prev, void* out, void* denoised_out, int32_t* flags,
                                   int64_t n, double guidance, double x_coef, double d_coef, double prev_coef,
                                   void* stream);
}

// The torch-free launchers of the CUDA guided ops (csrc/cuda/guided_ops.cu).  Pointers are to
// contiguous device arrays of n elements of `dtype`; d_guide may be null (no guidance).  out may
// be exactly one of the inputs, or disjoint from them.  Each returns a cudaError_t as an int.
#pragma once

#include <cstdint>

enum FastguideDtype : int { kFastguideFloat32 = 0, kFastguideFloat64 = 1, kFastguideFloat16 = 2,
                            kFastguideBFloat16 = 3 };

extern "C" {
int fastguide_guided_euler_cuda(int dtype, const void* x, const void* d_main, const void* d_guide, void* out,
                                void* deriv_out, int64_t n, double guidance, double t_cur, double t_next,
                                void* stream);
int fastguide_guided_heun_cuda(int dtype, const void* x, const void* deriv, const void* d_main,
                               const void* d_guide, void* out, int64_t n, double guidance, double t_cur,
                               double t_next, void* stream);
}

// The torch-free launchers of the CUDA rule ops (csrc/cuda/guided_rules.cu); semantics in
// csrc/guided_rules.h.  Pointers are to contiguous device arrays of batch·n elements of `dtype`
// (codes below); x, d0, m, e, noise, out2, m_out, flags may be null where absent.  coefs: [B,2,4]
// (moments) or [B,3,6] (apply) in the math type (double for float64, else float).  partial: a
// device scratch of batch·ceil(n/1024)·5 doubles.  Each returns a cudaError_t as an int.
#pragma once

#include <cstdint>

enum FastguideRuleDtype : int { kRuleFloat32 = 0, kRuleFloat64 = 1, kRuleFloat16 = 2, kRuleBFloat16 = 3 };

extern "C" {
int fastguide_rule_moments_cuda(int dtype, const void* x, const void* d1, const void* d0, const void* m,
                                const void* coefs, double* partial, double* sums, int64_t batch, int64_t n,
                                void* stream);
int fastguide_rule_apply_cuda(int dtype, const void* x, const void* d1, const void* d0, const void* m, const void* e,
                              const void* noise, const void* coefs, void* out, void* out2, void* m_out, int* flags,
                              int64_t batch, int64_t n, void* stream);
}

// CUDA dispatch-key implementations of the rule ops: the checks of csrc/guided_rules.h, then the
// torch-free launchers of guided_rules.cu on the current stream.  Built only when torch has CUDA
// (setup.py); the schemas are defined in csrc/guided_rules.cpp.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <optional>
#include <utility>

#include "cuda/guided_rules_cuda.h"
#include "guided_rules.h"

namespace {

int rule_dtype_code(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return kRuleFloat32;
    case at::kDouble: return kRuleFloat64;
    case at::kHalf: return kRuleFloat16;
    case at::kBFloat16: return kRuleBFloat16;
    default: break;
  }
  TORCH_CHECK(false, "fastguide rule CUDA kernels: unsupported dtype ", dtype);
  return -1;
}

void check_rule_launch(const char* op, int error) {
  TORCH_CHECK(error == 0, op, ": CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(error)));
}

const void* pointer(const std::optional<at::Tensor>& t) { return t ? t->const_data_ptr() : nullptr; }
void* mutable_pointer(const std::optional<at::Tensor>& t) { return t ? t->mutable_data_ptr() : nullptr; }

at::Tensor rule_moments_cuda(const std::optional<at::Tensor>& x, const at::Tensor& d1,
                             const std::optional<at::Tensor>& d0, const std::optional<at::Tensor>& m,
                             const at::Tensor& coefs) {
  const char* op = "fastguide::rule_moments";
  TORCH_CHECK(d1.is_cuda(), op, ": this kernel needs CUDA tensors, got ", d1.device());
  fastguide::check_rule_coefs(op, coefs, d1, 2, 4);
  fastguide::check_rule_tensor(op, "x", x, d1);
  fastguide::check_rule_tensor(op, "d0", d0, d1);
  fastguide::check_rule_tensor(op, "m", m, d1);
  c10::cuda::CUDAGuard guard(d1.device());
  const int64_t batch = d1.size(0);
  auto sums = at::zeros({batch, 5}, d1.options().dtype(at::kDouble));
  const int64_t n = d1.numel() / batch;
  if (n == 0) return sums;
  auto d1c = d1.contiguous();
  auto xc = fastguide::contiguous_or_none(x), d0c = fastguide::contiguous_or_none(d0),
       mc = fastguide::contiguous_or_none(m);
  auto cc = coefs.contiguous();
  const int64_t blocks = (n + fastguide::kRuleBlock - 1) / fastguide::kRuleBlock;
  auto partial = at::empty({batch, blocks, 5}, d1.options().dtype(at::kDouble));
  void* stream = c10::cuda::getCurrentCUDAStream(d1.device().index()).stream();
  check_rule_launch(op, fastguide_rule_moments_cuda(rule_dtype_code(d1.scalar_type()), pointer(xc),
                                                    d1c.const_data_ptr(), pointer(d0c), pointer(mc),
                                                    cc.const_data_ptr(), partial.mutable_data_ptr<double>(),
                                                    sums.mutable_data_ptr<double>(), batch, n, stream));
  return sums;
}

void rule_apply_cuda(const at::Tensor& x, const at::Tensor& d1, const std::optional<at::Tensor>& d0,
                     const std::optional<at::Tensor>& m, const std::optional<at::Tensor>& e,
                     const std::optional<at::Tensor>& noise, const at::Tensor& coefs, const at::Tensor& out,
                     const std::optional<at::Tensor>& out2, const std::optional<at::Tensor>& m_out,
                     const std::optional<at::Tensor>& flags) {
  const char* op = "fastguide::rule_apply";
  fastguide::check_rule_apply(op, c10::DeviceType::CUDA, x, d1, d0, m, e, noise, coefs, out, out2, m_out, flags);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t batch = x.size(0);
  const int64_t n = x.numel() / batch;
  if (n == 0) return;
  auto xc = x.contiguous(), d1c = d1.contiguous();
  auto d0c = fastguide::contiguous_or_none(d0), mc = fastguide::contiguous_or_none(m),
       ec = fastguide::contiguous_or_none(e), nc = fastguide::contiguous_or_none(noise);
  auto cc = coefs.contiguous();
  void* stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  int* flags_ptr = flags ? flags->mutable_data_ptr<int>() : nullptr;
  check_rule_launch(op, fastguide_rule_apply_cuda(rule_dtype_code(x.scalar_type()), xc.const_data_ptr(),
                                                  d1c.const_data_ptr(), pointer(d0c), pointer(mc), pointer(ec),
                                                  pointer(nc), cc.const_data_ptr(), out.mutable_data_ptr(),
                                                  mutable_pointer(out2), mutable_pointer(m_out), flags_ptr, batch, n,
                                                  stream));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastguide, CUDA, m) {
  m.impl("rule_moments", &rule_moments_cuda);
  m.impl("rule_apply", &rule_apply_cuda);
}

// What the CPU and CUDA implementations of the rule ops share: the schemas' argument checks and
// the fixed block size of the per-sample reductions (so that every backend sums the same blocks).
//
// rule_moments(x?, d1, d0?, m?, coefs[B,2,4]) -> sums[B,5] float64
//   e_j = c[b,j,0]·x + c[b,j,1]·d1 + c[b,j,2]·(d1 − d0) + c[b,j,3]·m (absent terms left out);
//   sums = (Σe1, Σe2, Σe1², Σe1·e2, Σe2²) per sample.  Each sample's elements are cut into blocks of
//   kRuleBlock from the sample's start; a block is summed in the math type (float32, float64 for
//   float64), the blocks' sums added in float64 in block order.  The bits therefore depend on
//   neither the batch around a sample nor the thread count.
// rule_apply(x, d1, d0?, m?, e?, noise?, coefs[B,3,6], *, out, out2?, m_out?, flags?)
//   target_j = Σ_k c[b,j,k]·input_k over (x, d1, d1 − d0, m, e, noise), j = out, out2, m_out; every
//   input of an element is read before any output of it is written (an output may be an input).
//   flags (int32 [1]) |= 1 if d1 has a NaN/inf, 2 if d0 has, 4 if the written out has.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <utility>

namespace fastguide {

constexpr int64_t kRuleBlock = 1024;

inline at::ScalarType rule_math_type(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_rule_tensor(const char* op, const char* name, const std::optional<at::Tensor>& t,
                              const at::Tensor& ref) {
  if (!t) return;
  TORCH_CHECK(t->device() == ref.device(), op, ": ", name, " is on ", t->device(), ", expected ", ref.device());
  TORCH_CHECK(t->scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t->scalar_type(), ", expected ",
              ref.scalar_type());
  TORCH_CHECK(t->sizes() == ref.sizes(), op, ": ", name, " has shape ", t->sizes(), ", expected ", ref.sizes());
}

inline void check_rule_coefs(const char* op, const at::Tensor& coefs, const at::Tensor& ref, int64_t rows,
                             int64_t cols) {
  TORCH_CHECK(ref.dim() >= 1 && ref.size(0) >= 1, op, ": the tensors need a batch dimension");
  TORCH_CHECK(coefs.device() == ref.device(), op, ": coefs is on ", coefs.device(), ", expected ", ref.device());
  TORCH_CHECK(coefs.scalar_type() == rule_math_type(ref.scalar_type()), op, ": coefs must have dtype ",
              rule_math_type(ref.scalar_type()), ", got ", coefs.scalar_type());
  TORCH_CHECK(coefs.dim() == 3 && coefs.size(0) == ref.size(0) && coefs.size(1) == rows && coefs.size(2) == cols,
              op, ": coefs must have shape [", ref.size(0), ", ", rows, ", ", cols, "], got ", coefs.sizes());
  auto dtype = ref.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": tensors must be float32, float64, float16 or bfloat16, got ", dtype);
}

inline void check_rule_output(const char* op, const char* name, const std::optional<at::Tensor>& t,
                              const at::Tensor& ref) {
  check_rule_tensor(op, name, t, ref);
  if (t) TORCH_CHECK(t->is_contiguous(), op, ": ", name, " must be contiguous");
}

// Every argument of rule_apply, on the CPU or the CUDA kernel's device type.
inline void check_rule_apply(const char* op, c10::DeviceType device_type, const at::Tensor& x, const at::Tensor& d1,
                             const std::optional<at::Tensor>& d0, const std::optional<at::Tensor>& m,
                             const std::optional<at::Tensor>& e, const std::optional<at::Tensor>& noise,
                             const at::Tensor& coefs, const at::Tensor& out, const std::optional<at::Tensor>& out2,
                             const std::optional<at::Tensor>& m_out, const std::optional<at::Tensor>& flags) {
  TORCH_CHECK(x.device().type() == device_type, op, ": this kernel needs ", device_type, " tensors, got ",
              x.device());
  check_rule_coefs(op, coefs, x, 3, 6);
  for (auto [name, t] : {std::pair{"d1", std::optional<at::Tensor>(d1)}, std::pair{"d0", d0}, std::pair{"m", m},
                         std::pair{"e", e}, std::pair{"noise", noise}}) {
    check_rule_tensor(op, name, t, x);
  }
  check_rule_output(op, "out", out, x);
  check_rule_output(op, "out2", out2, x);
  check_rule_output(op, "m_out", m_out, x);
  if (flags) {
    TORCH_CHECK(flags->scalar_type() == at::kInt && flags->numel() == 1 && flags->device() == x.device(), op,
                ": flags must be an int32 tensor of one element on ", x.device());
  }
}

inline std::optional<at::Tensor> contiguous_or_none(const std::optional<at::Tensor>& t) {
  if (!t) return std::nullopt;
  return t->contiguous();
}

}  // namespace fastguide

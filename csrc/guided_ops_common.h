// What the CPU and CUDA implementations of the guided ops share: argument checks, contiguous
// inputs, and the buffers the kernels write (out itself, or a temporary copied into it).
// A kernel launcher only sees contiguous tensors of one dtype and element count.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <cmath>
#include <initializer_list>
#include <optional>
#include <tuple>
#include <vector>

namespace fastguide {

inline void check_tensor(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), ", expected x's device ", x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              ", expected x's dtype ", x.scalar_type());
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": ", name, " has shape ", t.sizes(), ", expected x's shape ", x.sizes());
}

inline void check_x(const char* op, const at::Tensor& x, c10::DeviceType device_type) {
  TORCH_CHECK(x.device().type() == device_type, op, ": this kernel needs ", device_type, " tensors, got x on ",
              x.device());
  auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": x must be float32, float64, float16 or bfloat16, got ", dtype);
}

inline void check_times(const char* op, double guidance, double t_cur, double t_next, bool positive_t_next) {
  TORCH_CHECK(std::isfinite(guidance) && std::isfinite(t_cur) && std::isfinite(t_next), op,
              ": guidance, t_cur and t_next must be finite, got ", guidance, ", ", t_cur, ", ", t_next);
  TORCH_CHECK(t_cur > 0, op, ": t_cur must be > 0, got ", t_cur);
  TORCH_CHECK(!positive_t_next || t_next > 0, op, ": t_next must be > 0, got ", t_next);
}

inline bool may_overlap(const at::Tensor& a, const at::Tensor& b) {
  auto status = at::get_overlap_status(a, b);
  return status == at::MemOverlapStatus::Full || status == at::MemOverlapStatus::Partial ||
         (status == at::MemOverlapStatus::TooHard && a.storage().is_alias_of(b.storage()));
}

// Where the kernel writes: `out` itself when it is contiguous and either is exactly one of the
// inputs or overlaps none of them; otherwise a fresh buffer that finish() copies into `out`.
inline at::Tensor target_for(const at::Tensor& out, const std::vector<at::Tensor>& inputs) {
  at::assert_no_internal_overlap(out);
  bool direct = out.is_contiguous();
  for (const auto& input : inputs) {
    auto status = at::get_overlap_status(out, input);
    direct = direct && (status == at::MemOverlapStatus::No || status == at::MemOverlapStatus::Full);
  }
  return direct ? out : at::empty(out.sizes(), out.options());
}

inline void finish(const at::Tensor& target, const at::Tensor& out) {
  if (!target.is_same(out)) out.copy_(target);
}

// The inputs made contiguous; an absent d_guide is left out (so it is always the last one).
inline std::vector<at::Tensor> contiguous_inputs(std::initializer_list<std::optional<at::Tensor>> tensors) {
  std::vector<at::Tensor> inputs;
  for (const auto& t : tensors) {
    if (t.has_value()) inputs.push_back(t->contiguous());
  }
  return inputs;
}

// launch(inputs = {x, d_main[, d_guide]}, next, deriv) runs the kernel on contiguous tensors.
template <typename Launch>
void guided_euler_out_impl(c10::DeviceType device_type, const at::Tensor& x, const at::Tensor& d_main,
                           const std::optional<at::Tensor>& d_guide, double guidance, double t_cur, double t_next,
                           const at::Tensor& out, const at::Tensor& deriv_out, Launch launch) {
  const char* op = "fastguide::guided_euler";
  check_x(op, x, device_type);
  check_tensor(op, "d_main", d_main, x);
  if (d_guide) check_tensor(op, "d_guide", *d_guide, x);
  check_tensor(op, "out", out, x);
  check_tensor(op, "deriv_out", deriv_out, x);
  check_times(op, guidance, t_cur, t_next, false);
  TORCH_CHECK(!may_overlap(out, deriv_out), op, ": out and deriv_out must not share memory");
  auto inputs = contiguous_inputs({x, d_main, d_guide});
  at::Tensor next = target_for(out, inputs), deriv = target_for(deriv_out, inputs);
  if (x.numel() > 0) launch(inputs, next, deriv);
  finish(next, out);
  finish(deriv, deriv_out);
}

// launch(inputs = {x, deriv, d_main[, d_guide]}, next) runs the kernel on contiguous tensors.
template <typename Launch>
void guided_heun_out_impl(c10::DeviceType device_type, const at::Tensor& x, const at::Tensor& deriv,
                          const at::Tensor& d_main, const std::optional<at::Tensor>& d_guide, double guidance,
                          double t_cur, double t_next, const at::Tensor& out, Launch launch) {
  const char* op = "fastguide::guided_heun";
  check_x(op, x, device_type);
  check_tensor(op, "deriv", deriv, x);
  check_tensor(op, "d_main", d_main, x);
  if (d_guide) check_tensor(op, "d_guide", *d_guide, x);
  check_tensor(op, "out", out, x);
  check_times(op, guidance, t_cur, t_next, true);
  auto inputs = contiguous_inputs({x, deriv, d_main, d_guide});
  at::Tensor next = target_for(out, inputs);
  if (x.numel() > 0) launch(inputs, next);
  finish(next, out);
}

}  // namespace fastguide

namespace fastguide {

// The functional ops (fresh outputs) from an out= implementation OutFn.
template <auto OutFn>
std::tuple<at::Tensor, at::Tensor> guided_euler_functional(const at::Tensor& x, const at::Tensor& d_main,
                                                           const std::optional<at::Tensor>& d_guide, double guidance,
                                                           double t_cur, double t_next) {
  auto out = at::empty(x.sizes(), x.options());
  auto deriv_out = at::empty(x.sizes(), x.options());
  OutFn(x, d_main, d_guide, guidance, t_cur, t_next, out, deriv_out);
  return {out, deriv_out};
}

template <auto OutFn>
at::Tensor guided_heun_functional(const at::Tensor& x, const at::Tensor& deriv, const at::Tensor& d_main,
                                  const std::optional<at::Tensor>& d_guide, double guidance, double t_cur,
                                  double t_next) {
  auto out = at::empty(x.sizes(), x.options());
  OutFn(x, deriv, d_main, d_guide, guidance, t_cur, t_next, out);
  return out;
}

}  // namespace fastguide

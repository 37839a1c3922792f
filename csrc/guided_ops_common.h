// What the CPU and CUDA implementations of the guided ops share: argument checks, contiguous
// inputs, and the buffers the kernels write (out itself, or a temporary copied into it).
// A kernel launcher only sees contiguous tensors of one dtype and element count (an absent
// optional input is an undefined tensor), and the flags pointer (null without flags).
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <cmath>
#include <initializer_list>
#include <optional>
#include <tuple>
#include <utility>
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

// Each scalar finite (they come from Python floats: NaN and ±inf get through the schema).
inline void check_finite(const char* op, std::initializer_list<std::pair<const char*, double>> scalars) {
  for (const auto& [name, value] : scalars) {
    TORCH_CHECK(std::isfinite(value), op, ": ", name, " must be finite, got ", value);
  }
}

inline void check_flags(const char* op, const std::optional<at::Tensor>& flags, const at::Tensor& x) {
  if (!flags) return;
  TORCH_CHECK(flags->scalar_type() == at::kInt, op, ": flags must be int32, got ", flags->scalar_type());
  TORCH_CHECK(flags->numel() == 1, op, ": flags must have one element, got ", flags->numel());
  TORCH_CHECK(flags->device() == x.device(), op, ": flags is on ", flags->device(), ", expected x's device ",
              x.device());
}

// Where the kernels OR their non-finite bits (1: d_main, 2: d_guide, 4: x_next); null: nowhere.
inline int32_t* flags_pointer(const std::optional<at::Tensor>& flags) {
  return flags ? flags->mutable_data_ptr<int32_t>() : nullptr;
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
    if (!input.defined()) continue;
    auto status = at::get_overlap_status(out, input);
    direct = direct && (status == at::MemOverlapStatus::No || status == at::MemOverlapStatus::Full);
  }
  return direct ? out : at::empty(out.sizes(), out.options());
}

inline void finish(const at::Tensor& target, const at::Tensor& out) {
  if (!target.is_same(out)) out.copy_(target);
}

// The inputs made contiguous, in order; an absent optional one stays an undefined tensor.
inline std::vector<at::Tensor> contiguous_inputs(std::initializer_list<std::optional<at::Tensor>> tensors) {
  std::vector<at::Tensor> inputs;
  for (const auto& t : tensors) inputs.push_back(t.has_value() ? t->contiguous() : at::Tensor());
  return inputs;
}

// launch(inputs = {x, d_main, d_guide?, noise?}, next, deriv, flags) runs the kernel on contiguous tensors.
template <typename Launch>
void guided_euler_out_impl(c10::DeviceType device_type, const at::Tensor& x, const at::Tensor& d_main,
                           const std::optional<at::Tensor>& d_guide, double guidance, double t_cur, double t_next,
                           const std::optional<at::Tensor>& noise, double noise_scale, const at::Tensor& out,
                           const at::Tensor& deriv_out, const std::optional<at::Tensor>& flags, Launch launch) {
  const char* op = "fastguide::guided_euler";
  check_x(op, x, device_type);
  check_tensor(op, "d_main", d_main, x);
  if (d_guide) check_tensor(op, "d_guide", *d_guide, x);
  if (noise) check_tensor(op, "noise", *noise, x);
  check_tensor(op, "out", out, x);
  check_tensor(op, "deriv_out", deriv_out, x);
  check_flags(op, flags, x);
  check_finite(op, {{"guidance", guidance}, {"t_cur", t_cur}, {"t_next", t_next}, {"noise_scale", noise_scale}});
  TORCH_CHECK(t_cur > 0, op, ": t_cur must be > 0, got ", t_cur);
  TORCH_CHECK(!may_overlap(out, deriv_out), op, ": out and deriv_out must not share memory");
  auto inputs = contiguous_inputs({x, d_main, d_guide, noise});
  at::Tensor next = target_for(out, inputs), deriv = target_for(deriv_out, inputs);
  if (x.numel() > 0) launch(inputs, next, deriv, flags_pointer(flags));
  finish(next, out);
  finish(deriv, deriv_out);
}

// launch(inputs = {x, deriv, d_main, d_guide?}, next, flags) runs the kernel on contiguous tensors.
template <typename Launch>
void guided_heun_out_impl(c10::DeviceType device_type, const at::Tensor& x, const at::Tensor& deriv,
                          const at::Tensor& d_main, const std::optional<at::Tensor>& d_guide, double guidance,
                          double t_cur, double t_next, const at::Tensor& out, const std::optional<at::Tensor>& flags,
                          Launch launch) {
  const char* op = "fastguide::guided_heun";
  check_x(op, x, device_type);
  check_tensor(op, "deriv", deriv, x);
  check_tensor(op, "d_main", d_main, x);
  if (d_guide) check_tensor(op, "d_guide", *d_guide, x);
  check_tensor(op, "out", out, x);
  check_flags(op, flags, x);
  check_finite(op, {{"guidance", guidance}, {"t_cur", t_cur}, {"t_next", t_next}});
  TORCH_CHECK(t_cur > 0, op, ": t_cur must be > 0, got ", t_cur);
  TORCH_CHECK(t_next > 0, op, ": t_next must be > 0, got ", t_next);
  auto inputs = contiguous_inputs({x, deriv, d_main, d_guide});
  at::Tensor next = target_for(out, inputs);
  if (x.numel() > 0) launch(inputs, next, flags_pointer(flags));
  finish(next, out);
}

// launch(inputs = {x, d_main, d_guide?, denoised_prev?}, next, denoised, flags) runs the kernel on
// contiguous tensors.  denoised_prev is left out when prev_coef == 0: it is not read then.
template <typename Launch>
void guided_dpmpp_2m_out_impl(c10::DeviceType device_type, const at::Tensor& x, const at::Tensor& d_main,
                              const std::optional<at::Tensor>& d_guide,
                              const std::optional<at::Tensor>& denoised_prev, double guidance, double x_coef,
                              double d_coef, double prev_coef, const at::Tensor& out, const at::Tensor& denoised_out,
                              const std::optional<at::Tensor>& flags, Launch launch) {
  const char* op = "fastguide::guided_dpmpp_2m";
  check_x(op, x, device_type);
  check_tensor(op, "d_main", d_main, x);
  if (d_guide) check_tensor(op, "d_guide", *d_guide, x);
  if (denoised_prev) check_tensor(op, "denoised_prev", *denoised_prev, x);
  check_tensor(op, "out", out, x);
  check_tensor(op, "denoised_out", denoised_out, x);
  check_flags(op, flags, x);
  check_finite(op, {{"guidance", guidance}, {"x_coef", x_coef}, {"d_coef", d_coef}, {"prev_coef", prev_coef}});
  TORCH_CHECK(prev_coef == 0 || denoised_prev, op, ": denoised_prev must be a tensor when prev_coef != 0 (got ",
              prev_coef, ")");
  TORCH_CHECK(!may_overlap(out, denoised_out), op, ": out and denoised_out must not share memory");
  auto read_prev = prev_coef != 0 ? denoised_prev : std::nullopt;
  auto inputs = contiguous_inputs({x, d_main, d_guide, read_prev});
  at::Tensor next = target_for(out, inputs), denoised = target_for(denoised_out, inputs);
  if (x.numel() > 0) launch(inputs, next, denoised, flags_pointer(flags));
  finish(next, out);
  finish(denoised, denoised_out);
}

}  // namespace fastguide

namespace fastguide {

// The functional ops (fresh outputs, no flags) from an out= implementation OutFn.
template <auto OutFn>
std::tuple<at::Tensor, at::Tensor> guided_euler_functional(const at::Tensor& x, const at::Tensor& d_main,
                                                           const std::optional<at::Tensor>& d_guide, double guidance,
                                                           double t_cur, double t_next,
                                                           const std::optional<at::Tensor>& noise,
                                                           double noise_scale) {
  auto out = at::empty(x.sizes(), x.options());
  auto deriv_out = at::empty(x.sizes(), x.options());
  OutFn(x, d_main, d_guide, guidance, t_cur, t_next, noise, noise_scale, out, deriv_out, std::nullopt);
  return {out, deriv_out};
}

template <auto OutFn>
at::Tensor guided_heun_functional(const at::Tensor& x, const at::Tensor& deriv, const at::Tensor& d_main,
                                  const std::optional<at::Tensor>& d_guide, double guidance, double t_cur,
                                  double t_next) {
  auto out = at::empty(x.sizes(), x.options());
  OutFn(x, deriv, d_main, d_guide, guidance, t_cur, t_next, out, std::nullopt);
  return out;
}

template <auto OutFn>
std::tuple<at::Tensor, at::Tensor> guided_dpmpp_2m_functional(const at::Tensor& x, const at::Tensor& d_main,
                                                              const std::optional<at::Tensor>& d_guide,
                                                              const std::optional<at::Tensor>& denoised_prev,
                                                              double guidance, double x_coef, double d_coef,
                                                              double prev_coef) {
  auto out = at::empty(x.sizes(), x.options());
  auto denoised_out = at::empty(x.sizes(), x.options());
  OutFn(x, d_main, d_guide, denoised_prev, guidance, x_coef, d_coef, prev_coef, out, denoised_out, std::nullopt);
  return {out, denoised_out};
}

}  // namespace fastguide

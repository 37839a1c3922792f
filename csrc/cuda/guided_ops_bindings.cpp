// CUDA dispatch-key implementations of the guided ops: checks and buffers from
// guided_ops_common.h, then the torch-free launchers of guided_ops.cu on the current stream.
// Built only when torch has CUDA (setup.py); the schemas are defined in csrc/guided_ops.cpp.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "cuda/guided_ops.h"
#include "guided_ops_common.h"

namespace {

int dtype_code(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return kFastguideFloat32;
    case at::kDouble: return kFastguideFloat64;
    case at::kHalf: return kFastguideFloat16;
    case at::kBFloat16: return kFastguideBFloat16;
    default: break;
  }
  TORCH_CHECK(false, "fastguide CUDA kernels: unsupported dtype ", dtype);
  return -1;
}

void check_launch(const char* op, int error) {
  TORCH_CHECK(error == 0, op, ": CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(error)));
}

// The input's data, or null for an absent (undefined) optional input.
const void* data_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

void* current_stream(const at::Tensor& x) { return c10::cuda::getCurrentCUDAStream(x.device().index()).stream(); }

void guided_euler_out_cuda(const at::Tensor& x, const at::Tensor& d_main, const std::optional<at::Tensor>& d_guide,
                           double guidance, double t_cur, double t_next, const std::optional<at::Tensor>& noise,
                           double noise_scale, const at::Tensor& out, const at::Tensor& deriv_out,
                           const std::optional<at::Tensor>& flags) {
  auto launch = [&](const std::vector<at::Tensor>& inputs, const at::Tensor& next, const at::Tensor& deriv,
                    int32_t* flags_ptr) {
    c10::cuda::CUDAGuard guard(x.device());
    int error = fastguide_guided_euler_cuda(dtype_code(x.scalar_type()), inputs[0].const_data_ptr(),
                                            inputs[1].const_data_ptr(), data_or_null(inputs[2]),
                                            data_or_null(inputs[3]), next.mutable_data_ptr(),
                                            deriv.mutable_data_ptr(), flags_ptr, x.numel(), guidance, t_cur, t_next,
                                            noise_scale, current_stream(x));
    check_launch("fastguide::guided_euler", error);
  };
  fastguide::guided_euler_out_impl(c10::DeviceType::CUDA, x, d_main, d_guide, guidance, t_cur, t_next, noise,
                                   noise_scale, out, deriv_out, flags, launch);
}

void guided_heun_out_cuda(const at::Tensor& x, const at::Tensor& deriv, const at::Tensor& d_main,
                          const std::optional<at::Tensor>& d_guide, double guidance, double t_cur, double t_next,
                          const at::Tensor& out, const std::optional<at::Tensor>& flags) {
  auto launch = [&](const std::vector<at::Tensor>& inputs, const at::Tensor& next, int32_t* flags_ptr) {
    c10::cuda::CUDAGuard guard(x.device());
    int error = fastguide_guided_heun_cuda(dtype_code(x.scalar_type()), inputs[0].const_data_ptr(),
                                           inputs[1].const_data_ptr(), inputs[2].const_data_ptr(),
                                           data_or_null(inputs[3]), next.mutable_data_ptr(), flags_ptr, x.numel(),
                                           guidance, t_cur, t_next, current_stream(x));
    check_launch("fastguide::guided_heun", error);
  };
  fastguide::guided_heun_out_impl(c10::DeviceType::CUDA, x, deriv, d_main, d_guide, guidance, t_cur, t_next, out,
                                  flags, launch);
}

void guided_dpmpp_2m_out_cuda(const at::Tensor& x, const at::Tensor& d_main, const std::optional<at::Tensor>& d_guide,
                              const std::optional<at::Tensor>& denoised_prev, double guidance, double x_coef,
                              double d_coef, double prev_coef, const at::Tensor& out, const at::Tensor& denoised_out,
                              const std::optional<at::Tensor>& flags) {
  auto launch = [&](const std::vector<at::Tensor>& inputs, const at::Tensor& next, const at::Tensor& denoised,
                    int32_t* flags_ptr) {
    c10::cuda::CUDAGuard guard(x.device());
    int error = fastguide_guided_dpmpp_2m_cuda(dtype_code(x.scalar_type()), inputs[0].const_data_ptr(),
                                               inputs[1].const_data_ptr(), data_or_null(inputs[2]),
                                               data_or_null(inputs[3]), next.mutable_data_ptr(),
                                               denoised.mutable_data_ptr(), flags_ptr, x.numel(), guidance, x_coef,
                                               d_coef, prev_coef, current_stream(x));
    check_launch("fastguide::guided_dpmpp_2m", error);
  };
  fastguide::guided_dpmpp_2m_out_impl(c10::DeviceType::CUDA, x, d_main, d_guide, denoised_prev, guidance, x_coef,
                                      d_coef, prev_coef, out, denoised_out, flags, launch);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastguide, CUDA, m) {
  m.impl("guided_euler", &fastguide::guided_euler_functional<&guided_euler_out_cuda>);
  m.impl("guided_euler_out", &guided_euler_out_cuda);
  m.impl("guided_heun", &fastguide::guided_heun_functional<&guided_heun_out_cuda>);
  m.impl("guided_heun_out", &guided_heun_out_cuda);
  m.impl("guided_dpmpp_2m", &fastguide::guided_dpmpp_2m_functional<&guided_dpmpp_2m_out_cuda>);
  m.impl("guided_dpmpp_2m_out", &guided_dpmpp_2m_out_cuda);
}

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

const void* guide_pointer(const std::vector<at::Tensor>& inputs, size_t index) {
  return inputs.size() > index ? inputs[index].const_data_ptr() : nullptr;
}

void guided_euler_out_cuda(const at::Tensor& x, const at::Tensor& d_main, const std::optional<at::Tensor>& d_guide,
                           double guidance, double t_cur, double t_next, const at::Tensor& out,
                           const at::Tensor& deriv_out) {
  auto launch = [&](const std::vector<at::Tensor>& inputs, const at::Tensor& next, const at::Tensor& deriv) {
    c10::cuda::CUDAGuard guard(x.device());
    void* stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
    int error = fastguide_guided_euler_cuda(dtype_code(x.scalar_type()), inputs[0].const_data_ptr(),
                                            inputs[1].const_data_ptr(), guide_pointer(inputs, 2),
                                            next.mutable_data_ptr(), deriv.mutable_data_ptr(), x.numel(), guidance,
                                            t_cur, t_next, stream);
    check_launch("fastguide::guided_euler", error);
  };
  fastguide::guided_euler_out_impl(c10::DeviceType::CUDA, x, d_main, d_guide, guidance, t_cur, t_next, out, deriv_out,
                                   launch);
}

void guided_heun_out_cuda(const at::Tensor& x, const at::Tensor& deriv, const at::Tensor& d_main,
                          const std::optional<at::Tensor>& d_guide, double guidance, double t_cur, double t_next,
                          const at::Tensor& out) {
  auto launch = [&](const std::vector<at::Tensor>& inputs, const at::Tensor& next) {
    c10::cuda::CUDAGuard guard(x.device());
    void* stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
    int error = fastguide_guided_heun_cuda(dtype_code(x.scalar_type()), inputs[0].const_data_ptr(),
                                           inputs[1].const_data_ptr(), inputs[2].const_data_ptr(),
                                           guide_pointer(inputs, 3), next.mutable_data_ptr(), x.numel(), guidance,
                                           t_cur, t_next, stream);
    check_launch("fastguide::guided_heun", error);
  };
  fastguide::guided_heun_out_impl(c10::DeviceType::CUDA, x, deriv, d_main, d_guide, guidance, t_cur, t_next, out,
                                  launch);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastguide, CUDA, m) {
  m.impl("guided_euler", &fastguide::guided_euler_functional<&guided_euler_out_cuda>);
  m.impl("guided_euler_out", &guided_euler_out_cuda);
  m.impl("guided_heun", &fastguide::guided_heun_functional<&guided_heun_out_cuda>);
  m.impl("guided_heun_out", &guided_heun_out_cuda);
}

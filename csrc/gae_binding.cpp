// The torch side of the GAE extension: registers `torch.ops.apa_fast.gae` with a CPU kernel and, when built
// with CUDA (APA_FAST_WITH_CUDA), a CUDA kernel; checks the arguments and hands raw pointers to the kernels
// (gae_cpu.h, gae_cuda.cu). `apa_fast._C.with_cuda` says which kernels were built.
#include <ATen/Dispatch.h>
#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <type_traits>

#include "gae_cpu.h"

#ifdef APA_FAST_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "gae_cuda.cuh"
#endif

namespace {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;

bool is_supported_float(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16;
}

void check_inputs(const Tensor& rewards, const Tensor& values, const OptionalTensor& mask, double gamma,
                  double lam, c10::DeviceType kernel_device) {
  TORCH_CHECK(rewards.dim() == 2, "apa_fast::gae: rewards must be 2-D (B, T), got shape ", rewards.sizes());
  TORCH_CHECK(values.sizes() == rewards.sizes(), "apa_fast::gae: values must have the shape of rewards ",
              rewards.sizes(), ", got ", values.sizes());
  TORCH_CHECK(is_supported_float(rewards.scalar_type()),
              "apa_fast::gae: rewards must be float32, float64, float16 or bfloat16, got ", rewards.scalar_type());
  TORCH_CHECK(values.scalar_type() == rewards.scalar_type(), "apa_fast::gae: values must have the dtype of rewards (",
              rewards.scalar_type(), "), got ", values.scalar_type());
  TORCH_CHECK(rewards.device().type() == kernel_device, "apa_fast::gae: rewards must be a ", kernel_device,
              " tensor for this kernel, got one on ", rewards.device());
  TORCH_CHECK(values.device() == rewards.device(), "apa_fast::gae: values must be on the device of rewards (",
              rewards.device(), "), got ", values.device());
  if (mask) {
    TORCH_CHECK(mask->sizes() == rewards.sizes(), "apa_fast::gae: mask must have the shape of rewards ",
                rewards.sizes(), ", got ", mask->sizes());
    TORCH_CHECK(mask->scalar_type() == at::kBool, "apa_fast::gae: mask must be a bool tensor, got ",
                mask->scalar_type());
    TORCH_CHECK(mask->device() == rewards.device(), "apa_fast::gae: mask must be on the device of rewards (",
                rewards.device(), "), got ", mask->device());
  }
  TORCH_CHECK(gamma >= 0.0 && gamma <= 1.0, "apa_fast::gae: gamma must be in [0, 1], got ", gamma);
  TORCH_CHECK(lam >= 0.0 && lam <= 1.0, "apa_fast::gae: lam must be in [0, 1], got ", lam);
}

// The element type a kernel reads for a torch dtype; the CUDA kernel takes CUDA's own 16-bit float types.
template <typename Scalar>
struct SameElement {
  using type = Scalar;
};

// Checks the arguments, allocates the outputs (float32, or float64 for float64 inputs) and calls
// `launch(problem)` with a GaeProblem typed for the inputs' dtype.
template <template <typename> class KernelElement, typename Launch>
std::tuple<Tensor, Tensor> run_gae(const Tensor& rewards_in, const Tensor& values_in, const OptionalTensor& mask_in,
                                   double gamma, double lam, c10::DeviceType kernel_device, Launch&& launch) {
  check_inputs(rewards_in, values_in, mask_in, gamma, lam, kernel_device);
  const Tensor rewards = rewards_in.contiguous();
  const Tensor values = values_in.contiguous();
  const OptionalTensor mask = mask_in ? OptionalTensor(mask_in->contiguous()) : std::nullopt;
  const auto out_dtype = rewards.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor advantages = at::empty(rewards.sizes(), rewards.options().dtype(out_dtype));
  Tensor returns = at::empty(rewards.sizes(), rewards.options().dtype(out_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rewards.scalar_type(), "apa_fast::gae", [&] {
    using In = typename KernelElement<scalar_t>::type;
    using Acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const apa_fast::GaeProblem<In, Acc> problem = {
        reinterpret_cast<const In*>(rewards.const_data_ptr<scalar_t>()),
        reinterpret_cast<const In*>(values.const_data_ptr<scalar_t>()),
        mask ? mask->const_data_ptr<bool>() : nullptr,
        advantages.mutable_data_ptr<Acc>(),
        returns.mutable_data_ptr<Acc>(),
        rewards.size(0),
        rewards.size(1),
        {static_cast<Acc>(gamma), static_cast<Acc>(gamma * lam)}};
    launch(problem);
  });
  return {advantages, returns};
}

std::tuple<Tensor, Tensor> gae_cpu(const Tensor& rewards, const Tensor& values, const OptionalTensor& mask,
                                   double gamma, double lam, bool whiten) {
  return run_gae<SameElement>(rewards, values, mask, gamma, lam, c10::DeviceType::CPU,
                              [&](const auto& problem) { apa_fast::cpu::gae(problem, whiten); });
}

#ifdef APA_FAST_WITH_CUDA
template <typename Scalar>
struct CudaElement : SameElement<Scalar> {};
template <>
struct CudaElement<at::Half> {
  using type = __half;
};
template <>
struct CudaElement<at::BFloat16> {
  using type = __nv_bfloat16;
};

std::tuple<Tensor, Tensor> gae_cuda(const Tensor& rewards, const Tensor& values, const OptionalTensor& mask,
                                    double gamma, double lam, bool whiten) {
  const c10::cuda::OptionalCUDAGuard device_guard(rewards.device());
  return run_gae<CudaElement>(rewards, values, mask, gamma, lam, c10::DeviceType::CUDA, [&](const auto& problem) {
    using Acc = std::remove_pointer_t<decltype(problem.advantages)>;
    Tensor workspace;
    if (whiten) {
      const auto bytes = static_cast<int64_t>(apa_fast::cuda::whiten_workspace_bytes<Acc>(problem.rows));
      workspace = at::empty({bytes}, rewards.options().dtype(at::kByte));
    }
    C10_CUDA_CHECK(apa_fast::cuda::launch_gae(problem, whiten ? workspace.data_ptr() : nullptr,
                                              at::cuda::getCurrentCUDAStream()));
  });
}
#endif

}  // namespace

TORCH_LIBRARY(apa_fast, m) {
  m.def("gae(Tensor rewards, Tensor values, Tensor? mask, float gamma, float lam, bool whiten)"
        " -> (Tensor advantages, Tensor returns)");
}

TORCH_LIBRARY_IMPL(apa_fast, CPU, m) { m.impl("gae", &gae_cpu); }

// GAE reads rewards and values as data, with no gradient: autograd passes the op by, so its outputs never
// require grad (without this, inputs that require grad would give outputs whose backward silently does nothing).
TORCH_LIBRARY_IMPL(apa_fast, Autograd, m) { m.impl("gae", torch::CppFunction::makeFallthrough()); }

#ifdef APA_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(apa_fast, CUDA, m) { m.impl("gae", &gae_cuda); }
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "apa_fast compiled kernels: torch.ops.apa_fast.gae (batched GAE)";
#ifdef APA_FAST_WITH_CUDA
  module.attr("with_cuda") = true;
#else
  module.attr("with_cuda") = false;
#endif
}

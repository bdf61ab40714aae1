// Launch interface of the CUDA GAE kernel (gae_cuda.cu). No torch headers, so that the kernel compiles
// alone with nvcc (tests/test_cuda_build.py) and a CPU-only CI can check it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "gae_math.h"

namespace apa_fast::cuda {

// The scratch memory that whitening uses: a finished-blocks counter, the batch statistics, then one
// partial Moments per block of the GAE kernel.
template <typename Acc>
struct WhitenHeader {
  unsigned int blocks_done;
  Acc mean;
  Acc inverse_std;
};

template <typename Acc>
constexpr size_t whiten_partials_offset() {
  return (sizeof(WhitenHeader<Acc>) + alignof(Moments<Acc>) - 1) / alignof(Moments<Acc>) * alignof(Moments<Acc>);
}

// Bytes of device memory launch_gae needs to whiten a batch of `rows` rows (enough for any block shape).
template <typename Acc>
constexpr size_t whiten_workspace_bytes(int64_t rows) {
  return whiten_partials_offset<Acc>() + static_cast<size_t>(rows) * sizeof(Moments<Acc>);
}

// Computes advantages and returns for `problem` on `stream`, asynchronously, without synchronising the host.
// In: float, double, __half or __nv_bfloat16; Acc: double for double, float otherwise. Whitens the
// advantages when `whiten_workspace` is not null (whiten_workspace_bytes<Acc>(rows) bytes of device memory,
// any content). Returns the launch error, if any.
template <typename In, typename Acc>
cudaError_t launch_gae(const GaeProblem<In, Acc>& problem, void* whiten_workspace, cudaStream_t stream);

}  // namespace apa_fast::cuda

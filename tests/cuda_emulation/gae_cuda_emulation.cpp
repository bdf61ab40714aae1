// The CUDA GAE kernel run on the host (cuda_host_emulation.h), so that tests/test_cuda_build.py can check
// its results on a machine without a GPU:
//
//   gae_cuda_emulation ROWS COLS GAMMA LAM WHITEN HAS_MASK SM_COUNT DTYPE < inputs > outputs
//
// Inputs on stdin: rewards, then values (ROWS x COLS of DTYPE: float32, float64, float16 or bfloat16), then,
// when HAS_MASK is 1, the mask (one byte a position). Outputs on stdout: advantages, then returns (float64 for
// float64 inputs, float32 otherwise). SM_COUNT is the GPU size the launcher plans for: it picks how many warps
// share a row. Build (from the repository root): g++ -std=c++20 -pthread -Wno-attributes -I<cuda>/include
// -Icsrc -Itests/cuda_emulation tests/cuda_emulation/gae_cuda_emulation.cpp
#define APA_FAST_CUDA_HOST_EMULATION
#include "gae_cuda.cu"

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace {

int emulated_sm_count = 0;

template <typename T>
std::vector<T> read_array(size_t count) {
  std::vector<T> data(count);
  if (std::fread(data.data(), sizeof(T), count, stdin) != count) {
    std::fprintf(stderr, "gae_cuda_emulation: short input\n");
    std::exit(2);
  }
  return data;
}

template <typename In, typename Acc>
int run(int64_t rows, int64_t cols, double gamma, double lam, bool whiten, bool has_mask) {
  const size_t count = static_cast<size_t>(rows * cols);
  const std::vector<In> rewards = read_array<In>(count);
  const std::vector<In> values = read_array<In>(count);
  const std::vector<unsigned char> mask_bytes = has_mask ? read_array<unsigned char>(count) : std::vector<unsigned char>();
  const std::unique_ptr<bool[]> mask(new bool[count]);
  for (size_t i = 0; i < mask_bytes.size(); ++i) mask[i] = mask_bytes[i] != 0;
  std::vector<Acc> advantages(count), returns(count);
  std::vector<double> workspace(apa_fast::cuda::whiten_workspace_bytes<Acc>(rows) / sizeof(double) + 1);
  const apa_fast::GaeProblem<In, Acc> problem = {rewards.data(), values.data(), has_mask ? mask.get() : nullptr,
                                                 advantages.data(), returns.data(), rows, cols,
                                                 {static_cast<Acc>(gamma), static_cast<Acc>(gamma * lam)}};
  if (apa_fast::cuda::launch_gae(problem, whiten ? workspace.data() : nullptr, nullptr) != cudaSuccess) return 3;
  std::fwrite(advantages.data(), sizeof(Acc), count, stdout);
  std::fwrite(returns.data(), sizeof(Acc), count, stdout);
  return 0;
}

}  // namespace

// The runtime calls the launcher makes, answered for the emulated GPU.
cudaError_t CUDARTAPI cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  *value = emulated_sm_count;
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaMemsetAsync(void* target, int value, size_t bytes, cudaStream_t) {
  std::memset(target, value, bytes);
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaGetLastError() { return cudaSuccess; }

int main(int argc, char** argv) {
  if (argc != 9) {
    std::fprintf(stderr, "usage: %s ROWS COLS GAMMA LAM WHITEN HAS_MASK SM_COUNT DTYPE\n", argv[0]);
    return 1;
  }
  const int64_t rows = std::atoll(argv[1]), cols = std::atoll(argv[2]);
  const double gamma = std::atof(argv[3]), lam = std::atof(argv[4]);
  const bool whiten = std::atoi(argv[5]) != 0, has_mask = std::atoi(argv[6]) != 0;
  emulated_sm_count = std::atoi(argv[7]);
  const std::string dtype = argv[8];
  if (dtype == "float32") return run<float, float>(rows, cols, gamma, lam, whiten, has_mask);
  if (dtype == "float64") return run<double, double>(rows, cols, gamma, lam, whiten, has_mask);
  if (dtype == "float16") return run<__half, float>(rows, cols, gamma, lam, whiten, has_mask);
  if (dtype == "bfloat16") return run<__nv_bfloat16, float>(rows, cols, gamma, lam, whiten, has_mask);
  std::fprintf(stderr, "gae_cuda_emulation: unknown dtype %s\n", dtype.c_str());
  return 1;
}

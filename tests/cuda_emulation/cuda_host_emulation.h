// Runs the CUDA kernels of gae_cuda.cu on the host, for tests on machines without a GPU
// (gae_cuda_emulation.cpp, tests/test_cuda_build.py). Every CUDA thread is an OS thread; blocks run one after
// another, so `__shared__` variables can be function statics. Barriers and warp shuffles are real
// barriers between those threads, so the kernel's indexing, scans and synchronisation run as written.
// Only what gae_cuda.cu uses is provided. Include after the CUDA headers (it redefines __shared__).
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#undef __shared__
#define __shared__ static
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

namespace apa_fast::emulation {

struct Index {
  unsigned x, y, z;
};

// One warp's barrier and the slots its shuffles exchange values through.
struct Warp {
  explicit Warp(int threads) : barrier(threads) {}
  std::barrier<> barrier;
  uint64_t slots[32] = {};
};

struct Block {
  explicit Block(int threads) : barrier(threads) {
    for (int first = 0; first < threads; first += 32) warps.push_back(std::make_unique<Warp>(std::min(32, threads - first)));
  }
  std::barrier<> barrier;
  std::vector<std::unique_ptr<Warp>> warps;
};

inline Index grid_dim, block_dim;
inline Block* running_block = nullptr;
inline thread_local Index thread_idx, block_idx;

inline Warp& this_warp() { return *running_block->warps[thread_idx.x / 32]; }

// Every thread of the warp publishes `value`, then reads the one of `source_lane`.
template <typename T>
T exchange(T value, unsigned source_lane) {
  static_assert(sizeof(T) <= sizeof(uint64_t));
  Warp& warp = this_warp();
  std::memcpy(&warp.slots[thread_idx.x % 32], &value, sizeof(T));
  warp.barrier.arrive_and_wait();
  T result;
  std::memcpy(&result, &warp.slots[source_lane], sizeof(T));
  warp.barrier.arrive_and_wait();
  return result;
}

// `kernel<<<grid, block>>>(args...)`: returns the callable that takes the arguments.
template <typename... Params>
auto launch(void (*kernel)(Params...), dim3 grid, dim3 block) {
  return [=](auto... args) {
    grid_dim = {grid.x, 1, 1};
    block_dim = {block.x, 1, 1};
    for (unsigned b = 0; b < grid.x; ++b) {
      Block state(static_cast<int>(block.x));
      running_block = &state;
      std::vector<std::thread> threads;
      for (unsigned t = 0; t < block.x; ++t) {
        threads.emplace_back([&, t, b] {
          thread_idx = {t, 0, 0};
          block_idx = {b, 0, 0};
          kernel(args...);
          this_warp().barrier.arrive_and_drop();  // an exited thread no longer holds its warp or block back
          state.barrier.arrive_and_drop();
        });
      }
      for (auto& thread : threads) thread.join();
    }
    running_block = nullptr;
  };
}

}  // namespace apa_fast::emulation

#define threadIdx (::apa_fast::emulation::thread_idx)
#define blockIdx (::apa_fast::emulation::block_idx)
#define blockDim (::apa_fast::emulation::block_dim)
#define gridDim (::apa_fast::emulation::grid_dim)

inline void __syncthreads() { apa_fast::emulation::running_block->barrier.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { apa_fast::emulation::this_warp().barrier.arrive_and_wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <typename T>
T __shfl_down_sync(unsigned, T value, unsigned delta) {
  const unsigned lane = threadIdx.x % 32;
  return apa_fast::emulation::exchange(value, lane + delta < 32 ? lane + delta : lane);
}

template <typename T>
T __shfl_sync(unsigned, T value, int source_lane) {
  return apa_fast::emulation::exchange(value, static_cast<unsigned>(source_lane));
}

template <typename T>
T __ldcg(const T* address) {
  return *address;
}

inline unsigned atomicAdd(unsigned* address, unsigned value) {
  return std::atomic_ref<unsigned>(*address).fetch_add(value);
}

template <typename T>
T min(T a, T b) {
  return std::min(a, b);
}

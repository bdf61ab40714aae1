// Batched GAE on CUDA: one launch for the whole batch (two when whitening), masks handled in the kernel,
// no host synchronisation. No torch headers: `nvcc -arch=sm_90 -c gae_cuda.cu` compiles it alone.
//
// A group of ROW_WARPS warps owns a row (one warp when rows are many, up to a block when they are few and
// long) and walks it backwards in tiles of ROW_WARPS * 32 * kItems positions:
//  1. the group loads the tile into shared memory, coalesced; each thread then takes kItems consecutive
//     positions and summarises them as an affine map of the state after them (SpanSummary, gae_math.h);
//  2. a suffix scan of those summaries over the group (warp shuffles, then across the group's warps), applied
//     to the state carried from the later tiles, gives every thread the state after its positions;
//  3. every thread runs the recurrence over its own positions; the group stores the tile, coalesced.
// Whitening: each block reduces the moments of its advantages, the last block to finish (an atomic counter)
// merges the blocks' partials, and a small elementwise kernel rescales the advantages.
#include "gae_cuda.cuh"

#include <algorithm>
#include <climits>

#ifdef APA_FAST_CUDA_HOST_EMULATION  // every CUDA thread on a host thread: tests/cuda_emulation/, no GPU
#include "cuda_host_emulation.h"
#define APA_FAST_LAUNCH(kernel, grid, block, stream) ::apa_fast::emulation::launch(kernel, grid, block)
#else
#define APA_FAST_LAUNCH(kernel, grid, block, stream) kernel<<<grid, block, 0, stream>>>
#endif

namespace apa_fast::cuda {
namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kFullWarp = 0xffffffffu;
constexpr int kBlockThreads = 256;
constexpr int kBlockWarps = kBlockThreads / kWarpSize;
constexpr int kItems = 8;  // consecutive positions per thread per tile
static_assert(kWarpSize % kItems == 0, "a thread's positions must not straddle a shared-memory padding slot");
// Resident warps per SM that keep a streaming kernel near full memory bandwidth.
constexpr int kWantedWarpsPerSm = 32;

template <int ROW_WARPS>
struct Layout {
  static constexpr int kRowThreads = ROW_WARPS * kWarpSize;
  static constexpr int kRowsPerBlock = kBlockThreads / kRowThreads;
  static constexpr int kTile = kRowThreads * kItems;
  // One padding slot per 32 positions: a warp storing 32 consecutive positions and a warp whose threads read
  // kItems consecutive positions each both touch 32 distinct banks.
  static constexpr int kPaddedTile = kTile + kTile / kWarpSize;
};

__device__ __forceinline__ int padded(int i) { return i + i / kWarpSize; }

// Inputs to the accumulation type with CUDA's own intrinsics: torch builds define __CUDA_NO_HALF_CONVERSIONS__
// and __CUDA_NO_BFLOAT16_CONVERSIONS__, which remove the 16-bit types' conversion operators.
__device__ __forceinline__ float widen(float x) { return x; }
__device__ __forceinline__ double widen(double x) { return x; }
__device__ __forceinline__ float widen(__half x) { return __half2float(x); }
__device__ __forceinline__ float widen(__nv_bfloat16 x) { return __bfloat162float(x); }

template <int ROW_WARPS>
__device__ __forceinline__ void sync_row_group() {
  if constexpr (ROW_WARPS == 1) {
    __syncwarp();
  } else {
    __syncthreads();
  }
}

// The scratch that whitening uses, carved from the caller's workspace (gae_cuda.cuh).
template <typename Acc>
struct WhitenScratch {
  WhitenHeader<Acc>* header;
  Moments<Acc>* partials;  // one per block
};

template <typename Acc, typename Shuffle>
__device__ __forceinline__ SpanSummary<Acc> shuffled(const SpanSummary<Acc>& s, Shuffle shuffle) {
  return {shuffle(static_cast<int>(s.has_valid)) != 0, shuffle(s.from_advantage), shuffle(s.from_value),
          shuffle(s.offset), shuffle(s.first_value)};
}

template <typename Acc, typename Shuffle>
__device__ __forceinline__ Moments<Acc> shuffled(const Moments<Acc>& m, Shuffle shuffle) {
  return {shuffle(m.count), shuffle(m.mean), shuffle(m.m2)};
}

// Loads `length` positions of a row from `start` into shared memory; position i by thread i % kRowThreads,
// so that a warp reads consecutive addresses. Positions past `length` are zero and masked out.
template <int ROW_WARPS, typename In, typename Acc>
__device__ __forceinline__ void load_tile(const GaeProblem<In, Acc>& p, int64_t start, int length, int rank,
                                          Acc* rewards, Acc* values, bool* valid) {
  constexpr int kRowThreads = Layout<ROW_WARPS>::kRowThreads;
  Acc reward[kItems], value[kItems];
  bool is_valid[kItems];
#pragma unroll
  for (int k = 0; k < kItems; ++k) {  // every load issued before the first shared store
    const int i = k * kRowThreads + rank;
    const bool inside = i < length;
    reward[k] = inside ? widen(p.rewards[start + i]) : Acc(0);
    value[k] = inside ? widen(p.values[start + i]) : Acc(0);
    is_valid[k] = inside && (p.mask == nullptr || p.mask[start + i]);
  }
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const int i = k * kRowThreads + rank;
    rewards[padded(i)] = reward[k];
    values[padded(i)] = value[k];
    valid[i] = is_valid[k];
  }
}

template <int ROW_WARPS, typename In, typename Acc>
__device__ __forceinline__ void store_tile(const GaeProblem<In, Acc>& p, int64_t start, int length, int rank,
                                           const Acc* advantages, const Acc* returns) {
  constexpr int kRowThreads = Layout<ROW_WARPS>::kRowThreads;
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const int i = k * kRowThreads + rank;
    if (i < length) {
      p.advantages[start + i] = advantages[padded(i)];
      p.returns[start + i] = returns[padded(i)];
    }
  }
}

// Given this thread's summary, returns the summary of the tile positions after this thread's (the rest of
// its warp, then the later warps of its row group), and sets `tile_total` to the whole tile's summary.
template <int ROW_WARPS, typename Acc>
__device__ __forceinline__ SpanSummary<Acc> summary_after(const SpanSummary<Acc>& own,
                                                          SpanSummary<Acc>* warp_totals,
                                                          SpanSummary<Acc>& tile_total) {
  const int lane = threadIdx.x % kWarpSize;
  SpanSummary<Acc> suffix = own;  // becomes the summary of lanes [lane, 32) of this warp
#pragma unroll
  for (int delta = 1; delta < kWarpSize; delta *= 2) {
    const auto later = shuffled(suffix, [delta](auto x) { return __shfl_down_sync(kFullWarp, x, delta); });
    if (lane + delta < kWarpSize) suffix = compose(suffix, later);
  }
  SpanSummary<Acc> after = shuffled(suffix, [](auto x) { return __shfl_down_sync(kFullWarp, x, 1); });
  if (lane == kWarpSize - 1) after = empty_span<Acc>();
  if constexpr (ROW_WARPS == 1) {
    tile_total = shuffled(suffix, [](auto x) { return __shfl_sync(kFullWarp, x, 0); });
    return after;
  } else {
    const int warp = (threadIdx.x / kWarpSize) % ROW_WARPS;
    if (lane == 0) warp_totals[warp] = suffix;
    __syncthreads();
    SpanSummary<Acc> later_warps = empty_span<Acc>();
    for (int w = ROW_WARPS - 1; w > warp; --w) later_warps = compose(warp_totals[w], later_warps);
    tile_total = later_warps;
    for (int w = warp; w >= 0; --w) tile_total = compose(warp_totals[w], tile_total);
    return compose(after, later_warps);
  }
}

// The merge of the moments of a warp's threads, in lane 0.
template <typename Acc>
__device__ __forceinline__ Moments<Acc> warp_moments(Moments<Acc> m) {
#pragma unroll
  for (int delta = kWarpSize / 2; delta > 0; delta /= 2) {
    m = merge(m, shuffled(m, [delta](auto x) { return __shfl_down_sync(kFullWarp, x, delta); }));
  }
  return m;
}

// The merge of the moments of a block's threads, in thread 0. `scratch`: kBlockWarps shared slots.
template <typename Acc>
__device__ __forceinline__ Moments<Acc> block_moments(Moments<Acc> m, Moments<Acc>* scratch) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  m = warp_moments(m);
  if (lane == 0) scratch[warp] = m;
  __syncthreads();
  if (warp == 0) m = warp_moments(lane < kBlockWarps ? scratch[lane] : Moments<Acc>{Acc(0), Acc(0), Acc(0)});
  return m;
}

template <typename Acc>
__device__ __forceinline__ Moments<Acc> load_from_l2(const Moments<Acc>* m) {
  return {__ldcg(&m->count), __ldcg(&m->mean), __ldcg(&m->m2)};
}

// The batch's moments without a host sync: every block publishes its partial, and the last block to finish
// merges them all and writes the mean and 1 / (std + eps) into the workspace header.
template <typename Acc>
__device__ void publish_moments(const Moments<Acc>& own, WhitenScratch<Acc> scratch) {
  __shared__ Moments<Acc> per_warp[kBlockWarps];
  __shared__ bool last_block;
  const Moments<Acc> block_total = block_moments(own, per_warp);
  if (threadIdx.x == 0) {
    scratch.partials[blockIdx.x] = block_total;
    __threadfence();  // the partial is visible device-wide before the counter counts it
    last_block = atomicAdd(&scratch.header->blocks_done, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last_block) return;
  __threadfence();
  Moments<Acc> total = {Acc(0), Acc(0), Acc(0)};
  for (unsigned b = threadIdx.x; b < gridDim.x; b += kBlockThreads) {
    total = merge(total, load_from_l2(scratch.partials + b));
  }
  total = block_moments(total, per_warp);
  if (threadIdx.x == 0) {
    scratch.header->mean = total.mean;
    scratch.header->inverse_std = inverse_std(total);
  }
}

template <typename In, typename Acc, int ROW_WARPS, bool WHITEN>
__global__ void __launch_bounds__(kBlockThreads) gae_kernel(const GaeProblem<In, Acc> p, WhitenScratch<Acc> scratch) {
  using L = Layout<ROW_WARPS>;
  __shared__ Acc rewards_then_advantages[L::kRowsPerBlock][L::kPaddedTile];
  __shared__ Acc values_then_returns[L::kRowsPerBlock][L::kPaddedTile];
  __shared__ bool valid_tiles[L::kRowsPerBlock][L::kTile];
  __shared__ SpanSummary<Acc> warp_totals[L::kRowsPerBlock][ROW_WARPS];

  const int group = threadIdx.x / L::kRowThreads;  // the block's row this thread works on
  const int rank = threadIdx.x % L::kRowThreads;   // this thread within the row's group
  const int64_t row = static_cast<int64_t>(blockIdx.x) * L::kRowsPerBlock + group;
  const bool row_in_range = row < p.rows;  // out-of-range groups still take part in the barriers
  Acc* tile_first = rewards_then_advantages[group];
  Acc* tile_second = values_then_returns[group];
  bool* tile_valid = valid_tiles[group];

  NextValid<Acc> carry = {Acc(0), Acc(0)};  // the state after the current tile
  Moments<Acc> moments = {Acc(0), Acc(0), Acc(0)};
  const int64_t tiles = (p.cols + L::kTile - 1) / L::kTile;
  for (int64_t tile = tiles - 1; tile >= 0; --tile) {
    const int64_t start = (row_in_range ? row * p.cols : 0) + tile * L::kTile;
    const int length = row_in_range ? static_cast<int>(min(static_cast<int64_t>(L::kTile), p.cols - tile * L::kTile)) : 0;
    load_tile<ROW_WARPS>(p, start, length, rank, tile_first, tile_second, tile_valid);
    sync_row_group<ROW_WARPS>();

    // This thread's positions, [rank * kItems, (rank + 1) * kItems) of the tile: contiguous in shared memory
    // too, since a run of kItems never crosses a padding slot. Read in place (twice) rather than held in
    // registers across the scan; the outputs overwrite them in place.
    Acc* rewards_then_advantages = tile_first + padded(rank * kItems);
    Acc* values_then_returns = tile_second + padded(rank * kItems);
    const bool* valid = tile_valid + rank * kItems;
    SpanSummary<Acc> own = empty_span<Acc>();
#pragma unroll
    for (int j = kItems - 1; j >= 0; --j) {
      if (valid[j]) own = compose(valid_position(rewards_then_advantages[j], values_then_returns[j], p.coef), own);
    }
    SpanSummary<Acc> tile_total;
    NextValid<Acc> next = apply(summary_after<ROW_WARPS>(own, warp_totals[group], tile_total), carry);
    carry = apply(tile_total, carry);
#pragma unroll
    for (int j = kItems - 1; j >= 0; --j) {
      const Acc value = values_then_returns[j];
      const Acc advantage = advantage_at(rewards_then_advantages[j], value, next, p.coef);
      rewards_then_advantages[j] = valid[j] ? advantage : Acc(0);
      values_then_returns[j] = valid[j] ? advantage + value : Acc(0);
      if (valid[j]) next = {advantage, value};
    }
    if constexpr (WHITEN) moments = merge(moments, moments_of(rewards_then_advantages, valid, kItems));
    sync_row_group<ROW_WARPS>();
    // No barrier after the store: the next tile's loads write the very slots each thread has just stored
    // from (the same striped positions), and the barrier above orders everything else.
    store_tile<ROW_WARPS>(p, start, length, rank, tile_first, tile_second);
  }
  if constexpr (WHITEN) publish_moments(moments, scratch);
}

template <typename Acc>
__global__ void __launch_bounds__(kBlockThreads)
    whiten_kernel(Acc* advantages, const bool* mask, int64_t count, const WhitenHeader<Acc>* stats) {
  const Acc mean = stats->mean, scale = stats->inverse_std;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kBlockThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kBlockThreads + threadIdx.x; i < count; i += stride) {
    if (mask == nullptr || mask[i]) advantages[i] = (advantages[i] - mean) * scale;
  }
}

// Many rows: a warp per row. Few rows: more warps per row until the GPU holds enough warps, as long as every
// warp keeps at least 32 * kItems positions of the row.
int row_warps_for(int64_t rows, int64_t cols, int sm_count) {
  const int64_t wanted_warps = static_cast<int64_t>(sm_count) * kWantedWarpsPerSm;
  int row_warps = 1;
  while (row_warps < kBlockWarps && rows * row_warps < wanted_warps &&
         cols >= static_cast<int64_t>(2 * row_warps) * kWarpSize * kItems) {
    row_warps *= 2;
  }
  return row_warps;
}

template <typename In, typename Acc, int ROW_WARPS>
cudaError_t launch_with(const GaeProblem<In, Acc>& p, void* whiten_workspace, int sm_count, cudaStream_t stream) {
  const int64_t blocks = (p.rows + Layout<ROW_WARPS>::kRowsPerBlock - 1) / Layout<ROW_WARPS>::kRowsPerBlock;
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(blocks));
  if (whiten_workspace == nullptr) {
    const auto kernel = gae_kernel<In, Acc, ROW_WARPS, false>;
    APA_FAST_LAUNCH(kernel, grid, kBlockThreads, stream)(p, WhitenScratch<Acc>{nullptr, nullptr});
    return cudaGetLastError();
  }
  char* bytes = static_cast<char*>(whiten_workspace);
  const WhitenScratch<Acc> scratch = {reinterpret_cast<WhitenHeader<Acc>*>(bytes),
                                      reinterpret_cast<Moments<Acc>*>(bytes + whiten_partials_offset<Acc>())};
  cudaError_t status = cudaMemsetAsync(&scratch.header->blocks_done, 0, sizeof(unsigned int), stream);
  if (status != cudaSuccess) return status;
  const auto kernel = gae_kernel<In, Acc, ROW_WARPS, true>;
  APA_FAST_LAUNCH(kernel, grid, kBlockThreads, stream)(p, scratch);
  status = cudaGetLastError();
  if (status != cudaSuccess) return status;
  const int64_t count = p.rows * p.cols;
  const int64_t whiten_blocks = std::min<int64_t>((count + kBlockThreads - 1) / kBlockThreads,
                                                  static_cast<int64_t>(sm_count) * kWantedWarpsPerSm / kBlockWarps);
  const auto rescale = whiten_kernel<Acc>;
  APA_FAST_LAUNCH(rescale, dim3(static_cast<unsigned>(whiten_blocks)), kBlockThreads, stream)(
      p.advantages, p.mask, count, scratch.header);
  return cudaGetLastError();
}

}  // namespace

template <typename In, typename Acc>
cudaError_t launch_gae(const GaeProblem<In, Acc>& problem, void* whiten_workspace, cudaStream_t stream) {
  if (problem.rows == 0 || problem.cols == 0) return cudaSuccess;
  int device = 0, sm_count = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status == cudaSuccess) status = cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device);
  if (status != cudaSuccess) return status;
  switch (row_warps_for(problem.rows, problem.cols, sm_count)) {
    case 1:
      return launch_with<In, Acc, 1>(problem, whiten_workspace, sm_count, stream);
    case 2:
      return launch_with<In, Acc, 2>(problem, whiten_workspace, sm_count, stream);
    case 4:
      return launch_with<In, Acc, 4>(problem, whiten_workspace, sm_count, stream);
    default:
      return launch_with<In, Acc, kBlockWarps>(problem, whiten_workspace, sm_count, stream);
  }
}

template cudaError_t launch_gae(const GaeProblem<float, float>&, void*, cudaStream_t);
template cudaError_t launch_gae(const GaeProblem<double, double>&, void*, cudaStream_t);
template cudaError_t launch_gae(const GaeProblem<__half, float>&, void*, cudaStream_t);
template cudaError_t launch_gae(const GaeProblem<__nv_bfloat16, float>&, void*, cudaStream_t);

}  // namespace apa_fast::cuda

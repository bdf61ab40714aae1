// The arithmetic of batched GAE, shared by the C++ CPU kernel and the CUDA kernel.
//
// No torch and no CUDA headers: the CUDA core must compile alone with nvcc, and the CPU kernel includes
// the same functions, so the scan algebra that the GPU relies on is exercised by the CPU tests as well.
//
// Per row, the recurrence runs backwards over the valid positions only:
//   A_t = r_t + gamma * V_next - V_t + gamma * lam * A_next,
// where (A_next, V_next) belong to the next valid position, both 0 after the last one.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define APA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define APA_HOST_DEVICE inline
#endif

namespace apa_fast {

// What the backward recurrence carries: the advantage and the value at the next valid position.
template <typename Acc>
struct NextValid {
  Acc advantage;
  Acc value;
};

// The GAE coefficients in the accumulation type; decay = gamma * lam.
template <typename Acc>
struct GaeCoefficients {
  Acc gamma;
  Acc decay;
};

// One call's inputs and outputs: contiguous (rows, cols) arrays, inputs of type In (float, double or a
// 16-bit float), outputs in Acc (double for double inputs, float otherwise). `mask` is null when every
// position is valid.
template <typename In, typename Acc>
struct GaeProblem {
  const In* rewards;
  const In* values;
  const bool* mask;
  Acc* advantages;
  Acc* returns;
  int64_t rows;
  int64_t cols;
  GaeCoefficients<Acc> coef;
};

template <typename Acc>
APA_HOST_DEVICE Acc advantage_at(Acc reward, Acc value, NextValid<Acc> next, GaeCoefficients<Acc> coef) {
  return reward - value + coef.gamma * next.value + coef.decay * next.advantage;
}

// The effect of a span of positions on the carried state, as an affine map: given the state after the span
// (`next`), the state at the span's first valid position is
//   (offset + from_advantage * next.advantage + from_value * next.value, first_value).
// A span without valid positions passes the state through unchanged. Composing summaries is associative,
// which is what lets the CUDA kernel (and the CPU kernel, for long rows) scan time in parallel. The
// coefficients are products of gamma and lam, all in [0, 1]: nothing grows with the span's length.
template <typename Acc>
struct SpanSummary {
  bool has_valid;
  Acc from_advantage;  // (gamma * lam)^k for k valid positions
  Acc from_value;      // gamma * (gamma * lam)^(k - 1)
  Acc offset;          // the span's first advantage when the state after it is zero
  Acc first_value;     // the value at the span's first valid position
};

template <typename Acc>
APA_HOST_DEVICE SpanSummary<Acc> empty_span() {
  return {false, Acc(0), Acc(0), Acc(0), Acc(0)};
}

// The summary of one valid position.
template <typename Acc>
APA_HOST_DEVICE SpanSummary<Acc> valid_position(Acc reward, Acc value, GaeCoefficients<Acc> coef) {
  return {true, coef.decay, coef.gamma, reward - value, value};
}

// The summary of `earlier` followed by `later` (the backward recurrence applies `later` first).
template <typename Acc>
APA_HOST_DEVICE SpanSummary<Acc> compose(const SpanSummary<Acc>& earlier, const SpanSummary<Acc>& later) {
  if (!earlier.has_valid) return later;
  if (!later.has_valid) return earlier;
  return {true, earlier.from_advantage * later.from_advantage, earlier.from_advantage * later.from_value,
          earlier.offset + earlier.from_advantage * later.offset + earlier.from_value * later.first_value,
          earlier.first_value};
}

template <typename Acc>
APA_HOST_DEVICE NextValid<Acc> apply(const SpanSummary<Acc>& span, NextValid<Acc> next) {
  if (!span.has_valid) return next;
  return {span.offset + span.from_advantage * next.advantage + span.from_value * next.value, span.first_value};
}

// Count, mean and sum of squared deviations of a set of numbers, merged pairwise (Chan et al.), which stays
// accurate where the sum of squares minus the squared sum would cancel.
template <typename Acc>
struct Moments {
  Acc count;
  Acc mean;
  Acc m2;
};

template <typename Acc>
APA_HOST_DEVICE Moments<Acc> merge(const Moments<Acc>& a, const Moments<Acc>& b) {
  const Acc count = a.count + b.count;
  if (count == Acc(0)) return a;
  const Acc delta = b.mean - a.mean;
  const Acc share_b = b.count / count;
  return {count, a.mean + delta * share_b, a.m2 + b.m2 + delta * delta * a.count * share_b};
}

// Moments of x[i] over the i < n with valid[i] (every i when valid is null), by two passes over x.
template <typename Acc>
APA_HOST_DEVICE Moments<Acc> moments_of(const Acc* x, const bool* valid, int64_t n) {
  Acc count = 0, sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (valid == nullptr || valid[i]) {
      count += Acc(1);
      sum += x[i];
    }
  }
  if (count == Acc(0)) return {Acc(0), Acc(0), Acc(0)};
  const Acc mean = sum / count;
  Acc m2 = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (valid == nullptr || valid[i]) m2 += (x[i] - mean) * (x[i] - mean);
  }
  return {count, mean, m2};
}

// Whitening multiplies by 1 / (std + 1e-8), std unbiased. With fewer than two valid positions the variance
// is taken as 0, so a lone advantage whitens to 0 instead of NaN.
template <typename Acc>
APA_HOST_DEVICE Acc inverse_std(const Moments<Acc>& m) {
  const Acc dof = m.count > Acc(1) ? m.count - Acc(1) : Acc(1);
  return Acc(1) / (std::sqrt(m.m2 / dof) + Acc(1e-8));
}

}  // namespace apa_fast

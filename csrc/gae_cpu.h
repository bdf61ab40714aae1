// Batched GAE on the CPU: rows in parallel (OpenMP through at::parallel_for, so torch.set_num_threads
// applies), and the time axis split into chunks when there are fewer rows than threads.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "gae_math.h"

namespace apa_fast::cpu {

// Pointers to the inputs and outputs of one row (or a span of one), shifted to its first position.
// `mask` is null when every position is valid.
template <typename In, typename Acc>
struct RowSpan {
  const In* rewards;
  const In* values;
  const bool* mask;
  Acc* advantages;
  Acc* returns;

  RowSpan shifted(int64_t offset) const {
    return {rewards + offset, values + offset, mask ? mask + offset : nullptr, advantages + offset,
            returns + offset};
  }
  bool valid(int64_t t) const { return mask == nullptr || mask[t]; }
};

template <typename In, typename Acc>
RowSpan<In, Acc> row_of(const GaeProblem<In, Acc>& p, int64_t row) {
  const RowSpan<In, Acc> first = {p.rewards, p.values, p.mask, p.advantages, p.returns};
  return first.shifted(row * p.cols);
}

// One backward step at position t of a span: writes A_t and the return, moves `next` to t when t is valid.
// Masked-out positions write zeros and leave `next` alone (their inputs may be anything, NaN included).
template <typename In, typename Acc>
inline void backward_step(const RowSpan<In, Acc>& span, int64_t t, NextValid<Acc>& next,
                          GaeCoefficients<Acc> coef) {
  const bool valid = span.valid(t);
  const Acc value = static_cast<Acc>(span.values[t]);
  const Acc advantage = advantage_at(static_cast<Acc>(span.rewards[t]), value, next, coef);
  span.advantages[t] = valid ? advantage : Acc(0);
  span.returns[t] = valid ? advantage + value : Acc(0);
  if (valid) next = {advantage, value};
}

// Runs the recurrence backwards over `length` positions of a span, from the state after its end.
template <typename In, typename Acc>
inline void run_backward(const RowSpan<In, Acc>& span, int64_t length, NextValid<Acc> next,
                         GaeCoefficients<Acc> coef) {
  for (int64_t t = length - 1; t >= 0; --t) backward_step(span, t, next, coef);
}

template <typename In, typename Acc>
SpanSummary<Acc> summarize(const RowSpan<In, Acc>& span, int64_t length, GaeCoefficients<Acc> coef) {
  SpanSummary<Acc> summary = empty_span<Acc>();
  for (int64_t t = length - 1; t >= 0; --t) {
    if (span.valid(t)) {
      const auto here =
          valid_position(static_cast<Acc>(span.rewards[t]), static_cast<Acc>(span.values[t]), coef);
      summary = compose(here, summary);
    }
  }
  return summary;
}

constexpr int64_t kMinChunkLength = 1024;  // shorter chunks cost more in the second pass than they save

// One row per task, each a chain of dependent steps (~4 cycles a position). Interleaving rows on a thread
// to overlap the chains did not pay when measured: with masks it gained nothing, and from 4 rows up it was
// 3-7x slower (rows 4 KiB apart compete for the same L1 sets).
template <typename In, typename Acc>
void gae_by_rows(const GaeProblem<In, Acc>& p) {
  at::parallel_for(0, p.rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) run_backward(row_of(p, row), p.cols, {Acc(0), Acc(0)}, p.coef);
  });
}

// Few long rows: each row is cut into `chunks` spans. Pass 1 summarises every span in parallel, a short
// serial pass per row turns the summaries into each span's incoming state, pass 2 runs the spans.
template <typename In, typename Acc>
void gae_by_chunks(const GaeProblem<In, Acc>& p, int64_t chunks) {
  const int64_t chunk_length = (p.cols + chunks - 1) / chunks;
  const auto span_of = [&](int64_t item) {
    const int64_t start = (item % chunks) * chunk_length;
    return std::make_pair(row_of(p, item / chunks).shifted(start),
                          std::max<int64_t>(0, std::min(chunk_length, p.cols - start)));
  };
  const int64_t items = p.rows * chunks;
  std::vector<SpanSummary<Acc>> summaries(items);
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const auto [span, length] = span_of(item);
      summaries[item] = summarize(span, length, p.coef);
    }
  });
  std::vector<NextValid<Acc>> incoming(items);
  for (int64_t row = 0; row < p.rows; ++row) {
    NextValid<Acc> next = {Acc(0), Acc(0)};
    for (int64_t chunk = chunks - 1; chunk >= 0; --chunk) {
      incoming[row * chunks + chunk] = next;
      next = apply(summaries[row * chunks + chunk], next);
    }
  }
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const auto [span, length] = span_of(item);
      run_backward(span, length, incoming[item], p.coef);
    }
  });
}

// Whitens the advantages in place over the valid positions of the whole batch.
template <typename In, typename Acc>
void whiten(const GaeProblem<In, Acc>& p) {
  std::vector<Moments<Acc>> per_row(p.rows);
  at::parallel_for(0, p.rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const auto row = row_of(p, r);
      per_row[r] = moments_of(row.advantages, row.mask, p.cols);
    }
  });
  Moments<Acc> total = {Acc(0), Acc(0), Acc(0)};
  for (const auto& m : per_row) total = merge(total, m);
  const Acc mean = total.mean, scale = inverse_std(total);
  at::parallel_for(0, p.rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const auto row = row_of(p, r);
      for (int64_t t = 0; t < p.cols; ++t) {
        if (row.valid(t)) row.advantages[t] = (row.advantages[t] - mean) * scale;
      }
    }
  });
}

// GAE over a (rows, cols) batch: contiguous inputs of type In, outputs of type Acc (float or double).
template <typename In, typename Acc>
void gae(const GaeProblem<In, Acc>& p, bool whiten_advantages) {
  if (p.rows == 0 || p.cols == 0) return;
  const int64_t threads = at::get_num_threads();
  const int64_t chunks = p.rows >= threads
                             ? 1
                             : std::max<int64_t>(1, std::min((threads + p.rows - 1) / p.rows,
                                                             p.cols / kMinChunkLength));
  if (chunks == 1) {
    gae_by_rows(p);
  } else {
    gae_by_chunks(p, chunks);
  }
  if (whiten_advantages) whiten(p);
}

}  // namespace apa_fast::cpu

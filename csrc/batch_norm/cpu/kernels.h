// CPU kernels of the batch-norm ops and the loops they share.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "batch_norm/common.h"
#include "batch_norm/fusion.h"
#include "common/activation.h"
#include "common/cpu/capability.h"
#include "common/cpu/vec16.h"
#include "common/cpu/loops.h"
#include "common/cpu/normalize16.h"
#include "common/cpu/reduce.h"
#include "common/cpu/vector_silu.h"

namespace normext::batch_norm::NORMEXT_CPU_CAPABILITY {

// The kernels compiled for this capability.
struct CpuKernels {
#include "batch_norm/kernel_api.h"
};

namespace cpu {

using namespace normext::cpu::NORMEXT_CPU_CAPABILITY;  // the reducer and its loop constants
using namespace normext::NORMEXT_CPU_CAPABILITY;       // the activations

// A channel view as the reducer's groups: channels-last data is (rows, C, 1).
inline GroupedShape groups_of(const ChannelView& v) {
  return v.channels_last ? GroupedShape{v.count(), v.channels, 1}
                         : GroupedShape{v.outer, v.channels, v.inner};
}

// fn(c, begin, end) over flat element ranges of a contiguous (N, C, L) tensor,
// each range inside one (n, c) row; elementwise passes use it.
template <typename F>
void for_each_row_segment(const ChannelView& v, const F& fn) {
  const int64_t numel = v.outer * v.channels * v.inner;
  at::parallel_for(0, numel, kGrainElements, [&](int64_t begin, int64_t end) {
    // (The channel steps with the row: two divisions a row showed on 7x7 maps.)
    int64_t row = begin / v.inner;
    int64_t c = row % v.channels;
    while (begin < end) {
      const int64_t stop = std::min(end, (row + 1) * v.inner);
      fn(c, begin, stop);
      begin = stop;
      ++row;
      if (++c == v.channels) c = 0;
    }
  });
}

// Channels-last loops may take rows kRowGroup at a time, so that per-channel
// values (coefficients, accumulators) are loaded and stored once per group
// instead of once per row. Grouping pays where those values no longer stay in
// L1 beside the rows (over kGroupedArrayBytes), in the reductions at every
// width (their per-row accumulator stores bound them) and in the 16-bit
// vector passes' short rows. Elsewhere the interleaved rows cost more than
// they save (benchmarks/history: the in-cache A/B of grouped rows).
constexpr int64_t kGroupedArrayBytes = 12 * 1024;

// Whether an elementwise loop reading `arrays` per-channel arrays of acc_t
// groups its rows.
template <typename acc_t>
inline bool group_rows(int64_t channels, int arrays) {
  return channels * arrays * static_cast<int64_t>(sizeof(acc_t)) > kGroupedArrayBytes;
}

// 1 / v[c] for each channel, in a loop that vectorizes (outside the dispatch
// macros, where `#pragma omp simd` cannot go): scalar divisions were most of
// the per-channel work of a layer with many channels.
template <typename acc_t>
std::vector<acc_t> reciprocals(const std::vector<acc_t>& v) {
  std::vector<acc_t> inverse(v.size());
  const int64_t n = static_cast<int64_t>(v.size());
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) inverse[c] = acc_t(1) / v[c];
  return inverse;
}

// fn(first row, end row) over channels-last rows in parallel.
template <typename F>
void for_each_row_range(const ChannelView& v, const F& fn) {
  const int64_t grain = grain_for(v.channels);
  at::parallel_for(0, v.outer * v.inner, grain, fn);
}

}  // namespace cpu
}  // namespace normext::batch_norm::NORMEXT_CPU_CAPABILITY

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
#include "common/cpu/reduce.h"

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
    while (begin < end) {
      const int64_t row = begin / v.inner;
      const int64_t stop = std::min(end, (row + 1) * v.inner);
      fn(row % v.channels, begin, stop);
      begin = stop;
    }
  });
}

// Channels-last loops may take rows kRowGroup at a time, so that per-channel
// values (coefficients, accumulators) are loaded and stored once per group
// instead of once per row. Grouping pays where those values no longer stay in
// L1 beside the rows (over kGroupedArrayBytes), in the statistics at every
// width (their per-row accumulator stores bound them) and in the backward
// reduction of short rows. Elsewhere the interleaved rows cost more than they
// save (benchmarks/history: the in-cache A/B of grouped rows).
constexpr int64_t kGroupedArrayBytes = 12 * 1024;

// Whether an elementwise or backward-reduce loop reading `arrays`
// per-channel arrays of acc_t groups its rows.
template <typename acc_t>
inline bool group_rows(int64_t channels, int arrays) {
  return channels * arrays * static_cast<int64_t>(sizeof(acc_t)) > kGroupedArrayBytes;
}

// fn(first row, end row) over channels-last rows in parallel.
template <typename F>
void for_each_row_range(const ChannelView& v, const F& fn) {
  const int64_t grain = grain_for(v.channels);
  at::parallel_for(0, v.outer * v.inner, grain, fn);
}

// out[i] = value as T. For bfloat16 this rounds to nearest-even on the bits,
// which GCC vectorizes (it does not vectorize c10's conversion operator).
template <typename T, typename acc_t>
inline void store(T* out, int64_t i, acc_t value) {
  out[i] = static_cast<T>(value);
}

template <>
inline void store(c10::BFloat16* out, int64_t i, float value) {
  const uint32_t bits = bits_of(value);
  const uint16_t rounded = static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
  reinterpret_cast<uint16_t*>(out)[i] = value != value ? uint16_t{0x7FC0} : rounded;
}

template <>
inline void store(Float16* out, int64_t i, float value) {
  out[i] = Float16::from_float(value);
}

// The element type the loops use for a dispatched scalar_t: Float16 for
// c10::Half, the type itself otherwise.
template <typename T>
struct LoopElement {
  using type = T;
};
template <>
struct LoopElement<c10::Half> {
  using type = Float16;
};
template <typename T>
using loop_t = typename LoopElement<T>::type;

// A tensor of dtype T's elements as loop_t<T>.
template <typename T>
const loop_t<T>* loop_data(const at::Tensor& t) {
  return reinterpret_cast<const loop_t<T>*>(t.const_data_ptr<T>());
}
template <typename T>
loop_t<T>* mutable_loop_data(at::Tensor& t) {
  return reinterpret_cast<loop_t<T>*>(t.mutable_data_ptr<T>());
}

// loop_data, or null for an undefined tensor (an absent residual).
template <typename T>
const loop_t<T>* loop_data_or_null(const at::Tensor& t) {
  return t.defined() ? loop_data<T>(t) : nullptr;
}

// A per-channel tensor (any float dtype) as accumulate-type values; `fill`
// where it is undefined. Read in place unless it is strided: an ATen op per
// tensor costs about a microsecond, a good part of a small batch norm's call.
template <typename acc_t>
std::vector<acc_t> channel_values(const at::Tensor& t, int64_t channels, acc_t fill) {
  std::vector<acc_t> values(channels, fill);
  if (!t.defined()) return values;
  const at::Tensor dense = t.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "batch_norm", [&] {
    std::copy_n(dense.const_data_ptr<scalar_t>(), channels, values.begin());
  });
  return values;
}

// Writes accumulate-type values to a per-channel tensor of any float dtype.
template <typename acc_t>
void store_channel_values(c10::ArrayRef<acc_t> values, const at::Tensor& t) {
  const at::Tensor dense = t.is_contiguous() ? t : t.new_empty(t.sizes());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "batch_norm", [&] {
    std::copy(values.begin(), values.end(), dense.mutable_data_ptr<scalar_t>());
  });
  if (!dense.is_same(t)) t.copy_(dense);
}

}  // namespace cpu
}  // namespace normext::batch_norm::NORMEXT_CPU_CAPABILITY

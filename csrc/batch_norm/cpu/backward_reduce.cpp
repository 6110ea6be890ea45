// Backward reduction: sum(dy) and sum(dy * (x - mean)) per channel in one read
// of x and dy.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "batch_norm/cpu/kernels.h"

namespace normext::batch_norm::NORMEXT_CPU_CAPABILITY {
namespace {

using cpu::RowBlocks;
using cpu::RowChunks;

// sum(dy) and sum(dy * (x - mean)) over one run of a channel.
template <typename scalar_t, typename acc_t>
void run_sums(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x, int64_t length,
              acc_t mean, acc_t& sum_dy, acc_t& sum_dy_xmu) {
  acc_t s = 0, sx = 0;
#pragma omp simd reduction(+ : s, sx)
  for (int64_t i = 0; i < length; ++i) {
    const acc_t g = static_cast<acc_t>(dy[i]);
    s += g;
    sx += g * (static_cast<acc_t>(x[i]) - mean);
  }
  sum_dy = s;
  sum_dy_xmu = sx;
}

// Adds dy and dy * (x - mean) of one short row to lane accumulators (element
// i to lane i % kLanes).
template <typename scalar_t, typename acc_t>
inline void add_row_in_lanes(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                             int64_t length, acc_t mean, acc_t* __restrict__ sum_dy,
                             acc_t* __restrict__ sum_dy_xmu) {
  cpu::for_each_in_lanes(length, [&](int k, int64_t i) {
    const acc_t g = static_cast<acc_t>(dy[i]);
    sum_dy[k] += g;
    sum_dy_xmu[k] += g * (static_cast<acc_t>(x[i]) - mean);
  });
}

// sum(dy) and sum(dy * (x - mean)) of channel c over all N (short) rows, in
// float32 lanes (held in registers) added in double every kFlushRows samples.
template <typename scalar_t, typename acc_t>
void channel_sums(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x, int64_t N,
                  int64_t C, int64_t L, int64_t c, acc_t mean, acc_t& sum_dy,
                  acc_t& sum_dy_xmu) {
  double total = 0, total_xmu = 0;
  for (int64_t n0 = 0; n0 < N; n0 += cpu::kFlushRows) {
    acc_t s[cpu::kLanes] = {}, sx[cpu::kLanes] = {};
    for (int64_t n = n0; n < std::min(N, n0 + cpu::kFlushRows); ++n) {
      const int64_t row = (n * C + c) * L;
      add_row_in_lanes(dy + row, x + row, L, mean, s, sx);
    }
    for (int k = 0; k < cpu::kLanes; ++k) {
      total += s[k];
      total_xmu += sx[k];
    }
  }
  sum_dy = static_cast<acc_t>(total);
  sum_dy_xmu = static_cast<acc_t>(total_xmu);
}

// The same for channels [c_begin, c_begin + channels), sample by sample
// (cpu::short_row_block).
template <typename scalar_t, typename acc_t>
void block_sums(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x, int64_t N,
                int64_t C, int64_t L, int64_t c_begin, int64_t channels, const acc_t* mean,
                acc_t* sum_dy, acc_t* sum_dy_xmu) {
  double total[cpu::kShortRowChannels] = {}, total_xmu[cpu::kShortRowChannels] = {};
  for (int64_t n0 = 0; n0 < N; n0 += cpu::kFlushRows) {
    acc_t s[cpu::kShortRowChannels][cpu::kLanes] = {};
    acc_t sx[cpu::kShortRowChannels][cpu::kLanes] = {};
    cpu::for_each_block_row(n0, std::min(N, n0 + cpu::kFlushRows), C, L, c_begin, channels,
                            [&](int64_t b, int64_t row) {
                              add_row_in_lanes(dy + row, x + row, L, mean[b], s[b], sx[b]);
                            });
    for (int64_t b = 0; b < channels; ++b) {
      for (int k = 0; k < cpu::kLanes; ++k) {
        total[b] += s[b][k];
        total_xmu[b] += sx[b][k];
      }
    }
  }
  for (int64_t b = 0; b < channels; ++b) {
    sum_dy[b] = static_cast<acc_t>(total[b]);
    sum_dy_xmu[b] = static_cast<acc_t>(total_xmu[b]);
  }
}

// Adds dy and dy * (x - mean) of Rows channels-last rows (C apart) to
// per-channel sums.
template <int Rows, typename scalar_t, typename acc_t>
void add_rows_sums(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                   int64_t channels, const acc_t* __restrict__ mean, acc_t* __restrict__ sum_dy,
                   acc_t* __restrict__ sum_dy_xmu) {
#pragma omp simd
  for (int64_t c = 0; c < channels; ++c) {
    // The first row starts the sums: adding it to 0 would cost an add (signed zeros).
    acc_t s = static_cast<acc_t>(dy[c]);
    acc_t sx = s * (static_cast<acc_t>(x[c]) - mean[c]);
    for (int k = 1; k < Rows; ++k) {
      const acc_t g = static_cast<acc_t>(dy[k * channels + c]);
      s += g;
      sx += g * (static_cast<acc_t>(x[k * channels + c]) - mean[c]);
    }
    sum_dy[c] += s;
    sum_dy_xmu[c] += sx;
  }
}

template <typename scalar_t, typename acc_t>
void reduce_contiguous(const ChannelView& dy_view, const ChannelView& x_view, const acc_t* mean,
                       acc_t* sum_dy, acc_t* sum_dy_xmu) {
  const auto* dy = cpu::loop_data<scalar_t>(dy_view.data);
  const auto* x = cpu::loop_data<scalar_t>(x_view.data);
  const int64_t C = x_view.channels, L = x_view.inner;
  if (cpu::is_short_row<scalar_t>(L) && C >= at::get_num_threads()) {
    cpu::for_each_short_row_block(x_view, 0, [&](int64_t c0, int64_t channels) {
      if (channels == 1) {
        channel_sums(dy, x, x_view.outer, C, L, c0, mean[c0], sum_dy[c0], sum_dy_xmu[c0]);
      } else {
        block_sums(dy, x, x_view.outer, C, L, c0, channels, mean + c0, sum_dy + c0,
                   sum_dy_xmu + c0);
      }
    });
    return;
  }
  const RowBlocks blocks(x_view);
  std::vector<acc_t> block_dy(blocks.size()), block_dy_xmu(blocks.size());
  blocks.for_each([&](int64_t c, int64_t offset, int64_t length, int64_t index) {
    run_sums(dy + offset, x + offset, length, mean[c], block_dy[index], block_dy_xmu[index]);
  });
  const int64_t grain = cpu::grain_for(blocks.per_channel());
  at::parallel_for(0, x_view.channels, grain, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      acc_t s = 0, sx = 0;
      for (int64_t p = c * blocks.per_channel(); p < (c + 1) * blocks.per_channel(); ++p) {
        s += block_dy[p];
        sx += block_dy_xmu[p];
      }
      sum_dy[c] = s;
      sum_dy_xmu[c] = sx;
    }
  });
}

template <typename scalar_t, typename acc_t>
void reduce_channels_last(const ChannelView& dy_view, const ChannelView& x_view,
                          const acc_t* mean, acc_t* sum_dy, acc_t* sum_dy_xmu) {
  const auto* dy = cpu::loop_data<scalar_t>(dy_view.data);
  const auto* x = cpu::loop_data<scalar_t>(x_view.data);
  const int64_t C = x_view.channels;
  const RowChunks chunks(x_view.count(), C);
  // Short rows too: their per-row loop overhead dominates (64 float32
  // channels: 1.3x faster grouped, 1 thread).
  const bool grouped = cpu::group_rows<acc_t>(C, 3) || C * sizeof(scalar_t) <= 256;
  cpu::ChunkPartials<acc_t> partials(chunks.chunks, C, 2);
  chunks.for_each([&](int64_t chunk, int64_t row_begin, int64_t row_end) {
    acc_t* chunk_dy = partials.get(chunk, 0);
    acc_t* chunk_dy_xmu = partials.get(chunk, 1);
    cpu::for_each_row_group(row_begin, row_end, grouped, [&](int64_t r, auto rows) {
      add_rows_sums<rows()>(dy + r * C, x + r * C, C, mean, chunk_dy, chunk_dy_xmu);
    });
  });
  for (int64_t c = 0; c < C; ++c) {
    sum_dy[c] = partials.total(0, c);
    sum_dy_xmu[c] = partials.total(1, c);
  }
}

}  // namespace

void CpuKernels::backward_reduce(const ChannelView& grad_out, const ChannelView& input,
                                 const at::Tensor& mean, const at::Tensor& invstd,
                                 at::Tensor& sum_dy, at::Tensor& sum_dy_xmu,
                                 at::Tensor& grad_weight, at::Tensor& grad_bias) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.data.scalar_type(),
                                  "batch_norm_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t C = input.channels;
    const std::vector<acc_t> m = cpu::channel_values<acc_t>(mean, C, 0);
    acc_t* s = sum_dy.mutable_data_ptr<acc_t>();
    acc_t* sx = sum_dy_xmu.mutable_data_ptr<acc_t>();
    if (input.channels_last) {
      reduce_channels_last<scalar_t>(grad_out, input, m.data(), s, sx);
    } else {
      reduce_contiguous<scalar_t>(grad_out, input, m.data(), s, sx);
    }
    std::vector<acc_t> grad_w = cpu::channel_values<acc_t>(invstd, C, 0);
    for (int64_t c = 0; c < C; ++c) grad_w[c] *= sx[c];
    cpu::store_channel_values<acc_t>(grad_w, grad_weight);
    cpu::store_channel_values<acc_t>({s, static_cast<size_t>(C)}, grad_bias);
  });
}

}  // namespace normext::batch_norm::NORMEXT_CPU_CAPABILITY

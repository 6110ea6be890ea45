// Per-channel batch statistics and the running-stat update. The statistics
// read the input once: sums of deviations from a per-channel shift (the
// median of a small sample of the channel, math.h: channel_shift), float32
// within a block that stays in cache, double across blocks (math.h:
// shifted_moments).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "batch_norm/cpu/kernels.h"
#include "batch_norm/math.h"

namespace normext::batch_norm::NORMEXT_CPU_CAPABILITY {
namespace {

using cpu::RowBlocks;
using cpu::RowChunks;

// What one channel's shift (a sorted sample) costs, in element sums: enough
// that a float16 2x256x2x2 input's statistics still run on two threads
// (serial: 0.70x on this project's 2-core machine).
constexpr int64_t kShiftCost = 512;

// Sums over blocks are added in double: float32 sums of many blocks would
// lose digits, and the blocks are few next to the elements.
using sum_t = double;

// The shift of channel c (math.h: channel_shift), as a double that the
// accumulate type holds exactly: the deviations and the mean use one value.
template <typename acc_t, typename scalar_t>
sum_t shift_of(const ChannelView& v, const scalar_t* x, int64_t c) {
  return channel_shift<acc_t>(v.count(), [&](int64_t j) {
    return static_cast<double>(x[channel_element(j, c, v.channels, v.inner, v.channels_last)]);
  });
}

// Adds the deviations d = x - shift and d^2 of Rows channels-last rows (from
// `rows`, C apart) to per-channel sums.
template <int Rows, typename scalar_t, typename acc_t>
void add_rows_shifted(const scalar_t* __restrict__ rows, int64_t channels,
                      const acc_t* __restrict__ shift, acc_t* __restrict__ sum_d,
                      acc_t* __restrict__ sum_d2) {
#pragma omp simd
  for (int64_t c = 0; c < channels; ++c) {
    // The first row starts the sums: adding it to 0 would cost an add (signed zeros).
    acc_t s = static_cast<acc_t>(rows[c]) - shift[c];
    acc_t s2 = s * s;
    for (int k = 1; k < Rows; ++k) {
      const acc_t d = static_cast<acc_t>(rows[k * channels + c]) - shift[c];
      s += d;
      s2 += d * d;
    }
    sum_d[c] += s;
    sum_d2[c] += s2;
  }
}

// sum(d) and sum(d^2) of d = x - shift over a block, in one vectorized pass.
template <typename scalar_t, typename acc_t>
void shifted_sums(const scalar_t* x, int64_t length, acc_t shift, sum_t& sum_d, sum_t& sum_d2) {
  acc_t s = 0, s2 = 0;
#pragma omp simd reduction(+ : s, s2)
  for (int64_t i = 0; i < length; ++i) {
    const acc_t d = static_cast<acc_t>(x[i]) - shift;
    s += d;
    s2 += d * d;
  }
  sum_d = s;
  sum_d2 = s2;
}

template <typename acc_t>
void finish_channel(sum_t shift, sum_t sum_d, sum_t sum_d2, sum_t count, acc_t* mean, acc_t* var,
                    int64_t c) {
  sum_t m, m2;
  shifted_moments(shift, sum_d, sum_d2, count, m, m2);
  mean[c] = static_cast<acc_t>(m);
  var[c] = static_cast<acc_t>(m2 / count);
}

// Adds the deviations d = x - shift and d^2 of one short row to lane
// accumulators (element i to lane i % kLanes).
template <typename scalar_t, typename acc_t>
inline void add_row_in_lanes(const scalar_t* __restrict__ row, int64_t length, acc_t shift,
                             acc_t* __restrict__ sum_d, acc_t* __restrict__ sum_d2) {
  cpu::for_each_in_lanes(length, [&](int k, int64_t i) {
    const acc_t d = static_cast<acc_t>(row[i]) - shift;
    sum_d[k] += d;
    sum_d2[k] += d * d;
  });
}

// Shifted sums of channel c over all N (short) rows, in float32 lanes
// (held in registers) flushed to double every kFlushRows samples.
template <typename scalar_t, typename acc_t>
void channel_shifted_sums(const scalar_t* __restrict__ x, int64_t N, int64_t C, int64_t L,
                          int64_t c, acc_t shift, sum_t& sum_d, sum_t& sum_d2) {
  sum_d = sum_d2 = 0;
  for (int64_t n0 = 0; n0 < N; n0 += cpu::kFlushRows) {
    acc_t s[cpu::kLanes] = {}, s2[cpu::kLanes] = {};
    for (int64_t n = n0; n < std::min(N, n0 + cpu::kFlushRows); ++n) {
      add_row_in_lanes(x + (n * C + c) * L, L, shift, s, s2);
    }
    for (int k = 0; k < cpu::kLanes; ++k) {
      sum_d += s[k];
      sum_d2 += s2[k];
    }
  }
}

// The same for channels [c_begin, c_begin + channels), sample by sample
// (cpu::short_row_block).
template <typename scalar_t, typename acc_t>
void block_shifted_sums(const scalar_t* __restrict__ x, int64_t N, int64_t C, int64_t L,
                        int64_t c_begin, int64_t channels, const acc_t* shift, sum_t* sum_d,
                        sum_t* sum_d2) {
  std::fill_n(sum_d, channels, 0);
  std::fill_n(sum_d2, channels, 0);
  for (int64_t n0 = 0; n0 < N; n0 += cpu::kFlushRows) {
    acc_t s[cpu::kShortRowChannels][cpu::kLanes] = {}, s2[cpu::kShortRowChannels][cpu::kLanes] = {};
    cpu::for_each_block_row(n0, std::min(N, n0 + cpu::kFlushRows), C, L, c_begin, channels,
                            [&](int64_t b, int64_t row) {
                              add_row_in_lanes(x + row, L, shift[b], s[b], s2[b]);
                            });
    for (int64_t b = 0; b < channels; ++b) {
      for (int k = 0; k < cpu::kLanes; ++k) {
        sum_d[b] += s[b][k];
        sum_d2[b] += s2[b][k];
      }
    }
  }
}

// Contiguous (N, C, L): shifted sums per block of each (n, c) row, added per
// channel in a fixed order; short rows go channel by channel instead.
template <typename scalar_t, typename acc_t>
void moments_contiguous(const ChannelView& v, acc_t* mean, acc_t* var) {
  const auto* x = cpu::loop_data<scalar_t>(v.data);
  const int64_t C = v.channels, L = v.inner;
  if (cpu::is_short_row<scalar_t>(L) && C >= at::get_num_threads()) {
    cpu::for_each_short_row_block(v, kShiftCost, [&](int64_t c0, int64_t channels) {
      sum_t shift[cpu::kShortRowChannels], s[cpu::kShortRowChannels], s2[cpu::kShortRowChannels];
      acc_t shift_acc[cpu::kShortRowChannels];
      for (int64_t b = 0; b < channels; ++b) {
        shift[b] = shift_of<acc_t>(v, x, c0 + b);
        shift_acc[b] = static_cast<acc_t>(shift[b]);
      }
      if (channels == 1) {
        channel_shifted_sums(x, v.outer, C, L, c0, shift_acc[0], s[0], s2[0]);
      } else {
        block_shifted_sums(x, v.outer, C, L, c0, channels, shift_acc, s, s2);
      }
      for (int64_t b = 0; b < channels; ++b) {
        finish_channel(shift[b], s[b], s2[b], static_cast<sum_t>(v.count()), mean, var, c0 + b);
      }
    });
    return;
  }
  std::vector<sum_t> shift(C);
  at::parallel_for(0, C, cpu::grain_for(kShiftCost), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) shift[c] = shift_of<acc_t>(v, x, c);
  });
  const RowBlocks blocks(v);
  std::vector<sum_t> block_d(blocks.size()), block_d2(blocks.size());
  blocks.for_each([&](int64_t c, int64_t offset, int64_t length, int64_t index) {
    shifted_sums(x + offset, length, static_cast<acc_t>(shift[c]), block_d[index], block_d2[index]);
  });
  at::parallel_for(0, C, cpu::grain_for(blocks.per_channel()), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      sum_t s = 0, s2 = 0;
      for (int64_t p = c * blocks.per_channel(); p < (c + 1) * blocks.per_channel(); ++p) {
        s += block_d[p];
        s2 += block_d2[p];
      }
      finish_channel(shift[c], s, s2, static_cast<sum_t>(v.count()), mean, var, c);
    }
  });
}

// Channels-last (rows, C): each thread takes a range of rows in tiles of at
// most 256 rows; a tile's shifted sums are float32, vectorized across C, and
// are added to the thread's double sums; the threads' are added at the end.
template <typename scalar_t, typename acc_t>
void moments_channels_last(const ChannelView& v, acc_t* mean, acc_t* var) {
  const auto* x = cpu::loop_data<scalar_t>(v.data);
  const int64_t C = v.channels, rows = v.count();
  std::vector<sum_t> shift(C);
  at::parallel_for(0, C, 256, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) shift[c] = shift_of<acc_t>(v, x, c);
  });
  const std::vector<acc_t> shift_acc(shift.begin(), shift.end());
  const RowChunks chunks(rows, C);
  const int64_t tile_rows = std::clamp<int64_t>(4 * cpu::kGrainElements / C, 1, 256);
  cpu::ChunkPartials<sum_t> partials(chunks.chunks, C, 2);
  // Prefetch is a template argument, each variant its own parallel loop: as
  // a branch inside one loop it slowed the statistics that do not prefetch
  // (float32 64x112x112: 0.67-0.71x).
  const auto sum_chunks = [&](auto prefetch) {
    chunks.for_each([&](int64_t chunk, int64_t row_begin, int64_t row_end) {
      sum_t* __restrict__ total_d = partials.get(chunk, 0);
      sum_t* __restrict__ total_d2 = partials.get(chunk, 1);
      std::vector<acc_t> tile_d(C), tile_d2(C);
      acc_t* __restrict__ td = tile_d.data();
      acc_t* __restrict__ td2 = tile_d2.data();
      for (int64_t tile = row_begin; tile < row_end; tile += tile_rows) {
        std::fill(tile_d.begin(), tile_d.end(), acc_t(0));
        std::fill(tile_d2.begin(), tile_d2.end(), acc_t(0));
        const int64_t tile_end = std::min(tile + tile_rows, row_end);
        cpu::for_each_row_group(tile, tile_end, /*grouped=*/true, [&](int64_t r, auto rows) {
          if constexpr (decltype(prefetch)::value) {
            cpu::prefetch_ahead(x + r * C, x + (r + rows()) * C, x + row_end * C);
          }
          add_rows_shifted<rows()>(x + r * C, C, shift_acc.data(), td, td2);
        });
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          total_d[c] += td[c];
          total_d2[c] += td2[c];
        }
      }
    });
  };
  if (C * static_cast<int64_t>(sizeof(scalar_t)) >= cpu::kPrefetchRowBytes) {
    sum_chunks(std::true_type{});
  } else {
    sum_chunks(std::false_type{});
  }
  for (int64_t c = 0; c < C; ++c) {
    finish_channel(shift[c], partials.total(0, c), partials.total(1, c),
                   static_cast<sum_t>(rows), mean, var, c);
  }
}

// invstd from the biased variances of `count` elements per channel, and the
// running-stat update when the running stats are defined.
template <typename acc_t>
void finalize_channels(const acc_t* mean, const acc_t* var, int64_t C, double count,
                       const at::Tensor& running_mean, const at::Tensor& running_var,
                       double momentum, double eps, acc_t* invstd) {
  for (int64_t c = 0; c < C; ++c) invstd[c] = inverse_std(var[c], acc_t(eps));
  if (!running_mean.defined()) return;
  // Running stats may be half/bfloat16 or strided.
  std::vector<acc_t> rm = cpu::channel_values<acc_t>(running_mean, C, 0);
  std::vector<acc_t> rv = cpu::channel_values<acc_t>(running_var, C, 0);
  for (int64_t c = 0; c < C; ++c) {
    rm[c] = running_update(rm[c], mean[c], acc_t(momentum));
    rv[c] = running_update(rv[c], unbiased_from_biased(var[c], acc_t(count)), acc_t(momentum));
  }
  cpu::store_channel_values<acc_t>(rm, running_mean);
  cpu::store_channel_values<acc_t>(rv, running_var);
}

}  // namespace

void CpuKernels::moments(const ChannelView& input, at::Tensor& mean, at::Tensor& var) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.data.scalar_type(),
                                  "batch_norm", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* mean_data = mean.mutable_data_ptr<acc_t>();
    acc_t* var_data = var.mutable_data_ptr<acc_t>();
    if (input.channels_last) {
      moments_channels_last<scalar_t>(input, mean_data, var_data);
    } else {
      moments_contiguous<scalar_t>(input, mean_data, var_data);
    }
  });
}

void CpuKernels::finalize(const at::Tensor& mean, const at::Tensor& var, double count,
                          const at::Tensor& running_mean, const at::Tensor& running_var,
                          double momentum, double eps, at::Tensor& invstd) {
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "batch_norm", [&] {
    finalize_channels(mean.const_data_ptr<scalar_t>(), var.const_data_ptr<scalar_t>(),
                      mean.numel(), count, running_mean, running_var, momentum, eps,
                      invstd.mutable_data_ptr<scalar_t>());
  });
}

void CpuKernels::batch_stats(const ChannelView& input, const at::Tensor& running_mean,
                             const at::Tensor& running_var, double momentum, double eps,
                             at::Tensor& mean, at::Tensor& invstd) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.data.scalar_type(),
                                  "batch_norm", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* mean_data = mean.mutable_data_ptr<acc_t>();
    std::vector<acc_t> var(input.channels);
    if (input.channels_last) {
      moments_channels_last<scalar_t>(input, mean_data, var.data());
    } else {
      moments_contiguous<scalar_t>(input, mean_data, var.data());
    }
    finalize_channels(mean_data, var.data(), input.channels, static_cast<double>(input.count()),
                      running_mean, running_var, momentum, eps, invstd.mutable_data_ptr<acc_t>());
  });
}

void CpuKernels::running_stats(const at::Tensor& running_mean, const at::Tensor& running_var,
                               double eps, at::Tensor& mean, at::Tensor& invstd) {
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "batch_norm", [&] {
    using acc_t = scalar_t;
    const int64_t C = mean.numel();
    const std::vector<acc_t> rm = cpu::channel_values<acc_t>(running_mean, C, 0);
    const std::vector<acc_t> rv = cpu::channel_values<acc_t>(running_var, C, 0);
    std::copy(rm.begin(), rm.end(), mean.mutable_data_ptr<acc_t>());
    acc_t* out = invstd.mutable_data_ptr<acc_t>();
    for (int64_t c = 0; c < C; ++c) out[c] = inverse_std(rv[c], acc_t(eps));
  });
}

}  // namespace normext::batch_norm::NORMEXT_CPU_CAPABILITY

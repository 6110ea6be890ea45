// Per-channel batch statistics (one read of the input) and the running-stat
// update.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "batch_norm/cpu/kernels.h"
#include "batch_norm/math.h"

namespace normext::batch_norm {
namespace {

using cpu::RowBlocks;
using cpu::RowChunks;

// Statistics of partial blocks are merged in double: the merges are few, and
// a float32 mean of data near 1e4 is only good to ~5e-4.
using merge_t = double;

// rough + deviation_sum / count: the exact mean of data whose deviations from
// `rough` sum to deviation_sum. With infinite data the correction is NaN; the
// rough mean is kept then, so an infinite input gives an infinite mean as in
// torch.
template <typename acc_t>
inline merge_t corrected_mean(acc_t rough, acc_t deviation_sum, merge_t count) {
  const merge_t correction = deviation_sum / count;
  return correction - correction == 0 ? rough + correction : rough;
}

// sum((x - rough)^2) - deviation_sum^2 / count = sum((x - mean)^2), the exact
// identity; the subtraction is skipped where it would turn inf into NaN or
// rounding would make the result negative (NaN stays NaN).
template <typename acc_t>
inline acc_t corrected_m2(acc_t squares, acc_t deviation_sum, acc_t count) {
  const acc_t correction = deviation_sum * deviation_sum / count;
  return squares - (correction < squares ? correction : acc_t(0));
}

// Two passes over a block that sits in cache: the sum, then squared deviations
// from the block mean, minus the square of their sum to cancel the rounding
// error of that mean (exact where a sum of squares would cancel).
// The returned mean is corrected by the mean deviation, in double.
template <typename scalar_t, typename acc_t>
void block_moments(const scalar_t* x, int64_t length, merge_t& mean, acc_t& m2) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < length; ++i) sum += static_cast<acc_t>(x[i]);
  const acc_t rough_mean = sum / length;
  acc_t deviations = 0, squares = 0;
#pragma omp simd reduction(+ : deviations, squares)
  for (int64_t i = 0; i < length; ++i) {
    const acc_t d = static_cast<acc_t>(x[i]) - rough_mean;
    deviations += d;
    squares += d * d;
  }
  mean = corrected_mean(rough_mean, deviations, length);
  m2 = corrected_m2(squares, deviations, static_cast<acc_t>(length));
}

// Contiguous (N, C, L): moments of each block, then per channel the mean of
// the block means and sum(m2_b + n_b * (mean_b - mean)^2), whose terms are
// all non-negative (an infinite input gives an infinite mean, as in torch).
template <typename scalar_t, typename acc_t>
void moments_contiguous(const ChannelView& v, acc_t* mean, acc_t* var) {
  const scalar_t* x = v.data.const_data_ptr<scalar_t>();
  const RowBlocks blocks(v);
  std::vector<merge_t> block_mean(blocks.size());
  std::vector<acc_t> block_m2(blocks.size());
  blocks.for_each([&](int64_t, int64_t offset, int64_t length, int64_t index) {
    block_moments(x + offset, length, block_mean[index], block_m2[index]);
  });
  const merge_t count = static_cast<merge_t>(v.count());
  at::parallel_for(0, v.channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t first = c * blocks.per_channel();
      merge_t sum = 0;
      for (int64_t p = 0; p < blocks.per_channel(); ++p) {
        sum += blocks.block_length(p % blocks.blocks_per_row) *
               static_cast<merge_t>(block_mean[first + p]);
      }
      const merge_t m = sum / count;
      merge_t m2 = 0;
      for (int64_t p = 0; p < blocks.per_channel(); ++p) {
        const merge_t delta = static_cast<merge_t>(block_mean[first + p]) - m;
        m2 += block_m2[first + p] + blocks.block_length(p % blocks.blocks_per_row) * delta * delta;
      }
      mean[c] = static_cast<acc_t>(m);
      var[c] = static_cast<acc_t>(m2 / count);
    }
  });
}

// Channels-last (rows, C): each thread takes a range of rows, in tiles that
// stay in cache; a tile's moments come from two passes, vectorized across C,
// and are Chan-merged into the thread's; the threads' are merged at the end.
// The mean reported is the plain sum over tiles (inf stays inf, as in torch);
// the Chan means serve the m2 merges.
template <typename scalar_t, typename acc_t>
void moments_channels_last(const ChannelView& v, acc_t* mean, acc_t* var) {
  const scalar_t* x = v.data.const_data_ptr<scalar_t>();
  const int64_t C = v.channels;
  const RowChunks chunks(v.count(), C);
  // Short tiles keep the float32 first pass (a plain sum per channel) accurate.
  const int64_t tile_rows = std::clamp<int64_t>(cpu::kBlockElements * 4 / C, 1, 256);
  std::vector<merge_t> chunk_mean(chunks.chunks * C, 0), chunk_m2(chunks.chunks * C, 0);
  std::vector<merge_t> chunk_sum(chunks.chunks * C, 0);
  chunks.for_each([&](int64_t chunk, int64_t row_begin, int64_t row_end) {
    merge_t* __restrict__ m = chunk_mean.data() + chunk * C;
    merge_t* __restrict__ m2 = chunk_m2.data() + chunk * C;
    merge_t* __restrict__ sum = chunk_sum.data() + chunk * C;
    std::vector<acc_t> tile_mean(C), tile_deviation(C), tile_m2(C);
    acc_t* __restrict__ tm = tile_mean.data();
    acc_t* __restrict__ td = tile_deviation.data();
    acc_t* __restrict__ tm2 = tile_m2.data();
    merge_t count = 0;
    for (int64_t tile = row_begin; tile < row_end; tile += tile_rows) {
      const int64_t rows = std::min(tile_rows, row_end - tile);
      std::fill(tile_mean.begin(), tile_mean.end(), acc_t(0));
      std::fill(tile_deviation.begin(), tile_deviation.end(), acc_t(0));
      std::fill(tile_m2.begin(), tile_m2.end(), acc_t(0));
      for (int64_t r = tile; r < tile + rows; ++r) {
        const scalar_t* row = x + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) tm[c] += static_cast<acc_t>(row[c]);
      }
      const acc_t inv_rows = acc_t(1) / rows;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) tm[c] *= inv_rows;
      for (int64_t r = tile; r < tile + rows; ++r) {
        const scalar_t* row = x + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const acc_t d = static_cast<acc_t>(row[c]) - tm[c];
          td[c] += d;
          tm2[c] += d * d;
        }
      }
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const merge_t tile_mean_c = corrected_mean(tm[c], td[c], merge_t(rows));
        const merge_t tile_m2_c = corrected_m2(tm2[c], td[c], acc_t(rows));
        chan_merge(m[c], m2[c], count, tile_mean_c, tile_m2_c, merge_t(rows));
        sum[c] += tile_mean_c * rows;
      }
      count += rows;
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    merge_t m = 0, m2 = 0, count = 0, sum = 0;
    for (int64_t chunk = 0; chunk < chunks.chunks; ++chunk) {
      const merge_t rows = chunks.rows * (chunk + 1) / chunks.chunks - chunks.rows * chunk / chunks.chunks;
      chan_merge(m, m2, count, chunk_mean[chunk * C + c], chunk_m2[chunk * C + c], rows);
      count += rows;
      sum += chunk_sum[chunk * C + c];
    }
    mean[c] = static_cast<acc_t>(sum / count);
    var[c] = static_cast<acc_t>(m2 / count);
  }
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
    using acc_t = scalar_t;
    const acc_t* m = mean.const_data_ptr<acc_t>();
    const acc_t* v = var.const_data_ptr<acc_t>();
    acc_t* out = invstd.mutable_data_ptr<acc_t>();
    const int64_t C = mean.numel();
    for (int64_t c = 0; c < C; ++c) out[c] = inverse_std(v[c], acc_t(eps));
    if (!running_mean.defined()) return;
    // Running stats may be half/bfloat16 or strided: update an accumulate-type
    // copy and write it back.
    std::vector<acc_t> rm = cpu::channel_values<acc_t>(running_mean, C, 0);
    std::vector<acc_t> rv = cpu::channel_values<acc_t>(running_var, C, 0);
    for (int64_t c = 0; c < C; ++c) {
      rm[c] = running_update(rm[c], m[c], acc_t(momentum));
      rv[c] = running_update(rv[c], unbiased_from_biased(v[c], acc_t(count)), acc_t(momentum));
    }
    const auto options = mean.options();
    running_mean.copy_(at::from_blob(rm.data(), {C}, options).view(running_mean.sizes()));
    running_var.copy_(at::from_blob(rv.data(), {C}, options).view(running_var.sizes()));
  });
}

}  // namespace normext::batch_norm

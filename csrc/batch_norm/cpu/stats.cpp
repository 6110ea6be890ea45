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

// Two passes over a block that sits in cache: the sum, then squared deviations
// from the block mean (exact where sum-of-squares would cancel).
template <typename scalar_t, typename acc_t>
void block_moments(const scalar_t* x, int64_t length, acc_t& mean, acc_t& m2) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < length; ++i) sum += static_cast<acc_t>(x[i]);
  mean = sum / length;
  acc_t squares = 0;
#pragma omp simd reduction(+ : squares)
  for (int64_t i = 0; i < length; ++i) {
    const acc_t d = static_cast<acc_t>(x[i]) - mean;
    squares += d * d;
  }
  m2 = squares;
}

// Contiguous (N, C, L): moments of each block, then a Chan merge per channel.
template <typename scalar_t, typename acc_t>
void moments_contiguous(const ChannelView& v, acc_t* mean, acc_t* var) {
  const scalar_t* x = v.data.const_data_ptr<scalar_t>();
  const RowBlocks blocks(v);
  std::vector<acc_t> block_mean(blocks.size()), block_m2(blocks.size());
  blocks.for_each([&](int64_t, int64_t offset, int64_t length, int64_t index) {
    block_moments(x + offset, length, block_mean[index], block_m2[index]);
  });
  at::parallel_for(0, v.channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      acc_t m = 0, m2 = 0, count = 0;
      for (int64_t p = 0; p < blocks.per_channel(); ++p) {
        const int64_t index = c * blocks.per_channel() + p;
        const acc_t length = blocks.block_length(p % blocks.blocks_per_row);
        chan_merge(m, m2, count, block_mean[index], block_m2[index], length);
        count += length;
      }
      mean[c] = m;
      var[c] = m2 / count;
    }
  });
}

// Channels-last (rows, C): each thread takes a range of rows, in tiles that
// stay in cache; a tile's moments come from two passes, vectorized across C,
// and are merged into the thread's; the threads' are merged at the end.
template <typename scalar_t, typename acc_t>
void moments_channels_last(const ChannelView& v, acc_t* mean, acc_t* var) {
  const scalar_t* x = v.data.const_data_ptr<scalar_t>();
  const int64_t C = v.channels;
  const RowChunks chunks(v.count(), C);
  const int64_t tile_rows = std::max<int64_t>(1, cpu::kBlockElements * 4 / C);
  std::vector<acc_t> chunk_mean(chunks.chunks * C, 0), chunk_m2(chunks.chunks * C, 0);
  chunks.for_each([&](int64_t chunk, int64_t row_begin, int64_t row_end) {
    acc_t* __restrict__ m = chunk_mean.data() + chunk * C;
    acc_t* __restrict__ m2 = chunk_m2.data() + chunk * C;
    std::vector<acc_t> tile_mean(C), tile_m2(C);
    acc_t* __restrict__ tm = tile_mean.data();
    acc_t* __restrict__ tm2 = tile_m2.data();
    acc_t count = 0;
    for (int64_t tile = row_begin; tile < row_end; tile += tile_rows) {
      const int64_t rows = std::min(tile_rows, row_end - tile);
      std::fill(tile_mean.begin(), tile_mean.end(), acc_t(0));
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
          tm2[c] += d * d;
        }
      }
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) chan_merge(m[c], m2[c], count, tm[c], tm2[c], acc_t(rows));
      count += rows;
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    acc_t m = 0, m2 = 0, count = 0;
    for (int64_t chunk = 0; chunk < chunks.chunks; ++chunk) {
      const acc_t rows = chunks.rows * (chunk + 1) / chunks.chunks - chunks.rows * chunk / chunks.chunks;
      chan_merge(m, m2, count, chunk_mean[chunk * C + c], chunk_m2[chunk * C + c], rows);
      count += rows;
    }
    mean[c] = m;
    var[c] = m2 / count;
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

// Backward: per row, sum(g) and sum(g * (x - mean)) with g = dy * weight in
// one read of dy and x, then the input gradient from the row in cache
// (common/math.h: grad_input_coefficients, with the row as the group). The
// parameter gradients' sums over rows: per block of rows (at most kMaxBlocks,
// fixed by the shape), sums of kParamRows rows in the accumulate type added in
// double; the blocks' sums added in block order: the same at any thread count.
#include "layer_norm/cpu/kernels.h"

namespace normext::layer_norm::NORMEXT_CPU_CAPABILITY {
namespace {

// Rows whose parameter-gradient terms are added in the accumulate type before
// they are added in double.
constexpr int64_t kParamRows = 16;
// Blocks of rows whose parameter-gradient sums are kept apart (2 doubles per
// feature each): enough tasks for 64 threads, and their sums (read again to add
// them up) stay small beside the input.
constexpr int64_t kMaxBlocks = 64;

// The terms of a row's backward sums: g = dy * weight and g * (x - mean).
template <typename T, typename acc_t_>
struct RowGradSums {
  using acc_t = acc_t_;
  static constexpr int64_t kElementBytes = sizeof(T);
  static constexpr bool kPrefetch = false;
  static constexpr bool kLaneTerms = false;

  const T* dy;
  const T* x;
  const acc_t* weight;  // per feature
  const acc_t* mean;    // per row
  int64_t features;

  void terms(int64_t r, int64_t offset, acc_t& g, acc_t& g_xmu) const {
    g = static_cast<acc_t>(dy[offset]) * weight[offset - r * features];
    g_xmu = g * (static_cast<acc_t>(x[offset]) - mean[r]);
  }
  bool group_rows(int64_t) const { return false; }
};

template <typename scalar_t>
void backward_rows(const Rows& grad_out, const Rows& v, const at::Tensor& mean_in,
                   const at::Tensor& rstd_in, const at::Tensor& weight, bool rms,
                   at::Tensor& grad_input, at::Tensor& grad_weight, at::Tensor& grad_bias) {
  using T = cpu::loop_t<scalar_t>;
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = v.features, rows = v.rows;
  const T* x = cpu::loop_data<scalar_t>(v.data);
  const T* dy = cpu::loop_data<scalar_t>(grad_out.data);
  T* dx = grad_input.defined() ? cpu::mutable_loop_data<scalar_t>(grad_input) : nullptr;
  const acc_t* mean = mean_in.const_data_ptr<acc_t>();
  const acc_t* rstd = rstd_in.const_data_ptr<acc_t>();
  const std::vector<acc_t> w = cpu::channel_values<acc_t>(weight, D, 1);
  const RowGradSums<T, acc_t> sums_op{dy, x, w.data(), mean, D};
  const bool param_grads = grad_weight.defined() || grad_bias.defined();
  const int64_t rows_per_block =
      param_grads ? std::max(kParamRows, (rows + kMaxBlocks - 1) / kMaxBlocks) : 1;
  const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
  // [block][term][feature]: sum(dy * (x - mean) * rstd), sum(dy).
  std::vector<double> partials(param_grads ? blocks * 2 * D : 0);
  at::parallel_for(0, blocks, cpu::grain_for(rows_per_block * D), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> run_sums(param_grads ? 2 * D : 0);
    acc_t* __restrict__ sum_dy_xhat = run_sums.data();
    acc_t* __restrict__ sum_dy = run_sums.data() + D;
    for (int64_t block = begin; block < end; ++block) {
      double* __restrict__ block_sums = partials.data() + block * 2 * D;
      const int64_t r_end = std::min(rows, (block + 1) * rows_per_block);
      for (int64_t r = block * rows_per_block; r < r_end; ++r) {
        const T* dy_row = dy + r * D;
        const T* x_row = x + r * D;
        const acc_t row_mean = mean[r], row_rstd = rstd[r];
        if (dx) {
          double sums[cpu::kTerms];
          cpu::reduce_run(sums_op, r, D, sums);
          const auto k = cpu::grad_input_coefficients(
              rms ? acc_t(0) : static_cast<acc_t>(sums[0]), static_cast<acc_t>(sums[1]), row_rstd,
              acc_t(1), static_cast<acc_t>(1.0 / static_cast<double>(D)));
          const acc_t* __restrict__ wp = w.data();
          T* dx_row = dx + r * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) {
            const acc_t g = static_cast<acc_t>(dy_row[d]) * wp[d];
            cpu::store(dx_row, d,
                       cpu::grad_input_centred(g, static_cast<acc_t>(x_row[d]) - row_mean, k));
          }
        }
        if (param_grads) {
          const int64_t in_block = r - block * rows_per_block;
          if (in_block % kParamRows == 0) std::fill(run_sums.begin(), run_sums.end(), acc_t(0));
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) {
            const acc_t g = static_cast<acc_t>(dy_row[d]);
            sum_dy_xhat[d] += g * ((static_cast<acc_t>(x_row[d]) - row_mean) * row_rstd);
            sum_dy[d] += g;
          }
          if ((in_block + 1) % kParamRows == 0 || r + 1 == r_end) {
#pragma omp simd
            for (int64_t i = 0; i < 2 * D; ++i) block_sums[i] += run_sums[i];
          }
        }
      }
    }
  });
  if (!param_grads) return;
  std::vector<acc_t> totals(2 * D);
  at::parallel_for(0, D, cpu::grain_for(2 * blocks), [&](int64_t begin, int64_t end) {
    std::vector<double> total(2 * (end - begin), 0.0);
    for (int64_t block = 0; block < blocks; ++block) {
      for (int q = 0; q < 2; ++q) {
        const double* __restrict__ part = partials.data() + (block * 2 + q) * D + begin;
        double* __restrict__ sum = total.data() + q * (end - begin);
#pragma omp simd
        for (int64_t d = 0; d < end - begin; ++d) sum[d] += part[d];
      }
    }
    for (int q = 0; q < 2; ++q) {
      for (int64_t d = begin; d < end; ++d) {
        totals[q * D + d] = static_cast<acc_t>(total[q * (end - begin) + d - begin]);
      }
    }
  });
  if (grad_weight.defined()) {
    cpu::store_channel_values<acc_t>(c10::ArrayRef<acc_t>(totals.data(), D), grad_weight);
  }
  if (grad_bias.defined()) {
    cpu::store_channel_values<acc_t>(c10::ArrayRef<acc_t>(totals.data() + D, D), grad_bias);
  }
}

}  // namespace

void CpuKernels::backward(const Rows& grad_out, const Rows& input, const at::Tensor& mean,
                          const at::Tensor& rstd, const at::Tensor& weight, bool rms,
                          at::Tensor& grad_input, at::Tensor& grad_weight,
                          at::Tensor& grad_bias) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.data.scalar_type(),
                                  "layer_norm_backward", [&] {
    backward_rows<scalar_t>(grad_out, input, mean, rstd, weight, rms, grad_input, grad_weight,
                            grad_bias);
  });
}

}  // namespace normext::layer_norm::NORMEXT_CPU_CAPABILITY

// Backward: a block per row sums g = dy * weight and g * (x - mean), then
// writes the input gradient from the row in L1/L2 (common/math.h:
// grad_input_coefficients, the row as the group), plus grad_sum where given:
// 2R+1W (3R+1W with grad_sum). The parameter gradients read dy and x again
// (4R+1W in all, 5R+1W with grad_sum): per split of rows a thread
// per feature sums dy * (x - mean) * rstd and dy down the split's rows
// (coalesced across the features), then a thread per feature adds the splits
// in order; every sum in double: the same bits on every run.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>

#include "layer_norm/cuda/kernels.h"
#include "layer_norm/cuda/rows.cuh"

namespace normext::layer_norm {
namespace {

using cuda::kThreads;
using cuda::Sums;

// Rows a split of the parameter gradients' sums covers at least; splits are
// at most kPartialValues / features (their partials stay within 64 MiB).
constexpr int64_t kSplitRows = 64;
constexpr int64_t kPartialValues = int64_t{1} << 22;

template <typename T, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    grad_input_kernel(const T* __restrict__ grad_out, const T* __restrict__ input,
                      const acc_t* __restrict__ weight, const acc_t* __restrict__ mean,
                      const acc_t* __restrict__ rstd, const T* __restrict__ grad_sum,
                      int64_t D, bool rms, T* __restrict__ grad_input) {
  __shared__ Sums<double> shared[kThreads];
  const int64_t r = blockIdx.x;
  const T* dy = grad_out + r * D;
  const T* x = input + r * D;
  const acc_t row_mean = mean[r];
  double sum_g = 0, sum_g_xmu = 0;
  for (int64_t d = threadIdx.x; d < D; d += kThreads) {
    const acc_t g = static_cast<acc_t>(dy[d]) * (weight != nullptr ? weight[d] : acc_t(1));
    sum_g += g;
    sum_g_xmu += static_cast<double>(g) * (static_cast<acc_t>(x[d]) - row_mean);
  }
  const Sums<double> sums = cuda::block_sums(shared, sum_g, sum_g_xmu);
  const auto k = math::grad_input_coefficients(
      rms ? acc_t(0) : static_cast<acc_t>(sums.first), static_cast<acc_t>(sums.second), rstd[r],
      acc_t(1), static_cast<acc_t>(1.0 / static_cast<double>(D)));
  T* dx = grad_input + r * D;
  const T* gs = grad_sum != nullptr ? grad_sum + r * D : nullptr;
  for (int64_t d = threadIdx.x; d < D; d += kThreads) {
    const acc_t g = static_cast<acc_t>(dy[d]) * (weight != nullptr ? weight[d] : acc_t(1));
    acc_t value = math::grad_input_centred(g, static_cast<acc_t>(x[d]) - row_mean, k);
    if (gs != nullptr) value += static_cast<acc_t>(gs[d]);
    dx[d] = static_cast<T>(value);
  }
}

// partials[split][term][feature]: sums of dy * (x - mean) * rstd and dy over
// the split's rows.
template <typename T, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    param_partials_kernel(const T* __restrict__ grad_out, const T* __restrict__ input,
                          const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd,
                          int64_t rows, int64_t D, int64_t split_rows,
                          double* __restrict__ partials) {
  const int64_t d = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (d >= D) return;
  const int64_t split = blockIdx.y;
  const int64_t r_end = (split + 1) * split_rows < rows ? (split + 1) * split_rows : rows;
  double dy_xhat = 0, dy_sum = 0;
  for (int64_t r = split * split_rows; r < r_end; ++r) {
    const acc_t g = static_cast<acc_t>(grad_out[r * D + d]);
    dy_xhat += g * ((static_cast<acc_t>(input[r * D + d]) - mean[r]) * rstd[r]);
    dy_sum += g;
  }
  partials[(split * 2) * D + d] = dy_xhat;
  partials[(split * 2 + 1) * D + d] = dy_sum;
}

// totals[term][feature]: the splits' partials added in split order.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    param_totals_kernel(const double* __restrict__ partials, int64_t splits, int64_t D,
                        acc_t* __restrict__ totals) {
  const int64_t d = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (d >= D) return;
  double dy_xhat = 0, dy_sum = 0;
  for (int64_t split = 0; split < splits; ++split) {
    dy_xhat += partials[(split * 2) * D + d];
    dy_sum += partials[(split * 2 + 1) * D + d];
  }
  totals[d] = static_cast<acc_t>(dy_xhat);
  totals[D + d] = static_cast<acc_t>(dy_sum);
}

}  // namespace

void CudaKernels::backward(const Rows& grad_out, const Rows& input, const at::Tensor& mean,
                           const at::Tensor& rstd, const at::Tensor& weight, bool rms,
                           const at::Tensor& grad_sum, at::Tensor& grad_input,
                           at::Tensor& grad_weight, at::Tensor& grad_bias) {
  cuda::check_rows(input);
  const c10::cuda::CUDAGuard guard(input.data.device());
  const auto stream = c10::cuda::getCurrentCUDAStream(input.data.device().index());
  const int64_t D = input.features, rows = input.rows;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.data.scalar_type(),
                                  "layer_norm_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    const scalar_t* dy = grad_out.data.const_data_ptr<scalar_t>();
    const scalar_t* x = input.data.const_data_ptr<scalar_t>();
    const acc_t* mean_data = mean.const_data_ptr<acc_t>();
    const acc_t* rstd_data = rstd.const_data_ptr<acc_t>();
    if (grad_input.defined()) {
      const at::Tensor w = cuda::accumulate_param(weight, acc);
      grad_input_kernel<scalar_t, acc_t><<<rows, kThreads, 0, stream>>>(
          dy, x, w.defined() ? w.const_data_ptr<acc_t>() : nullptr, mean_data, rstd_data,
          grad_sum.defined() ? grad_sum.const_data_ptr<scalar_t>() : nullptr, D, rms,
          grad_input.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (!grad_weight.defined() && !grad_bias.defined()) return;
    const int64_t max_splits = std::clamp<int64_t>(kPartialValues / D, 1, 65535);
    const int64_t split_rows = std::max(kSplitRows, (rows + max_splits - 1) / max_splits);
    const int64_t splits = (rows + split_rows - 1) / split_rows;
    const int64_t feature_blocks = (D + kThreads - 1) / kThreads;
    TORCH_CHECK(feature_blocks <= std::numeric_limits<int32_t>::max(),
                "layer_norm_backward: too many features for the CUDA kernels: ", D);
    const at::Tensor partials =
        at::empty({splits * 2 * D}, input.data.options().dtype(at::kDouble));
    param_partials_kernel<scalar_t, acc_t>
        <<<dim3(static_cast<unsigned>(feature_blocks), static_cast<unsigned>(splits)), kThreads, 0,
           stream>>>(dy, x, mean_data, rstd_data, rows, D, split_rows,
                     partials.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const at::Tensor totals = at::empty({2, D}, input.data.options().dtype(acc));
    param_totals_kernel<acc_t><<<feature_blocks, kThreads, 0, stream>>>(
        partials.const_data_ptr<double>(), splits, D, totals.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (grad_weight.defined()) grad_weight.view(-1).copy_(totals[0]);
    if (grad_bias.defined()) grad_bias.view(-1).copy_(totals[1]);
  });
}

}  // namespace normext::layer_norm

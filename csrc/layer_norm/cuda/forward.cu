// Forward: a block per row. With a residual the row's sum is written first
// (each thread re-reads only what it wrote); the mean from a first pass
// (none for RMSNorm), the variance from a second pass of squared deviations
// from it (stable for data with a large mean), then the output. The second
// and third passes re-read the row from L1/L2: 1R+1W from memory (+1R+1W
// with a residual).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "layer_norm/cuda/kernels.h"
#include "layer_norm/cuda/rows.cuh"

namespace normext::layer_norm {
namespace {

using cuda::kThreads;
using cuda::Sums;

template <typename T, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const T* __restrict__ input, const T* __restrict__ residual,
                   const acc_t* __restrict__ weight, const acc_t* __restrict__ bias, int64_t D,
                   acc_t eps, bool rms, T* __restrict__ output, T* __restrict__ sum,
                   acc_t* __restrict__ mean_out, acc_t* __restrict__ rstd_out) {
  __shared__ Sums<double> shared[kThreads];
  const int64_t r = blockIdx.x;
  const T* x = input + r * D;
  if (residual != nullptr) {
    const T* res = residual + r * D;
    T* s = sum + r * D;
    for (int64_t d = threadIdx.x; d < D; d += kThreads) {
      s[d] = static_cast<T>(static_cast<acc_t>(x[d]) + static_cast<acc_t>(res[d]));
    }
    x = s;
  }
  // A thread's sums in double: its D / kThreads terms neither round nor
  // overflow where the CPU's double sums would not.
  acc_t mean = 0;
  if (!rms) {
    double local = 0;
    for (int64_t d = threadIdx.x; d < D; d += kThreads) local += static_cast<acc_t>(x[d]);
    mean = static_cast<acc_t>(cuda::block_sums(shared, local, 0).first / static_cast<double>(D));
  }
  double squares = 0;
  for (int64_t d = threadIdx.x; d < D; d += kThreads) {
    const acc_t deviation = static_cast<acc_t>(x[d]) - mean;
    squares += static_cast<double>(deviation) * deviation;
  }
  const double var = cuda::block_sums(shared, squares, 0).first / static_cast<double>(D);
  const acc_t rstd = math::inverse_std(static_cast<acc_t>(var), eps);
  if (threadIdx.x == 0) {
    mean_out[r] = mean;
    rstd_out[r] = rstd;
  }
  T* y = output + r * D;
  for (int64_t d = threadIdx.x; d < D; d += kThreads) {
    const acc_t scale = weight != nullptr ? rstd * weight[d] : rstd;
    const acc_t shift = bias != nullptr ? bias[d] : acc_t(0);
    y[d] = static_cast<T>(math::normalize(static_cast<acc_t>(x[d]), mean, scale, shift));
  }
}

}  // namespace

void CudaKernels::forward(const Rows& input, const at::Tensor& residual, const at::Tensor& weight,
                          const at::Tensor& bias, double eps, bool rms, at::Tensor& output,
                          at::Tensor& sum, at::Tensor& mean, at::Tensor& rstd) {
  cuda::check_rows(input);
  const c10::cuda::CUDAGuard guard(input.data.device());
  const auto stream = c10::cuda::getCurrentCUDAStream(input.data.device().index());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.data.scalar_type(),
                                  "layer_norm_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor w = cuda::accumulate_param(weight, acc);
    const at::Tensor b = cuda::accumulate_param(bias, acc);
    forward_kernel<scalar_t, acc_t><<<input.rows, kThreads, 0, stream>>>(
        input.data.const_data_ptr<scalar_t>(),
        residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr,
        w.defined() ? w.const_data_ptr<acc_t>() : nullptr,
        b.defined() ? b.const_data_ptr<acc_t>() : nullptr, input.features,
        static_cast<acc_t>(eps), rms, output.mutable_data_ptr<scalar_t>(),
        sum.defined() ? sum.mutable_data_ptr<scalar_t>() : nullptr, mean.mutable_data_ptr<acc_t>(),
        rstd.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace normext::layer_norm

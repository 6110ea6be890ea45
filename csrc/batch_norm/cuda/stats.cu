// Per-channel batch statistics from sums of deviations from a per-channel
// shift (math.h: shifted_moments, as on the CPU), and the running-stat update.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "batch_norm/cuda/kernels.h"
#include "batch_norm/cuda/reduce.cuh"
#include "batch_norm/math.h"

namespace normext::batch_norm {
namespace {

using cuda::Sums;

// sum(d) and sum(d^2) of d = x - shift; one read of the input, no division
// per element.
template <typename scalar_t, typename accumulate_t>
struct ShiftedSumsReducer {
  using acc_t = accumulate_t;
  using Context = acc_t;  // the channel's shift
  const scalar_t* input;
  int64_t channels;
  int64_t inner;
  bool channels_last;
  int64_t count;  // elements per channel
  acc_t* mean;
  acc_t* var;

  // math.h: channel_shift, over the channel's elements in either layout.
  __device__ acc_t context(int64_t c) const {
    return channel_shift<acc_t>(count, [&](int64_t j) {
      return static_cast<double>(input[channel_element(j, c, channels, inner, channels_last)]);
    });
  }

  template <typename index_t>
  __device__ void add(Sums<acc_t>& s, index_t element, acc_t shift) const {
    const acc_t d = static_cast<acc_t>(input[element]) - shift;
    s.first += d;
    s.second += d * d;
  }

  __device__ void finish(int64_t c, const Sums<double>& total) const {
    double m, m2;
    const double n = static_cast<double>(count);
    shifted_moments(static_cast<double>(context(c)), total.first, total.second, n, m, m2);
    mean[c] = static_cast<acc_t>(m);
    var[c] = static_cast<acc_t>(m2 / n);
  }
};

template <typename acc_t, typename param_t>
__global__ void finalize_kernel(const acc_t* mean, const acc_t* var, acc_t count, acc_t momentum,
                                acc_t eps, param_t* running_mean, param_t* running_var,
                                acc_t* invstd, int64_t channels) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  invstd[c] = inverse_std(var[c], eps);
  if (running_mean == nullptr) return;
  running_mean[c] = static_cast<param_t>(
      running_update(static_cast<acc_t>(running_mean[c]), mean[c], momentum));
  running_var[c] = static_cast<param_t>(running_update(
      static_cast<acc_t>(running_var[c]), unbiased_from_biased(var[c], count), momentum));
}

}  // namespace

void CudaKernels::moments(const ChannelView& input, at::Tensor& mean, at::Tensor& var) {
  const c10::cuda::CUDAGuard guard(input.data.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.data.scalar_type(),
                                  "batch_norm", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ShiftedSumsReducer<scalar_t, acc_t> reducer{
        input.data.const_data_ptr<scalar_t>(), input.channels,
        input.inner, input.channels_last, input.count(),
        mean.mutable_data_ptr<acc_t>(),
        var.mutable_data_ptr<acc_t>()};
    cuda::reduce_per_channel(input, reducer);
  });
}

void CudaKernels::finalize(const at::Tensor& mean, const at::Tensor& var, double count,
                           const at::Tensor& running_mean, const at::Tensor& running_var,
                           double momentum, double eps, at::Tensor& invstd) {
  const c10::cuda::CUDAGuard guard(mean.device());
  const auto stream = c10::cuda::getCurrentCUDAStream(mean.device().index());
  const int64_t channels = mean.numel();
  if (channels == 0) return;
  // Kernels update contiguous running stats; others go through a copy.
  at::Tensor rm = running_mean.defined() ? running_mean.contiguous() : running_mean;
  at::Tensor rv = running_var.defined() ? running_var.contiguous() : running_var;
  const auto param_type = rm.defined() ? rm.scalar_type() : mean.scalar_type();
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "batch_norm", [&] {
    using acc_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param_type, "batch_norm", [&] {
      using param_t = scalar_t;
      const unsigned blocks = static_cast<unsigned>((channels + cuda::kThreads - 1) / cuda::kThreads);
      finalize_kernel<acc_t, param_t><<<blocks, cuda::kThreads, 0, stream>>>(
          mean.const_data_ptr<acc_t>(), var.const_data_ptr<acc_t>(), static_cast<acc_t>(count),
          static_cast<acc_t>(momentum), static_cast<acc_t>(eps),
          rm.defined() ? rm.mutable_data_ptr<param_t>() : nullptr,
          rv.defined() ? rv.mutable_data_ptr<param_t>() : nullptr,
          invstd.mutable_data_ptr<acc_t>(), channels);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  if (rm.defined() && !rm.is_same(running_mean)) running_mean.copy_(rm);
  if (rv.defined() && !rv.is_same(running_var)) running_var.copy_(rv);
}

}  // namespace normext::batch_norm

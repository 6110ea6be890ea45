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

// Elements of a channel averaged into its shift: the shift only has to lie
// within a few standard deviations of the mean for the sums to stay exact.
constexpr int kShiftSample = 8;

// sum(d) and sum(d^2) of d = x - shift; one read of the input, no division
// per element.
template <typename scalar_t, typename accumulate_t>
struct ShiftedSumsReducer {
  using acc_t = accumulate_t;
  using Context = acc_t;  // the channel's shift
  const scalar_t* input;
  int64_t first_stride;   // element (0, c, 0...) is at c * first_stride
  int64_t sample_stride;  // between the sampled elements of a channel
  int64_t sample_size;
  double count;
  acc_t* mean;
  acc_t* var;

  // From the mean of the first few elements of the channel.
  __device__ acc_t context(int64_t c) const {
    double sum = 0;
    for (int64_t k = 0; k < sample_size; ++k) {
      sum += static_cast<double>(input[c * first_stride + k * sample_stride]);
    }
    return stable_shift<acc_t>(sum / static_cast<double>(sample_size));
  }

  template <typename index_t>
  __device__ void add(Sums<acc_t>& s, index_t element, acc_t shift) const {
    const acc_t d = static_cast<acc_t>(input[element]) - shift;
    s.first += d;
    s.second += d * d;
  }

  __device__ void finish(int64_t c, const Sums<double>& total) const {
    double m, m2;
    shifted_moments(static_cast<double>(context(c)), total.first, total.second, count, m, m2);
    mean[c] = static_cast<acc_t>(m);
    var[c] = static_cast<acc_t>(m2 / count);
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
  const int64_t run = input.channels_last ? input.count() : input.inner;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.data.scalar_type(),
                                  "batch_norm", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ShiftedSumsReducer<scalar_t, acc_t> reducer{
        input.data.const_data_ptr<scalar_t>(),
        input.channels_last ? 1 : input.inner,
        input.channels_last ? input.channels : 1,
        std::min<int64_t>(run, kShiftSample),
        static_cast<double>(input.count()),
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

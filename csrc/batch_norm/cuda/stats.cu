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
template <typename scalar_type, typename accumulate_t>
struct ShiftedSumsReducer {
  using scalar_t = scalar_type;
  using acc_t = accumulate_t;
  using Context = acc_t;  // the channel's shift
  template <int size>
  using Loaded = cuda::Pack<scalar_t, size>;
  const scalar_t* input;
  int64_t channels;
  int64_t inner;
  bool channels_last;
  int64_t count;  // elements per channel

  // math.h: sample_shift, over the channel's elements in either layout.
  __device__ acc_t context(int64_t c) const {
    return sample_shift<acc_t>(count, [&](int64_t j) {
      return static_cast<double>(input[channel_element(j, c, channels, inner, channels_last)]);
    });
  }

  template <int size, typename index_t>
  __device__ Loaded<size> load(index_t first) const {
    return cuda::load_pack<size>(input, first);
  }

  template <int size>
  __device__ void add(Sums<acc_t>& s, const Loaded<size>& x, int k, acc_t shift) const {
    const acc_t d = static_cast<acc_t>(x.value[k]) - shift;
    s.first += d;
    s.second += d * d;
  }

  // The mean and biased variance of a channel from its sums and shift.
  __device__ void moments(const Sums<double>& total, acc_t shift, acc_t& mean, acc_t& var) const {
    double m, m2;
    const double n = static_cast<double>(count);
    shifted_moments(static_cast<double>(shift), total.first, total.second, n, m, m2);
    mean = static_cast<acc_t>(m);
    var = static_cast<acc_t>(m2 / n);
  }
};

// The running-stat update of channel c from its batch mean and biased variance.
template <typename acc_t, typename param_t>
__device__ void update_running(int64_t c, acc_t mean, acc_t var, acc_t count, acc_t momentum,
                               param_t* running_mean, param_t* running_var) {
  running_mean[c] =
      static_cast<param_t>(running_update(static_cast<acc_t>(running_mean[c]), mean, momentum));
  running_var[c] = static_cast<param_t>(running_update(
      static_cast<acc_t>(running_var[c]), unbiased_from_biased(var, count), momentum));
}

// Stage 2 of batch_norm_moments: the mean and biased variance.
template <typename acc_t>
struct MomentsFinish {
  acc_t* mean;
  acc_t* var;

  template <class R>
  __device__ void operator()(const R& reducer, int64_t c, const Sums<double>& total,
                             acc_t shift) const {
    reducer.moments(total, shift, mean[c], var[c]);
  }
};

// Stage 2 of the training forward: the mean, invstd and the running-stat
// update (when running_mean is not null), so that no finalize kernel follows.
template <typename acc_t, typename param_t>
struct BatchStatsFinish {
  acc_t* mean;
  acc_t* invstd;
  param_t* running_mean;
  param_t* running_var;
  acc_t count;
  acc_t momentum;
  acc_t eps;

  template <class R>
  __device__ void operator()(const R& reducer, int64_t c, const Sums<double>& total,
                             acc_t shift) const {
    acc_t m, v;
    reducer.moments(total, shift, m, v);
    mean[c] = m;
    invstd[c] = inverse_std(v, eps);
    if (running_mean != nullptr) {
      update_running(c, m, v, count, momentum, running_mean, running_var);
    }
  }
};

template <typename acc_t, typename param_t>
__global__ void finalize_kernel(const acc_t* mean, const acc_t* var, acc_t count, acc_t momentum,
                                acc_t eps, param_t* running_mean, param_t* running_var,
                                acc_t* invstd, int64_t channels) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  invstd[c] = inverse_std(var[c], eps);
  if (running_mean != nullptr) {
    update_running(c, mean[c], var[c], count, momentum, running_mean, running_var);
  }
}

// The eval statistics: the running mean and invstd in the accumulate type.
template <typename acc_t, typename param_t>
__global__ void running_stats_kernel(const param_t* running_mean, const param_t* running_var,
                                     acc_t eps, acc_t* mean, acc_t* invstd, int64_t channels) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  mean[c] = static_cast<acc_t>(running_mean[c]);
  invstd[c] = inverse_std(static_cast<acc_t>(running_var[c]), eps);
}

unsigned channel_blocks(int64_t channels) {
  return static_cast<unsigned>((channels + cuda::kThreads - 1) / cuda::kThreads);
}

template <typename scalar_t, typename acc_t>
ShiftedSumsReducer<scalar_t, acc_t> shifted_sums_reducer(const ChannelView& input) {
  return {input.data.const_data_ptr<scalar_t>(), input.channels, input.inner,
          input.channels_last, input.count()};
}

// Running stats are updated in place when dense, else through a dense copy
// written back after the kernel (`write_back`).
struct RunningStats {
  at::Tensor mean, var;

  RunningStats(const at::Tensor& running_mean, const at::Tensor& running_var)
      : mean(cuda::dense(running_mean)), var(cuda::dense(running_var)) {}

  void write_back(const at::Tensor& running_mean, const at::Tensor& running_var) const {
    if (mean.defined() && !mean.is_same(running_mean)) running_mean.copy_(mean);
    if (var.defined() && !var.is_same(running_var)) running_var.copy_(var);
  }
};

}  // namespace

void CudaKernels::moments(const ChannelView& input, at::Tensor& mean, at::Tensor& var) {
  const c10::cuda::CUDAGuard guard(input.data.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.data.scalar_type(),
                                  "batch_norm", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cuda::reduce_per_channel(
        input, shifted_sums_reducer<scalar_t, acc_t>(input),
        MomentsFinish<acc_t>{mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>()},
        {input.data.const_data_ptr()});
  });
}

void CudaKernels::batch_stats(const ChannelView& input, const at::Tensor& running_mean,
                              const at::Tensor& running_var, double momentum, double eps,
                              at::Tensor& mean, at::Tensor& invstd) {
  const c10::cuda::CUDAGuard guard(input.data.device());
  const RunningStats running(running_mean, running_var);
  const auto acc_type = mean.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.data.scalar_type(),
                                  "batch_norm", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto param_type = running.mean.defined() ? running.mean.scalar_type() : acc_type;
    cuda::with_param_type<scalar_t, acc_t>(param_type, [&](auto param) {
      using param_t = decltype(param);
      const BatchStatsFinish<acc_t, param_t> finish{
          mean.mutable_data_ptr<acc_t>(),
          invstd.mutable_data_ptr<acc_t>(),
          cuda::mutable_data_or_null<param_t>(running.mean),
          cuda::mutable_data_or_null<param_t>(running.var),
          static_cast<acc_t>(input.count()),
          static_cast<acc_t>(momentum),
          static_cast<acc_t>(eps)};
      cuda::reduce_per_channel(input, shifted_sums_reducer<scalar_t, acc_t>(input), finish,
                               {input.data.const_data_ptr()});
    });
  });
  running.write_back(running_mean, running_var);
}

void CudaKernels::finalize(const at::Tensor& mean, const at::Tensor& var, double count,
                           const at::Tensor& running_mean, const at::Tensor& running_var,
                           double momentum, double eps, at::Tensor& invstd) {
  const c10::cuda::CUDAGuard guard(mean.device());
  const auto stream = c10::cuda::getCurrentCUDAStream(mean.device().index());
  const int64_t channels = mean.numel();
  if (channels == 0) return;
  const RunningStats running(running_mean, running_var);
  const auto param_type = running.mean.defined() ? running.mean.scalar_type() : mean.scalar_type();
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "batch_norm", [&] {
    using acc_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param_type, "batch_norm", [&] {
      using param_t = scalar_t;
      finalize_kernel<acc_t, param_t><<<channel_blocks(channels), cuda::kThreads, 0, stream>>>(
          mean.const_data_ptr<acc_t>(), var.const_data_ptr<acc_t>(), static_cast<acc_t>(count),
          static_cast<acc_t>(momentum), static_cast<acc_t>(eps),
          cuda::mutable_data_or_null<param_t>(running.mean),
          cuda::mutable_data_or_null<param_t>(running.var), invstd.mutable_data_ptr<acc_t>(),
          channels);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  running.write_back(running_mean, running_var);
}

void CudaKernels::running_stats(const at::Tensor& running_mean, const at::Tensor& running_var,
                                double eps, at::Tensor& mean, at::Tensor& invstd) {
  const c10::cuda::CUDAGuard guard(mean.device());
  const auto stream = c10::cuda::getCurrentCUDAStream(mean.device().index());
  const int64_t channels = mean.numel();
  if (channels == 0) return;
  const at::Tensor rm = cuda::dense(running_mean), rv = cuda::dense(running_var);
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "batch_norm", [&] {
    using acc_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rm.scalar_type(), "batch_norm", [&] {
      using param_t = scalar_t;
      running_stats_kernel<acc_t, param_t><<<channel_blocks(channels), cuda::kThreads, 0, stream>>>(
          rm.const_data_ptr<param_t>(), rv.const_data_ptr<param_t>(), static_cast<acc_t>(eps),
          mean.mutable_data_ptr<acc_t>(), invstd.mutable_data_ptr<acc_t>(), channels);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace normext::batch_norm

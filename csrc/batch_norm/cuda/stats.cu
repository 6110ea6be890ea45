// Per-channel batch statistics (Welford per thread, Chan merges across
// threads, blocks and splits) and the running-stat update.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "batch_norm/cuda/kernels.h"
#include "batch_norm/cuda/reduce.cuh"
#include "batch_norm/math.h"

namespace normext::batch_norm {
namespace {

template <typename scalar_t, typename acc_t>
struct WelfordReducer {
  struct State {
    acc_t mean, m2, count;
  };
  const scalar_t* input;
  acc_t* mean;
  acc_t* var;

  __device__ static State identity() { return {acc_t(0), acc_t(0), acc_t(0)}; }

  template <typename index_t>
  __device__ void update(State& s, index_t element, int64_t) const {
    const acc_t x = static_cast<acc_t>(input[element]);
    s.count += acc_t(1);
    const acc_t delta = x - s.mean;
    s.mean += delta / s.count;
    s.m2 += delta * (x - s.mean);
  }

  __device__ static State combine(State a, const State& b) {
    chan_merge(a.mean, a.m2, a.count, b.mean, b.m2, b.count);
    a.count += b.count;
    return a;
  }

  __device__ void finish(int64_t c, const State& s) const {
    mean[c] = s.mean;
    var[c] = s.count > acc_t(0) ? s.m2 / s.count : acc_t(0);
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
    const WelfordReducer<scalar_t, acc_t> reducer{input.data.const_data_ptr<scalar_t>(),
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

// Backward reduction: sum(dy) and sum(dy * (x - mean)) per channel, reading
// x and dy once.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "batch_norm/cuda/kernels.h"
#include "batch_norm/cuda/reduce.cuh"

namespace normext::batch_norm {
namespace {

using cuda::Sums;

template <typename scalar_t, typename accumulate_t>
struct GradSumsReducer {
  using acc_t = accumulate_t;
  using Context = acc_t;  // the channel's mean
  const scalar_t* grad_out;
  const scalar_t* input;
  const acc_t* mean;
  acc_t* sum_dy;
  acc_t* sum_dy_xmu;

  __device__ acc_t context(int64_t c) const { return mean[c]; }

  template <typename index_t>
  __device__ void add(Sums<acc_t>& s, index_t element, acc_t channel_mean) const {
    const acc_t dy = static_cast<acc_t>(grad_out[element]);
    s.first += dy;
    s.second += dy * (static_cast<acc_t>(input[element]) - channel_mean);
  }

  __device__ void finish(int64_t c, const Sums<double>& total) const {
    sum_dy[c] = static_cast<acc_t>(total.first);
    sum_dy_xmu[c] = static_cast<acc_t>(total.second);
  }
};

}  // namespace

void CudaKernels::backward_reduce(const ChannelView& grad_out, const ChannelView& input,
                                  const at::Tensor& mean, at::Tensor& sum_dy,
                                  at::Tensor& sum_dy_xmu) {
  const c10::cuda::CUDAGuard guard(input.data.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.data.scalar_type(),
                                  "batch_norm_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const GradSumsReducer<scalar_t, acc_t> reducer{
        grad_out.data.const_data_ptr<scalar_t>(), input.data.const_data_ptr<scalar_t>(),
        mean.const_data_ptr<acc_t>(), sum_dy.mutable_data_ptr<acc_t>(),
        sum_dy_xmu.mutable_data_ptr<acc_t>()};
    cuda::reduce_per_channel(input, reducer);
  });
}

}  // namespace normext::batch_norm

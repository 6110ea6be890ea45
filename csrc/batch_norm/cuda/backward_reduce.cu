// Backward reduction: sum(dy) and sum(dy * (x - mean)) per channel, reading
// x and dy once.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "batch_norm/cuda/kernels.h"
#include "batch_norm/cuda/reduce.cuh"

namespace normext::batch_norm {
namespace {

template <typename scalar_t, typename acc_t>
struct GradSumsReducer {
  struct State {
    acc_t sum_dy, sum_dy_xmu;
  };
  const scalar_t* grad_out;
  const scalar_t* input;
  const acc_t* mean;
  acc_t* sum_dy;
  acc_t* sum_dy_xmu;

  __device__ static State identity() { return {acc_t(0), acc_t(0)}; }

  template <typename index_t>
  __device__ void update(State& s, index_t element, int64_t c) const {
    const acc_t dy = static_cast<acc_t>(grad_out[element]);
    s.sum_dy += dy;
    s.sum_dy_xmu += dy * (static_cast<acc_t>(input[element]) - mean[c]);
  }

  __device__ static State combine(State a, const State& b) {
    return {a.sum_dy + b.sum_dy, a.sum_dy_xmu + b.sum_dy_xmu};
  }

  __device__ void finish(int64_t c, const State& s) const {
    sum_dy[c] = s.sum_dy;
    sum_dy_xmu[c] = s.sum_dy_xmu;
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

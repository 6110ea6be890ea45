// Backward reduction: sum(dy) and sum(dy * (x - mean)) per channel, reading
// x and dy once, and the parameter gradients from them.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "batch_norm/cuda/kernels.h"
#include "batch_norm/cuda/reduce.cuh"

namespace normext::batch_norm {
namespace {

using cuda::Sums;

template <typename scalar_type, typename accumulate_t>
struct GradSumsReducer {
  using scalar_t = scalar_type;
  using acc_t = accumulate_t;
  using Context = acc_t;  // the channel's mean
  template <int size>
  struct Loaded {
    cuda::Pack<scalar_t, size> dy, x;
  };
  const scalar_t* grad_out;
  const scalar_t* input;
  const acc_t* mean;

  __device__ acc_t context(int64_t c) const { return mean[c]; }

  template <int size, typename index_t>
  __device__ Loaded<size> load(index_t first) const {
    return {cuda::load_pack<size>(grad_out, first), cuda::load_pack<size>(input, first)};
  }

  template <int size>
  __device__ void add(Sums<acc_t>& s, const Loaded<size>& v, int k, acc_t channel_mean) const {
    const acc_t dy = static_cast<acc_t>(v.dy.value[k]);
    s.first += dy;
    s.second += dy * (static_cast<acc_t>(v.x.value[k]) - channel_mean);
  }
};

// Stage 2: the sums, and from them the parameter gradients in their own dtype
// (grad_weight = sum(dy * (x - mean)) * invstd, grad_bias = sum(dy)).
template <typename acc_t, typename param_t>
struct GradSumsFinish {
  acc_t* sum_dy;
  acc_t* sum_dy_xmu;
  const acc_t* invstd;
  param_t* grad_weight;
  param_t* grad_bias;

  template <class R>
  __device__ void operator()(const R&, int64_t c, const Sums<double>& total, acc_t) const {
    const acc_t s = static_cast<acc_t>(total.first), s_xmu = static_cast<acc_t>(total.second);
    sum_dy[c] = s;
    sum_dy_xmu[c] = s_xmu;
    grad_weight[c] = static_cast<param_t>(s_xmu * invstd[c]);
    grad_bias[c] = static_cast<param_t>(s);
  }
};

}  // namespace

void CudaKernels::backward_reduce(const ChannelView& grad_out, const ChannelView& input,
                                  const at::Tensor& mean, const at::Tensor& invstd,
                                  at::Tensor& sum_dy, at::Tensor& sum_dy_xmu,
                                  at::Tensor& grad_weight, at::Tensor& grad_bias,
                                  const FusedGrad& fused) {
  check_plain(fused.fusion, fused.from_output || fused.output.defined());
  const c10::cuda::CUDAGuard guard(input.data.device());
  const at::Tensor m = cuda::dense(mean), istd = cuda::dense(invstd);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.data.scalar_type(),
                                  "batch_norm_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const GradSumsReducer<scalar_t, acc_t> reducer{grad_out.data.const_data_ptr<scalar_t>(),
                                                   input.data.const_data_ptr<scalar_t>(),
                                                   m.const_data_ptr<acc_t>()};
    cuda::with_param_type<scalar_t, acc_t>(grad_weight.scalar_type(), [&](auto param) {
      using param_t = decltype(param);
      const GradSumsFinish<acc_t, param_t> finish{
          sum_dy.mutable_data_ptr<acc_t>(), sum_dy_xmu.mutable_data_ptr<acc_t>(),
          istd.const_data_ptr<acc_t>(), grad_weight.mutable_data_ptr<param_t>(),
          grad_bias.mutable_data_ptr<param_t>()};
      cuda::reduce_per_channel(input, reducer, finish, {reducer.grad_out, reducer.input});
    });
  });
}

}  // namespace normext::batch_norm

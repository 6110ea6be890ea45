// Backward reduction: sum(dy) and sum(dy * (x - mean)) per channel, reading
// x and dy once, and the parameter gradients from them; through a fusion, of
// dz and the centred input (cuda/grad_source.cuh), reading the residual or
// the output too where the backward has one.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "batch_norm/cuda/grad_source.cuh"
#include "batch_norm/cuda/kernels.h"
#include "batch_norm/cuda/reduce.cuh"

namespace normext::batch_norm {
namespace {

using cuda::Sums;

template <class Source>
struct GradSumsReducer {
  using scalar_t = typename Source::scalar_t;
  using acc_t = typename Source::acc_t;
  using Context = typename Source::Channel;
  template <int size>
  using Loaded = typename Source::template Loaded<size>;
  Source source;

  __device__ Context context(int64_t c) const { return source.channel(c); }

  template <int size, typename index_t>
  __device__ Loaded<size> load(index_t first) const {
    return source.template load<size>(first);
  }

  template <int size>
  __device__ void add(Sums<acc_t>& s, const Loaded<size>& v, int k, const Context& ch) const {
    acc_t dz, xmu;
    source.at(v, k, ch, dz, xmu);
    s.first += dz;
    s.second += dz * xmu;
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

  template <class R, class Context>
  __device__ void operator()(const R&, int64_t c, const Sums<double>& total,
                             const Context&) const {
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
  const c10::cuda::CUDAGuard guard(input.data.device());
  const at::Tensor m = cuda::dense(mean), istd = cuda::dense(invstd);
  const at::Tensor w = cuda::dense(fused.weight);
  // The source reads weight and bias as the gradients' type: the weight's, or
  // without one the accumulate type, which a 16-bit bias is converted to.
  at::Tensor b = cuda::dense(fused.bias);
  if (b.defined() && b.scalar_type() != grad_weight.scalar_type()) {
    b = b.to(grad_weight.scalar_type());
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.data.scalar_type(),
                                  "batch_norm_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cuda::with_param_type<scalar_t, acc_t>(grad_weight.scalar_type(), [&](auto param) {
      using param_t = decltype(param);
      const GradSumsFinish<acc_t, param_t> finish{
          sum_dy.mutable_data_ptr<acc_t>(), sum_dy_xmu.mutable_data_ptr<acc_t>(),
          istd.const_data_ptr<acc_t>(), grad_weight.mutable_data_ptr<param_t>(),
          grad_bias.mutable_data_ptr<param_t>()};
      cuda::with_grad_source<scalar_t, acc_t, param_t>(
          fused, grad_out.data, input.data, m, istd, w, b, [&](auto source) {
            const GradSumsReducer<decltype(source)> reducer{source};
            cuda::reduce_per_channel(input, reducer, finish,
                                     {source.dy, source.saved, source.beside});
          });
    });
  });
}

}  // namespace normext::batch_norm

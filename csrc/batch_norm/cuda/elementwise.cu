// Elementwise passes: normalize (1 read + 1 write; also the input gradient
// under running statistics) and the input gradient under batch statistics
// (2 reads + 1 write), in 16-byte packs where shape and alignment allow.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "batch_norm/cuda/kernels.h"
#include "batch_norm/cuda/launch.cuh"
#include "batch_norm/math.h"

namespace normext::batch_norm {
namespace {

using cuda::Pack;

// Per-channel statistics (accumulate type) and parameters (their own type);
// mean, weight and bias are null where absent.
template <typename acc_t, typename param_t>
struct ChannelParams {
  const acc_t* mean;
  const acc_t* invstd;
  const param_t* weight;
  const param_t* bias;

  __device__ acc_t mean_or_zero(int64_t c) const { return mean ? mean[c] : acc_t(0); }
  __device__ acc_t weight_or_one(int64_t c) const {
    return weight ? static_cast<acc_t>(weight[c]) : acc_t(1);
  }
  __device__ acc_t bias_or_zero(int64_t c) const {
    return bias ? static_cast<acc_t>(bias[c]) : acc_t(0);
  }
};

template <typename scalar_t, typename acc_t, typename param_t>
struct NormalizeOp {
  const scalar_t* input;
  scalar_t* output;
  ChannelParams<acc_t, param_t> p;

  template <int size, bool channels_last, typename index_t>
  __device__ void apply(index_t first, index_t c) const {
    const auto in = *reinterpret_cast<const Pack<scalar_t, size>*>(input + first);
    Pack<scalar_t, size> out;
#pragma unroll
    for (int k = 0; k < size; ++k) {
      const index_t ch = channels_last ? c + k : c;
      const acc_t scale = p.invstd[ch] * p.weight_or_one(ch);
      out.value[k] = static_cast<scalar_t>(batch_norm::normalize(
          static_cast<acc_t>(in.value[k]), p.mean_or_zero(ch), scale, p.bias_or_zero(ch)));
    }
    *reinterpret_cast<Pack<scalar_t, size>*>(output + first) = out;
  }
};

template <typename scalar_t, typename acc_t, typename param_t>
struct GradInputOp {
  const scalar_t* grad_out;
  const scalar_t* input;
  scalar_t* grad_input;
  ChannelParams<acc_t, param_t> p;
  const acc_t* sum_dy;
  const acc_t* sum_dy_xmu;
  acc_t count;

  template <int size, bool channels_last, typename index_t>
  __device__ void apply(index_t first, index_t c) const {
    const auto dy = *reinterpret_cast<const Pack<scalar_t, size>*>(grad_out + first);
    const auto x = *reinterpret_cast<const Pack<scalar_t, size>*>(input + first);
    Pack<scalar_t, size> dx;
#pragma unroll
    for (int k = 0; k < size; ++k) {
      const index_t ch = channels_last ? c + k : c;
      const GradInputCoefficients<acc_t> coefficients =
          grad_input_coefficients(sum_dy[ch], sum_dy_xmu[ch], p.invstd[ch],
                                  p.weight_or_one(ch), count);
      dx.value[k] = static_cast<scalar_t>(
          batch_norm::grad_input(static_cast<acc_t>(dy.value[k]), static_cast<acc_t>(x.value[k]),
                                 p.mean[ch], coefficients));
    }
    *reinterpret_cast<Pack<scalar_t, size>*>(grad_input + first) = dx;
  }
};

// Grid-stride loop over packs of `size` elements that share a channel
// (contiguous) or span `size` adjacent channels (channels-last).
template <int size, bool channels_last, typename index_t, class Op>
__global__ void __launch_bounds__(cuda::kThreads)
    elementwise_kernel(const Op op, index_t packs, index_t channels, index_t inner) {
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t p = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < packs;
       p += stride) {
    const index_t first = p * size;
    const index_t c = channels_last ? first % channels : (first / inner) % channels;
    op.template apply<size, channels_last>(first, c);
  }
}

template <int size, typename scalar_t, class Op>
void launch_elementwise(const ChannelView& view, const Op& op) {
  const at::Device device = view.data.device();
  const auto stream = c10::cuda::getCurrentCUDAStream(device.index());
  const int64_t packs = view.data.numel() / size;
  const int64_t max_blocks = static_cast<int64_t>(cuda::multiprocessor_count(device)) * 16;
  const unsigned blocks = static_cast<unsigned>(
      std::max<int64_t>(1, std::min<int64_t>((packs + cuda::kThreads - 1) / cuda::kThreads, max_blocks)));
  cuda::with_index_type(view.data, [&](auto index) {
    using index_t = decltype(index);
    if (view.channels_last) {
      elementwise_kernel<size, true, index_t><<<blocks, cuda::kThreads, 0, stream>>>(
          op, packs, view.channels, view.inner);
    } else {
      elementwise_kernel<size, false, index_t><<<blocks, cuda::kThreads, 0, stream>>>(
          op, packs, view.channels, view.inner);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// 16-byte packs when every pack stays inside one row (contiguous) or one
// pixel's channels (channels-last) and all pointers are aligned; else scalars.
template <typename scalar_t, class Op>
void run_elementwise(const ChannelView& view, const Op& op,
                     std::initializer_list<const void*> pointers) {
  constexpr int kPack = 16 / sizeof(scalar_t);
  const int64_t row = view.channels_last ? view.channels : view.inner;
  bool packed = row % kPack == 0;
  for (const void* ptr : pointers) {
    packed = packed && cuda::pack_aligned<kPack>(static_cast<const scalar_t*>(ptr));
  }
  if (packed) {
    launch_elementwise<kPack, scalar_t>(view, op);
  } else {
    launch_elementwise<1, scalar_t>(view, op);
  }
}

// The dtype of the per-channel parameters: that of weight or bias, else the accumulate type.
at::ScalarType param_type(const at::Tensor& weight, const at::Tensor& bias, at::ScalarType acc) {
  return weight.defined() ? weight.scalar_type() : bias.defined() ? bias.scalar_type() : acc;
}

}  // namespace

void CudaKernels::normalize(const ChannelView& input, const at::Tensor& mean,
                            const at::Tensor& invstd, const at::Tensor& weight,
                            const at::Tensor& bias, at::Tensor& output) {
  const c10::cuda::CUDAGuard guard(input.data.device());
  const at::Tensor m = cuda::dense(mean), istd = cuda::dense(invstd);
  const at::Tensor w = cuda::dense(weight), b = cuda::dense(bias);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.data.scalar_type(),
                                  "batch_norm", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cuda::with_param_type<scalar_t, acc_t>(param_type(w, b, istd.scalar_type()), [&](auto param) {
      using param_t = decltype(param);
      const NormalizeOp<scalar_t, acc_t, param_t> op{
          input.data.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(),
          {cuda::data_or_null<acc_t>(m), istd.const_data_ptr<acc_t>(),
           cuda::data_or_null<param_t>(w), cuda::data_or_null<param_t>(b)}};
      run_elementwise<scalar_t>(input, op, {op.input, op.output});
    });
  });
}

void CudaKernels::backward_elemt(const ChannelView& grad_out, const ChannelView& input,
                                 const at::Tensor& mean, const at::Tensor& invstd,
                                 const at::Tensor& weight, const at::Tensor& sum_dy,
                                 const at::Tensor& sum_dy_xmu, double count,
                                 at::Tensor& grad_input) {
  const c10::cuda::CUDAGuard guard(input.data.device());
  const at::Tensor m = cuda::dense(mean), istd = cuda::dense(invstd), w = cuda::dense(weight);
  const at::Tensor sdy = cuda::dense(sum_dy), sdy_xmu = cuda::dense(sum_dy_xmu);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.data.scalar_type(),
                                  "batch_norm_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cuda::with_param_type<scalar_t, acc_t>(param_type(w, {}, m.scalar_type()), [&](auto param) {
      using param_t = decltype(param);
      const GradInputOp<scalar_t, acc_t, param_t> op{
          grad_out.data.const_data_ptr<scalar_t>(),
          input.data.const_data_ptr<scalar_t>(),
          grad_input.mutable_data_ptr<scalar_t>(),
          {m.const_data_ptr<acc_t>(), istd.const_data_ptr<acc_t>(),
           cuda::data_or_null<param_t>(w), nullptr},
          sdy.const_data_ptr<acc_t>(),
          sdy_xmu.const_data_ptr<acc_t>(),
          static_cast<acc_t>(count)};
      run_elementwise<scalar_t>(input, op, {op.grad_out, op.input, op.grad_input});
    });
  });
}

}  // namespace normext::batch_norm

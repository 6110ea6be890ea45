// Elementwise passes: normalize (1 read + 1 write; also the input gradient
// under running statistics) and the input gradient under batch statistics
// (2 reads + 1 write), in 16-byte packs where alignment allows (a pack may
// span channels).
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

  template <int size, typename index_t>
  __device__ void apply(index_t first, const index_t (&channel)[size]) const {
    const auto in = cuda::load_pack<size>(input, first);
    Pack<scalar_t, size> out;
#pragma unroll
    for (int k = 0; k < size; ++k) {
      const index_t c = channel[k];
      const acc_t scale = p.invstd[c] * p.weight_or_one(c);
      out.value[k] = static_cast<scalar_t>(batch_norm::normalize(
          static_cast<acc_t>(in.value[k]), p.mean_or_zero(c), scale, p.bias_or_zero(c)));
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
  acc_t inv_count;

  template <int size, typename index_t>
  __device__ void apply(index_t first, const index_t (&channel)[size]) const {
    const auto dy = cuda::load_pack<size>(grad_out, first);
    const auto x = cuda::load_pack<size>(input, first);
    Pack<scalar_t, size> dx;
#pragma unroll
    for (int k = 0; k < size; ++k) {
      const index_t c = channel[k];
      const GradInputCoefficients<acc_t> coefficients = grad_input_coefficients(
          sum_dy[c], sum_dy_xmu[c], p.invstd[c], p.weight_or_one(c), inv_count);
      dx.value[k] = static_cast<scalar_t>(
          batch_norm::grad_input(static_cast<acc_t>(dy.value[k]), static_cast<acc_t>(x.value[k]),
                                 p.mean[c], coefficients));
    }
    *reinterpret_cast<Pack<scalar_t, size>*>(grad_input + first) = dx;
  }
};

// How the `size` elements of a pack map to channels. The tensor is a
// sequence of rows of `row` elements (the inner size when contiguous, 1 when
// channels-last), row r belonging to channel r % C.
enum class PackChannels {
  kOne,       // one channel (row % size == 0)
  kAdjacent,  // size adjacent channels (channels-last, C % size == 0)
  kStepping,  // any: the channel steps at each row end
};

// Grid-stride loop over packs of `size` elements.
template <int size, PackChannels mapping, typename index_t, class Op>
__global__ void __launch_bounds__(cuda::kThreads)
    elementwise_kernel(const Op op, index_t packs, index_t channels, index_t row) {
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t p = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < packs;
       p += stride) {
    const index_t first = p * size;
    const index_t r = first / row;
    index_t c = r % channels;
    index_t channel[size];
    if constexpr (mapping == PackChannels::kStepping) {
      index_t position = first - r * row;
#pragma unroll
      for (int k = 0; k < size; ++k) {
        channel[k] = c;
        if (++position == row) {
          position = 0;
          c = c + 1 == channels ? 0 : c + 1;
        }
      }
    } else {
#pragma unroll
      for (int k = 0; k < size; ++k) channel[k] = mapping == PackChannels::kAdjacent ? c + k : c;
    }
    op.template apply<size>(first, channel);
  }
}

template <int size, PackChannels mapping, class Op>
void launch_elementwise(const ChannelView& view, const Op& op) {
  const at::Device device = view.data.device();
  const auto stream = c10::cuda::getCurrentCUDAStream(device.index());
  const int64_t packs = view.data.numel() / size;
  const int64_t max_blocks = static_cast<int64_t>(cuda::multiprocessor_count(device)) * 16;
  const unsigned blocks = static_cast<unsigned>(std::max<int64_t>(
      1, std::min<int64_t>((packs + cuda::kThreads - 1) / cuda::kThreads, max_blocks)));
  const int64_t row = view.channels_last ? 1 : view.inner;
  cuda::with_index_type(view.data, [&](auto index) {
    using index_t = decltype(index);
    elementwise_kernel<size, mapping, index_t>
        <<<blocks, cuda::kThreads, 0, stream>>>(op, packs, view.channels, row);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// 16-byte packs when the element count is a multiple of a pack and all
// pointers are aligned, else scalars.
template <typename scalar_t, class Op>
void run_elementwise(const ChannelView& view, const Op& op,
                     std::initializer_list<const void*> pointers) {
  constexpr int kPack = 16 / sizeof(scalar_t);
  if (view.data.numel() % kPack != 0 || cuda::pack_size<scalar_t>(pointers) != kPack) {
    launch_elementwise<1, PackChannels::kOne>(view, op);
  } else if (!view.channels_last && view.inner % kPack == 0) {
    launch_elementwise<kPack, PackChannels::kOne>(view, op);
  } else if (view.channels_last && view.channels % kPack == 0) {
    launch_elementwise<kPack, PackChannels::kAdjacent>(view, op);
  } else {
    launch_elementwise<kPack, PackChannels::kStepping>(view, op);
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
          static_cast<acc_t>(1.0 / count)};
      run_elementwise<scalar_t>(input, op, {op.grad_out, op.input, op.grad_input});
    });
  });
}

}  // namespace normext::batch_norm

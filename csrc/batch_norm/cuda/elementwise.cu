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

// An Op provides per-channel Coefficients, computed once per channel a
// thread touches, loads a pack of `size` elements' inputs and stores their
// outputs (separate steps, so that a thread can have several loads in flight).
template <typename scalar_t, typename acc_t, typename param_t>
struct NormalizeOp {
  const scalar_t* input;
  scalar_t* output;
  ChannelParams<acc_t, param_t> p;

  struct Coefficients {
    acc_t mean, scale, bias;
  };

  __device__ Coefficients coefficients(int64_t c) const {
    return {p.mean_or_zero(c), p.invstd[c] * p.weight_or_one(c), p.bias_or_zero(c)};
  }

  template <int size>
  using Loaded = Pack<scalar_t, size>;

  template <int size, typename index_t>
  __device__ Loaded<size> load(index_t first) const {
    return cuda::load_pack<size>(input, first);
  }

  template <int size, typename index_t>
  __device__ void store(index_t first, const Loaded<size>& in,
                        const Coefficients (&k)[size]) const {
    Pack<scalar_t, size> out;
#pragma unroll
    for (int i = 0; i < size; ++i) {
      out.value[i] = static_cast<scalar_t>(batch_norm::normalize(
          static_cast<acc_t>(in.value[i]), k[i].mean, k[i].scale, k[i].bias));
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

  struct Coefficients {
    acc_t mean;
    GradInputCoefficients<acc_t> grad;
  };

  __device__ Coefficients coefficients(int64_t c) const {
    return {p.mean[c], grad_input_coefficients(sum_dy[c], sum_dy_xmu[c], p.invstd[c],
                                               p.weight_or_one(c), inv_count)};
  }

  template <int size>
  struct Loaded {
    Pack<scalar_t, size> dy, x;
  };

  template <int size, typename index_t>
  __device__ Loaded<size> load(index_t first) const {
    return {cuda::load_pack<size>(grad_out, first), cuda::load_pack<size>(input, first)};
  }

  template <int size, typename index_t>
  __device__ void store(index_t first, const Loaded<size>& in,
                        const Coefficients (&k)[size]) const {
    Pack<scalar_t, size> dx;
#pragma unroll
    for (int i = 0; i < size; ++i) {
      dx.value[i] = static_cast<scalar_t>(batch_norm::grad_input(
          static_cast<acc_t>(in.dy.value[i]), static_cast<acc_t>(in.x.value[i]), k[i].mean,
          k[i].grad));
    }
    *reinterpret_cast<Pack<scalar_t, size>*>(grad_input + first) = dx;
  }
};

// Contiguous (N, C, L): a grid-stride loop over packs of `size` elements,
// each in one channel (L % size == 0) or, with `stepping`, in any: the
// channel then steps at each row end within the pack.
template <int size, bool stepping, typename index_t, class Op>
__global__ void __launch_bounds__(cuda::kThreads)
    contiguous_kernel(const Op op, index_t packs, index_t channels, index_t inner) {
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t p = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < packs;
       p += stride) {
    const index_t first = p * size;
    const index_t row = first / inner;
    index_t c = row % channels;
    typename Op::Coefficients k[size];
    if constexpr (stepping) {
      index_t position = first - row * inner;
#pragma unroll
      for (int i = 0; i < size; ++i) {
        k[i] = op.coefficients(c);
        if (++position == inner) {
          position = 0;
          c = c + 1 == channels ? 0 : c + 1;
        }
      }
    } else {
      const typename Op::Coefficients one = op.coefficients(c);
#pragma unroll
      for (int i = 0; i < size; ++i) k[i] = one;
    }
    op.template store<size>(first, op.template load<size>(first), k);
  }
}

// Channels-last (rows, C) with C % size == 0: threadIdx.x spans packs of
// `size` adjacent channels (lanes shaped to C, as in the reductions),
// threadIdx.y and blockIdx.y the rows; a thread computes its channels'
// coefficients once and applies them to every row it visits, kUnroll rows'
// loads in flight at a time.
template <int size, typename index_t, class Op>
__global__ void __launch_bounds__(cuda::kThreads)
    channels_last_kernel(const Op op, index_t channels, index_t rows) {
  constexpr int kUnroll = 4;
  const index_t c = (static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x) * size;
  if (c >= channels) return;
  typename Op::Coefficients k[size];
#pragma unroll
  for (int i = 0; i < size; ++i) k[i] = op.coefficients(c + i);
  const index_t step = static_cast<index_t>(gridDim.y) * blockDim.y;
  index_t r = static_cast<index_t>(blockIdx.y) * blockDim.y + threadIdx.y;
  // r + (kUnroll - 1) * step < rows, spelled so that no index grows past rows + step
  for (; r < rows - (kUnroll - 1) * step; r += kUnroll * step) {
    typename Op::template Loaded<size> in[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      in[u] = op.template load<size>((r + u * step) * channels + c);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      op.template store<size>((r + u * step) * channels + c, in[u], k);
    }
  }
  for (; r < rows; r += step) {
    op.template store<size>(r * channels + c, op.template load<size>(r * channels + c), k);
  }
}

// Blocks enough to fill every SM many times over (the loops stride the rest).
int64_t elementwise_blocks(const at::Device& device) {
  return static_cast<int64_t>(cuda::multiprocessor_count(device)) * 16;
}

template <int size, bool stepping, class Op>
void launch_contiguous(const ChannelView& view, const Op& op) {
  const at::Device device = view.data.device();
  const auto stream = c10::cuda::getCurrentCUDAStream(device.index());
  const int64_t packs = view.data.numel() / size;
  const unsigned blocks = static_cast<unsigned>(std::max<int64_t>(
      1, std::min<int64_t>((packs + cuda::kThreads - 1) / cuda::kThreads,
                           elementwise_blocks(device))));
  cuda::with_index_type(view.data, [&](auto index) {
    using index_t = decltype(index);
    contiguous_kernel<size, stepping, index_t>
        <<<blocks, cuda::kThreads, 0, stream>>>(op, packs, view.channels, view.inner);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// At most one wave of blocks, so that a thread's coefficients serve as many
// rows as the GPU allows (at large C a thread's `size` channels cost several
// loads each).
template <int size, class Op>
void launch_channels_last(const ChannelView& view, const Op& op) {
  const at::Device device = view.data.device();
  const auto stream = c10::cuda::getCurrentCUDAStream(device.index());
  const int64_t groups = view.channels / size;
  const int lanes = cuda::channel_lanes(groups);
  const int rows_per_block = cuda::kThreads / lanes;
  const int64_t channel_blocks = (groups + lanes - 1) / lanes;
  const int64_t rows = view.count();
  cuda::with_index_type(view.data, [&](auto index) {
    using index_t = decltype(index);
    constexpr auto kernel = channels_last_kernel<size, index_t, Op>;
    const int64_t row_blocks = std::max<int64_t>(
        1, std::min<int64_t>({(rows + rows_per_block - 1) / rows_per_block,
                              cuda::wave_blocks<kernel>(device) / channel_blocks, 65535}));
    const dim3 grid(static_cast<unsigned>(channel_blocks), static_cast<unsigned>(row_blocks));
    kernel<<<grid, dim3(lanes, rows_per_block), 0, stream>>>(op, view.channels, rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// 16-byte packs where alignment and shape allow, else scalars.
template <typename scalar_t, class Op>
void run_elementwise(const ChannelView& view, const Op& op,
                     std::initializer_list<const void*> pointers) {
  constexpr int kPack = 16 / sizeof(scalar_t);
  const bool aligned = cuda::pack_size<scalar_t>(pointers) == kPack;
  if (view.channels_last) {
    if (aligned && view.channels % kPack == 0) {
      launch_channels_last<kPack>(view, op);
    } else {
      launch_channels_last<1>(view, op);
    }
  } else if (!aligned || view.data.numel() % kPack != 0) {
    launch_contiguous<1, false>(view, op);
  } else if (view.inner % kPack == 0) {
    launch_contiguous<kPack, false>(view, op);
  } else {
    launch_contiguous<kPack, true>(view, op);
  }
}

// The dtype of the per-channel parameters: that of weight or bias, else the accumulate type.
at::ScalarType param_type(const at::Tensor& weight, const at::Tensor& bias, at::ScalarType acc) {
  return weight.defined() ? weight.scalar_type() : bias.defined() ? bias.scalar_type() : acc;
}

}  // namespace

void CudaKernels::normalize(const ChannelView& input, const at::Tensor& mean,
                            const at::Tensor& invstd, const at::Tensor& weight,
                            const at::Tensor& bias, at::Tensor& output, const Fusion& fusion) {
  check_plain(fusion);
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
                                 at::Tensor& grad_input, const FusedGrad& fused) {
  check_plain(fused.fusion, fused.from_output || fused.output.defined());
  TORCH_CHECK_NOT_IMPLEMENTED(sum_dy.defined(), "normext: no CUDA backward_elemt under running "
                              "statistics");
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

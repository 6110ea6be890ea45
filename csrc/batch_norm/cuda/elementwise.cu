// Elementwise passes: normalize (1 read + 1 write; also the input gradient
// under running statistics) and the input gradient under batch statistics
// (2 reads + 1 write), in 16-byte packs where alignment allows (a pack may
// span channels). Fused passes (common.h: Fusion) also read the residual,
// apply the activation, and in the backward write the residual's gradient.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "batch_norm/cuda/grad_source.cuh"
#include "batch_norm/cuda/kernels.h"
#include "batch_norm/cuda/launch.cuh"
#include "batch_norm/fusion.h"
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
// y = act(normalize(x) + residual); the plain batch norm's act is the identity.
template <class Act, bool kResidual, typename scalar_t, typename acc_t, typename param_t>
struct NormalizeOp {
  Act act;
  const scalar_t* input;
  const scalar_t* residual;  // null unless kResidual
  scalar_t* output;
  ChannelParams<acc_t, param_t> p;

  struct Coefficients {
    acc_t mean, scale, bias;
  };

  __device__ Coefficients coefficients(int64_t c) const {
    return {p.mean_or_zero(c), p.invstd[c] * p.weight_or_one(c), p.bias_or_zero(c)};
  }

  template <int size>
  struct Loaded {
    Pack<scalar_t, size> x, r;
  };

  template <int size, typename index_t>
  __device__ Loaded<size> load(index_t first) const {
    Loaded<size> v;
    v.x = cuda::load_pack<size>(input, first);
    if constexpr (kResidual) v.r = cuda::load_pack<size>(residual, first);
    return v;
  }

  template <int size, typename index_t>
  __device__ void store(index_t first, const Loaded<size>& in,
                        const Coefficients (&k)[size]) const {
    Pack<scalar_t, size> out;
#pragma unroll
    for (int i = 0; i < size; ++i) {
      acc_t z = batch_norm::normalize(static_cast<acc_t>(in.x.value[i]), k[i].mean, k[i].scale,
                                      k[i].bias);
      if constexpr (kResidual) z += static_cast<acc_t>(in.r.value[i]);
      out.value[i] = static_cast<scalar_t>(act(z));
    }
    *reinterpret_cast<Pack<scalar_t, size>*>(output + first) = out;
  }
};

// dx from dz and x - mean (cuda/grad_source.cuh), and dz into the residual's
// gradient where the forward had one. Under running statistics
// (!kBatchStats) dx = dz * scale, x - mean unused.
template <class Source, bool kBatchStats>
struct GradInputOp {
  using scalar_t = typename Source::scalar_t;
  using acc_t = typename Source::acc_t;
  Source source;
  scalar_t* grad_input;
  scalar_t* grad_residual;  // null unless Source::kResidualGrad
  const acc_t* sum_dy;      // null unless kBatchStats, like sum_dy_xmu
  const acc_t* sum_dy_xmu;
  acc_t inv_count;

  struct Coefficients {
    typename Source::Channel channel;
    GradInputCoefficients<acc_t> grad;
  };

  __device__ Coefficients coefficients(int64_t c) const {
    const acc_t weight = source.weight_or_one(c), invstd = source.invstd[c];
    if constexpr (kBatchStats) {
      return {source.channel(c),
              grad_input_coefficients(sum_dy[c], sum_dy_xmu[c], invstd, weight, inv_count)};
    } else {
      return {source.channel(c), {invstd * weight, acc_t(0), acc_t(0)}};
    }
  }

  template <int size>
  using Loaded = typename Source::template Loaded<size>;

  template <int size, typename index_t>
  __device__ Loaded<size> load(index_t first) const {
    return source.template load<size>(first);
  }

  template <int size, typename index_t>
  __device__ void store(index_t first, const Loaded<size>& in,
                        const Coefficients (&k)[size]) const {
    Pack<scalar_t, size> dx, dr;
#pragma unroll
    for (int i = 0; i < size; ++i) {
      acc_t dz, xmu;
      source.at(in, i, k[i].channel, dz, xmu);
      if constexpr (Source::kResidualGrad) dr.value[i] = static_cast<scalar_t>(dz);
      dx.value[i] = static_cast<scalar_t>(kBatchStats ? grad_input_centred(dz, xmu, k[i].grad)
                                                      : dz * k[i].grad.dy_scale);
    }
    *reinterpret_cast<Pack<scalar_t, size>*>(grad_input + first) = dx;
    if constexpr (Source::kResidualGrad) {
      *reinterpret_cast<Pack<scalar_t, size>*>(grad_residual + first) = dr;
    }
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
  const c10::cuda::CUDAGuard guard(input.data.device());
  const at::Tensor m = cuda::dense(mean), istd = cuda::dense(invstd);
  const at::Tensor w = cuda::dense(weight), b = cuda::dense(bias);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.data.scalar_type(),
                                  "batch_norm", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cuda::with_param_type<scalar_t, acc_t>(param_type(w, b, istd.scalar_type()), [&](auto param) {
      using param_t = decltype(param);
      with_fusion<acc_t>(fusion, [&](auto act, auto residual) {
        const NormalizeOp<decltype(act), residual(), scalar_t, acc_t, param_t> op{
            act,
            input.data.const_data_ptr<scalar_t>(),
            cuda::data_or_null<scalar_t>(fusion.residual),
            output.mutable_data_ptr<scalar_t>(),
            {cuda::data_or_null<acc_t>(m), istd.const_data_ptr<acc_t>(),
             cuda::data_or_null<param_t>(w), cuda::data_or_null<param_t>(b)}};
        run_elementwise<scalar_t>(input, op, {op.input, op.residual, op.output});
      });
    });
  });
}

void CudaKernels::backward_elemt(const ChannelView& grad_out, const ChannelView& input,
                                 const at::Tensor& mean, const at::Tensor& invstd,
                                 const at::Tensor& weight, const at::Tensor& sum_dy,
                                 const at::Tensor& sum_dy_xmu, double count,
                                 at::Tensor& grad_input, const FusedGrad& fused) {
  const c10::cuda::CUDAGuard guard(input.data.device());
  const at::Tensor m = cuda::dense(mean), istd = cuda::dense(invstd), w = cuda::dense(weight);
  const at::Tensor b = cuda::dense(fused.bias);
  const at::Tensor sdy = cuda::dense(sum_dy), sdy_xmu = cuda::dense(sum_dy_xmu);
  at::Tensor grad_residual = fused.grad_residual;  // (a handle: writes go to the caller's)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.data.scalar_type(),
                                  "batch_norm_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cuda::with_param_type<scalar_t, acc_t>(param_type(w, b, m.scalar_type()), [&](auto param) {
      using param_t = decltype(param);
      cuda::with_grad_source<scalar_t, acc_t, param_t>(
          fused, grad_out.data, input.data, m, istd, w, b, [&](auto source) {
            const auto run = [&](auto batch_stats) {
              const GradInputOp<decltype(source), batch_stats()> op{
                  source,
                  grad_input.mutable_data_ptr<scalar_t>(),
                  cuda::mutable_data_or_null<scalar_t>(grad_residual),
                  cuda::data_or_null<acc_t>(sdy),
                  cuda::data_or_null<acc_t>(sdy_xmu),
                  static_cast<acc_t>(1.0 / count)};
              run_elementwise<scalar_t>(
                  input, op,
                  {source.dy, source.saved, source.beside, op.grad_input, op.grad_residual});
            };
            if (sdy.defined()) return run(std::true_type{});
            run(std::false_type{});
          });
    });
  });
}

}  // namespace normext::batch_norm

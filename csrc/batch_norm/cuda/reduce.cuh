// Two-stage per-channel reduction of two sums, used by the statistics and the
// backward reduction: stage 1 reduces slices of each channel into partial
// sums in the accumulate type (many blocks per channel when channels are
// few), stage 2 adds each channel's partials in double in a fixed order. No
// atomics: the same input gives bit-identical results on every run.
//
// A Reducer provides
//   using acc_t;                                       // per-thread sums
//   struct Context; Context context(int64_t channel) const;  // read once per thread
//   void add(Sums<acc_t>&, index_t element, const Context&) const;
//   void finish(int64_t channel, const Sums<double>&) const;
#pragma once

#include "batch_norm/cuda/launch.cuh"

namespace normext::batch_norm::cuda {

template <typename T>
struct Sums {
  T first, second;
};

template <typename T, typename U>
__device__ inline void add_to(Sums<T>& total, const Sums<U>& part) {
  total.first += static_cast<T>(part.first);
  total.second += static_cast<T>(part.second);
}

// Contiguous (N, C, L): block (c, split) reduces elements
// [split * per_split, ...) of channel c's N*L elements, then tree-adds the
// block's sums in shared memory.
template <class R, typename index_t>
__global__ void __launch_bounds__(kThreads)
    reduce_contiguous_kernel(const R reducer, index_t channels, index_t inner,
                             index_t per_channel, index_t per_split,
                             Sums<typename R::acc_t>* partials) {
  using acc_t = typename R::acc_t;
  __shared__ Sums<acc_t> shared[kThreads];
  const index_t c = blockIdx.x;
  const index_t begin = static_cast<index_t>(blockIdx.y) * per_split;
  const index_t end = begin + per_split < per_channel ? begin + per_split : per_channel;
  const auto context = reducer.context(c);
  Sums<acc_t> sums{acc_t(0), acc_t(0)};
  for (index_t j = begin + threadIdx.x; j < end; j += blockDim.x) {
    const index_t n = j / inner;
    reducer.add(sums, (n * channels + c) * inner + (j - n * inner), context);
  }
  shared[threadIdx.x] = sums;
  for (unsigned offset = blockDim.x / 2; offset > 0; offset /= 2) {
    __syncthreads();
    if (threadIdx.x < offset) add_to(shared[threadIdx.x], shared[threadIdx.x + offset]);
  }
  if (threadIdx.x == 0) partials[c * gridDim.y + blockIdx.y] = shared[0];
}

// Channels-last (rows, C): a warp spans 32 adjacent channels (coalesced),
// kRowLanes warps split the rows, and blockIdx.y picks a slice of rows.
constexpr int kChannelLanes = 32;
constexpr int kRowLanes = kThreads / kChannelLanes;

template <class R, typename index_t>
__global__ void __launch_bounds__(kThreads)
    reduce_channels_last_kernel(const R reducer, index_t channels, index_t rows,
                                index_t per_split, Sums<typename R::acc_t>* partials) {
  using acc_t = typename R::acc_t;
  __shared__ Sums<acc_t> shared[kRowLanes][kChannelLanes];
  const index_t c = static_cast<index_t>(blockIdx.x) * kChannelLanes + threadIdx.x;
  const index_t begin = static_cast<index_t>(blockIdx.y) * per_split;
  const index_t end = begin + per_split < rows ? begin + per_split : rows;
  Sums<acc_t> sums{acc_t(0), acc_t(0)};
  if (c < channels) {
    const auto context = reducer.context(c);
    for (index_t r = begin + threadIdx.y; r < end; r += kRowLanes) {
      reducer.add(sums, r * channels + c, context);
    }
  }
  shared[threadIdx.y][threadIdx.x] = sums;
  for (int offset = kRowLanes / 2; offset > 0; offset /= 2) {
    __syncthreads();
    if (threadIdx.y < offset) add_to(shared[threadIdx.y][threadIdx.x], shared[threadIdx.y + offset][threadIdx.x]);
  }
  if (threadIdx.y == 0 && c < channels) partials[c * gridDim.y + blockIdx.y] = shared[0][threadIdx.x];
}

template <class R>
__global__ void reduce_finish_kernel(const R reducer, const Sums<typename R::acc_t>* partials,
                                     int64_t splits, int64_t channels) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  Sums<double> total{0.0, 0.0};
  for (int64_t s = 0; s < splits; ++s) add_to(total, partials[c * splits + s]);
  reducer.finish(c, total);
}

// Runs both stages for `view` (the reducer reads its own pointers).
template <class R>
void reduce_per_channel(const ChannelView& view, const R& reducer) {
  using Partial = Sums<typename R::acc_t>;
  const at::Device device = view.data.device();
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(device.index());
  const int64_t channels = view.channels;
  const int64_t per_channel = view.count();
  if (channels == 0 || per_channel == 0) return;
  const int64_t channel_blocks =
      view.channels_last ? (channels + kChannelLanes - 1) / kChannelLanes : channels;
  // A block steps through kThreads elements of one channel (contiguous) or
  // kRowLanes rows of 32 channels (channels-last) at a time.
  const int64_t splits = reduction_splits(channel_blocks, per_channel,
                                          view.channels_last ? kRowLanes : kThreads, device);
  const int64_t per_split = (per_channel + splits - 1) / splits;
  at::Tensor workspace = at::empty({static_cast<int64_t>(channels * splits * sizeof(Partial))},
                                   view.data.options().dtype(at::kByte));
  Partial* partials = reinterpret_cast<Partial*>(workspace.mutable_data_ptr());
  with_index_type(view.data, [&](auto index) {
    using index_t = decltype(index);
    const dim3 grid(static_cast<unsigned>(channel_blocks), static_cast<unsigned>(splits));
    if (view.channels_last) {
      reduce_channels_last_kernel<R, index_t>
          <<<grid, dim3(kChannelLanes, kRowLanes), 0, stream>>>(
              reducer, channels, per_channel, per_split, partials);
    } else {
      reduce_contiguous_kernel<R, index_t><<<grid, kThreads, 0, stream>>>(
          reducer, channels, view.inner, per_channel, per_split, partials);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const unsigned finish_blocks = static_cast<unsigned>((channels + kThreads - 1) / kThreads);
  reduce_finish_kernel<R><<<finish_blocks, kThreads, 0, stream>>>(reducer, partials, splits,
                                                                  channels);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace normext::batch_norm::cuda

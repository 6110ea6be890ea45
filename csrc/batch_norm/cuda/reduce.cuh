// Two-stage per-channel reduction of two sums, used by the statistics and the
// backward reduction: stage 1 reduces slices of each channel into partial
// sums (many blocks per channel when channels are few), stage 2 adds each
// channel's partials in a fixed order. Each thread adds kChunk elements at a
// time in the accumulate type and those chunk sums in double, so neither the
// rounding nor an overflow of float32 grows with the slice length. No
// atomics: the same input gives bit-identical results on every run.
//
// A Reducer provides
//   using acc_t;                                       // chunk sums
//   struct Context; Context context(int64_t channel) const;  // read once per thread
//   void add(Sums<acc_t>&, index_t element, const Context&) const;
// and a Finish, run by stage 2 once per channel (its own type, so that the
// stage-1 kernels are compiled once per reducer whatever the finish writes):
//   void operator()(const Reducer&, int64_t channel, const Sums<double>&) const;
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

constexpr int kChunk = 64;

// A thread's running sums: the current chunk in acc_t, the rest in double.
template <typename acc_t>
struct ThreadSums {
  Sums<acc_t> chunk{acc_t(0), acc_t(0)};
  Sums<double> total{0.0, 0.0};
  int filled = 0;

  template <class R, typename index_t, typename Context>
  __device__ void add(const R& reducer, index_t element, const Context& context) {
    reducer.add(chunk, element, context);
    if (++filled == kChunk) {
      add_to(total, chunk);
      chunk = {acc_t(0), acc_t(0)};
      filled = 0;
    }
  }

  __device__ Sums<double> sum() const {
    Sums<double> all = total;
    add_to(all, chunk);
    return all;
  }
};

// Contiguous (N, C, L): block (c, split) reduces elements
// [split * per_split, ...) of channel c's N*L elements, then tree-adds the
// block's sums in shared memory.
template <class R, typename index_t>
__global__ void __launch_bounds__(kThreads)
    reduce_contiguous_kernel(const R reducer, index_t channels, index_t inner,
                             index_t per_channel, index_t per_split, Sums<double>* partials) {
  __shared__ Sums<double> shared[kThreads];
  const index_t c = blockIdx.x;
  const index_t begin = static_cast<index_t>(blockIdx.y) * per_split;
  const index_t end = begin + per_split < per_channel ? begin + per_split : per_channel;
  const auto context = reducer.context(c);
  ThreadSums<typename R::acc_t> sums;
  for (index_t j = begin + threadIdx.x; j < end; j += blockDim.x) {
    const index_t n = j / inner;
    sums.add(reducer, (n * channels + c) * inner + (j - n * inner), context);
  }
  shared[threadIdx.x] = sums.sum();
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
                                index_t per_split, Sums<double>* partials) {
  __shared__ Sums<double> shared[kRowLanes][kChannelLanes];
  const index_t c = static_cast<index_t>(blockIdx.x) * kChannelLanes + threadIdx.x;
  const index_t begin = static_cast<index_t>(blockIdx.y) * per_split;
  const index_t end = begin + per_split < rows ? begin + per_split : rows;
  ThreadSums<typename R::acc_t> sums;
  if (c < channels) {
    const auto context = reducer.context(c);
    for (index_t r = begin + threadIdx.y; r < end; r += kRowLanes) {
      sums.add(reducer, r * channels + c, context);
    }
  }
  shared[threadIdx.y][threadIdx.x] = sums.sum();
  for (int offset = kRowLanes / 2; offset > 0; offset /= 2) {
    __syncthreads();
    if (threadIdx.y < offset) {
      add_to(shared[threadIdx.y][threadIdx.x], shared[threadIdx.y + offset][threadIdx.x]);
    }
  }
  if (threadIdx.y == 0 && c < channels) {
    partials[c * gridDim.y + blockIdx.y] = shared[0][threadIdx.x];
  }
}

template <class R, class F>
__global__ void reduce_finish_kernel(const R reducer, const F finish, const Sums<double>* partials,
                                     int64_t splits, int64_t channels) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  Sums<double> total{0.0, 0.0};
  for (int64_t s = 0; s < splits; ++s) add_to(total, partials[c * splits + s]);
  finish(reducer, c, total);
}

// Runs both stages for `view` (the reducer and the finish hold their own pointers).
template <class R, class F>
void reduce_per_channel(const ChannelView& view, const R& reducer, const F& finish) {
  using Partial = Sums<double>;
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
  reduce_finish_kernel<R, F><<<finish_blocks, kThreads, 0, stream>>>(reducer, finish, partials,
                                                                     splits, channels);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace normext::batch_norm::cuda

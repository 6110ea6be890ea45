// Two-stage per-channel reduction used by the statistics and the backward
// reduction: stage 1 reduces slices of each channel into partial states (many
// blocks per channel when channels are few), stage 2 merges each channel's
// partials in a fixed order. No atomics: the same input gives bit-identical
// results on every run.
//
// A Reducer provides
//   struct State;                                   // trivially copyable
//   static State identity();
//   void update(State&, index_t element, int64_t channel) const;
//   static State combine(State, State);             // associative
//   void finish(int64_t channel, const State&) const;
#pragma once

#include "batch_norm/cuda/launch.cuh"

namespace normext::batch_norm::cuda {

// Tree-combines blockDim.x states of a 1-D block in shared memory; thread 0
// gets the result.
template <class R>
__device__ typename R::State combine_block(typename R::State state, typename R::State* shared) {
  shared[threadIdx.x] = state;
  for (unsigned offset = blockDim.x / 2; offset > 0; offset /= 2) {
    __syncthreads();
    if (threadIdx.x < offset) {
      shared[threadIdx.x] = R::combine(shared[threadIdx.x], shared[threadIdx.x + offset]);
    }
  }
  return shared[0];
}

// Contiguous (N, C, L): block (c, split) reduces elements
// [split * per_split, ...) of channel c's N*L elements.
template <class R, typename index_t>
__global__ void __launch_bounds__(kThreads)
    reduce_contiguous_kernel(const R reducer, index_t channels, index_t inner,
                             index_t per_channel, index_t per_split,
                             typename R::State* partials) {
  using State = typename R::State;
  __shared__ alignas(State) unsigned char storage[kThreads * sizeof(State)];
  const index_t c = blockIdx.x;
  const index_t begin = static_cast<index_t>(blockIdx.y) * per_split;
  const index_t end = begin + per_split < per_channel ? begin + per_split : per_channel;
  State state = R::identity();
  for (index_t j = begin + threadIdx.x; j < end; j += blockDim.x) {
    const index_t n = j / inner;
    reducer.update(state, (n * channels + c) * inner + (j - n * inner), c);
  }
  state = combine_block<R>(state, reinterpret_cast<State*>(storage));
  if (threadIdx.x == 0) partials[c * gridDim.y + blockIdx.y] = state;
}

// Channels-last (rows, C): a warp spans 32 adjacent channels (coalesced),
// kRowLanes warps split the rows, and blockIdx.y picks a slice of rows.
constexpr int kChannelLanes = 32;
constexpr int kRowLanes = kThreads / kChannelLanes;

template <class R, typename index_t>
__global__ void __launch_bounds__(kThreads)
    reduce_channels_last_kernel(const R reducer, index_t channels, index_t rows,
                                index_t per_split, typename R::State* partials) {
  using State = typename R::State;
  __shared__ alignas(State) unsigned char storage[kThreads * sizeof(State)];
  State* shared = reinterpret_cast<State*>(storage);
  const index_t c = static_cast<index_t>(blockIdx.x) * kChannelLanes + threadIdx.x;
  const index_t begin = static_cast<index_t>(blockIdx.y) * per_split;
  const index_t end = begin + per_split < rows ? begin + per_split : rows;
  State state = R::identity();
  if (c < channels) {
    for (index_t r = begin + threadIdx.y; r < end; r += kRowLanes) {
      reducer.update(state, r * channels + c, c);
    }
  }
  shared[threadIdx.y * kChannelLanes + threadIdx.x] = state;
  for (int offset = kRowLanes / 2; offset > 0; offset /= 2) {
    __syncthreads();
    if (threadIdx.y < offset) {
      State& mine = shared[threadIdx.y * kChannelLanes + threadIdx.x];
      mine = R::combine(mine, shared[(threadIdx.y + offset) * kChannelLanes + threadIdx.x]);
    }
  }
  if (threadIdx.y == 0 && c < channels) partials[c * gridDim.y + blockIdx.y] = shared[threadIdx.x];
}

template <class R>
__global__ void reduce_finish_kernel(const R reducer, const typename R::State* partials,
                                     int64_t splits, int64_t channels) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  typename R::State state = partials[c * splits];
  for (int64_t s = 1; s < splits; ++s) state = R::combine(state, partials[c * splits + s]);
  reducer.finish(c, state);
}

// Runs both stages for `view` (the reducer reads its own pointers).
template <class R>
void reduce_per_channel(const ChannelView& view, const R& reducer) {
  using State = typename R::State;
  const at::Device device = view.data.device();
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(device.index());
  const int64_t channels = view.channels;
  const int64_t per_channel = view.count();
  if (channels == 0 || per_channel == 0) return;
  const int64_t channel_blocks =
      view.channels_last ? (channels + kChannelLanes - 1) / kChannelLanes : channels;
  const int64_t splits = reduction_splits(channel_blocks, per_channel, device);
  const int64_t per_split = (per_channel + splits - 1) / splits;
  at::Tensor workspace = at::empty({static_cast<int64_t>(channels * splits * sizeof(State))},
                                   view.data.options().dtype(at::kByte));
  State* partials = reinterpret_cast<State*>(workspace.mutable_data_ptr());
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

// Two-stage per-channel reduction of two sums, used by the statistics and the
// backward reduction: stage 1 reduces slices of each channel into partial
// sums (many blocks per channel when channels are few), stage 2 adds each
// channel's partials in a fixed order, a warp per channel: in a kernel of its
// own, or (common.h: cuda_merge_in_last_block) in the stage-1 kernel, by the
// last of a channel's blocks to finish, which a counter per channel block
// tells (a kernel fewer; a memset zeroes the counters). The merging kernel is
// compiled apart (it needs more registers, so its occupancy, one wave and the
// splits may differ). A thread loads
// kUnroll packs (16 bytes where shape and alignment allow) before adding any,
// so that several loads are in flight; it adds about kChunk elements of a
// channel in the accumulate type and those chunk sums in double, so neither
// the rounding nor an overflow of float32 grows with the slice length. No
// atomics: the same input gives bit-identical results on every run.
//
// A Reducer provides
//   using scalar_t; using acc_t;                        // element and chunk-sum types
//   struct Context; Context context(int64_t channel) const;  // once per block and channel
//   template <int size> struct Loaded;                  // one pack of what add reads
//   template <int size, typename index_t> Loaded<size> load(index_t first) const;
//   template <int size> void add(Sums<acc_t>&, const Loaded<size>&, int k, const Context&) const;
// and a Finish, run by stage 2 once per channel (its own type, so that the
// stage-1 kernels are compiled once per reducer whatever the finish writes),
// given the channel's Context as stage 1 computed it:
//   void operator()(const Reducer&, int64_t channel, const Sums<double>&, const Context&) const;
#pragma once

#include <ATen/ops/empty.h>

#include <type_traits>

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
constexpr int kUnroll = 4;
// Stage-1 blocks resident per SM at least (caps registers at 128 a thread:
// a channels-last thread holds sums of up to 8 channels).
constexpr int kMinBlocks = 2;

// Tree-adds the kThreads sums in `shared` (blocks of kThreads threads) into shared[0].
__device__ inline void block_tree_add(Sums<double>* shared) {
  for (unsigned offset = kThreads / 2; offset > 0; offset /= 2) {
    __syncthreads();
    if (threadIdx.x < offset) add_to(shared[threadIdx.x], shared[threadIdx.x + offset]);
  }
}

// Stage 2 of channel c, by one warp: lane l adds partials l, l + 32, ..., a
// fixed shuffle tree adds the lanes, and lane 0 runs the finish with the
// channel's context. Partials are read past L1 (__ldcg): in the last-block
// merge, blocks on other multiprocessors wrote them.
template <class R, class F>
__device__ inline void finish_channel(const R& reducer, const F& finish,
                                      const Sums<double>* partials, int64_t splits, int64_t c,
                                      const typename R::Context* context, int lane) {
  Sums<double> total{0.0, 0.0};
  const Sums<double>* channel_partials = partials + c * splits;
#pragma unroll 4
  for (int64_t s = lane; s < splits; s += kWarp) {
    add_to(total, Sums<double>{__ldcg(&channel_partials[s].first),
                               __ldcg(&channel_partials[s].second)});
  }
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    total.first += __shfl_down_sync(0xffffffffu, total.first, offset);
    total.second += __shfl_down_sync(0xffffffffu, total.second, offset);
  }
  if (lane == 0) finish(reducer, c, total, *context);
}

// The end of a stage-1 block whose partials are written, where `arrivals`
// (one zeroed counter per channel block, blockIdx.x) is given: the block
// counts itself in, and the last of the gridDim.y blocks of its channels (every
// other block's partials then visible: each fenced its writes before counting)
// runs stage 2 for them, a warp per channel, block_contexts[k] being channel
// first_channel + k's context.
template <class R, class F>
__device__ inline void merge_in_last_block(const R& reducer, const F& finish,
                                           const Sums<double>* partials, unsigned* arrivals,
                                           int64_t first_channel, int channel_count,
                                           const typename R::Context* block_contexts,
                                           int thread) {
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (thread == 0) last = atomicAdd(&arrivals[blockIdx.x], 1u) == gridDim.y - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  for (int k = thread / kWarp; k < channel_count; k += kThreads / kWarp) {
    finish_channel(reducer, finish, partials, gridDim.y, first_channel + k, &block_contexts[k],
                   thread % kWarp);
  }
}

// Contiguous (N, C, L) read in packs of `size` (L % size == 0): block
// (c, split) reduces packs [split * per_split, ...) of channel c's N * L / size.
// kMerge: stage 2 runs here too (merge_in_last_block).
template <class R, class F, bool kMerge, int size, typename index_t>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    reduce_contiguous_kernel(const R reducer, const F finish, index_t channels,
                             index_t row_packs, index_t packs, index_t per_split,
                             Sums<double>* partials, typename R::Context* contexts,
                             unsigned* arrivals) {
  using acc_t = typename R::acc_t;
  using Context = typename R::Context;
  using Loaded = typename R::template Loaded<size>;
  constexpr int kChunkPasses = kChunk / (kUnroll * size) > 1 ? kChunk / (kUnroll * size) : 1;
  __shared__ Context shared_context;
  __shared__ Sums<double> shared[kThreads];
  const index_t c = blockIdx.x;
  const index_t begin = static_cast<index_t>(blockIdx.y) * per_split;
  const index_t end = begin + per_split < packs ? begin + per_split : packs;
  Loaded loaded[kUnroll];
  const auto load_batch = [&](index_t first) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const index_t p = first + u * kThreads;
      if (p < end) {
        const index_t n = p / row_packs;
        loaded[u] = reducer.template load<size>(
            ((n * channels + c) * row_packs + (p - n * row_packs)) * size);
      }
    }
  };
  index_t first = begin + threadIdx.x;
  load_batch(first);  // in flight while thread 0 computes the context
  if (threadIdx.x == 0) {
    shared_context = reducer.context(c);
    if (!kMerge && blockIdx.y == 0) contexts[c] = shared_context;  // for stage 2's kernel
  }
  __syncthreads();
  const Context context = shared_context;
  Sums<acc_t> chunk{acc_t(0), acc_t(0)};
  Sums<double> total{0.0, 0.0};
  int passes = 0;
  while (first < end) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (first + u * kThreads < end) {
#pragma unroll
        for (int k = 0; k < size; ++k) reducer.add(chunk, loaded[u], k, context);
      }
    }
    first += kUnroll * kThreads;
    load_batch(first);
    if (++passes == kChunkPasses) {
      add_to(total, chunk);
      chunk = {acc_t(0), acc_t(0)};
      passes = 0;
    }
  }
  add_to(total, chunk);
  shared[threadIdx.x] = total;
  block_tree_add(shared);
  if (threadIdx.x == 0) partials[c * gridDim.y + blockIdx.y] = shared[0];
  if constexpr (kMerge) {
    merge_in_last_block(reducer, finish, partials, arrivals, c, 1, &shared_context,
                        threadIdx.x);
  }
}

// Channels-last (rows, C) read in packs of `size` adjacent channels
// (C % size == 0): a block is blockDim.x lanes of packs by blockDim.y rows
// (launch.cuh: channel_lanes); blockIdx.y picks a slice of rows. A thread's
// double totals live in shared memory (fewer registers, more resident
// blocks), where one tree over the block's rows then adds every channel's.
// kMerge: stage 2 runs here too (merge_in_last_block).
template <class R, class F, bool kMerge, int size, typename index_t>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    reduce_channels_last_kernel(const R reducer, const F finish, index_t channels, index_t rows,
                                index_t per_split, Sums<double>* partials,
                                typename R::Context* contexts, unsigned* arrivals) {
  using acc_t = typename R::acc_t;
  using Context = typename R::Context;
  using Loaded = typename R::template Loaded<size>;
  constexpr int kChunkPasses = kChunk / kUnroll;
  __shared__ Context shared_context[kThreads];
  __shared__ Sums<double> shared[size][kThreads];
  const int lanes = blockDim.x;
  const int thread = threadIdx.y * lanes + threadIdx.x;
  // The block's lanes * size <= kThreads channels; thread t < lanes * size
  // computes the context of the t-th and writes its partial.
  const index_t block_channel = static_cast<index_t>(blockIdx.x) * lanes * size;
  const bool writes_channel = thread < lanes * size && block_channel + thread < channels;
  const index_t c = block_channel + threadIdx.x * size;
  const bool active = c < channels;
  const index_t begin = static_cast<index_t>(blockIdx.y) * per_split;
  const index_t end = begin + per_split < rows ? begin + per_split : rows;
  const index_t step = blockDim.y;
  Loaded loaded[kUnroll];
  const auto load_batch = [&](index_t row) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const index_t r = row + u * step;
      if (r < end) loaded[u] = reducer.template load<size>(r * channels + c);
    }
  };
  index_t row = begin + threadIdx.y;
  if (active) load_batch(row);  // in flight while the contexts are computed
  if (writes_channel) {
    shared_context[thread] = reducer.context(block_channel + thread);
    if (!kMerge && blockIdx.y == 0) contexts[block_channel + thread] = shared_context[thread];
  }
#pragma unroll
  for (int k = 0; k < size; ++k) shared[k][thread] = {0.0, 0.0};
  __syncthreads();
  if (active) {
    Context context[size];
    Sums<acc_t> chunk[size];
#pragma unroll
    for (int k = 0; k < size; ++k) {
      context[k] = shared_context[threadIdx.x * size + k];
      chunk[k] = {acc_t(0), acc_t(0)};
    }
    int passes = 0;
    while (row < end) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (row + u * step < end) {
#pragma unroll
          for (int k = 0; k < size; ++k) reducer.add(chunk[k], loaded[u], k, context[k]);
        }
      }
      row += kUnroll * step;
      load_batch(row);
      if (++passes == kChunkPasses || row >= end) {
#pragma unroll
        for (int k = 0; k < size; ++k) {
          add_to(shared[k][thread], chunk[k]);
          chunk[k] = {acc_t(0), acc_t(0)};
        }
        passes = 0;
      }
    }
  }
  for (unsigned offset = blockDim.y / 2; offset > 0; offset /= 2) {
    __syncthreads();
    if (threadIdx.y < offset) {
#pragma unroll
      for (int k = 0; k < size; ++k) add_to(shared[k][thread], shared[k][thread + offset * lanes]);
    }
  }
  __syncthreads();
  if (writes_channel) {
    partials[(block_channel + thread) * gridDim.y + blockIdx.y] =
        shared[thread % size][thread / size];
  }
  if constexpr (kMerge) {
    const index_t block_channels = channels - block_channel;
    merge_in_last_block(reducer, finish, partials, arrivals, block_channel,
                        static_cast<int>(block_channels < lanes * size ? block_channels
                                                                       : lanes * size),
                        shared_context, thread);
  }
}

// The finish of a stage-1 kernel that does not merge: its instances do not
// depend on the finish.
struct NoFinish {};

// Stage 2 in a kernel of its own: a warp per channel.
template <class R, class F>
__global__ void __launch_bounds__(kThreads)
    reduce_finish_kernel(const R reducer, const F finish, const Sums<double>* partials,
                         const typename R::Context* contexts, int64_t splits, int64_t channels) {
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / kWarp;
  if (c >= channels) return;  // whole warps: c is the same across a warp
  finish_channel(reducer, finish, partials, splits, c, contexts + c, threadIdx.x % kWarp);
}

// Runs both stages for `view` (the reducer and the finish hold their own
// pointers; `pointers` are the tensors the reducer reads, for their alignment).
template <class R, class F>
void reduce_per_channel(const ChannelView& view, const R& reducer, const F& finish,
                        std::initializer_list<const void*> pointers) {
  using Partial = Sums<double>;
  using Context = typename R::Context;
  constexpr int kPack = 16 / sizeof(typename R::scalar_t);
  const at::Device device = view.data.device();
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(device.index());
  const int64_t channels = view.channels;
  const int64_t per_channel = view.count();
  if (channels == 0 || per_channel == 0) return;
  const int64_t row = view.channels_last ? channels : view.inner;
  const int size = row % kPack == 0 ? pack_size<typename R::scalar_t>(pointers) : 1;
  const int64_t groups = channels / size;
  const int lanes = channel_lanes(groups);
  const int rows_per_pass = kThreads / lanes;
  const int64_t channel_blocks = view.channels_last ? (groups + lanes - 1) / lanes : channels;
  const bool merge = cuda_merge_in_last_block();
  with_index_type(view.data, [&](auto index) {
    using index_t = decltype(index);
    const auto launch = [&](auto pack, auto merge) {
      constexpr int kSize = decltype(pack)::value;
      constexpr bool kMerge = decltype(merge)::value;
      const auto stage1_finish = [&] {
        if constexpr (kMerge) {
          return finish;
        } else {
          return NoFinish{};
        }
      }();
      using Finish = decltype(stage1_finish);
      constexpr auto channels_last_stage1 =
          reduce_channels_last_kernel<R, Finish, kMerge, kSize, index_t>;
      constexpr auto contiguous_stage1 =
          reduce_contiguous_kernel<R, Finish, kMerge, kSize, index_t>;
      // A block steps through rows_per_pass rows of its channels
      // (channels-last) or kThreads packs of one channel (contiguous) at a time.
      const int64_t splits =
          view.channels_last
              ? reduction_splits(channel_blocks, per_channel, rows_per_pass,
                                 wave_blocks<channels_last_stage1>(device))
              : reduction_splits(channel_blocks, per_channel, int64_t{kThreads} * kSize,
                                 wave_blocks<contiguous_stage1>(device));
      // One buffer: each channel's partials, then for stage 2's kernel each
      // channel's context, or where stage 1 merges a counter per channel
      // block (zeroed).
      const int64_t partial_bytes = channels * splits * static_cast<int64_t>(sizeof(Partial));
      const int64_t tail_bytes = kMerge
                                     ? channel_blocks * static_cast<int64_t>(sizeof(unsigned))
                                     : channels * static_cast<int64_t>(sizeof(Context));
      const at::Tensor workspace = at::empty({partial_bytes + tail_bytes},
                                             view.data.options().dtype(at::kByte));
      char* data = static_cast<char*>(workspace.mutable_data_ptr());
      Partial* partials = reinterpret_cast<Partial*>(data);
      Context* contexts = kMerge ? nullptr : reinterpret_cast<Context*>(data + partial_bytes);
      unsigned* arrivals = nullptr;
      if constexpr (kMerge) {
        arrivals = reinterpret_cast<unsigned*>(data + partial_bytes);
        C10_CUDA_CHECK(cudaMemsetAsync(arrivals, 0, tail_bytes, stream));
      }
      const dim3 grid(static_cast<unsigned>(channel_blocks), static_cast<unsigned>(splits));
      if (view.channels_last) {
        const int64_t per_split = (per_channel + splits - 1) / splits;
        channels_last_stage1<<<grid, dim3(lanes, rows_per_pass), 0, stream>>>(
            reducer, stage1_finish, channels, per_channel, per_split, partials, contexts,
            arrivals);
      } else {
        const int64_t packs = per_channel / kSize;
        const int64_t per_split = (packs + splits - 1) / splits;
        contiguous_stage1<<<grid, kThreads, 0, stream>>>(reducer, stage1_finish, channels,
                                                         view.inner / kSize, packs, per_split,
                                                         partials, contexts, arrivals);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if constexpr (!kMerge) {
        const unsigned finish_blocks =
            static_cast<unsigned>((channels * kWarp + kThreads - 1) / kThreads);
        reduce_finish_kernel<R, F><<<finish_blocks, kThreads, 0, stream>>>(
            reducer, finish, partials, contexts, splits, channels);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    };
    const auto with_merge = [&](auto pack) {
      if (merge) {
        launch(pack, std::true_type{});
      } else {
        launch(pack, std::false_type{});
      }
    };
    if (size == kPack) {
      with_merge(std::integral_constant<int, kPack>{});
    } else {
      with_merge(std::integral_constant<int, 1>{});
    }
  });
}

}  // namespace normext::batch_norm::cuda

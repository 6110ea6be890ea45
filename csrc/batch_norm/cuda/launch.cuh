// Launch helpers shared by the CUDA kernels: device/stream, grid sizing,
// index width, parameter types and 16-byte packs.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <atomic>
#include <initializer_list>
#include <limits>

#include "batch_norm/common.h"

namespace normext::batch_norm::cuda {

constexpr int kThreads = 256;
constexpr int kWarp = 32;

constexpr int kMaxDevices = 64;

// A per-device value computed by query() once: device attribute and occupancy
// queries cost host time on every call.
template <typename Query>
int cached_per_device(std::atomic<int> (&cache)[kMaxDevices], int index, const Query& query) {
  int value = index < kMaxDevices ? cache[index].load(std::memory_order_relaxed) : 0;
  if (value == 0) {
    value = query();
    if (index < kMaxDevices) cache[index].store(value, std::memory_order_relaxed);
  }
  return value;
}

inline int multiprocessor_count(const at::Device& device) {
  static std::atomic<int> counts[kMaxDevices] = {};
  return cached_per_device(counts, device.index(), [&] {
    int count = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device.index()));
    return count;
  });
}

// Blocks of kThreads threads of `kernel` resident on the whole GPU at once:
// one wave. Launched no larger, a grid has no tail wave, and a thread does
// more work for each per-channel value it loads.
template <auto kernel>
int64_t wave_blocks(const at::Device& device) {
  static std::atomic<int> per_multiprocessor[kMaxDevices] = {};
  const int blocks = cached_per_device(per_multiprocessor, device.index(), [&] {
    const c10::cuda::CUDAGuard guard(device);  // the query reads the current device
    int count = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&count, kernel, kThreads, 0));
    return std::max(count, 1);
  });
  return int64_t{blocks} * multiprocessor_count(device);
}

// 32-bit indexes with room for the loops' last strides past the end (a
// grid-stride loop steps by up to a few million elements).
inline bool needs_64bit_index(const at::Tensor& t) {
  return t.numel() > std::numeric_limits<int32_t>::max() - (int64_t{1} << 24);
}

template <typename F>
void with_index_type(const at::Tensor& t, const F& f) {
  if (needs_64bit_index(t)) {
    f(int64_t{});
  } else {
    f(int32_t{});
  }
}

// A per-channel tensor with dense data (copied only when strided); undefined stays undefined.
inline at::Tensor dense(const at::Tensor& t) { return t.defined() ? t.contiguous() : t; }

template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

template <typename T>
T* mutable_data_or_null(const at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

// Calls f(param_t{}) with param_t the element type of per-channel parameters
// of dtype `type` (weight, bias, running stats, their gradients): the
// accumulate type, or a float16/bfloat16 input's own type. The kernels read
// and write them as they are, so no conversion runs before or after them.
template <typename scalar_t, typename acc_t, typename F>
void with_param_type(at::ScalarType type, const F& f) {
  if (type == c10::CppTypeToScalarType<scalar_t>::value) {
    f(scalar_t{});
  } else {
    TORCH_INTERNAL_ASSERT(type == c10::CppTypeToScalarType<acc_t>::value);
    f(acc_t{});
  }
}

// Splits of each channel's reduction: as many as fill one wave of `wave`
// blocks when there are few channel blocks, each still with real work (8 or
// more loads per thread; a block covers `step` elements or rows of a channel
// per load). It depends only on the shape and the device, so results are
// reproducible.
inline int64_t reduction_splits(int64_t channel_blocks, int64_t per_channel, int64_t step,
                                int64_t wave) {
  const int64_t by_occupancy = wave / channel_blocks;
  const int64_t by_work = (per_channel + step * 8 - 1) / (step * 8);
  return std::max<int64_t>(1, std::min<int64_t>({by_occupancy, by_work, 65535}));
}

// Channels-last blocks: lanes across a row's `groups` packs of channels (a
// power of two up to a warp, so a warp spans whole rows when channels are
// few and no lane idles), the rest of the block's threads over rows.
inline int channel_lanes(int64_t groups) {
  int lanes = 1;
  while (lanes < kWarp && lanes < groups) lanes *= 2;
  return lanes;
}

// 16-byte packs: `size` elements of T loaded or stored at once.
template <typename T, int size>
struct alignas(sizeof(T) * size) Pack {
  T value[size];
};

template <int size, typename T, typename index_t>
__device__ inline Pack<T, size> load_pack(const T* data, index_t first) {
  return *reinterpret_cast<const Pack<T, size>*>(data + first);
}

// Elements of T in a 16-byte pack when every pointer is 16-byte aligned, else 1.
template <typename T>
int pack_size(std::initializer_list<const void*> pointers) {
  for (const void* p : pointers) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return 1;
  }
  return 16 / sizeof(T);
}

}  // namespace normext::batch_norm::cuda

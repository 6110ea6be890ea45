// Launch helpers shared by the CUDA kernels: device/stream, grid sizing,
// index width, parameter conversion, and the two-stage per-channel reduction.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <limits>

#include "batch_norm/common.h"

namespace normext::batch_norm::cuda {

constexpr int kThreads = 256;

inline int multiprocessor_count(const at::Device& device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device.index()));
  return count;
}

inline bool needs_64bit_index(const at::Tensor& t) {
  return t.numel() > std::numeric_limits<int32_t>::max();
}

template <typename F>
void with_index_type(const at::Tensor& t, const F& f) {
  if (needs_64bit_index(t)) {
    f(int64_t{});
  } else {
    f(int32_t{});
  }
}

// A per-channel tensor as `type` (a no-op when it already is); undefined stays undefined.
inline at::Tensor as_type(const at::Tensor& t, at::ScalarType type) {
  return t.defined() ? t.to(type).contiguous() : t;
}

template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// Splits of each channel's reduction: enough blocks to fill the GPU several
// times over when there are few channels, each still with real work. It
// depends only on the shape and the device, so results are reproducible.
inline int64_t reduction_splits(int64_t channel_blocks, int64_t per_channel, const at::Device& device) {
  const int64_t target_blocks = 4 * static_cast<int64_t>(multiprocessor_count(device));
  const int64_t by_occupancy = (target_blocks + channel_blocks - 1) / channel_blocks;
  const int64_t by_work = (per_channel + kThreads * 16 - 1) / (kThreads * 16);
  return std::max<int64_t>(1, std::min<int64_t>({by_occupancy, by_work, 65535}));
}

// 16-byte packs: `size` elements of T loaded or stored at once.
template <typename T, int size>
struct alignas(sizeof(T) * size) Pack {
  T value[size];
};

template <int size, typename T>
bool pack_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * size) == 0;
}

}  // namespace normext::batch_norm::cuda

// Large CPU outputs (normalized activations, input gradients) come from a
// cache of freed blocks: memory fresh from the OS page-faults on first write,
// which for a tensor over glibc's mmap threshold (32 MiB) costs more than a
// batch-norm pass over it. torch's CPU allocator returns such blocks to the OS
// on every free, so a training loop pays that cost every step.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>

namespace normext {

// An uninitialized CPU tensor with these sizes and strides; blocks of at least
// 1 MiB are taken from and returned to the cache (at most
// NORMEXT_CPU_CACHE_MB megabytes are kept, default 2048, the blocks freed
// longest ago making room for new ones; 0 disables it) and placed at page
// offsets away from those of `inputs`, the tensors the kernel writing the
// output reads. The cache is safe to fork with.
at::Tensor empty_cpu_output(at::IntArrayRef sizes, at::IntArrayRef strides, at::ScalarType dtype,
                            c10::ArrayRef<const void*> inputs);

// Frees every cached block; returns the bytes released.
size_t release_cpu_output_cache();

// Bytes currently held in the cache (not in use by any tensor).
size_t cached_cpu_output_bytes();

}  // namespace normext

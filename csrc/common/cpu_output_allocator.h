// Large CPU outputs (normalized activations, input gradients) come from a
// cache of freed blocks: memory fresh from the OS page-faults on first write,
// which for a tensor over glibc's mmap threshold (32 MiB) costs more than a
// batch-norm pass over it. torch's CPU allocator returns such blocks to the OS
// on every free, so a training loop pays that cost every step.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <cstdint>

namespace normext {

// An uninitialized CPU tensor with these sizes and strides; blocks of at least
// 1 MiB are taken from and returned to the cache and placed at page offsets
// away from those of `inputs`, the tensors the kernel writing the output reads.
//
// The cache keeps at most NORMEXT_CPU_CACHE_MB megabytes (0 turns it off),
// read at its first use. The default holds the outputs a ResNet-50 training
// step at batch 32 reuses, so such a loop never maps fresh memory, but at
// most 1/8 of physical memory. The blocks freed longest ago make room for new
// ones; when mapping a block fails, every cached block is unmapped and the
// mapping tried again before c10::OutOfMemoryError is raised. The cache is
// safe to fork with, and a forked child starts with it empty: cached blocks
// are not copied into children, blocks in use by tensors are.
at::Tensor empty_cpu_output(at::IntArrayRef sizes, at::IntArrayRef strides, at::ScalarType dtype,
                            c10::ArrayRef<const void*> inputs);

// Frees every cached block; returns the bytes released.
size_t release_cpu_output_cache();

struct CpuOutputCacheInfo {
  size_t cached_bytes;  // freed blocks kept for reuse
  size_t in_use_bytes;  // blocks held by tensors
  size_t limit_bytes;   // the most cached_bytes may reach
  uint64_t hits;        // outputs given a cached block
  uint64_t misses;      // outputs for which a block was mapped
  uint64_t evictions;   // cached blocks unmapped: to make room, on release or to retry a mapping
  bool enabled;         // limit_bytes > 0 and not switched off
};

// The cache's state; reads NORMEXT_CPU_CACHE_MB if no output has yet.
CpuOutputCacheInfo cpu_output_cache_info();

// Switches the cache off (outputs come from torch's CPU allocator, as if it
// did not exist; what it holds stays cached) or back on, for benchmarks and
// tests that compare the kernels alone; returns the previous setting.
bool set_cpu_output_cache_enabled(bool enabled);

}  // namespace normext

#include "common/cpu_output_allocator.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <string>

namespace normext {
namespace {

constexpr size_t kMinCachedBytes = size_t{1} << 20;
constexpr size_t kAlignment = 64;

size_t cache_limit_bytes() {
  const char* env = std::getenv("NORMEXT_CPU_CACHE_MB");
  const size_t megabytes = env ? std::strtoull(env, nullptr, 10) : 2048;
  return megabytes << 20;
}

struct Block {
  void* ptr;
  size_t size;
};

class CachingCpuAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (n < kMinCachedBytes || limit_ == 0) return c10::GetCPUAllocator()->allocate(n);
    Block* block = take(n);
    if (block == nullptr) {
      void* ptr = nullptr;
      TORCH_CHECK(posix_memalign(&ptr, kAlignment, n) == 0 && ptr != nullptr,
                  "normext: out of CPU memory allocating ", n, " bytes");
      block = new Block{ptr, n};
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      in_use_bytes_ += block->size;
    }
    report(block->ptr, static_cast<int64_t>(block->size));
    return {block->ptr, block, &CachingCpuAllocator::release, c10::Device(c10::kCPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  size_t release_all() {
    std::lock_guard<std::mutex> lock(mutex_);
    const size_t released = cached_bytes_;
    for (auto& [size, block] : cache_) {
      std::free(block->ptr);
      delete block;
    }
    cache_.clear();
    cached_bytes_ = 0;
    return released;
  }

  size_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_bytes_;
  }

  static CachingCpuAllocator& instance() {
    static auto* allocator = new CachingCpuAllocator();  // outlives every tensor
    return *allocator;
  }

 private:
  // A cached block of exactly n bytes, or one at most 1/8 larger.
  Block* take(size_t n) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = cache_.lower_bound(n);
    if (it == cache_.end() || it->first > n + n / 8) return nullptr;
    Block* block = it->second;
    cache_.erase(it);
    cached_bytes_ -= block->size;
    return block;
  }

  static void release(void* context) {
    auto* block = static_cast<Block*>(context);
    CachingCpuAllocator& self = instance();
    void* const ptr = block->ptr;
    const int64_t size = static_cast<int64_t>(block->size);
    {
      std::lock_guard<std::mutex> lock(self.mutex_);
      self.in_use_bytes_ -= block->size;
      if (self.cached_bytes_ + block->size <= self.limit_) {
        self.cache_.emplace(block->size, block);
        self.cached_bytes_ += block->size;
        block = nullptr;
      }
    }
    if (block != nullptr) {
      std::free(block->ptr);
      delete block;
    }
    self.report(ptr, -size);
  }

  // What torch's CPU allocator reports, so torch.profiler's memory view
  // sees these tensors.
  void report(void* ptr, int64_t delta) {
    if (!c10::memoryProfilingEnabled()) return;
    size_t in_use, reserved;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      in_use = in_use_bytes_;
      reserved = in_use_bytes_ + cached_bytes_;
    }
    c10::reportMemoryUsageToProfiler(ptr, delta, in_use, reserved, c10::Device(c10::kCPU));
  }

  const size_t limit_ = cache_limit_bytes();
  std::mutex mutex_;
  std::multimap<size_t, Block*> cache_;
  size_t cached_bytes_ = 0;
  size_t in_use_bytes_ = 0;
};

}  // namespace

at::Tensor empty_cpu_output(at::IntArrayRef sizes, at::IntArrayRef strides,
                            at::ScalarType dtype) {
  return at::detail::empty_strided_generic(sizes, strides, &CachingCpuAllocator::instance(),
                                           c10::DispatchKeySet(c10::DispatchKey::CPU), dtype);
}

size_t release_cpu_output_cache() { return CachingCpuAllocator::instance().release_all(); }

size_t cached_cpu_output_bytes() { return CachingCpuAllocator::instance().cached_bytes(); }

}  // namespace normext

#include "common/cpu_output_allocator.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>
#include <c10/util/error.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <iterator>
#include <list>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

namespace normext {
namespace {

constexpr size_t kMinCachedBytes = size_t{1} << 20;
constexpr size_t kAlignment = 64;
constexpr uintptr_t kPageBytes = 4096;
constexpr size_t kHugePageBytes = size_t{2} << 20;

// The 64-byte-aligned offset within a 4 KiB page farthest from the page
// offsets of `inputs`. A load whose address matches an earlier, unresolved
// store's in the low 12 bits waits for it ("4K aliasing"): an output just
// ahead of its input modulo 4 KiB slows the elementwise passes (the measured
// A/B is in benchmarks/history). Inputs from torch's heap land at any
// offset, so a block always at the same one would hit this now and then.
uintptr_t page_offset_apart_from(c10::ArrayRef<const void*> inputs) {
  uintptr_t best = 0, best_distance = 0;
  for (uintptr_t candidate = 0; candidate < kPageBytes; candidate += kAlignment) {
    uintptr_t distance = kPageBytes;
    for (const void* input : inputs) {
      const uintptr_t d = (candidate - reinterpret_cast<uintptr_t>(input)) % kPageBytes;
      distance = std::min(distance, std::min(d, kPageBytes - d));
    }
    if (distance > best_distance) best = candidate, best_distance = distance;
  }
  return best;
}

// What a ResNet-50 training step at batch 32 reuses (float32, either layout;
// benchmarks/cpu_cache_need.py), rounded up: such a loop then never maps
// fresh memory.
constexpr size_t kTrainingWorkingSetBytes = size_t{1280} << 20;

// kTrainingWorkingSetBytes, but at most 1/8 of physical memory: freed memory
// the cache keeps is memory nothing else on the machine can use.
size_t default_limit_bytes() {
  const long pages = sysconf(_SC_PHYS_PAGES), page_bytes = sysconf(_SC_PAGE_SIZE);
  if (pages <= 0 || page_bytes <= 0) return kTrainingWorkingSetBytes;
  return std::min(kTrainingWorkingSetBytes,
                  static_cast<size_t>(pages) / 8 * static_cast<size_t>(page_bytes));
}

size_t limit_from_environment() {
  const char* env = std::getenv("NORMEXT_CPU_CACHE_MB");
  if (env == nullptr) return default_limit_bytes();
  char* end = nullptr;
  errno = 0;
  const unsigned long long megabytes = std::strtoull(env, &end, 10);
  // Digits only, and few enough that the byte count fits.
  if (end == env || *end != '\0' || *env == '-' || errno != 0 || megabytes > (1ULL << 40)) {
    const size_t fallback = default_limit_bytes();
    TORCH_WARN("normext: NORMEXT_CPU_CACHE_MB=\"", env,
               "\" is not a number of megabytes; using the default, ", fallback >> 20, " MB");
    return fallback;
  }
  return static_cast<size_t>(megabytes) << 20;
}

// A cached block: `mapped` bytes at ptr, which is 2 MiB-aligned, of which the
// tensor uses `size`; the rest (at least kPageBytes) is for the placement
// within a page. The mapping asks for transparent huge pages, which the
// kernel gives to the 2 MiB ranges it covers whole (the tail keeps 4 KiB
// pages, so a block holds no more memory than its size rounds to, except
// when reused for a request up to 1/8 smaller). The first write to a huge
// page may wait for the kernel to compact memory; a cached block pays that
// once. Huge pages pay for outputs larger than the last-level cache (the
// A/B against 4 KiB pages is in benchmarks/history).
struct Block {
  void* ptr;
  size_t size;
  size_t mapped;
  void* data;  // where the tensor holding the block starts, ptr + its page offset
  // Where a cached block sits in the cache's two indexes.
  std::multimap<size_t, Block*>::iterator by_size;
  std::list<Block*>::iterator by_age;

  // A new block, or nullptr with errno set when mmap fails.
  static Block* map(size_t size) {
    const size_t mapped = (size + 2 * kPageBytes - 1) / kPageBytes * kPageBytes;
    // Over-map by one huge page, then trim to a 2 MiB-aligned range.
    void* raw = mmap(nullptr, mapped + kHugePageBytes, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) return nullptr;
    const uintptr_t start = reinterpret_cast<uintptr_t>(raw);
    const uintptr_t aligned = (start + kHugePageBytes - 1) / kHugePageBytes * kHugePageBytes;
    if (aligned > start) munmap(raw, aligned - start);
    if (const size_t tail = start + kHugePageBytes - aligned) {
      munmap(reinterpret_cast<void*>(aligned + mapped), tail);
    }
    void* ptr = reinterpret_cast<void*>(aligned);
#ifdef MADV_HUGEPAGE
    madvise(ptr, mapped, MADV_HUGEPAGE);  // a hint: without THP, 4 KiB pages
#endif
    return new Block{ptr, size, mapped, ptr, {}, {}};
  }

  static void unmap(Block* block) {
    munmap(block->ptr, block->mapped);
    delete block;
  }

  // Whether a forked child gets a copy of the block: a cached block is memory
  // a child could not reach (no tensor holds it), so it is not copied; a block
  // in use is, as the child may read the tensor. Best effort: a kernel that
  // refuses leaves the cached block mapped, unused, in the child.
  void copy_on_fork(bool copy) { madvise(ptr, mapped, copy ? MADV_DOFORK : MADV_DONTFORK); }
};

class CachingCpuAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override { return allocate(n, {}); }

  // n bytes whose address keeps its distance within a page from `inputs`.
  c10::DataPtr allocate(size_t n, c10::ArrayRef<const void*> inputs) {
    if (n < kMinCachedBytes || !enabled()) return c10::GetCPUAllocator()->allocate(n);
    Block* block = take(n);
    if (block == nullptr) block = map(n);
    const uintptr_t base = reinterpret_cast<uintptr_t>(block->ptr);
    const uintptr_t offset = (page_offset_apart_from(inputs) - base % kPageBytes) % kPageBytes;
    block->data = reinterpret_cast<void*>(base + offset);
    report(block->data, static_cast<int64_t>(block->size));
    return {block->data, block, &CachingCpuAllocator::release, c10::Device(c10::kCPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  size_t release_all() {
    std::vector<Block*> evicted;
    size_t released = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      released = cached_bytes_;
      while (!by_age_.empty()) evicted.push_back(evict_oldest());
    }
    for (Block* block : evicted) Block::unmap(block);
    return released;
  }

  CpuOutputCacheInfo info() {
    const size_t limit_bytes = limit();
    std::lock_guard<std::mutex> lock(mutex_);
    return {cached_bytes_, in_use_bytes_, limit_bytes, hits_, misses_, evictions_, enabled()};
  }

  bool set_enabled(bool enabled) { return switched_on_.exchange(enabled); }

  static CachingCpuAllocator& instance() {
    static auto* allocator = new CachingCpuAllocator();  // outlives every tensor
    return *allocator;
  }

  // A fork while another thread holds the lock would leave it locked forever
  // in the child (a DataLoader worker, say): fork takes it first. The child
  // has none of the cached blocks (see copy_on_fork), so it forgets them.
  static void register_fork_handlers() {
    instance();
    const int error = pthread_atfork([] { instance().mutex_.lock(); },
                                     [] { instance().mutex_.unlock(); },
                                     [] {
                                       instance().forget_cached_blocks();
                                       instance().mutex_.unlock();
                                     });
    if (error != 0) {
      // Without the child handler a child would hand out blocks it lacks.
      instance().set_enabled(false);
      TORCH_WARN("normext: no fork handlers for the CPU output cache (error ", error,
                 "); the cache is off");
    }
  }

 private:
  // Read at the first use rather than as the library loads, so that setting
  // NORMEXT_CPU_CACHE_MB after `import normext` works.
  static size_t limit() {
    static const size_t limit_bytes = limit_from_environment();
    return limit_bytes;
  }

  bool enabled() const { return switched_on_.load(std::memory_order_relaxed) && limit() > 0; }

  // A cached block of exactly n bytes, or one at most 1/8 larger: of the
  // smallest such size, the one freed last (equal keys keep their insertion
  // order). It is the likeliest to be in cache still; handing out the oldest
  // instead rotated a loop's output through every cached block of its size,
  // each one out of cache by then.
  Block* take(size_t n) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = cache_.lower_bound(n);
    if (it == cache_.end() || it->first > n + n / 8) {
      ++misses_;
      return nullptr;
    }
    it = std::prev(cache_.upper_bound(it->first));
    Block* block = it->second;
    remove(block);
    // Under the lock, as every change of a block's fork advice: a fork then
    // sees the cache's records agree with what the child gets.
    block->copy_on_fork(true);
    ++hits_;
    in_use_bytes_ += block->size;
    return block;
  }

  // A new block of n bytes. Cached blocks hold address space and memory the
  // mapping may lack: when it fails, they are all unmapped and it is tried
  // once more before the out-of-memory error.
  Block* map(size_t n) {
    Block* block = Block::map(n);
    if (block == nullptr) {
      const size_t released = release_all();
      block = Block::map(n);
      TORCH_CHECK_WITH(OutOfMemoryError, block != nullptr, "normext: out of CPU memory: mapping ",
                       n, " bytes for a batch-norm output failed (", c10::utils::str_error(errno),
                       ") after releasing the ", released, " bytes of its CPU output cache");
    }
    std::lock_guard<std::mutex> lock(mutex_);
    in_use_bytes_ += block->size;
    return block;
  }

  // Caches a freed block, evicting the blocks freed longest ago to make room
  // (a loop's current shapes are worth more than those of earlier ones);
  // returns the blocks to unmap, `block` itself when it exceeds the limit.
  std::vector<Block*> cache(Block* block) {
    std::vector<Block*> evicted;
    if (block->size > limit()) {
      evicted.push_back(block);
      return evicted;
    }
    while (cached_bytes_ + block->size > limit()) evicted.push_back(evict_oldest());
    block->copy_on_fork(false);
    block->by_size = cache_.emplace(block->size, block);
    block->by_age = by_age_.insert(by_age_.end(), block);
    cached_bytes_ += block->size;
    return evicted;
  }

  void remove(Block* block) {
    cache_.erase(block->by_size);
    by_age_.erase(block->by_age);
    cached_bytes_ -= block->size;
  }

  Block* evict_oldest() {
    Block* oldest = by_age_.front();
    remove(oldest);
    ++evictions_;
    return oldest;
  }

  // In a forked child, with the lock held: the cached blocks are not mapped
  // there (so not unmapped either), and its counts start from zero. Blocks in
  // use are mapped, and their tensors return them to the child's cache.
  void forget_cached_blocks() {
    for (Block* block : by_age_) delete block;
    cache_.clear();
    by_age_.clear();
    cached_bytes_ = 0;
    hits_ = misses_ = evictions_ = 0;
  }

  static void release(void* context) {
    auto* block = static_cast<Block*>(context);
    CachingCpuAllocator& self = instance();
    void* const data = block->data;
    const int64_t size = static_cast<int64_t>(block->size);
    std::vector<Block*> evicted;
    {
      std::lock_guard<std::mutex> lock(self.mutex_);
      self.in_use_bytes_ -= block->size;
      evicted = self.cache(block);
    }
    for (Block* old : evicted) Block::unmap(old);  // outside the lock: munmap takes time
    self.report(data, -size);
  }

  // What torch's CPU allocator reports, so torch.profiler's memory view
  // sees these tensors: at the address the tensor's data starts.
  void report(void* data, int64_t delta) {
    if (!c10::memoryProfilingEnabled()) return;
    size_t in_use, reserved;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      in_use = in_use_bytes_;
      reserved = in_use_bytes_ + cached_bytes_;
    }
    c10::reportMemoryUsageToProfiler(data, delta, in_use, reserved, c10::Device(c10::kCPU));
  }

  std::atomic<bool> switched_on_{true};
  std::mutex mutex_;
  std::multimap<size_t, Block*> cache_;  // by size; equal sizes in the order freed
  std::list<Block*> by_age_;              // oldest freed first
  size_t cached_bytes_ = 0;
  size_t in_use_bytes_ = 0;
  uint64_t hits_ = 0;
  uint64_t misses_ = 0;
  uint64_t evictions_ = 0;
};

// As the library loads, before a thread of the process can use the cache.
[[maybe_unused]] const bool fork_handlers_registered =
    (CachingCpuAllocator::register_fork_handlers(), true);

}  // namespace

at::Tensor empty_cpu_output(at::IntArrayRef sizes, at::IntArrayRef strides, at::ScalarType dtype,
                            c10::ArrayRef<const void*> inputs) {
  CachingCpuAllocator& allocator = CachingCpuAllocator::instance();
  const size_t nbytes = at::detail::computeStorageNbytes(sizes, strides, c10::elementSize(dtype));
  c10::Storage storage(c10::Storage::use_byte_size_t(), nbytes, allocator.allocate(nbytes, inputs),
                       &allocator, /*resizable=*/true);
  at::Tensor output = at::detail::make_tensor<c10::TensorImpl>(
      std::move(storage), c10::DispatchKeySet(c10::DispatchKey::CPU),
      c10::scalarTypeToTypeMeta(dtype));
  output.unsafeGetTensorImpl()->set_sizes_and_strides(sizes, strides);
  return output;
}

size_t release_cpu_output_cache() { return CachingCpuAllocator::instance().release_all(); }

CpuOutputCacheInfo cpu_output_cache_info() { return CachingCpuAllocator::instance().info(); }

bool set_cpu_output_cache_enabled(bool enabled) {
  return CachingCpuAllocator::instance().set_enabled(enabled);
}

}  // namespace normext

// CPU kernels of the batch-norm ops and the loops they share.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "batch_norm/common.h"
#include "common/cpu/capability.h"

namespace normext::batch_norm::NORMEXT_CPU_CAPABILITY {

// The kernels compiled for this capability.
struct CpuKernels {
#include "batch_norm/cpu/kernel_api.h"
};

namespace cpu {

// Elements one task handles at least: enough to amortize scheduling.
constexpr int64_t kGrainElements = 32768;
// The grain of a parallel loop whose items cost `item_cost` element sums each.
inline int64_t grain_for(int64_t item_cost) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, item_cost));
}
// Elements one block of a row holds in the blocked reductions.
constexpr int64_t kBlockElements = 4096;

// Contiguous (N, C, L) layout, cut into blocks of at most kBlockElements
// along L so that few channels with long rows still use every core. Blocks
// are indexed channel-major, [c][n][b], so each channel's partials are
// adjacent; the cut does not depend on the thread count, so results do not.
struct RowBlocks {
  int64_t outer, channels, inner, blocks_per_row;

  explicit RowBlocks(const ChannelView& v)
      : outer(v.outer), channels(v.channels), inner(v.inner),
        blocks_per_row((v.inner + kBlockElements - 1) / kBlockElements) {}

  int64_t per_channel() const { return outer * blocks_per_row; }
  int64_t size() const { return channels * per_channel(); }
  int64_t block_length(int64_t b) const {
    return std::min(kBlockElements, inner - b * kBlockElements);
  }

  // fn(c, offset of the block in the tensor, length, partial index [c][n][b]),
  // run in parallel in memory order.
  template <typename F>
  void for_each(const F& fn) const {
    const int64_t typical = std::min(inner, kBlockElements);
    const int64_t grain = grain_for(typical);
    at::parallel_for(0, outer * channels * blocks_per_row, grain, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task % blocks_per_row;
        const int64_t row = task / blocks_per_row;
        const int64_t c = row % channels;
        const int64_t n = row / channels;
        fn(c, row * inner + b * kBlockElements, block_length(b), (c * outer + n) * blocks_per_row + b);
      }
    });
  }
};

// Channels-last layout, (rows, C): rows cut into one range per thread.
struct RowChunks {
  int64_t rows, chunks;

  RowChunks(int64_t rows, int64_t channels) : rows(rows) {
    const int64_t min_rows = grain_for(channels);
    chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(),
                                                    (rows + min_rows - 1) / min_rows));
  }

  // fn(chunk, first row, end row), chunks in parallel.
  template <typename F>
  void for_each(const F& fn) const {
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        fn(chunk, rows * chunk / chunks, rows * (chunk + 1) / chunks);
      }
    });
  }
};

constexpr int64_t kCacheLineBytes = 64;

// Per-chunk partial sums: `arrays` arrays of `channels` values per chunk,
// each chunk's on cache lines of its own. Threads storing to adjacent
// chunks' sums on one shared line pass it back and forth on every store
// (false sharing: the channels-last backward reduction at 32x128x28x28
// float32, which stores its sums every row, took 0.77-2.3 ms instead of
// 0.50-0.64 ms, depending on where malloc had put them).
template <typename T>
class ChunkPartials {
 public:
  ChunkPartials(int64_t chunks, int64_t channels, int arrays)
      : chunks_(chunks),
        stride_((channels + kLineValues - 1) / kLineValues * kLineValues),
        arrays_(arrays),
        storage_(chunks * arrays * stride_ + kLineValues, T(0)) {
    const auto address = reinterpret_cast<uintptr_t>(storage_.data());
    data_ = storage_.data() +
            (kCacheLineBytes - address % kCacheLineBytes) % kCacheLineBytes / sizeof(T);
  }

  // Array `array` of chunk `chunk`.
  T* get(int64_t chunk, int array) { return data_ + (chunk * arrays_ + array) * stride_; }
  // Array `array`'s value for channel c, added over the chunks in order.
  T total(int array, int64_t c) {
    T sum = 0;
    for (int64_t chunk = 0; chunk < chunks_; ++chunk) sum += get(chunk, array)[c];
    return sum;
  }

 private:
  static constexpr int64_t kLineValues = kCacheLineBytes / sizeof(T);
  int64_t chunks_, stride_, arrays_;
  std::vector<T> storage_;
  T* data_;
};

// Rows of fewer bytes than this are reduced per channel across samples,
// with vector accumulators kept across rows: a horizontal sum per short row
// would cost more than the row itself (measured: 7x7 and bfloat16 14x14 rows
// gain 1.5-4x, float32 14x14 rows lose 25%).
constexpr int64_t kShortRowBytes = 512;

template <typename scalar_t>
inline bool is_short_row(int64_t length) {
  return length * static_cast<int64_t>(sizeof(scalar_t)) < kShortRowBytes;
}
constexpr int kLanes = 16;
// Rows between flushes of the float32 lane accumulators into double sums.
constexpr int64_t kFlushRows = 256;

// Channels one short-row task reduces together, sample by sample: their rows
// are adjacent, so a task reads runs of up to kShortRowChannels * L elements
// in memory order instead of jumping C * L elements from row to row. That
// pays for rows of under 4 vectors (7x7 in an in-process A/B: statistics
// 2.2x faster in bfloat16 on 1 thread and 1.2-1.8x in float32 on 2,
// backward reduce 1.7x and 1.2-1.8x); longer short rows (bfloat16 14x14)
// were 20% slower in blocks, whose lane accumulators live in L1 rather than
// in registers, and are reduced one channel at a time.
constexpr int64_t kShortRowChannels = 64;

inline int64_t short_row_block(int64_t channels, int64_t length) {
  if (length >= 4 * kLanes) return 1;
  return std::clamp<int64_t>(channels / at::get_num_threads(), 1, kShortRowChannels);
}

// fn(first channel, channels) over the blocks of a contiguous (N, C, L)
// tensor with short rows, in parallel when there is enough work: a channel
// costs its count of elements plus `channel_cost` more (in element sums), and
// a small tensor stays on one thread, where waking the others would cost more
// than its sums. A channel's sums do not depend on its block: each is added
// row by row in the same order either way.
template <typename F>
void for_each_short_row_block(const ChannelView& v, int64_t channel_cost, const F& fn) {
  const int64_t block = short_row_block(v.channels, v.inner);
  const int64_t grain = grain_for(block * (v.count() + channel_cost));
  at::parallel_for(0, (v.channels + block - 1) / block, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      fn(i * block, std::min(block, v.channels - i * block));
    }
  });
}

// fn(b, row offset) for the rows of channels [c_begin, c_begin + channels)
// in samples [n_begin, n_end) of a contiguous (N, C, L) tensor, in memory
// order, with b the channel's index in the block.
template <typename F>
inline void for_each_block_row(int64_t n_begin, int64_t n_end, int64_t C, int64_t L,
                               int64_t c_begin, int64_t channels, const F& fn) {
  for (int64_t n = n_begin; n < n_end; ++n) {
    for (int64_t b = 0; b < channels; ++b) fn(b, (n * C + c_begin + b) * L);
  }
}

// fn(lane, i) for i in [0, length): element i goes to lane i % kLanes, so
// lane-indexed accumulators vectorize.
template <typename F>
inline void for_each_in_lanes(int64_t length, const F& fn) {
  int64_t i = 0;
  for (; i + kLanes <= length; i += kLanes) {
#pragma omp simd
    for (int k = 0; k < kLanes; ++k) fn(k, i + k);
  }
  for (int k = 0; i < length; ++i, ++k) fn(k, i);
}

// fn(c, begin, end) over flat element ranges of a contiguous (N, C, L) tensor,
// each range inside one (n, c) row; elementwise passes use it.
template <typename F>
void for_each_row_segment(const ChannelView& v, const F& fn) {
  const int64_t numel = v.outer * v.channels * v.inner;
  at::parallel_for(0, numel, kGrainElements, [&](int64_t begin, int64_t end) {
    while (begin < end) {
      const int64_t row = begin / v.inner;
      const int64_t stop = std::min(end, (row + 1) * v.inner);
      fn(row % v.channels, begin, stop);
      begin = stop;
    }
  });
}

// Channels-last loops may take rows kRowGroup at a time, so that per-channel
// values (coefficients, accumulators) are loaded and stored once per group
// instead of once per row. Grouping pays where those values no longer stay in
// L1 beside the rows (over kGroupedArrayBytes), in the statistics at every
// width (their per-row accumulator stores bound them) and in the backward
// reduction of short rows. Elsewhere the interleaved rows cost more than they
// save (measured on Zen 4, 1 thread, in-cache tensors: elementwise and
// backward reduce at 128-1024 channels 10-30% slower grouped; statistics
// 1.3-3.5x faster grouped at every width).
constexpr int kRowGroup = 4;
constexpr int64_t kGroupedArrayBytes = 12 * 1024;

// Whether an elementwise or backward-reduce loop reading `arrays`
// per-channel arrays of acc_t groups its rows.
template <typename acc_t>
inline bool group_rows(int64_t channels, int arrays) {
  return channels * arrays * static_cast<int64_t>(sizeof(acc_t)) > kGroupedArrayBytes;
}

// fn(first row, std::integral_constant<int, rows>) over [begin, end): groups
// of kRowGroup rows when `grouped`, then single rows.
template <typename F>
inline void for_each_row_group(int64_t begin, int64_t end, bool grouped, const F& fn) {
  int64_t r = begin;
  if (grouped) {
    for (; r + kRowGroup <= end; r += kRowGroup) fn(r, std::integral_constant<int, kRowGroup>{});
  }
  for (; r < end; ++r) fn(r, std::integral_constant<int, 1>{});
}

// A group of channels-last rows of this many bytes each or more is read as
// kRowGroup streams a row apart, which the hardware prefetchers do not
// follow well: the statistics prefetch ahead there. In-process A/B
// (benchmarks/ab_builds.py, moments, against no prefetch): float32
// 1.2-2.1x at 128-512 channels from 28x28 up and 1.15x at 1024x14x14,
// bfloat16 1.9x at 512x28x28; rows of 2 KiB and more that sit in cache
// 0.88-0.99x.
constexpr int64_t kPrefetchRowBytes = 512;
constexpr int64_t kPrefetchBytes = 4096;

// Prefetches [begin, end) shifted ahead by kPrefetchBytes or by its own
// length if longer (so as not to prefetch what is being read), short of `limit`.
template <typename T>
inline void prefetch_ahead(const T* begin, const T* end, const T* limit) {
  const int64_t distance = std::max<int64_t>(kPrefetchBytes, (end - begin) * sizeof(T));
  const char* ahead = reinterpret_cast<const char*>(begin) + distance;
  const char* stop = std::min(reinterpret_cast<const char*>(end) + distance,
                              reinterpret_cast<const char*>(limit));
  for (; ahead < stop; ahead += kCacheLineBytes) __builtin_prefetch(ahead);
}

// fn(first row, end row) over channels-last rows in parallel.
template <typename F>
void for_each_row_range(const ChannelView& v, const F& fn) {
  const int64_t grain = grain_for(v.channels);
  at::parallel_for(0, v.outer * v.inner, grain, fn);
}

// A float's bits and back.
inline uint32_t bits_of(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}
inline float float_of(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

// out[i] = value as T. For bfloat16 this rounds to nearest-even on the bits,
// which GCC vectorizes (it does not vectorize c10's conversion operator).
template <typename T, typename acc_t>
inline void store(T* out, int64_t i, acc_t value) {
  out[i] = static_cast<T>(value);
}

template <>
inline void store(c10::BFloat16* out, int64_t i, float value) {
  const uint32_t bits = bits_of(value);
  const uint16_t rounded = static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
  reinterpret_cast<uint16_t*>(out)[i] = value != value ? uint16_t{0x7FC0} : rounded;
}

// float16 as the CPU loops read and write it. c10::Half converts one element
// at a time (F16C's scalar vcvtph2ps), which GCC does not vectorize: the
// float16 kernels ran 3-8x slower than torch's. These conversions are
// branch-free bit arithmetic that GCC vectorizes (the method of c10's
// portable fp16_ieee_to_fp32_value / fp16_ieee_from_fp32_value: exact
// widening; narrowing rounds to nearest even, NaN to a quiet NaN).
struct Float16 {
  uint16_t bits;

  operator float() const {
    const uint32_t w = static_cast<uint32_t>(bits) << 16;
    const uint32_t two_w = w + w;  // exponent and mantissa, sign shifted out
    // Normal numbers, infinities, NaN: exponent rebased by 224, then scaled by 2^-112.
    const float normal = float_of((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    // Subnormals: the mantissa placed under 0.5's exponent, then 0.5 subtracted.
    const float subnormal = float_of((two_w >> 17) | (126u << 23)) - 0.5f;
    return float_of((w & 0x80000000u) | bits_of(two_w < (1u << 27) ? subnormal : normal));
  }

  static Float16 from_float(float value) {
    // Scaling up sends what overflows float16 to infinity, scaling down
    // brings the rest back; adding the exponent's bias below rounds the
    // mantissa to float16's, to nearest even.
    float base = (std::fabs(value) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = bits_of(value);
    const uint32_t two_w = w + w;
    const uint32_t bias = std::max(two_w & 0xFF000000u, 0x71000000u);
    base = float_of((bias >> 1) + 0x07800000u) + base;
    const uint32_t rounded = bits_of(base);
    const uint32_t magnitude = ((rounded >> 13) & 0x00007C00u) + (rounded & 0x00000FFFu);
    return {static_cast<uint16_t>(((w & 0x80000000u) >> 16) |
                                  (two_w > 0xFF000000u ? 0x7E00u : magnitude))};
  }
};
static_assert(sizeof(Float16) == sizeof(c10::Half) && alignof(Float16) == alignof(c10::Half) &&
              std::is_trivially_copyable_v<Float16>);

template <>
inline void store(Float16* out, int64_t i, float value) {
  out[i] = Float16::from_float(value);
}

// float16 vectors in registers, converted by F16C (one instruction per
// vector, where Float16's bit arithmetic takes about ten): with these the
// elementwise passes apply math.h's formulas to whole vectors (GCC's vector
// operators). ab_builds.py against the bit arithmetic, float16 at 4 shapes x
// 2 layouts: eval 2.5-4.1x, backward elementwise 2.0-4.0x, fwd+bwd 1.4-2.0x.
// (Staging through float32 buffers instead gained 1.3x.) The statistics and
// backward sums still convert with Float16.
#if defined(__AVX512F__)
#define NORMEXT_FLOAT16_VECTORS 1
using Float16Vector = __m512;
constexpr int kFloat16Lanes = 16;
inline __m512 load_float16(const Float16* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline void store_float16(Float16* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline __m512 splat(float v) { return _mm512_set1_ps(v); }
#elif defined(__F16C__) && defined(__AVX__)
#define NORMEXT_FLOAT16_VECTORS 1
using Float16Vector = __m256;
constexpr int kFloat16Lanes = 8;
inline __m256 load_float16(const Float16* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline void store_float16(Float16* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline __m256 splat(float v) { return _mm256_set1_ps(v); }
#endif

#if defined(NORMEXT_FLOAT16_VECTORS)
// The first n (<= kFloat16Lanes) values at p as a vector, the other lanes 0;
// and the first n lanes of v stored at p. Masked loads and stores where
// AVX-512 has them for 16-bit elements; else through a small array (a
// store-forwarding stall: NCHW 7x7 runs took 2x as long that way). Whole
// vectors take the plain loads and stores: masked ones with every lane set
// made channels-last rows 8-22% slower.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
inline __mmask16 first_lanes(int64_t n) { return static_cast<__mmask16>((1u << n) - 1); }
inline __m512 load_float16(const Float16* p, int64_t n) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(first_lanes(n), p));
}
inline void store_float16(Float16* p, __m512 v, int64_t n) {
  _mm256_mask_storeu_epi16(p, first_lanes(n),
                           _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline __m512 load_floats(const float* p, int64_t n) {
  if (n == kFloat16Lanes) return _mm512_loadu_ps(p);
  return _mm512_maskz_loadu_ps(first_lanes(n), p);
}
#else
inline Float16Vector load_float16(const Float16* p, int64_t n) {
  Float16 part[kFloat16Lanes] = {};
  std::memcpy(part, p, n * sizeof(Float16));
  return load_float16(part);
}
inline void store_float16(Float16* p, Float16Vector v, int64_t n) {
  Float16 part[kFloat16Lanes];
  store_float16(part, v);
  std::memcpy(p, part, n * sizeof(Float16));
}
inline Float16Vector load_floats(const float* p, int64_t n) {
  Float16Vector v{};
  if (n == kFloat16Lanes) {
    std::memcpy(&v, p, sizeof v);  // a plain load
  } else {
    std::memcpy(&v, p, n * sizeof(float));
  }
  return v;
}
#endif
#endif

// The element type the loops use for a dispatched scalar_t: Float16 for
// c10::Half, the type itself otherwise.
template <typename T>
struct LoopElement {
  using type = T;
};
template <>
struct LoopElement<c10::Half> {
  using type = Float16;
};
template <typename T>
using loop_t = typename LoopElement<T>::type;

// A tensor of dtype T's elements as loop_t<T>.
template <typename T>
const loop_t<T>* loop_data(const at::Tensor& t) {
  return reinterpret_cast<const loop_t<T>*>(t.const_data_ptr<T>());
}
template <typename T>
loop_t<T>* mutable_loop_data(at::Tensor& t) {
  return reinterpret_cast<loop_t<T>*>(t.mutable_data_ptr<T>());
}

// A per-channel tensor (any float dtype) as accumulate-type values; `fill`
// where it is undefined. Read in place unless it is strided: an ATen op per
// tensor costs about a microsecond, a good part of a small batch norm's call.
template <typename acc_t>
std::vector<acc_t> channel_values(const at::Tensor& t, int64_t channels, acc_t fill) {
  std::vector<acc_t> values(channels, fill);
  if (!t.defined()) return values;
  const at::Tensor dense = t.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "batch_norm", [&] {
    std::copy_n(dense.const_data_ptr<scalar_t>(), channels, values.begin());
  });
  return values;
}

// Writes accumulate-type values to a per-channel tensor of any float dtype.
template <typename acc_t>
void store_channel_values(c10::ArrayRef<acc_t> values, const at::Tensor& t) {
  const at::Tensor dense = t.is_contiguous() ? t : t.new_empty(t.sizes());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "batch_norm", [&] {
    std::copy(values.begin(), values.end(), dense.mutable_data_ptr<scalar_t>());
  });
  if (!dense.is_same(t)) t.copy_(dense);
}

}  // namespace cpu
}  // namespace normext::batch_norm::NORMEXT_CPU_CAPABILITY

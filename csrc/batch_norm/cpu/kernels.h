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
#include "common/cpu/reduce.h"

namespace normext::batch_norm::NORMEXT_CPU_CAPABILITY {

// The kernels compiled for this capability.
struct CpuKernels {
#include "batch_norm/kernel_api.h"
};

namespace cpu {

using namespace normext::cpu::NORMEXT_CPU_CAPABILITY;  // the reducer and its loop constants

// A channel view as the reducer's groups: channels-last data is (rows, C, 1).
inline GroupedShape groups_of(const ChannelView& v) {
  return v.channels_last ? GroupedShape{v.count(), v.channels, 1}
                         : GroupedShape{v.outer, v.channels, v.inner};
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
// save (benchmarks/history: the in-cache A/B of grouped rows).
constexpr int64_t kGroupedArrayBytes = 12 * 1024;

// Whether an elementwise or backward-reduce loop reading `arrays`
// per-channel arrays of acc_t groups its rows.
template <typename acc_t>
inline bool group_rows(int64_t channels, int arrays) {
  return channels * arrays * static_cast<int64_t>(sizeof(acc_t)) > kGroupedArrayBytes;
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
// at a time (F16C's scalar vcvtph2ps), which GCC does not vectorize. These conversions are
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
// operators); an A/B against the bit arithmetic and against staging through
// float32 buffers chose them. The statistics and backward sums still convert
// with Float16.
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
// AVX-512 has them for 16-bit elements, whose small-array alternative stalls
// on store forwarding; else through a small array. Whole vectors take the
// plain loads and stores, which are faster than masked ones with every lane set.
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

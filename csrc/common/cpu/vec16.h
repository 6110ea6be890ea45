// 16-bit floats on the CPU: float16 conversions that vectorize (Float16), and
// float16 and bfloat16 vectors in registers where the CPU converts whole
// vectors (AVX2 with F16C, AVX-512). Shared by every norm's CPU kernels;
// compiled per capability (capability.h).
#pragma once

#include "common/cpu/capability.h"
#include "common/cpu/dispatch.h"  // converts_bfloat16

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <ATen/cpu/vec/vec.h>  // at::vec's bfloat16 conversions
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace normext::cpu::NORMEXT_CPU_CAPABILITY {

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

// Vectors of float lanes that float16 and bfloat16 load into and store from:
// the elementwise passes apply math.h's formulas to whole vectors (GCC's
// vector operators), and the reductions widen through them (widen). float16
// converts with F16C (one instruction per vector where Float16's bit
// arithmetic takes about ten; an A/B against it and against staging through
// float32 buffers chose it), bfloat16 with at::vec's conversions.
// benchmarks/conversions_ab.py: F16C is as fast as at::vec's float16
// conversion or faster; bfloat16's scalar loops lost to at::vec's in the
// elementwise passes and on AVX-512 in the reductions; on an AVX2 CPU the
// norms' bfloat16 passes through vectors gained too (A/B, benchmarks/history,
// session 35).
// (at::vec's conversions exist where setup.py names the capability to ATen:
// CPU_CAPABILITY_AVX2 or _AVX512.)
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define NORMEXT_VECTORS16 1
using FloatVector = __m512;
using Bits16 = __m256i;  // the 16-bit elements of one vector
constexpr int kVectorLanes = 16;
inline __m512 splat(float v) { return _mm512_set1_ps(v); }
// Lane by lane a > b ? a : b and a < b ? a : b (b where either is NaN).
inline __m512 max_lanes(__m512 a, __m512 b) { return _mm512_max_ps(a, b); }
inline __m512 min_lanes(__m512 a, __m512 b) { return _mm512_min_ps(a, b); }
// Lane by lane a > b ? then : otherwise (otherwise where either is NaN).
inline __m512 select_greater(__m512 a, __m512 b, __m512 then, __m512 otherwise) {
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_GT_OQ), otherwise, then);
}
inline __m512 from_bits(__m256i bits, Float16) { return _mm512_cvtph_ps(bits); }
template <class How>
inline __m256i to_bits(__m512 v, Float16, How) {
  return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
inline __m512 from_bits(__m256i bits, c10::BFloat16) {
  __m512 v;
  at::vec::cvtbf16_fp32(bits, v);
  return v;
}
// AVX512_BF16's vcvtneps2bf16 where the CPU has it (dispatch.h:
// converts_bfloat16) rounds as torch does except NaN (it keeps the payload)
// and subnormals (it flushes them to zero): vectors holding either take
// at::vec's conversion. Inline assembly, so that no other code of this
// variant needs AVX512_BF16.
constexpr int kNanOrSubnormal = 0x01 | 0x20 | 0x80;  // vfpclassps: qNaN, subnormal, sNaN
inline __m256i bf16_instruction(__m512 v) {
  __m256i bits;
  asm("vcvtneps2bf16 %1, %0" : "=v"(bits) : "v"(v));
  return bits;
}
template <bool kBf16Instruction>
inline __m256i to_bits(__m512 v, c10::BFloat16, std::bool_constant<kBf16Instruction>) {
  if (kBf16Instruction && _mm512_fpclass_ps_mask(v, kNanOrSubnormal) == 0) {
    return bf16_instruction(v);
  }
  return at::vec::cvtfp32_bf16(v);
}
inline __m256i load_bits(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
inline void store_bits(void* p, __m256i bits) { _mm256_storeu_si256(static_cast<__m256i*>(p), bits); }
#elif (defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)) && defined(__F16C__) && \
    defined(__AVX2__)
#define NORMEXT_VECTORS16 1
using FloatVector = __m256;
using Bits16 = __m128i;
constexpr int kVectorLanes = 8;
inline __m256 splat(float v) { return _mm256_set1_ps(v); }
// Lane by lane a > b ? a : b and a < b ? a : b (b where either is NaN).
inline __m256 max_lanes(__m256 a, __m256 b) { return _mm256_max_ps(a, b); }
inline __m256 min_lanes(__m256 a, __m256 b) { return _mm256_min_ps(a, b); }
// Lane by lane a > b ? then : otherwise (otherwise where either is NaN).
inline __m256 select_greater(__m256 a, __m256 b, __m256 then, __m256 otherwise) {
  return _mm256_blendv_ps(otherwise, then, _mm256_cmp_ps(a, b, _CMP_GT_OQ));
}
inline __m256 from_bits(__m128i bits, Float16) { return _mm256_cvtph_ps(bits); }
template <class How>
inline __m128i to_bits(__m256 v, Float16, How) {
  return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
inline __m256 from_bits(__m128i bits, c10::BFloat16) {
  __m256 v;
  at::vec::cvtbf16_fp32(bits, v);
  return v;
}
template <class How>
inline __m128i to_bits(__m256 v, c10::BFloat16, How) {
  return at::vec::cvtfp32_bf16(v);
}
inline __m128i load_bits(const void* p) { return _mm_loadu_si128(static_cast<const __m128i*>(p)); }
inline void store_bits(void* p, __m128i bits) { _mm_storeu_si128(static_cast<__m128i*>(p), bits); }
#endif

// The 16-bit element types that load into FloatVector.
template <typename T>
constexpr bool kVectorElement = false;

#if defined(NORMEXT_VECTORS16)
template <>
constexpr bool kVectorElement<Float16> = true;
template <>
constexpr bool kVectorElement<c10::BFloat16> = true;

template <typename T>
inline FloatVector load_vector(const T* p) {
  return from_bits(load_bits(p), T{});
}
template <typename T, class How>
inline void store_vector(T* p, FloatVector v, How how) {
  store_bits(p, to_bits(v, T{}, how));
}
// float (a dz buffer) as loops over either read it.
inline FloatVector load_vector(const float* p) {
  FloatVector v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// v0 stored at p0 and v1 at p1: bfloat16 through AVX512_BF16 tests both for
// NaN and subnormal lanes with one branch (a branch per vector bound the
// 16-bit elementwise loops: benchmarks/history, session 29).
template <typename T, class How>
C10_ALWAYS_INLINE void store_vector_pair(T* p0, FloatVector v0, T* p1, FloatVector v1, How how) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, c10::BFloat16> && How::value) {
    if ((_mm512_fpclass_ps_mask(v0, kNanOrSubnormal) |
         _mm512_fpclass_ps_mask(v1, kNanOrSubnormal)) == 0) {
      store_bits(p0, bf16_instruction(v0));
      store_bits(p1, bf16_instruction(v1));
    } else {
      store_bits(p0, at::vec::cvtfp32_bf16(v0));
      store_bits(p1, at::vec::cvtfp32_bf16(v1));
    }
    return;
  }
#endif
  store_vector(p0, v0, how);
  store_vector(p1, v1, how);
}

// The first n (<= kVectorLanes) values at p as a vector, the other lanes 0;
// and the first n lanes of v stored at p. Masked loads and stores where
// AVX-512 has them for 16-bit elements, whose small-array alternative stalls
// on store forwarding; else through a small array. Whole vectors take the
// plain loads and stores, which are faster than masked ones with every lane set.
#if defined(CPU_CAPABILITY_AVX512)
inline __mmask16 first_lanes(int64_t n) { return static_cast<__mmask16>((1u << n) - 1); }
template <typename T>
inline __m512 load_vector(const T* p, int64_t n) {
  return from_bits(_mm256_maskz_loadu_epi16(first_lanes(n), p), T{});
}
template <typename T, class How>
inline void store_vector(T* p, __m512 v, int64_t n, How how) {
  _mm256_mask_storeu_epi16(p, first_lanes(n), to_bits(v, T{}, how));
}
inline __m512 load_floats(const float* p, int64_t n) {
  if (n == kVectorLanes) return _mm512_loadu_ps(p);
  return _mm512_maskz_loadu_ps(first_lanes(n), p);
}
inline void store_floats(float* p, __m512 v, int64_t n) {
  if (n == kVectorLanes) return _mm512_storeu_ps(p, v);
  _mm512_mask_storeu_ps(p, first_lanes(n), v);
}
#else
template <typename T>
inline FloatVector load_vector(const T* p, int64_t n) {
  T part[kVectorLanes] = {};
  std::memcpy(part, p, n * sizeof(T));
  return load_vector(part);
}
template <typename T, class How>
inline void store_vector(T* p, FloatVector v, int64_t n, How how) {
  T part[kVectorLanes];
  store_vector(part, v, how);
  std::memcpy(p, part, n * sizeof(T));
}
inline FloatVector load_floats(const float* p, int64_t n) {
  FloatVector v{};
  if (n == kVectorLanes) {
    std::memcpy(&v, p, sizeof v);  // a plain load
  } else {
    std::memcpy(&v, p, n * sizeof(float));
  }
  return v;
}
inline void store_floats(float* p, FloatVector v, int64_t n) {
  if (n == kVectorLanes) {
    std::memcpy(p, &v, sizeof v);  // a plain store, not a call to memcpy
  } else {
    std::memcpy(p, &v, n * sizeof(float));
  }
}
#endif
#endif

// Whether T's elements widen to float faster a whole vector at a time than one
// by one (the reductions then widen them with `widen`): float16 wherever the
// CPU converts vectors (GCC does not vectorize a scalar conversion; Float16's
// bit arithmetic is several times slower); bfloat16 too, whose scalar loops
// GCC vectorizes, but which gained through whole vectors on AVX-512
// (benchmarks/conversions_ab.py) and AVX2 (A/B, benchmarks/history, session
// 35), except in the layer norm's backward (layer_norm/cpu/backward.cpp:
// kRowsAsVectors).
template <typename T>
constexpr bool kWidensAsVector = false;

#if defined(NORMEXT_VECTORS16)
template <>
constexpr bool kWidensAsVector<Float16> = true;
template <>
constexpr bool kWidensAsVector<c10::BFloat16> = true;
#endif

#if defined(NORMEXT_VECTORS16)
inline FloatVector load_vector(const float* p, int64_t n) { return load_floats(p, n); }

// A whole vector's count of lanes as a type, for loops written once for whole
// and partial vectors: loads given it are plain loads.
using WholeVector = std::integral_constant<int64_t, kVectorLanes>;
template <typename T>
inline FloatVector load_vector(const T* p, WholeVector) {
  return load_vector(p);
}
inline FloatVector load_floats(const float* p, WholeVector) { return load_vector(p); }
#endif

// Whether T's elementwise passes go through whole vectors (load_vector,
// store_vector): the types of kWidensAsVector, whose narrowing is then one
// instruction (F16C; AVX512_BF16 where the CPU has it) or at::vec's.
template <typename T>
constexpr bool kNarrowsAsVector = kWidensAsVector<T>;

#if defined(NORMEXT_VECTORS16)
// fn(how), how = std::bool_constant<whether bfloat16 takes AVX512_BF16's
// instruction> (to_bits): the CPU is tested once per loop, not per vector.
template <typename T, typename F>
[[gnu::always_inline]] inline void with_narrowing(const F& fn) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (converts_bfloat16) return fn(std::true_type{});
  }
#endif
  fn(std::false_type{});
}
#endif

// N consecutive values as floats: whole vectors where T loads into them (N a
// multiple of kVectorLanes), else one by one.
template <int N, typename T>
inline void widen(const T* p, float (&out)[N]) {
#if defined(NORMEXT_VECTORS16)
  if constexpr (kVectorElement<T>) {
    static_assert(N % kVectorLanes == 0);
    for (int i = 0; i < N; i += kVectorLanes) {
      const FloatVector v = load_vector(p + i);
      std::memcpy(out + i, &v, sizeof v);
    }
    return;
  }
#endif
  for (int i = 0; i < N; ++i) out[i] = static_cast<float>(p[i]);
}

}  // namespace normext::cpu::NORMEXT_CPU_CAPABILITY

// float16 on the CPU: conversions that vectorize, and float16 vectors in
// registers where the CPU converts whole vectors (F16C, AVX-512). Shared by
// every norm's CPU kernels; compiled per capability (capability.h).
#pragma once

#include "common/cpu/capability.h"

#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

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

// float16 vectors in registers, converted by F16C (one instruction per
// vector, where Float16's bit arithmetic takes about ten): with these the
// elementwise passes apply math.h's formulas to whole vectors (GCC's vector
// operators); an A/B against the bit arithmetic and against staging through
// float32 buffers chose them; the reductions widen through them too (widen).
// (ATen's at::vec converts the same way; benchmarks/conversions_ab.py: these
// loops are as fast or faster.)
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

// Whether T's elements widen to float faster a whole vector at a time than one
// by one: float16 where the CPU converts vectors (F16C), which GCC does not
// vectorize from scalar code (Float16's bit arithmetic is several times slower).
template <typename T>
constexpr bool kWidensAsVector = false;

#if defined(NORMEXT_FLOAT16_VECTORS)
template <>
constexpr bool kWidensAsVector<Float16> = true;

// N consecutive float16 values (N a multiple of kFloat16Lanes) as floats.
template <int N>
inline void widen(const Float16* p, float (&out)[N]) {
  static_assert(N % kFloat16Lanes == 0);
  for (int i = 0; i < N; i += kFloat16Lanes) {
    const Float16Vector v = load_float16(p + i);
    std::memcpy(out + i, &v, sizeof v);
  }
}
#endif

}  // namespace normext::cpu::NORMEXT_CPU_CAPABILITY

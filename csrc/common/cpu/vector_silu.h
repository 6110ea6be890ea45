// SiLU after a norm's affine on AVX-512, written with intrinsics: y =
// silu((x - mean) * scale + bias) and its input gradient dy * silu'(z)
// (GroupNorm's; a fused batch norm's forward). Its exp through scalef needs
// no exponent bits and no selects, fewer instructions than GCC makes of
// activation.h's formulas, which bound these loops (the A/B in one process:
// benchmarks/RESULTS.md). Other CPUs run activation.h's SiluFn in the
// loops. Compiled per capability (capability.h).
#pragma once

#include "common/cpu/capability.h"
#include "common/cpu/vec16.h"

#if defined(CPU_CAPABILITY_AVX512) && defined(NORMEXT_VECTORS16)
#define NORMEXT_VECTOR_SILU 1

#include <immintrin.h>

#include <cstdint>
#include <type_traits>

#include "common/activation.h"

namespace normext::cpu::NORMEXT_CPU_CAPABILITY {
namespace vector_silu {

namespace exp_constants = normext::NORMEXT_CPU_CAPABILITY;

// exp(x) = 2^n (1 + q), n = round(x / ln 2), q of r = x - n ln 2 as in
// activation.h's exp_parts; scalef applies 2^n with overflow to infinity
// and gradual underflow. The clamp keeps r finite at x = +-inf (exp is 0 in
// float below -104, infinite above 89); max and min return a NaN x.
inline __m512 exp(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(89.0f), _mm512_max_ps(_mm512_set1_ps(-104.0f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(exp_constants::kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(exp_constants::kLn2High), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(exp_constants::kLn2Low), r);
  __m512 p = _mm512_set1_ps(exp_constants::kExpPolynomial[0]);
  for (int k = 1; k < exp_constants::kExpPolynomialTerms; ++k) {
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(exp_constants::kExpPolynomial[k]));
  }
  const __m512 q = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r);
  return _mm512_scalef_ps(_mm512_add_ps(q, _mm512_set1_ps(1.0f)), n);
}

// The first n (<= 16) elements at p as floats (16-bit types converted, vec16.h),
// and v's first n lanes stored at p: plain loads and stores for whole vectors.
template <typename T>
inline __m512 load(const T* p, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return load_floats(p, n);
  } else {
    return n == kVectorLanes ? load_vector(p) : load_vector(p, n);
  }
}
inline void store(float* p, __m512 v, int64_t n) {
  if (n == kVectorLanes) {
    _mm512_storeu_ps(p, v);
  } else {
    _mm512_mask_storeu_ps(p, first_lanes(n), v);
  }
}

// A parameter's lanes at element i: a run's scalar, or a row's per-channel values.
inline __m512 lanes(float value, int64_t, int64_t) { return _mm512_set1_ps(value); }
inline __m512 lanes(const float* values, int64_t i, int64_t n) { return load(values + i, n); }

// fn(i, n) over [0, length) in vectors of n = 16 floats, the last one partial.
template <typename F>
inline void for_each_vector(int64_t length, const F& fn) {
  int64_t i = 0;
  for (; i + kVectorLanes <= length; i += kVectorLanes) fn(i, kVectorLanes);
  if (i < length) fn(i, length - i);
}

// z = (x - mean) * scale + bias (math.h's normalize).
template <typename T, typename P>
inline __m512 affine(const T* x, int64_t i, int64_t n, P mean, P scale, P bias) {
  const __m512 xmu = _mm512_sub_ps(load(x + i, n), lanes(mean, i, n));
  return _mm512_fmadd_ps(xmu, lanes(scale, i, n), lanes(bias, i, n));
}

}  // namespace vector_silu

// y = silu(z) = z / (1 + exp(-z)), torch's formula (-0 where exp(-z)
// overflows, NaN at z = -inf), for z = (x - mean) * scale + bias (+ the
// residual r, where given: a fused batch norm's); P is float (a run's
// values) or const float* (per element, a channels-last row). 16-bit data
// go through float tiles (loops.h: for_each_tile), which were faster than
// converting in this loop (A/B, benchmarks/RESULTS.md).
template <typename P>
inline void silu_affine(const float* __restrict__ x, const float* __restrict__ r,
                        float* __restrict__ y, int64_t length, P mean, P scale, P bias) {
  vector_silu::for_each_vector(length, [&](int64_t i, int64_t n) {
    __m512 z = vector_silu::affine(x, i, n, mean, scale, bias);
    if (r) z = _mm512_add_ps(z, vector_silu::load(r + i, n));
    const __m512 e = vector_silu::exp(_mm512_sub_ps(_mm512_setzero_ps(), z));
    vector_silu::store(y + i, _mm512_div_ps(z, _mm512_add_ps(_mm512_set1_ps(1.0f), e)), n);
  });
}
template <typename P>
inline void silu_affine(const float* __restrict__ x, float* __restrict__ y, int64_t length,
                        P mean, P scale, P bias) {
  silu_affine(x, static_cast<const float*>(nullptr), y, length, mean, scale, bias);
}

// dz = dy * silu'(z), silu'(z) = s (1 + z (1 - s)) with s = 1 / (1 + exp(-z)),
// torch's formula, for z as above; dy and x float or 16-bit, converted here.
template <typename T, typename P>
inline void silu_affine_grad(const T* __restrict__ dy, const T* __restrict__ x,
                             float* __restrict__ dz, int64_t length, P mean, P scale, P bias) {
  vector_silu::for_each_vector(length, [&](int64_t i, int64_t n) {
    const __m512 one = _mm512_set1_ps(1.0f);
    const __m512 z = vector_silu::affine(x, i, n, mean, scale, bias);
    const __m512 e = vector_silu::exp(_mm512_sub_ps(_mm512_setzero_ps(), z));
    const __m512 s = _mm512_div_ps(one, _mm512_add_ps(one, e));
    const __m512 grad = _mm512_mul_ps(s, _mm512_fmadd_ps(z, _mm512_sub_ps(one, s), one));
    vector_silu::store(dz + i, _mm512_mul_ps(vector_silu::load(dy + i, n), grad), n);
  });
}

}  // namespace normext::cpu::NORMEXT_CPU_CAPABILITY
#endif

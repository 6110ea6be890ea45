// What every norm's CPU loops share: 16-bit element types as the loops read
// them, stores that round as torch does, and per-channel parameter vectors
// of any float dtype. Compiled per capability (capability.h).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <c10/util/ArrayRef.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/cpu/capability.h"
#include "common/cpu/vec16.h"

namespace normext::cpu::NORMEXT_CPU_CAPABILITY {

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

template <>
inline void store(Float16* out, int64_t i, float value) {
  out[i] = Float16::from_float(value);
}

// float16 loops through an activation or a gradient widen their inputs into
// float tiles of this many elements and run the float32 loops on them
// (for_each_tile below; batch_norm/cpu/elementwise.cpp).
constexpr int64_t kStageElements = 512;

// out[0, n) = p[0, n) as floats, and p[0, n) = in[0, n) rounded as torch
// does: whole vectors where the CPU converts them (vec16.h), else one by one.
template <typename T>
inline void widen_n(const T* __restrict__ p, float* __restrict__ out, int64_t n) {
#if defined(NORMEXT_VECTORS16)
  int64_t i = 0;
  for (; i + kVectorLanes <= n; i += kVectorLanes) {
    const FloatVector v = load_vector(p + i);
    std::memcpy(out + i, &v, sizeof v);
  }
  if (i < n) {
    const FloatVector v = load_vector(p + i, n - i);
    std::memcpy(out + i, &v, (n - i) * sizeof(float));
  }
#else
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) out[k] = static_cast<float>(p[k]);
#endif
}
template <typename T>
inline void narrow_n(const float* __restrict__ in, T* __restrict__ p, int64_t n) {
#if defined(NORMEXT_VECTORS16)
  with_narrowing<T>([&](auto how) {
    int64_t i = 0;
    for (; i + kVectorLanes <= n; i += kVectorLanes) {
      FloatVector v;
      std::memcpy(&v, in + i, sizeof v);
      store_vector(p + i, v, how);
    }
    if (i < n) store_vector(p + i, load_floats(in + i, n - i), n - i, how);
  });
#else
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) store(p, k, in[k]);
#endif
}

// fn(in, out, offset, n) over [0, length) in float tiles: in holds
// x[offset, offset + n) widened, and what fn writes to out is narrowed into
// y[offset, offset + n). float16 takes it where its per-element conversions
// would bound a loop (an activation's, a gradient's).
template <typename T, typename F>
inline void for_each_tile(const T* x, T* y, int64_t length, const F& fn) {
  float in[kStageElements], out[kStageElements];
  for (int64_t i = 0; i < length; i += kStageElements) {
    const int64_t n = std::min(kStageElements, length - i);
    widen_n(x + i, in, n);
    fn(static_cast<const float*>(in), out, i, n);
    narrow_n(out, y + i, n);
  }
}

// fn(a_tile, b_tile, offset, n) over [0, length) in float tiles of two
// inputs, a[offset, offset + n) and b[offset, offset + n) widened.
template <typename T, typename F>
inline void for_each_tile_pair(const T* a, const T* b, int64_t length, const F& fn) {
  float a_tile[kStageElements], b_tile[kStageElements];
  for (int64_t i = 0; i < length; i += kStageElements) {
    const int64_t n = std::min(kStageElements, length - i);
    widen_n(a + i, a_tile, n);
    widen_n(b + i, b_tile, n);
    fn(static_cast<const float*>(a_tile), static_cast<const float*>(b_tile), i, n);
  }
}

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

// loop_data, or null for an undefined tensor (an absent residual).
template <typename T>
const loop_t<T>* loop_data_or_null(const at::Tensor& t) {
  return t.defined() ? loop_data<T>(t) : nullptr;
}

// A per-channel (or per-feature) tensor (any float dtype) as accumulate-type values; `fill`
// where it is undefined. Read in place unless it is strided: an ATen op per
// tensor costs about a microsecond, a good part of a small norm's call.
template <typename acc_t>
std::vector<acc_t> channel_values(const at::Tensor& t, int64_t channels, acc_t fill) {
  std::vector<acc_t> values(channels, fill);
  if (!t.defined()) return values;
  const at::Tensor dense = t.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "normext", [&] {
    std::copy_n(dense.const_data_ptr<scalar_t>(), channels, values.begin());
  });
  return values;
}

// Writes accumulate-type values to a per-channel tensor of any float dtype.
template <typename acc_t>
void store_channel_values(c10::ArrayRef<acc_t> values, const at::Tensor& t) {
  const at::Tensor dense = t.is_contiguous() ? t : t.new_empty(t.sizes());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "normext", [&] {
    std::copy(values.begin(), values.end(), dense.mutable_data_ptr<scalar_t>());
  });
  if (!dense.is_same(t)) t.copy_(dense);
}

}  // namespace normext::cpu::NORMEXT_CPU_CAPABILITY

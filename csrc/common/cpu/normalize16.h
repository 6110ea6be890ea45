// float16 and bfloat16 normalized through whole vectors in registers
// (cpu::load_vector), math.h's formula on them and a partial vector for a
// tail, where the CPU converts whole vectors (vec16.h): a run's coefficients
// splatted once; rows load a vector of channels' coefficients once for all
// Rows rows. Batch norm's plain passes and group norm's float16 output take them.
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/cpu/vec16.h"
#include "common/math.h"

namespace normext::cpu::NORMEXT_CPU_CAPABILITY {

#if defined(NORMEXT_VECTORS16)
// The coefficients are float (the 16-bit types' accumulate type).
static_assert(std::is_same_v<at::opmath_type<c10::Half>, float> &&
              std::is_same_v<at::opmath_type<c10::BFloat16>, float>);

// y = (x - mean) * scale + bias over a run of one channel's (or group's) values.
template <typename T>
void plain_normalize_run(const T* x, T* y, int64_t length, float mean, float scale,
                         float bias) {
  using math::NORMEXT_CPU_CAPABILITY::normalize;
  const FloatVector m = splat(mean), s = splat(scale), b = splat(bias);
  int64_t i = 0;
  for (; i + kVectorLanes <= length; i += kVectorLanes) {
    store_vector(y + i, normalize(load_vector(x + i), m, s, b));
  }
  if (const int64_t n = length - i) {
    store_vector(y + i, normalize(load_vector(x + i, n), m, s, b), n);
  }
}

// The same over Rows consecutive rows of `channels` values, per-channel coefficients.
template <int Rows, typename T>
void plain_normalize_rows(const T* x, T* y, int64_t channels, const float* mean,
                          const float* scale, const float* bias) {
  using math::NORMEXT_CPU_CAPABILITY::normalize;
  for (int64_t c = 0; c < channels; c += kVectorLanes) {
    const int64_t n = std::min<int64_t>(kVectorLanes, channels - c);
    const bool whole = n == kVectorLanes;
    const FloatVector m = load_floats(mean + c, n), s = load_floats(scale + c, n),
                      b = load_floats(bias + c, n);
    for (int k = 0; k < Rows; ++k) {
      const int64_t i = k * channels + c;
      if (whole) {
        store_vector(y + i, normalize(load_vector(x + i), m, s, b));
      } else {
        store_vector(y + i, normalize(load_vector(x + i, n), m, s, b), n);
      }
    }
  }
}
#endif

}  // namespace normext::cpu::NORMEXT_CPU_CAPABILITY

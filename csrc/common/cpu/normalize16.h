// float16 and bfloat16 normalized through whole vectors in registers
// (cpu::load_vector), math.h's formula on them and a partial vector for a
// tail, where the CPU converts whole vectors (vec16.h): a run's coefficients
// splatted once; rows load a vector of channels' coefficients once for all
// Rows rows. Batch norm's plain passes and its fused forward but SiLU's, the
// layer norm's 16-bit passes and the group norm's output without an
// activation and its input gradient take them.
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/activation.h"
#include "common/cpu/vec16.h"
#include "common/math.h"

namespace normext::cpu::NORMEXT_CPU_CAPABILITY {

#if defined(NORMEXT_VECTORS16)
// The coefficients are float (the 16-bit types' accumulate type).
static_assert(std::is_same_v<at::opmath_type<c10::Half>, float> &&
              std::is_same_v<at::opmath_type<c10::BFloat16>, float>);

// act(z) lane by lane: the activation's scalar formula, which GCC vectorizes
// over the lanes in registers.
template <class Act>
C10_ALWAYS_INLINE FloatVector activate(const Act act, FloatVector z) {
  if constexpr (Act::kKind == normext::Activation::kIdentity) {
    return z;
  } else {
    float lanes[kVectorLanes];
    std::memcpy(lanes, &z, sizeof z);
#pragma omp simd
    for (int k = 0; k < kVectorLanes; ++k) lanes[k] = act(lanes[k]);
    std::memcpy(&z, lanes, sizeof z);
    return z;
  }
}

// y = act((x - mean) * scale + bias + r) over a run of one channel's (or
// group's) values; r (kResidual) of x's type.
template <bool kResidual, class Act, typename T>
void normalize_run_vectors(const Act act, const T* x, const T* r, T* y, int64_t length,
                           float mean, float scale, float bias) {
  with_narrowing<T>([&](auto how) {
    using math::NORMEXT_CPU_CAPABILITY::normalize;
    const FloatVector m = splat(mean), s = splat(scale), b = splat(bias);
    int64_t i = 0;
    for (; i + kVectorLanes <= length; i += kVectorLanes) {
      FloatVector z = normalize(load_vector(x + i), m, s, b);
      if constexpr (kResidual) z += load_vector(r + i);
      store_vector(y + i, activate(act, z), how);
    }
    if (const int64_t n = length - i) {
      FloatVector z = normalize(load_vector(x + i, n), m, s, b);
      if constexpr (kResidual) z += load_vector(r + i, n);
      store_vector(y + i, activate(act, z), n, how);
    }
  });
}

// y = (x - mean) * scale + bias over a run of one channel's (or group's) values.
template <typename T>
void plain_normalize_run(const T* x, T* y, int64_t length, float mean, float scale,
                         float bias) {
  using normext::NORMEXT_CPU_CAPABILITY::IdentityFn;
  normalize_run_vectors<false>(IdentityFn<float>{}, x, static_cast<const T*>(nullptr), y, length,
                               mean, scale, bias);
}

// y = (x - mean) * (rstd * weight[i]) + bias[i] over a row of features (a
// layer norm's affine, the scale's product as its scalar loop forms it).
template <typename T>
void plain_normalize_features(const T* x, T* y, int64_t length, float mean, float rstd,
                              const float* weight, const float* bias) {
  with_narrowing<T>([&](auto how) {
    using math::NORMEXT_CPU_CAPABILITY::normalize;
    const FloatVector m = splat(mean), r = splat(rstd);
    int64_t i = 0;
    for (; i + kVectorLanes <= length; i += kVectorLanes) {
      const FloatVector s = r * load_floats(weight + i, kVectorLanes);
      const FloatVector b = load_floats(bias + i, kVectorLanes);
      store_vector(y + i, normalize(load_vector(x + i), m, s, b), how);
    }
    if (const int64_t n = length - i) {
      const FloatVector s = r * load_floats(weight + i, n);
      store_vector(y + i, normalize(load_vector(x + i, n), m, s, load_floats(bias + i, n)), n, how);
    }
  });
}

// sum = a + b, rounded to T.
template <typename T>
void plain_add(const T* a, const T* b, T* sum, int64_t length) {
  with_narrowing<T>([&](auto how) {
    int64_t i = 0;
    for (; i + kVectorLanes <= length; i += kVectorLanes) {
      store_vector(sum + i, load_vector(a + i) + load_vector(b + i), how);
    }
    if (const int64_t n = length - i) {
      store_vector(sum + i, load_vector(a + i, n) + load_vector(b + i, n), n, how);
    }
  });
}

// normalize_run_vectors over Rows consecutive rows of `channels` values,
// per-channel coefficients.
template <int Rows, bool kResidual, class Act, typename T>
void normalize_rows_vectors(const Act act, const T* x, const T* r, T* y, int64_t channels,
                            const float* mean, const float* scale, const float* bias) {
  with_narrowing<T>([&](auto how) {
    using math::NORMEXT_CPU_CAPABILITY::normalize;
    for (int64_t c = 0; c < channels; c += kVectorLanes) {
      const int64_t n = std::min<int64_t>(kVectorLanes, channels - c);
      const bool whole = n == kVectorLanes;
      const FloatVector m = load_floats(mean + c, n), s = load_floats(scale + c, n),
                        b = load_floats(bias + c, n);
      for (int k = 0; k < Rows; ++k) {
        const int64_t i = k * channels + c;
        if (whole) {
          FloatVector z = normalize(load_vector(x + i), m, s, b);
          if constexpr (kResidual) z += load_vector(r + i);
          store_vector(y + i, activate(act, z), how);
        } else {
          FloatVector z = normalize(load_vector(x + i, n), m, s, b);
          if constexpr (kResidual) z += load_vector(r + i, n);
          store_vector(y + i, activate(act, z), n, how);
        }
      }
    }
  });
}

template <int Rows, typename T>
void plain_normalize_rows(const T* x, T* y, int64_t channels, const float* mean,
                          const float* scale, const float* bias) {
  using normext::NORMEXT_CPU_CAPABILITY::IdentityFn;
  normalize_rows_vectors<Rows, false>(IdentityFn<float>{}, x, static_cast<const T*>(nullptr), y,
                                      channels, mean, scale, bias);
}

// dx = dy * dy_scale + (x - mean) * xmu_scale + shift over a run of one
// channel's (or group's) values; dy of x's type or float (a dz buffer).
template <typename TDy, typename T, typename acc_t>
void plain_grad_input_run(const TDy* dy, const T* x, T* dx, int64_t length, acc_t mean,
                          const math::NORMEXT_CPU_CAPABILITY::GradInputCoefficients<acc_t> k) {
  with_narrowing<T>([&](auto how) {
    using math::NORMEXT_CPU_CAPABILITY::grad_input;
    const FloatVector m = splat(mean);
    const math::NORMEXT_CPU_CAPABILITY::GradInputCoefficients<FloatVector> kv{
        splat(k.dy_scale), splat(k.xmu_scale), splat(k.shift)};
    int64_t i = 0;
    for (; i + kVectorLanes <= length; i += kVectorLanes) {
      store_vector(dx + i, grad_input(load_vector(dy + i), load_vector(x + i), m, kv), how);
    }
    if (const int64_t n = length - i) {
      const FloatVector dyv = load_vector(dy + i, n), xv = load_vector(x + i, n);
      store_vector(dx + i, grad_input(dyv, xv, m, kv), n, how);
    }
  });
}

// The same over Rows consecutive rows of `channels` values, per-channel coefficients.
template <int Rows, typename TDy, typename T>
void plain_grad_input_rows(const TDy* dy, const T* x, T* dx, int64_t channels,
                           const float* mean, const float* dy_scale, const float* xmu_scale,
                           const float* shift) {
  with_narrowing<T>([&](auto how) {
    using math::NORMEXT_CPU_CAPABILITY::grad_input;
    for (int64_t c = 0; c < channels; c += kVectorLanes) {
      const int64_t n = std::min<int64_t>(kVectorLanes, channels - c);
      const bool whole = n == kVectorLanes;
      const FloatVector m = load_floats(mean + c, n);
      const math::NORMEXT_CPU_CAPABILITY::GradInputCoefficients<FloatVector> kv{
          load_floats(dy_scale + c, n), load_floats(xmu_scale + c, n), load_floats(shift + c, n)};
      for (int row = 0; row < Rows; ++row) {
        const int64_t i = row * channels + c;
        if (whole) {
          store_vector(dx + i, grad_input(load_vector(dy + i), load_vector(x + i), m, kv), how);
        } else {
          const FloatVector dyv = load_vector(dy + i, n), xv = load_vector(x + i, n);
          store_vector(dx + i, grad_input(dyv, xv, m, kv), n, how);
        }
      }
    }
  });
}
#endif

}  // namespace normext::cpu::NORMEXT_CPU_CAPABILITY

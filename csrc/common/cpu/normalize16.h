// float16 and bfloat16 normalized through whole vectors in registers
// (cpu::load_vector), math.h's formula on them and a partial vector for a
// tail, where the CPU converts whole vectors (vec16.h): a run's coefficients
// splatted once; rows load a vector of channels' coefficients once for all
// Rows rows. Batch norm's plain passes, its fused forward but SiLU's and
// (through VectorActivation and the stores below) its fused input gradient,
// the layer norm's 16-bit passes and the group norm's output without an
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

// An activation's formulas (activation.h) on vectors, lane by lane: the
// piecewise-linear ones (and elu's derivative from its output) as max / min /
// select_greater (z the second operand of max and min, which they return
// where a lane is NaN or both are zero: the scalar formulas' results), elu's
// and silu's others by their scalar formula over the lanes, which GCC
// vectorizes in registers.
template <class Act>
struct VectorActivation {
  static constexpr normext::Activation kKind = Act::kKind;
  Act act;

  template <class F>
  static C10_ALWAYS_INLINE FloatVector each_lane(FloatVector v, const F& f) {
    float lanes[kVectorLanes];
    std::memcpy(lanes, &v, sizeof v);
#pragma omp simd
    for (int k = 0; k < kVectorLanes; ++k) lanes[k] = f(lanes[k]);
    std::memcpy(&v, lanes, sizeof v);
    return v;
  }

  C10_ALWAYS_INLINE FloatVector operator()(FloatVector z) const {
    if constexpr (kKind == normext::Activation::kIdentity) {
      return z;
    } else if constexpr (kKind == normext::Activation::kRelu) {
      return max_lanes(splat(0.0f), z);  // z < 0 ? 0 : z in one instruction
    } else if constexpr (kKind == normext::Activation::kRelu6) {
      return min_lanes(splat(6.0f), max_lanes(splat(0.0f), z));
    } else if constexpr (kKind == normext::Activation::kLeakyRelu) {
      return select_greater(z, splat(0.0f), z, z * splat(act.negative_slope));
    } else {
      return each_lane(z, [this](float v) { return act(v); });
    }
  }
  C10_ALWAYS_INLINE FloatVector grad(FloatVector z) const {
    const FloatVector zero = splat(0.0f), one = splat(1.0f);
    if constexpr (kKind == normext::Activation::kIdentity) {
      return one;
    } else if constexpr (kKind == normext::Activation::kRelu) {
      return select_greater(z, zero, one, zero);
    } else if constexpr (kKind == normext::Activation::kRelu6) {
      return select_greater(z, zero, select_greater(splat(6.0f), z, one, zero), zero);
    } else if constexpr (kKind == normext::Activation::kLeakyRelu) {
      return select_greater(z, zero, one, splat(act.negative_slope));
    } else {
      return each_lane(z, [this](float v) { return act.grad(v); });
    }
  }
  C10_ALWAYS_INLINE FloatVector grad_of_output(FloatVector y) const {
    static_assert(Act::kGradOfOutput);
    if constexpr (kKind == normext::Activation::kElu) {
      return select_greater(y, splat(0.0f), splat(1.0f), y + splat(act.alpha));
    } else {
      return grad(y);  // the same formula (activation.h)
    }
  }
  C10_ALWAYS_INLINE FloatVector inverse(FloatVector y) const {
    if constexpr (kKind == normext::Activation::kIdentity) {
      return y;
    } else if constexpr (kKind == normext::Activation::kLeakyRelu) {
      return select_greater(y, splat(0.0f), y, y / splat(act.negative_slope));
    } else {
      return each_lane(y, [this](float v) { return act.inverse(v); });
    }
  }
};

template <class Act>
C10_ALWAYS_INLINE FloatVector activate(const Act act, FloatVector z) {
  return VectorActivation<Act>{act}(z);
}

// out[i, i + n) = value(i, n) over [0, length): whole vectors two at a time
// (store_vector_pair), then one, then a partial vector (n an int64_t).
template <typename T, class How, class F>
C10_ALWAYS_INLINE void store_run(T* out, int64_t length, How how, const F& value) {
  constexpr WholeVector kWhole{};
  int64_t i = 0;
  for (; i + 2 * kVectorLanes <= length; i += 2 * kVectorLanes) {
    store_vector_pair(out + i, value(i, kWhole), out + i + kVectorLanes,
                      value(i + kVectorLanes, kWhole), how);
  }
  if (i + kVectorLanes <= length) {
    store_vector(out + i, value(i, kWhole), how);
    i += kVectorLanes;
  }
  if (const int64_t n = length - i) store_vector(out + i, value(i, n), n, how);
}

// The same over Rows consecutive rows of `channels` values: coefficients(c, n)
// loads channels [c, c + n)'s coefficients once for all rows, value(i, n, k)
// gives the vector at element i with them; channels two vectors at a time.
template <int Rows, typename T, class How, class Coefficients, class F>
C10_ALWAYS_INLINE void store_rows(T* out, int64_t channels, How how,
                                  const Coefficients& coefficients, const F& value) {
  constexpr WholeVector kWhole{};
  int64_t c = 0;
  for (; c + 2 * kVectorLanes <= channels; c += 2 * kVectorLanes) {
    const auto k0 = coefficients(c, kWhole), k1 = coefficients(c + kVectorLanes, kWhole);
    for (int row = 0; row < Rows; ++row) {
      const int64_t i = row * channels + c;
      store_vector_pair(out + i, value(i, kWhole, k0), out + i + kVectorLanes,
                        value(i + kVectorLanes, kWhole, k1), how);
    }
  }
  for (; c < channels; c += kVectorLanes) {
    if (const int64_t n = channels - c; n < kVectorLanes) {
      const auto k = coefficients(c, n);
      for (int row = 0; row < Rows; ++row) {
        const int64_t i = row * channels + c;
        store_vector(out + i, value(i, n, k), n, how);
      }
    } else {
      const auto k = coefficients(c, kWhole);
      for (int row = 0; row < Rows; ++row) {
        const int64_t i = row * channels + c;
        store_vector(out + i, value(i, kWhole, k), how);
      }
    }
  }
}

// Two outputs at once: values(i, n) returns a pair of vectors, the first
// stored in out0 and the second in out1, both with one test (store_vector_pair).
template <typename T, class How, class F>
C10_ALWAYS_INLINE void store_run_both(T* out0, T* out1, int64_t length, How how,
                                      const F& values) {
  int64_t i = 0;
  for (; i + kVectorLanes <= length; i += kVectorLanes) {
    const auto [v0, v1] = values(i, WholeVector{});
    store_vector_pair(out0 + i, v0, out1 + i, v1, how);
  }
  if (const int64_t n = length - i) {
    const auto [v0, v1] = values(i, n);
    store_vector(out0 + i, v0, n, how);
    store_vector(out1 + i, v1, n, how);
  }
}

template <int Rows, typename T, class How, class Coefficients, class F>
C10_ALWAYS_INLINE void store_rows_both(T* out0, T* out1, int64_t channels, How how,
                                       const Coefficients& coefficients, const F& values) {
  for (int64_t c = 0; c < channels; c += kVectorLanes) {
    const auto rows = [&](auto n) {
      const auto k = coefficients(c, n);
      for (int row = 0; row < Rows; ++row) {
        const int64_t i = row * channels + c;
        const auto [v0, v1] = values(i, n, k);
        if constexpr (std::is_same_v<decltype(n), WholeVector>) {
          store_vector_pair(out0 + i, v0, out1 + i, v1, how);
        } else {
          store_vector(out0 + i, v0, n, how);
          store_vector(out1 + i, v1, n, how);
        }
      }
    };
    if (const int64_t n = channels - c; n < kVectorLanes) {
      rows(n);
    } else {
      rows(WholeVector{});
    }
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
    store_run(y, length, how, [&](int64_t i, auto n) {
      FloatVector z = normalize(load_vector(x + i, n), m, s, b);
      if constexpr (kResidual) z += load_vector(r + i, n);
      return activate(act, z);
    });
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
    store_run(y, length, how, [&](int64_t i, auto n) {
      const FloatVector s = r * load_floats(weight + i, n);
      return normalize(load_vector(x + i, n), m, s, load_floats(bias + i, n));
    });
  });
}

// sum = a + b, rounded to T.
template <typename T>
void plain_add(const T* a, const T* b, T* sum, int64_t length) {
  with_narrowing<T>([&](auto how) {
    store_run(sum, length, how, [&](int64_t i, auto n) {
      return load_vector(a + i, n) + load_vector(b + i, n);
    });
  });
}

// normalize_run_vectors over Rows consecutive rows of `channels` values,
// per-channel coefficients.
template <int Rows, bool kResidual, class Act, typename T>
void normalize_rows_vectors(const Act act, const T* x, const T* r, T* y, int64_t channels,
                            const float* mean, const float* scale, const float* bias) {
  with_narrowing<T>([&](auto how) {
    using math::NORMEXT_CPU_CAPABILITY::normalize;
    struct Coefficients {
      FloatVector mean, scale, bias;
    };
    const auto coefficients = [&](int64_t c, auto n) {
      return Coefficients{load_floats(mean + c, n), load_floats(scale + c, n),
                          load_floats(bias + c, n)};
    };
    store_rows<Rows>(y, channels, how, coefficients, [&](int64_t i, auto n, const Coefficients& k) {
      FloatVector z = normalize(load_vector(x + i, n), k.mean, k.scale, k.bias);
      if constexpr (kResidual) z += load_vector(r + i, n);
      return activate(act, z);
    });
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
    store_run(dx, length, how, [&](int64_t i, auto n) {
      return grad_input(load_vector(dy + i, n), load_vector(x + i, n), m, kv);
    });
  });
}

// The same over Rows consecutive rows of `channels` values, per-channel coefficients.
template <int Rows, typename TDy, typename T>
void plain_grad_input_rows(const TDy* dy, const T* x, T* dx, int64_t channels,
                           const float* mean, const float* dy_scale, const float* xmu_scale,
                           const float* shift) {
  with_narrowing<T>([&](auto how) {
    using math::NORMEXT_CPU_CAPABILITY::grad_input;
    using Coefficients = math::NORMEXT_CPU_CAPABILITY::GradInputCoefficients<FloatVector>;
    struct MeanAndCoefficients {
      FloatVector mean;
      Coefficients grad;
    };
    const auto coefficients = [&](int64_t c, auto n) {
      return MeanAndCoefficients{load_floats(mean + c, n),
                                 {load_floats(dy_scale + c, n), load_floats(xmu_scale + c, n),
                                  load_floats(shift + c, n)}};
    };
    store_rows<Rows>(dx, channels, how, coefficients,
                     [&](int64_t i, auto n, const MeanAndCoefficients& k) {
      return grad_input(load_vector(dy + i, n), load_vector(x + i, n), k.mean, k.grad);
    });
  });
}
#endif

}  // namespace normext::cpu::NORMEXT_CPU_CAPABILITY

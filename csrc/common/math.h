// Formulas every norm shares, on the CPU and the GPU (host + device): moments
// from shifted sums, the shift, the affine normalization and the input
// gradient's coefficients. A norm's math.h adds its own (batch_norm/math.h:
// running statistics, the fused activation's gradients).
//
// Every function is a template over the value type T so the same code runs on
// scalars (float, double) and on SIMD vectors with arithmetic operators and a
// broadcasting constructor; counts are always scalars.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

// Per CPU capability in the CPU kernels (common/cpu/capability.h), once elsewhere.
#ifdef NORMEXT_CPU_CAPABILITY
namespace normext::math::NORMEXT_CPU_CAPABILITY {
#else
namespace normext::math {
#endif

// Mean and m2 of `count` values x from sums of d = x - shift: one pass, and
// stable when the shift is near the mean (cancellation grows with
// ((shift - mean) / std)^2). Infinite data gives an infinite mean and a NaN
// m2, as torch does; finite data whose squares overflow gives an infinite m2.
template <typename T>
C10_HOST_DEVICE inline void shifted_moments(T shift, T sum_d, T sum_d2, T count, T& mean, T& m2) {
  mean = shift + sum_d / count;
  const T correction = sum_d * sum_d / count;
  const bool overflowed = sum_d2 == sum_d2 + sum_d2 && sum_d2 > T(0) && sum_d - sum_d == T(0);
  m2 = overflowed ? sum_d2 : sum_d2 - correction;
  m2 = m2 < T(0) ? T(0) : m2;  // rounding; NaN stays NaN
}

// Elements of a group whose median is its shift.
constexpr int kShiftSample = 8;

// The shift for shifted_moments, in the type the deviations are computed in:
// the median of kShiftSample elements spread evenly over the group, so that
// neither a lone outlier nor an atypical first row moves it far from the
// mean; 0 unless finite. load(j) gives the group's j-th element
// (0 <= j < count) as a double.
template <typename T, typename Load>
C10_HOST_DEVICE inline T sample_shift(int64_t count, const Load& load) {
  const int size = count < kShiftSample ? static_cast<int>(count) : kShiftSample;
  if (size == 0) return T(0);
  // Every sample is loaded before any is compared, so that a GPU thread has
  // all its loads in flight at once.
  double sample[kShiftSample];
  for (int k = 0; k < kShiftSample; ++k) {
    if (k < size) sample[k] = load(k * count / size);
  }
  for (int k = 1; k < size; ++k) {  // insertion sort
    const double value = sample[k];
    int i = k;
    for (; i > 0 && sample[i - 1] > value; --i) sample[i] = sample[i - 1];
    sample[i] = value;
  }
  const T shift = static_cast<T>(sample[(size - 1) / 2]);
  return shift - shift == T(0) ? shift : T(0);
}

template <typename T>
C10_HOST_DEVICE inline T inverse_std(T biased_var, T eps) {
  return T(1) / std::sqrt(biased_var + eps);
}

// y = (x - mean) * scale + bias with scale = invstd * weight. Subtracting the
// mean first keeps y exact for a constant group with a large mean (where
// x * scale + shift would cancel to garbage).
template <typename T>
C10_HOST_DEVICE inline T normalize(T x, T mean, T scale, T bias) {
  return (x - mean) * scale + bias;
}

// The input gradient under batch statistics
//   dx = (dy - mean_dy - (x - mean) * projection) * scale
// with scale = invstd * weight, mean_dy = sum(dy) / n and
// projection = sum(dy * (x - mean)) * invstd^2 / n, written per channel as
// dx = dy * a + (x - mean) * b + c. (Under running statistics dx = dy * scale:
// normalize() with mean 0 and bias 0, which leaves x unread, so an inf in x
// gives no inf * 0 = NaN.)
template <typename T>
struct GradInputCoefficients {
  T dy_scale;
  T xmu_scale;
  T shift;
};

// inv_count = 1 / n: a GPU computes the coefficients per element, where
// divisions would cost more than the memory traffic.
template <typename T>
C10_HOST_DEVICE inline GradInputCoefficients<T> grad_input_coefficients(
    T sum_dy, T sum_dy_xmu, T invstd, T weight, T inv_count) {
  const T scale = invstd * weight;
  const T projection = sum_dy_xmu * invstd * invstd * inv_count;
  return {scale, -projection * scale, -sum_dy * inv_count * scale};
}

// dx from dy and xmu = x - mean. (k by value: a CPU loop that builds it per
// element vectorizes only if it is not address-taken.)
template <typename T>
C10_HOST_DEVICE inline T grad_input_centred(T dy, T xmu, GradInputCoefficients<T> k) {
  return dy * k.dy_scale + xmu * k.xmu_scale + k.shift;
}

template <typename T>
C10_HOST_DEVICE inline T grad_input(T dy, T x, T mean, GradInputCoefficients<T> k) {
  return grad_input_centred(dy, x - mean, k);
}

}  // namespace

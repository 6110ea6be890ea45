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

// How many elements of a group of `count` sample_shift reads.
C10_HOST_DEVICE inline int shift_sample_size(int64_t count) {
  return count < kShiftSample ? static_cast<int>(count) : kShiftSample;
}

// a and b in order (b < a: swapped), without a branch; V a double, or a
// vector of lanes whose comparison and select work lane by lane (GCC's vector
// extensions: the CPU statistics' shifts, batch_norm/cpu/stats.cpp).
template <typename V>
C10_HOST_DEVICE inline void sort_pair(V& a, V& b) {
  const V low = b < a ? b : a, high = b < a ? a : b;
  a = low;
  b = high;
}

// The samples s in order: Batcher's odd-even merge sort, 19 compare-exchanges
// in 6 rounds.
template <typename V>
C10_HOST_DEVICE inline void sort_samples(V (&s)[kShiftSample]) {
  static_assert(kShiftSample == 8, "the network sorts 8 values");
  sort_pair(s[0], s[1]); sort_pair(s[2], s[3]); sort_pair(s[4], s[5]); sort_pair(s[6], s[7]);
  sort_pair(s[0], s[2]); sort_pair(s[1], s[3]); sort_pair(s[4], s[6]); sort_pair(s[5], s[7]);
  sort_pair(s[1], s[2]); sort_pair(s[5], s[6]);
  sort_pair(s[0], s[4]); sort_pair(s[1], s[5]); sort_pair(s[2], s[6]); sort_pair(s[3], s[7]);
  sort_pair(s[2], s[4]); sort_pair(s[3], s[5]);
  sort_pair(s[1], s[2]); sort_pair(s[3], s[4]); sort_pair(s[5], s[6]);
}

// The median of `size` (<= kShiftSample) samples, load(k) the k-th as a
// double, in T; 0 unless finite (or size is 0). A sorting network: an
// insertion sort's data-dependent branches, mispredicted on most channels,
// cost more than the loads (benchmarks/history, session 29).
template <typename T, typename Load>
C10_HOST_DEVICE inline T median_shift(int size, const Load& load) {
  if (size == 0) return T(0);
  // Every sample is loaded before any is compared, so that a GPU thread has
  // all its loads in flight at once; missing samples sort last.
  double s[kShiftSample];
  for (int k = 0; k < kShiftSample; ++k) s[k] = k < size ? load(k) : HUGE_VAL;
  sort_samples(s);
  const T shift = static_cast<T>(s[(size - 1) / 2]);
  return shift - shift == T(0) ? shift : T(0);
}

// The shift for shifted_moments, in the type the deviations are computed in:
// the median of kShiftSample elements spread evenly over the group (the k-th
// is element k * count / size), so that neither a lone outlier nor an
// atypical first row moves it far from the mean; 0 unless finite. load(j)
// gives the group's j-th element (0 <= j < count) as a double.
template <typename T, typename Load>
C10_HOST_DEVICE inline T sample_shift(int64_t count, const Load& load) {
  const int size = shift_sample_size(count);
  return median_shift<T>(size, [&](int k) { return load(k * count / size); });
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

// The activations a norm's output may pass through (fused into its kernels),
// their derivatives, and, for the invertible ones, the inverse that lets a
// backward recover an activation's input from its output (memory-efficient
// mode). Host + device formulas, shared by the CPU and CUDA kernels; each
// follows torch's function of the same name (values at the kinks included).
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace normext {

enum class Activation : int64_t { kIdentity, kRelu, kRelu6, kLeakyRelu, kElu, kSilu };

// An activation and its parameters (negative_slope: leaky_relu; alpha: elu).
struct ActivationSpec {
  Activation kind = Activation::kIdentity;
  double negative_slope = 0.01;
  double alpha = 1.0;
};

// The activation named `name` ("identity", "relu", "relu6", "leaky_relu",
// "elu", "silu"; ValueError naming `op` otherwise) with its parameters.
ActivationSpec activation_spec(c10::string_view name, double negative_slope, double alpha,
                               const char* op);

// Whether the derivative is a function of the output (grad_of_output below):
// not for silu, nor for leaky_relu with a negative slope or elu with a
// negative alpha, whose outputs are positive for some negative inputs (torch
// refuses those too where its backward takes a result).
inline bool grad_from_output(const ActivationSpec& spec) {
  switch (spec.kind) {
    case Activation::kSilu: return false;
    case Activation::kLeakyRelu: return spec.negative_slope >= 0;
    case Activation::kElu: return spec.alpha >= 0;
    default: return true;
  }
}

}  // namespace normext

// Per CPU capability in the CPU kernels (common/cpu/capability.h), once elsewhere.
#ifdef NORMEXT_CPU_CAPABILITY
namespace normext::NORMEXT_CPU_CAPABILITY {
#else
namespace normext {
#endif

// exp and expm1 for the activations. GCC does not vectorize calls to
// std::exp (nor std::floor without -ffast-math), so the CPU kernels take
// them for float from Cephes' expf method in arithmetic that vectorizes:
// exp(x) = 2^n (1 + q) with q = r + r^2 P(r) on |r| <= ln(2)/2 (error about
// 2 ulp), expm1(x) = 2^n q + (2^n - 1), exact near 0 like std::expm1;
// results below FLT_MIN flush to 0.
template <typename T>
C10_HOST_DEVICE inline T exp_of(T x) {
  return std::exp(x);
}
template <typename T>
C10_HOST_DEVICE inline T expm1_of(T x) {
  return std::expm1(x);
}
// 1 / (1 + exp(-z)), 0 below the float range as torch's (1 + inf), and
// silu's derivative, in torch's formula.
template <typename T>
C10_HOST_DEVICE inline T sigmoid_of(T z) {
  return T(1) / (T(1) + exp_of(-z));
}
template <typename T>
C10_HOST_DEVICE inline T silu_grad_of(T z) {
  const T sigmoid = sigmoid_of(z);
  return sigmoid * (T(1) + z * (T(1) - sigmoid));
}
#ifdef NORMEXT_CPU_CAPABILITY
// Cephes' expf: ln 2 in two parts (n * kLn2High is exact) and P, highest
// power first (also common/cpu/vector_silu.h's).
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2High = 0.693359375f;
constexpr float kLn2Low = -2.12194440e-4f;
constexpr int kExpPolynomialTerms = 6;
constexpr float kExpPolynomial[kExpPolynomialTerms] = {1.9875691500e-4f, 1.3981999507e-3f,
                                                       8.3334519073e-3f, 4.1665795894e-2f,
                                                       1.6666665459e-1f, 5.0000001201e-1f};
// 2^n and q of x, for x in [-87.34, 88] (clamped; a NaN x gives n = 0).
C10_ALWAYS_INLINE void exp_parts(float x, float& scale, float& q) {
  const float clamped = x < -87.34f ? -87.34f : (x > 88.0f ? 88.0f : x);
  const float finite = clamped == clamped ? clamped : 0.0f;
  // round to nearest: adding 1.5 * 2^23 leaves no fraction bits
  const float n = (finite * kLog2e + 12582912.0f) - 12582912.0f;
  const float r = finite - n * kLn2High - n * kLn2Low;
  float p = kExpPolynomial[0];
  for (int k = 1; k < kExpPolynomialTerms; ++k) p = p * r + kExpPolynomial[k];
  q = p * r * r + r;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  std::memcpy(&scale, &bits, sizeof scale);
}
// exp on exp_parts' clamped range, no select: one between an exp and a
// divide makes GCC divide once per select arm, so callers select after.
C10_ALWAYS_INLINE float exp_clamped(float x) {
  float scale, q;
  exp_parts(x, scale, q);
  return scale * q + scale;
}
template <>
C10_ALWAYS_INLINE float exp_of(float x) {
  const float value = exp_clamped(x);
  return x > 88.72283f ? INFINITY : (x < -87.34f ? 0.0f : (x == x ? value : x));
}
template <>
C10_ALWAYS_INLINE float expm1_of(float x) {
  float scale, q;
  exp_parts(x, scale, q);
  const float value = scale * q + (scale - 1.0f);
  return x > 88.72283f ? INFINITY : (x < -87.34f ? -1.0f : (x == x ? value : x));
}
// The select last (exp_clamped); where exp(-z) overflows, torch's 1 / (1 + inf)
// = 0 and silu' = 0 * (1 + z) = z * 0 (-0, NaN at -inf). A NaN z gives
// sigmoid 1 / 2, and z times it stays NaN.
template <>
C10_ALWAYS_INLINE float sigmoid_of(float z) {
  const float sigmoid = 1.0f / (1.0f + exp_clamped(-z));
  return z < -88.72283f ? 0.0f : sigmoid;
}
template <>
C10_ALWAYS_INLINE float silu_grad_of(float z) {
  const float sigmoid = 1.0f / (1.0f + exp_clamped(-z));
  const float grad = sigmoid * (1.0f + z * (1.0f - sigmoid));
  return z < -88.72283f ? z * 0.0f : grad;
}
#endif

// Each activation: operator() (forward), grad(z) (derivative at the input z),
// grad_of_output(y) (the same derivative from the output y = act(z), as
// torch's backward takes it from a result; all but silu), and where
// invertible, inverse(y). Comparisons are written so that NaN propagates as
// in torch. Everything here is always inlined: in a large kernel file GCC
// otherwise calls some of it out of line, and the loop around stays scalar.
template <typename T>
struct IdentityFn {
  static constexpr Activation kKind = Activation::kIdentity;
  static constexpr bool kInvertible = true;
  static constexpr bool kGradOfOutput = true;
  C10_HOST_DEVICE C10_ALWAYS_INLINE T operator()(T z) const { return z; }
  C10_HOST_DEVICE C10_ALWAYS_INLINE T grad(T) const { return T(1); }
  C10_HOST_DEVICE C10_ALWAYS_INLINE T inverse(T y) const { return y; }
  C10_HOST_DEVICE C10_ALWAYS_INLINE T grad_of_output(T) const { return T(1); }
};

// relu'(0) = 0, as torch's threshold_backward.
template <typename T>
struct ReluFn {
  static constexpr Activation kKind = Activation::kRelu;
  static constexpr bool kInvertible = false;
  static constexpr bool kGradOfOutput = true;
  C10_HOST_DEVICE C10_ALWAYS_INLINE T operator()(T z) const { return z < T(0) ? T(0) : z; }
  C10_HOST_DEVICE C10_ALWAYS_INLINE T grad(T z) const { return z > T(0) ? T(1) : T(0); }
  C10_HOST_DEVICE C10_ALWAYS_INLINE T grad_of_output(T y) const { return grad(y); }
};

// hardtanh(z, 0, 6): derivative 0 at both kinks, as torch's hardtanh_backward.
template <typename T>
struct Relu6Fn {
  static constexpr Activation kKind = Activation::kRelu6;
  static constexpr bool kInvertible = false;
  static constexpr bool kGradOfOutput = true;
  C10_HOST_DEVICE C10_ALWAYS_INLINE T operator()(T z) const { return z < T(0) ? T(0) : (z > T(6) ? T(6) : z); }
  C10_HOST_DEVICE C10_ALWAYS_INLINE T grad(T z) const { return z > T(0) && z < T(6) ? T(1) : T(0); }
  C10_HOST_DEVICE C10_ALWAYS_INLINE T grad_of_output(T y) const { return grad(y); }
};

// Invertible for a positive slope (the ops check it).
template <typename T>
struct LeakyReluFn {
  static constexpr Activation kKind = Activation::kLeakyRelu;
  static constexpr bool kInvertible = true;
  static constexpr bool kGradOfOutput = true;
  T negative_slope;
  C10_HOST_DEVICE C10_ALWAYS_INLINE T operator()(T z) const { return z > T(0) ? z : z * negative_slope; }
  C10_HOST_DEVICE C10_ALWAYS_INLINE T grad(T z) const { return z > T(0) ? T(1) : negative_slope; }
  C10_HOST_DEVICE C10_ALWAYS_INLINE T inverse(T y) const { return y > T(0) ? y : y / negative_slope; }
  C10_HOST_DEVICE C10_ALWAYS_INLINE T grad_of_output(T y) const { return y > T(0) ? T(1) : negative_slope; }
};

// Invertible for a positive alpha, except where alpha * exp(z) rounds away
// next to alpha (z below about log(eps of y's dtype), where y saturates at
// -alpha): there grad_of_output(y) is 0 and inverse(y) is clamped to about
// -16, which is higher than the true z (finite, so that 0 * inverse stays 0).
template <typename T>
struct EluFn {
  static constexpr Activation kKind = Activation::kElu;
  static constexpr bool kInvertible = true;
  static constexpr bool kGradOfOutput = true;
  T alpha;
  C10_HOST_DEVICE C10_ALWAYS_INLINE T operator()(T z) const { return z > T(0) ? z : alpha * expm1_of(z); }
  C10_HOST_DEVICE C10_ALWAYS_INLINE T grad(T z) const { return z > T(0) ? T(1) : alpha * exp_of(z); }
  C10_HOST_DEVICE C10_ALWAYS_INLINE T inverse(T y) const {
    const T u = y / alpha, floor = T(-1) + T(1e-7);
    return y > T(0) ? y : std::log1p(u < floor ? floor : u);
  }
  C10_HOST_DEVICE C10_ALWAYS_INLINE T grad_of_output(T y) const { return y > T(0) ? T(1) : y + alpha; }
};

template <typename T>
struct SiluFn {
  static constexpr Activation kKind = Activation::kSilu;
  static constexpr bool kInvertible = false;
  static constexpr bool kGradOfOutput = false;
  C10_HOST_DEVICE C10_ALWAYS_INLINE T operator()(T z) const { return z * sigmoid_of(z); }
  C10_HOST_DEVICE C10_ALWAYS_INLINE T grad(T z) const { return silu_grad_of(z); }
};

// Whether this compilation has T's activation kernels: float64's only in the
// baseline CPU variant, to save compile time (setup.py; cpu::baseline_only).
#if defined(NORMEXT_CPU_CAPABILITY) && !defined(NORMEXT_CPU_FLOAT64_ACTIVATIONS)
template <typename T>
constexpr bool kActivationsFor = !std::is_same_v<T, double>;
#else
template <typename T>
constexpr bool kActivationsFor = true;
#endif

// fn(the activation functor of T) for a spec (host code); kInvertibleOnly
// instantiates fn for the invertible ones alone (the caller checked the spec).
template <typename T, bool kInvertibleOnly = false, typename F>
void with_activation(const ActivationSpec& spec, const F& fn) {
  if constexpr (!kActivationsFor<T>) {
    TORCH_INTERNAL_ASSERT(spec.kind == Activation::kIdentity,
                          "float64 activations run the baseline CPU variant's kernels");
    return fn(IdentityFn<T>{});
  } else {
    switch (spec.kind) {
      case Activation::kLeakyRelu:
        return fn(LeakyReluFn<T>{static_cast<T>(spec.negative_slope)});
      case Activation::kElu:
        return fn(EluFn<T>{static_cast<T>(spec.alpha)});
      default:
        break;
    }
    if constexpr (!kInvertibleOnly) {
      switch (spec.kind) {
        case Activation::kRelu:
          return fn(ReluFn<T>{});
        case Activation::kRelu6:
          return fn(Relu6Fn<T>{});
        case Activation::kSilu:
          return fn(SiluFn<T>{});
        default:
          break;
      }
    }
    return fn(IdentityFn<T>{});
  }
}

}  // namespace

// The activations a norm's output may pass through (fused into its kernels),
// their derivatives, and, for the invertible ones, the inverse that lets a
// backward recover an activation's input from its output (memory-efficient
// mode). Host + device formulas, shared by the CPU and CUDA kernels; each
// follows torch's function of the same name (values at the kinks included).
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace normext {

enum class Activation : int64_t { kIdentity, kRelu, kRelu6, kLeakyRelu, kElu, kSilu };

// An activation and its parameters (negative_slope: leaky_relu; alpha: elu).
struct ActivationSpec {
  Activation kind = Activation::kIdentity;
  double negative_slope = 0.01;
  double alpha = 1.0;
};

}  // namespace normext

// Per CPU capability in the CPU kernels (common/cpu/capability.h), once elsewhere.
#ifdef NORMEXT_CPU_CAPABILITY
namespace normext::NORMEXT_CPU_CAPABILITY {
#else
namespace normext {
#endif

// Each activation: operator() (forward), grad(z) (derivative at the input z),
// and where invertible, inverse(y) and grad_of_output(y) (the derivative at
// inverse(y)). Comparisons are written so that NaN propagates as in torch.
template <typename T>
struct IdentityFn {
  static constexpr Activation kKind = Activation::kIdentity;
  static constexpr bool kInvertible = true;
  C10_HOST_DEVICE T operator()(T z) const { return z; }
  C10_HOST_DEVICE T grad(T) const { return T(1); }
  C10_HOST_DEVICE T inverse(T y) const { return y; }
  C10_HOST_DEVICE T grad_of_output(T) const { return T(1); }
};

// relu'(0) = 0, as torch's threshold_backward.
template <typename T>
struct ReluFn {
  static constexpr Activation kKind = Activation::kRelu;
  static constexpr bool kInvertible = false;
  C10_HOST_DEVICE T operator()(T z) const { return z < T(0) ? T(0) : z; }
  C10_HOST_DEVICE T grad(T z) const { return z > T(0) ? T(1) : T(0); }
};

// hardtanh(z, 0, 6): derivative 0 at both kinks, as torch's hardtanh_backward.
template <typename T>
struct Relu6Fn {
  static constexpr Activation kKind = Activation::kRelu6;
  static constexpr bool kInvertible = false;
  C10_HOST_DEVICE T operator()(T z) const { return z < T(0) ? T(0) : (z > T(6) ? T(6) : z); }
  C10_HOST_DEVICE T grad(T z) const { return z > T(0) && z < T(6) ? T(1) : T(0); }
};

// Invertible for a positive slope (the ops check it).
template <typename T>
struct LeakyReluFn {
  static constexpr Activation kKind = Activation::kLeakyRelu;
  static constexpr bool kInvertible = true;
  T negative_slope;
  C10_HOST_DEVICE T operator()(T z) const { return z > T(0) ? z : z * negative_slope; }
  C10_HOST_DEVICE T grad(T z) const { return z > T(0) ? T(1) : negative_slope; }
  C10_HOST_DEVICE T inverse(T y) const { return y > T(0) ? y : y / negative_slope; }
  C10_HOST_DEVICE T grad_of_output(T y) const { return y > T(0) ? T(1) : negative_slope; }
};

// Invertible for a positive alpha, except where alpha * exp(z) rounds away
// next to alpha (z below about log(eps of y's dtype), where y saturates at
// -alpha): there grad_of_output(y) is 0 and inverse(y) is clamped to about
// -16, which is higher than the true z (finite, so that 0 * inverse stays 0).
template <typename T>
struct EluFn {
  static constexpr Activation kKind = Activation::kElu;
  static constexpr bool kInvertible = true;
  T alpha;
  C10_HOST_DEVICE T operator()(T z) const { return z > T(0) ? z : alpha * std::expm1(z); }
  C10_HOST_DEVICE T grad(T z) const { return z > T(0) ? T(1) : alpha * std::exp(z); }
  C10_HOST_DEVICE T inverse(T y) const {
    const T u = y / alpha, floor = T(-1) + T(1e-7);
    return y > T(0) ? y : std::log1p(u < floor ? floor : u);
  }
  C10_HOST_DEVICE T grad_of_output(T y) const { return y > T(0) ? T(1) : y + alpha; }
};

template <typename T>
struct SiluFn {
  static constexpr Activation kKind = Activation::kSilu;
  static constexpr bool kInvertible = false;
  C10_HOST_DEVICE T operator()(T z) const { return z / (T(1) + std::exp(-z)); }
  C10_HOST_DEVICE T grad(T z) const {
    const T sigmoid = T(1) / (T(1) + std::exp(-z));
    return sigmoid * (T(1) + z * (T(1) - sigmoid));
  }
};

// fn(the activation functor of T) for a spec (host code); kInvertibleOnly
// instantiates fn for the invertible ones alone (the caller checked the spec).
template <typename T, bool kInvertibleOnly = false, typename F>
void with_activation(const ActivationSpec& spec, const F& fn) {
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

}  // namespace

// The kernel instantiation a fusion runs (host code shared by the CPU and
// CUDA kernels): the activation functor, whether a residual is read, and
// where a fused backward takes dz and x - mean from.
#pragma once

#include <type_traits>

#include "batch_norm/common.h"
#include "common/activation.h"

// Per CPU capability in the CPU kernels (common/cpu/capability.h), once elsewhere.
#ifdef NORMEXT_CPU_CAPABILITY
namespace normext::batch_norm::NORMEXT_CPU_CAPABILITY {
using namespace normext::NORMEXT_CPU_CAPABILITY;  // the activations
#else
namespace normext::batch_norm {
#endif

// Where a fused backward takes dz and x - mean from (common.h: FusedGrad): the
// input (z recomputed), the input and the output (the derivative from the
// output), or the output alone (memory-efficient).
enum GradFrom : int { kFromInput, kFromInputAndOutput, kFromOutput };

// fn(act, residual) for a fusion: act its activation functor of acc_t (math
// in common/activation.h), residual std::true_type or std::false_type.
template <typename acc_t, typename F>
void with_fusion(const Fusion& fusion, const F& fn) {
  if (fusion.plain()) return fn(IdentityFn<acc_t>{}, std::false_type{});
  with_activation<acc_t>(fusion.activation, [&](auto act) {
    if (fusion.residual.defined()) return fn(act, std::true_type{});
    fn(act, std::false_type{});
  });
}

// fn(act, plain, from, residual) for a fused backward: `plain` (a
// std::bool_constant) where it is the plain batch norm's, `from` a
// std::integral_constant<int, GradFrom>.
template <typename acc_t, typename F>
void with_grad_source(const FusedGrad& fused, const F& fn) {
  with_fusion<acc_t>(fused.fusion, [&](auto act, auto residual) {
    using Act = decltype(act);
    constexpr bool kResidual = decltype(residual)::value;
    if constexpr (Act::kInvertible) {
      if (fused.from_output) {
        return fn(act, std::false_type{}, std::integral_constant<int, kFromOutput>{}, residual);
      }
    }
    if constexpr (Act::kGradOfOutput && !kResidual) {
      if (fused.output.defined()) {
        return fn(act, std::false_type{}, std::integral_constant<int, kFromInputAndOutput>{},
                  residual);
      }
    }
    fn(act, std::bool_constant<!kResidual && Act::kKind == Activation::kIdentity>{},
       std::integral_constant<int, kFromInput>{}, residual);
  });
}

}  // namespace

// Batch-norm formulas shared by the CPU and CUDA kernels (host + device), on
// top of every norm's (common/math.h).
//
// Every function is a template over the value type T so the same code runs on
// scalars (float, double) and on SIMD vectors with arithmetic operators and a
// broadcasting constructor; counts are always scalars.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

#include "common/math.h"

// Per CPU capability in the CPU kernels (common/cpu/capability.h), once elsewhere.
#ifdef NORMEXT_CPU_CAPABILITY
namespace normext::batch_norm::NORMEXT_CPU_CAPABILITY {
using namespace normext::math::NORMEXT_CPU_CAPABILITY;
#else
namespace normext::batch_norm {
using namespace normext::math;
#endif

// Offset of the j-th element (0 <= j < outer * inner) of channel c in a
// dense (outer, channels, inner) tensor, or in a channels-last one, stored
// as (outer * inner, channels): the order sample_shift samples a channel in.
C10_HOST_DEVICE inline int64_t channel_element(int64_t j, int64_t c, int64_t channels,
                                               int64_t inner, bool channels_last) {
  return channels_last ? j * channels + c : ((j / inner) * channels + c) * inner + j % inner;
}

// The running-statistics update of torch.nn.BatchNorm: momentum weighs the batch.
template <typename T>
C10_HOST_DEVICE inline T running_update(T running, T batch, T momentum) {
  return running * (T(1) - momentum) + batch * momentum;
}

// Bessel's correction, used for running_var; a single sample gives 0 / 0 = NaN, as torch does.
template <typename T>
C10_HOST_DEVICE inline T unbiased_from_biased(T biased_var, T count) {
  return biased_var * count / (count - T(1));
}

// Through a fused activation (y = act(normalize(x) + residual)) the batch-norm
// gradient formulas take dz = dy * act'(z) in place of dy. From the input x,
// z is recomputed as the forward computed it:
template <class Act, typename T>
C10_HOST_DEVICE inline void pre_activation_grad(const Act& act, T dy, T x, T residual, T mean,
                                                T scale, T bias, T& dz, T& xmu) {
  xmu = x - mean;
  dz = dy * act.grad(xmu * scale + bias + residual);
}

// From the input x and the output y: the activation's derivative from y (as
// torch's backward of a result), so that a residual need not be kept.
template <class Act, typename T>
C10_HOST_DEVICE inline void pre_activation_grad_with_output(const Act& act, T dy, T x, T y,
                                                            T mean, T& dz, T& xmu) {
  xmu = x - mean;
  dz = dy * act.grad_of_output(y);
}

// From the output y alone (an invertible activation, the memory-efficient
// mode): x - mean = (act^-1(y) - bias - residual) * inv_scale, inv_scale =
// 1 / (invstd * weight), which the ops allow only for weights they can divide by.
template <class Act, typename T>
C10_HOST_DEVICE inline void pre_activation_grad_of_output(const Act& act, T dy, T y, T residual,
                                                          T inv_scale, T bias, T& dz, T& xmu) {
  dz = dy * act.grad_of_output(y);
  xmu = (act.inverse(y) - bias - residual) * inv_scale;
}

}  // namespace

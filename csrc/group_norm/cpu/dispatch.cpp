// Forwards each CPU group-norm kernel call to the variant compiled for the
// instruction set torch's CPU kernels use (common/cpu/dispatch.h).
#include "group_norm/cpu/dispatch.h"
#include "common/cpu/dispatch.h"

namespace normext::group_norm {

#define NORMEXT_KERNEL_API "group_norm/kernel_api.h"
#include "common/cpu/variants.inc"

void CpuKernels::forward(const ChannelView& input, int64_t groups, const at::Tensor& weight,
                         const at::Tensor& bias, double eps, const ActivationSpec& activation,
                         at::Tensor& output, at::Tensor& mean, at::Tensor& rstd) {
  cpu::with_variant<KernelsOf>([&](auto k) {
    decltype(k)::type::forward(input, groups, weight, bias, eps, activation, output, mean, rstd);
  }, cpu::baseline_only(input.data.scalar_type(), activation));
}

void CpuKernels::backward(const ChannelView& grad_out, const ChannelView& input, int64_t groups,
                          const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& weight,
                          const at::Tensor& bias, const ActivationSpec& activation,
                          at::Tensor& grad_input, at::Tensor& grad_weight, at::Tensor& grad_bias) {
  cpu::with_variant<KernelsOf>([&](auto k) {
    decltype(k)::type::backward(grad_out, input, groups, mean, rstd, weight, bias, activation,
                                grad_input, grad_weight, grad_bias);
  }, cpu::baseline_only(input.data.scalar_type(), activation));
}

}  // namespace normext::group_norm

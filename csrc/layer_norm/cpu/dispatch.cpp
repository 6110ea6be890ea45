// Forwards each CPU layer-norm kernel call to the variant compiled for the
// instruction set torch's CPU kernels use (common/cpu/dispatch.h).
#include "layer_norm/cpu/dispatch.h"
#include "common/cpu/dispatch.h"

namespace normext::layer_norm {

#define NORMEXT_KERNEL_API "layer_norm/kernel_api.h"
#include "common/cpu/variants.inc"

void CpuKernels::forward(const Rows& input, const at::Tensor& residual, const at::Tensor& weight,
                         const at::Tensor& bias, double eps, bool rms, at::Tensor& output,
                         at::Tensor& sum, at::Tensor& mean, at::Tensor& rstd) {
  cpu::with_variant<KernelsOf>([&](auto k) {
    decltype(k)::type::forward(input, residual, weight, bias, eps, rms, output, sum, mean, rstd);
  });
}

void CpuKernels::backward(const Rows& grad_out, const Rows& input, const at::Tensor& mean,
                          const at::Tensor& rstd, const at::Tensor& weight, bool rms,
                          const at::Tensor& grad_sum, at::Tensor& grad_input,
                          at::Tensor& grad_weight, at::Tensor& grad_bias) {
  cpu::with_variant<KernelsOf>([&](auto k) {
    decltype(k)::type::backward(grad_out, input, mean, rstd, weight, rms, grad_sum, grad_input,
                                grad_weight, grad_bias);
  });
}

}  // namespace normext::layer_norm

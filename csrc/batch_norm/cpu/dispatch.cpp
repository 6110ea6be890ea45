// Forwards each CPU kernel call to the variant compiled for the instruction
// set torch's CPU kernels use (common/cpu/dispatch.h).
#include "batch_norm/cpu/dispatch.h"
#include "common/cpu/dispatch.h"

namespace normext::batch_norm {

#define NORMEXT_KERNEL_API "batch_norm/kernel_api.h"
#include "common/cpu/variants.inc"

namespace {

// fn(Type<K>{}), K the selected variant's CpuKernels (the baseline's for
// float64 through an activation: cpu::baseline_only).
template <typename F>
void with_kernels(const F& fn, bool baseline = false) {
  cpu::with_variant<KernelsOf>(fn, baseline);
}

}  // namespace

void CpuKernels::moments(const ChannelView& input, at::Tensor& mean, at::Tensor& var) {
  with_kernels([&](auto k) { decltype(k)::type::moments(input, mean, var); });
}

void CpuKernels::finalize(const at::Tensor& mean, const at::Tensor& var, double count,
                          const at::Tensor& running_mean, const at::Tensor& running_var,
                          double momentum, double eps, at::Tensor& invstd) {
  with_kernels([&](auto k) {
    decltype(k)::type::finalize(mean, var, count, running_mean, running_var, momentum, eps,
                                invstd);
  });
}

void CpuKernels::batch_stats(const ChannelView& input, const at::Tensor& running_mean,
                             const at::Tensor& running_var, double momentum, double eps,
                             at::Tensor& mean, at::Tensor& invstd) {
  with_kernels([&](auto k) {
    decltype(k)::type::batch_stats(input, running_mean, running_var, momentum, eps, mean, invstd);
  });
}

void CpuKernels::running_stats(const at::Tensor& running_mean, const at::Tensor& running_var,
                               double eps, at::Tensor& mean, at::Tensor& invstd) {
  with_kernels([&](auto k) {
    decltype(k)::type::running_stats(running_mean, running_var, eps, mean, invstd);
  });
}

void CpuKernels::normalize(const ChannelView& input, const at::Tensor& mean,
                           const at::Tensor& invstd, const at::Tensor& weight,
                           const at::Tensor& bias, at::Tensor& output, const Fusion& fusion) {
  with_kernels([&](auto k) {
    decltype(k)::type::normalize(input, mean, invstd, weight, bias, output, fusion);
  }, cpu::baseline_only(input.data.scalar_type(), fusion.activation));
}

void CpuKernels::backward_reduce(const ChannelView& grad_out, const ChannelView& input,
                                 const at::Tensor& mean, const at::Tensor& invstd,
                                 at::Tensor& sum_dy, at::Tensor& sum_dy_xmu,
                                 at::Tensor& grad_weight, at::Tensor& grad_bias,
                                 const FusedGrad& fused) {
  with_kernels([&](auto k) {
    decltype(k)::type::backward_reduce(grad_out, input, mean, invstd, sum_dy, sum_dy_xmu,
                                       grad_weight, grad_bias, fused);
  }, cpu::baseline_only(input.data.scalar_type(), fused.fusion.activation));
}

void CpuKernels::backward_elemt(const ChannelView& grad_out, const ChannelView& input,
                                const at::Tensor& mean, const at::Tensor& invstd,
                                const at::Tensor& weight, const at::Tensor& sum_dy,
                                const at::Tensor& sum_dy_xmu, double count,
                                at::Tensor& grad_input, const FusedGrad& fused) {
  with_kernels([&](auto k) {
    decltype(k)::type::backward_elemt(grad_out, input, mean, invstd, weight, sum_dy, sum_dy_xmu,
                                      count, grad_input, fused);
  }, cpu::baseline_only(input.data.scalar_type(), fused.fusion.activation));
}

}  // namespace normext::batch_norm

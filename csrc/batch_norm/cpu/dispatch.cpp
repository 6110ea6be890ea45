// Forwards each CPU kernel call to the variant compiled for the instruction
// set torch's CPU kernels use, chosen once per process. That choice honours
// ATEN_CPU_CAPABILITY (default, avx2, avx512) and the machine's vector units.
#include <ATen/Version.h>

#include <type_traits>

#include "batch_norm/cpu/dispatch.h"

namespace normext::batch_norm {

// Each compiled variant's kernels, as cpu/kernels.h declares them in its namespace.
#ifdef NORMEXT_CPU_NATIVE
namespace NATIVE {
struct CpuKernels {
#include "batch_norm/kernel_api.h"
};
}  // namespace NATIVE
#else
namespace DEFAULT {
struct CpuKernels {
#include "batch_norm/kernel_api.h"
};
}  // namespace DEFAULT
#ifdef NORMEXT_WITH_CPU_AVX2
namespace AVX2 {
struct CpuKernels {
#include "batch_norm/kernel_api.h"
};
}  // namespace AVX2
#endif
#ifdef NORMEXT_WITH_CPU_AVX512
namespace AVX512 {
struct CpuKernels {
#include "batch_norm/kernel_api.h"
};
}  // namespace AVX512
#endif
#endif

namespace {

enum class Variant { kDefault, kAvx2, kAvx512, kNative };

Variant choose_variant() {
#ifdef NORMEXT_CPU_NATIVE
  return Variant::kNative;
#else
  // "NO AVX", "AVX2" or "AVX512" on x86-64. at::native::get_cpu_capability(),
  // which this wraps, is not exported from libtorch_cpu.
  const std::string torch_choice = at::get_cpu_capability();
#ifdef NORMEXT_WITH_CPU_AVX512
  if (torch_choice == "AVX512") return Variant::kAvx512;
#endif
#ifdef NORMEXT_WITH_CPU_AVX2
  if (torch_choice == "AVX512" || torch_choice == "AVX2") return Variant::kAvx2;
#endif
  return Variant::kDefault;
#endif
}

Variant selected_variant() {
  static const Variant variant = choose_variant();
  return variant;
}

// A type as a value (std::type_identity is C++20; torch 2.11 builds C++17).
template <typename T>
struct Type {
  using type = T;
};

// fn(Type<K>{}), K the selected variant's CpuKernels.
template <typename F>
void with_kernels(const F& fn) {
  switch (selected_variant()) {
#ifdef NORMEXT_CPU_NATIVE
    default:
      return fn(Type<NATIVE::CpuKernels>{});
#else
#ifdef NORMEXT_WITH_CPU_AVX512
    case Variant::kAvx512:
      return fn(Type<AVX512::CpuKernels>{});
#endif
#ifdef NORMEXT_WITH_CPU_AVX2
    case Variant::kAvx2:
      return fn(Type<AVX2::CpuKernels>{});
#endif
    default:
      return fn(Type<DEFAULT::CpuKernels>{});
#endif
  }
}

}  // namespace

std::string cpu_capability() {
  switch (selected_variant()) {
    case Variant::kAvx2: return "avx2";
    case Variant::kAvx512: return "avx512";
    case Variant::kNative: return "native";
    default: return "default";
  }
}

std::vector<std::string> cpu_capabilities() {
#ifdef NORMEXT_CPU_NATIVE
  return {"native"};
#else
  return {"default",
#ifdef NORMEXT_WITH_CPU_AVX2
          "avx2",
#endif
#ifdef NORMEXT_WITH_CPU_AVX512
          "avx512",
#endif
  };
#endif
}

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
  });
}

void CpuKernels::backward_reduce(const ChannelView& grad_out, const ChannelView& input,
                                 const at::Tensor& mean, const at::Tensor& invstd,
                                 at::Tensor& sum_dy, at::Tensor& sum_dy_xmu,
                                 at::Tensor& grad_weight, at::Tensor& grad_bias,
                                 const FusedGrad& fused) {
  with_kernels([&](auto k) {
    decltype(k)::type::backward_reduce(grad_out, input, mean, invstd, sum_dy, sum_dy_xmu,
                                       grad_weight, grad_bias, fused);
  });
}

void CpuKernels::backward_elemt(const ChannelView& grad_out, const ChannelView& input,
                                const at::Tensor& mean, const at::Tensor& invstd,
                                const at::Tensor& weight, const at::Tensor& sum_dy,
                                const at::Tensor& sum_dy_xmu, double count,
                                at::Tensor& grad_input, const FusedGrad& fused) {
  with_kernels([&](auto k) {
    decltype(k)::type::backward_elemt(grad_out, input, mean, invstd, weight, sum_dy, sum_dy_xmu,
                                      count, grad_input, fused);
  });
}

}  // namespace normext::batch_norm

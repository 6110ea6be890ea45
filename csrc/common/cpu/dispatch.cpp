// The CPU variant torch's own kernels run, among those compiled (dispatch.h).
#include <ATen/Version.h>

#include <cstdlib>

#include "common/cpu/dispatch.h"

namespace normext::cpu {
namespace {

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

bool cpu_converts_bfloat16() {
#if defined(__x86_64__) && defined(__GNUC__)
  const char* env = std::getenv("NORMEXT_AVX512_BF16");
  return __builtin_cpu_supports("avx512bf16") && !(env && std::string(env) == "0");
#else
  return false;
#endif
}

}  // namespace

const bool converts_bfloat16 = cpu_converts_bfloat16();

Variant selected_variant() {
  static const Variant variant = choose_variant();
  return variant;
}

bool baseline_only(c10::ScalarType dtype, const ActivationSpec& activation) {
  return dtype == c10::kDouble && activation.kind != Activation::kIdentity;
}

std::string capability() {
  switch (selected_variant()) {
    case Variant::kAvx2: return "avx2";
    case Variant::kAvx512: return "avx512";
    case Variant::kNative: return "native";
    default: return "default";
  }
}

std::vector<std::string> capabilities() {
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

}  // namespace normext::cpu

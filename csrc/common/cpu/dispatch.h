// The CPU kernel variant a process runs. setup.py compiles the CPU kernels
// once per instruction set (capability.h); every norm's kernels run the
// variant for the instruction set torch's own CPU kernels use, chosen once per
// process. That choice honours ATEN_CPU_CAPABILITY (default, avx2, avx512) and
// the machine's vector units.
#pragma once

#include <c10/core/ScalarType.h>

#include <string>
#include <vector>

#include "common/activation.h"

namespace normext::cpu {

enum class Variant { kDefault, kAvx2, kAvx512, kNative };

Variant selected_variant();
// The variant run: "default", "avx2", "avx512", or "native" for a
// NORMEXT_CPU_ARCH=native build (the only variant there).
std::string capability();
// The variants compiled, best last.
std::vector<std::string> capabilities();

// Whether the AVX-512 kernels narrow float to bfloat16 with AVX512_BF16's
// instruction (vec16.h): the CPU has it and NORMEXT_AVX512_BF16 is not "0".
extern const bool converts_bfloat16;

// Whether a call must take the baseline variant's kernels whatever the
// machine: float64 through an activation, which only that variant compiles
// (common/activation.h: kActivationsFor).
bool baseline_only(c10::ScalarType dtype, const ActivationSpec& activation);

// A type as a value (std::type_identity is C++20; torch 2.11 builds C++17).
template <typename T>
struct Type {
  using type = T;
};

// fn(Type<K>{}) with K = KernelsOf<v>::type for the selected variant v, or
// the baseline one where `baseline` (baseline_only); a norm's dispatch.cpp
// declares KernelsOf (variants.inc).
template <template <Variant> class KernelsOf, typename F>
decltype(auto) with_variant(const F& fn, bool baseline = false) {
  switch (baseline ? Variant::kDefault : selected_variant()) {
#ifdef NORMEXT_CPU_NATIVE
    default:
      return fn(Type<typename KernelsOf<Variant::kNative>::type>{});
#else
#ifdef NORMEXT_WITH_CPU_AVX512
    case Variant::kAvx512:
      return fn(Type<typename KernelsOf<Variant::kAvx512>::type>{});
#endif
#ifdef NORMEXT_WITH_CPU_AVX2
    case Variant::kAvx2:
      return fn(Type<typename KernelsOf<Variant::kAvx2>::type>{});
#endif
    default:
      return fn(Type<typename KernelsOf<Variant::kDefault>::type>{});
#endif
  }
}

}  // namespace normext::cpu

"""A/B of normext's 16-bit loops against the same loops written with ATen's
at::vec, in one process: the statistics' inner loop (the reducer's lanes over
cpu::ShiftedSums) and the elementwise pass's loop (y = x * a + b, 16-bit in
and out, through common/cpu/vec16.h's vectors), compiled for AVX2 and for
AVX-512 (the variants setup.py builds; those this CPU runs are timed).

    python benchmarks/conversions_ab.py [--elements 32768] [--reps 2000] [--rounds 15]

The elements fit in L2 by default, where the loop's arithmetic (not memory)
bounds it and a conversion's cost shows. Prints ns per element (medians of
interleaved rounds) and normext/at::vec time ratios (< 1: normext's faster).
"""

import argparse
import os
import statistics

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SOURCE = r"""
#include <ATen/cpu/vec/vec.h>
#include <chrono>
#include <string>

#include "batch_norm/cpu/kernels.h"

namespace ab {
using namespace normext::batch_norm::NORMEXT_CPU_CAPABILITY;
using at::vec::Vectorized;
constexpr float kShift = 0.25f, kScale = 1.5f, kOffset = -0.5f;

// The reducer's statistics loop, as normext runs it.
template <typename T>
float stats_normext(const T* x, int64_t n) {
  float lanes[cpu::kTerms][cpu::kLanes] = {};
  const float shift[1] = {kShift};
  cpu::add_run_in_lanes(cpu::ShiftedSums<T, float>{x, shift}, 0, 0, n, lanes);
  return lanes[0][0] + lanes[1][0];
}

// at::vec's widening of a 16-bit vector to two float vectors, and back.
inline std::tuple<Vectorized<float>, Vectorized<float>> widen(const Vectorized<c10::Half>& v) {
  return at::vec::convert_half_float(v);
}
inline std::tuple<Vectorized<float>, Vectorized<float>> widen(
    const Vectorized<c10::BFloat16>& v) {
  return at::vec::convert_bfloat16_float(v);
}
inline Vectorized<c10::Half> narrow(const Vectorized<float>& a, const Vectorized<float>& b,
                                    c10::Half) {
  return at::vec::convert_float_half(a, b);
}
inline Vectorized<c10::BFloat16> narrow(const Vectorized<float>& a, const Vectorized<float>& b,
                                        c10::BFloat16) {
  return at::vec::convert_float_bfloat16(a, b);
}

// The same sums through at::vec (n a multiple of the 16-bit vector size).
template <typename T>
float stats_vec(const T* x, int64_t n) {
  using Fvec = Vectorized<float>;
  Fvec s(0), s2(0);
  const Fvec shift(kShift);
  for (int64_t i = 0; i < n; i += Vectorized<T>::size()) {
    auto [lo, hi] = widen(Vectorized<T>::loadu(x + i));
    const Fvec d_lo = lo - shift, d_hi = hi - shift;
    s = s + d_lo + d_hi;
    s2 = at::vec::fmadd(d_lo, d_lo, s2);
    s2 = at::vec::fmadd(d_hi, d_hi, s2);
  }
  float out[Fvec::size()];
  (s + s2).store(out);
  return out[0];
}

// y = x * a + b, normext's way (the elementwise passes' cpu::load_vector and
// store_vector: F16C for float16, at::vec's conversions for bfloat16).
template <typename T>
void affine_normext(const T* x, T* y, int64_t n) {
  const auto a = cpu::splat(kScale), b = cpu::splat(kOffset);
  for (int64_t i = 0; i < n; i += cpu::kVectorLanes) {
    cpu::store_vector(y + i, cpu::load_vector(x + i) * a + b);
  }
}

template <typename T>
void affine_vec(const T* x, T* y, int64_t n) {
  using Fvec = Vectorized<float>;
  const Fvec a(kScale), b(kOffset);
  for (int64_t i = 0; i < n; i += Vectorized<T>::size()) {
    auto [lo, hi] = widen(Vectorized<T>::loadu(x + i));
    narrow(at::vec::fmadd(lo, a, b), at::vec::fmadd(hi, a, b), T()).store(y + i);
  }
}

template <typename F>
double seconds_per_rep(int64_t reps, const F& fn) {
  const auto start = std::chrono::steady_clock::now();
  for (int64_t r = 0; r < reps; ++r) fn();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / reps;
}

// Seconds per pass of `variant` over x (and y); `sink` keeps the sums alive.
double time_variant(const std::string& variant, at::Tensor x, at::Tensor y, int64_t reps) {
  const int64_t n = x.numel();
  volatile float sink = 0;
  auto run = [&](auto* xp, auto* yp) -> double {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(xp)>>;
    if (variant == "stats_normext") return seconds_per_rep(reps, [&] { sink = stats_normext(xp, n); });
    if (variant == "affine_normext") return seconds_per_rep(reps, [&] { affine_normext(xp, yp, n); });
    if constexpr (std::is_same_v<T, cpu::Float16>) {
      const auto* hx = reinterpret_cast<const c10::Half*>(xp);
      auto* hy = reinterpret_cast<c10::Half*>(yp);
      if (variant == "stats_vec") return seconds_per_rep(reps, [&] { sink = stats_vec(hx, n); });
      if (variant == "affine_vec") return seconds_per_rep(reps, [&] { affine_vec(hx, hy, n); });
    } else {
      if (variant == "stats_vec") return seconds_per_rep(reps, [&] { sink = stats_vec(xp, n); });
      if (variant == "affine_vec") return seconds_per_rep(reps, [&] { affine_vec(xp, yp, n); });
    }
    TORCH_CHECK(false, "unknown variant ", variant);
  };
  if (x.scalar_type() == at::kHalf) {
    return run(reinterpret_cast<const cpu::Float16*>(x.const_data_ptr<c10::Half>()),
               reinterpret_cast<cpu::Float16*>(y.mutable_data_ptr<c10::Half>()));
  }
  return run(x.const_data_ptr<c10::BFloat16>(), y.mutable_data_ptr<c10::BFloat16>());
}
}  // namespace ab
"""

VARIANT_FLAGS = {
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}


def build(capability):
    """The loops above compiled as setup.py compiles that CPU variant."""
    flags = ["-O3", "-g0", "-fopenmp", f"-DNORMEXT_CPU_CAPABILITY={capability}",
             f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}"]
    binding = SOURCE + r"""
#include <torch/extension.h>
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("time_variant", &ab::time_variant); }
"""
    return cpp_extension.load_inline(
        f"normext_conversions_ab_{capability.lower()}", cpp_sources=binding,
        extra_cflags=flags + VARIANT_FLAGS[capability],
        extra_include_paths=[os.path.join(ROOT, "csrc")], extra_ldflags=["-fopenmp"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=32768)
    parser.add_argument("--reps", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    capabilities = ["AVX2"] + (["AVX512"] if torch.backends.cpu.get_cpu_capability()
                               in ("AVX512", "AVX512_BF16", "AMX") else [])
    print(f"{args.elements} elements, {args.reps} passes per timing, medians of "
          f"{args.rounds} interleaved rounds; torch {torch.__version__}")
    print("| ISA | dtype | loop | normext ns/elem | at::vec ns/elem | normext/at::vec |")
    print("|---|---|---|---:|---:|---:|")
    for capability in capabilities:
        module = build(capability)
        for dtype in (torch.float16, torch.bfloat16):
            x = torch.randn(args.elements).to(dtype)
            y = torch.empty_like(x)
            for loop in ("stats", "affine"):
                names = [f"{loop}_normext", f"{loop}_vec"]
                times = {name: [] for name in names}
                for round_ in range(args.rounds):
                    for name in names if round_ % 2 == 0 else names[::-1]:
                        times[name].append(module.time_variant(name, x, y, args.reps))
                ours, theirs = (statistics.median(times[name]) * 1e9 / args.elements
                                for name in names)
                print(f"| {capability.lower()} | {str(dtype)[6:]} | {loop} | {ours:.3f} | "
                      f"{theirs:.3f} | {ours / theirs:.2f} |", flush=True)


if __name__ == "__main__":
    main()

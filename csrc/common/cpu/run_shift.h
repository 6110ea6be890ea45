// The shift a norm's one-pass moments subtract (common/math.h:
// shifted_moments) for a contiguous run its task reduces while the run is in
// cache (a layer norm's row, a contiguous group norm's group).
#pragma once

#include <cstdint>

#include "common/cpu/capability.h"
#include "common/cpu/reduce.h"
#include "common/math.h"

namespace normext::cpu::NORMEXT_CPU_CAPABILITY {

// Runs of up to this many bytes take their shift from a first pass over the
// run, whose mean is the best shift, and are then read again from cache (L2);
// longer runs take sample_shift's, which reads 8 elements. On short rows the
// in-cache pass cost less than sample_shift's scattered loads and sort
// (benchmarks/history/2026-12.md, session 6).
constexpr int64_t kMeanPassBytes = 256 * 1024;

// The shift of `length` elements from `run`, as a value acc_t holds exactly
// (so that the deviations and the mean use one value); 0 unless finite.
template <typename acc_t, typename T>
acc_t run_shift(const T* run, int64_t length) {
  if (length * static_cast<int64_t>(sizeof(T)) <= kMeanPassBytes) {
    const acc_t zero = 0;
    double sums[kTerms];
    reduce_run(ShiftedSums<T, acc_t>{run, &zero}, 0, length, sums);
    const acc_t mean = static_cast<acc_t>(sums[0] / static_cast<double>(length));
    return mean - mean == acc_t(0) ? mean : acc_t(0);
  }
  return math::NORMEXT_CPU_CAPABILITY::sample_shift<acc_t>(
      length, [&](int64_t j) { return static_cast<double>(run[j]); });
}

}  // namespace normext::cpu::NORMEXT_CPU_CAPABILITY

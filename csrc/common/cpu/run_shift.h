// The moments of a contiguous run its task reduces while the run is in cache
// (a layer norm's row, a contiguous group norm's group): from a first pass
// where that is exact enough, else the shift for a one-pass shifted sum
// (common/math.h: shifted_moments).
#pragma once

#include <cmath>
#include <cstdint>

#include "common/cpu/capability.h"
#include "common/cpu/reduce.h"
#include "common/math.h"

namespace normext::cpu::NORMEXT_CPU_CAPABILITY {

// Runs of up to this many bytes have a first pass over the run (whose mean is
// the best shift, read again from cache (L2) where the shifted pass is
// needed); longer runs take sample_shift's, which reads 8 elements. On short
// rows the in-cache pass cost less than sample_shift's scattered loads and
// sort (benchmarks/history/2026-12.md, session 6).
constexpr int64_t kMeanPassBytes = 256 * 1024;

// The mean and m2 (the sum of squared deviations) of `length` elements from
// `run`'s first pass alone (sums of x and x^2), when that pass's mean is at
// most its standard deviation, so that E[x^2] - mean^2 loses at most a bit to
// cancellation beyond the sums' own rounding (and x^2 did not overflow):
// returns true, and the second pass (sums of deviations from a shift) is not
// needed.
// Otherwise returns false with that pass's shift: the first pass's mean, as
// a value acc_t holds exactly, 0 unless finite; or sample_shift's for runs
// over kMeanPassBytes, which have no first pass.
template <typename acc_t, typename T>
bool run_moments_or_shift(const T* run, int64_t length, double& mean, double& m2, acc_t& shift) {
  if (length * static_cast<int64_t>(sizeof(T)) <= kMeanPassBytes) {
    const acc_t zero = 0;
    double sums[kTerms];
    reduce_run(ShiftedSums<T, acc_t>{run, &zero}, 0, length, sums);
    const double count = static_cast<double>(length);
    const double count_mean_squared = sums[0] * sums[0] / count;
    const double deviations = sums[1] - count_mean_squared;
    if (std::isfinite(sums[1]) && deviations >= count_mean_squared) {
      mean = sums[0] / count;
      m2 = deviations;
      return true;
    }
    const acc_t first_mean = static_cast<acc_t>(sums[0] / count);
    shift = first_mean - first_mean == acc_t(0) ? first_mean : acc_t(0);
    return false;
  }
  shift = math::NORMEXT_CPU_CAPABILITY::sample_shift<acc_t>(
      length, [&](int64_t j) { return static_cast<double>(run[j]); });
  return false;
}

// The mean and m2 of a contiguous run in cache: from its first pass where
// that is exact enough, else from the sums of deviations from the shift it
// gives (a second pass, from cache).
template <typename acc_t, typename T>
void run_moments(const T* run, int64_t length, double& mean, double& m2) {
  acc_t shift;
  if (run_moments_or_shift(run, length, mean, m2, shift)) return;
  double sums[kTerms];
  reduce_run(ShiftedSums<T, acc_t>{run, &shift}, 0, length, sums);
  math::NORMEXT_CPU_CAPABILITY::shifted_moments(static_cast<double>(shift), sums[0], sums[1],
                                                static_cast<double>(length), mean, m2);
}

}  // namespace normext::cpu::NORMEXT_CPU_CAPABILITY

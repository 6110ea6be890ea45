// CPU kernels of the group-norm ops and what their passes share. Contiguous
// data: a (sample, group) is one run of channels_per_group * L elements,
// reduced and written by one task while it is in cache, as a layer norm's row.
// Channels-last data: a sample's (L, C) rows are reduced per channel by the
// shared reducer without converting the layout, the channels' sums added per
// group, and a second pass writes the output.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/activation.h"
#include "common/channel_view.h"
#include "common/cpu/capability.h"
#include "common/cpu/loops.h"
#include "common/cpu/normalize16.h"
#include "common/cpu/reduce.h"
#include "common/cpu/run_shift.h"
#include "common/cpu/vector_silu.h"
#include "common/math.h"

namespace normext::group_norm::NORMEXT_CPU_CAPABILITY {

// The kernels compiled for this capability.
struct CpuKernels {
#include "group_norm/kernel_api.h"
};

namespace cpu {

using namespace normext::cpu::NORMEXT_CPU_CAPABILITY;  // the reducer and the loops' types
using namespace normext::math::NORMEXT_CPU_CAPABILITY;  // moments and gradient coefficients
using namespace normext::NORMEXT_CPU_CAPABILITY;        // the activations

// N samples of C channels in G groups, L spatial elements per channel.
struct GroupShape {
  int64_t N, C, L, G;
  // Each (sample, group) is one contiguous run: the contiguous layout, or L == 1.
  bool runs;
  int64_t channels_per_group() const { return C / G; }
  int64_t count() const { return C / G * L; }  // elements per group
};

inline GroupShape shape_of(const ChannelView& v, int64_t groups) {
  return {v.outer, v.channels, v.inner, groups, !v.channels_last || v.inner == 1};
}

// fn(n) for every sample n: in parallel over samples where they are enough to
// occupy every thread (each sample's reduction then runs within its task),
// else one after another, each reduction parallel inside. The reducer's sums
// do not depend on the split.
template <typename F>
void for_each_sample(int64_t samples, const F& fn) {
  if (samples >= at::get_num_threads()) {
    at::parallel_for(0, samples, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) fn(n);
    });
  } else {
    for (int64_t n = 0; n < samples; ++n) fn(n);
  }
}

// Channel c's group statistic for every (sample, channel): per_group[n * G + c / Cg].
template <typename acc_t>
std::vector<acc_t> per_channel(const GroupShape& s, const acc_t* per_group) {
  std::vector<acc_t> values(s.N * s.C);
  const int64_t Cg = s.channels_per_group();
  for (int64_t r = 0; r < s.N * s.G; ++r) std::fill_n(values.begin() + r * Cg, Cg, per_group[r]);
  return values;
}

// Per (sample, channel): the affine's scale rstd * weight[c] and its bias[c].
template <typename acc_t>
void channel_affine(const GroupShape& s, const acc_t* rstd, const std::vector<acc_t>& weight,
                    const std::vector<acc_t>& bias, std::vector<acc_t>& scale_c,
                    std::vector<acc_t>& bias_c) {
  scale_c = per_channel(s, rstd);
  bias_c.resize(s.N * s.C);
  for (int64_t n = 0; n < s.N; ++n) {
    for (int64_t c = 0; c < s.C; ++c) scale_c[n * s.C + c] *= weight[c];
    std::copy(bias.begin(), bias.end(), bias_c.begin() + n * s.C);
  }
}

}  // namespace cpu
}  // namespace normext::group_norm::NORMEXT_CPU_CAPABILITY

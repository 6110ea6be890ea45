// CPU kernels of the layer-norm ops and what their passes share. A row is
// reduced and written by one task while it is in cache: one read of the input
// from memory per pass.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/cpu/capability.h"
#include "common/cpu/loops.h"
#include "common/cpu/normalize16.h"
#include "common/cpu/reduce.h"
#include "common/cpu/run_shift.h"
#include "common/math.h"
#include "layer_norm/common.h"

namespace normext::layer_norm::NORMEXT_CPU_CAPABILITY {

// The kernels compiled for this capability.
struct CpuKernels {
#include "layer_norm/kernel_api.h"
};

namespace cpu {

using namespace normext::cpu::NORMEXT_CPU_CAPABILITY;  // the reducer and the loops' types
using namespace normext::math::NORMEXT_CPU_CAPABILITY;  // moments and gradient coefficients

// fn(row) over rows in parallel, a task taking rows of kGrainElements elements or more.
template <typename F>
void for_each_row(const Rows& v, const F& fn) {
  at::parallel_for(0, v.rows, grain_for(v.features), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) fn(r);
  });
}

}  // namespace cpu
}  // namespace normext::layer_norm::NORMEXT_CPU_CAPABILITY

// CUDA kernels of the layer-norm ops (host entry points; the device code is
// in the .cu files beside this one).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "layer_norm/common.h"

namespace normext::layer_norm {

// Same contract as CpuKernels; every kernel runs on the current stream of the
// input's device, never synchronizes with the host, and gives the same bits
// on every run (fixed-order tree sums, no atomics).
struct CudaKernels {
  static at::Tensor empty_output(const Rows& like, c10::ArrayRef<const void*> /*reads*/) {
    return at::empty(like.data.sizes(), like.data.options());
  }
#include "layer_norm/kernel_api.h"
};

}  // namespace normext::layer_norm

// CUDA kernels of the batch-norm ops (host entry points; the device code is
// in the .cu files beside this one).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_strided.h>

#include "batch_norm/common.h"

namespace normext::batch_norm {

// Same contract as CpuKernels; every kernel runs on the current stream of the
// input's device and never synchronizes with the host.
struct CudaKernels {
  static at::Tensor empty_output(const ChannelView& like, c10::ArrayRef<const void*> /*reads*/) {
    return at::empty_strided(like.data.sizes(), like.data.strides(), like.data.options());
  }
  // backward_reduce leaves fused.grad_residual to backward_elemt (kernel_api.h).
  static constexpr bool kReduceWritesGradResidual = false;
#include "batch_norm/kernel_api.h"
};

}  // namespace normext::batch_norm

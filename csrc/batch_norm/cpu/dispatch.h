// The CPU kernels the ops call (register.cpp). setup.py compiles the kernels
// once per instruction set (common/cpu/capability.h); each call here runs the
// variant for the instruction set torch's own CPU kernels use.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include "batch_norm/common.h"

namespace normext::batch_norm {

struct CpuKernels {
  // An output in the layout of `like`, from normext's CPU block cache, placed
  // apart from the tensors the kernel writing it `reads`.
  static at::Tensor empty_output(const ChannelView& like, c10::ArrayRef<const void*> reads);
  // backward_reduce writes dz where it is the residual's gradient (kernel_api.h).
  static constexpr bool kReduceWritesGradResidual = true;
#include "batch_norm/kernel_api.h"
};

}  // namespace normext::batch_norm

// The CPU layer-norm kernels the ops call (register.cpp); each call runs the
// variant compiled for the instruction set torch's own CPU kernels use
// (common/cpu/dispatch.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include "layer_norm/common.h"

namespace normext::layer_norm {

struct CpuKernels {
  // A contiguous output shaped as `like`, from normext's CPU block cache,
  // placed apart from the tensors the kernel writing it `reads`.
  static at::Tensor empty_output(const Rows& like, c10::ArrayRef<const void*> reads);
#include "layer_norm/kernel_api.h"
};

}  // namespace normext::layer_norm

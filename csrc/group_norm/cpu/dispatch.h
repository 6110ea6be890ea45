// The CPU group-norm kernels the ops call (register.cpp); each call runs the
// variant compiled for the instruction set torch's own CPU kernels use
// (common/cpu/dispatch.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include "common/activation.h"
#include "common/channel_view.h"

namespace normext::group_norm {

struct CpuKernels {
  // An output dense in `like`'s layout, from normext's CPU block cache,
  // placed apart from the tensors the kernel writing it `reads`.
  static at::Tensor empty_output(const ChannelView& like, c10::ArrayRef<const void*> reads);
#include "group_norm/kernel_api.h"
};

}  // namespace normext::group_norm

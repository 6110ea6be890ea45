// Registers the CPU kernels for every normext group-norm op.
#include <torch/library.h>

#include "common/cpu_output_allocator.h"
#include "group_norm/cpu/dispatch.h"
#include "group_norm/ops.h"

namespace normext::group_norm {

at::Tensor CpuKernels::empty_output(const ChannelView& like, c10::ArrayRef<const void*> reads) {
  return empty_cpu_output(like.data.sizes(), like.data.strides(), like.data.scalar_type(), reads);
}

TORCH_LIBRARY_IMPL(normext, CPU, m) { register_group_norm_ops<CpuKernels>(m); }

}  // namespace normext::group_norm

// Registers the CPU kernels for every normext batch-norm op.
#include <torch/library.h>

#include "batch_norm/cpu/dispatch.h"
#include "batch_norm/ops.h"
#include "common/cpu_output_allocator.h"

namespace normext::batch_norm {

at::Tensor CpuKernels::empty_output(const ChannelView& like, c10::ArrayRef<const void*> reads) {
  return empty_cpu_output(like.data.sizes(), like.data.strides(), like.data.scalar_type(), reads);
}


TORCH_LIBRARY_IMPL(normext, CPU, m) { register_batch_norm_ops<CpuKernels>(m); }

}  // namespace normext::batch_norm

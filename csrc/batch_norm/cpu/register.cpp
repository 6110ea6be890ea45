// Registers the CPU kernels for every normext batch-norm op.
#include <torch/library.h>

#include "batch_norm/cpu/kernels.h"
#include "batch_norm/ops.h"
#include "common/cpu_output_allocator.h"

namespace normext::batch_norm {

at::Tensor CpuKernels::empty_output(const ChannelView& input) {
  return empty_cpu_output(input.data.sizes(), input.data.strides(), input.data.scalar_type());
}


TORCH_LIBRARY_IMPL(normext, CPU, m) { register_batch_norm_ops<CpuKernels>(m); }

}  // namespace normext::batch_norm

// Registers the CPU kernels for every normext layer-norm op.
#include <torch/library.h>

#include "common/cpu_output_allocator.h"
#include "layer_norm/cpu/dispatch.h"
#include "layer_norm/ops.h"

namespace normext::layer_norm {

at::Tensor CpuKernels::empty_output(const Rows& like, c10::ArrayRef<const void*> reads) {
  return empty_cpu_output(like.data.sizes(), like.data.strides(), like.data.scalar_type(), reads);
}

TORCH_LIBRARY_IMPL(normext, CPU, m) { register_layer_norm_ops<CpuKernels>(m); }

}  // namespace normext::layer_norm

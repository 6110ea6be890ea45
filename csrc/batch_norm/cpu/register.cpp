// Registers the CPU kernels for every normext batch-norm op.
#include <torch/library.h>

#include "batch_norm/cpu/kernels.h"
#include "batch_norm/ops.h"
#include "common/cpu_output_allocator.h"

namespace normext::batch_norm {

at::Tensor CpuKernels::empty_output(const ChannelView& input) {
  return empty_cpu_output(input.data.sizes(), input.data.strides(), input.data.scalar_type());
}

namespace {

using Ops = BatchNormOps<CpuKernels>;

TORCH_LIBRARY_IMPL(normext, CPU, m) {
  m.impl("batch_norm_moments", &Ops::moments);
  m.impl("batch_norm_finalize", &Ops::finalize);
  m.impl("batch_norm_elemt", &Ops::elemt);
  m.impl("batch_norm_backward_reduce", &Ops::backward_reduce);
  m.impl("batch_norm_backward_elemt", &Ops::backward_elemt);
  m.impl("batch_norm_forward", &Ops::forward);
  m.impl("batch_norm_backward", &Ops::backward);
}

}  // namespace
}  // namespace normext::batch_norm

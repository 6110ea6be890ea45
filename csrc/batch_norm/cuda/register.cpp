// Registers the CUDA kernels for every normext batch-norm op.
#include <torch/library.h>

#include "batch_norm/cuda/kernels.h"
#include "batch_norm/ops.h"

namespace normext::batch_norm {
namespace {

using Ops = BatchNormOps<CudaKernels>;

TORCH_LIBRARY_IMPL(normext, CUDA, m) {
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

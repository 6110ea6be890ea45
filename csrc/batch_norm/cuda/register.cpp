// Registers the CUDA kernels for every normext batch-norm op.
#include <torch/library.h>

#include "batch_norm/cuda/kernels.h"
#include "batch_norm/ops.h"

namespace normext::batch_norm {

TORCH_LIBRARY_IMPL(normext, CUDA, m) { register_batch_norm_ops<CudaKernels>(m); }

}  // namespace normext::batch_norm

// Registers the CUDA kernels for every normext layer-norm op.
#include <torch/library.h>

#include "layer_norm/cuda/kernels.h"
#include "layer_norm/ops.h"

namespace normext::layer_norm {

TORCH_LIBRARY_IMPL(normext, CUDA, m) { register_layer_norm_ops<CudaKernels>(m); }

}  // namespace normext::layer_norm

// The layer-norm view of an input: rows of `features` contiguous elements,
// each normalized by its own statistics (LayerNorm over the trailing
// normalized_shape; RMSNorm the same with the mean fixed at 0).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace normext::layer_norm {

struct Rows {
  at::Tensor data;  // contiguous
  int64_t rows, features;
};

}  // namespace normext::layer_norm

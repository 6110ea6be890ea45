// What the layer-norm CUDA kernels share: a block of kThreads threads per
// row, its sums added in double in a fixed tree order (batch norm's
// block_tree_add), parameters in the accumulate type.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>

#include "batch_norm/cuda/reduce.cuh"
#include "common/math.h"
#include "layer_norm/common.h"

namespace normext::layer_norm::cuda {

using normext::batch_norm::cuda::kThreads;
using normext::batch_norm::cuda::Sums;

// The block's sums of (first, second) over its threads, in every thread.
// `shared` holds kThreads sums; it may be reused as soon as this returns.
__device__ inline Sums<double> block_sums(Sums<double>* shared, double first, double second) {
  shared[threadIdx.x] = {first, second};
  normext::batch_norm::cuda::block_tree_add(shared);
  __syncthreads();
  const Sums<double> total = shared[0];
  __syncthreads();
  return total;
}

// A per-feature parameter in the accumulate type (flat), undefined if absent.
inline at::Tensor accumulate_param(const at::Tensor& param, at::ScalarType acc) {
  return param.defined() ? param.reshape(-1).to(acc).contiguous() : param;
}

// One block per row: the grid's x dimension holds up to 2^31 - 1 rows.
inline void check_rows(const Rows& v) {
  TORCH_CHECK(v.rows <= std::numeric_limits<int32_t>::max(),
              "layer_norm: CUDA kernels take at most 2^31 - 1 rows, got ", v.rows);
}

}  // namespace normext::layer_norm::cuda

// CUDA kernels of the batch-norm ops (host entry points; the device code is
// in the .cu files beside this one).
#pragma once

#include <ATen/ATen.h>

#include "batch_norm/common.h"

namespace normext::batch_norm {

// Same contract as CpuKernels; every kernel runs on the current stream of the
// input's device and never synchronizes with the host.
struct CudaKernels {
  static at::Tensor empty_output(const ChannelView& like, c10::ArrayRef<const void*> /*reads*/) {
    return at::empty_strided(like.data.sizes(), like.data.strides(), like.data.options());
  }
  static void moments(const ChannelView& input, at::Tensor& mean, at::Tensor& var);
  static void finalize(const at::Tensor& mean, const at::Tensor& var, double count,
                       const at::Tensor& running_mean, const at::Tensor& running_var,
                       double momentum, double eps, at::Tensor& invstd);
  static void batch_stats(const ChannelView& input, const at::Tensor& running_mean,
                          const at::Tensor& running_var, double momentum, double eps,
                          at::Tensor& mean, at::Tensor& invstd);
  static void running_stats(const at::Tensor& running_mean, const at::Tensor& running_var,
                            double eps, at::Tensor& mean, at::Tensor& invstd);
  static void normalize(const ChannelView& input, const at::Tensor& mean,
                        const at::Tensor& invstd, const at::Tensor& weight,
                        const at::Tensor& bias, at::Tensor& output);
  static void backward_reduce(const ChannelView& grad_out, const ChannelView& input,
                              const at::Tensor& mean, const at::Tensor& invstd,
                              at::Tensor& sum_dy, at::Tensor& sum_dy_xmu,
                              at::Tensor& grad_weight, at::Tensor& grad_bias);
  static void backward_elemt(const ChannelView& grad_out, const ChannelView& input,
                             const at::Tensor& mean, const at::Tensor& invstd,
                             const at::Tensor& weight, const at::Tensor& sum_dy,
                             const at::Tensor& sum_dy_xmu, double count, at::Tensor& grad_input);
};

}  // namespace normext::batch_norm

// Device-independent pieces of the batch-norm ops: input checks, the fusion
// and the (outer, C, inner) view of an input (common/channel_view.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include "common/activation.h"
#include "common/channel_view.h"

namespace normext::batch_norm {

using normext::ChannelView;
using normext::channel_view;
using normext::in_layout_of;
using normext::accumulate_type;

// What a fused batch norm does after its affine: output = activation(affine(x)
// + residual). The plain batch norm has the identity and no residual.
struct Fusion {
  ActivationSpec activation;
  at::Tensor residual;  // dense in the input's layout, or undefined

  bool plain() const {
    return activation.kind == Activation::kIdentity && !residual.defined();
  }
};

// What the backward kernels read to take the gradient through a fusion: the
// gradient at the activation's input dz = dy * activation'(z), with z
// recomputed from the input x (and the residual), or activation' taken from
// the forward's output y (`output`: no residual needed), or (from_output, the
// memory-efficient mode) z = activation^-1(y) and x - mean = (z - bias -
// residual) / (invstd * weight).
struct FusedGrad {
  Fusion fusion;
  at::Tensor weight, bias;   // the affine's (undefined: 1 and 0)
  bool from_output = false;  // the kernels' input is the forward's output y
  at::Tensor output;         // y beside the input x (dense, input's layout), or undefined
  // dz, if defined (dense, input's layout): written by backward_elemt, or by
  // backward_reduce (kernel_api.h: kReduceWritesGradResidual)
  at::Tensor grad_residual;
};

// The activation named `name` (common/activation.h: activation_spec), with
// batch_norm_act's error message.
inline ActivationSpec activation_spec(c10::string_view name, double negative_slope, double alpha) {
  return normext::activation_spec(name, negative_slope, alpha, "batch_norm_act");
}

// Raises ValueError unless the backward can recover the activation's input from
// its output (memory_efficient): identity, leaky_relu with a positive slope,
// elu with a positive alpha.
void check_invertible(const ActivationSpec& activation);

// Whether every channel's affine can be inverted from the output to the
// normalized input to float accuracy: |weight| >= kMinInvertibleWeight *
// max(1, |bias|), as a 0-dim bool tensor on the weight's device.
constexpr double kMinInvertibleWeight = 1e-3;
at::Tensor invertible_weights(const at::Tensor& weight, const at::Tensor& bias);
// The same as a bool (one device-to-host copy of it for a GPU tensor); true
// for an undefined weight (1).
bool weights_invertible(const at::Tensor& weight, const at::Tensor& bias);

// Raises for a non-floating input (NotImplementedError, as torch does) or
// fewer than 2 dims.
void check_input(const at::Tensor& input);

// Raises unless every given per-channel tensor has `channels` elements, lives
// on the input's device, and all share one dtype: the input's, or float32 for
// a half/bfloat16 input (the mixed precision torch accepts).
void check_params(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                  const c10::optional<at::Tensor>& bias,
                  const c10::optional<at::Tensor>& running_mean,
                  const c10::optional<at::Tensor>& running_var);

// Raises unless `stat` is a per-channel statistics tensor for `input`
// (channels elements of the accumulate type, on the input's device).
void check_stat(const at::Tensor& input, const at::Tensor& stat, const char* name);

// Whether the CUDA reductions (cuda/reduce.cuh) merge each channel's partial
// sums in the last block of their first kernel instead of in a second kernel:
// a launch fewer per statistics and per backward reduction. Off until
// tests/test_cuda.py has passed with it on a GPU (compiled, not run yet);
// normext._C.set_cuda_merge_in_last_block switches it and returns the
// previous setting.
bool cuda_merge_in_last_block();
bool set_cuda_merge_in_last_block(bool enabled);

// Raises unless `other` has the shape and device of `input` and the same dtype.
void check_same_as_input(const at::Tensor& input, const at::Tensor& other, const char* name);

}  // namespace normext::batch_norm

// The layer-norm op schemas (LayerNorm, and RMSNorm where rms: no mean, no
// bias): the normext library's fragment for this norm. The statistics are one
// value per row of the trailing normalized_shape, shaped as torch's
// native_layer_norm returns them, in float32 (float64 for a float64 input).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(normext, m) {
  m.def(
      "layer_norm_forward(Tensor input, int[] normalized_shape, Tensor? weight, "
      "Tensor? bias, float eps, bool rms) -> (Tensor output, Tensor mean, Tensor rstd)");
  // The pre-norm residual step: (layer_norm(input + residual), input + residual),
  // the sum rounded to the input's dtype; the backward is layer_norm_backward
  // of the sum.
  m.def(
      "add_layer_norm_forward(Tensor input, Tensor residual, int[] normalized_shape, "
      "Tensor? weight, Tensor? bias, float eps, bool rms) "
      "-> (Tensor output, Tensor sum, Tensor mean, Tensor rstd)");
  // output_mask: which of (grad_input, grad_weight, grad_bias) to compute;
  // the others are returned undefined. grad_sum (the input's shape and dtype)
  // is added to grad_input in its pass: add + LayerNorm's backward, whose sum
  // has a gradient of its own.
  m.def(
      "layer_norm_backward(Tensor grad_out, Tensor input, int[] normalized_shape, "
      "Tensor mean, Tensor rstd, Tensor? weight, bool rms, bool[3] output_mask, "
      "Tensor? grad_sum=None) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
}

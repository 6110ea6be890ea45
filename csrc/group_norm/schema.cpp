// The group-norm op schemas (GroupNorm, and InstanceNorm as one group per
// channel): the normext library's fragment for this norm. The statistics are
// one value per (sample, group), shaped (N, groups) as torch's
// native_group_norm returns them, in float32 (float64 for a float64 input).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(normext, m) {
  m.def(
      "group_norm_forward(Tensor input, int groups, Tensor? weight, Tensor? bias, float eps) "
      "-> (Tensor output, Tensor mean, Tensor rstd)");
  // output_mask: which of (grad_input, grad_weight, grad_bias) to compute;
  // the others are returned undefined.
  m.def(
      "group_norm_backward(Tensor grad_out, Tensor input, int groups, Tensor mean, Tensor rstd, "
      "Tensor? weight, bool[3] output_mask) -> (Tensor grad_input, Tensor grad_weight, "
      "Tensor grad_bias)");
}

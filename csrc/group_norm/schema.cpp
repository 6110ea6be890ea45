// The group-norm op schemas (GroupNorm, and InstanceNorm as one group per
// channel; GroupNorm + activation with `activation`, batch_norm_act's names):
// the normext library's fragment for this norm. The statistics are
// one value per (sample, group), shaped (N, groups) as torch's
// native_group_norm returns them, in float32 (float64 for a float64 input).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(normext, m) {
  m.def(
      "group_norm_forward(Tensor input, int groups, Tensor? weight, Tensor? bias, float eps, "
      "str activation=\"identity\", float negative_slope=0.01, float alpha=1.0) "
      "-> (Tensor output, Tensor mean, Tensor rstd)");
  // output_mask: which of (grad_input, grad_weight, grad_bias) to compute;
  // the others are returned undefined.
  m.def(
      "group_norm_backward(Tensor grad_out, Tensor input, int groups, Tensor mean, Tensor rstd, "
      "Tensor? weight, Tensor? bias, bool[3] output_mask, str activation=\"identity\", "
      "float negative_slope=0.01, float alpha=1.0) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
}

// The batch-norm op schemas: the normext library's fragment for this norm.
#include <torch/library.h>

// Per-channel statistics over every dim but dim 1, in float32 (float64 for a
// float64 input). `count` is the number of elements each channel's statistics
// cover (across all ranks for a synchronized batch norm).
TORCH_LIBRARY_FRAGMENT(normext, m) {
  m.def("batch_norm_moments(Tensor input) -> (Tensor mean, Tensor var)");
  m.def(
      "batch_norm_finalize(Tensor mean, Tensor var, float count, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, float momentum, float eps) -> Tensor invstd");
  m.def(
      "batch_norm_elemt(Tensor input, Tensor? weight, Tensor? bias, Tensor mean, "
      "Tensor invstd) -> Tensor");
  m.def(
      "batch_norm_backward_reduce(Tensor grad_out, Tensor input, Tensor mean, Tensor invstd, "
      "Tensor? weight) -> (Tensor sum_dy, Tensor sum_dy_xmu, Tensor grad_weight, "
      "Tensor grad_bias)");
  m.def(
      "batch_norm_backward_elemt(Tensor grad_out, Tensor input, Tensor mean, Tensor invstd, "
      "Tensor? weight, Tensor sum_dy, Tensor sum_dy_xmu, float count) -> Tensor");
  m.def(
      "batch_norm_forward(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, bool training, float momentum, float eps) "
      "-> (Tensor output, Tensor save_mean, Tensor save_invstd)");
  m.def(
      "batch_norm_backward(Tensor grad_out, Tensor input, Tensor? weight, Tensor save_mean, "
      "Tensor save_invstd, bool training, bool parameter_grads=True) -> (Tensor grad_input, "
      "Tensor grad_weight, Tensor grad_bias)");
  // torch.nn.functional.batch_norm's contract: the output only, differentiable
  // (batch_norm/autograd.cpp), for eager calls.
  m.def(
      "batch_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, bool training, float momentum, float eps) -> Tensor");

  // Batch norm with its activation (and a residual added before it) fused:
  // output = activation(batch_norm(input) + residual). The backward reads the
  // forward's input (`saved`) and either the residual (to recompute the
  // activation's input) or the output (the activation's derivative from it:
  // not silu, nor a negative slope or alpha); or, saved_is_output, the output
  // alone (memory_efficient). It returns grad_residual where it is given a
  // residual or an output.
  m.def(
      "batch_norm_act_forward(Tensor input, Tensor? weight, Tensor? bias, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, bool training, float momentum, "
      "float eps, str activation, float negative_slope, float alpha, Tensor? residual) "
      "-> (Tensor output, Tensor save_mean, Tensor save_invstd)");
  m.def(
      "batch_norm_act_backward(Tensor grad_out, Tensor saved, Tensor? residual, Tensor? output, "
      "Tensor? weight, Tensor? bias, Tensor save_mean, Tensor save_invstd, bool training, "
      "str activation, "
      "float negative_slope, float alpha, bool saved_is_output, bool parameter_grads=True) "
      "-> (Tensor grad_input, Tensor grad_residual, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "batch_norm_act(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, bool training, float momentum, float eps, str activation, "
      "float negative_slope, float alpha, Tensor? residual, bool memory_efficient) -> Tensor");
  // The synchronized fused batch norm's pieces: batch_norm_elemt,
  // batch_norm_backward_reduce and batch_norm_backward_elemt through the
  // fusion, reading what batch_norm_act_backward reads; and whether
  // memory_efficient can keep the output (every |weight| >= 1e-3 * max(1, |bias|)),
  // a 0-dim bool tensor.
  m.def(
      "batch_norm_act_elemt(Tensor input, Tensor? weight, Tensor? bias, Tensor mean, "
      "Tensor invstd, str activation, float negative_slope, float alpha, Tensor? residual) "
      "-> Tensor");
  m.def(
      "batch_norm_act_backward_reduce(Tensor grad_out, Tensor saved, Tensor? residual, "
      "Tensor? output, Tensor? weight, Tensor? bias, Tensor mean, Tensor invstd, "
      "str activation, float negative_slope, float alpha, bool saved_is_output) "
      "-> (Tensor sum_dy, Tensor sum_dy_xmu, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "batch_norm_act_backward_elemt(Tensor grad_out, Tensor saved, Tensor? residual, "
      "Tensor? output, Tensor? weight, Tensor? bias, Tensor mean, Tensor invstd, "
      "Tensor sum_dy, Tensor sum_dy_xmu, float count, str activation, float negative_slope, "
      "float alpha, bool saved_is_output) -> (Tensor grad_input, Tensor grad_residual)");
  m.def("batch_norm_weights_invertible(Tensor weight, Tensor? bias) -> Tensor");
}

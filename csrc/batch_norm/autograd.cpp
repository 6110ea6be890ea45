// normext::batch_norm and batch_norm_act: the fused forward and backward ops
// under one hand-written autograd Node each, whose per-call bookkeeping is
// what torch's own ops pay (it matters next to a small batch norm).
#include <ATen/TensorOperators.h>
#include <ATen/TensorSubclassLikeUtils.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/rsqrt.h>
#include <ATen/ops/var.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <initializer_list>
#include <string>
#include <tuple>
#include <vector>

#include "batch_norm/common.h"
#include "common/autograd.h"

namespace normext::batch_norm {
namespace {

using Tensor = at::Tensor;
using TensorTriple = std::tuple<Tensor, Tensor, Tensor>;
using TensorQuad = std::tuple<Tensor, Tensor, Tensor, Tensor>;

// The fused ops, called below autograd (common/autograd.h). Like torch's
// batch norm, they leave the running stats' version alone.

TensorTriple fused_forward(const Tensor& input, const OptionalTensor& weight,
                           const OptionalTensor& bias, const OptionalTensor& running_mean,
                           const OptionalTensor& running_var, bool training, double momentum,
                           double eps) {
  static const auto op =
      typed_op<TensorTriple(const Tensor&, const OptionalTensor&, const OptionalTensor&,
                            const OptionalTensor&, const OptionalTensor&, bool, double, double)>(
          "normext::batch_norm_forward");
  return call_below_autograd(op, input, weight, bias, running_mean, running_var, training,
                             momentum, eps);
}

TensorTriple fused_backward(const Tensor& grad_out, const Tensor& input,
                            const OptionalTensor& weight, const Tensor& save_mean,
                            const Tensor& save_invstd, bool training, bool parameter_grads) {
  static const auto op =
      typed_op<TensorTriple(const Tensor&, const Tensor&, const OptionalTensor&, const Tensor&,
                            const Tensor&, bool, bool)>("normext::batch_norm_backward");
  return call_below_autograd(op, grad_out, input, weight, save_mean, save_invstd, training,
                             parameter_grads);
}

TensorTriple fused_act_forward(const Tensor& input, const OptionalTensor& weight,
                               const OptionalTensor& bias, const OptionalTensor& running_mean,
                               const OptionalTensor& running_var, bool training,
                               double momentum, double eps, c10::string_view activation,
                               double negative_slope, double alpha,
                               const OptionalTensor& residual) {
  static const auto op =
      typed_op<TensorTriple(const Tensor&, const OptionalTensor&, const OptionalTensor&,
                            const OptionalTensor&, const OptionalTensor&, bool, double, double,
                            c10::string_view, double, double, const OptionalTensor&)>(
          "normext::batch_norm_act_forward");
  return call_below_autograd(op, input, weight, bias, running_mean, running_var, training,
                             momentum, eps, activation, negative_slope, alpha, residual);
}

TensorQuad fused_act_backward(const Tensor& grad_out, const Tensor& saved,
                              const OptionalTensor& residual, const OptionalTensor& output,
                              const OptionalTensor& weight, const OptionalTensor& bias,
                              const Tensor& save_mean, const Tensor& save_invstd, bool training,
                              c10::string_view activation, double negative_slope, double alpha,
                              bool saved_is_output, bool parameter_grads) {
  static const auto op =
      typed_op<TensorQuad(const Tensor&, const Tensor&, const OptionalTensor&,
                          const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
                          const Tensor&, const Tensor&, bool, c10::string_view, double, double,
                          bool, bool)>("normext::batch_norm_act_backward");
  return call_below_autograd(op, grad_out, saved, residual, output, weight, bias, save_mean,
                             save_invstd, training, activation, negative_slope, alpha,
                             saved_is_output, parameter_grads);
}

// The backward in differentiable ATen ops, for create_graph=True (double
// backward): under batch statistics the mean and variance are recomputed from
// the input so that the graph sees their dependence on it.
TensorTriple differentiable_backward(const at::Tensor& grad_out, const at::Tensor& input,
                                     const at::Tensor& weight, const at::Tensor& save_mean,
                                     const at::Tensor& save_invstd, bool training, double eps) {
  const auto type = accumulate_type(input.scalar_type());
  const at::Tensor x = input.to(type), g = grad_out.to(type);
  std::vector<int64_t> dims{0}, per_channel(input.dim(), 1);
  for (int64_t d = 2; d < input.dim(); ++d) dims.push_back(d);
  per_channel[1] = input.size(1);
  at::Tensor mean, invstd;
  if (training) {
    mean = x.mean(dims, /*keepdim=*/true);
    invstd = at::rsqrt(at::var(x, dims, /*unbiased=*/false, /*keepdim=*/true) + eps);
  } else {
    mean = save_mean.view(per_channel);
    invstd = save_invstd.view(per_channel);
  }
  const at::Tensor x_hat = (x - mean) * invstd;
  const at::Tensor scale = weight.defined() ? invstd * weight.to(type).view(per_channel) : invstd;
  const at::Tensor grad_input =
      training ? (g - g.mean(dims, true) - x_hat * (g * x_hat).mean(dims, true)) * scale
               : g * scale;
  // torch's layout: the input's, except in eval on CUDA, where its dy * scale
  // keeps grad_output's.
  at::Tensor dx = grad_input.to(input.scalar_type());
  if (training || !input.is_cuda()) dx = dx.contiguous(input.suggest_memory_format());
  return {dx, (g * x_hat).sum(dims), g.sum(dims)};
}

// Raises for what the autograd nodes cannot take: inputs with forward-mode
// tangents and, where a graph is recorded, running stats that require grad.
void check_autograd_arguments(const char* op, std::initializer_list<const OptionalTensor*> inputs,
                              const OptionalTensor& running_mean,
                              const OptionalTensor& running_var) {
  check_no_tangents(op, inputs);
  if (!at::GradMode::is_enabled()) return;
  for (const auto& [stat, name] : {std::pair{&running_mean, "running_mean"},
                                   {&running_var, "running_var"}}) {
    TORCH_CHECK(!requires_grad(*stat), "The function 'normext::", op, "' is not "
                "differentiable with respect to argument '", name,
                "'. This input cannot have requires_grad True.");
  }
}

struct BatchNormState {
  bool training = true;
  double eps = 0.0;
  at::ScalarType bias_type = at::kFloat;

  template <class Self, class F>
  static void fields(Self& s, F&& f) {
    f(s.training);
    f(s.eps);
    f(s.bias_type);
  }
};

// The backward of normext::batch_norm.
struct BatchNormBackward final : SavedStateNode<BatchNormBackward, BatchNormState, 4> {
  enum { kInput, kWeight, kMean, kInvstd };
  static constexpr const char* kFunctionalName = "normext_BatchNormBackward";
  std::string name() const override { return "normext::BatchNormBackward"; }

  // The gradients of input, weight and bias, each where `wanted`.
  static variable_list gradients(const variable_list& grad_outputs, const Tensors& t,
                                 const BatchNormState& s, const std::vector<bool>& wanted) {
    variable_list grads(3);
    const at::Tensor& grad_out = grad_outputs[0];
    if (!grad_out.defined()) return grads;
    const at::Tensor &x = t[kInput], &w = t[kWeight];
    at::Tensor grad_input, grad_weight, grad_bias;
    if (at::GradMode::is_enabled()) {  // create_graph=True
      std::tie(grad_input, grad_weight, grad_bias) = differentiable_backward(
          grad_out, x, w, t[kMean], t[kInvstd], s.training, s.eps);
    } else {
      // Frozen parameters: no sums to reduce for them (none at all in eval).
      std::tie(grad_input, grad_weight, grad_bias) =
          fused_backward(grad_out, x, as_optional(w), t[kMean], t[kInvstd], s.training,
                         wanted[1] || wanted[2]);
    }
    if (wanted[0]) grads[0] = grad_input;
    if (wanted[1]) grads[1] = as_type(grad_weight, w.scalar_type());
    if (wanted[2]) grads[2] = as_type(grad_bias, s.bias_type);
    return grads;
  }
};

at::Tensor batch_norm_autograd(const at::Tensor& input, const OptionalTensor& weight,
                               const OptionalTensor& bias, const OptionalTensor& running_mean,
                               const OptionalTensor& running_var, bool training,
                               double momentum, double eps) {
  const OptionalTensor x(input);
  check_autograd_arguments("batch_norm", {&x, &weight, &bias}, running_mean, running_var);
  auto [output, save_mean, save_invstd] =
      fused_forward(input, weight, bias, running_mean, running_var, training, momentum, eps);
  if (at::GradMode::is_enabled() &&
      (input.requires_grad() || requires_grad(weight) || requires_grad(bias))) {
    auto node = make_node<BatchNormBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(input, weight, bias));
    using Node = BatchNormBackward;
    node->save(Node::kInput, input);
    node->save(Node::kWeight, weight.value_or(at::Tensor()));
    node->save(Node::kMean, save_mean);
    node->save(Node::kInvstd, save_invstd);
    const bool has_bias = bias.has_value() && bias->defined();
    node->state = {training, eps, has_bias ? bias->scalar_type() : at::kFloat};
    torch::autograd::set_history(output, node);
    node_complete(node);
  }
  return output;
}

// The fused op's output recomputed in differentiable ATen ops from its saved
// arguments (the statistics from the input in training, as the forward
// took them), and its gradients taken through that graph: the backward for
// create_graph=True (double backward).
variable_list differentiable_act_backward(const at::Tensor& grad_out, const at::Tensor& input,
                                          const at::Tensor& weight, const at::Tensor& bias,
                                          const at::Tensor& residual,
                                          const at::Tensor& save_mean,
                                          const at::Tensor& save_invstd, bool training,
                                          double eps, const ActivationSpec& spec) {
  const auto type = accumulate_type(input.scalar_type());
  std::vector<int64_t> dims{0}, per_channel(input.dim(), 1);
  for (int64_t d = 2; d < input.dim(); ++d) dims.push_back(d);
  per_channel[1] = input.size(1);
  const at::Tensor x = input.to(type);
  at::Tensor mean = save_mean.view(per_channel), invstd = save_invstd.view(per_channel);
  if (training) {
    mean = x.mean(dims, /*keepdim=*/true);
    invstd = at::rsqrt(at::var(x, dims, /*unbiased=*/false, /*keepdim=*/true) + eps);
  }
  at::Tensor z = (x - mean) * invstd;
  if (weight.defined()) z = z * weight.to(type).view(per_channel);
  if (bias.defined()) z = z + bias.to(type).view(per_channel);
  if (residual.defined()) z = z + residual.to(type);
  const at::Tensor y = activate(z, spec);
  variable_list wanted;
  for (const at::Tensor* t : {&input, &residual, &weight, &bias}) {
    if (t->defined() && t->requires_grad()) wanted.push_back(*t);
  }
  const variable_list grads = torch::autograd::grad({y}, wanted, {grad_out.to(type)},
                                                    /*retain_graph=*/true,
                                                    /*create_graph=*/true,
                                                    /*allow_unused=*/true);
  // In the order input, residual, weight, bias; undefined where not wanted.
  variable_list out(4);
  size_t k = 0;
  int slot = 0;
  for (const at::Tensor* t : {&input, &residual, &weight, &bias}) {
    if (t->defined() && t->requires_grad()) {
      const at::Tensor& g = grads[k++];
      out[slot] = g.defined() ? g.to(t->scalar_type()) : at::zeros_like(*t);
    }
    ++slot;
  }
  return out;
}

// activation'(z) from the output y = activation(z) in differentiable ATen
// ops (elu's depends on y; the others are piecewise constant).
at::Tensor activation_grad_of_output(const at::Tensor& y, const ActivationSpec& spec) {
  const at::Tensor positive = (y > 0).to(y.scalar_type());
  switch (spec.kind) {
    case Activation::kRelu: return positive;
    case Activation::kRelu6: return positive * (y < 6).to(y.scalar_type());
    case Activation::kLeakyRelu: return positive * (1 - spec.negative_slope) + spec.negative_slope;
    case Activation::kElu: return at::where(y > 0, at::ones_like(y), y + spec.alpha);
    default: return at::ones_like(y);
  }
}

struct BatchNormActState {
  bool from_output = false;  // the saved input is the output (memory_efficient)
  bool training = true;
  double eps = 0.0;
  std::string activation;
  double negative_slope = 0.0, alpha = 0.0;
  at::ScalarType bias_type = at::kFloat;

  template <class Self, class F>
  static void fields(Self& s, F&& f) {
    f(s.from_output);
    f(s.training);
    f(s.eps);
    f(s.activation);
    f(s.negative_slope);
    f(s.alpha);
    f(s.bias_type);
  }
};

// The fused batch norm + activation's backward; with memory_efficient (and
// weights it can invert) it keeps its output instead of its input.
struct BatchNormActBackward final : SavedStateNode<BatchNormActBackward, BatchNormActState, 7> {
  // kSaved: the input, or the output when from_output; kOutput: the output
  // beside the input, where the activation's derivative comes from it.
  enum { kSaved, kWeight, kBias, kResidual, kOutput, kMean, kInvstd };
  static constexpr const char* kFunctionalName = "normext_BatchNormActBackward";
  std::string name() const override { return "normext::BatchNormActBackward"; }

  // The gradients of input, weight, bias and residual, each where `wanted`.
  static variable_list gradients(const variable_list& grad_outputs, const Tensors& t,
                                 const BatchNormActState& s, const std::vector<bool>& wanted) {
    variable_list grads(4);
    const at::Tensor& grad_out = grad_outputs[0];
    if (!grad_out.defined()) return grads;
    const at::Tensor &saved = t[kSaved], &weight = t[kWeight], &output = t[kOutput];
    at::Tensor grad_input, grad_residual, grad_weight, grad_bias;
    if (at::GradMode::is_enabled()) {  // create_graph=True
      TORCH_CHECK_NOT_IMPLEMENTED(!s.from_output,
                                  "normext: double backward through a memory_efficient batch "
                                  "norm + activation needs its input, which it did not keep; "
                                  "use memory_efficient=False");
      const ActivationSpec spec = activation_spec(s.activation, s.negative_slope, s.alpha);
      if (output.defined()) {  // the derivative from the output, as the forward saved it
        const at::Tensor dz = grad_out.to(accumulate_type(output.scalar_type())) *
                              activation_grad_of_output(output, spec);
        std::tie(grad_input, grad_weight, grad_bias) = differentiable_backward(
            dz, saved, weight, t[kMean], t[kInvstd], s.training, s.eps);
        grad_residual = dz.to(output.scalar_type());
      } else {
        const variable_list g =
            differentiable_act_backward(grad_out, saved, weight, t[kBias], t[kResidual],
                                        t[kMean], t[kInvstd], s.training, s.eps, spec);
        std::tie(grad_input, grad_residual, grad_weight, grad_bias) =
            std::tuple{g[0], g[1], g[2], g[3]};
      }
    } else {
      std::tie(grad_input, grad_residual, grad_weight, grad_bias) = fused_act_backward(
          grad_out, saved, as_optional(t[kResidual]), as_optional(output), as_optional(weight),
          as_optional(t[kBias]), t[kMean], t[kInvstd], s.training, s.activation,
          s.negative_slope, s.alpha, s.from_output, wanted[1] || wanted[2]);
    }
    if (wanted[0]) grads[0] = grad_input;
    if (wanted[1]) grads[1] = as_type(grad_weight, weight.scalar_type());
    if (wanted[2]) grads[2] = as_type(grad_bias, s.bias_type);
    if (wanted[3]) grads[3] = grad_residual;
    return grads;
  }
};

at::Tensor batch_norm_act_autograd(const at::Tensor& input, const OptionalTensor& weight,
                                   const OptionalTensor& bias,
                                   const OptionalTensor& running_mean,
                                   const OptionalTensor& running_var, bool training,
                                   double momentum, double eps, c10::string_view activation,
                                   double negative_slope, double alpha,
                                   const OptionalTensor& residual, bool memory_efficient) {
  const OptionalTensor x(input);
  check_autograd_arguments("batch_norm_act", {&x, &weight, &bias, &residual}, running_mean,
                           running_var);
  const ActivationSpec spec = activation_spec(activation, negative_slope, alpha);
  if (memory_efficient) check_invertible(spec);
  auto [output, save_mean, save_invstd] =
      fused_act_forward(input, weight, bias, running_mean, running_var, training, momentum,
                        eps, activation, negative_slope, alpha, residual);
  if (!at::GradMode::is_enabled() || !(input.requires_grad() || requires_grad(weight) ||
                                       requires_grad(bias) || requires_grad(residual))) {
    return output;
  }
  const at::Tensor w = weight.value_or(at::Tensor()), b = bias.value_or(at::Tensor());
  const at::Tensor r = residual.value_or(at::Tensor());
  auto node = make_node<BatchNormActBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(input, weight, bias, residual));
  // The weights' values decide; a traced call (torch.compile's fake or
  // functional tensors, where no values exist) keeps the input.
  const bool from_output = memory_efficient && !at::isTensorSubclassLike(input) &&
                           !(w.defined() && at::isTensorSubclassLike(w)) &&
                           weights_invertible(w, b);
  // With a residual, the output (which the next layer keeps anyway) gives
  // the activation's derivative where it can, so that the residual is not kept.
  const bool derivative_from_output = !from_output && r.defined() && grad_from_output(spec);
  torch::autograd::set_history(output, node);
  // Saved after set_history: a saved output is recorded as this node's.
  using Node = BatchNormActBackward;
  node->save(Node::kSaved, from_output ? output : input, from_output);
  node->save(Node::kWeight, w);
  node->save(Node::kBias, b);
  node->save(Node::kResidual, derivative_from_output ? at::Tensor() : r);
  node->save(Node::kOutput, derivative_from_output ? output : at::Tensor(), true);
  node->save(Node::kMean, save_mean);
  node->save(Node::kInvstd, save_invstd);
  node->state = {from_output, training, eps, std::string(activation), negative_slope, alpha,
                 b.defined() ? b.scalar_type() : at::kFloat};
  node_complete(node);
  return output;
}

}  // namespace

// The backends register the ops below autograd (ops.h: BatchNormOps::output, output_act).
TORCH_LIBRARY_IMPL(normext, Autograd, m) {
  m.impl("batch_norm", &batch_norm_autograd);
  m.impl("batch_norm_act", &batch_norm_act_autograd);
}

}  // namespace normext::batch_norm

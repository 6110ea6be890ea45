// normext::batch_norm: the fused forward and backward ops under one C++
// autograd node, which costs a fraction of a Python autograd.Function's
// bookkeeping per call (it matters next to a small batch norm).
#include <ATen/TensorOperators.h>
#include <ATen/TensorSubclassLikeUtils.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/elu.h>
#include <ATen/ops/hardtanh.h>
#include <ATen/ops/leaky_relu.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/rsqrt.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/var.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <initializer_list>
#include <string>
#include <tuple>
#include <vector>

#include "batch_norm/common.h"

namespace normext::batch_norm {
namespace {

using OptionalTensor = c10::optional<at::Tensor>;
using TensorTriple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The fused ops are called below autograd: they have no autograd kernel, and
// the boxed fallback that would run in its place costs microseconds per call.
// (Like torch's batch norm, they leave the running stats' version alone.)
TensorTriple fused_forward(const at::Tensor& input, const OptionalTensor& weight,
                           const OptionalTensor& bias, const OptionalTensor& running_mean,
                           const OptionalTensor& running_var, bool training, double momentum,
                           double eps) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("normext::batch_norm_forward", "")
          .typed<TensorTriple(const at::Tensor&, const OptionalTensor&, const OptionalTensor&,
                              const OptionalTensor&, const OptionalTensor&, bool, double,
                              double)>();
  const at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(input, weight, bias, running_mean, running_var, training, momentum, eps);
}

TensorTriple fused_backward(const at::Tensor& grad_out, const at::Tensor& input,
                            const OptionalTensor& weight, const at::Tensor& save_mean,
                            const at::Tensor& save_invstd, bool training, bool parameter_grads) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("normext::batch_norm_backward", "")
          .typed<TensorTriple(const at::Tensor&, const at::Tensor&, const OptionalTensor&,
                              const at::Tensor&, const at::Tensor&, bool, bool)>();
  const at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(grad_out, input, weight, save_mean, save_invstd, training, parameter_grads);
}

using TensorQuad = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

TensorTriple fused_act_forward(const at::Tensor& input, const OptionalTensor& weight,
                               const OptionalTensor& bias, const OptionalTensor& running_mean,
                               const OptionalTensor& running_var, bool training,
                               double momentum, double eps, c10::string_view activation,
                               double negative_slope, double alpha,
                               const OptionalTensor& residual) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("normext::batch_norm_act_forward", "")
          .typed<TensorTriple(const at::Tensor&, const OptionalTensor&, const OptionalTensor&,
                              const OptionalTensor&, const OptionalTensor&, bool, double, double,
                              c10::string_view, double, double, const OptionalTensor&)>();
  const at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(input, weight, bias, running_mean, running_var, training, momentum, eps,
                 activation, negative_slope, alpha, residual);
}

TensorQuad fused_act_backward(const at::Tensor& grad_out, const at::Tensor& saved,
                              const OptionalTensor& residual, const OptionalTensor& output,
                              const OptionalTensor& weight, const OptionalTensor& bias,
                              const at::Tensor& save_mean, const at::Tensor& save_invstd,
                              bool training, c10::string_view activation, double negative_slope,
                              double alpha, bool saved_is_output, bool parameter_grads) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("normext::batch_norm_act_backward", "")
          .typed<TensorQuad(const at::Tensor&, const at::Tensor&, const OptionalTensor&,
                            const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
                            const at::Tensor&, const at::Tensor&, bool, c10::string_view, double,
                            double, bool, bool)>();
  const at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(grad_out, saved, residual, output, weight, bias, save_mean, save_invstd,
                 training, activation, negative_slope, alpha, saved_is_output, parameter_grads);
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

// `t` converted to `type`, without an op call when it already has it.
at::Tensor as_type(const at::Tensor& t, at::ScalarType type) {
  return t.scalar_type() == type ? t : t.to(type);
}

bool requires_grad(const OptionalTensor& t) {
  return t.has_value() && t->defined() && t->requires_grad();
}

bool has_tangent(const OptionalTensor& t) {
  return t.has_value() && t->defined() && t->_fw_grad(/*level=*/0).defined();
}

// Raises for what the autograd nodes cannot take: inputs with forward-mode
// tangents (a torch::autograd::Function would silently drop them) and, where
// a graph is recorded, running stats that require grad.
void check_autograd_arguments(const char* op, std::initializer_list<const OptionalTensor*> inputs,
                              const OptionalTensor& running_mean,
                              const OptionalTensor& running_var) {
  for (const OptionalTensor* t : inputs) {
    TORCH_CHECK_NOT_IMPLEMENTED(!has_tangent(*t), "normext::", op,
                                " has no forward-mode AD formula; normext.functional.", op,
                                " computes inputs with tangents with torch's ops");
  }
  if (!at::GradMode::is_enabled()) return;
  for (const auto& [stat, name] : {std::pair{&running_mean, "running_mean"},
                                   {&running_var, "running_var"}}) {
    TORCH_CHECK(!requires_grad(*stat), "The function 'normext::", op, "' is not "
                "differentiable with respect to argument '", name,
                "'. This input cannot have requires_grad True.");
  }
}

// Which of input, weight and bias want gradients (and the bias's dtype), for
// the backward's entries.
void save_grad_flags(AutogradContext* ctx, const at::Tensor& input, const OptionalTensor& weight,
                     const OptionalTensor& bias) {
  ctx->saved_data["input_grad"] = input.requires_grad();
  ctx->saved_data["weight_grad"] = requires_grad(weight);
  ctx->saved_data["bias_grad"] = requires_grad(bias);
  if (requires_grad(bias)) ctx->saved_data["bias_type"] = bias->scalar_type();
}

// grads[0..2]: the gradients of input, weight and bias where they are wanted.
void set_grads(AutogradContext* ctx, variable_list& grads, const at::Tensor& grad_input,
               const at::Tensor& grad_weight, const at::Tensor& grad_bias,
               const at::Tensor& weight) {
  if (ctx->saved_data["input_grad"].toBool()) grads[0] = grad_input;
  if (ctx->saved_data["weight_grad"].toBool()) {
    grads[1] = as_type(grad_weight, weight.scalar_type());
  }
  if (ctx->saved_data["bias_grad"].toBool()) {
    grads[2] = as_type(grad_bias, ctx->saved_data["bias_type"].toScalarType());
  }
}

bool parameter_grads(AutogradContext* ctx) {
  return ctx->saved_data["weight_grad"].toBool() || ctx->saved_data["bias_grad"].toBool();
}

class BatchNormFunction : public torch::autograd::Function<BatchNormFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input,
                            const OptionalTensor& weight, const OptionalTensor& bias,
                            const OptionalTensor& running_mean, const OptionalTensor& running_var,
                            bool training, double momentum, double eps) {
    auto [output, save_mean, save_invstd] =
        fused_forward(input, weight, bias, running_mean, running_var, training, momentum, eps);
    const at::Tensor w = weight.has_value() ? *weight : at::Tensor();
    ctx->save_for_backward({input, w, save_mean, save_invstd});
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    save_grad_flags(ctx, input, weight, bias);
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &input = saved[0], &weight = saved[1];
    const bool training = ctx->saved_data["training"].toBool();
    at::Tensor grad_input, grad_weight, grad_bias;
    if (at::GradMode::is_enabled()) {  // create_graph=True
      std::tie(grad_input, grad_weight, grad_bias) =
          differentiable_backward(grad_outputs[0], input, weight, saved[2], saved[3], training,
                                  ctx->saved_data["eps"].toDouble());
    } else {
      // Frozen parameters: no sums to reduce for them (none at all in eval).
      std::tie(grad_input, grad_weight, grad_bias) = fused_backward(
          grad_outputs[0], input, weight.defined() ? OptionalTensor(weight) : c10::nullopt,
          saved[2], saved[3], training, parameter_grads(ctx));
    }
    // One entry per forward argument; undefined where no gradient is wanted.
    variable_list grads(8);
    set_grads(ctx, grads, grad_input, grad_weight, grad_bias, weight);
    return grads;
  }
};

at::Tensor batch_norm_autograd(const at::Tensor& input, const OptionalTensor& weight,
                               const OptionalTensor& bias, const OptionalTensor& running_mean,
                               const OptionalTensor& running_var, bool training,
                               double momentum, double eps) {
  const OptionalTensor x(input);
  check_autograd_arguments("batch_norm", {&x, &weight, &bias}, running_mean, running_var);
  if (at::GradMode::is_enabled()) {
    if (input.requires_grad() || requires_grad(weight) || requires_grad(bias)) {
      return BatchNormFunction::apply(input, weight, bias, running_mean, running_var, training,
                                      momentum, eps);
    }
  }
  // Nothing to differentiate: no node, straight to the backend's kernel.
  return std::get<0>(
      fused_forward(input, weight, bias, running_mean, running_var, training, momentum, eps));
}

OptionalTensor optional(const at::Tensor& t) {
  return t.defined() ? OptionalTensor(t) : c10::nullopt;
}

// activation(z) in differentiable ATen ops.
at::Tensor activate(const at::Tensor& z, const ActivationSpec& spec) {
  switch (spec.kind) {
    case Activation::kRelu: return at::relu(z);
    case Activation::kRelu6: return at::hardtanh(z, 0.0, 6.0);
    case Activation::kLeakyRelu: return at::leaky_relu(z, spec.negative_slope);
    case Activation::kElu: return at::elu(z, spec.alpha);
    case Activation::kSilu: return at::silu(z);
    default: return z;
  }
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

// The fused batch norm + activation; with memory_efficient (and weights it can
// invert) it keeps its output instead of its input for the backward.
class BatchNormActFunction : public torch::autograd::Function<BatchNormActFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input,
                            const OptionalTensor& weight, const OptionalTensor& bias,
                            const OptionalTensor& running_mean, const OptionalTensor& running_var,
                            bool training, double momentum, double eps,
                            c10::string_view activation, double negative_slope, double alpha,
                            const OptionalTensor& residual, bool memory_efficient) {
    const ActivationSpec spec = activation_spec(activation, negative_slope, alpha);
    if (memory_efficient) check_invertible(spec);
    auto [output, save_mean, save_invstd] =
        fused_act_forward(input, weight, bias, running_mean, running_var, training, momentum,
                          eps, activation, negative_slope, alpha, residual);
    const at::Tensor w = weight.has_value() ? *weight : at::Tensor();
    const at::Tensor b = bias.has_value() ? *bias : at::Tensor();
    const at::Tensor r = residual.has_value() ? *residual : at::Tensor();
    // The weights' values decide; a traced call (torch.compile's fake or
    // functional tensors, where no values exist) keeps the input.
    const bool from_output = memory_efficient && !at::isTensorSubclassLike(input) &&
                             !(w.defined() && at::isTensorSubclassLike(w)) &&
                             weights_invertible(w, b);
    // With a residual, the output (which the next layer keeps anyway) gives
    // the activation's derivative where it can, so that the residual is not kept.
    const bool derivative_from_output = !from_output && r.defined() && grad_from_output(spec);
    ctx->save_for_backward({from_output ? output : input, w, b,
                            derivative_from_output ? at::Tensor() : r,
                            derivative_from_output ? output : at::Tensor(), save_mean,
                            save_invstd});
    ctx->saved_data["from_output"] = from_output;
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["activation_name"] = std::string(activation);
    ctx->saved_data["negative_slope"] = negative_slope;
    ctx->saved_data["alpha"] = alpha;
    ctx->saved_data["residual_grad"] = requires_grad(residual);
    save_grad_flags(ctx, input, weight, bias);
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &weight = saved[1], &bias = saved[2], &residual = saved[3];
    const at::Tensor &output = saved[4], &save_mean = saved[5], &save_invstd = saved[6];
    const bool training = ctx->saved_data["training"].toBool();
    const bool from_output = ctx->saved_data["from_output"].toBool();
    const std::string activation = ctx->saved_data["activation_name"].toStringRef();
    const double negative_slope = ctx->saved_data["negative_slope"].toDouble();
    const double alpha = ctx->saved_data["alpha"].toDouble();
    at::Tensor grad_input, grad_residual, grad_weight, grad_bias;
    if (at::GradMode::is_enabled()) {  // create_graph=True
      TORCH_CHECK_NOT_IMPLEMENTED(!from_output,
                                  "normext: double backward through a memory_efficient batch "
                                  "norm + activation needs its input, which it did not keep; "
                                  "use memory_efficient=False");
      const ActivationSpec spec = activation_spec(activation, negative_slope, alpha);
      const double eps = ctx->saved_data["eps"].toDouble();
      if (output.defined()) {  // the derivative from the output, as the forward saved it
        const at::Tensor dz = grad_outputs[0].to(accumulate_type(output.scalar_type())) *
                              activation_grad_of_output(output, spec);
        std::tie(grad_input, grad_weight, grad_bias) = differentiable_backward(
            dz, saved[0], weight, save_mean, save_invstd, training, eps);
        grad_residual = dz.to(output.scalar_type());
      } else {
        const variable_list grads =
            differentiable_act_backward(grad_outputs[0], saved[0], weight, bias, residual,
                                        save_mean, save_invstd, training, eps, spec);
        std::tie(grad_input, grad_residual, grad_weight, grad_bias) =
            std::tuple{grads[0], grads[1], grads[2], grads[3]};
      }
    } else {
      std::tie(grad_input, grad_residual, grad_weight, grad_bias) = fused_act_backward(
          grad_outputs[0], saved[0], optional(residual), optional(output), optional(weight),
          optional(bias), save_mean, save_invstd, training, activation, negative_slope, alpha,
          from_output, parameter_grads(ctx));
    }
    // One entry per forward argument; undefined where no gradient is wanted.
    variable_list grads(13);
    set_grads(ctx, grads, grad_input, grad_weight, grad_bias, weight);
    if (ctx->saved_data["residual_grad"].toBool()) grads[11] = grad_residual;
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
  if (at::GradMode::is_enabled()) {
    if (input.requires_grad() || requires_grad(weight) || requires_grad(bias) ||
        requires_grad(residual)) {
      return BatchNormActFunction::apply(input, weight, bias, running_mean, running_var,
                                         training, momentum, eps, activation, negative_slope,
                                         alpha, residual, memory_efficient);
    }
  }
  if (memory_efficient) check_invertible(activation_spec(activation, negative_slope, alpha));
  return std::get<0>(fused_act_forward(input, weight, bias, running_mean, running_var, training,
                                       momentum, eps, activation, negative_slope, alpha,
                                       residual));
}

}  // namespace

// The backends register the ops below autograd (ops.h: BatchNormOps::output, output_act).
TORCH_LIBRARY_IMPL(normext, Autograd, m) {
  m.impl("batch_norm", &batch_norm_autograd);
  m.impl("batch_norm_act", &batch_norm_act_autograd);
}

}  // namespace normext::batch_norm

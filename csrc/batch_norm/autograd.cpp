// normext::batch_norm and batch_norm_act: the fused forward and backward ops
// under one hand-written autograd Node each, whose per-call bookkeeping is
// what torch's own ops pay (it matters next to a small batch norm).
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
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/dynamo/compiled_autograd.h>
#include <torch/library.h>

#include <array>
#include <initializer_list>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "batch_norm/common.h"

namespace normext::batch_norm {
namespace {

using OptionalTensor = c10::optional<at::Tensor>;
using TensorTriple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using torch::autograd::CompiledNodeArgs;
using torch::autograd::InputMetadata;
using torch::autograd::Node;
using torch::autograd::PackedArgs;
using torch::autograd::SavedVariable;
using torch::autograd::SwapSavedVariables;
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

OptionalTensor optional(const at::Tensor& t) {
  return t.defined() ? OptionalTensor(t) : c10::nullopt;
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
// tangents (the nodes have no forward-mode formula) and, where
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

// Nodes are held by c10::intrusive_ptr from torch 2.14 on, by std::shared_ptr
// before (with deleteNode, which frees a long graph without deep recursion).
using NodePointer = decltype(torch::autograd::Edge::function);
constexpr bool kSharedNodes = std::is_same_v<NodePointer, std::shared_ptr<Node>>;

template <class T>
auto make_node() {
  if constexpr (kSharedNodes) {
    // (deleteNode found by argument-dependent lookup: torch 2.14 has none.)
    return std::shared_ptr<T>(new T(), [](T* node) { deleteNode(node); });
  } else {
    return c10::make_intrusive<T>();
  }
}

// Runs torch.autograd.graph.node_creation_hook's hooks on a node whose edges,
// output and saved tensors are all set: torch 2.14 runs them where a node is
// attached to its outputs, not in set_history (found by argument-dependent
// lookup, as older torch has no such function).
template <class Pointer>
void node_complete(const Pointer& node) {
  if constexpr (!kSharedNodes) fire_node_creation_hooks(node);
}

// Which of a node's inputs (its next edges) this backward pass wants.
std::vector<bool> wanted_grads(const Node& node) {
  std::vector<bool> wanted(node.num_outputs());
  for (size_t i = 0; i < wanted.size(); ++i) wanted[i] = node.task_should_compute_output(i);
  return wanted;
}

// Compiled autograd (torch._dynamo.compiled_autograd) records a node as a call
// of `functional` on the node's gradients and `args`: its saved state, read
// while the tracer's tensors stand in for the saved ones, then which inputs
// want gradients. Bound on every call, as torch's custom-function node does
// (torch numbers the names); traceable, since the ops it calls have fakes.
variable_list record_functional(const Node& node, const char* name,
                                torch::autograd::functional_apply_t functional, PackedArgs args,
                                const variable_list& grads, SwapSavedVariables& saved) {
  args.pack(wanted_grads(node));
  const std::vector<c10::IValue>& values = args.vec();
  std::vector<at::TypePtr> schema;
  for (const c10::IValue& value : values) {
    schema.push_back(value.isTensor() ? at::TensorType::get() : value.type());
  }
  const auto& compiler = torch::dynamo::autograd::getPyCompilerInterface();
  const std::string bound =
      compiler->bind_function(saved.get_py_compiler(), name, std::move(functional), schema,
                              /*is_custom_function=*/true, /*is_traceable=*/true);
  const c10::IValue output_metadata =
      torch::dynamo::autograd::IValuePacker<std::vector<std::optional<InputMetadata>>>::pack(
          torch::dynamo::autograd::get_input_metadata(node.next_edges()));
  return compiler->call_function(saved.get_py_compiler(), "apply_functional", bound, grads,
                                 values, output_metadata);
}

// A backward node that keeps N tensors (undefined where unused) and a State
// (non-tensor values, visited in one order by State::fields), from which
// Derived::gradients(grad_out, tensors, state, wanted) computes its inputs'
// gradients. Plain autograd Nodes, as torch's own ops have: a
// torch::autograd::Function's node keeps its state in a string-keyed map and
// wraps its outputs, which a small batch norm's time shows (benchmarks/RESULTS.md).
template <class Derived, class State, size_t N>
struct SavedStateNode : Node {
  using Tensors = std::array<at::Tensor, N>;
  std::array<SavedVariable, N> tensors;
  std::array<bool, N> is_output{};  // a tensor that is this node's own output
  State state;

  void release_variables() override {
    const std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable& t : tensors) t.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    const std::lock_guard<std::mutex> lock(mutex_);
    Tensors t;
    for (size_t i = 0; i < N; ++i) {
      t[i] = is_output[i] ? tensors[i].unpack(getptr()) : tensors[i].unpack();
    }
    return Derived::gradients(grads[0], t, state, wanted_grads(*this));
  }

  void compiled_args(CompiledNodeArgs& args) const override {
    for (size_t i = 0; i < N; ++i) args.collect(tensors[i], is_output[i]);
    State::fields(state, [&](const auto& value) { args.collect(value); });
  }

  variable_list apply_with_saved(const variable_list& grads,
                                 SwapSavedVariables& swapped) override {
    for (SavedVariable& t : tensors) swapped.before(t);
    PackedArgs args;
    for (const SavedVariable& t : tensors) args.pack(optional(t.unpack()));
    State::fields(state, [&](const auto& value) { args.pack(value); });
    variable_list result = record_functional(*this, Derived::kFunctionalName, &functional,
                                             std::move(args), grads, swapped);
    for (SavedVariable& t : tensors) swapped.after(t);
    return result;
  }

  // apply on what apply_with_saved packed.
  static variable_list functional(const variable_list& grads,
                                  const std::vector<c10::IValue>& values) {
    PackedArgs args(values);
    Tensors t;
    for (at::Tensor& tensor : t) tensor = args.unpack<OptionalTensor>().value_or(at::Tensor());
    State s;
    State::fields(s, [&](auto& value) {
      value = args.template unpack<std::decay_t<decltype(value)>>();
    });
    return Derived::gradients(grads[0], t, s, args.unpack<std::vector<bool>>());
  }
};

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
  static variable_list gradients(const at::Tensor& grad_out, const Tensors& t,
                                 const BatchNormState& s, const std::vector<bool>& wanted) {
    variable_list grads(3);
    if (!grad_out.defined()) return grads;
    const at::Tensor &x = t[kInput], &w = t[kWeight];
    at::Tensor grad_input, grad_weight, grad_bias;
    if (at::GradMode::is_enabled()) {  // create_graph=True
      std::tie(grad_input, grad_weight, grad_bias) = differentiable_backward(
          grad_out, x, w, t[kMean], t[kInvstd], s.training, s.eps);
    } else {
      // Frozen parameters: no sums to reduce for them (none at all in eval).
      std::tie(grad_input, grad_weight, grad_bias) =
          fused_backward(grad_out, x, optional(w), t[kMean], t[kInvstd], s.training,
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
    node->tensors[Node::kInput] = SavedVariable(input, /*is_output=*/false);
    node->tensors[Node::kWeight] = SavedVariable(weight.value_or(at::Tensor()), false);
    node->tensors[Node::kMean] = SavedVariable(save_mean, false);
    node->tensors[Node::kInvstd] = SavedVariable(save_invstd, false);
    const bool has_bias = bias.has_value() && bias->defined();
    node->state = {training, eps, has_bias ? bias->scalar_type() : at::kFloat};
    torch::autograd::set_history(output, node);
    node_complete(node);
  }
  return output;
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
  static variable_list gradients(const at::Tensor& grad_out, const Tensors& t,
                                 const BatchNormActState& s, const std::vector<bool>& wanted) {
    variable_list grads(4);
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
          grad_out, saved, optional(t[kResidual]), optional(output), optional(weight),
          optional(t[kBias]), t[kMean], t[kInvstd], s.training, s.activation,
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
  const auto save = [&](int slot, const at::Tensor& t, bool is_output) {
    node->tensors[slot] = SavedVariable(t, is_output);
    node->is_output[slot] = is_output;
  };
  save(Node::kSaved, from_output ? output : input, from_output);
  save(Node::kWeight, w, false);
  save(Node::kBias, b, false);
  save(Node::kResidual, derivative_from_output ? at::Tensor() : r, false);
  save(Node::kOutput, derivative_from_output ? output : at::Tensor(), true);
  save(Node::kMean, save_mean, false);
  save(Node::kInvstd, save_invstd, false);
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

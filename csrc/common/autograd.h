// What every norm's autograd kernel shares: a plain autograd Node that keeps
// its saved tensors and state (SavedStateNode), its creation across torch
// versions, compiled autograd's record of it, and the checks and small
// conversions around the ops it calls below autograd. Plain Nodes, as torch's
// own ops have: a torch::autograd::Function's node keeps its state in a
// string-keyed map and wraps its outputs, and torch.library.register_autograd's
// Python node adds a per-call cost that a small norm's time shows
// (benchmarks/RESULTS.md).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/dynamo/compiled_autograd.h>

#include <array>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

#include "common/activation.h"

namespace normext {

using OptionalTensor = c10::optional<at::Tensor>;
using torch::autograd::variable_list;

inline OptionalTensor as_optional(const at::Tensor& t) {
  return t.defined() ? OptionalTensor(t) : c10::nullopt;
}

// `t` converted to `type`, without an op call when it already has it.
inline at::Tensor as_type(const at::Tensor& t, at::ScalarType type) {
  return t.scalar_type() == type ? t : t.to(type);
}

inline bool requires_grad(const OptionalTensor& t) {
  return t.has_value() && t->defined() && t->requires_grad();
}

// Whether a graph is recorded for an op of these inputs.
inline bool records_graph(std::initializer_list<const OptionalTensor*> inputs) {
  if (!at::GradMode::is_enabled()) return false;
  for (const OptionalTensor* t : inputs) {
    if (requires_grad(*t)) return true;
  }
  return false;
}

// Raises NotImplementedError for inputs with forward-mode tangents: the nodes
// have no forward-mode formula (normext.functional gives such inputs to torch).
void check_no_tangents(const char* op, std::initializer_list<const OptionalTensor*> inputs);

// `op` called below autograd, as the autograd kernels call the backend's
// kernels (the boxed fallback that would otherwise run costs microseconds).
template <class Signature, class... Args>
auto call_below_autograd(const c10::TypedOperatorHandle<Signature>& op, Args&&... args) {
  const at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(std::forward<Args>(args)...);
}

// The normext op `name` ("normext::..."), typed; looked up once per call site.
template <class Signature>
c10::TypedOperatorHandle<Signature> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// activation(z) in differentiable ATen ops, for the double backward.
at::Tensor activate(const at::Tensor& z, const ActivationSpec& spec);

// Nodes are held by c10::intrusive_ptr from torch 2.14 on, by std::shared_ptr
// before (with deleteNode, which frees a long graph without deep recursion).
using NodePointer = decltype(torch::autograd::Edge::function);
constexpr bool kSharedNodes = std::is_same_v<NodePointer, std::shared_ptr<torch::autograd::Node>>;

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
std::vector<bool> wanted_grads(const torch::autograd::Node& node);

// Compiled autograd (torch._dynamo.compiled_autograd) records a node as a call
// of `functional` on the node's gradients and `args`: its saved state, read
// while the tracer's tensors stand in for the saved ones, then which inputs
// want gradients. Bound on every call, as torch's custom-function node does
// (torch numbers the names); traceable, since the ops it calls have fakes.
variable_list record_functional(const torch::autograd::Node& node, const char* name,
                                torch::autograd::functional_apply_t functional,
                                torch::dynamo::autograd::PackedArgs args,
                                const variable_list& grads,
                                torch::autograd::SwapSavedVariables& saved);

// A backward node that keeps N tensors (undefined where unused) and a State
// (non-tensor values, visited in one order by State::fields), from which
// Derived::gradients(grad_outputs, tensors, state, wanted) computes its
// inputs' gradients.
template <class Derived, class State, size_t N>
struct SavedStateNode : torch::autograd::Node {
  using Tensors = std::array<at::Tensor, N>;
  std::array<torch::autograd::SavedVariable, N> tensors;
  std::array<bool, N> is_output{};  // a tensor that is this node's own output
  State state;

  // Saves `t` in `slot`; after set_history where `t` is this node's output.
  void save(size_t slot, const at::Tensor& t, bool output = false) {
    tensors[slot] = torch::autograd::SavedVariable(t, output);
    is_output[slot] = output;
  }

  void release_variables() override {
    const std::lock_guard<std::mutex> lock(mutex_);
    for (auto& t : tensors) t.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    const std::lock_guard<std::mutex> lock(mutex_);
    Tensors t;
    for (size_t i = 0; i < N; ++i) {
      t[i] = is_output[i] ? tensors[i].unpack(getptr()) : tensors[i].unpack();
    }
    return Derived::gradients(grads, t, state, wanted_grads(*this));
  }

  void compiled_args(torch::autograd::CompiledNodeArgs& args) const override {
    for (size_t i = 0; i < N; ++i) args.collect(tensors[i], is_output[i]);
    State::fields(state, [&](const auto& value) { args.collect(value); });
  }

  variable_list apply_with_saved(const variable_list& grads,
                                 torch::autograd::SwapSavedVariables& swapped) override {
    for (auto& t : tensors) swapped.before(t);
    torch::dynamo::autograd::PackedArgs args;
    for (const auto& t : tensors) args.pack(as_optional(t.unpack()));
    State::fields(state, [&](const auto& value) { args.pack(value); });
    variable_list result = record_functional(*this, Derived::kFunctionalName, &functional,
                                             std::move(args), grads, swapped);
    for (auto& t : tensors) swapped.after(t);
    return result;
  }

  // apply on what apply_with_saved packed.
  static variable_list functional(const variable_list& grads,
                                  const std::vector<c10::IValue>& values) {
    torch::dynamo::autograd::PackedArgs args(values);
    Tensors t;
    for (at::Tensor& tensor : t) tensor = args.unpack<OptionalTensor>().value_or(at::Tensor());
    State s;
    State::fields(s, [&](auto& value) {
      value = args.template unpack<std::decay_t<decltype(value)>>();
    });
    return Derived::gradients(grads, t, s, args.unpack<std::vector<bool>>());
  }
};

}  // namespace normext

// normext::layer_norm_forward's and add_layer_norm_forward's autograd
// kernels: the backend's forward below autograd under one hand-written Node
// each (common/autograd.h: SavedStateNode), whose backward is
// layer_norm_backward, or differentiable ATen ops for a double backward.
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/rsqrt.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <array>
#include <string>
#include <tuple>
#include <vector>

#include "common/autograd.h"
#include "common/channel_view.h"

namespace normext::layer_norm {
namespace {

using Tensor = at::Tensor;
using TensorTriple = std::tuple<Tensor, Tensor, Tensor>;
using TensorQuad = std::tuple<Tensor, Tensor, Tensor, Tensor>;

TensorTriple forward_below_autograd(const Tensor& input, at::IntArrayRef normalized_shape,
                                    const OptionalTensor& weight, const OptionalTensor& bias,
                                    double eps, bool rms) {
  static const auto op =
      typed_op<TensorTriple(const Tensor&, at::IntArrayRef, const OptionalTensor&,
                            const OptionalTensor&, double, bool)>("normext::layer_norm_forward");
  return call_below_autograd(op, input, normalized_shape, weight, bias, eps, rms);
}

TensorQuad add_forward_below_autograd(const Tensor& input, const Tensor& residual,
                                      at::IntArrayRef normalized_shape,
                                      const OptionalTensor& weight, const OptionalTensor& bias,
                                      double eps, bool rms) {
  static const auto op =
      typed_op<TensorQuad(const Tensor&, const Tensor&, at::IntArrayRef, const OptionalTensor&,
                          const OptionalTensor&, double, bool)>(
          "normext::add_layer_norm_forward");
  return call_below_autograd(op, input, residual, normalized_shape, weight, bias, eps, rms);
}

TensorTriple backward_below_autograd(const Tensor& grad_out, const Tensor& input,
                                     at::IntArrayRef normalized_shape, const Tensor& mean,
                                     const Tensor& rstd, const OptionalTensor& weight, bool rms,
                                     std::array<bool, 3> output_mask,
                                     const OptionalTensor& grad_sum) {
  static const auto op =
      typed_op<TensorTriple(const Tensor&, const Tensor&, at::IntArrayRef, const Tensor&,
                            const Tensor&, const OptionalTensor&, bool, std::array<bool, 3>,
                            const OptionalTensor&)>("normext::layer_norm_backward");
  return call_below_autograd(op, grad_out, input, normalized_shape, mean, rstd, weight, rms,
                             output_mask, grad_sum);
}

// The backward's formulas (the kernels') in differentiable ATen ops, in the
// accumulate dtype, with the statistics recomputed from the input so that the
// graph sees their dependence on it: the backward for create_graph=True.
TensorTriple differentiable_backward(const Tensor& grad_out, const Tensor& input,
                                     at::IntArrayRef normalized_shape, const Tensor& weight,
                                     double eps, bool rms) {
  const auto type = accumulate_type(input.scalar_type());
  const int64_t leading = input.dim() - static_cast<int64_t>(normalized_shape.size());
  std::vector<int64_t> normalized_dims, leading_dims;
  for (int64_t d = 0; d < input.dim(); ++d) {
    (d < leading ? leading_dims : normalized_dims).push_back(d);
  }
  const Tensor x = input.to(type), dy = grad_out.to(type);
  const Tensor xmu = rms ? x : x - x.mean(normalized_dims, /*keepdim=*/true);
  const Tensor rstd = at::rsqrt(xmu.square().mean(normalized_dims, true) + eps);
  const Tensor xhat = xmu * rstd;
  const Tensor g = weight.defined() ? dy * weight.to(type) : dy;
  Tensor dx = g - (g * xhat).mean(normalized_dims, true) * xhat;
  if (!rms) dx = dx - g.mean(normalized_dims, true);
  const auto param_type = weight.defined() ? weight.scalar_type() : input.scalar_type();
  // (A sum over no dims would be over all of them.)
  const auto over_rows = [&](const Tensor& t) {
    return (leading_dims.empty() ? t : t.sum(leading_dims)).to(param_type);
  };
  return {(dx * rstd).to(input.scalar_type()), over_rows(dy * xhat), over_rows(dy)};
}

struct LayerNormState {
  std::vector<int64_t> normalized_shape;
  double eps = 0.0;
  bool rms = false;

  template <class Self, class F>
  static void fields(Self& s, F&& f) {
    f(s.normalized_shape);
    f(s.eps);
    f(s.rms);
  }
};

// The layer norm's gradients of (input, weight, bias) at `input`, each where
// `wanted`, grad_sum (where defined) added to the input's: undefined where
// both grad_out and grad_sum are.
TensorTriple layer_norm_grads(const Tensor& grad_out, const Tensor& input, const Tensor& weight,
                              const Tensor& mean, const Tensor& rstd, const LayerNormState& s,
                              std::array<bool, 3> wanted, const Tensor& grad_sum = {}) {
  if (!grad_out.defined()) return {wanted[0] ? grad_sum : Tensor(), Tensor(), Tensor()};
  if (at::GradMode::is_enabled()) {  // create_graph=True
    auto grads = differentiable_backward(grad_out, input, s.normalized_shape, weight, s.eps, s.rms);
    if (wanted[0] && grad_sum.defined()) std::get<0>(grads) = std::get<0>(grads) + grad_sum;
    return grads;
  }
  // A grad_sum that is not dense (say, expanded from a scalar's) is cheaper to
  // add than to make contiguous for the kernel.
  const bool add_in_kernel = wanted[0] && grad_sum.defined() && grad_sum.is_contiguous();
  auto grads = backward_below_autograd(grad_out, input, s.normalized_shape, mean, rstd,
                                       as_optional(weight), s.rms, wanted,
                                       add_in_kernel ? as_optional(grad_sum) : c10::nullopt);
  // In place: the kernel's output is ours alone.
  if (wanted[0] && grad_sum.defined() && !add_in_kernel) std::get<0>(grads).add_(grad_sum);
  return grads;
}

struct LayerNormBackward final : SavedStateNode<LayerNormBackward, LayerNormState, 4> {
  enum { kInput, kWeight, kMean, kRstd };
  static constexpr const char* kFunctionalName = "normext_LayerNormBackward";
  std::string name() const override { return "normext::LayerNormBackward"; }

  // The gradients of input, weight and bias, each where `wanted`.
  static variable_list gradients(const variable_list& grad_outputs, const Tensors& t,
                                 const LayerNormState& s, const std::vector<bool>& wanted) {
    const auto [grad_input, grad_weight, grad_bias] =
        layer_norm_grads(grad_outputs[0], t[kInput], t[kWeight], t[kMean], t[kRstd], s,
                         {wanted[0], wanted[1], wanted[2]});
    variable_list grads(3);
    if (wanted[0]) grads[0] = grad_input;
    if (wanted[1]) grads[1] = grad_weight;
    if (wanted[2]) grads[2] = grad_bias;
    return grads;
  }
};

// The backward of (layer_norm(sum), sum), sum = input + residual: the layer
// norm's at the sum plus the sum's own gradient, for input and residual alike.
struct AddLayerNormBackward final : SavedStateNode<AddLayerNormBackward, LayerNormState, 4> {
  enum { kSum, kWeight, kMean, kRstd };
  static constexpr const char* kFunctionalName = "normext_AddLayerNormBackward";
  std::string name() const override { return "normext::AddLayerNormBackward"; }

  // The gradients of input, residual, weight and bias, each where `wanted`.
  static variable_list gradients(const variable_list& grad_outputs, const Tensors& t,
                                 const LayerNormState& s, const std::vector<bool>& wanted) {
    const auto [grad_input, grad_weight, grad_bias] =
        layer_norm_grads(grad_outputs[0], t[kSum], t[kWeight], t[kMean], t[kRstd], s,
                         {wanted[0] || wanted[1], wanted[2], wanted[3]}, grad_outputs[1]);
    variable_list grads(4);
    if (wanted[0]) grads[0] = grad_input;
    if (wanted[1]) grads[1] = grad_input;
    if (wanted[2]) grads[2] = grad_weight;
    if (wanted[3]) grads[3] = grad_bias;
    return grads;
  }
};

TensorTriple layer_norm_autograd(const Tensor& input, at::IntArrayRef normalized_shape,
                                 const OptionalTensor& weight, const OptionalTensor& bias,
                                 double eps, bool rms) {
  const OptionalTensor x(input);
  check_no_tangents("layer_norm_forward", {&x, &weight, &bias});
  auto outputs = forward_below_autograd(input, normalized_shape, weight, bias, eps, rms);
  if (!records_graph({&x, &weight, &bias})) return outputs;
  auto node = make_node<LayerNormBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(input, weight, bias));
  using Node = LayerNormBackward;
  node->save(Node::kInput, input);
  node->save(Node::kWeight, weight.value_or(Tensor()));
  node->save(Node::kMean, std::get<1>(outputs));
  node->save(Node::kRstd, std::get<2>(outputs));
  node->state = {normalized_shape.vec(), eps, rms};
  // The statistics are not differentiable: only the output has this history.
  torch::autograd::set_history(std::get<0>(outputs), node);
  node_complete(node);
  return outputs;
}

TensorQuad add_layer_norm_autograd(const Tensor& input, const Tensor& residual,
                                   at::IntArrayRef normalized_shape,
                                   const OptionalTensor& weight, const OptionalTensor& bias,
                                   double eps, bool rms) {
  const OptionalTensor x(input), r(residual);
  check_no_tangents("add_layer_norm_forward", {&x, &r, &weight, &bias});
  auto outputs =
      add_forward_below_autograd(input, residual, normalized_shape, weight, bias, eps, rms);
  if (!records_graph({&x, &r, &weight, &bias})) return outputs;
  auto node = make_node<AddLayerNormBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(input, residual, weight, bias));
  auto& [output, sum, mean, rstd] = outputs;
  torch::autograd::set_history(std::vector<Tensor>{output, sum}, node);
  // Saved after set_history: the sum is recorded as this node's output.
  using Node = AddLayerNormBackward;
  node->save(Node::kSum, sum, /*output=*/true);
  node->save(Node::kWeight, weight.value_or(Tensor()));
  node->save(Node::kMean, mean);
  node->save(Node::kRstd, rstd);
  node->state = {normalized_shape.vec(), eps, rms};
  node_complete(node);
  return outputs;
}

}  // namespace

TORCH_LIBRARY_IMPL(normext, Autograd, m) {
  m.impl("layer_norm_forward", &layer_norm_autograd);
  m.impl("add_layer_norm_forward", &add_layer_norm_autograd);
}

}  // namespace normext::layer_norm

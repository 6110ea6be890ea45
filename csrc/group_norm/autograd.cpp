// normext::group_norm_forward's autograd kernel: the backend's forward below
// autograd under one hand-written Node (common/autograd.h: SavedStateNode),
// whose backward is group_norm_backward, or differentiable ATen ops for a
// double backward.
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/group_norm.h>
#include <ATen/ops/rsqrt.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <array>
#include <string>
#include <tuple>
#include <vector>

#include "common/autograd.h"
#include "common/channel_view.h"

namespace normext::group_norm {
namespace {

using Tensor = at::Tensor;
using TensorTriple = std::tuple<Tensor, Tensor, Tensor>;

TensorTriple forward_below_autograd(const Tensor& input, int64_t groups,
                                    const OptionalTensor& weight, const OptionalTensor& bias,
                                    double eps, c10::string_view activation,
                                    double negative_slope, double alpha) {
  static const auto op =
      typed_op<TensorTriple(const Tensor&, int64_t, const OptionalTensor&, const OptionalTensor&,
                            double, c10::string_view, double, double)>(
          "normext::group_norm_forward");
  return call_below_autograd(op, input, groups, weight, bias, eps, activation, negative_slope,
                             alpha);
}

TensorTriple backward_below_autograd(const Tensor& grad_out, const Tensor& input, int64_t groups,
                                     const Tensor& mean, const Tensor& rstd,
                                     const OptionalTensor& weight, const OptionalTensor& bias,
                                     std::array<bool, 3> output_mask,
                                     c10::string_view activation, double negative_slope,
                                     double alpha) {
  static const auto op =
      typed_op<TensorTriple(const Tensor&, const Tensor&, int64_t, const Tensor&, const Tensor&,
                            const OptionalTensor&, const OptionalTensor&, std::array<bool, 3>,
                            c10::string_view, double, double)>("normext::group_norm_backward");
  return call_below_autograd(op, grad_out, input, groups, mean, rstd, weight, bias, output_mask,
                             activation, negative_slope, alpha);
}

// dz = dy * activation'(z), z = group_norm(input) in the accumulate dtype, in
// differentiable ATen ops (torch's activation differentiated once).
Tensor differentiable_pre_activation_grad(const Tensor& grad_out, const Tensor& input,
                                          int64_t groups, const Tensor& weight,
                                          const Tensor& bias, double eps,
                                          const ActivationSpec& spec) {
  const auto type = accumulate_type(input.scalar_type());
  const auto in_type = [&](const Tensor& t) { return as_optional(t.defined() ? t.to(type) : t); };
  Tensor z = at::group_norm(input.to(type), groups, in_type(weight), in_type(bias), eps);
  if (!z.requires_grad()) z = z.detach().requires_grad_();
  return torch::autograd::grad({activate(z, spec)}, {z}, {grad_out.to(type)},
                               /*retain_graph=*/true, /*create_graph=*/true)[0];
}

// The backward's formulas (the kernels') in differentiable ATen ops, in the
// accumulate dtype, with the statistics recomputed from the input so that the
// graph sees their dependence on it: the backward for create_graph=True.
TensorTriple differentiable_backward(const Tensor& grad_out, const Tensor& input, int64_t groups,
                                     const Tensor& weight, double eps) {
  const auto type = accumulate_type(input.scalar_type());
  const int64_t n = input.size(0), channels = input.size(1);
  const int64_t group_size = n * groups == 0 ? 0 : input.numel() / (n * groups);
  const std::vector<int64_t> grouped{n, groups, group_size};
  std::vector<int64_t> per_channel(input.dim(), 1), reduce_dims{0};
  per_channel[1] = channels;
  for (int64_t d = 2; d < input.dim(); ++d) reduce_dims.push_back(d);
  const Tensor x = input.to(type).reshape(grouped), dy = grad_out.to(type);
  const Tensor xmu = x - x.mean({2}, /*keepdim=*/true);
  const Tensor rstd = at::rsqrt(xmu.square().mean({2}, true) + eps);
  const Tensor xhat = xmu * rstd;
  const Tensor g = (weight.defined() ? dy * weight.to(type).view(per_channel) : dy).reshape(grouped);
  const Tensor dx = (g - g.mean({2}, true) - (g * xhat).mean({2}, true) * xhat) * rstd;
  const Tensor dy_xhat = dy * xhat.reshape(input.sizes());
  const auto param_type = weight.defined() ? weight.scalar_type() : input.scalar_type();
  return {dx.reshape(input.sizes()).to(input.scalar_type()),
          dy_xhat.sum(reduce_dims).to(param_type), dy.sum(reduce_dims).to(param_type)};
}

struct GroupNormState {
  int64_t groups = 1;
  double eps = 0.0;
  std::string activation = "identity";
  double negative_slope = 0.01, alpha = 1.0;

  template <class Self, class F>
  static void fields(Self& s, F&& f) {
    f(s.groups);
    f(s.eps);
    f(s.activation);
    f(s.negative_slope);
    f(s.alpha);
  }
};

struct GroupNormBackward final : SavedStateNode<GroupNormBackward, GroupNormState, 5> {
  enum { kInput, kWeight, kBias, kMean, kRstd };
  static constexpr const char* kFunctionalName = "normext_GroupNormBackward";
  std::string name() const override { return "normext::GroupNormBackward"; }

  // The gradients of input, weight and bias, each where `wanted`.
  static variable_list gradients(const variable_list& grad_outputs, const Tensors& t,
                                 const GroupNormState& s, const std::vector<bool>& wanted) {
    variable_list grads(3);
    const Tensor& grad_out = grad_outputs[0];
    if (!grad_out.defined()) return grads;
    const Tensor &input = t[kInput], &weight = t[kWeight], &bias = t[kBias];
    Tensor grad_input, grad_weight, grad_bias;
    if (at::GradMode::is_enabled()) {  // create_graph=True
      const ActivationSpec spec =
          activation_spec(s.activation, s.negative_slope, s.alpha, "group_norm");
      const Tensor dz = spec.kind == Activation::kIdentity
                            ? grad_out
                            : differentiable_pre_activation_grad(grad_out, input, s.groups,
                                                                 weight, bias, s.eps, spec);
      std::tie(grad_input, grad_weight, grad_bias) =
          differentiable_backward(dz, input, s.groups, weight, s.eps);
    } else {
      std::tie(grad_input, grad_weight, grad_bias) = backward_below_autograd(
          grad_out, input, s.groups, t[kMean], t[kRstd], as_optional(weight),
          as_optional(bias), {wanted[0], wanted[1], wanted[2]}, s.activation, s.negative_slope,
          s.alpha);
    }
    if (wanted[0]) grads[0] = grad_input;
    if (wanted[1]) grads[1] = grad_weight;
    if (wanted[2]) grads[2] = grad_bias;
    return grads;
  }
};

TensorTriple group_norm_autograd(const Tensor& input, int64_t groups,
                                 const OptionalTensor& weight, const OptionalTensor& bias,
                                 double eps, c10::string_view activation, double negative_slope,
                                 double alpha) {
  const OptionalTensor x(input);
  check_no_tangents("group_norm_forward", {&x, &weight, &bias});
  auto outputs = forward_below_autograd(input, groups, weight, bias, eps, activation,
                                        negative_slope, alpha);
  if (!records_graph({&x, &weight, &bias})) return outputs;
  auto node = make_node<GroupNormBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(input, weight, bias));
  using Node = GroupNormBackward;
  node->save(Node::kInput, input);
  node->save(Node::kWeight, weight.value_or(Tensor()));
  node->save(Node::kBias, activation == "identity" ? Tensor() : bias.value_or(Tensor()));
  node->save(Node::kMean, std::get<1>(outputs));
  node->save(Node::kRstd, std::get<2>(outputs));
  node->state = {groups, eps, std::string(activation), negative_slope, alpha};
  // The statistics are not differentiable: only the output has this history.
  torch::autograd::set_history(std::get<0>(outputs), node);
  node_complete(node);
  return outputs;
}

}  // namespace

TORCH_LIBRARY_IMPL(normext, Autograd, m) { m.impl("group_norm_forward", &group_norm_autograd); }

}  // namespace normext::group_norm

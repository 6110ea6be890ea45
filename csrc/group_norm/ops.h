// The normext group-norm ops for one backend: argument checks (torch's
// messages), allocation and the calls into that backend's kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <c10/core/ScalarType.h>
#include <torch/library.h>

#include <array>
#include <limits>
#include <tuple>
#include <utility>

#include "common/activation.h"
#include "common/channel_view.h"

namespace normext::group_norm {

using OptionalTensor = c10::optional<at::Tensor>;
using TensorTriple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

inline at::Tensor value_or_undefined(const OptionalTensor& t) {
  return t.has_value() ? *t : at::Tensor();
}

// The input's channel view, with torch's checks (at::group_norm's messages).
inline ChannelView groups_view(const at::Tensor& input, int64_t groups,
                               const OptionalTensor& weight, const OptionalTensor& bias) {
  TORCH_CHECK(input.dim() >= 2, "Expected at least 2 dimensions for input tensor but received ",
              input.dim());
  const int64_t C = input.size(1);
  TORCH_CHECK(groups > 0, "Expected num groups to be greater than 0, got ", groups);
  TORCH_CHECK(C % groups == 0,
              "Expected number of channels in input to be divisible by num_groups, but got "
              "input of shape ", input.sizes(), " and num_groups=", groups);
  for (const auto& [param, name] : {std::pair(&weight, "weight"), std::pair(&bias, "bias")}) {
    TORCH_CHECK(!param->has_value() || ((*param)->dim() == 1 && (*param)->numel() == C),
                "Expected ", name, " to be a vector of size equal to the number of channels in "
                "input, but got ", name, " of shape ", (*param)->sizes(), " and input of shape ",
                input.sizes());
    TORCH_CHECK(!param->has_value() || (at::isFloatingType((*param)->scalar_type()) &&
                                        (*param)->device() == input.device()),
                "group_norm: expected ", name, " of a floating-point dtype on ", input.device());
  }
  TORCH_CHECK(at::isFloatingType(input.scalar_type()),
              "group_norm: expected a floating-point input, got ", input.scalar_type());
  return channel_view(input);
}

template <class Kernels>
struct GroupNormOps {
  static TensorTriple forward(const at::Tensor& input, int64_t groups,
                              const OptionalTensor& weight, const OptionalTensor& bias,
                              double eps, c10::string_view activation, double negative_slope,
                              double alpha) {
    const ActivationSpec spec = activation_spec(activation, negative_slope, alpha, "group_norm");
    const ChannelView view = groups_view(input, groups, weight, bias);
    const auto stat_options = input.options().dtype(accumulate_type(input.scalar_type()));
    at::Tensor output = Kernels::empty_output(view, {view.data.const_data_ptr()});
    if (view.channels == 0 || view.inner == 0) {  // torch's statistics of no elements
      const double nan = std::numeric_limits<double>::quiet_NaN();
      return {output, at::full({view.outer, groups}, nan, stat_options),
              at::full({view.outer, groups}, nan, stat_options)};
    }
    at::Tensor mean = at::empty({view.outer, groups}, stat_options);
    at::Tensor rstd = at::empty({view.outer, groups}, stat_options);
    if (view.outer > 0) {
      Kernels::forward(view, groups, value_or_undefined(weight), value_or_undefined(bias), eps,
                       spec, output, mean, rstd);
    }
    return {output, mean, rstd};
  }

  static TensorTriple backward(const at::Tensor& grad_out, const at::Tensor& input,
                               int64_t groups, const at::Tensor& mean, const at::Tensor& rstd,
                               const OptionalTensor& weight, const OptionalTensor& bias,
                               std::array<bool, 3> output_mask, c10::string_view activation,
                               double negative_slope, double alpha) {
    const ActivationSpec spec = activation_spec(activation, negative_slope, alpha, "group_norm");
    const ChannelView view = groups_view(input, groups, weight, bias);
    TORCH_CHECK(grad_out.sizes() == input.sizes() && grad_out.scalar_type() == input.scalar_type(),
                "group_norm_backward: expected grad_out of the input's shape and dtype, got ",
                grad_out.sizes(), " (", grad_out.scalar_type(), ")");
    const auto acc = accumulate_type(input.scalar_type());
    for (const at::Tensor* stat : {&mean, &rstd}) {
      TORCH_CHECK(stat->numel() == view.outer * groups && stat->scalar_type() == acc &&
                      stat->device() == input.device(),
                  "group_norm_backward: expected mean and rstd of ", view.outer * groups, " ",
                  acc, " values on ", input.device());
    }
    ChannelView dy = view;
    dy.data = in_layout_of(view, grad_out);
    at::Tensor grad_input, grad_weight, grad_bias;
    const auto param_options = weight.has_value() ? weight->options() : input.options();
    if (output_mask[0]) {
      grad_input = Kernels::empty_output(view, {view.data.const_data_ptr(), dy.data.const_data_ptr()});
    }
    if (output_mask[1] && weight.has_value()) grad_weight = at::empty({view.channels}, param_options);
    if (output_mask[2]) grad_bias = at::empty({view.channels}, param_options);
    if (view.outer == 0 || view.channels == 0 || view.inner == 0) {
      if (grad_input.defined()) grad_input.zero_();
      if (grad_weight.defined()) grad_weight.zero_();
      if (grad_bias.defined()) grad_bias.zero_();
      return {grad_input, grad_weight, grad_bias};
    }
    Kernels::backward(dy, view, groups, mean.contiguous(), rstd.contiguous(),
                      value_or_undefined(weight), value_or_undefined(bias), spec, grad_input,
                      grad_weight, grad_bias);
    return {grad_input, grad_weight, grad_bias};
  }
};

template <class Kernels>
void register_group_norm_ops(torch::Library& m) {
  using Ops = GroupNormOps<Kernels>;
  m.impl("group_norm_forward", &Ops::forward);
  m.impl("group_norm_backward", &Ops::backward);
}

}  // namespace normext::group_norm

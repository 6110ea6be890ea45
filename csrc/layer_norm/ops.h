// The normext layer-norm ops for one backend: argument checks (torch's
// messages), allocation and the calls into that backend's kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/core/ScalarType.h>
#include <torch/library.h>

#include <array>
#include <string>
#include <utility>
#include <limits>
#include <tuple>
#include <vector>

#include "common/channel_view.h"
#include "layer_norm/common.h"

namespace normext::layer_norm {

using OptionalTensor = c10::optional<at::Tensor>;
using TensorTriple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using TensorQuad = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

inline at::Tensor value_or_undefined(const OptionalTensor& t) {
  return t.has_value() ? *t : at::Tensor();
}

// The input as rows of the trailing normalized_shape, with torch's checks.
inline Rows rows_of(const at::Tensor& input, at::IntArrayRef normalized_shape,
                    const OptionalTensor& weight, const OptionalTensor& bias) {
  TORCH_CHECK(!normalized_shape.empty(),
              "Expected normalized_shape to be at least 1-dimensional, i.e., containing at "
              "least one element, but got normalized_shape = ", normalized_shape);
  for (const auto& [param, name] : {std::pair(&weight, "weight"), std::pair(&bias, "bias")}) {
    TORCH_CHECK(!param->has_value() || (*param)->sizes() == normalized_shape, "Expected ", name,
                " to be of same shape as normalized_shape, but got ", name, " of shape ",
                (*param)->sizes(), " and normalized_shape = ", normalized_shape);
  }
  const int64_t axis = input.dim() - static_cast<int64_t>(normalized_shape.size());
  TORCH_CHECK(axis >= 0 && input.sizes().slice(axis) == normalized_shape,
              "Given normalized_shape=", normalized_shape, ", expected input with shape [*",
              [&] {
                std::string dims;
                for (const int64_t size : normalized_shape) dims += ", " + std::to_string(size);
                return dims;
              }(),
              "], but got input of size", input.sizes());
  TORCH_CHECK(at::isFloatingType(input.scalar_type()),
              "layer_norm: expected a floating-point input, got ", input.scalar_type());
  for (const OptionalTensor& param : {weight, bias}) {
    TORCH_CHECK(!param.has_value() || (at::isFloatingType(param->scalar_type()) &&
                                       param->device() == input.device()),
                "layer_norm: expected weight and bias of a floating-point dtype on ",
                input.device());
  }
  int64_t features = 1;
  for (const int64_t size : normalized_shape) features *= size;
  const int64_t rows = features == 0 ? 1 : input.numel() / features;
  int64_t leading = 1;  // rows even where features == 0
  for (int64_t d = 0; d < axis; ++d) leading *= input.size(d);
  return {input.contiguous(), features == 0 ? leading : rows, features};
}

// The statistics' shape: the leading dims, then 1 per normalized dim.
inline std::vector<int64_t> stat_shape(const at::Tensor& input, size_t normalized_dims) {
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  std::fill(shape.end() - static_cast<int64_t>(normalized_dims), shape.end(), 1);
  return shape;
}

template <class Kernels>
struct LayerNormOps {
  // The forward of input (+ residual where defined).
  static TensorQuad normalize(const at::Tensor& input, const at::Tensor& residual,
                              at::IntArrayRef normalized_shape, const OptionalTensor& weight,
                              const OptionalTensor& bias, double eps, bool rms) {
    TORCH_CHECK(!(rms && bias.has_value()), "layer_norm_forward: rms takes no bias");
    const Rows view = rows_of(input, normalized_shape, weight, bias);
    const at::Tensor dense_residual = residual.defined() ? residual.contiguous() : at::Tensor();
    const auto stat_options = input.options().dtype(accumulate_type(input.scalar_type()));
    const std::vector<int64_t> shape = stat_shape(input, normalized_shape.size());
    at::Tensor output = Kernels::empty_output(view, {view.data.const_data_ptr()});
    at::Tensor sum;
    if (residual.defined()) {
      sum = Kernels::empty_output(view, {view.data.const_data_ptr(), dense_residual.const_data_ptr()});
    }
    if (view.features == 0) {  // torch's statistics of no elements
      const double nan = std::numeric_limits<double>::quiet_NaN();
      return {output, sum, at::full(shape, rms ? 0.0 : nan, stat_options),
              at::full(shape, nan, stat_options)};
    }
    at::Tensor mean = at::empty(shape, stat_options), rstd = at::empty(shape, stat_options);
    if (view.rows > 0) {
      Kernels::forward(view, dense_residual, value_or_undefined(weight), value_or_undefined(bias),
                       eps, rms, output, sum, mean, rstd);
    }
    return {output, sum, mean, rstd};
  }

  static TensorTriple forward(const at::Tensor& input, at::IntArrayRef normalized_shape,
                              const OptionalTensor& weight, const OptionalTensor& bias,
                              double eps, bool rms) {
    auto [output, sum, mean, rstd] =
        normalize(input, {}, normalized_shape, weight, bias, eps, rms);
    return {output, mean, rstd};
  }

  // (output, input + residual, mean, rstd): the layer norm of the sum.
  static TensorQuad add_forward(const at::Tensor& input, const at::Tensor& residual,
                                at::IntArrayRef normalized_shape, const OptionalTensor& weight,
                                const OptionalTensor& bias, double eps, bool rms) {
    TORCH_CHECK(residual.sizes() == input.sizes() &&
                    residual.scalar_type() == input.scalar_type() &&
                    residual.device() == input.device(),
                "add_layer_norm_forward: expected a residual of the input's shape, dtype and "
                "device, got ", residual.sizes(), " (", residual.scalar_type(), ")");
    return normalize(input, residual, normalized_shape, weight, bias, eps, rms);
  }

  static TensorTriple backward(const at::Tensor& grad_out, const at::Tensor& input,
                               at::IntArrayRef normalized_shape, const at::Tensor& mean,
                               const at::Tensor& rstd, const OptionalTensor& weight, bool rms,
                               std::array<bool, 3> output_mask,
                               const OptionalTensor& grad_sum) {
    const Rows view = rows_of(input, normalized_shape, weight, {});
    TORCH_CHECK(grad_out.sizes() == input.sizes() && grad_out.scalar_type() == input.scalar_type(),
                "layer_norm_backward: expected grad_out of the input's shape and dtype, got ",
                grad_out.sizes(), " (", grad_out.scalar_type(), ")");
    const auto acc = accumulate_type(input.scalar_type());
    for (const at::Tensor* stat : {&mean, &rstd}) {
      TORCH_CHECK(stat->numel() == view.rows && stat->scalar_type() == acc &&
                      stat->device() == input.device(),
                  "layer_norm_backward: expected mean and rstd of ", view.rows, " ", acc,
                  " values on ", input.device());
    }
    TORCH_CHECK(!grad_sum.has_value() || (grad_sum->sizes() == input.sizes() &&
                                          grad_sum->scalar_type() == input.scalar_type() &&
                                          grad_sum->device() == input.device()),
                "layer_norm_backward: expected grad_sum of the input's shape, dtype and device, "
                "got ", grad_sum->sizes(), " (", grad_sum->scalar_type(), ") on ",
                grad_sum->device());
    const Rows dy{grad_out.contiguous(), view.rows, view.features};
    const at::Tensor dense_grad_sum =
        output_mask[0] && grad_sum.has_value() ? grad_sum->contiguous() : at::Tensor();
    at::Tensor grad_input, grad_weight, grad_bias;
    const auto param_options = weight.has_value() ? weight->options() : input.options();
    if (output_mask[0]) {
      std::vector<const void*> reads{view.data.const_data_ptr(), dy.data.const_data_ptr()};
      if (dense_grad_sum.defined()) reads.push_back(dense_grad_sum.const_data_ptr());
      grad_input = Kernels::empty_output(view, reads);
    }
    if (output_mask[1] && weight.has_value()) grad_weight = at::empty(normalized_shape, param_options);
    if (output_mask[2]) grad_bias = at::empty(normalized_shape, param_options);
    if (view.rows == 0 || view.features == 0) {
      if (grad_weight.defined()) grad_weight.zero_();
      if (grad_bias.defined()) grad_bias.zero_();
      return {grad_input, grad_weight, grad_bias};
    }
    Kernels::backward(dy, view, mean.contiguous(), rstd.contiguous(), value_or_undefined(weight),
                      rms, dense_grad_sum, grad_input, grad_weight, grad_bias);
    return {grad_input, grad_weight, grad_bias};
  }
};

template <class Kernels>
void register_layer_norm_ops(torch::Library& m) {
  using Ops = LayerNormOps<Kernels>;
  m.impl("layer_norm_forward", &Ops::forward);
  m.impl("add_layer_norm_forward", &Ops::add_forward);
  m.impl("layer_norm_backward", &Ops::backward);
}

}  // namespace normext::layer_norm

// The normext batch-norm ops for one backend: argument checks, allocation and
// composition over that backend's kernels (Kernels = CpuKernels, ...).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "batch_norm/common.h"

namespace normext::batch_norm {

using OptionalTensor = c10::optional<at::Tensor>;

inline at::Tensor value_or_undefined(const OptionalTensor& t) {
  return t.has_value() ? *t : at::Tensor();
}

// A per-channel statistic; zeros unless a kernel will write every element.
inline at::Tensor new_stat(const at::Tensor& input, bool written) {
  const auto options = input.options().dtype(accumulate_type(input.scalar_type()));
  return written ? at::empty({input.size(1)}, options) : at::zeros({input.size(1)}, options);
}

inline void check_running_pair(const OptionalTensor& running_mean,
                               const OptionalTensor& running_var) {
  TORCH_CHECK_VALUE(running_mean.has_value() == running_var.has_value(),
                    "running_mean and running_var must either both be None or neither be None");
}

// The element count per channel of the ops that take it (the statistics of a
// batch spread over processes): a positive finite number.
inline void check_count(double count, const char* op) {
  TORCH_CHECK_VALUE(std::isfinite(count) && count > 0, op,
                    ": expected a positive element count per channel, got ", count);
}

template <class Kernels>
struct BatchNormOps {
  // (mean, biased var) per channel.
  static std::tuple<at::Tensor, at::Tensor> moments(const at::Tensor& input) {
    check_input(input);
    const ChannelView view = channel_view(input);
    at::Tensor mean = new_stat(input, view.count() > 0), var = new_stat(input, view.count() > 0);
    if (view.count() > 0) Kernels::moments(view, mean, var);
    return {mean, var};
  }

  // invstd from the batch moments of `count` elements per channel; updates
  // the running stats in place when given.
  static at::Tensor finalize(const at::Tensor& mean, const at::Tensor& var, double count,
                             const OptionalTensor& running_mean,
                             const OptionalTensor& running_var, double momentum, double eps) {
    TORCH_CHECK(mean.dim() == 1 && var.sizes() == mean.sizes(),
                "batch_norm_finalize: expected mean and var of one shape (C,), got ",
                mean.sizes(), " and ", var.sizes());
    TORCH_CHECK(mean.scalar_type() == var.scalar_type() &&
                    (mean.scalar_type() == at::kFloat || mean.scalar_type() == at::kDouble),
                "batch_norm_finalize: expected float32 or float64 mean and var of one dtype");
    check_running_pair(running_mean, running_var);
    check_count(count, "batch_norm_finalize");
    const at::Tensor m = mean.contiguous(), v = var.contiguous();
    for (const auto* running : {&running_mean, &running_var}) {
      if (!running->has_value()) continue;
      TORCH_CHECK(!(at::GradMode::is_enabled() && (*running)->requires_grad()),
                  "batch_norm_finalize: the running stats are updated in place and cannot "
                  "have requires_grad True");
      TORCH_CHECK((*running)->dim() == 1 && (*running)->numel() == mean.numel(),
                  "batch_norm_finalize: expected running stats of shape ", mean.sizes(),
                  " but got ", (*running)->sizes());
      TORCH_CHECK((*running)->device() == mean.device(),
                  "batch_norm_finalize: running stats on ", (*running)->device(),
                  " but the statistics are on ", mean.device());
    }
    TORCH_CHECK(!running_mean.has_value() ||  // both or neither (check_running_pair)
                    running_mean->scalar_type() == running_var->scalar_type(),
                "batch_norm_finalize: expected running_mean and running_var of one dtype, got ",
                running_mean->scalar_type(), " and ", running_var->scalar_type());
    at::Tensor invstd = at::empty_like(m);
    Kernels::finalize(m, v, count, value_or_undefined(running_mean),
                      value_or_undefined(running_var), momentum, eps, invstd);
    return invstd;
  }

  static at::Tensor elemt(const at::Tensor& input, const OptionalTensor& weight,
                          const OptionalTensor& bias, const at::Tensor& mean,
                          const at::Tensor& invstd) {
    return fused_elemt(input, weight, bias, mean, invstd, {}, {});
  }

  // elemt with the output activation(affine + residual): the synchronized
  // fused batch norm's forward, after its statistics.
  static at::Tensor elemt_act(const at::Tensor& input, const OptionalTensor& weight,
                              const OptionalTensor& bias, const at::Tensor& mean,
                              const at::Tensor& invstd, c10::string_view activation,
                              double negative_slope, double alpha,
                              const OptionalTensor& residual) {
    return fused_elemt(input, weight, bias, mean, invstd,
                       activation_spec(activation, negative_slope, alpha), residual);
  }

  // (sum dy, sum dy*(x-mean), grad_weight, grad_bias); the gradients have the
  // weight's dtype, or the accumulate type without a weight.
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_reduce(
      const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
      const at::Tensor& invstd, const OptionalTensor& weight) {
    check_input(input);
    check_same_as_input(input, grad_out, "grad_output");
    check_params(input, weight, {}, {}, {});
    check_stat(input, mean, "mean");
    check_stat(input, invstd, "invstd");
    const ChannelView view = channel_view(input);
    return reduce(in_layout_of(view, grad_out), view, mean, invstd, weight);
  }

  // Input gradient from the reduced sums over `count` elements per channel
  // (batch statistics).
  static at::Tensor backward_elemt(const at::Tensor& grad_out, const at::Tensor& input,
                                   const at::Tensor& mean, const at::Tensor& invstd,
                                   const OptionalTensor& weight, const at::Tensor& sum_dy,
                                   const at::Tensor& sum_dy_xmu, double count) {
    check_input(input);
    check_same_as_input(input, grad_out, "grad_output");
    check_params(input, weight, {}, {}, {});
    for (const auto& [stat, name] : {std::pair{&mean, "mean"}, {&invstd, "invstd"},
                                     {&sum_dy, "sum_dy"}, {&sum_dy_xmu, "sum_dy_xmu"}}) {
      check_stat(input, *stat, name);
    }
    check_count(count, "batch_norm_backward_elemt");
    const ChannelView view = channel_view(input);
    return grad_input(in_layout_of(view, grad_out), view, mean, invstd, weight, sum_dy,
                      sum_dy_xmu, count);
  }

  // Single-process forward: (output, mean, invstd). Training uses the batch
  // statistics and updates the running stats; eval uses the running stats.
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(
      const at::Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
      const OptionalTensor& running_mean, const OptionalTensor& running_var, bool training,
      double momentum, double eps) {
    return fused_forward(input, weight, bias, running_mean, running_var, training, momentum, eps,
                         {}, {});
  }

  // forward with the output activation(batch_norm(input) + residual).
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_act(
      const at::Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
      const OptionalTensor& running_mean, const OptionalTensor& running_var, bool training,
      double momentum, double eps, c10::string_view activation, double negative_slope,
      double alpha, const OptionalTensor& residual) {
    return fused_forward(input, weight, bias, running_mean, running_var, training, momentum, eps,
                         activation_spec(activation, negative_slope, alpha), residual);
  }

  // The output of forward_act: the batch_norm_act op below autograd.
  static at::Tensor output_act(const at::Tensor& input, const OptionalTensor& weight,
                               const OptionalTensor& bias, const OptionalTensor& running_mean,
                               const OptionalTensor& running_var, bool training, double momentum,
                               double eps, c10::string_view activation, double negative_slope,
                               double alpha, const OptionalTensor& residual,
                               bool memory_efficient) {
    const ActivationSpec spec = activation_spec(activation, negative_slope, alpha);
    if (memory_efficient) check_invertible(spec);
    return std::get<0>(fused_forward(input, weight, bias, running_mean, running_var, training,
                                     momentum, eps, spec, residual));
  }

  // The output of forward: the batch_norm op below autograd (inference mode).
  static at::Tensor output(const at::Tensor& input, const OptionalTensor& weight,
                           const OptionalTensor& bias, const OptionalTensor& running_mean,
                           const OptionalTensor& running_var, bool training, double momentum,
                           double eps) {
    return std::get<0>(
        forward(input, weight, bias, running_mean, running_var, training, momentum, eps));
  }

  // Single-process backward: (grad_input, grad_weight, grad_bias) with one
  // reduction pass and one elementwise pass. Without parameter_grads the
  // parameter gradients are undefined (None), and in eval, where the input
  // gradient needs no sums, the reduction is skipped (frozen parameters).
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
      const at::Tensor& grad_out, const at::Tensor& input, const OptionalTensor& weight,
      const at::Tensor& save_mean, const at::Tensor& save_invstd, bool training,
      bool parameter_grads) {
    check_input(input);
    check_same_as_input(input, grad_out, "grad_output");
    check_params(input, weight, {}, {}, {});
    check_stat(input, save_mean, "save_mean");
    check_stat(input, save_invstd, "save_invstd");
    const ChannelView view = channel_view(input);
    const at::Tensor dy = in_layout_of(view, grad_out);
    if (!training && !parameter_grads) {
      return {eval_grad_input(dy, view, save_invstd, weight), at::Tensor(), at::Tensor()};
    }
    auto [sum_dy, sum_dy_xmu, grad_weight, grad_bias] =
        reduce(dy, view, save_mean, save_invstd, weight);
    at::Tensor dx = training ? grad_input(dy, view, save_mean, save_invstd, weight, sum_dy,
                                          sum_dy_xmu, static_cast<double>(view.count()))
                             : eval_grad_input(dy, view, save_invstd, weight);
    if (!parameter_grads) return {dx, at::Tensor(), at::Tensor()};
    return {dx, grad_weight, grad_bias};
  }

  // backward through forward_act: (grad_input, grad_residual, grad_weight,
  // grad_bias), grad_residual defined where a residual or an output is given
  // (schema.cpp). The backward reads the forward's input (`saved`) with its
  // residual or its output, or, saved_is_output, its output alone (an
  // invertible activation; the weights must be invertible, which the caller
  // checks: common.h weights_invertible).
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_act(
      const at::Tensor& grad_out, const at::Tensor& saved, const OptionalTensor& residual,
      const OptionalTensor& output, const OptionalTensor& weight, const OptionalTensor& bias,
      const at::Tensor& save_mean, const at::Tensor& save_invstd, bool training,
      c10::string_view activation, double negative_slope, double alpha, bool saved_is_output,
      bool parameter_grads) {
    auto [view, dy, fused] = fused_grad_inputs(grad_out, saved, residual, output, weight, bias,
                                               activation, negative_slope, alpha,
                                               saved_is_output, true);
    check_stat(saved, save_mean, "save_mean");
    check_stat(saved, save_invstd, "save_invstd");
    at::Tensor dx, grad_weight, grad_bias;
    if (training || parameter_grads) {
      at::Tensor sum_dy, sum_dy_xmu;
      std::tie(sum_dy, sum_dy_xmu, grad_weight, grad_bias) =
          reduce(dy, view, save_mean, save_invstd, weight, fused);
      if (Kernels::kReduceWritesGradResidual && fused.grad_residual.defined() &&
          !fused.from_output) {
        // The reduction wrote dz: the input gradient is the plain batch norm's of dz.
        const at::Tensor& dz = fused.grad_residual;
        dx = training ? grad_input(dz, view, save_mean, save_invstd, weight, sum_dy, sum_dy_xmu,
                                   static_cast<double>(view.count()))
                      : eval_grad_input(dz, view, save_invstd, weight);
      } else {
        dx = training ? grad_input(dy, view, save_mean, save_invstd, weight, sum_dy, sum_dy_xmu,
                                   static_cast<double>(view.count()), fused)
                      : grad_input(dy, view, save_mean, save_invstd, weight, {}, {}, 1.0, fused);
      }
    } else {
      dx = grad_input(dy, view, save_mean, save_invstd, weight, {}, {}, 1.0, fused);
    }
    if (!parameter_grads) grad_weight = grad_bias = at::Tensor();
    return {dx, fused.grad_residual, grad_weight, grad_bias};
  }

  // backward_reduce through forward_act's fusion, from the tensors
  // backward_act reads: (sum dz, sum dz*(x-mean), grad_weight, grad_bias).
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_reduce_act(
      const at::Tensor& grad_out, const at::Tensor& saved, const OptionalTensor& residual,
      const OptionalTensor& output, const OptionalTensor& weight, const OptionalTensor& bias,
      const at::Tensor& mean, const at::Tensor& invstd, c10::string_view activation,
      double negative_slope, double alpha, bool saved_is_output) {
    auto [view, dy, fused] = fused_grad_inputs(grad_out, saved, residual, output, weight, bias,
                                               activation, negative_slope, alpha,
                                               saved_is_output, false);
    check_stat(saved, mean, "mean");
    check_stat(saved, invstd, "invstd");
    return reduce(dy, view, mean, invstd, weight, fused);
  }

  // backward_elemt through forward_act's fusion: (grad_input, grad_residual),
  // grad_residual defined where a residual or an output is given.
  static std::tuple<at::Tensor, at::Tensor> backward_elemt_act(
      const at::Tensor& grad_out, const at::Tensor& saved, const OptionalTensor& residual,
      const OptionalTensor& output, const OptionalTensor& weight, const OptionalTensor& bias,
      const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& sum_dy,
      const at::Tensor& sum_dy_xmu, double count, c10::string_view activation,
      double negative_slope, double alpha, bool saved_is_output) {
    auto [view, dy, fused] = fused_grad_inputs(grad_out, saved, residual, output, weight, bias,
                                               activation, negative_slope, alpha,
                                               saved_is_output, true);
    for (const auto& [stat, name] : {std::pair{&mean, "mean"}, {&invstd, "invstd"},
                                     {&sum_dy, "sum_dy"}, {&sum_dy_xmu, "sum_dy_xmu"}}) {
      check_stat(saved, *stat, name);
    }
    check_count(count, "batch_norm_act_backward_elemt");
    at::Tensor dx =
        grad_input(dy, view, mean, invstd, weight, sum_dy, sum_dy_xmu, count, fused);
    return {dx, fused.grad_residual};
  }

  // common.h invertible_weights, for the synchronized layer's memory_efficient mode.
  static at::Tensor invertible(const at::Tensor& weight, const OptionalTensor& bias) {
    TORCH_CHECK(!bias.has_value() ||
                    (bias->numel() == weight.numel() && bias->device() == weight.device()),
                "batch_norm_weights_invertible: expected a bias of ", weight.numel(),
                " elements on ", weight.device());
    return invertible_weights(weight, value_or_undefined(bias));
  }

 private:
  static at::Tensor fused_elemt(const at::Tensor& input, const OptionalTensor& weight,
                                const OptionalTensor& bias, const at::Tensor& mean,
                                const at::Tensor& invstd, const ActivationSpec& activation,
                                const OptionalTensor& residual) {
    check_input(input);
    check_params(input, weight, bias, {}, {});
    check_stat(input, mean, "mean");
    check_stat(input, invstd, "invstd");
    if (residual.has_value()) check_same_as_input(input, *residual, "residual");
    const ChannelView view = channel_view(input);
    const Fusion fusion = fusion_of(view, activation, residual);
    at::Tensor output = Kernels::empty_output(view, reads_of(view, fusion));
    if (input.numel() > 0) {
      Kernels::normalize(view, mean, invstd, value_or_undefined(weight), value_or_undefined(bias),
                         output, fusion);
    }
    return output;
  }

  // The forward's fusion, its residual dense in view's layout.
  static Fusion fusion_of(const ChannelView& view, const ActivationSpec& activation,
                          const OptionalTensor& residual) {
    return {activation, residual.has_value() ? in_layout_of(view, *residual) : at::Tensor()};
  }

  // The buffers the forward reads (an output allocated from the cache must not alias them).
  static std::vector<const void*> reads_of(const ChannelView& view, const Fusion& fusion) {
    std::vector<const void*> reads{view.data.const_data_ptr()};
    if (fusion.residual.defined()) reads.push_back(fusion.residual.const_data_ptr());
    return reads;
  }

  struct FusedGradInputs {
    ChannelView view;
    at::Tensor dy;  // in view's layout
    FusedGrad fused;
  };

  // The fused backward ops' shared checks and inputs: the view of `saved`, dy
  // in its layout and the FusedGrad, with grad_residual allocated (where a
  // residual or an output is given) if `writes_grad_residual`.
  static FusedGradInputs fused_grad_inputs(
      const at::Tensor& grad_out, const at::Tensor& saved, const OptionalTensor& residual,
      const OptionalTensor& output, const OptionalTensor& weight, const OptionalTensor& bias,
      c10::string_view activation, double negative_slope, double alpha, bool saved_is_output,
      bool writes_grad_residual) {
    check_input(saved);
    check_same_as_input(saved, grad_out, "grad_output");
    if (residual.has_value()) check_same_as_input(saved, *residual, "residual");
    if (output.has_value()) check_same_as_input(saved, *output, "output");
    check_params(saved, weight, bias, {}, {});
    FusedGrad fused;
    fused.fusion.activation = activation_spec(activation, negative_slope, alpha);
    if (saved_is_output) check_invertible(fused.fusion.activation);
    TORCH_CHECK_VALUE(!output.has_value() || (!saved_is_output && !residual.has_value() &&
                                              grad_from_output(fused.fusion.activation)),
                      "batch_norm_act_backward: an output is given with the forward's input, "
                      "in place of the residual, and not for silu, leaky_relu with a negative "
                      "slope or elu with a negative alpha");
    FusedGradInputs inputs{channel_view(saved), at::Tensor(), fused};
    const ChannelView& view = inputs.view;
    inputs.dy = in_layout_of(view, grad_out);
    const OptionalTensor& beside = residual.has_value() ? residual : output;
    if (beside.has_value()) {
      const at::Tensor dense = in_layout_of(view, *beside);
      (residual.has_value() ? inputs.fused.fusion.residual : inputs.fused.output) = dense;
      if (writes_grad_residual) {
        inputs.fused.grad_residual = Kernels::empty_output(
            view, {inputs.dy.const_data_ptr(), view.data.const_data_ptr(), dense.const_data_ptr()});
      }
    }
    inputs.fused.weight = value_or_undefined(weight);
    inputs.fused.bias = value_or_undefined(bias);
    inputs.fused.from_output = saved_is_output;
    return inputs;
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_forward(
      const at::Tensor& input, const OptionalTensor& weight, const OptionalTensor& bias,
      const OptionalTensor& running_mean, const OptionalTensor& running_var, bool training,
      double momentum, double eps, const ActivationSpec& activation,
      const OptionalTensor& residual) {
    check_input(input);
    TORCH_CHECK(training || running_mean.has_value(),
                "running_mean must be defined in evaluation mode");
    TORCH_CHECK(training || running_var.has_value(),
                "running_var must be defined in evaluation mode");
    check_running_pair(running_mean, running_var);
    check_params(input, weight, bias, running_mean, running_var);
    if (residual.has_value()) check_same_as_input(input, *residual, "residual");
    const ChannelView view = channel_view(input);
    const bool empty_batch = training && view.count() == 0;
    at::Tensor mean = new_stat(input, !empty_batch), invstd = new_stat(input, true);
    if (!training) {
      Kernels::running_stats(*running_mean, *running_var, eps, mean, invstd);
    } else if (!empty_batch) {
      Kernels::batch_stats(view, value_or_undefined(running_mean),
                           value_or_undefined(running_var), momentum, eps, mean, invstd);
    } else {  // mean and variance 0 (mean serves as both); the running stats are left alone
      Kernels::finalize(mean, mean, 0.0, {}, {}, momentum, eps, invstd);
    }
    const Fusion fusion = fusion_of(view, activation, residual);
    at::Tensor output = Kernels::empty_output(view, reads_of(view, fusion));
    if (input.numel() > 0) {
      Kernels::normalize(view, mean, invstd, value_or_undefined(weight), value_or_undefined(bias),
                         output, fusion);
    }
    return {output, mean, invstd};
  }

  // (sum dy, sum dy*(x-mean), grad_weight, grad_bias) from one reduction;
  // `dy` is in view's layout. The gradients have the weight's dtype, or the
  // accumulate type without a weight.
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> reduce(
      const at::Tensor& dy, const ChannelView& view, const at::Tensor& mean,
      const at::Tensor& invstd, const OptionalTensor& weight, const FusedGrad& fused = {}) {
    const bool written = view.data.numel() > 0;
    at::Tensor sum_dy = new_stat(view.data, written), sum_dy_xmu = new_stat(view.data, written);
    const auto grad_options =
        sum_dy.options().dtype(weight.has_value() ? weight->scalar_type() : sum_dy.scalar_type());
    at::Tensor grad_weight = written ? at::empty({view.channels}, grad_options)
                                     : at::zeros({view.channels}, grad_options);
    at::Tensor grad_bias = written ? at::empty({view.channels}, grad_options)
                                   : at::zeros({view.channels}, grad_options);
    if (written) {
      ChannelView dy_view = view;
      dy_view.data = dy;
      Kernels::backward_reduce(dy_view, view, mean, invstd, sum_dy, sum_dy_xmu, grad_weight,
                               grad_bias, fused);
    }
    return {sum_dy, sum_dy_xmu, grad_weight, grad_bias};
  }

  // The input gradient under batch statistics (under running statistics
  // where sum_dy is undefined, through a fusion); `dy` is in view's layout.
  static at::Tensor grad_input(const at::Tensor& dy, const ChannelView& view,
                               const at::Tensor& mean, const at::Tensor& invstd,
                               const OptionalTensor& weight, const at::Tensor& sum_dy,
                               const at::Tensor& sum_dy_xmu, double count,
                               const FusedGrad& fused = {}) {
    ChannelView dy_view = view;
    dy_view.data = dy;
    std::vector<const void*> reads{dy.const_data_ptr(), view.data.const_data_ptr()};
    for (const at::Tensor* t : {&fused.fusion.residual, &fused.output, &fused.grad_residual}) {
      if (t->defined()) reads.push_back(t->const_data_ptr());
    }
    at::Tensor dx = Kernels::empty_output(view, reads);
    if (view.data.numel() > 0) {
      Kernels::backward_elemt(dy_view, view, mean, invstd, value_or_undefined(weight), sum_dy,
                              sum_dy_xmu, count, dx, fused);
    }
    return dx;
  }

  // Under running statistics dx = dy * invstd * weight: normalize over dy
  // with mean 0 and no bias (one read, not two).
  static at::Tensor eval_grad_input(const at::Tensor& dy, const ChannelView& view,
                                    const at::Tensor& invstd, const OptionalTensor& weight) {
    ChannelView dy_view = view;
    dy_view.data = dy;
    at::Tensor dx = Kernels::empty_output(view, {dy.const_data_ptr()});
    if (view.data.numel() > 0) {
      Kernels::normalize(dy_view, at::Tensor(), invstd, value_or_undefined(weight), at::Tensor(),
                         dx);
    }
    return dx;
  }
};

// Registers every batch-norm op for one dispatch key (inside TORCH_LIBRARY_IMPL).
template <class Kernels>
void register_batch_norm_ops(torch::Library& m) {
  using Ops = BatchNormOps<Kernels>;
  m.impl("batch_norm_moments", &Ops::moments);
  m.impl("batch_norm_finalize", &Ops::finalize);
  m.impl("batch_norm_elemt", &Ops::elemt);
  m.impl("batch_norm_backward_reduce", &Ops::backward_reduce);
  m.impl("batch_norm_backward_elemt", &Ops::backward_elemt);
  m.impl("batch_norm_forward", &Ops::forward);
  m.impl("batch_norm_backward", &Ops::backward);
  m.impl("batch_norm", &Ops::output);
  m.impl("batch_norm_act_forward", &Ops::forward_act);
  m.impl("batch_norm_act_backward", &Ops::backward_act);
  m.impl("batch_norm_act", &Ops::output_act);
  m.impl("batch_norm_act_elemt", &Ops::elemt_act);
  m.impl("batch_norm_act_backward_reduce", &Ops::backward_reduce_act);
  m.impl("batch_norm_act_backward_elemt", &Ops::backward_elemt_act);
  m.impl("batch_norm_weights_invertible", &Ops::invertible);
}

}  // namespace normext::batch_norm

#include "batch_norm/common.h"

#include <ATen/ops/ones_like.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <utility>

namespace normext::batch_norm {
namespace {
std::atomic<bool> merge_in_last_block{false};
}  // namespace

bool cuda_merge_in_last_block() { return merge_in_last_block.load(std::memory_order_relaxed); }

bool set_cuda_merge_in_last_block(bool enabled) { return merge_in_last_block.exchange(enabled); }

void check_input(const at::Tensor& input) {
  const auto type = input.scalar_type();
  TORCH_CHECK_NOT_IMPLEMENTED(type == at::kFloat || type == at::kDouble || type == at::kHalf ||
                                  type == at::kBFloat16,
                              "\"batch_norm\" not implemented for '",
                              c10::toString(input.scalar_type()), "'");
  TORCH_CHECK(input.dim() >= 2,
              "batch_norm: expected an input of shape (N, C, ...) with at least 2 dims, got ",
              input.dim(), " dims");
}

void check_params(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                  const c10::optional<at::Tensor>& bias,
                  const c10::optional<at::Tensor>& running_mean,
                  const c10::optional<at::Tensor>& running_var) {
  const int64_t channels = input.size(1);
  // torch's order, so that the first mismatch named is the same.
  const std::pair<const c10::optional<at::Tensor>*, const char*> params[] = {
      {&running_mean, "running_mean"},
      {&running_var, "running_var"},
      {&weight, "weight"},
      {&bias, "bias"}};
  c10::optional<at::ScalarType> param_type;
  const char* first_name = nullptr;
  for (const auto& [param, name] : params) {
    if (!param->has_value() || !(*param)->defined()) continue;
    const at::Tensor& t = **param;
    TORCH_CHECK(t.numel() == channels, name, " should contain ", channels, " elements not ",
                t.numel());
    // torch takes weight and bias of any shape with C elements, running stats 1-D only.
    TORCH_CHECK(t.dim() == 1 || param == &weight || param == &bias, "batch_norm: expected ", name,
                " of shape [", channels, "] but got ", t.sizes());
    TORCH_CHECK(t.device() == input.device(), "batch_norm: expected ", name,
                " on the input's device ", input.device(), " but it is on ", t.device());
    if (!param_type) {
      const bool reduced = input.scalar_type() == at::kHalf || input.scalar_type() == at::kBFloat16;
      TORCH_CHECK(t.scalar_type() == input.scalar_type() ||
                      (reduced && t.scalar_type() == at::kFloat),
                  "batch_norm: expected ", name, " to have dtype ",
                  c10::toString(input.scalar_type()),
                  reduced ? " or Float" : "", " (from the ", c10::toString(input.scalar_type()),
                  " input) but got ", c10::toString(t.scalar_type()));
      param_type = t.scalar_type();
      first_name = name;
    }
    TORCH_CHECK(t.scalar_type() == *param_type, "batch_norm: expected ", name,
                " to have the same dtype as ", first_name, " (", c10::toString(*param_type),
                ") but got ", c10::toString(t.scalar_type()));
  }
}

void check_stat(const at::Tensor& input, const at::Tensor& stat, const char* name) {
  TORCH_CHECK(stat.numel() == input.size(1), name, " should contain ", input.size(1),
              " elements not ", stat.numel());
  TORCH_CHECK(stat.dim() == 1, "batch_norm: expected ", name, " of shape [", input.size(1),
              "] but got ", stat.sizes());
  TORCH_CHECK(stat.device() == input.device(), "batch_norm: expected ", name,
              " on the input's device ", input.device(), " but it is on ", stat.device());
  TORCH_CHECK(stat.scalar_type() == accumulate_type(input.scalar_type()), "batch_norm: expected ",
              name, " of dtype ", c10::toString(accumulate_type(input.scalar_type())),
              " but got ", c10::toString(stat.scalar_type()));
}

void check_same_as_input(const at::Tensor& input, const at::Tensor& other, const char* name) {
  TORCH_CHECK(other.sizes() == input.sizes(), "batch_norm: expected ", name, " of shape ",
              input.sizes(), " but got ", other.sizes());
  TORCH_CHECK(other.device() == input.device(), "batch_norm: expected ", name,
              " on the input's device ", input.device(), " but it is on ", other.device());
  TORCH_CHECK(other.scalar_type() == input.scalar_type(), "batch_norm: expected ", name,
              " of dtype ", c10::toString(input.scalar_type()), " but got ",
              c10::toString(other.scalar_type()));
}

}  // namespace normext::batch_norm

namespace normext::batch_norm {

void check_invertible(const ActivationSpec& activation) {
  const bool invertible =
      activation.kind == Activation::kIdentity ||
      (activation.kind == Activation::kLeakyRelu && activation.negative_slope > 0) ||
      (activation.kind == Activation::kElu && activation.alpha > 0);
  TORCH_CHECK_VALUE(invertible,
                    "memory_efficient=True recovers the activation's input from its output, "
                    "so it needs an invertible activation: identity, leaky_relu with "
                    "negative_slope > 0, or elu with alpha > 0");
}

at::Tensor invertible_weights(const at::Tensor& weight, const at::Tensor& bias) {
  const at::Tensor w = weight.detach().to(at::kDouble).abs().reshape(-1);
  const at::Tensor scale = bias.defined()
                               ? bias.detach().to(at::kDouble).abs().reshape(-1).clamp_min(1.0)
                               : at::ones_like(w);
  return w.ge(scale.mul(kMinInvertibleWeight)).all();  // a NaN weight compares false
}

bool weights_invertible(const at::Tensor& weight, const at::Tensor& bias) {
  return !weight.defined() || invertible_weights(weight, bias).item<bool>();
}

}  // namespace normext::batch_norm

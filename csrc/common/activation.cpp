// Activation names as the ops take them.
#include "common/activation.h"

#include <c10/util/Exception.h>

#include <utility>

namespace normext {

ActivationSpec activation_spec(c10::string_view name, double negative_slope, double alpha,
                               const char* op) {
  static constexpr std::pair<const char*, Activation> kNames[] = {
      {"identity", Activation::kIdentity}, {"relu", Activation::kRelu},
      {"relu6", Activation::kRelu6},       {"leaky_relu", Activation::kLeakyRelu},
      {"elu", Activation::kElu},           {"silu", Activation::kSilu}};
  for (const auto& [known, kind] : kNames) {
    if (name == known) return {kind, negative_slope, alpha};
  }
  TORCH_CHECK_VALUE(false, op, ": unknown activation '", name,
                    "'; expected one of identity, relu, relu6, leaky_relu, elu, silu");
}

}  // namespace normext

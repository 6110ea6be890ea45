// The autograd kernels' shared pieces (common/autograd.h).
#include "common/autograd.h"

#include <ATen/ops/elu.h>
#include <ATen/ops/hardtanh.h>
#include <ATen/ops/leaky_relu.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/silu.h>

#include <string>

namespace normext {

void check_no_tangents(const char* op, std::initializer_list<const OptionalTensor*> inputs) {
  for (const OptionalTensor* t : inputs) {
    TORCH_CHECK_NOT_IMPLEMENTED(
        !(t->has_value() && (*t)->defined() && (*t)->_fw_grad(/*level=*/0).defined()),
        "normext::", op, " has no forward-mode AD formula; normext.functional's "
        "functions compute inputs with tangents with torch's ops");
  }
}

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

std::vector<bool> wanted_grads(const torch::autograd::Node& node) {
  std::vector<bool> wanted(node.num_outputs());
  for (size_t i = 0; i < wanted.size(); ++i) wanted[i] = node.task_should_compute_output(i);
  return wanted;
}

variable_list record_functional(const torch::autograd::Node& node, const char* name,
                                torch::autograd::functional_apply_t functional,
                                torch::dynamo::autograd::PackedArgs args,
                                const variable_list& grads,
                                torch::autograd::SwapSavedVariables& saved) {
  using torch::autograd::InputMetadata;
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

}  // namespace normext

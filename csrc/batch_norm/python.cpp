// Direct Python entries of the differentiable batch-norm ops, for eager calls
// from normext.functional: torch.ops' boxed call matches every argument
// against the schema first, microseconds a small batch norm notices. The
// call still goes through the dispatcher (autograd, autocast, tracing,
// dispatch modes), as torch's own Python bindings do.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <string>

namespace normext::batch_norm {
namespace {

using OptionalTensor = std::optional<at::Tensor>;

at::Tensor batch_norm(const at::Tensor& input, const OptionalTensor& weight,
                      const OptionalTensor& bias, const OptionalTensor& running_mean,
                      const OptionalTensor& running_var, bool training, double momentum,
                      double eps) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("normext::batch_norm", "")
          .typed<at::Tensor(const at::Tensor&, const OptionalTensor&, const OptionalTensor&,
                            const OptionalTensor&, const OptionalTensor&, bool, double,
                            double)>();
  return op.call(input, weight, bias, running_mean, running_var, training, momentum, eps);
}

at::Tensor batch_norm_act(const at::Tensor& input, const OptionalTensor& weight,
                          const OptionalTensor& bias, const OptionalTensor& running_mean,
                          const OptionalTensor& running_var, bool training, double momentum,
                          double eps, const std::string& activation, double negative_slope,
                          double alpha, const OptionalTensor& residual, bool memory_efficient) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("normext::batch_norm_act", "")
          .typed<at::Tensor(const at::Tensor&, const OptionalTensor&, const OptionalTensor&,
                            const OptionalTensor&, const OptionalTensor&, bool, double, double,
                            c10::string_view, double, double, const OptionalTensor&, bool)>();
  return op.call(input, weight, bias, running_mean, running_var, training, momentum, eps,
                 activation, negative_slope, alpha, residual, memory_efficient);
}

}  // namespace

void bind_python(pybind11::module_& m) {
  // Without the GIL while the kernels run, like torch's bindings.
  const auto release = pybind11::call_guard<pybind11::gil_scoped_release>();
  using pybind11::arg;
  m.def("batch_norm", &batch_norm, release,
        "torch.ops.normext.batch_norm without the boxed call's argument matching",
        arg("input"), arg("weight"), arg("bias"), arg("running_mean"), arg("running_var"),
        arg("training"), arg("momentum"), arg("eps"));
  m.def("batch_norm_act", &batch_norm_act, release,
        "torch.ops.normext.batch_norm_act without the boxed call's argument matching",
        arg("input"), arg("weight"), arg("bias"), arg("running_mean"), arg("running_var"),
        arg("training"), arg("momentum"), arg("eps"), arg("activation"),
        arg("negative_slope"), arg("alpha"), arg("residual"), arg("memory_efficient"));
}

}  // namespace normext::batch_norm

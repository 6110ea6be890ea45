// Direct Python entries of the differentiable batch-norm ops, for eager calls
// from normext.functional: torch.ops' boxed call matches every argument
// against the schema first, microseconds a small batch norm notices. The
// call still goes through the dispatcher (autograd, autocast, tracing,
// dispatch modes), as torch's own Python bindings do.
#include <ATen/EmptyTensor.h>
#include <ATen/ScalarOps.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/InferenceMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <string>

namespace normext::batch_norm {
namespace {

using OptionalTensor = std::optional<at::Tensor>;

// The key set of a plain CPU tensor (no subclass, view bits, functionalization
// or inference mode), the only counters count_batch increments itself.
c10::DispatchKeySet plain_cpu_keys() {
  static const c10::DispatchKeySet keys = [] {
    c10::InferenceMode normal_mode(false);
    return at::detail::empty_cpu({}, at::kLong).key_set();
  }();
  return keys;
}

// torch's _BatchNorm.forward before its batch_norm call: a module's
// num_batches_tracked (when given) counts the batch, and momentum None asks
// for the cumulative average. Returns the momentum factor. A plain CPU
// counter is incremented here (bumping its version, as add_ does), a Python
// add_'s TensorIterator being a few times the work; others take torch's add_
// (the overload Python's add_(1) calls), as do dispatch modes and jit.trace,
// which record it.
double count_batch(const OptionalTensor& num_batches_tracked, std::optional<double> momentum) {
  if (!num_batches_tracked) {
    TORCH_CHECK_TYPE(momentum, "batch_norm(): argument 'momentum' must be float, not None");
    return *momentum;
  }
  at::Tensor counter = *num_batches_tracked;
  if (counter.key_set() == plain_cpu_keys() && counter.scalar_type() == at::kLong &&
      counter.numel() == 1 && c10::impl::TorchDispatchModeTLS::stack_len() == 0 &&
      !c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::Tracer)) {
    const int64_t count = ++*counter.mutable_data_ptr<int64_t>();
    counter.unsafeGetTensorImpl()->bump_version();
    return momentum ? *momentum : 1.0 / static_cast<double>(count);
  }
  counter.add_(at::native::wrapped_scalar_tensor(1));
  return momentum ? *momentum : 1.0 / counter.item<double>();
}

at::Tensor batch_norm(const at::Tensor& input, const OptionalTensor& weight,
                      const OptionalTensor& bias, const OptionalTensor& running_mean,
                      const OptionalTensor& running_var, bool training,
                      std::optional<double> momentum, double eps,
                      const OptionalTensor& num_batches_tracked) {
  const double factor = count_batch(num_batches_tracked, momentum);
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("normext::batch_norm", "")
          .typed<at::Tensor(const at::Tensor&, const OptionalTensor&, const OptionalTensor&,
                            const OptionalTensor&, const OptionalTensor&, bool, double,
                            double)>();
  return op.call(input, weight, bias, running_mean, running_var, training, factor, eps);
}

at::Tensor batch_norm_act(const at::Tensor& input, const OptionalTensor& weight,
                          const OptionalTensor& bias, const OptionalTensor& running_mean,
                          const OptionalTensor& running_var, bool training,
                          std::optional<double> momentum, double eps,
                          const std::string& activation, double negative_slope, double alpha,
                          const OptionalTensor& residual, bool memory_efficient,
                          const OptionalTensor& num_batches_tracked) {
  const double factor = count_batch(num_batches_tracked, momentum);
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("normext::batch_norm_act", "")
          .typed<at::Tensor(const at::Tensor&, const OptionalTensor&, const OptionalTensor&,
                            const OptionalTensor&, const OptionalTensor&, bool, double, double,
                            c10::string_view, double, double, const OptionalTensor&, bool)>();
  return op.call(input, weight, bias, running_mean, running_var, training, factor, eps,
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
        arg("training"), arg("momentum"), arg("eps"),
        arg("num_batches_tracked") = pybind11::none());
  m.def("set_cuda_merge_in_last_block", &set_cuda_merge_in_last_block,
        "Whether the CUDA batch-norm reductions merge their partials in their first kernel's "
        "last block (one launch fewer; not yet run on a GPU); returns the previous setting",
        arg("enabled"));
  m.def("batch_norm_act", &batch_norm_act, release,
        "torch.ops.normext.batch_norm_act without the boxed call's argument matching",
        arg("input"), arg("weight"), arg("bias"), arg("running_mean"), arg("running_var"),
        arg("training"), arg("momentum"), arg("eps"), arg("activation"),
        arg("negative_slope"), arg("alpha"), arg("residual"), arg("memory_efficient"),
        arg("num_batches_tracked") = pybind11::none());
}

}  // namespace normext::batch_norm

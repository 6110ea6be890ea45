// The normext op schemas and the Python extension module's build information.
#include <torch/extension.h>
#include <torch/library.h>

#include "batch_norm/cpu/dispatch.h"
#include "common/cpu_output_allocator.h"

#ifndef NORMEXT_TORCH_VERSION
#define NORMEXT_TORCH_VERSION "unknown"
#endif
#ifndef NORMEXT_CUDA_ARCHES
#define NORMEXT_CUDA_ARCHES ""
#endif

// Per-channel statistics over every dim but dim 1, in float32 (float64 for a
// float64 input). `count` is the number of elements each channel's statistics
// cover (across all ranks for a synchronized batch norm).
TORCH_LIBRARY(normext, m) {
  m.def("batch_norm_moments(Tensor input) -> (Tensor mean, Tensor var)");
  m.def(
      "batch_norm_finalize(Tensor mean, Tensor var, float count, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, float momentum, float eps) -> Tensor invstd");
  m.def(
      "batch_norm_elemt(Tensor input, Tensor? weight, Tensor? bias, Tensor mean, "
      "Tensor invstd) -> Tensor");
  m.def(
      "batch_norm_backward_reduce(Tensor grad_out, Tensor input, Tensor mean, Tensor invstd, "
      "Tensor? weight) -> (Tensor sum_dy, Tensor sum_dy_xmu, Tensor grad_weight, "
      "Tensor grad_bias)");
  m.def(
      "batch_norm_backward_elemt(Tensor grad_out, Tensor input, Tensor mean, Tensor invstd, "
      "Tensor? weight, Tensor sum_dy, Tensor sum_dy_xmu, float count) -> Tensor");
  m.def(
      "batch_norm_forward(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, bool training, float momentum, float eps) "
      "-> (Tensor output, Tensor save_mean, Tensor save_invstd)");
  m.def(
      "batch_norm_backward(Tensor grad_out, Tensor input, Tensor? weight, Tensor save_mean, "
      "Tensor save_invstd, bool training, bool parameter_grads=True) -> (Tensor grad_input, "
      "Tensor grad_weight, Tensor grad_bias)");
  // torch.nn.functional.batch_norm's contract: the output only, differentiable
  // (batch_norm/autograd.cpp), for eager calls.
  m.def(
      "batch_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, bool training, float momentum, float eps) -> Tensor");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "normext compiled kernels; the ops live in torch.ops.normext";
  py::list backends;
  backends.append("cpu");
#ifdef NORMEXT_WITH_CUDA
  backends.append("cuda");
#endif
  m.attr("backends") = backends;
  m.attr("cuda_arches") = NORMEXT_CUDA_ARCHES;
  m.attr("torch_version") = NORMEXT_TORCH_VERSION;
  m.attr("cpu_capabilities") = normext::batch_norm::cpu_capabilities();
  m.def("cpu_capability", &normext::batch_norm::cpu_capability,
        "The CPU kernel variant this process runs (torch's choice among those compiled)");
  m.def("release_cpu_output_cache", &normext::release_cpu_output_cache,
        "Frees the CPU output blocks normext keeps for reuse; returns the bytes freed");
  m.def(
      "cpu_output_cache_info",
      [] {
        const normext::CpuOutputCacheInfo info = normext::cpu_output_cache_info();
        py::dict state;
        state["cached_bytes"] = info.cached_bytes;
        state["in_use_bytes"] = info.in_use_bytes;
        state["limit_bytes"] = info.limit_bytes;
        state["hits"] = info.hits;
        state["misses"] = info.misses;
        state["evictions"] = info.evictions;
        state["enabled"] = info.enabled;
        return state;
      },
      "The CPU output cache's bytes, limit, counts and whether it is on");
  m.def("set_cpu_output_cache_enabled", &normext::set_cpu_output_cache_enabled,
        "Switches the CPU output cache off or back on (benchmarks, tests); returns the previous "
        "setting",
        py::arg("enabled"));
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}

// The normext op library (each norm adds its schemas as a fragment:
// <norm>/schema.cpp) and the Python extension module's build information.
// pybind11 alone, not torch/extension.h: the whole of torch's C++ API would
// make this the slowest file to compile (the entries that take tensors are
// bound in their norm's python.cpp).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>

#include "common/cpu/dispatch.h"
#include "common/cpu_output_allocator.h"

#ifndef NORMEXT_TORCH_VERSION
#define NORMEXT_TORCH_VERSION "unknown"
#endif
#ifndef NORMEXT_CUDA_ARCHES
#define NORMEXT_CUDA_ARCHES ""
#endif

namespace py = pybind11;

namespace normext::batch_norm {
void bind_python(py::module_& m);  // batch_norm/python.cpp
}

TORCH_LIBRARY(normext, m) {}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "normext compiled kernels; the ops live in torch.ops.normext";
  py::list backends;
  backends.append("cpu");
#ifdef NORMEXT_WITH_CUDA
  backends.append("cuda");
#endif
  m.attr("backends") = backends;
  normext::batch_norm::bind_python(m);
  m.attr("cuda_arches") = NORMEXT_CUDA_ARCHES;
  m.attr("torch_version") = NORMEXT_TORCH_VERSION;
  m.attr("cpu_capabilities") = normext::cpu::capabilities();
  m.def("cpu_capability", &normext::cpu::capability,
        "The CPU kernel variant this process runs (torch's choice among those compiled)");
  m.def("cpu_bfloat16_instruction", [] { return normext::cpu::converts_bfloat16; },
        "Whether the AVX-512 kernels narrow to bfloat16 with AVX512_BF16's instruction");
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

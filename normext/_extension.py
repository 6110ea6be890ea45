"""Loads the compiled kernels (normext._C) and checks they match the installed torch."""

import contextlib
import warnings

import torch

_REBUILD = (
    "Rebuild normext against the installed torch from its source folder with\n"
    "    pip install --no-build-isolation --force-reinstall --no-deps .\n"
    "(or `python setup.py build_ext --inplace` for a source checkout)."
)

try:
    from . import _C
except ImportError as error:  # missing build, or built against another torch (undefined symbols)
    raise ImportError(
        f"normext's compiled extension normext._C could not be loaded with torch "
        f"{torch.__version__}: {error}\n{_REBUILD}"
    ) from error


def _release(version: str) -> str:
    return version.split("+")[0]


if _release(_C.torch_version) != _release(torch.__version__):
    raise ImportError(
        f"normext was compiled against torch {_C.torch_version} but torch "
        f"{torch.__version__} is installed; C++ extensions only work with the torch "
        f"they were built with.\n{_REBUILD}"
    )


def build_info() -> dict:
    """What the installed normext was compiled with: the backends (\"cpu\",
    \"cuda\"), the CPU kernel variants (\"cpu_capabilities\") and the one
    this process runs (\"cpu_capability\": torch's choice, which
    ATEN_CPU_CAPABILITY=default|avx2|avx512 overrides), whether the kernels
    it runs round float to bfloat16 with the CPU's AVX512_BF16 instruction
    (\"cpu_bfloat16_instruction\": the AVX-512 kernels on such a CPU, to the
    same bits; NORMEXT_AVX512_BF16=0, set before the import, turns it off),
    the CUDA arches, whether OpenMP is on, and the torch version."""
    capability = _C.cpu_capability()
    return {
        "backends": list(_C.backends),
        "cpu_bfloat16_instruction": (_C.cpu_bfloat16_instruction()
                                     and capability in ("avx512", "native")),
        "cpu_capability": capability,
        "cpu_capabilities": list(_C.cpu_capabilities),
        "cuda_arches": _C.cuda_arches,
        "openmp": bool(_C.openmp),
        "torch_version": _C.torch_version,
    }


def warn_if_cuda_unbuilt() -> None:
    """Warns when a GPU is visible but normext was built without its CUDA
    kernels (a build on a machine without a GPU skips them): CUDA tensors then
    have no normext kernels."""
    if torch.cuda.is_available() and "cuda" not in _C.backends:
        warnings.warn(
            "normext was built without its CUDA kernels (no GPU was visible to the build), "
            "so CUDA tensors cannot use it. Rebuild it from its source folder where the GPU "
            "is visible, or with FORCE_CUDA=1:\n"
            "    pip install --no-build-isolation --force-reinstall --no-deps .   "
            "(-e . for an editable install)",
            UserWarning, stacklevel=2)


warn_if_cuda_unbuilt()


def release_cpu_cache() -> int:
    """Free the CPU output blocks normext keeps for reuse (like
    torch.cuda.empty_cache); returns the bytes freed. normext allocates large CPU
    outputs from a cache of freed blocks so that training loops do not page-fault
    on fresh memory every step; NORMEXT_CPU_CACHE_MB caps it (0 = off; read at
    the first large output, see cpu_cache_info for the limit in effect)."""
    return _C.release_cpu_output_cache()


def cpu_cache_info() -> dict:
    """The state of normext's CPU output cache: ``cached_bytes`` (freed blocks
    kept for reuse), ``in_use_bytes`` (blocks held by tensors), ``limit_bytes``
    (the cap on cached_bytes), ``hits`` and ``misses`` (large outputs given a
    cached block / a newly mapped one), ``evictions`` (cached blocks freed to
    make room, by release_cpu_cache or to retry a failed mapping) and
    ``enabled``. Counts start at zero in each process, forked children
    included. Reads NORMEXT_CPU_CACHE_MB if no large output has yet."""
    return _C.cpu_output_cache_info()


def cached_cpu_bytes() -> int:
    """Bytes of freed CPU output blocks normext currently keeps for reuse
    (``cpu_cache_info()["cached_bytes"]``)."""
    return cpu_cache_info()["cached_bytes"]


@contextlib.contextmanager
def cpu_cache_disabled():
    """Within it, CPU outputs come from torch's allocator as if the cache did not
    exist (the blocks it holds stay cached): for benchmarks and tests that time
    or check the kernels alone. It applies to every thread."""
    was_enabled = _C.set_cpu_output_cache_enabled(False)
    try:
        yield
    finally:
        _C.set_cpu_output_cache_enabled(was_enabled)

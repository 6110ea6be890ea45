"""Shared fixtures and helpers for the normext test suite.

* ``devices``: the devices the numeric tests run on: "cpu", plus "cuda" where a
  GPU is visible and normext was built with its CUDA kernels.
* ``device`` fixture / ``DEVICE_PARAMS``: parametrizes a test over "cpu" and
  "cuda"; the CUDA case is skipped (not silently dropped) without a GPU.
* ``tolerances`` / ``assert_close``: per-dtype tolerances.
* ``layout_variants``: a tensor as contiguous, channels-last and strided inputs.
* ``num_threads`` fixture: pins torch's thread count for tests whose code
  path depends on it, restored afterwards.
* ``slow`` marker: skipped unless NORMEXT_SLOW_TESTS=1.
"""

import inspect
import os
import sys

import pytest
import torch

try:
    import normext
except ImportError:  # a source checkout run with plain `pytest` from elsewhere
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import normext

# ---------------------------------------------------------------------------
# devices

CUDA_AVAILABLE = torch.cuda.is_available() and "cuda" in normext.build_info()["backends"]

devices = ["cpu"] + (["cuda"] if CUDA_AVAILABLE else [])

requires_cuda = pytest.mark.skipif(
    not CUDA_AVAILABLE, reason="needs a CUDA GPU and normext built with CUDA kernels")

# Every numeric test is parametrized over these: the CUDA case shows up as
# skipped on a machine without a GPU and runs where there is one.
DEVICE_PARAMS = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, requires_cuda]),
]


@pytest.fixture(params=DEVICE_PARAMS)
def device(request):
    return request.param


# ---------------------------------------------------------------------------
# module flags

# `bias=False` (an affine weight without a bias) is newer than torch 2.11.
BN_HAS_BIAS_FLAG = "bias" in inspect.signature(torch.nn.BatchNorm2d.__init__).parameters


def flag_params(flag_sets, ids=None):
    """pytest params of module keyword sets; those with `bias=` skip on a torch
    whose BatchNorm lacks that flag."""
    skip = pytest.mark.skipif(not BN_HAS_BIAS_FLAG, reason="this torch's BatchNorm has no bias=")
    ids = ids or [",".join(f"{k}={v}" for k, v in flags.items()) or "default"
                  for flags in flag_sets]
    return [pytest.param(flags, id=name, marks=[skip] if "bias" in flags else [])
            for flags, name in zip(flag_sets, ids)]


# ---------------------------------------------------------------------------
# tolerances

FLOAT_DTYPES = [torch.float64, torch.float32]
REDUCED_DTYPES = [torch.bfloat16, torch.float16]
ALL_DTYPES = FLOAT_DTYPES + REDUCED_DTYPES

# (rtol, atol). float64/float32 are compared against torch in the same dtype;
# half/bfloat16 results against a float64 reference computed from the
# (exactly) upcast inputs, so the error is the output rounding: one or two
# ulps (2**-11 for half, 2**-8 for bfloat16) of values of magnitude ~4.
_TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 3e-2),
    torch.float16: (2e-3, 5e-3),
}


# Where silu's and elu's exp overflows or underflows, the infinities and NaN,
# and the relative tolerance of their values there against torch's.
SMOOTH_EDGE_VALUES = [-float("inf"), -1000.0, -100.0, -88.8, -88.5, -87.5, -20.0, -1.0, -0.0, 0.0,
                      1.0, 20.0, 87.5, 88.5, 100.0, float("inf"), float("nan")]
EDGE_RTOL = {torch.float64: 1e-7, torch.float32: 2e-6, torch.bfloat16: 1.6e-2}


def tolerances(dtype: torch.dtype) -> dict:
    rtol, atol = _TOLERANCES[dtype]
    return {"rtol": rtol, "atol": atol}


def assert_close(actual, expected, dtype=None, *, scaled=True, factor=1.0, msg=None):
    """torch.testing.assert_close with the tolerances of `dtype` (default:
    actual's dtype). `scaled` multiplies atol by max(1, max|expected|), since
    reductions (weight grads, sums) grow with the values they add up; `factor`
    multiplies both tolerances (for ill-conditioned data, e.g. the ratio
    |mean| / std, which scales the rounding error of x - mean). Values are
    compared in float64, NaN equal to NaN."""
    if actual is None or expected is None:
        assert actual is None and expected is None, (actual, expected)
        return
    if not actual.is_floating_point():  # integer buffers (num_batches_tracked): exact
        assert actual.dtype == expected.dtype, msg
        assert torch.equal(actual.cpu(), expected.cpu()), msg
        return
    dtype = actual.dtype if dtype is None else dtype
    tol = {key: value * factor for key, value in tolerances(dtype).items()}
    expected64 = expected.detach().to(device=actual.device, dtype=torch.float64)
    if scaled:
        finite = expected64[torch.isfinite(expected64)]
        magnitude = finite.abs().max().item() if finite.numel() else 1.0
        tol["atol"] *= max(1.0, magnitude)
    full_msg = None if msg is None else (lambda default: f"{msg}\n{default}")
    torch.testing.assert_close(actual.detach().to(torch.float64), expected64, equal_nan=True,
                               check_device=False, msg=full_msg, **tol)


def memory_formats_of(t: torch.Tensor) -> dict:
    """Which layouts a tensor is dense in, to compare output layouts with torch."""
    formats = {"contiguous": t.is_contiguous()}
    if t.dim() == 4:
        formats["channels_last"] = t.is_contiguous(memory_format=torch.channels_last)
    if t.dim() == 5:
        formats["channels_last_3d"] = t.is_contiguous(memory_format=torch.channels_last_3d)
    return formats


def assert_layout_like_torch(out, out_torch, x, msg=None):
    """The output's memory layout is torch's. On CUDA, torch's own layout for
    an input that is neither contiguous nor channels-last depends on the
    kernel it picks (cuDNN: the suggested memory format; its native kernels:
    the input's strides); normext answers in the suggested memory format
    there, as torch does on the CPU."""
    standard = x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(
        memory_format=torch.channels_last)) or (x.dim() == 5 and x.is_contiguous(
            memory_format=torch.channels_last_3d))
    if out.device.type == "cuda" and not standard:
        suggested = torch._prims_common.suggest_memory_format(x)
        assert out.is_contiguous(memory_format=suggested), (msg, out.stride(), x.stride())
    else:
        assert memory_formats_of(out) == memory_formats_of(out_torch), (
            msg, out.stride(), out_torch.stride())


def layout_variants(x: torch.Tensor) -> dict:
    """`x` (4-D) as the layouts the kernels take apart: dense NCHW, dense
    channels-last, and a strided view that is dense in neither."""
    return {
        "contiguous": x,
        "channels_last": x.contiguous(memory_format=torch.channels_last),
        "sliced": torch.cat([x, x], dim=-1)[..., ::2],  # strided, not dense
    }


# ---------------------------------------------------------------------------
# threads


@pytest.fixture
def num_threads():
    """torch.set_num_threads for one test: the CPU kernels choose their splits
    (channel blocks of short rows, channels-last row chunks) by the thread
    count, so a test of one such path pins it. Call it with the count; the
    previous count comes back after the test."""
    saved = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(saved)


# ---------------------------------------------------------------------------
# markers and options


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: large shapes, skipped unless NORMEXT_SLOW_TESTS=1")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("NORMEXT_SLOW_TESTS") == "1":
        return
    skip_slow = pytest.mark.skip(reason="slow test: set NORMEXT_SLOW_TESTS=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

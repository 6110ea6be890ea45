"""Numerics of the torch.ops.normext ops: the shifted statistics against
ill-conditioned data (large means, outliers, values near the float16
maximum), accumulate dtypes, running-stat updates, the fused ops against
ATen's, and the short-row reductions (thread count pinned)."""

import math

import pytest
import torch

from normext import ops
from conftest import DEVICE_PARAMS, assert_close

# ---------------------------------------------------------------------------
# statistics


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("channels", [3, 40])  # 40: the CPU's 16-channel lanes and a tail
@pytest.mark.parametrize("case", ["padded_first_row", "outliers", "huge_constant", "nonfinite"])
def test_moments_shift_is_robust(case, channels, memory_format, device):
    """The per-channel shift is the median of a sample spread over the channel:
    a zero first row (padding), outliers, or a huge constant channel must not
    cost the float32 sums their accuracy or overflow them; a channel with an
    infinity or a NaN gets torch's inf / NaN and leaves the others alone."""
    x64 = 1e3 + torch.randn(16, channels, 8, 8, dtype=torch.float64, device=device)
    if case == "padded_first_row":
        x64[0, :, 0, :] = 0.0
    elif case == "outliers":
        x64[0, :, 0, :3] = 1e7
    elif case == "huge_constant":
        x64[:, 1] = 1e20
    else:
        x64[:, 1, 0, 0] = math.inf
        x64[:, 2, 0, 0] = math.nan
    x = x64.float().contiguous(memory_format=memory_format)
    x64 = x.double()
    mean, var = ops.batch_norm_moments(x)
    ref_mean, ref_var = x64.mean((0, 2, 3)), x64.var((0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-6, atol=0, equal_nan=True)
    torch.testing.assert_close(var.double(), ref_var, rtol=2e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(1, 5, -1, 1), (-1, 5, 1, 1), (-1, 40, 1, 1)],
                         ids=["runs", "rows", "rows_in_lanes"])
@pytest.mark.parametrize("count", [2, 3, 5, 7, 8, 9])
def test_moments_shift_of_small_channels(count, shape, memory_format, device):
    """Channels of fewer elements than the shift's sample of 8 (math.h:
    median_shift pads the sample): the shift is still one of the channel's
    values, so 1e4 + randn keeps its variance in float32, which a shift of 0
    would lose to the squares' rounding."""
    shape = tuple(count if d == -1 else d for d in shape)
    x64 = 1e4 + torch.randn(shape, dtype=torch.float64, device=device)
    x = x64.float().contiguous(memory_format=memory_format)
    x64 = x.double()
    mean, var = ops.batch_norm_moments(x)
    torch.testing.assert_close(mean.double(), x64.mean((0, 2, 3)), rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), x64.var((0, 2, 3), unbiased=False), rtol=1e-4,
                               atol=0)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])
def test_moments_float32_large_mean(memory_format, device):
    """1e4 + randn: the mean is 1e4 times the spread; naive sums of squares in
    float32 lose every digit of the variance."""
    x64 = 1e4 + torch.randn(16, 4, 32, 32, dtype=torch.float64, device=device)
    x = x64.float().contiguous(memory_format=memory_format)
    x64 = x.double()  # the exact values the kernel sees
    mean, var = ops.batch_norm_moments(x)
    assert mean.dtype == var.dtype == torch.float32
    ref_mean = x64.mean((0, 2, 3))
    ref_var = x64.var((0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=0)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-5, atol=0)
    # the forward's normalized output then has mean 0 and variance 1
    out, save_mean, save_invstd = ops.batch_norm_forward(x, None, None, None, None, True, 0.1,
                                                         1e-5)
    torch.testing.assert_close(save_mean.double(), ref_mean, rtol=1e-5, atol=0)
    torch.testing.assert_close(save_invstd.double(), torch.rsqrt(ref_var + 1e-5), rtol=1e-5,
                               atol=0)
    ref_out = (x64 - ref_mean.view(1, -1, 1, 1)) * torch.rsqrt(ref_var + 1e-5).view(1, -1, 1, 1)
    # The float32 mean itself is only good to |mean| * 2^-24 ~ 6e-4 here, which
    # bounds any float32 kernel's output error (torch's is 4e-4 on this data).
    torch.testing.assert_close(out.double(), ref_out, rtol=0, atol=1e4 * 2.0**-22)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_reduced_precision_near_max(dtype, memory_format, device):
    """float16 data near 6e4 (max 65504): squares overflow float16, so the
    statistics must be accumulated in float32; all results finite."""
    x = (6e4 - torch.rand(8, 4, 8, 8, device=device) * 100).to(dtype).contiguous(
        memory_format=memory_format)
    x64 = x.double()
    mean, var = ops.batch_norm_moments(x)
    assert mean.dtype == var.dtype == torch.float32
    assert torch.isfinite(mean).all() and torch.isfinite(var).all()
    torch.testing.assert_close(mean.double(), x64.mean((0, 2, 3)), rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), x64.var((0, 2, 3), unbiased=False), rtol=1e-4,
                               atol=1e-3)
    rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
    w, b = torch.rand(4, device=device) + 0.5, torch.randn(4, device=device)
    out, _, _ = ops.batch_norm_forward(x, w, b, rm, rv, True, 0.1, 1e-5)
    assert out.dtype == dtype
    assert torch.isfinite(out).all() and torch.isfinite(rm).all() and torch.isfinite(rv).all()
    ref_mean, ref_var = x64.mean((0, 2, 3)), x64.var((0, 2, 3), unbiased=False)
    ref_out = ((x64 - ref_mean.view(1, -1, 1, 1)) * torch.rsqrt(ref_var + 1e-5).view(1, -1, 1, 1)
               * w.double().view(1, -1, 1, 1) + b.double().view(1, -1, 1, 1))
    assert_close(out, ref_out, dtype)
    n = x.numel() // 4
    assert_close(rm, 0.1 * ref_mean, torch.float32)
    assert_close(rv, 0.9 + 0.1 * ref_var * n / (n - 1), torch.float32)
    # the backward of the same data is finite too
    dy = torch.randn_like(x)
    dx, dw, db = ops.batch_norm_backward(dy, x, w, mean, torch.rsqrt(var + 1e-5), True)
    assert torch.isfinite(dx).all() and torch.isfinite(dw).all() and torch.isfinite(db).all()


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=str)
def test_statistics_dtypes(dtype, device):
    x = torch.randn(4, 3, 5, device=device).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    mean, var = ops.batch_norm_moments(x)
    assert (mean.dtype, var.dtype, mean.shape) == (acc, acc, (3,))
    out, save_mean, save_invstd = ops.batch_norm_forward(x, None, None, None, None, True, 0.1,
                                                         1e-5)
    assert out.dtype == dtype and save_mean.dtype == save_invstd.dtype == acc
    dx, dw, db = ops.batch_norm_backward(torch.ones_like(x), x, None, save_mean, save_invstd,
                                         True)
    assert dx.dtype == dtype and dw.dtype == db.dtype == acc


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_finalize_updates_running_stats(device):
    opts = dict(dtype=torch.float64, device=device)
    mean, var = torch.randn(5, **opts), torch.rand(5, **opts) + 0.1
    rm, rv = torch.randn(5, **opts), torch.rand(5, **opts) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    invstd = ops.batch_norm_finalize(mean, var, 10, rm, rv, 0.25, 1e-3)
    assert_close(invstd, torch.rsqrt(var + 1e-3))
    assert_close(rm, 0.75 * rm0 + 0.25 * mean)
    assert_close(rv, 0.75 * rv0 + 0.25 * var * 10 / 9)
    # without running stats nothing else changes
    assert_close(ops.batch_norm_finalize(mean, var, 10, None, None, 0.25, 1e-3), invstd)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_forward_eval_and_backward_eval_match_aten(device):
    opts = dict(dtype=torch.float64, device=device)
    x = torch.randn(4, 3, 5, **opts)
    w, b = torch.rand(3, **opts) + 0.5, torch.randn(3, **opts)
    rm, rv = torch.randn(3, **opts), torch.rand(3, **opts) + 0.5
    out, save_mean, save_invstd = ops.batch_norm_forward(x, w, b, rm, rv, False, 0.1, 1e-5)
    expected = torch.batch_norm(x, w, b, rm, rv, False, 0.1, 1e-5, False)
    assert_close(out, expected)
    assert_close(save_mean, rm)
    assert_close(save_invstd, torch.rsqrt(rv + 1e-5))
    dy = torch.randn_like(x)
    dx, dw, db = ops.batch_norm_backward(dy, x, w, save_mean, save_invstd, False)
    ref = torch.ops.aten.native_batch_norm_backward(dy, x, w, rm, rv, None, None, False, 1e-5,
                                                     [True, True, True])
    for mine, theirs in zip((dx, dw, db), ref):
        assert_close(mine, theirs)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])
def test_forward_backward_train_match_aten(memory_format, device):
    opts = dict(dtype=torch.float64, device=device)
    x = torch.randn(4, 3, 5, 6, **opts).contiguous(memory_format=memory_format)
    w, b = torch.rand(3, **opts) + 0.5, torch.randn(3, **opts)
    rm, rv = torch.randn(3, **opts), torch.rand(3, **opts) + 0.5
    rm2, rv2 = rm.clone(), rv.clone()
    out, save_mean, save_invstd = ops.batch_norm_forward(x, w, b, rm, rv, True, 0.2, 1e-5)
    ref_out, ref_mean, ref_invstd = torch.ops.aten.native_batch_norm(x, w, b, rm2, rv2, True,
                                                                     0.2, 1e-5)
    for mine, theirs in ((out, ref_out), (save_mean, ref_mean), (save_invstd, ref_invstd),
                         (rm, rm2), (rv, rv2)):
        assert_close(mine, theirs)
    dy = torch.randn_like(x)
    grads = ops.batch_norm_backward(dy, x, w, save_mean, save_invstd, True)
    ref = torch.ops.aten.native_batch_norm_backward(dy, x, w, rm2, rv2, ref_mean, ref_invstd,
                                                     True, 1e-5, [True, True, True])
    for mine, theirs in zip(grads, ref):
        assert_close(mine, theirs)


# ---------------------------------------------------------------------------
# short rows (under 4 vectors): float32 lanes, channel blocks by thread count


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_short_rows_across_flushes(dtype, num_threads):
    """Rows under 512 bytes are reduced in float32 lanes flushed to double
    every 256 samples: 300 samples of a 3x3 map with a large mean cross a
    flush and must stay accurate (statistics and backward sums); 5 channels
    split into blocks of 2 on 2 threads (cpu::short_row_block), the last one
    partial."""
    num_threads(2)  # the channel blocks are sized by the thread count
    x = (1e4 + torch.randn(300, 5, 3, 3, dtype=torch.float64)).to(dtype)
    x64 = x.double()
    mean, var = ops.batch_norm_moments(x)
    torch.testing.assert_close(mean.double(), x64.mean((0, 2, 3)), rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), x64.var((0, 2, 3), unbiased=False), rtol=1e-4,
                               atol=0)
    dy = torch.randn(x.shape, dtype=torch.float64).to(dtype)
    invstd = torch.rsqrt(var + 1e-5)
    sum_dy, sum_dy_xmu, _, _ = ops.batch_norm_backward_reduce(dy, x, mean, invstd, None)
    dy64 = dy.double()
    torch.testing.assert_close(sum_dy.double(), dy64.sum((0, 2, 3)), rtol=1e-5, atol=1e-3)
    ref_xmu = (dy64 * (x64 - mean.double().view(1, -1, 1, 1))).sum((0, 2, 3))
    torch.testing.assert_close(sum_dy_xmu.double(), ref_xmu, rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("channels", [3, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_short_row_sums_do_not_depend_on_threads(channels, dtype, num_threads):
    """Rows under 4 vectors are reduced in blocks of adjacent channels sized by
    the thread count (cpu::short_row_block; 3 channels on 2 threads go one at a
    time): every block size must give bit-identical statistics and backward
    sums."""
    x = (3 + torch.randn(300, channels, 7, 7, dtype=torch.float64)).to(dtype)
    dy = torch.randn(x.shape, dtype=torch.float64).to(dtype)
    mean, var = ops.batch_norm_moments(x)
    invstd = torch.rsqrt(var + 1e-5)
    results = []
    for n in (1, 2):
        num_threads(n)
        sums = ops.batch_norm_backward_reduce(dy, x, mean, invstd, None)[:2]
        results.append((*ops.batch_norm_moments(x), *sums))
    for one_thread, two_threads in zip(*results):
        assert torch.equal(one_thread, two_threads)
    torch.testing.assert_close(mean.double(), x.double().mean((0, 2, 3)), rtol=1e-6, atol=0)

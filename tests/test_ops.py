"""The torch.ops.normext ops: opcheck (schema, fake kernels, aot dispatch),
numerics of the building blocks, their composition into the fused ops, and
build_info."""

import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import normext
from normext import ops
from conftest import DEVICE_PARAMS, assert_close

OPS = torch.ops.normext

# ---------------------------------------------------------------------------
# opcheck samples: (name, args) for every op


def _layouts(x):
    return {
        "contiguous": x,
        "channels_last": x.contiguous(memory_format=torch.channels_last),
        "sliced": torch.cat([x, x], dim=-1)[..., ::2],  # strided, not dense
    }


def _leaf(t):
    return t.detach().clone().requires_grad_()


def _opcheck_samples(device):
    samples = []
    for dtype in (torch.float32, torch.float64):
        acc = dtype
        opts = dict(device=device, dtype=dtype)
        base = torch.randn(3, 4, 3, 5, **opts)
        layouts = _layouts(base)
        if dtype == torch.float32:
            layouts["1D"] = torch.randn(6, 4, **opts)
            layouts["3D-channels_stride_1"] = torch.randn(2, 5, 4, **opts).transpose(1, 2)
        w, b = torch.rand(4, **opts) + 0.5, torch.randn(4, **opts)
        for name, x in layouts.items():
            mean, var = ops.batch_norm_moments(x)
            invstd = torch.rsqrt(var + 1e-5)
            dy = torch.randn_like(x)
            sum_dy, sum_dy_xmu, _, _ = ops.batch_norm_backward_reduce(dy, x, mean, invstd, w)
            count = float(x.numel() // x.shape[1])
            rm = torch.randn(4, device=device, dtype=acc)
            rv = torch.rand(4, device=device, dtype=acc) + 0.5
            tag = f"{str(dtype)[6:]}-{name}"
            samples += [
                (f"moments-{tag}", "batch_norm_moments", (x,)),
                (f"elemt-{tag}", "batch_norm_elemt", (x, w, b, mean, invstd)),
                (f"backward_reduce-{tag}", "batch_norm_backward_reduce",
                 (dy, x, mean, invstd, w)),
                (f"backward_elemt-{tag}", "batch_norm_backward_elemt",
                 (dy, x, mean, invstd, w, sum_dy, sum_dy_xmu, count)),
                (f"forward-train-{tag}", "batch_norm_forward",
                 (x, w, b, rm.clone(), rv.clone(), True, 0.1, 1e-5)),
                (f"backward-train-{tag}", "batch_norm_backward",
                 (dy, x, w, mean, invstd, True)),
                (f"batch_norm-train-{tag}", "batch_norm",
                 (_leaf(x), _leaf(w), _leaf(b), rm.clone(), rv.clone(), True, 0.1, 1e-5)),
            ]
            if name == "contiguous":
                samples += [
                    (f"elemt-noweight-{tag}", "batch_norm_elemt", (x, None, None, mean, invstd)),
                    (f"backward_reduce-noweight-{tag}", "batch_norm_backward_reduce",
                     (dy, x, mean, invstd, None)),
                    (f"backward_elemt-noweight-{tag}", "batch_norm_backward_elemt",
                     (dy, x, mean, invstd, None, sum_dy, sum_dy_xmu, count)),
                    (f"forward-eval-{tag}", "batch_norm_forward",
                     (x, w, b, rm.clone(), rv.clone(), False, 0.1, 1e-5)),
                    (f"forward-norunning-{tag}", "batch_norm_forward",
                     (x, None, None, None, None, True, 0.1, 1e-5)),
                    (f"backward-eval-noweight-{tag}", "batch_norm_backward",
                     (dy, x, None, rm.clone(), torch.rsqrt(rv + 1e-5), False)),
                    (f"backward-eval-frozen-{tag}", "batch_norm_backward",
                     (dy, x, w, rm.clone(), torch.rsqrt(rv + 1e-5), False, False)),
                    (f"backward-train-frozen-{tag}", "batch_norm_backward",
                     (dy, x, w, mean, invstd, True, False)),
                    (f"finalize-{tag}", "batch_norm_finalize",
                     (mean, var, count, rm.clone(), rv.clone(), 0.1, 1e-5)),
                    (f"finalize-norunning-{tag}", "batch_norm_finalize",
                     (mean, var, count, None, None, 0.1, 1e-5)),
                    (f"batch_norm-eval-{tag}", "batch_norm",
                     (_leaf(x), _leaf(w), _leaf(b), rm.clone(), rv.clone(), False, 0.1, 1e-5)),
                    (f"batch_norm-noaffine-norunning-{tag}", "batch_norm",
                     (_leaf(x), None, None, None, None, True, 0.1, 1e-5)),
                    (f"batch_norm-nograd-{tag}", "batch_norm",
                     (x, w, b, rm.clone(), rv.clone(), True, 0.1, 1e-5)),
                ]
    # half input with float32 parameters
    x = torch.randn(3, 4, 2, 3, device=device).half().contiguous(
        memory_format=torch.channels_last)
    mean, var = ops.batch_norm_moments(x)
    samples.append(("forward-train-float16-params_float32", "batch_norm_forward",
                    (x, torch.ones(4, device=device), torch.zeros(4, device=device),
                     torch.zeros(4, device=device), torch.ones(4, device=device), True, 0.1,
                     1e-5)))
    samples.append(("batch_norm-train-float16-params_float32", "batch_norm",
                    (_leaf(x), _leaf(torch.ones(4, device=device)),
                     _leaf(torch.zeros(4, device=device)), torch.zeros(4, device=device),
                     torch.ones(4, device=device), True, 0.1, 1e-5)))
    samples.append(("backward-train-bfloat16", "batch_norm_backward",
                    (torch.randn(3, 4, 2, 3, device=device).bfloat16(),
                     x.bfloat16(), torch.ones(4, device=device), mean,
                     torch.rsqrt(var + 1e-5), True)))
    return samples


_SAMPLE_IDS = [s[0] for s in _opcheck_samples("cpu")]


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("index", range(len(_SAMPLE_IDS)), ids=_SAMPLE_IDS)
def test_opcheck(index, device):
    torch.manual_seed(index)
    _, name, args = _opcheck_samples(device)[index]
    op = getattr(OPS, name).default
    # schema (incl. the declared in-place mutations), autograd registration,
    # fake kernels (shapes, dtypes, strides) and aot dispatch with dynamic shapes
    result = torch.library.opcheck(op, args)
    assert all(v == "SUCCESS" for v in result.values()), result


def test_every_op_is_covered_by_opcheck():
    names = {s[1] for s in _opcheck_samples("cpu")}
    assert names == {"batch_norm_moments", "batch_norm_finalize", "batch_norm_elemt",
                     "batch_norm_backward_reduce", "batch_norm_backward_elemt",
                     "batch_norm_forward", "batch_norm_backward", "batch_norm"}


# ---------------------------------------------------------------------------
# statistics


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("case", ["padded_first_row", "outliers", "huge_constant"])
def test_moments_shift_is_robust(case, memory_format, device):
    """The per-channel shift is the median of a sample spread over the channel:
    a zero first row (padding), outliers, or a huge constant channel must not
    cost the float32 sums their accuracy or overflow them."""
    x64 = 1e3 + torch.randn(16, 3, 8, 8, dtype=torch.float64, device=device)
    if case == "padded_first_row":
        x64[0, :, 0, :] = 0.0
    elif case == "outliers":
        x64[0, :, 0, :3] = 1e7
    else:
        x64[:, 1] = 1e20
    x = x64.float().contiguous(memory_format=memory_format)
    x64 = x.double()
    mean, var = ops.batch_norm_moments(x)
    ref_mean, ref_var = x64.mean((0, 2, 3)), x64.var((0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), ref_var, rtol=2e-5, atol=1e-6)


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
# building blocks compose to the fused ops


def _composition_inputs(dtype, layout, device):
    x = torch.randn(4, 3, 5, 6, device=device, dtype=torch.float64) * 3 + 1
    x = _layouts(x.to(dtype))[layout]
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    w = torch.rand(3, device=device, dtype=param_dtype) + 0.5
    b = torch.randn(3, device=device, dtype=param_dtype)
    return x, w, b, param_dtype


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_building_blocks_compose_to_forward(training, dtype, layout, device):
    x, w, b, param_dtype = _composition_inputs(dtype, layout, device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    rm = torch.randn(3, device=device, dtype=param_dtype)
    rv = torch.rand(3, device=device, dtype=param_dtype) + 0.5
    rm2, rv2 = rm.clone(), rv.clone()
    count = x.numel() // x.shape[1]
    if training:
        mean, var = ops.batch_norm_moments(x)
        invstd = ops.batch_norm_finalize(mean, var, count, rm, rv, 0.1, 1e-5)
    else:
        mean, var = rm.to(acc), rv.to(acc)
        invstd = ops.batch_norm_finalize(mean, var, count, None, None, 0.1, 1e-5)
    out = ops.batch_norm_elemt(x, w, b, mean, invstd)
    fused, fused_mean, fused_invstd = ops.batch_norm_forward(x, w, b, rm2, rv2, training, 0.1,
                                                             1e-5)
    assert out.dtype == fused.dtype == dtype
    assert out.stride() == fused.stride()
    assert_close(out, fused, dtype)
    assert_close(mean, fused_mean, acc)
    assert_close(invstd, fused_invstd, acc)
    assert_close(rm, rm2, param_dtype)
    assert_close(rv, rv2, param_dtype)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=str)
@pytest.mark.parametrize("with_weight", [True, False], ids=["weight", "no-weight"])
def test_building_blocks_compose_to_backward(with_weight, dtype, layout, device):
    x, w, _, param_dtype = _composition_inputs(dtype, layout, device)
    w = w if with_weight else None
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    dy = _layouts(torch.randn(x.shape, device=device, dtype=torch.float64).to(dtype))[layout]
    mean, var = ops.batch_norm_moments(x)
    invstd = torch.rsqrt(var + 1e-5)
    count = x.numel() // x.shape[1]
    sum_dy, sum_dy_xmu, grad_w, grad_b = ops.batch_norm_backward_reduce(dy, x, mean, invstd, w)
    grad_x = ops.batch_norm_backward_elemt(dy, x, mean, invstd, w, sum_dy, sum_dy_xmu, count)
    fused_x, fused_w, fused_b = ops.batch_norm_backward(dy, x, w, mean, invstd, True)
    assert grad_x.dtype == fused_x.dtype == dtype
    assert grad_x.stride() == fused_x.stride()
    grad_dtype = param_dtype if with_weight else acc
    assert grad_w.dtype == fused_w.dtype == grad_b.dtype == fused_b.dtype == grad_dtype
    assert_close(grad_x, fused_x, dtype)
    assert_close(grad_w, fused_w, grad_dtype)
    assert_close(grad_b, fused_b, grad_dtype)
    # and the sums are what they claim to be
    x64, dy64 = x.double(), dy.double()
    ref_sum_dy = dy64.sum((0, 2, 3))
    ref_sum_dy_xmu = (dy64 * (x64 - mean.double().view(1, -1, 1, 1))).sum((0, 2, 3))
    assert_close(sum_dy, ref_sum_dy, acc)
    assert_close(sum_dy_xmu, ref_sum_dy_xmu, acc)
    assert_close(fused_b, ref_sum_dy, grad_dtype)
    assert_close(fused_w, ref_sum_dy_xmu * invstd.double(), grad_dtype)


def _strided(t):
    """`t` as a view with stride 2: per-channel tensors need not be dense."""
    return torch.stack([t, torch.full_like(t, float("nan"))], dim=1)[:, 0]


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_strided_per_channel_tensors(dtype, device):
    """Statistics, parameters and running stats given as strided views give
    the results of dense copies (the running stats updated in place)."""
    x = torch.randn(4, 3, 5, device=device).to(dtype)
    dy = torch.randn_like(x)
    opts = dict(device=device, dtype=dtype)
    w, b = torch.rand(3, **opts) + 0.5, torch.randn(3, **opts)
    mean, var = ops.batch_norm_moments(x)
    invstd = torch.rsqrt(var + 1e-5)
    sw, sb, smean, sinvstd = _strided(w), _strided(b), _strided(mean), _strided(invstd)
    assert not sw.is_contiguous() and not smean.is_contiguous()
    assert torch.equal(ops.batch_norm_elemt(x, sw, sb, smean, sinvstd),
                       ops.batch_norm_elemt(x, w, b, mean, invstd))
    dense_sums = ops.batch_norm_backward_reduce(dy, x, mean, invstd, w)
    for mine, theirs in zip(ops.batch_norm_backward_reduce(dy, x, smean, sinvstd, sw),
                            dense_sums):
        assert torch.equal(mine, theirs)
    sum_dy, sum_dy_xmu = dense_sums[:2]
    assert torch.equal(
        ops.batch_norm_backward_elemt(dy, x, smean, sinvstd, sw, _strided(sum_dy),
                                      _strided(sum_dy_xmu), 20),
        ops.batch_norm_backward_elemt(dy, x, mean, invstd, w, sum_dy, sum_dy_xmu, 20))
    for training in (True, False):
        rm, rv = torch.randn(3, **opts), torch.rand(3, **opts)
        srm, srv = _strided(rm), _strided(rv)
        dense = ops.batch_norm_forward(x, w, b, rm, rv, training, 0.1, 1e-5)
        for mine, theirs in zip(ops.batch_norm_forward(x, sw, sb, srm, srv, training, 0.1, 1e-5),
                                dense):
            assert torch.equal(mine, theirs)
        assert torch.equal(srm, rm) and torch.equal(srv, rv)
    rm, rv = torch.randn(3, device=device), torch.rand(3, device=device)
    srm, srv = _strided(rm), _strided(rv)
    assert torch.equal(ops.batch_norm_finalize(smean, _strided(var), 20, srm, srv, 0.1, 1e-5),
                       ops.batch_norm_finalize(mean, var, 20, rm, rv, 0.1, 1e-5))
    assert torch.equal(srm, rm) and torch.equal(srv, rv)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_finalize_rejects_running_stats_of_two_dtypes(device):
    mean, var = torch.zeros(3, device=device), torch.ones(3, device=device)
    with pytest.raises(RuntimeError, match="running_mean and running_var of one dtype"):
        ops.batch_norm_finalize(mean, var, 4, torch.zeros(3, device=device),
                                torch.ones(3, device=device, dtype=torch.float16), 0.1, 1e-5)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("count", [0.0, -3.0, float("nan"), float("inf")])
def test_ops_reject_element_counts_that_are_not_positive(count, device):
    """The count per channel of finalize and backward_elemt: a bad one raises
    instead of writing NaN or garbage into running stats or gradients."""
    x = torch.randn(4, 3, 5, device=device)
    mean, var = ops.batch_norm_moments(x)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    with pytest.raises(ValueError, match="positive element count"):
        ops.batch_norm_finalize(mean, var, count, rm, rv, 0.1, 1e-5)
    assert torch.equal(rm, torch.zeros(3, device=device))
    assert torch.equal(rv, torch.ones(3, device=device))
    with pytest.raises(ValueError, match="positive element count"):
        ops.batch_norm_backward_elemt(x, x, mean, var, None, mean, var, count)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_finalize_rejects_running_stats_that_require_grad(device):
    mean, var = torch.zeros(3, device=device), torch.ones(3, device=device)
    rm = torch.zeros(3, device=device, requires_grad=True)
    rv = torch.ones(3, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match="cannot have requires_grad True"):
        ops.batch_norm_finalize(mean, var, 4, rm, rv, 0.1, 1e-5)
    with torch.no_grad():  # like torch: an in-place update outside autograd is fine
        ops.batch_norm_finalize(mean, var, 4, rm, rv, 0.1, 1e-5)
    assert_close(rv, torch.full((3,), 0.9 + 0.1 * 4 / 3, device=device))


def test_statistics_of_another_shape_are_named():
    x = torch.randn(4, 3, 5)
    with pytest.raises(RuntimeError, match=r"expected mean of shape \[3\] but got \[1, 3\]"):
        ops.batch_norm_elemt(x, None, None, torch.zeros(1, 3), torch.ones(3))


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_cpp_error_messages_carry_their_numbers(device):
    """The kernels' C++ error messages reach Python whole. (Linked with a
    static libstdc++, the extension's iostreams are not initialized: the
    numbers went missing with gcc 12, and formatting crashed with gcc 13.)"""
    with pytest.raises(RuntimeError, match="at least 2 dims, got 1 dims"):
        torch.ops.normext.batch_norm_moments(torch.ones(3, device=device))
    x = torch.ones(2, 3, 4, device=device)
    with pytest.raises(RuntimeError, match="weight should contain 3 elements not 7"):
        torch.ops.normext.batch_norm_elemt(x, torch.ones(7, device=device), None,
                                           torch.zeros(3, device=device),
                                           torch.ones(3, device=device))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF symbols")
def test_extension_carries_no_libstdcxx_code():
    """The extension uses the shared libstdc++ (setup.py names it): a static
    copy inside it, even a partial one, is what broke the messages above."""
    if shutil.which("nm") is None:
        pytest.skip("needs nm (binutils)")
    import normext._C
    symbols = subprocess.run(["nm", "-D", "--defined-only", normext._C.__file__],
                             capture_output=True, text=True, check=True).stdout
    assert not re.search(r"\b(__cxa_throw|_ZNSt8ios_base4Init\w*)\b", symbols)


@pytest.mark.parametrize("case", [
    ("1-D input", lambda: ops.batch_norm_forward(torch.empty(3, device="meta"), None, None,
                                                 None, None, True, 0.1, 1e-5),
     "at least 2 dims"),
    ("weight of 7 for C=3", lambda: ops.batch_norm_forward(
        torch.empty(2, 3, 4, device="meta"), torch.empty(7, device="meta"), None, None, None,
        True, 0.1, 1e-5), "weight should contain 3 elements not 7"),
    ("running stats of 9", lambda: torch.ops.normext.batch_norm(
        torch.empty(2, 3, device="meta"), None, None, torch.empty(9, device="meta"),
        torch.empty(9, device="meta"), True, 0.1, 1e-5),
     "running_mean should contain 3 elements not 9"),
    ("mean of 4", lambda: ops.batch_norm_elemt(
        torch.empty(2, 3, device="meta"), None, None, torch.empty(4, device="meta"),
        torch.empty(3, device="meta")), "mean should contain 3 elements not 4"),
    ("grad_output of another shape", lambda: ops.batch_norm_backward(
        torch.empty(2, 3, 5, device="meta"), torch.empty(2, 3, 4, device="meta"), None,
        torch.empty(3, device="meta"), torch.empty(3, device="meta"), True),
     "grad_output of shape"),
    ("finalize var of 4", lambda: ops.batch_norm_finalize(
        torch.empty(3, device="meta"), torch.empty(4, device="meta"), 4, None, None, 0.1, 1e-5),
     "expected var of shape"),
    ("2-D running stats", lambda: ops.batch_norm_forward(
        torch.empty(2, 3, device="meta"), None, None, torch.empty(3, 1, device="meta"),
        torch.empty(3, 1, device="meta"), True, 0.1, 1e-5),
     r"expected running_mean of shape \[3\] but got \[3, 1\]"),
    ("count 0", lambda: ops.batch_norm_finalize(
        torch.empty(3, device="meta"), torch.empty(3, device="meta"), 0, None, None, 0.1, 1e-5),
     "positive element count"),
], ids=lambda case: case[0] if isinstance(case, tuple) else None)
def test_fake_kernels_reject_what_the_kernels_reject(case):
    """Meta tensors (and FakeTensorMode under torch.compile) reach the fake
    kernels, which raise where the kernels would (the same exception types)."""
    _, call, message = case
    with pytest.raises((RuntimeError, ValueError), match=message):
        call()


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_empty_input_ops(device):
    x = torch.randn(0, 3, 4, device=device)
    mean, var = ops.batch_norm_moments(x)
    assert mean.shape == var.shape == (3,)
    rm, rv = torch.randn(3, device=device), torch.rand(3, device=device)
    rm0, rv0 = rm.clone(), rv.clone()
    out, _, _ = ops.batch_norm_forward(x, None, None, rm, rv, True, 0.1, 1e-5)
    assert out.shape == x.shape
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    dx, dw, db = ops.batch_norm_backward(x, x, None, mean, torch.ones(3, device=device), True)
    assert dx.shape == x.shape
    assert torch.equal(dw, torch.zeros(3, device=device))
    assert torch.equal(db, torch.zeros(3, device=device))


def test_wrappers_are_the_ops():
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    for a, b in zip(ops.batch_norm_moments(x), OPS.batch_norm_moments(x)):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------
# build info


def test_build_info():
    info = normext.build_info()
    assert set(info) == {"backends", "cuda_arches", "openmp", "torch_version"}
    assert isinstance(info["backends"], list)
    assert "cpu" in info["backends"]
    assert set(info["backends"]) <= {"cpu", "cuda"}
    assert isinstance(info["cuda_arches"], str)
    assert isinstance(info["openmp"], bool)
    assert info["torch_version"] == torch.__version__.split("+")[0]
    if "cuda" in info["backends"]:
        assert info["cuda_arches"]
        assert torch.version.cuda is not None
    else:
        assert info["cuda_arches"] == ""
    assert normext.build_info() is not info  # a fresh dict each call
    assert normext.__version__


def test_public_api():
    for name in normext.__all__:
        assert hasattr(normext, name), name
    for name in ("batch_norm_moments", "batch_norm_finalize", "batch_norm_elemt",
                 "batch_norm_backward_reduce", "batch_norm_backward_elemt",
                 "batch_norm_forward", "batch_norm_backward"):
        assert hasattr(OPS, name), name
        assert callable(getattr(ops, name)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_short_rows_across_flushes(dtype):
    """Rows under 512 bytes are reduced in float32 lanes flushed to double
    every 256 samples: 300 samples of a 3x3 map with a large mean cross a
    flush and must stay accurate (statistics and backward sums); 5 channels
    split into blocks of 2 on 2 threads (cpu::short_row_block), the last one
    partial."""
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


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cpu_float16_conversions_are_exact(layout):
    """The CPU elementwise passes convert float16 with F16C vectors (partial
    vectors for tails) where the build has F16C, else with cpu::Float16's bit
    arithmetic (CI's portable build), not with c10::Half's scalar conversion: every
    float16 value must widen exactly, and narrowing must round to nearest
    even like torch, subnormals, overflow to infinity and NaN included. With mean 0, invstd 1
    and bias -0.0, normalize computes x * weight exactly in float32."""
    every_value = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16)
    # 4 x 16387 elements: runs and pieces end in tails shorter than a vector.
    x = torch.cat([every_value, every_value[:12]]).reshape(1, 4, 1, 16387)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    finite_or_inf = ~torch.isnan(x)
    mean, invstd, bias = torch.zeros(4), torch.ones(4), torch.full((4,), -0.0)
    for exponent in [-24, -14, -1, 0, 1, 15]:
        weight = torch.tensor([2.0 ** exponent, 1.2345, -3.0, 2.0 ** -exponent])
        y = ops.batch_norm_elemt(x, weight, bias, mean, invstd)
        expected = (x.float() * weight.view(1, 4, 1, 1)).half()
        assert torch.equal(y.view(torch.int16)[finite_or_inf],
                           expected.view(torch.int16)[finite_or_inf]), exponent
        assert torch.isnan(y[~finite_or_inf]).all()


def test_cpu_float16_widening_is_exact():
    """The statistics read float16 through cpu::Float16's bit arithmetic: a
    channel whose samples are all one finite float16 value has exactly that
    mean and variance 0, for every finite float16 value."""
    every_value = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16)
    finite = every_value[torch.isfinite(every_value)]
    x = finite.repeat(3, 1)  # (N=3, C=63488), each channel one value
    mean, var = ops.batch_norm_moments(x)
    assert torch.equal(mean, finite.float())
    assert torch.equal(var, torch.zeros_like(var))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cpu_float16_ops_match_float32(layout):
    """Every CPU op on float16 against torch's float32 arithmetic on the same
    values, with 35 channels (two full vectors and a partial one of 16 lanes)
    and a non-zero mean, weight and bias."""
    torch.manual_seed(0)
    x = (3 + torch.randn(6, 35, 7, 9)).half()
    dy = torch.randn(x.shape).half()
    if layout == "channels_last":
        x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    w, b = torch.rand(35) + 0.5, torch.randn(35)
    mean, var = ops.batch_norm_moments(x)
    xf = x.float()
    torch.testing.assert_close(mean, xf.mean((0, 2, 3)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var, xf.var((0, 2, 3), unbiased=False), rtol=1e-5, atol=1e-6)
    invstd = torch.rsqrt(var + 1e-5)
    per_channel = lambda t: t.view(1, -1, 1, 1)  # noqa: E731
    y = ops.batch_norm_elemt(x, w, b, mean, invstd)
    y_ref = (xf - per_channel(mean)) * per_channel(invstd * w) + per_channel(b)
    torch.testing.assert_close(y.float(), y_ref, rtol=1e-3, atol=2e-3)  # float16 rounding
    sum_dy, sum_dy_xmu, _, _ = ops.batch_norm_backward_reduce(dy, x, mean, invstd, w)
    dyf = dy.float()
    torch.testing.assert_close(sum_dy, dyf.sum((0, 2, 3)), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sum_dy_xmu, (dyf * (xf - per_channel(mean))).sum((0, 2, 3)),
                               rtol=1e-5, atol=1e-4)
    count = x.numel() / 35
    dx = ops.batch_norm_backward_elemt(dy, x, mean, invstd, w, sum_dy, sum_dy_xmu, count)
    dx_ref = (dyf - per_channel(sum_dy / count)
              - (xf - per_channel(mean)) * per_channel(sum_dy_xmu / count * invstd ** 2)) \
        * per_channel(invstd * w)
    torch.testing.assert_close(dx.float(), dx_ref, rtol=1e-3, atol=2e-3)
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert y.is_contiguous(memory_format=memory_format)
    assert dx.is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("channels", [3, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_short_row_sums_do_not_depend_on_threads(channels, dtype):
    """Rows under 4 vectors are reduced in blocks of adjacent channels sized by
    the thread count (cpu::short_row_block; 3 channels on 2 threads go one at a
    time): every block size must give bit-identical statistics and backward
    sums."""
    x = (3 + torch.randn(300, channels, 7, 7, dtype=torch.float64)).to(dtype)
    dy = torch.randn(x.shape, dtype=torch.float64).to(dtype)
    mean, var = ops.batch_norm_moments(x)
    invstd = torch.rsqrt(var + 1e-5)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            sums = ops.batch_norm_backward_reduce(dy, x, mean, invstd, None)[:2]
            results.append((*ops.batch_norm_moments(x), *sums))
    finally:
        torch.set_num_threads(threads)
    for one_thread, two_threads in zip(*results):
        assert torch.equal(one_thread, two_threads)
    torch.testing.assert_close(mean.double(), x.double().mean((0, 2, 3)), rtol=1e-6, atol=0)


def _operator_calls(fn):
    from torch.profiler import ProfilerActivity, profile
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sorted(e.name for e in prof.events() if e.name.startswith(("aten::", "normext::")))


@pytest.mark.filterwarnings("ignore:.*Profiler clears events")  # torch 2.11's profiler
@pytest.mark.parametrize("dtype,param_dtype", [
    (torch.float64, torch.float64), (torch.float32, torch.float32),
    (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float32), (torch.bfloat16, torch.float32)],
    ids=lambda t: str(t)[6:])
def test_fused_ops_make_no_other_operator_calls(dtype, param_dtype):
    """Per-call host work of the fused ops (it bounds small layers, on a GPU
    most): besides allocating their per-channel results, no ATen op runs, so
    no conversion of 16-bit parameters, no copy of the running stats and no
    separate finalize or parameter-gradient step."""
    x = torch.randn(2, 3, 4, 4).to(dtype)
    w, b, rm, rv = (torch.ones(3, dtype=param_dtype), torch.zeros(3, dtype=param_dtype),
                    torch.zeros(3, dtype=param_dtype), torch.ones(3, dtype=param_dtype))
    stats = ["aten::empty"] * 2  # mean, invstd (CPU outputs come from normext's cache)
    for training in (True, False):
        calls = _operator_calls(
            lambda: ops.batch_norm_forward(x, w, b, rm, rv, training, 0.1, 1e-5))
        assert calls == stats + ["normext::batch_norm_forward"]
    _, mean, invstd = ops.batch_norm_forward(x, w, b, rm, rv, True, 0.1, 1e-5)
    dy = torch.randn_like(x)
    for training in (True, False):
        calls = _operator_calls(
            lambda: ops.batch_norm_backward(dy, x, w, mean, invstd, training))
        # sum_dy, sum_dy_xmu, grad_weight, grad_bias
        assert calls == ["aten::empty"] * 4 + ["normext::batch_norm_backward"]
    # frozen parameters in eval: no sums at all
    calls = _operator_calls(lambda: ops.batch_norm_backward(dy, x, w, mean, invstd, False, False))
    assert calls == ["normext::batch_norm_backward"]


@pytest.mark.filterwarnings("ignore:.*Profiler clears events")  # torch 2.11's profiler
@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("shape,layout,grad_strides", [
    ((2, 3, 1, 1), torch.contiguous_format, (3, 1, 3, 3)),       # a pooled map, permuted grad
    ((1, 3, 4, 4), torch.channels_last, (999, 1, 12, 3)),        # batch of one
    ((1, 3, 4, 4), torch.contiguous_format, (0, 16, 4, 1)),
    ((2, 1, 2, 3, 2), torch.channels_last_3d, (12, 7, 6, 2, 1)),  # one channel
], ids=["pooled", "channels_last-batch1", "batch1", "channels_last_3d-C1"])
def test_backward_takes_grad_dense_but_for_size_one_dims(shape, layout, grad_strides, device):
    """A grad_output whose strides differ from the input's only on size-1
    dims is the same memory map for the kernels: it is read as it is, not
    copied, and the gradients are torch's."""
    x = torch.randn(shape, dtype=torch.float64, device=device).contiguous(memory_format=layout)
    w = torch.rand(shape[1], dtype=torch.float64, device=device) + 0.5
    dy = torch.empty_strided(shape, grad_strides, dtype=torch.float64, device=device)
    dy.copy_(torch.randn(shape, dtype=torch.float64))
    _, mean, invstd = ops.batch_norm_forward(x, w, None, None, None, True, 0.1, 1e-5)
    for training in (True, False):
        calls = _operator_calls(lambda: ops.batch_norm_backward(dy, x, w, mean, invstd, training))
        assert "aten::copy_" not in calls, calls
        grads = ops.batch_norm_backward(dy, x, w, mean, invstd, training)
        # torch's gradients; in eval, with the batch's statistics as running stats
        x_ref, w_ref, b_ref = (t.detach().clone().requires_grad_()
                               for t in (x, w, torch.zeros_like(w)))
        running = (None, None) if training else (mean, invstd.pow(-2) - 1e-5)
        F.batch_norm(x_ref, *running, w_ref, b_ref, training, 0.1, 1e-5).backward(dy)
        for name, mine, reference in zip(("input", "weight", "bias"), grads, (x_ref, w_ref, b_ref)):
            assert_close(mine, reference.grad, msg=f"{name} grad")

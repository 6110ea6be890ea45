"""Contracts of the torch.ops.normext ops: the building blocks compose to
the fused ops (every dtype and layout), strided per-channel tensors, the
typed wrappers of normext.ops, and the errors the ops raise."""

import inspect

import pytest
import torch

from normext import ops
from conftest import DEVICE_PARAMS, assert_close, layout_variants

OPS = torch.ops.normext

# ---------------------------------------------------------------------------
# building blocks compose to the fused ops


def _composition_inputs(dtype, layout, device):
    x = torch.randn(4, 3, 5, 6, device=device, dtype=torch.float64) * 3 + 1
    x = layout_variants(x.to(dtype))[layout]
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
    dy = layout_variants(torch.randn(x.shape, device=device, dtype=torch.float64).to(dtype))[layout]
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


# ---------------------------------------------------------------------------
# the typed wrappers of normext.ops


def _schema(name):
    return getattr(OPS, name).default._schema


WRAPPED_OPS = ["batch_norm_moments", "batch_norm_finalize", "batch_norm_elemt",
               "batch_norm_backward_reduce", "batch_norm_backward_elemt", "batch_norm_forward",
               "batch_norm_backward", "batch_norm", "batch_norm_act_forward",
               "batch_norm_act_backward", "batch_norm_act", "batch_norm_act_elemt",
               "batch_norm_act_backward_reduce", "batch_norm_act_backward_elemt",
               "batch_norm_weights_invertible", "layer_norm_forward", "layer_norm_backward",
               "group_norm_forward", "group_norm_backward", "add_layer_norm_forward"]


@pytest.mark.parametrize("name", WRAPPED_OPS)
def test_wrappers_take_the_schemas_arguments(name):
    """Each wrapper in normext.ops names the op's arguments in the schema's
    order, with the schema's defaults: a reordered or missing argument would
    pass positional values to the wrong parameter."""
    schema = _schema(name)
    params = inspect.signature(getattr(ops, name)).parameters
    assert list(params) == [arg.name for arg in schema.arguments]
    for arg in schema.arguments:
        default = params[arg.name].default
        if arg.has_default_value():
            assert default == arg.default_value, arg.name
        else:
            assert default is inspect.Parameter.empty, arg.name


def test_wrappers_cover_every_op():
    registered = {name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("normext::")}
    assert set(WRAPPED_OPS) == registered


def test_wrappers_pass_counts_as_floats():
    """An integer count (what `x.numel() // C` gives) reaches the float
    argument of finalize and backward_elemt."""
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    mean, var = ops.batch_norm_moments(x)
    count = x.numel() // x.shape[1]
    assert isinstance(count, int)
    assert torch.equal(ops.batch_norm_finalize(mean, var, count, None, None, 0.1, 1e-5),
                       torch.rsqrt(var + 1e-5))
    dy = torch.randn_like(x)
    invstd = torch.rsqrt(var + 1e-5)
    sum_dy, sum_dy_xmu, _, _ = ops.batch_norm_backward_reduce(dy, x, mean, invstd, None)
    assert torch.equal(
        ops.batch_norm_backward_elemt(dy, x, mean, invstd, None, sum_dy, sum_dy_xmu, count),
        OPS.batch_norm_backward_elemt(dy, x, mean, invstd, None, sum_dy, sum_dy_xmu,
                                      float(count)))

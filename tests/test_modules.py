"""normext.BatchNorm1d/2d/3d against torch.nn.BatchNorm1d/2d/3d: numerics over
several train/eval steps, layouts, dtypes and flags; state dicts and reprs;
errors."""

import copy
import decimal
import fractions
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import normext
from conftest import (DEVICE_PARAMS, assert_close, assert_layout_like_torch, flag_params,
                      memory_formats_of)

TORCH_CLASSES = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}
NORMEXT_CLASSES = {1: normext.BatchNorm1d, 2: normext.BatchNorm2d, 3: normext.BatchNorm3d}


def kind_of(shape):
    """1, 2 or 3 for the BatchNorm{1,2,3}d that takes an input of this shape."""
    return {2: 1, 3: 1, 4: 2, 5: 3}[len(shape)]


# ---------------------------------------------------------------------------
# layouts: a leaf tensor of `leaf_shape` and a function from it to the input

def _swap_last(shape):
    return shape[:-2] + (shape[-1], shape[-2])


def _double_last(shape):
    return shape[:-1] + (2 * shape[-1],)


LAYOUTS = {
    # name: (leaf shape from input shape, leaf -> input of the given shape)
    "contiguous": (lambda s: s, lambda t: t),
    "channels_last": (lambda s: s, lambda t: t.contiguous(memory_format=torch.channels_last)),
    "channels_last_3d": (lambda s: s,
                         lambda t: t.contiguous(memory_format=torch.channels_last_3d)),
    # every other element of the last dim: strided, not dense
    "sliced": (_double_last, lambda t: t[..., ::2]),
    # the last two dims transposed: dense, but neither contiguous nor channels-last
    "permuted": (_swap_last, lambda t: t.transpose(-1, -2)),
}

SHAPE_LAYOUTS = [
    ((8, 3), "contiguous"),
    ((8, 3), "sliced"),
    ((8, 3), "permuted"),  # (C, N).t(): channel stride 1
    ((4, 3, 5), "contiguous"),
    ((4, 3, 5), "sliced"),
    ((4, 3, 5, 6), "contiguous"),
    ((4, 3, 5, 6), "channels_last"),
    # wide rows: the CPU kernels take them in groups of 4 (cpu/kernels.h: group_rows)
    ((3, 1030, 3, 3), "channels_last"),
    ((4, 3, 5, 6), "sliced"),
    ((4, 3, 5, 6), "permuted"),
    ((2, 3, 3, 4, 5), "contiguous"),
    ((2, 3, 3, 4, 5), "channels_last_3d"),
    ((2, 3, 3, 4, 5), "sliced"),
]

# (input dtype, module dtype): half/bfloat16 also with float32 parameters
# (the mixed precision torch accepts).
DTYPE_CASES = [
    (torch.float64, torch.float64),
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
]


def _dtype_id(case):
    input_dtype, module_dtype = case
    name = str(input_dtype).replace("torch.", "")
    return name if input_dtype == module_dtype else f"{name}-params_float32"


def make_leaf(shape, layout, dtype, device, scale=1.0, shift=0.0):
    leaf_shape, _ = LAYOUTS[layout]
    data = torch.randn(leaf_shape(tuple(shape)), dtype=torch.float64) * scale + shift
    return data.to(device=device, dtype=dtype).requires_grad_()


def to_input(leaf, layout):
    return LAYOUTS[layout][1](leaf)


def make_pair(shape, device, input_dtype, module_dtype, **flags):
    """(normext module, torch module in module_dtype, reference torch module),
    all starting from the same random state. The reference is float64 for
    half/bfloat16 inputs (compared with the dtype's tolerances), otherwise the
    torch module itself."""
    kind = kind_of(shape)
    C = shape[1]
    torch_module = TORCH_CLASSES[kind](C, device=device, dtype=module_dtype, **flags)
    with torch.no_grad():  # non-trivial parameters and running stats
        if torch_module.weight is not None:
            torch_module.weight.uniform_(0.5, 1.5)
        if torch_module.bias is not None:
            torch_module.bias.uniform_(-0.5, 0.5)
        if torch_module.running_mean is not None:
            torch_module.running_mean.uniform_(-0.5, 0.5)
            torch_module.running_var.uniform_(0.5, 1.5)
    ours = NORMEXT_CLASSES[kind](C, device=device, dtype=module_dtype, **flags)
    ours.load_state_dict(torch_module.state_dict(), strict=True)
    if input_dtype in (torch.float16, torch.bfloat16):
        reference = copy.deepcopy(torch_module).double()
    else:
        reference = torch_module
    return ours, torch_module, reference


def compare_state(ours, reference, module_dtype, msg=""):
    for name in ("running_mean", "running_var"):
        mine, theirs = getattr(ours, name), getattr(reference, name)
        assert (mine is None) == (theirs is None), name
        if mine is not None:
            assert mine.dtype == module_dtype
            assert_close(mine, theirs, module_dtype, msg=f"{msg}: {name}")
    if reference.num_batches_tracked is None:
        assert ours.num_batches_tracked is None
    else:
        assert torch.equal(ours.num_batches_tracked.cpu(), reference.num_batches_tracked.cpu())
        assert ours.num_batches_tracked.dtype == torch.long


def run_steps(ours, torch_module, reference, shape, layout, input_dtype, module_dtype, device,
              modes=("train", "train", "train", "eval", "train")):
    """Runs both modules through `modes`, comparing outputs, input, weight and
    bias grads, output layout and dtype, running stats and num_batches_tracked
    after every step."""
    same_dtype_torch = torch_module if reference is not torch_module else None
    if same_dtype_torch is not None:
        same_dtype_torch = copy.deepcopy(torch_module)  # only for the output layout
    for step, mode in enumerate(modes):
        msg = f"step {step} ({mode})"
        for m in (ours, reference) + ((same_dtype_torch,) if same_dtype_torch else ()):
            m.train(mode == "train")
            for p in m.parameters():
                p.grad = None
        leaf = make_leaf(shape, layout, input_dtype, device)
        leaf_ref = leaf.detach().to(torch.float64 if reference is not torch_module
                                    else input_dtype).requires_grad_()
        x, x_ref = to_input(leaf, layout), to_input(leaf_ref, layout)

        out = ours(x)
        out_ref = reference(x_ref)
        if same_dtype_torch is not None:
            with torch.no_grad():
                out_torch = same_dtype_torch(x)
        else:
            out_torch = out_ref
        assert out.dtype == out_torch.dtype == input_dtype
        assert out.shape == out_torch.shape
        assert_layout_like_torch(out, out_torch, x, msg)
        assert_close(out, out_ref, input_dtype, msg=f"{msg}: output")

        grad_out = torch.randn_like(out)
        out.backward(grad_out)
        out_ref.backward(grad_out.to(out_ref.dtype))
        assert_close(leaf.grad, leaf_ref.grad, input_dtype, msg=f"{msg}: input grad")
        for name in ("weight", "bias"):
            mine, theirs = getattr(ours, name), getattr(reference, name)
            assert (mine is None) == (theirs is None), name
            if mine is not None:
                assert mine.grad.dtype == module_dtype
                assert_close(mine.grad, theirs.grad, module_dtype, msg=f"{msg}: {name} grad")
        compare_state(ours, reference, module_dtype, msg)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("dtypes", DTYPE_CASES, ids=_dtype_id)
@pytest.mark.parametrize("shape,layout", SHAPE_LAYOUTS,
                         ids=[f"{len(s)}D-{layout}" for s, layout in SHAPE_LAYOUTS])
def test_matches_torch_over_steps(shape, layout, dtypes, device):
    input_dtype, module_dtype = dtypes
    ours, torch_module, reference = make_pair(shape, device, input_dtype, module_dtype)
    run_steps(ours, torch_module, reference, shape, layout, input_dtype, module_dtype, device)


FLAGS = [
    dict(),
    dict(affine=False),
    dict(bias=False),
    dict(affine=False, bias=False),
    dict(track_running_stats=False),
    dict(affine=False, track_running_stats=False),
    dict(bias=False, track_running_stats=False),
    dict(momentum=None),
    dict(momentum=None, affine=False),
    dict(momentum=0.3, eps=1e-3),
]

FLAG_SHAPES = [((6, 3), "contiguous"), ((4, 3, 5), "contiguous"), ((3, 3, 4, 5), "contiguous"),
               ((3, 3, 4, 5), "channels_last"), ((2, 3, 2, 3, 4), "channels_last_3d")]


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape,layout", FLAG_SHAPES,
                         ids=[f"{len(s)}D-{layout}" for s, layout in FLAG_SHAPES])
@pytest.mark.parametrize("flags", flag_params(FLAGS))
def test_flags_match_torch(flags, shape, layout, dtype, device):
    ours, torch_module, reference = make_pair(shape, device, dtype, dtype, **flags)
    run_steps(ours, torch_module, reference, shape, layout, dtype, dtype, device,
              modes=("train", "train", "eval", "train", "eval"))


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_eval_uses_running_stats(device):
    m = normext.BatchNorm2d(3, device=device, dtype=torch.float64).eval()
    with torch.no_grad():
        m.running_mean.copy_(torch.tensor([1.0, -2.0, 0.5]))
        m.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
        m.weight.copy_(torch.tensor([2.0, 1.0, -1.0]))
        m.bias.copy_(torch.tensor([0.0, 1.0, 3.0]))
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, device=device) * 5 + 7
    before = copy.deepcopy(m.state_dict())
    expected = ((x - m.running_mean.view(1, 3, 1, 1)) / torch.sqrt(m.running_var.view(1, 3, 1, 1)
                                                                     + m.eps)
                * m.weight.view(1, 3, 1, 1) + m.bias.view(1, 3, 1, 1))
    assert_close(m(x), expected)
    for key, value in m.state_dict().items():  # eval leaves the state alone
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_eval_without_running_stats_uses_batch_stats(device):
    m = normext.BatchNorm1d(3, affine=False, track_running_stats=False, device=device,
                            dtype=torch.float64).eval()
    x = torch.randn(16, 3, 5, dtype=torch.float64, device=device) * 3 + 2
    mean = x.mean((0, 2), keepdim=True)
    var = x.var((0, 2), unbiased=False, keepdim=True)
    assert_close(m(x), (x - mean) / torch.sqrt(var + m.eps))
    assert m.running_mean is None and m.running_var is None and m.num_batches_tracked is None


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_momentum_none_is_cumulative_average(device):
    m = normext.BatchNorm1d(2, momentum=None, device=device, dtype=torch.float64)
    batches = [torch.randn(10, 2, dtype=torch.float64, device=device) + i for i in range(4)]
    for x in batches:
        m(x)
    assert_close(m.running_mean, torch.stack([x.mean(0) for x in batches]).mean(0))
    assert_close(m.running_var, torch.stack([x.var(0) for x in batches]).mean(0))
    assert m.num_batches_tracked.item() == 4


# ---------------------------------------------------------------------------
# output layout


LAYOUT_INPUTS = {
    # the output of each of these must be laid out like torch's
    "4D-contiguous": lambda: torch.randn(4, 6, 5, 7),
    "4D-channels_last": lambda: torch.randn(4, 6, 5, 7).contiguous(
        memory_format=torch.channels_last),
    "4D-sliced_channels": lambda: torch.randn(4, 12, 5, 7)[:, ::2],
    "4D-transposed_hw": lambda: torch.randn(4, 6, 7, 5).transpose(2, 3),
    "4D-permuted_nc": lambda: torch.randn(6, 4, 5, 7).transpose(0, 1),
    "4D-expanded": lambda: torch.randn(1, 6, 5, 7).expand(4, 6, 5, 7),
    "4D-channels_last_1x1": lambda: torch.randn(4, 6, 1, 1).contiguous(
        memory_format=torch.channels_last),
    "4D-channels_last_N1": lambda: torch.randn(1, 6, 5, 7).contiguous(
        memory_format=torch.channels_last),
    "4D-channels_last_sliced_w": lambda: torch.randn(4, 6, 5, 8).contiguous(
        memory_format=torch.channels_last)[..., 1:],
    "5D-channels_last_3d": lambda: torch.randn(2, 3, 2, 3, 4).contiguous(
        memory_format=torch.channels_last_3d),
    "5D-channels_last_3d_sliced": lambda: torch.randn(2, 3, 2, 3, 8).contiguous(
        memory_format=torch.channels_last_3d)[..., ::2],
    "2D-transposed": lambda: torch.randn(6, 4).t(),
    "3D-contiguous": lambda: torch.randn(4, 6, 7),
    "3D-channels_stride_1": lambda: torch.randn(4, 7, 6).transpose(1, 2),
}


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(LAYOUT_INPUTS))
def test_output_memory_format_matches_torch(name, training, device):
    x = LAYOUT_INPUTS[name]().to(device)
    C = x.shape[1]
    running = [torch.zeros(C, device=device), torch.ones(C, device=device)]
    running_ref = [t.clone() for t in running]
    w, b = torch.randn(C, device=device), torch.randn(C, device=device)
    expected = F.batch_norm(x, *running_ref, w, b, training)
    out = normext.functional.batch_norm(x, *running, w, b, training)
    assert_close(out, expected)
    assert_close(running[0], running_ref[0])
    assert_close(running[1], running_ref[1])
    assert_layout_like_torch(out, expected, x)


# ---------------------------------------------------------------------------
# empty batches, NaN and Inf


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4), (0, 3, 4, 4), (0, 3, 2, 2, 2)], ids=str)
def test_zero_size_batch(shape, training, device):
    ours, torch_module, _ = make_pair(shape, device, torch.float32, torch.float32)
    ours.train(training)
    torch_module.train(training)
    x = torch.randn(shape, device=device, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    before = copy.deepcopy(ours.state_dict())
    out, out_ref = ours(x), torch_module(x_ref)
    assert out.shape == out_ref.shape == x.shape
    assert out.dtype == out_ref.dtype
    out.sum().backward()
    out_ref.sum().backward()
    assert x.grad.shape == x_ref.grad.shape
    assert_close(ours.weight.grad, torch_module.weight.grad)
    assert_close(ours.bias.grad, torch_module.bias.grad)
    compare_state(ours, torch_module, torch.float32)
    assert torch.equal(ours.running_mean, before["running_mean"])
    assert torch.equal(ours.running_var, before["running_var"])
    assert ours.num_batches_tracked.item() == (1 if training else 0)


def _poisoned_input(device, values):
    x = torch.randn(4, 4, 3, 3, device=device)
    for channel, value in enumerate(values):
        x[0, channel, 1, 2] = value
    return x


def _compare_masks(a, b, what):
    a, b = a.cpu(), b.cpu()
    assert torch.equal(torch.isnan(a), torch.isnan(b)), what
    assert torch.equal(torch.isinf(a), torch.isinf(b)), what
    assert torch.equal(torch.isposinf(a), torch.isposinf(b)), what
    finite = torch.isfinite(b)
    assert_close(a[finite], b[finite], msg=what)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("values", [
    pytest.param((float("nan"),), id="nan"),
    pytest.param((float("nan"), 1.0, float("nan")), id="nan-2-channels"),
    pytest.param((1.0, float("inf"), float("-inf")), id="inf"),
    pytest.param((float("nan"), float("inf"), float("-inf"), 1.0), id="nan-inf"),
    # finite, but the squares overflow float32: torch gets an infinite
    # variance (output = bias), not NaN. (Not closer to the float32 maximum:
    # there, whether the backward's float32 sum of dy * (x - mean) overflows
    # depends on the order of the additions, and torch's CPU kernel, its CUDA
    # kernel and normext's order differ.)
    pytest.param((1.0, 1.0, 1.0, 1e38), id="huge-finite"),
    pytest.param((1.0, -1e37, 1.0, 1e30), id="huge-finite-2"),
])
def test_nan_inf_propagate_like_torch(values, layout, training, device):
    """normext gives torch's CPU answers on every device. (torch's CUDA
    kernels differ from its CPU ones here: a variance that overflows gives
    NaN there instead of an output equal to the bias.)"""
    ours, torch_module, _ = make_pair((4, 4, 3, 3), device, torch.float32, torch.float32)
    torch_module.cpu()
    ours.train(training)
    torch_module.train(training)
    x = _poisoned_input(device, values).contiguous(memory_format=layout).requires_grad_()
    x_cpu = x.detach().cpu().requires_grad_()
    out, expected = ours(x), torch_module(x_cpu)
    _compare_masks(out, expected, "output")
    _compare_masks(ours.running_mean, torch_module.running_mean, "running_mean")
    _compare_masks(ours.running_var, torch_module.running_var, "running_var")
    grad = torch.randn_like(expected)
    out.backward(grad.to(device))
    expected.backward(grad)
    # In eval the input gradient is dy * invstd * weight: finite where x is not.
    _compare_masks(x.grad, x_cpu.grad, "grad_input")
    _compare_masks(ours.weight.grad, torch_module.weight.grad, "grad_weight")
    _compare_masks(ours.bias.grad, torch_module.bias.grad, "grad_bias")


# ---------------------------------------------------------------------------
# state dicts, repr, class hierarchy


@pytest.mark.parametrize("kind", [1, 2, 3])
@pytest.mark.parametrize("flags", flag_params([dict(), dict(affine=False), dict(bias=False),
                                                dict(track_running_stats=False),
                                                dict(momentum=None)]))
def test_state_dict_round_trip(kind, flags):
    theirs = TORCH_CLASSES[kind](5, **flags)
    with torch.no_grad():
        for t in theirs.state_dict().values():
            if t.is_floating_point():
                t.uniform_()
        if theirs.num_batches_tracked is not None:
            theirs.num_batches_tracked.fill_(7)
    ours = NORMEXT_CLASSES[kind](5, **flags)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
        assert ours.state_dict()[key].dtype == value.dtype
    back = TORCH_CLASSES[kind](5, **flags)
    back.load_state_dict(ours.state_dict(), strict=True)
    for key, value in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    assert ours.state_dict()._metadata[""]["version"] == theirs.state_dict()._metadata[""][
        "version"]


@pytest.mark.parametrize("kind", [1, 2, 3])
def test_old_checkpoint_without_num_batches_tracked(kind):
    theirs = TORCH_CLASSES[kind](4)
    with torch.no_grad():
        theirs.running_mean.uniform_()
    state = theirs.state_dict()
    del state["num_batches_tracked"]
    state._metadata[""]["version"] = 1
    ours = NORMEXT_CLASSES[kind](4)
    ours.num_batches_tracked.fill_(3)
    reference = TORCH_CLASSES[kind](4)
    reference.num_batches_tracked.fill_(3)
    ours.load_state_dict(copy.deepcopy(state), strict=True)
    reference.load_state_dict(copy.deepcopy(state), strict=True)
    assert torch.equal(ours.running_mean, theirs.running_mean)
    assert ours.num_batches_tracked.item() == reference.num_batches_tracked.item()
    # missing without the old version: strict loading must complain like torch
    state._metadata[""]["version"] = 2
    with pytest.raises(RuntimeError, match="num_batches_tracked"):
        NORMEXT_CLASSES[kind](4).load_state_dict(copy.deepcopy(state), strict=True)


def test_state_dict_in_a_model():
    theirs = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                 torch.nn.Flatten(), torch.nn.BatchNorm1d(4 * 4 * 4))
    ours = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), normext.BatchNorm2d(4),
                               torch.nn.Flatten(), normext.BatchNorm1d(4 * 4 * 4))
    theirs(torch.randn(3, 3, 6, 6))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


@pytest.mark.parametrize("kind", [1, 2, 3])
@pytest.mark.parametrize("flags", flag_params([dict(), dict(eps=1e-3, momentum=None, affine=False,
                                                            track_running_stats=False),
                                                dict(bias=False)],
                                               ids=["default", "all-off", "no-bias"]))
def test_repr_and_class(kind, flags):
    ours, theirs = NORMEXT_CLASSES[kind](7, **flags), TORCH_CLASSES[kind](7, **flags)
    assert ours.extra_repr() == theirs.extra_repr()
    assert repr(ours) == repr(theirs)  # both print as BatchNorm{k}d(...)
    assert type(ours).__name__ == type(theirs).__name__
    assert isinstance(ours, torch.nn.modules.batchnorm._BatchNorm)
    assert isinstance(ours, TORCH_CLASSES[kind])
    for name in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
        assert getattr(ours, name) == getattr(theirs, name), name


def test_to_dtype_and_device_moves_state():
    m = normext.BatchNorm2d(3).to(torch.float64)
    assert all(t.dtype == torch.float64 for t in (m.weight, m.bias, m.running_mean,
                                                  m.running_var))
    assert m.num_batches_tracked.dtype == torch.long
    reference = torch.nn.BatchNorm2d(3).to(torch.float64)
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    out = m(x)
    assert out.dtype == torch.float64
    assert_close(out, reference(x))
    assert_close(m.running_var, reference.running_var)


# ---------------------------------------------------------------------------
# errors: same type and message as torch


def assert_same_error(make_call, match=None):
    """make_call(batch_norm_module_or_function_kind) -> callable. Both torch's
    and normext's raise; same exception type, and `match` in both messages."""
    errors = []
    for impl in ("torch", "normext"):
        with pytest.raises(Exception) as info:
            make_call(impl)()
        errors.append(info.value)
    torch_error, our_error = errors
    assert type(our_error) is type(torch_error), (repr(torch_error), repr(our_error))
    if match is not None:
        assert match in str(torch_error), str(torch_error)
        assert match in str(our_error), str(our_error)
    return our_error


def _module(impl, kind, *args, **kwargs):
    return (TORCH_CLASSES if impl == "torch" else NORMEXT_CLASSES)[kind](*args, **kwargs)


def _functional(impl):
    return F.batch_norm if impl == "torch" else normext.functional.batch_norm


@pytest.mark.parametrize("kind,shape,message", [
    (2, (2, 3, 4), "expected 4D input (got 3D input)"),
    (2, (2, 3, 4, 4, 4), "expected 4D input (got 5D input)"),
    (1, (2, 3, 4, 4), "expected 2D or 3D input (got 4D input)"),
    (1, (3,), "expected 2D or 3D input (got 1D input)"),
    (3, (2, 3, 4, 4), "expected 5D input (got 4D input)"),
])
def test_error_wrong_rank(kind, shape, message):
    assert_same_error(lambda impl: lambda: _module(impl, kind, 3)(torch.randn(shape)), message)


@pytest.mark.parametrize("flags,message", [
    (dict(), "running_mean should contain 3 elements not 4"),
    (dict(affine=False), "running_mean should contain 3 elements not 4"),
    (dict(track_running_stats=False), "weight should contain 3 elements not 4"),
], ids=["default", "affine=False", "track_running_stats=False"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_error_channel_mismatch_module(flags, message, training):
    assert_same_error(
        lambda impl: lambda: _module(impl, 2, 4, **flags).train(training)(
            torch.randn(2, 3, 4, 4)), message)


@pytest.mark.parametrize("which", ["running_mean", "running_var", "weight", "bias"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_error_channel_mismatch_functional(which, training):
    def call(impl):
        tensors = dict(running_mean=torch.zeros(3), running_var=torch.ones(3),
                       weight=torch.ones(3), bias=torch.zeros(3))
        tensors[which] = torch.ones(4)
        return lambda: _functional(impl)(torch.randn(2, 3, 4), training=training, **tensors)
    assert_same_error(call, f"{which} should contain 3 elements not 4")


@pytest.mark.parametrize("which", ["running_mean", "running_var"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_error_running_stat_requires_grad(which, training):
    def call(impl):
        tensors = dict(running_mean=torch.zeros(3), running_var=torch.ones(3))
        tensors[which].requires_grad_()
        return lambda: _functional(impl)(torch.randn(2, 3, 4), training=training, **tensors)
    assert_same_error(call, f"not differentiable with respect to argument '{which}'")
    with torch.no_grad():  # as in torch, fine without autograd
        call("normext")()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_error_running_stats_not_1d(training):
    def call(impl):
        return lambda: _functional(impl)(torch.randn(2, 3, 4), torch.zeros(3, 1),
                                         torch.ones(3, 1), training=training)
    error = assert_same_error(call)
    assert "expected running_mean of shape [3] but got [3, 1]" in str(error)


@pytest.mark.parametrize("dtype,name", [(torch.int64, "Long"), (torch.int32, "Int"),
                                        (torch.uint8, "Byte"), (torch.bool, "Bool")])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_error_integer_and_bool_input(dtype, name, training):
    x = torch.ones(2, 3, 4, 4, dtype=dtype)
    assert_same_error(lambda impl: lambda: _module(impl, 2, 3).train(training)(x),
                      f"not implemented for '{name}'")
    with pytest.raises(NotImplementedError, match=name):
        torch.ops.normext.batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-5)
    with pytest.raises(NotImplementedError, match=name):
        torch.ops.normext.batch_norm_moments(x)


@pytest.mark.parametrize("case", [
    # (input dtype, weight/bias dtype, running stats dtype)
    (torch.float32, torch.float64, torch.float32),
    (torch.float32, torch.float32, torch.float64),
    (torch.float64, torch.float64, torch.float32),
    (torch.float64, torch.float32, torch.float64),
    (torch.float16, torch.float64, torch.float64),
    (torch.float16, torch.float16, torch.float32),
    (torch.float16, torch.float32, torch.float16),
    (torch.bfloat16, torch.float16, torch.float16),
    (torch.float32, torch.float32, torch.int64),
], ids=lambda c: "-".join(str(d).replace("torch.", "") for d in c))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_error_mismatched_param_dtypes(case, training):
    input_dtype, param_dtype, stat_dtype = case

    def call(impl):
        x = torch.randn(2, 3, 4, dtype=input_dtype)
        return lambda: _functional(impl)(
            x, torch.zeros(3, dtype=stat_dtype), torch.ones(3, dtype=stat_dtype),
            torch.ones(3, dtype=param_dtype), torch.zeros(3, dtype=param_dtype), training)
    assert_same_error(call)
    x = torch.randn(2, 3, 4, dtype=input_dtype)
    with pytest.raises(RuntimeError):
        torch.ops.normext.batch_norm_forward(
            x, torch.ones(3, dtype=param_dtype), torch.zeros(3, dtype=param_dtype),
            torch.zeros(3, dtype=stat_dtype), torch.ones(3, dtype=stat_dtype), training, 0.1,
            1e-5)


def test_error_float64_input_float32_module():
    assert_same_error(lambda impl: lambda: _module(impl, 2, 3)(
        torch.randn(2, 3, 4, 4, dtype=torch.float64)))


@pytest.mark.parametrize("kind,shape", [(1, (1, 3)), (1, (1, 3, 1)), (2, (1, 3, 1, 1)),
                                        (3, (1, 3, 1, 1, 1))], ids=str)
def test_error_one_value_per_channel_in_training(kind, shape):
    assert_same_error(lambda impl: lambda: _module(impl, kind, 3)(torch.randn(shape)),
                      "Expected more than 1 value per channel when training")
    # ... and eval mode accepts it, with the same result as torch
    x = torch.randn(shape)
    ours, theirs = _module("normext", kind, 3).eval(), _module("torch", kind, 3).eval()
    assert_close(ours(x), theirs(x))


# ---------------------------------------------------------------------------
# num_batches_tracked: counted in the extension's entry for eager calls


def _counting_pair(fused, momentum):
    """A normext layer (BatchNorm2d or BatchNormAct2d with identity) and torch's
    BatchNorm2d, same state."""
    theirs = torch.nn.BatchNorm2d(3, momentum=momentum)
    ours = (normext.BatchNormAct2d(3, momentum=momentum, activation="identity") if fused
            else normext.BatchNorm2d(3, momentum=momentum))
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


@pytest.mark.parametrize("fused", [False, True], ids=["BatchNorm2d", "BatchNormAct2d"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_counter_like_torch_through_errors(fused, momentum):
    """num_batches_tracked and its version counter follow torch's module step
    by step, including a batch its checks reject (torch counts it first) and
    the wrong-rank input it rejects before counting."""
    ours, theirs = _counting_pair(fused, momentum)
    inputs = [torch.randn(4, 3, 2, 2), torch.randn(1, 3, 1, 1), torch.randn(4, 3, 2),
              torch.randn(4, 3, 2, 2) + 1]
    versions = [layer.num_batches_tracked._version for layer in (ours, theirs)]
    for x in inputs:
        for layer in (ours, theirs):
            try:
                layer(x)
            except ValueError:
                pass
        assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item()
        assert (ours.num_batches_tracked._version - versions[0]
                == theirs.num_batches_tracked._version - versions[1])
        assert_close(ours.running_mean, theirs.running_mean)
        assert_close(ours.running_var, theirs.running_var)
    assert ours.num_batches_tracked.item() == 3


def test_counter_that_is_an_inference_tensor():
    """A counter made under inference_mode cannot count outside it: torch's
    RuntimeError, raised after counting as torch's add_ does, running stats
    untouched; inside inference_mode it counts."""
    with torch.inference_mode():
        layers = _counting_pair(False, 0.1)
    x = torch.randn(4, 3, 2, 2)
    for layer in layers:
        with pytest.raises(RuntimeError, match="Inplace update to inference tensor"):
            layer(x)
        assert layer.num_batches_tracked.item() == 1
        assert layer.running_mean.abs().max() == 0
        with torch.inference_mode():
            layer(x)
        assert layer.num_batches_tracked.item() == 2
    assert_close(layers[0].running_mean, layers[1].running_mean)


def test_counter_seen_by_dispatch_modes():
    """Under a TorchDispatchMode the count is torch's add_, which the mode sees
    (a counter on the CPU is otherwise incremented on the host)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    ours, theirs = _counting_pair(False, None)
    x = torch.randn(4, 3, 2, 2)
    for layer in (ours, theirs):
        with Ops() as mode:
            layer(x)
        assert "aten.add_.Tensor" in mode.names, mode.names  # the overload Python's add_(1) calls
        assert layer.num_batches_tracked.item() == 1
    assert_close(ours.running_var, theirs.running_var)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("fused", [False, True], ids=["BatchNorm2d", "BatchNormAct2d"])
def test_counter_in_a_jit_trace(fused):
    """torch.jit.trace records the count (torch's add_), so the traced module
    counts each call as torch's traced module does."""
    ours, theirs = _counting_pair(fused, 0.1)
    x = torch.randn(4, 3, 2, 2)
    traced = [torch.jit.trace(layer, x, check_trace=False) for layer in (ours, theirs)]
    for _ in range(3):
        for module in traced:
            module(x)
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 4
    assert_close(ours.running_mean, theirs.running_mean)


def test_counter_that_is_a_tensor_subclass():
    """A counter of a tensor subclass is counted through its own add_ (its
    __torch_function__ sees the call, as with torch's module)."""
    seen = []

    class Counter(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            seen.append(getattr(func, "__name__", str(func)))
            return super().__torch_function__(func, types, args, kwargs or {})

    x = torch.randn(4, 3, 2, 2)
    for layer in _counting_pair(False, None):
        seen.clear()
        layer.num_batches_tracked = torch.tensor(0).as_subclass(Counter)
        layer(x)
        assert "add_" in seen, seen
        assert int(layer.num_batches_tracked) == 1


def test_error_running_mean_none_in_eval():
    assert_same_error(
        lambda impl: lambda: _functional(impl)(torch.randn(2, 3), None, None, training=False),
        "running_mean must be defined in evaluation mode")
    with pytest.raises(RuntimeError, match="running_mean must be defined in evaluation mode"):
        torch.ops.normext.batch_norm_forward(torch.randn(2, 3), None, None, None, None, False,
                                             0.1, 1e-5)


@pytest.mark.parametrize("given", ["running_mean", "running_var"])
def test_error_only_one_running_stat_in_training(given):
    def call(impl):
        stats = dict(running_mean=None, running_var=None)
        stats[given] = torch.ones(3)
        return lambda: _functional(impl)(torch.randn(2, 3), training=True, **stats)
    assert_same_error(call, "running_mean and running_var must either both be None")
    stats = [None, None]
    stats[given == "running_var"] = torch.ones(3)
    with pytest.raises(ValueError, match="must either both be None"):
        torch.ops.normext.batch_norm_forward(torch.randn(2, 3), None, None, *stats, True, 0.1,
                                             1e-5)


@pytest.mark.parametrize("given,message", [
    ("running_mean", "running_var must be defined in evaluation mode"),
    ("running_var", "running_mean must be defined in evaluation mode"),
], ids=["only_running_mean", "only_running_var"])
def test_error_only_one_running_stat_in_eval(given, message):
    def call(impl):
        stats = dict(running_mean=None, running_var=None)
        stats[given] = torch.ones(3)
        return lambda: _functional(impl)(torch.randn(2, 3), training=False, **stats)
    assert_same_error(call, message)


@pytest.mark.parametrize("which", ["weight", "bias", "running_stats", "input"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_error_tensors_on_different_devices(which, training):
    """A CPU input with a parameter on another device (meta stands in for a
    GPU) must raise, not compute."""
    def tensors():
        t = dict(input=torch.randn(4, 3, 5), running_mean=torch.zeros(3),
                 running_var=torch.ones(3), weight=torch.ones(3), bias=torch.zeros(3))
        if which == "running_stats":
            t["running_mean"] = t["running_mean"].to("meta")
            t["running_var"] = t["running_var"].to("meta")
        else:
            t[which] = t[which].to("meta")
        return t

    def call(impl):
        t = tensors()
        return lambda: _functional(impl)(t["input"], t["running_mean"], t["running_var"],
                                         t["weight"], t["bias"], training)
    assert_same_error(call)
    t = tensors()
    with pytest.raises(RuntimeError):
        torch.ops.normext.batch_norm_forward(t["input"], t["weight"], t["bias"],
                                             t["running_mean"], t["running_var"], training, 0.1,
                                             1e-5)


# torch 2.11 rejects eps <= 0 in both modes with one message; later releases
# allow eps = 0 in eval and say which rule was broken.
ZERO_EPS_IN_EVAL = normext.functional._ZERO_EPS_IN_EVAL


@pytest.mark.parametrize("eps,training,message", [
    (0.0, True, "batch_norm eps must be positive during training, but got 0.0"
     if ZERO_EPS_IN_EVAL else "batch_norm eps must be positive, but got 0.0"),
    (-1e-5, True, "batch_norm eps must be positive"),
    (-1e-5, False, "batch_norm eps must be non-negative" if ZERO_EPS_IN_EVAL
     else "batch_norm eps must be positive"),
] + ([] if ZERO_EPS_IN_EVAL else [(0.0, False, "batch_norm eps must be positive, but got 0.0")]))
def test_error_eps(eps, training, message):
    assert_same_error(
        lambda impl: lambda: _module(impl, 2, 3, eps=eps).train(training)(
            torch.randn(2, 3, 2, 2)), message)
    assert_same_error(
        lambda impl: lambda: _functional(impl)(torch.randn(2, 3), torch.zeros(3), torch.ones(3),
                                               training=training, eps=eps), message)


@pytest.mark.skipif(not ZERO_EPS_IN_EVAL, reason="this torch rejects eps=0 in eval too")
def test_eps_zero_in_eval_is_allowed():
    x = torch.randn(2, 3, dtype=torch.float64)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    assert_close(normext.functional.batch_norm(x, rm, rv, eps=0.0),
                 F.batch_norm(x, rm, rv, eps=0.0))


@pytest.mark.parametrize("momentum,type_name", [
    (None, "NoneType"), ("0.1", "str"), (torch.tensor([0.1]), "Tensor"),
    (fractions.Fraction(1, 10), "Fraction"), (decimal.Decimal("0.1"), "decimal.Decimal"),
    (np.array(0.1), "numpy.ndarray")])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_error_momentum_not_a_float(momentum, type_name, training):
    assert_same_error(
        lambda impl: lambda: _functional(impl)(torch.randn(2, 3), torch.zeros(3), torch.ones(3),
                                               training=training, momentum=momentum),
        f"argument 'momentum' (position 7) must be float, not {type_name}")


@pytest.mark.parametrize("momentum", [1, True, np.float32(0.5), np.bool_(True), torch.tensor(0.5)],
                         ids=["int", "bool", "numpy", "numpy-bool", "0-dim-tensor"])
def test_momentum_types_torch_takes(momentum):
    x = torch.randn(4, 3, dtype=torch.float64)
    stats = [(torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
             for _ in range(2)]
    out = normext.functional.batch_norm(x, *stats[0], training=True, momentum=momentum)
    expected = F.batch_norm(x, *stats[1], training=True, momentum=momentum)
    assert_close(out, expected)
    for ours, torchs in zip(*stats):
        assert_close(ours, torchs)


@pytest.mark.parametrize("args,error", [
    ((torch.randn(3), None, None, None, None, True, 0.1, 1e-5), RuntimeError),
    ((torch.randn(2, 3), torch.ones(4), None, None, None, True, 0.1, 1e-5), RuntimeError),
    ((torch.randn(2, 3), None, None, torch.zeros(4), torch.ones(4), True, 0.1, 1e-5),
     RuntimeError),
    ((torch.randn(2, 3), None, None, torch.zeros(3), torch.ones(3, dtype=torch.float64), True,
      0.1, 1e-5), RuntimeError),
    ((torch.randn(2, 3, dtype=torch.complex64), None, None, None, None, True, 0.1, 1e-5),
     NotImplementedError),
], ids=["1D-input", "weight-size", "running-size", "running-dtypes", "complex"])
def test_op_errors_raise_not_crash(args, error):
    with pytest.raises(error):
        torch.ops.normext.batch_norm_forward(*args)


def test_one_value_per_channel_op_matches_aten():
    """The op itself does not validate the batch size (like aten): a single
    value per channel gives an output of bias and a NaN running_var (0 / 0)."""
    x = torch.randn(1, 3, dtype=torch.float64)
    w, b = torch.rand(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    rm2, rv2 = rm.clone(), rv.clone()
    out, _, _ = torch.ops.normext.batch_norm_forward(x, w, b, rm, rv, True, 0.1, 1e-5)
    expected = torch.batch_norm(x, w, b, rm2, rv2, True, 0.1, 1e-5, False)
    assert_close(out, expected)
    assert_close(rm, rm2)
    _compare_masks(rv, rv2, "running_var")


@pytest.mark.parametrize("combo", list(itertools.product([True, False], repeat=2)),
                         ids=lambda c: f"weight={c[0]},bias={c[1]}")
def test_functional_optional_weight_bias(combo):
    has_weight, has_bias = combo
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    w = torch.rand(3, dtype=torch.float64) if has_weight else None
    b = torch.randn(3, dtype=torch.float64) if has_bias else None
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    rm2, rv2 = rm.clone(), rv.clone()
    assert_close(normext.functional.batch_norm(x, rm, rv, w, b, True),
                 F.batch_norm(x, rm2, rv2, w, b, True))
    assert_close(rm, rm2)
    assert_close(rv, rv2)

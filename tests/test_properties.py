"""Property test: random shapes (size-1 dims included), flags, layouts and
dtypes; normext's modules and torch's agree on outputs, grads, running stats
and errors."""

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import normext
from conftest import BN_HAS_BIAS_FLAG, DEVICE_PARAMS, assert_close

TORCH_CLASSES = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}
NORMEXT_CLASSES = {1: normext.BatchNorm1d, 2: normext.BatchNorm2d, 3: normext.BatchNorm3d}
RANK_TO_KIND = {2: 1, 3: 1, 4: 2, 5: 3}

LAYOUTS = ["contiguous", "channels_last", "sliced", "transposed"]


def _make_input(shape, layout, dtype, device, scale, shift):
    """A leaf tensor and the (possibly non-contiguous) input made from it."""
    shape = list(shape)
    if layout == "sliced":
        leaf_shape = shape[:-1] + [2 * shape[-1]]
    elif layout == "transposed":
        leaf_shape = shape[:-2] + [shape[-1], shape[-2]]
    else:
        leaf_shape = shape
    data = torch.randn(leaf_shape, dtype=torch.float64) * scale + shift
    leaf = data.to(device=device, dtype=dtype).requires_grad_()

    def view(t):
        if layout == "channels_last" and t.dim() == 4:
            return t.contiguous(memory_format=torch.channels_last)
        if layout == "channels_last" and t.dim() == 5:
            return t.contiguous(memory_format=torch.channels_last_3d)
        if layout == "sliced":
            return t[..., ::2]
        if layout == "transposed":
            return t.transpose(-1, -2)
        return t

    return leaf, view


@st.composite
def cases(draw):
    rank = draw(st.sampled_from([2, 3, 4, 5]))
    dims = st.integers(1, 4)
    shape = [draw(st.integers(1, 5)), draw(st.integers(1, 6))] + [draw(dims)
                                                                   for _ in range(rank - 2)]
    affine = draw(st.booleans())
    flags = dict(
        affine=affine,
        track_running_stats=draw(st.booleans()),
        momentum=draw(st.sampled_from([0.1, None, 0.5, 1.0])),
        eps=draw(st.sampled_from([1e-5, 1e-3])),
    )
    if BN_HAS_BIAS_FLAG and affine:
        flags["bias"] = draw(st.booleans())
    return dict(
        shape=shape,
        flags=flags,
        layout=draw(st.sampled_from(LAYOUTS)),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        modes=draw(st.lists(st.booleans(), min_size=1, max_size=3)),  # True = training
        scale=draw(st.sampled_from([1.0, 3.0, 0.1])),
        shift=draw(st.sampled_from([0.0, 2.0, -50.0])),
    )


def _run(case, device):
    shape, flags, layout, dtype = case["shape"], case["flags"], case["layout"], case["dtype"]
    kind = RANK_TO_KIND[len(shape)]
    C = shape[1]
    theirs = TORCH_CLASSES[kind](C, device=device, dtype=dtype, **flags)
    with torch.no_grad():
        for t in theirs.state_dict().values():
            if t.is_floating_point():
                t.uniform_(0.5, 1.5)
    ours = NORMEXT_CLASSES[kind](C, device=device, dtype=dtype, **flags)
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
    # x - mean loses log2(|mean| / std) bits of the input precision, in torch
    # (which accumulates float32 in float64 on the CPU) and in normext alike
    factor = max(1.0, abs(case["shift"]) / case["scale"]) if dtype == torch.float32 else 1.0
    for step, training in enumerate(case["modes"]):
        msg = f"step {step} ({'train' if training else 'eval'})"
        ours.train(training)
        theirs.train(training)
        for p in list(ours.parameters()) + list(theirs.parameters()):
            p.grad = None
        leaf, view = _make_input(shape, layout, dtype, device, case["scale"], case["shift"])
        leaf_ref = leaf.detach().clone().requires_grad_()
        try:
            expected = theirs(view(leaf_ref))
        except Exception as error:  # e.g. one value per channel in training
            with pytest.raises(type(error)) as info:
                ours(view(leaf))
            assert str(error) == str(info.value)
            assert_close(ours.num_batches_tracked, theirs.num_batches_tracked)
            continue
        out = ours(view(leaf))
        assert out.shape == expected.shape and out.dtype == expected.dtype
        assert_close(out, expected, factor=factor, msg=f"{msg}: output")
        grad = torch.randn_like(expected)
        out.backward(grad)
        expected.backward(grad)
        assert_close(leaf.grad, leaf_ref.grad, factor=factor, msg=f"{msg}: input grad")
        for name in ("weight", "bias"):
            mine, reference = getattr(ours, name), getattr(theirs, name)
            assert (mine is None) == (reference is None)
            if mine is not None:
                assert_close(mine.grad, reference.grad, factor=factor, msg=f"{msg}: {name} grad")
        for name, value in theirs.state_dict().items():
            assert_close(ours.state_dict()[name], value, factor=factor, msg=f"{msg}: {name}")


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@settings(max_examples=50, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases())
def test_random_cases_match_torch(case, device):
    torch.manual_seed(0)
    _run(case, device)


@st.composite
def reduced_precision_cases(draw):
    rank = draw(st.sampled_from([2, 3, 4, 5]))
    shape = [draw(st.integers(1, 16)), draw(st.sampled_from([1, 3, 8, 17, 64]))] + [
        draw(st.integers(1, 12 if rank <= 4 else 5)) for _ in range(rank - 2)]
    return dict(
        shape=shape,
        layout=draw(st.sampled_from(LAYOUTS)),
        dtype=draw(st.sampled_from([torch.float16, torch.bfloat16])),
        float32_params=draw(st.booleans()),
        training=draw(st.booleans()),
        affine=draw(st.booleans()),
        shift=draw(st.sampled_from([0.0, 3.0, 1000.0])),
    )


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@settings(max_examples=40, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=reduced_precision_cases())
def test_random_reduced_precision_cases_match_float64(case, device):
    """float16/bfloat16 inputs (with parameters and running stats of their
    dtype or float32) against torch's batch_norm in float64 on the same,
    exactly upcast, values: output, every gradient and the running stats."""
    torch.manual_seed(0)
    shape, dtype, training = case["shape"], case["dtype"], case["training"]
    C = shape[1]
    if training and torch.Size(shape).numel() == C:
        return  # one value per channel: an error, tested elsewhere
    param_dtype = torch.float32 if case["float32_params"] else dtype
    leaf, view = _make_input(shape, case["layout"], dtype, device, 1.0, case["shift"])

    def param(values):
        return values.to(device=device, dtype=param_dtype).requires_grad_()

    weight = param(torch.rand(C) + 0.5) if case["affine"] else None
    bias = param(torch.randn(C)) if case["affine"] else None
    running = [t.to(device, param_dtype) for t in (torch.randn(C), torch.rand(C) + 0.5)]
    leaf64 = leaf.detach().double().requires_grad_()
    params64 = [None if p is None else p.detach().double().requires_grad_() for p in (weight, bias)]
    running64 = [t.double() for t in running]
    out = normext.functional.batch_norm(view(leaf), *running, weight, bias, training, 0.1, 1e-5)
    expected = torch.nn.functional.batch_norm(view(leaf64), *running64, *params64, training,
                                              0.1, 1e-5)
    assert out.dtype == dtype and out.shape == expected.shape
    assert_close(out, expected, msg="output")
    grad = torch.randn(expected.shape, device=device).to(dtype)
    out.backward(grad)
    expected.backward(grad.double())
    # sums of |dy| * |x_hat| terms: a few ulps of the largest term
    assert_close(leaf.grad, leaf64.grad, factor=4.0, msg="input grad")
    # float32 sums of x - mean lose log2(|mean| / std) bits; a 16-bit result
    # rounds that away, and one past its range is inf
    factor = max(4.0, case["shift"]) if param_dtype == torch.float32 else 4.0
    for name, mine, reference in zip(("weight", "bias"), (weight, bias), params64):
        if mine is not None:
            assert_close(mine.grad, reference.grad.to(param_dtype), factor=factor,
                         msg=f"{name} grad")
    for name, mine, reference in zip(("running_mean", "running_var"), running, running64):
        assert_close(mine, reference, msg=name)

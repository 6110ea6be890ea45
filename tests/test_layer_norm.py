"""normext.LayerNorm / RMSNorm and their functionals against torch.nn: outputs,
input and parameter gradients in float64 and per dtype, over hypothesis-drawn
shapes and flags; gradcheck and gradgradcheck; errors; state_dict; convert;
compile; determinism at any thread count."""

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import normext
from normext import functional as NF
from normext import ops
from conftest import assert_close

F = torch.nn.functional


def _reference(rms, x, shape, w, b, eps):
    if rms:
        return F.rms_norm(x, shape, w, eps)
    return F.layer_norm(x, shape, w, b, eps)


def _ours(rms, x, shape, w, b, eps):
    if rms:
        return NF.rms_norm(x, shape, w, eps)
    return NF.layer_norm(x, shape, w, b, eps)


def _grads(fn, rms, x, shape, w, b, eps, dy):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    x_, w_, b_ = leaves
    y = fn(rms, x_, shape, w_, None if rms else b_, eps)
    y.backward(dy)
    return y, [t.grad if t is not None else None for t in leaves]


@st.composite
def cases(draw):
    leading = draw(st.lists(st.integers(0, 5), min_size=0, max_size=2))
    normalized = draw(st.lists(st.integers(1, 70), min_size=1, max_size=2))
    return dict(shape=leading + normalized, normalized=normalized, rms=draw(st.booleans()),
                weight=draw(st.booleans()), bias=draw(st.booleans()),
                eps=draw(st.sampled_from([1e-5, 1e-2])), seed=draw(st.integers(0, 2**16)))


def _compare(case, dtype):
    torch.manual_seed(case["seed"])
    shape, normalized = case["shape"], case["normalized"]
    x = torch.randn(shape, dtype=torch.float64) * 3 + 1
    w = torch.rand(normalized, dtype=torch.float64) + 0.5 if case["weight"] else None
    b = torch.randn(normalized, dtype=torch.float64) if case["bias"] and not case["rms"] else None
    dy = torch.randn(shape, dtype=torch.float64)
    cast = [t.to(dtype) if t is not None else None for t in (x, w, b, dy)]
    # The reference in float64 from the (exactly) upcast inputs.
    ref = [t.to(torch.float64) if t is not None else None for t in cast]
    y_ref, g_ref = _grads(_reference, case["rms"], *ref[:1], normalized, *ref[1:3], case["eps"],
                          ref[3])
    y, g = _grads(_ours, case["rms"], *cast[:1], normalized, *cast[1:3], case["eps"], cast[3])
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, y_ref, dtype)
    for name, actual, expected in zip(("input", "weight", "bias"), g, g_ref):
        assert_close(actual, expected, dtype, factor=4 if dtype != torch.float64 else 1,
                     msg=f"grad {name}")


@settings(max_examples=60, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_matches_torch_float64(case):
    _compare(case, torch.float64)


@settings(max_examples=40, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_matches_torch_per_dtype(case, dtype):
    _compare(case, dtype)


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("rows,features", [(37, 64), (37, 768), (37, 1023), (37, 1043),
                                           (37, 4097), (37, 8192 + 13), (1500, 64), (3000, 33)])
def test_long_and_many_rows(rms, rows, features):
    """Rows just under and over the reducer's two sets of lanes
    (kTwoSetElements: 1043 ends with an odd vector and 3 elements), over one
    reduction block (kBlockElements), and row counts over a parameter-gradient
    run (16 rows) and over 64 blocks of them, whose last run is short, float32
    against torch."""
    torch.manual_seed(features)
    x, dy = torch.randn(rows, features), torch.randn(rows, features)
    w, b = torch.rand(features) + 0.5, torch.randn(features)
    y_ref, g_ref = _grads(_reference, rms, x, [features], w, b, 1e-5, dy)
    y, g = _grads(_ours, rms, x, [features], w, b, 1e-5, dy)
    assert_close(y, y_ref)
    for actual, expected in zip(g, g_ref):
        assert_close(actual, expected, factor=4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,features", [(37, 700), (37, 2000), (1040, 1300)])
def test_backward_rows_alone_and_in_pairs(rows, features, dtype):
    """The backward takes rows too long for L1 in pairs (float64 from 615
    features, float32 from 1229, bfloat16 from 1756). 37 rows: blocks of one
    16-row run, the last of 5 rows (an odd row after the pairs); 1040 rows:
    blocks of 17 rows, a run in pairs and then a single row added to the
    block's sums. Against torch in float64, with the input's gradient and
    without it (the parameter gradients alone: the same bits)."""
    torch.manual_seed(features)
    x64, dy64 = (torch.randn(rows, features, dtype=torch.float64) for _ in range(2))
    w64 = torch.rand(features, dtype=torch.float64) + 0.5
    b64 = torch.randn(features, dtype=torch.float64)
    x, dy, w, b = (t.to(dtype) for t in (x64, dy64, w64, b64))
    ref = [t.to(torch.float64, copy=True).requires_grad_() for t in (x, w, b)]
    F.layer_norm(ref[0], [features], ref[1], ref[2], 1e-5).backward(dy.to(torch.float64))
    param_grads = []
    for input_grad in (True, False):
        leaves = [x.clone().requires_grad_(input_grad), w.clone().requires_grad_(),
                  b.clone().requires_grad_()]
        NF.layer_norm(leaves[0], [features], leaves[1], leaves[2], 1e-5).backward(dy)
        assert (leaves[0].grad is not None) == input_grad
        for actual, expected in zip(leaves, ref):
            if actual.grad is not None:
                assert_close(actual.grad, expected.grad, dtype, factor=4)
        param_grads.append([leaves[1].grad, leaves[2].grad])
    for with_input, alone in zip(*param_grads):
        assert torch.equal(with_input, alone)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,features", [(9, 33), (37, 700), (37, 2000)])
@pytest.mark.parametrize("params", [True, False], ids=["with_params", "input_alone"])
def test_backward_op_adds_grad_sum(rows, features, dtype, params):
    """layer_norm_backward's grad_sum (add + LayerNorm's sum gradient) is
    added to grad_input in the kernel's pass: against the
    float64 sum of the float64 reference and grad_sum, for rows alone, in
    pairs and with a vector tail; the parameter gradients are the same bits
    as without it, and a grad_input not asked for ignores it."""
    torch.manual_seed(rows + features)
    x, dy, gs = (torch.randn(rows, features, dtype=torch.float64).to(dtype) for _ in range(3))
    w = (torch.rand(features, dtype=torch.float64) + 0.5).to(dtype)
    for rms in (False, True):
        _, mean, rstd = ops.layer_norm_forward(x, [features], w, None, 1e-5, rms)
        mask = [True, params, params]
        fused = ops.layer_norm_backward(dy, x, [features], mean, rstd, w, rms, mask, gs)
        plain = ops.layer_norm_backward(dy, x, [features], mean, rstd, w, rms, mask)
        ref = [t.to(torch.float64, copy=True).requires_grad_() for t in (x, w)]
        _reference(rms, ref[0], [features], ref[1], None, 1e-5).backward(dy.double())
        assert_close(fused[0], ref[0].grad + gs.double(), dtype, factor=4)
        for with_sum, without in zip(fused[1:], plain[1:]):
            assert (with_sum is None and without is None) or torch.equal(with_sum, without)
    assert ops.layer_norm_backward(dy, x, [features], mean, rstd, w, True,
                                   [False, True, False], gs)[0] is None
    with pytest.raises(RuntimeError, match="expected grad_sum of the input's shape"):
        ops.layer_norm_backward(dy, x, [features], mean, rstd, w, True, mask, gs[:1])


def test_backward_op_with_no_gradient_wanted():
    """layer_norm_backward asked for nothing (or for a weight gradient with no
    weight) computes nothing and returns undefined gradients."""
    x, dy = torch.randn(5, 8), torch.randn(5, 8)
    _, mean, rstd = ops.layer_norm_forward(x, [8], None, None, 1e-5, False)
    assert ops.layer_norm_backward(dy, x, [8], mean, rstd, None, False,
                                   [False, False, False]) == (None, None, None)
    assert ops.layer_norm_backward(dy, x, [8], mean, rstd, None, False,
                                   [False, True, False]) == (None, None, None)


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_gradcheck_and_gradgradcheck(rms):
    torch.manual_seed(0)
    x = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(2, 5, dtype=torch.float64) + 0.5).requires_grad_()
    b = None if rms else torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    inputs = (x, w) if rms else (x, w, b)

    def fn(*args):
        return _ours(rms, args[0], [2, 5], args[1], None if rms else args[2], 1e-5)

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_large_mean_and_fp16_near_its_maximum(rms, dtype):
    """1e4 + randn (float16: values up to 65000) against float64 from the same
    inputs: within the tolerances, and no worse than torch in the same dtype.
    A float32 mean of 1e4 is off by up to half its ulp (5e-4), which x - mean
    carries to the output: the tolerance of float32 scales by |mean| / std."""
    torch.manual_seed(0)
    if dtype == torch.float16:
        x = (torch.rand(8, 300, dtype=torch.float64) * 2 - 1) * 65000
    else:
        x = 1e4 + torch.randn(8, 300, dtype=torch.float64)
    x = x.to(dtype)
    w, b = (torch.rand(300) + 0.5).to(dtype), torch.randn(300).to(dtype)
    bias = None if rms else b
    y = _ours(rms, x, [300], w, bias, 1e-5)
    expected = _reference(rms, x.double(), [300], w.double(),
                          None if rms else b.double(), 1e-5)
    theirs = _reference(rms, x, [300], w, bias, 1e-5)
    assert torch.isfinite(y).all()
    assert_close(y, expected, dtype, factor=100 if dtype == torch.float32 and not rms else 1)
    error = (y.double() - expected).abs().max()
    assert error <= (theirs.double() - expected).abs().max() * 1.01


@pytest.mark.parametrize("norm", ["layer_norm", "group_norm"])
@pytest.mark.parametrize("mean", [0.0, 0.99, 1.01, 30.0])
def test_first_pass_statistics_either_side_of_its_threshold(norm, mean):
    """A run whose first pass's mean is at most its standard deviation takes
    its statistics from that pass (E[x^2] - mean^2), else from a second pass
    of deviations from that mean (common/cpu/run_shift.h): float32 outputs on
    either side of |mean| = std against float64, within the float32
    tolerance and within 2x torch's float32 error."""
    torch.manual_seed(int(mean * 100))
    z = torch.randn(16, 2, 768, dtype=torch.float64)  # rows of mean 0 and std 1 exactly
    z = (z - z.mean(-1, keepdim=True)) / z.std(-1, unbiased=False, keepdim=True)
    x64 = z * 2 + 2 * mean
    x = x64.float()
    if norm == "layer_norm":
        ours, theirs = NF.layer_norm(x, [768]), F.layer_norm(x, [768])
        expected = F.layer_norm(x.double(), [768])
    else:
        ours, theirs = NF.group_norm(x, 2), F.group_norm(x, 2)
        expected = F.group_norm(x.double(), 2)
    assert_close(ours, expected, torch.float32)
    error, torch_error = ((t.double() - expected).abs().max() for t in (ours, theirs))
    assert error <= 2 * torch_error + 1e-7


@pytest.mark.parametrize("norm", ["layer_norm", "group_norm"])
def test_zero_constant_and_non_finite_runs_match_torch(norm):
    """Runs the first pass's statistics take exactly (zeros) or hand to the
    shifted pass (a constant, a NaN, an infinity): torch's outputs."""
    x = torch.randn(5, 4, 64)
    x[0] = 0.0
    x[1] = 3.0
    x[2, :, 5] = float("nan")
    x[3, :, 7] = float("inf")
    if norm == "layer_norm":
        ours, theirs = NF.layer_norm(x, [64]), F.layer_norm(x, [64])
    else:
        ours, theirs = NF.group_norm(x, 4), F.group_norm(x, 4)
    torch.testing.assert_close(ours, theirs, equal_nan=True)


def test_rms_norm_eps_none_is_the_dtype_epsilon():
    x = torch.randn(4, 8) * 1e-4
    assert_close(NF.rms_norm(x, [8]), F.rms_norm(x, [8]))
    assert_close(NF.rms_norm(x, [8], eps=None), NF.rms_norm(x, [8], eps=torch.finfo(x.dtype).eps))


def test_bfloat16_input_with_float32_parameters():
    """torch's mixed-dtype layer norm: a 16-bit input with float32 parameters."""
    torch.manual_seed(0)
    x = torch.randn(6, 32).bfloat16()
    w, b = torch.rand(32) + 0.5, torch.randn(32)
    y = NF.layer_norm(x, [32], w, b)
    expected = F.layer_norm(x, [32], w, b)
    assert y.dtype == expected.dtype
    assert_close(y, expected.double(), torch.bfloat16)


def test_non_contiguous_input_and_empty_rows():
    x = torch.randn(8, 6, 5).transpose(0, 1)
    assert_close(NF.layer_norm(x, [5]), F.layer_norm(x, [5]))
    empty = torch.randn(0, 7, requires_grad=True)
    y = NF.layer_norm(empty, [7])
    assert y.shape == (0, 7)
    y.sum().backward()
    assert empty.grad.shape == (0, 7)


def _error(fn):
    with pytest.raises(Exception) as info:
        fn()
    return type(info.value), str(info.value)


@pytest.mark.parametrize("case", [
    ("wrong normalized_shape", lambda f: f.layer_norm(torch.randn(2, 3), [4])),
    ("normalized_shape longer than the input", lambda f: f.layer_norm(torch.randn(3), [2, 3])),
    ("weight shape", lambda f: f.layer_norm(torch.randn(2, 3), [3], torch.ones(4))),
    ("integer input", lambda f: f.layer_norm(torch.ones(2, 3, dtype=torch.long), [3])),
    ("rms wrong shape", lambda f: f.rms_norm(torch.randn(2, 3), [4])),
    ("rms integer input", lambda f: f.rms_norm(torch.ones(2, 3, dtype=torch.long), [3])),
], ids=lambda case: case[0])
def test_bad_input_raises_torchs_error(case):
    _, fn = case
    assert _error(lambda: fn(NF)) == _error(lambda: fn(F))


def test_op_checks_raise_runtime_error():
    with pytest.raises(RuntimeError, match="expected input with shape"):
        normext.ops.layer_norm_forward(torch.randn(2, 3), [4], None, None, 1e-5, False)
    with pytest.raises(RuntimeError, match="rms takes no bias"):
        normext.ops.layer_norm_forward(torch.randn(2, 3), [3], None, torch.ones(3), 1e-5, True)


@pytest.mark.parametrize("cls,kwargs", [
    ("LayerNorm", {}), ("LayerNorm", dict(elementwise_affine=False)),
    ("LayerNorm", dict(bias=False)), ("RMSNorm", {}), ("RMSNorm", dict(eps=1e-3)),
    ("RMSNorm", dict(elementwise_affine=False)),
])
def test_modules_are_drop_ins(cls, kwargs):
    torch.manual_seed(0)
    ours, theirs = getattr(normext, cls)([4, 6], **kwargs), getattr(torch.nn, cls)([4, 6], **kwargs)
    with torch.no_grad():
        for p in theirs.parameters():
            p.uniform_(0.5, 1.5)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert repr(ours).split("(", 1)[1] == repr(theirs).split("(", 1)[1]
    assert isinstance(ours, getattr(torch.nn, cls))
    x = torch.randn(3, 4, 6)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), theirs(xb)
    assert_close(ya, yb)
    ya.square().sum().backward()
    yb.square().sum().backward()
    assert_close(xa.grad, xb.grad)
    for (name, pa), (_, pb) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert_close(pa.grad, pb.grad, factor=4, msg=name)


def test_convert_and_include():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.RMSNorm(4),
                                torch.nn.Sequential(torch.nn.BatchNorm1d(4)))
    state = copy.deepcopy(model.state_dict())
    only_ln = normext.convert(copy.deepcopy(model), include=(torch.nn.LayerNorm,))
    assert [type(m) for m in only_ln.modules()][2:5] == [normext.LayerNorm, torch.nn.RMSNorm,
                                                         torch.nn.Sequential]
    assert type(only_ln[3][0]) is torch.nn.BatchNorm1d
    converted = normext.convert(model)
    assert type(converted[1]) is normext.LayerNorm and type(converted[2]) is normext.RMSNorm
    assert type(converted[3][0]) is normext.BatchNorm1d
    converted.load_state_dict(state, strict=True)
    assert converted.state_dict().keys() == state.keys()
    with pytest.raises(ValueError, match="does not convert"):
        normext.convert(model, include=(torch.nn.Linear,))


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_compile_fullgraph(rms):
    torch.manual_seed(0)
    layer = normext.RMSNorm(16) if rms else normext.LayerNorm(16)
    reference = copy.deepcopy(layer)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 5, 16)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = compiled(xa), reference(xb)
    assert_close(ya, yb)
    ya.sum().backward()
    yb.sum().backward()
    assert_close(xa.grad, xb.grad)
    assert_close(layer.weight.grad, reference.weight.grad)


def test_bit_identical_at_any_thread_count(num_threads):
    torch.manual_seed(0)
    for rows, features in ((70, 5000), (1500, 40)):
        x = torch.randn(rows, features)
        w, b = torch.rand(features) + 0.5, torch.randn(features)
        dy = torch.randn_like(x)
        results = []
        for threads in (1, 2, 3, 8):
            num_threads(threads)
            results.append(_grads(_ours, False, x, [features], w, b, 1e-5, dy))
        for y, grads in results[1:]:
            assert torch.equal(y, results[0][0])
            for a, e in zip(grads, results[0][1]):
                assert torch.equal(a, e)


def _add_norm_grads(fn, rms, x, r, shape, w, b, eps, dy, ds):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, r, w, b)]
    x_, r_, w_, b_ = leaves
    if rms:
        y, s = fn(x_, r_, shape, w_, eps)
    else:
        y, s = fn(x_, r_, shape, w_, b_, eps)
    torch.autograd.backward([y, s], [dy, ds])
    return (y, s), [t.grad if t is not None else None for t in leaves]


def _add_norm_reference(rms):
    def run(x, r, shape, w, *rest):
        total = x + r
        return _reference(rms, total, shape, w, *(rest if not rms else (None, rest[0]))), total
    return run


@settings(max_examples=40, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(), dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16,
                                            torch.float16]))
def test_add_norm_matches_torchs_composition(case, dtype):
    """add_layer_norm / add_rms_norm against torch's add then norm: the
    normalized output, the sum (bit-equal: torch's rounding of the add),
    and the gradients of input, residual, weight and bias with both outputs
    used."""
    torch.manual_seed(case["seed"])
    shape, normalized, rms = case["shape"], case["normalized"], case["rms"]
    x, r, dy, ds = (torch.randn(shape, dtype=torch.float64).to(dtype) for _ in range(4))
    w = (torch.rand(normalized, dtype=torch.float64) + 0.5).to(dtype) if case["weight"] else None
    b = torch.randn(normalized, dtype=torch.float64).to(dtype) if case["bias"] and not rms else None
    ours = NF.add_rms_norm if rms else NF.add_layer_norm
    (y, s), g = _add_norm_grads(ours, rms, x, r, normalized, w, b, case["eps"], dy, ds)
    assert torch.equal(s, x + r)
    # The reference in float64 from the sum as the dtype rounds it.
    s64 = (x + r).double()
    up = [t.double() if t is not None else None for t in (w, b, dy, ds)]
    (y_ref, _), g_ref = _add_norm_grads(_add_norm_reference(rms), rms, s64, torch.zeros_like(s64),
                                        normalized, up[0], up[1], case["eps"], up[2], up[3])
    assert_close(y, y_ref, dtype)
    for name, actual, expected in zip(("input", "residual", "weight", "bias"), g,
                                      [g_ref[0], g_ref[0]] + g_ref[2:]):
        assert_close(actual, expected, dtype, factor=4 if dtype != torch.float64 else 1,
                     msg=f"grad {name}")


class _BackwardCalls(TorchDispatchMode):
    """Records whether each layer_norm_backward call got a grad_sum, and the in-place adds."""

    def __init__(self):
        super().__init__()
        self.grad_sum_given, self.adds = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.normext.layer_norm_backward.default:
            self.grad_sum_given.append(len(args) > 8 and args[8] is not None
                                       or kwargs.get("grad_sum") is not None)
        elif func is torch.ops.aten.add_.Tensor:
            self.adds += 1
        return func(*args, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("sum_grad", ["dense", "transposed", "expanded", "none"])
def test_add_norm_sum_gradient_of_any_layout(sum_grad, dtype):
    """The sum's gradient joins the input's in the backward kernel where it is
    contiguous, and is added after it otherwise (an expanded gradient, as from
    sum.sum(), or a transposed one) or not at all (the sum unused): each path
    taken where expected, with torch's gradients in float64."""
    torch.manual_seed(0)
    x, r, dy = (torch.randn(6, 40, dtype=torch.float64).to(dtype) for _ in range(3))
    w = (torch.rand(40, dtype=torch.float64) + 0.5).to(dtype)
    b = torch.randn(40, dtype=torch.float64).to(dtype)
    ds = {"dense": torch.randn(6, 40, dtype=torch.float64).to(dtype),
          "transposed": torch.randn(40, 6, dtype=torch.float64).to(dtype).t(),
          "expanded": torch.tensor(2.5, dtype=dtype).expand(6, 40),
          "none": None}[sum_grad]
    grads = []
    for fn, type_ in ((NF.add_layer_norm, dtype), (_add_norm_reference(False), torch.float64)):
        leaves = [t.to(type_, copy=True).requires_grad_() for t in (x, r, w, b)]
        y, s = fn(leaves[0], leaves[1], [40], *leaves[2:], 1e-5)
        outputs, out_grads = [y], [dy.to(type_)]
        if ds is not None:
            outputs.append(s)
            out_grads.append(ds.to(type_))
        calls = _BackwardCalls()
        with calls:
            torch.autograd.backward(outputs, out_grads)
        grads.append([t.grad for t in leaves])
        if fn is NF.add_layer_norm:
            assert calls.grad_sum_given == [sum_grad == "dense"]
            assert calls.adds == (sum_grad in ("transposed", "expanded"))
    for actual, expected in zip(*grads):
        assert_close(actual, expected, dtype, factor=4)


def test_add_norm_modules_gradgradcheck_and_compile():
    torch.manual_seed(0)
    for cls, reference in ((normext.AddLayerNorm, torch.nn.LayerNorm),
                           (normext.AddRMSNorm, torch.nn.RMSNorm)):
        layer, theirs = cls(6), reference(6)
        assert isinstance(layer, reference)
        layer.load_state_dict(theirs.state_dict(), strict=True)
        x, r = torch.randn(4, 6), torch.randn(4, 6)
        y, s = layer(x, r)
        assert_close(y, theirs(x + r))
        assert torch.equal(s, x + r)
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
        xc = x.clone().requires_grad_()
        yc, sc = compiled(xc, r)
        (yc.sum() + sc.square().sum()).backward()
        xe = x.clone().requires_grad_()
        ye, se = layer(xe, r)
        (ye.sum() + se.square().sum()).backward()
        assert_close(xc.grad, xe.grad)
        x64 = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
        r64 = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
        w64 = (torch.rand(5, dtype=torch.float64) + 0.5).requires_grad_()
        fn = ((lambda a, b, c: NF.add_rms_norm(a, b, [5], c, 1e-5)) if cls is normext.AddRMSNorm
              else (lambda a, b, c: NF.add_layer_norm(a, b, [5], c, None, 1e-5)))
        assert torch.autograd.gradcheck(fn, (x64, r64, w64))
        assert torch.autograd.gradgradcheck(fn, (x64, r64, w64))

"""normext.GroupNorm / InstanceNorm1d/2d/3d and their functionals against
torch.nn: outputs, input and parameter gradients and running statistics in
float64 and per dtype, over hypothesis-drawn shapes, layouts and flags;
gradcheck and gradgradcheck; errors; state_dict; convert; compile; the
output's memory format; determinism at any thread count."""

import copy
import io
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import normext
from normext import functional as NF
from conftest import EDGE_RTOL, SMOOTH_EDGE_VALUES, assert_close

F = torch.nn.functional

_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


def _in_layout(x, layout):
    if layout == "channels_last" and x.dim() in _FORMATS:
        return x.contiguous(memory_format=_FORMATS[x.dim()])
    if layout == "strided":
        return torch.cat([x, x], dim=-1)[..., ::2]
    return x.contiguous()


def _torch_group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
    """F.group_norm as the reference; torch 2.11's backward fails ("tensor does
    not have a device") for a bias without a weight, so the weight is ones there."""
    if weight is None and bias is not None:
        weight = torch.ones_like(bias)
    return F.group_norm(x, num_groups, weight, bias, eps)


def _grads(fn, x, w, b, dy, **kwargs):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    x_, w_, b_ = leaves
    y = fn(x_, weight=w_, bias=b_, **kwargs)
    y.backward(dy)
    return y, [t.grad if t is not None else None for t in leaves]


def _assert_grads_close(grads, grads64, torch_grads, dtype):
    """Gradients (input, weight, bias) against float64 with dtype's
    tolerances, or, where a draw is ill-conditioned (a group of one element
    per sample: its x - mean is 0, its rstd up to eps^-1/2, which multiplies
    the rounding of a gradient that should cancel to 0), no further from
    float64 than twice torch's own in dtype (torch_grads(): computed then)."""
    for i, (name, actual, expected) in enumerate(zip(("input", "weight", "bias"), grads, grads64)):
        try:
            assert_close(actual, expected, dtype, factor=4 if dtype != torch.float64 else 1,
                         msg=f"grad {name}")
        except AssertionError:
            if dtype == torch.float64:
                raise
            theirs = torch_grads()[i]
            ours_error = (actual.double() - expected).abs().max().item()
            torch_error = (theirs.double() - expected).abs().max().item()
            assert ours_error <= 2 * torch_error, (name, ours_error, torch_error)


@st.composite
def group_cases(draw):
    groups = draw(st.integers(1, 4))
    channels = groups * draw(st.integers(1, 4))
    spatial = draw(st.lists(st.integers(1, 9), min_size=0, max_size=3))
    batch = draw(st.integers(1, 4))
    if batch * channels // groups * torch.Size(spatial).numel() == 1:
        batch = 2  # torch wants more than one value per group
    return dict(shape=[batch, channels] + spatial, groups=groups, weight=draw(st.booleans()),
                bias=draw(st.booleans()), eps=draw(st.sampled_from([1e-5, 1e-2])),
                layout=draw(st.sampled_from(["contiguous", "channels_last", "strided"])),
                seed=draw(st.integers(0, 2**16)))


def _inputs(shape, channels, case, dtype):
    torch.manual_seed(case["seed"])
    x = torch.randn(shape, dtype=torch.float64) * 3 + 1
    w = torch.rand(channels, dtype=torch.float64) + 0.5 if case["weight"] else None
    b = torch.randn(channels, dtype=torch.float64) if case["bias"] else None
    dy = torch.randn(shape, dtype=torch.float64)
    cast = [t.to(dtype) if t is not None else None for t in (x, w, b, dy)]
    cast[0] = _in_layout(cast[0], case["layout"])
    # The reference in float64 from the (exactly) upcast inputs.
    ref = [t.to(torch.float64) if t is not None else None for t in cast]
    return cast, ref


def _compare_group_norm(case, dtype):
    shape, groups = case["shape"], case["groups"]
    cast, ref = _inputs(shape, shape[1], case, dtype)
    kwargs = dict(num_groups=groups, eps=case["eps"])
    y_ref, g_ref = _grads(_torch_group_norm, *ref, **kwargs)
    y, g = _grads(NF.group_norm, *cast, **kwargs)
    assert y.dtype == dtype and y.shape == cast[0].shape
    assert_close(y, y_ref, dtype)
    _assert_grads_close(g, g_ref, lambda: _grads(_torch_group_norm, *cast, **kwargs)[1], dtype)


@settings(max_examples=60, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=group_cases())
def test_group_norm_matches_torch_float64(case):
    _compare_group_norm(case, torch.float64)


@settings(max_examples=40, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=group_cases(), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_group_norm_matches_torch_per_dtype(case, dtype):
    _compare_group_norm(case, dtype)


@st.composite
def instance_cases(draw):
    channels = draw(st.integers(1, 5))
    spatial = draw(st.lists(st.integers(1, 9), min_size=1, max_size=3))
    if torch.Size(spatial).numel() == 1:
        spatial = spatial + [2]  # torch wants more than one spatial element in training
    return dict(shape=[draw(st.integers(1, 4)), channels] + spatial, weight=draw(st.booleans()),
                bias=draw(st.booleans()), running=draw(st.booleans()),
                use_input_stats=draw(st.booleans()), momentum=draw(st.sampled_from([0.1, 0.5])),
                eps=draw(st.sampled_from([1e-5, 1e-2])),
                layout=draw(st.sampled_from(["contiguous", "channels_last", "strided"])),
                seed=draw(st.integers(0, 2**16)))


def _compare_instance_norm(case, dtype):
    shape = case["shape"]
    channels = shape[1]
    cast, ref = _inputs(shape, channels, case, dtype)
    running = case["running"] or not case["use_input_stats"]
    stat_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    stats = [torch.randn(channels, dtype=stat_dtype), torch.rand(channels, dtype=stat_dtype) + 0.5]
    ref_stats = [s.double() for s in stats] if running else [None, None]
    our_stats = [s.clone() for s in stats] if running else [None, None]
    kwargs = dict(use_input_stats=case["use_input_stats"], momentum=case["momentum"],
                  eps=case["eps"])
    y_ref, g_ref = _grads(F.instance_norm, *ref, running_mean=ref_stats[0],
                          running_var=ref_stats[1], **kwargs)
    y, g = _grads(NF.instance_norm, *cast, running_mean=our_stats[0],
                  running_var=our_stats[1], **kwargs)
    assert y.dtype == dtype and y.shape == cast[0].shape
    assert_close(y, y_ref, dtype)
    for name, actual, expected in zip(("input", "weight", "bias"), g, g_ref):
        assert_close(actual, expected, dtype, factor=4 if dtype != torch.float64 else 1,
                     msg=f"grad {name}")
    for name, actual, expected in zip(("running_mean", "running_var"), our_stats, ref_stats):
        assert_close(actual, expected, dtype, msg=name)


@settings(max_examples=60, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=instance_cases())
def test_instance_norm_matches_torch_float64(case):
    _compare_instance_norm(case, torch.float64)


@settings(max_examples=40, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=instance_cases(), dtype=st.sampled_from([torch.float32, torch.bfloat16,
                                                     torch.float16]))
def test_instance_norm_matches_torch_per_dtype(case, dtype):
    _compare_instance_norm(case, dtype)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape,groups", [((3, 64, 33, 35), 32), ((2, 32, 70, 70), 8),
                                          ((5, 6, 4, 3, 5), 3), ((4, 4096, 2, 2), 64),
                                          ((2, 64, 64, 66), 32)])
def test_group_norm_larger_shapes(shape, groups, layout):
    """Groups over one reduction block (kBlockElements), many channels per
    row, and channels-last samples over 1 MiB (normalized after every
    sample's statistics, not sample by sample: forward.cpp's
    kCachedSampleBytes), float32 against torch; the output keeps the input's
    memory format."""
    torch.manual_seed(0)
    x = _in_layout(torch.randn(shape), layout)
    dy = _in_layout(torch.randn(shape), layout)
    w, b = torch.rand(shape[1]) + 0.5, torch.randn(shape[1])
    y_ref, g_ref = _grads(_torch_group_norm, x, w, b, dy, num_groups=groups)
    y, g = _grads(NF.group_norm, x, w, b, dy, num_groups=groups)
    assert y.stride() == y_ref.stride()
    assert_close(y, y_ref)
    for actual, expected in zip(g, g_ref):
        assert_close(actual, expected, factor=4)


def test_gradcheck_and_gradgradcheck():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 3, 2, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(6, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    for layout in ("contiguous", "channels_last"):
        xl = _in_layout(x.detach(), layout).requires_grad_()
        for fn in (lambda *a: NF.group_norm(a[0], 3, a[1], a[2]),
                   lambda *a: NF.instance_norm(a[0], weight=a[1], bias=a[2])):
            assert torch.autograd.gradcheck(fn, (xl, w, b))
            assert torch.autograd.gradgradcheck(fn, (xl, w, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_mean_and_fp16_near_its_maximum(dtype, layout):
    """1e4 + randn (float16: values up to 65000) against float64 from the same
    inputs: within the tolerances, and no worse than torch in the same dtype."""
    torch.manual_seed(0)
    if dtype == torch.float16:
        x = (torch.rand(4, 8, 10, 10, dtype=torch.float64) * 2 - 1) * 65000
    else:
        x = 1e4 + torch.randn(4, 8, 10, 10, dtype=torch.float64)
    x = _in_layout(x.to(dtype), layout)
    w, b = (torch.rand(8) + 0.5).to(dtype), torch.randn(8).to(dtype)
    for ours, theirs in ((NF.group_norm, F.group_norm), (NF.instance_norm, F.instance_norm)):
        args = dict(num_groups=2) if ours is NF.group_norm else {}
        y = ours(x, weight=w, bias=b, **args)
        expected = theirs(x.double(), weight=w.double(), bias=b.double(), **args)
        reference = theirs(x, weight=w, bias=b, **args)
        assert torch.isfinite(y).all()
        assert_close(y, expected, dtype, factor=100 if dtype == torch.float32 else 1)
        error = (y.double() - expected).abs().max()
        assert error <= (reference.double() - expected).abs().max() * 1.01


def test_bfloat16_input_with_float32_parameters():
    torch.manual_seed(0)
    x = torch.randn(3, 8, 5, 5).bfloat16()
    w, b = torch.rand(8) + 0.5, torch.randn(8)
    y = NF.group_norm(x, 4, w, b)
    expected = F.group_norm(x, 4, w, b)
    assert y.dtype == expected.dtype
    assert_close(y, expected.double(), torch.bfloat16)


def test_empty_batch():
    x = torch.randn(0, 4, 3, requires_grad=True)
    y = NF.group_norm(x, 2)
    assert y.shape == (0, 4, 3)
    y.sum().backward()
    assert x.grad.shape == (0, 4, 3)


def _error(fn):
    with pytest.raises(Exception) as info:
        fn()
    return type(info.value), str(info.value)


@pytest.mark.parametrize("case", [
    ("channels not divisible", lambda f: f.group_norm(torch.randn(2, 6, 3), 4)),
    ("zero groups", lambda f: f.group_norm(torch.randn(2, 6, 3), 0)),
    ("weight size", lambda f: f.group_norm(torch.randn(2, 6, 3), 3, torch.ones(5))),
    ("one dim", lambda f: f.group_norm(torch.randn(6), 3)),
    ("one value per group", lambda f: f.group_norm(torch.randn(1, 6), 6)),
    ("integer input", lambda f: f.group_norm(torch.ones(2, 6, 3, dtype=torch.long), 3)),
    ("instance one spatial element", lambda f: f.instance_norm(torch.randn(2, 3, 1))),
    ("instance weight size", lambda f: f.instance_norm(torch.randn(2, 3, 4), weight=torch.ones(4))),
    ("instance no running stats in eval",
     lambda f: f.instance_norm(torch.randn(2, 3, 4), use_input_stats=False)),
    ("instance integer input", lambda f: f.instance_norm(torch.ones(2, 3, 4, dtype=torch.long))),
], ids=lambda case: case[0])
def test_bad_input_raises_torchs_error(case):
    _, fn = case
    assert _error(lambda: fn(NF)) == _error(lambda: fn(F))


def test_op_checks_raise_runtime_error():
    with pytest.raises(RuntimeError, match="divisible by num_groups"):
        normext.ops.group_norm_forward(torch.randn(2, 6, 3), 4, None, None, 1e-5)
    with pytest.raises(RuntimeError, match="expected mean and rstd"):
        normext.ops.group_norm_backward(torch.randn(2, 6, 3), torch.randn(2, 6, 3), 3,
                                        torch.zeros(5), torch.ones(6), None, None,
                                        [True, False, False])


def _check_drop_in(ours, theirs, x):
    with torch.no_grad():
        for p in theirs.parameters():
            p.uniform_(0.5, 1.5)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert repr(ours).split("(", 1)[1] == repr(theirs).split("(", 1)[1]
    for training in (True, False, True):
        ours.train(training)
        theirs.train(training)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), theirs(xb)
        assert_close(ya, yb)
        ya.square().sum().backward()
        yb.square().sum().backward()
        assert_close(xa.grad, xb.grad)
        for (name, pa), (_, pb) in zip(ours.named_parameters(), theirs.named_parameters()):
            assert_close(pa.grad, pb.grad, factor=4, msg=name)
        for (name, ba), (_, bb) in zip(ours.named_buffers(), theirs.named_buffers()):
            assert_close(ba, bb, msg=name)


@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_module_is_a_drop_in(affine):
    torch.manual_seed(0)
    ours, theirs = normext.GroupNorm(3, 6, affine=affine), torch.nn.GroupNorm(3, 6, affine=affine)
    assert isinstance(ours, torch.nn.GroupNorm)
    _check_drop_in(ours, theirs, torch.randn(4, 6, 5, 5))


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("kwargs", [{}, dict(affine=True), dict(track_running_stats=True),
                                    dict(affine=True, track_running_stats=True, momentum=None)])
def test_instance_norm_modules_are_drop_ins(dims, kwargs):
    torch.manual_seed(0)
    name = f"InstanceNorm{dims}d"
    ours, theirs = getattr(normext, name)(4, **kwargs), getattr(torch.nn, name)(4, **kwargs)
    assert isinstance(ours, getattr(torch.nn, name))
    _check_drop_in(ours, theirs, torch.randn((3, 4) + (5,) * dims))
    # unbatched input
    _check_drop_in(ours, theirs, torch.randn((4,) + (5,) * dims))


def test_lazy_instance_norm_becomes_normext():
    layer = normext.LazyInstanceNorm2d(affine=True, track_running_stats=True)
    reference = torch.nn.InstanceNorm2d(3, affine=True, track_running_stats=True)
    x = torch.randn(2, 3, 4, 4)
    y = layer(x)
    assert type(layer) is normext.InstanceNorm2d
    assert_close(y, reference(x))
    assert_close(layer.running_var, reference.running_var)


def test_convert_includes_group_and_instance_norm():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(4, 8),
                                torch.nn.InstanceNorm2d(8, affine=True),
                                torch.nn.Sequential(torch.nn.InstanceNorm1d(8)))
    state = copy.deepcopy(model.state_dict())
    only_gn = normext.convert(copy.deepcopy(model), include=(torch.nn.GroupNorm,))
    assert type(only_gn[1]) is normext.GroupNorm and type(only_gn[2]) is torch.nn.InstanceNorm2d
    converted = normext.convert(model)
    assert [type(m) for m in (converted[1], converted[2], converted[3][0])] == [
        normext.GroupNorm, normext.InstanceNorm2d, normext.InstanceNorm1d]
    converted.load_state_dict(state, strict=True)
    assert converted.state_dict().keys() == state.keys()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_compile_fullgraph(layout):
    torch.manual_seed(0)
    model = torch.nn.Sequential(normext.GroupNorm(2, 8),
                                normext.InstanceNorm2d(8, affine=True, track_running_stats=True))
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = _in_layout(torch.randn(2, 8, 5, 5), layout)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = compiled(xa), reference(xb)
    assert_close(ya, yb)
    ya.sum().backward()
    yb.sum().backward()
    assert_close(xa.grad, xb.grad)
    assert_close(model[0].weight.grad, reference[0].weight.grad, factor=4)
    assert_close(model[1].running_var, reference[1].running_var)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("activation", ["identity", "silu"])
def test_bit_identical_at_any_thread_count(num_threads, layout, activation):
    torch.manual_seed(0)
    x = _in_layout(torch.randn(4, 64, 40, 40), layout)
    dy = _in_layout(torch.randn(4, 64, 40, 40), layout)
    w, b = torch.rand(64) + 0.5, torch.randn(64)
    results = []
    for threads in (1, 2, 3, 8):
        num_threads(threads)
        results.append(_grads(NF.group_norm_act, x, w, b, dy, num_groups=8,
                              activation=activation))
    for y, grads in results[1:]:
        assert torch.equal(y, results[0][0])
        for a, e in zip(grads, results[0][1]):
            assert torch.equal(a, e)


def test_convert_timm_norm_layers(tmp_path):
    """timm's norm layers under other names run normext's kernels after
    convert, with timm's classes (isinstance), attributes and state_dict."""
    timm = pytest.importorskip("timm")
    layers = timm.layers
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        layers.LayerNorm2d(8), layers.GroupNormAct(8, num_groups=4, act_layer=torch.nn.SiLU),
        layers.GroupNorm(8, num_groups=2), layers.GroupNorm1(8), torch.nn.Flatten(2),
        layers.LayerNorm(25), layers.RmsNorm(25))
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for p in reference.parameters():
            p.uniform_(0.5, 1.5)
    model.load_state_dict(reference.state_dict())
    only = normext.convert(copy.deepcopy(model), include=(layers.LayerNorm2d,))
    assert type(only[0]) is not layers.LayerNorm2d and type(only[1]) is layers.GroupNormAct
    converted = normext.convert(model)
    for ours, theirs in zip(converted, reference):
        assert isinstance(ours, type(theirs))
        if not isinstance(theirs, torch.nn.Flatten):
            assert type(ours) is not type(theirs) and type(ours).__module__ == "normext.convert"
    converted.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(3, 8, 5, 5)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = converted(xa), reference(xb)
    assert_close(ya, yb)
    ya.square().sum().backward()
    yb.square().sum().backward()
    assert_close(xa.grad, xb.grad, factor=4)
    for (name, pa), (_, pb) in zip(converted.named_parameters(), reference.named_parameters()):
        assert_close(pa.grad, pb.grad, factor=4, msg=name)
    # a converted model pickles (torch.save) and loads, in this process and in a fresh one
    buffer = io.BytesIO()
    torch.save(converted, buffer)
    assert_close(torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)(x), ya)
    path = tmp_path / "converted.pt"
    path.write_bytes(buffer.getvalue())
    code = (f"import torch; m = torch.load({str(path)!r}, weights_only=False); "
            "print(type(m[0]).__module__, type(m[0]).__name__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.split() == ["normext.convert", "LayerNorm2d"]
    with torch.profiler.profile() as prof:
        converted(x)
    calls = {e.name for e in prof.events() if e.name.startswith("normext::")}
    assert calls == {"normext::layer_norm_forward", "normext::group_norm_forward"}
    assert "aten::silu" not in {e.name for e in prof.events()}  # fused into GroupNormAct


_ACTIVATIONS = {
    "identity": lambda z: z, "relu": F.relu, "relu6": F.relu6,
    "leaky_relu": lambda z: F.leaky_relu(z, 0.2), "elu": lambda z: F.elu(z, 0.7), "silu": F.silu,
}


@settings(max_examples=50, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=group_cases(), activation=st.sampled_from(sorted(_ACTIVATIONS)),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]))
def test_group_norm_act_matches_torchs_composition(case, activation, dtype):
    """group_norm_act against torch's activation of torch's group_norm, in
    float64 from the same inputs: output and every gradient."""
    shape, groups = case["shape"], case["groups"]
    cast, ref = _inputs(shape, shape[1], case, dtype)
    act = _ACTIVATIONS[activation]
    extra = dict(negative_slope=0.2) if activation == "leaky_relu" else (
        dict(alpha=0.7) if activation == "elu" else {})

    def theirs(x, weight, bias):
        return act(_torch_group_norm(x, groups, weight, bias, case["eps"]))

    def ours(x, weight, bias):
        return NF.group_norm_act(x, groups, weight, bias, case["eps"], activation, **extra)

    y_ref, g_ref = _grads(theirs, *ref)
    y, g = _grads(ours, *cast)
    assert y.stride() == y_ref.stride()
    assert_close(y, y_ref, dtype)
    _assert_grads_close(g, g_ref, lambda: _grads(theirs, *cast)[1], dtype)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("activation", ["identity", "silu", "elu"])
@pytest.mark.parametrize("shape,groups", [((2, 8, 30, 20), 4), ((2, 600, 2, 3), 30),
                                          ((3, 40, 5, 5), 8)])
def test_group_norm_act_float16_across_tiles(shape, groups, activation, layout):
    """float16 runs through float tiles of 512 elements (csrc/common/cpu/loops.h:
    for_each_tile): runs of 600, channels-last rows of 600 and of 40 channels,
    output and every gradient against torch's composition in float64."""
    case = dict(seed=0, weight=True, bias=True, layout=layout)
    cast, ref = _inputs(shape, shape[1], case, torch.float16)
    act = _ACTIVATIONS[activation]
    extra = dict(alpha=0.7) if activation == "elu" else {}
    y_ref, g_ref = _grads(lambda x, weight, bias: act(_torch_group_norm(x, groups, weight, bias)),
                          *ref)
    y, g = _grads(lambda x, weight, bias: NF.group_norm_act(x, groups, weight, bias, 1e-5,
                                                             activation, **extra), *cast)
    assert y.dtype == torch.float16 and y.stride() == y_ref.stride()
    assert_close(y, y_ref, torch.float16)
    for name, actual, expected in zip(("input", "weight", "bias"), g, g_ref):
        assert_close(actual, expected, torch.float16, factor=4, msg=f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 64, 9, 10), (1, 64, 128, 129)],
                         ids=["dz kept", "dz twice"])
def test_group_norm_act_channels_last_backward_both_ways(shape, dtype):
    """Channels-last through an activation: a sample's dz kept in a buffer, or
    computed in both passes for a sample over the buffer's cap
    (group_norm/cpu/backward.cpp: kSampleDzBytes); output and every gradient
    against torch's composition in float64."""
    case = dict(seed=0, weight=True, bias=True, layout="channels_last")
    cast, ref = _inputs(shape, shape[1], case, dtype)
    y_ref, g_ref = _grads(lambda x, weight, bias: F.silu(_torch_group_norm(x, 16, weight, bias)),
                          *ref)
    y, g = _grads(lambda x, weight, bias: NF.group_norm_act(x, 16, weight, bias, 1e-5, "silu"),
                  *cast)
    assert y.stride() == y_ref.stride()
    assert_close(y, y_ref, dtype)
    for name, actual, expected in zip(("input", "weight", "bias"), g, g_ref):
        assert_close(actual, expected, dtype, factor=4, msg=f"grad {name}")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_norm_silu_at_edges_matches_torch(dtype, layout):
    """GroupNorm + SiLU where SiLU's exp overflows or underflows, at the
    infinities and NaN: a zero weight makes the activation's input the bias,
    one edge value per channel. torch's output, bias and weight gradients in
    float32 from the same inputs (0, -0, NaN and inf where torch has them),
    over runs of 35 and rows of 17 channels, which end in a partial vector
    (common/cpu/vector_silu.h)."""
    bias = torch.tensor(SMOOTH_EDGE_VALUES, dtype=dtype)
    channels = bias.numel()
    x = _in_layout(torch.randn(2, channels, 5, 7, dtype=dtype), layout)
    dy = torch.randn_like(x)
    results = []
    # torch's reference from contiguous data: torch 2.11's channels-last
    # GroupNorm backward crashes on these values (a segfault; fixed by 2.14)
    for fn, inputs in (
            (lambda *a: F.silu(F.group_norm(*a)),
             (x.float().contiguous(), dy.float().contiguous(), bias.float())),
            (lambda *a: NF.group_norm_act(*a, "silu"), (x, dy, bias))):
        weight = torch.zeros(channels, dtype=inputs[2].dtype, requires_grad=True)
        b = inputs[2].clone().requires_grad_()
        y = fn(inputs[0], channels, weight, b, 1e-5)
        results.append((y, *torch.autograd.grad(y, (weight, b), inputs[1])))
    # atol: the bias gradient adds 70 values near 1e-37, where the other CPU variants
    # clamp exp's argument (activation.h: exp_parts)
    for want, got in zip(*results):
        got = got.float()
        torch.testing.assert_close(got, want, atol=1e-34, rtol=EDGE_RTOL[dtype] * 8,
                                   equal_nan=True)
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())


@pytest.mark.parametrize("activation", ["silu", "elu", "leaky_relu"])
def test_group_norm_act_gradcheck_and_gradgradcheck(activation):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    for layout in ("contiguous", "channels_last"):
        xl = _in_layout(x.detach(), layout).requires_grad_()

        def fn(*a):
            return NF.group_norm_act(a[0], 2, a[1], a[2], 1e-5, activation)

        assert torch.autograd.gradcheck(fn, (xl, w, b))
        assert torch.autograd.gradgradcheck(fn, (xl, w, b))


def test_group_norm_act_module_and_errors():
    torch.manual_seed(0)
    layer = normext.GroupNormAct(2, 6, activation="leaky_relu", negative_slope=0.1)
    theirs = torch.nn.GroupNorm(2, 6)
    assert isinstance(layer, torch.nn.GroupNorm)
    layer.load_state_dict(theirs.state_dict(), strict=True)
    assert repr(layer) == repr(theirs).replace("GroupNorm(", "GroupNormAct(").replace(
        ")", ", activation=leaky_relu, negative_slope=0.1)")
    x = torch.randn(3, 6, 4, 4)
    assert_close(layer(x), F.leaky_relu(theirs(x), 0.1))
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        normext.GroupNormAct(2, 6, activation="gelu")
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        NF.group_norm_act(x, 2, activation="gelu")
    compiled = torch.compile(normext.GroupNormAct(2, 6), backend="aot_eager", fullgraph=True)
    assert_close(compiled(x), F.silu(F.group_norm(x, 2)))


def test_convert_fuses_timm_group_norm_act():
    timm = pytest.importorskip("timm")
    layer = timm.layers.GroupNormAct(8, num_groups=4, act_layer=torch.nn.SiLU)
    reference = copy.deepcopy(layer)
    converted = normext.convert(layer)
    x = torch.randn(2, 8, 5, 5)
    with torch.profiler.profile() as prof:
        y = converted(x)
    names = {e.name for e in prof.events()}
    assert "normext::group_norm_forward" in names and "aten::silu" not in names
    assert_close(y, reference(x))


class _Norms(torch.nn.Module):
    """Every norm of this family: GroupNorm + SiLU, InstanceNorm (running
    stats), a channels-first LayerNorm, and add + RMSNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.group = normext.GroupNormAct(2, 4)
        self.instance = normext.InstanceNorm2d(4, affine=True, track_running_stats=True)
        self.layer = normext.LayerNorm(4)
        self.add_rms = normext.AddRMSNorm(4)

    def forward(self, x):
        y = self.instance(self.group(x))
        z = self.layer(y.permute(0, 2, 3, 1))
        out, total = self.add_rms(z, z)
        return out.sum() + total.square().sum()


def test_torch_export():
    """torch.export keeps each layer as its normext op, and the exported
    module's gradients equal the eager module's."""
    torch.manual_seed(0)
    model = _Norms().double()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    exported = torch.export.export(copy.deepcopy(model), (x,))
    targets = {node.target for node in exported.graph.nodes if node.op == "call_function"}
    ops = torch.ops.normext
    assert {ops.group_norm_forward.default, ops.layer_norm_forward.default,
            ops.add_layer_norm_forward.default} <= targets
    assert torch.ops.aten.silu.default not in targets
    module = exported.module()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = module(xa), model(xb)
    assert_close(ya, yb)
    ya.backward()
    yb.backward()
    assert_close(xa.grad, xb.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_instance_norm_running_var_of_small_and_zero_variance(dtype):
    """The running variance of instances whose variance is far below eps (or
    0: a constant channel) as torch's: computed from the input, not from rstd."""
    torch.manual_seed(0)
    x = (1e-4 * torch.randn(2, 3, 64, dtype=torch.float64)).to(dtype)
    x[:, 1] = 0.5
    ours = normext.InstanceNorm1d(3, track_running_stats=True).to(dtype)
    theirs = torch.nn.InstanceNorm1d(3, track_running_stats=True).to(dtype)
    ours(x)
    theirs(x)
    assert_close(ours.running_mean, theirs.running_mean)
    assert_close(ours.running_var, theirs.running_var, scaled=False)
    assert ours.running_var[1] == theirs.running_var[1]


def test_mixed_parameter_dtypes_raise_torchs_error():
    """A 16-bit input whose parameters mix float32 and the input's dtype:
    torch raises, and so does normext (by handing the call to torch)."""
    x = torch.randn(2, 4, 3).bfloat16()
    w, b = torch.ones(4), torch.zeros(4).bfloat16()
    assert _error(lambda: NF.group_norm(x, 2, w, b)) == _error(lambda: F.group_norm(x, 2, w, b))
    assert _error(lambda: NF.layer_norm(x, [3], w[:3], b[:3])) == _error(
        lambda: F.layer_norm(x, [3], w[:3], b[:3]))

"""normext.functional.batch_norm_act and BatchNormAct*d against torch's
composition: batch_norm, then the residual add, then the activation."""

import copy
import weakref

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import normext
from normext import ops
from normext.functional import batch_norm_act
from conftest import (EDGE_RTOL, SMOOTH_EDGE_VALUES, assert_close, assert_layout_like_torch,
                      layout_variants)

ACTIVATIONS = {
    "identity": lambda z: z,
    "relu": F.relu,
    "relu6": F.relu6,
    "leaky_relu": lambda z: F.leaky_relu(z, 0.1),
    "elu": lambda z: F.elu(z, 0.7),
    "silu": F.silu,
}
INVERTIBLE = ("identity", "leaky_relu", "elu")


def _modes(activations):
    """(activation, memory_efficient) pairs: memory_efficient for the invertible ones."""
    return [pytest.param(a, m, id=f"{a}-{'from_output' if m else 'keep_input'}")
            for a in activations for m in (False, True) if not m or a in INVERTIBLE]


def _reference(x, rm, rv, w, b, training, momentum, activation, residual):
    z = F.batch_norm(x, rm, rv, w, b, training, momentum, 1e-5)
    if residual is not None:
        z = z + residual
    return ACTIVATIONS[activation](z)


def _leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def _compare(x, w, b, residual, activation, memory_efficient, training, dtype=torch.float64,
             factor=1.0, device="cpu"):
    """Output, every gradient and the running stats against torch in float64.
    On CUDA the fused op itself runs (the layers compose there: functional.py)."""
    c = x.shape[1]
    rm, rv = torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.5
    x, w, b, residual, rm, rv = (None if t is None else t.to(device)
                                 for t in (x, w, b, residual, rm, rv))
    x_, r_ = (None if t is None else t.to(dtype) for t in (x, residual))
    if x.is_contiguous(memory_format=torch.channels_last) and x.dim() == 4:
        x_ = x_.contiguous(memory_format=torch.channels_last)
    params = (w, b) if dtype == torch.float64 else (
        None if w is None else w.float(), None if b is None else b.float())
    xa, ra, wa, ba = _leaves(x_, r_, *params)
    rma = rm.clone() if dtype == torch.float64 else rm.float()
    rva = rv.clone() if dtype == torch.float64 else rv.float()
    if device == "cpu":
        out = batch_norm_act(xa, rma, rva, wa, ba, training, 0.1, 1e-5, activation, 0.1, 0.7, ra,
                             memory_efficient)
    else:
        out = torch.ops.normext.batch_norm_act(xa, wa, ba, rma, rva, training, 0.1, 1e-5,
                                               activation, 0.1, 0.7, ra, memory_efficient)
    xr, rr, wr, br = _leaves(x_.double(), None if r_ is None else r_.double(), w, b)
    rmr, rvr = rm.clone(), rv.clone()
    expected = _reference(xr, rmr, rvr, wr, br, training, 0.1, activation, rr)
    assert out.dtype == dtype and out.shape == x.shape
    assert_layout_like_torch(out, expected, x_)
    assert_close(out, expected, dtype, factor=factor)
    grad = torch.randn_like(expected)
    inputs = [t for t in (xa, ra, wa, ba) if t is not None]
    refs = [t for t in (xr, rr, wr, br) if t is not None]
    for got, want in zip(torch.autograd.grad(out, inputs, grad.to(dtype)),
                         torch.autograd.grad(expected, refs, grad)):
        assert_close(got, want, dtype, factor=factor * 4)
    assert_close(rma, rmr, dtype)
    assert_close(rva, rvr, dtype)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("activation,memory_efficient", _modes(ACTIVATIONS))
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_matches_torch_float64(layout, activation, residual, memory_efficient, training, device):
    x = layout_variants(torch.randn(4, 6, 5, 3, dtype=torch.float64) * 2 + 1)[layout]
    w = torch.randn(6, dtype=torch.float64)
    w = torch.where(w.abs() < 0.2, w.sign() * 0.2 + 0.1, w)
    r = torch.randn(4, 6, 5, 3, dtype=torch.float64) if residual else None
    _compare(x, w, torch.randn(6, dtype=torch.float64), r, activation, memory_efficient,
             training, device=device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("activation,memory_efficient",
                         _modes(["relu", "leaky_relu", "elu", "silu"]))
def test_matches_torch_per_dtype(dtype, layout, activation, memory_efficient, device):
    x = layout_variants(torch.randn(8, 20, 7, 5, dtype=torch.float64))[layout]
    w = torch.rand(20, dtype=torch.float64) + 0.5
    r = torch.randn(8, 20, 7, 5, dtype=torch.float64)
    # memory_efficient recovers x - mean from the rounded output: its error is
    # the output's rounding times (|z| + |bias| + |residual|) / |weight|.
    factor = 4.0 if memory_efficient and dtype != torch.float32 else 1.0
    _compare(x, w, torch.randn(20, dtype=torch.float64) * 0.5, r, activation, memory_efficient,
             True, dtype, factor, device)


@pytest.mark.parametrize("dtype,shape,layout", [
    (torch.float32, (4, 3, 150, 150), "contiguous"),      # long runs, a tail of 4
    (torch.bfloat16, (4, 3, 150, 150), "contiguous"),
    (torch.float32, (64, 24, 13, 13), "contiguous"),      # short runs
    (torch.float32, (2, 1603, 9, 9), "channels_last"),    # rows in groups (over 1536 channels)
    (torch.bfloat16, (2, 1603, 9, 9), "channels_last"),   # 16-bit lanes and their tail
    (torch.float32, (8, 200, 13, 13), "channels_last"),   # rows one at a time
], ids=str)
@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_residual_gradient_written_by_the_reduction(dtype, shape, layout, activation):
    """On the CPU the backward with a residual writes dz (the residual's
    gradient) in its reduction, and the input gradient's pass reads it back:
    every element, on each of the reduction's paths, also where the output
    cache hands back blocks that hold NaNs from an earlier call."""
    x64 = layout_variants(torch.randn(shape, dtype=torch.float64))[layout]
    c = shape[1]
    w64, b64 = torch.rand(c, dtype=torch.float64) + 0.5, torch.randn(c, dtype=torch.float64)
    r64 = torch.randn_like(x64)
    grad64 = torch.randn_like(x64)
    xa, ra, wa, ba = _leaves(x64.to(dtype), r64.to(dtype), w64.float(), b64.float())

    def grads():
        out = batch_norm_act(xa, None, None, wa, ba, True, 0.1, 1e-5, activation, residual=ra)
        return torch.autograd.grad(out, (xa, ra, wa, ba), grad64.to(dtype))

    for g in grads():
        g.fill_(float("nan"))  # freed into the cache with NaNs in them
    got = grads()
    # From the inputs as rounded to dtype: ReLU's derivative flips where rounding moves z past 0.
    xr, rr, wr, br = _leaves(xa.double(), ra.double(), wa.double(), ba.double())
    expected = _reference(xr, None, None, wr, br, True, 0.1, activation, rr)
    for g, want in zip(got, torch.autograd.grad(expected, (xr, rr, wr, br),
                                                grad64.to(dtype).double())):
        assert_close(g, want, dtype, factor=4.0)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 4), c=st.integers(1, 9), spatial=st.lists(st.integers(1, 5), max_size=2),
       activation=st.sampled_from(list(ACTIVATIONS)), residual=st.booleans(),
       memory_efficient=st.booleans(), affine=st.booleans(), channels_last=st.booleans())
def test_random_shapes(n, c, spatial, activation, residual, memory_efficient, affine,
                       channels_last):
    shape = (n, c, *spatial)
    if n * max(1, torch.Size(spatial).numel()) < 2:
        n, shape = 2, (2, c, *spatial)
    memory_efficient = memory_efficient and activation in INVERTIBLE
    x = torch.randn(shape, dtype=torch.float64)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.rand(c, dtype=torch.float64) + 0.5 if affine else None
    b = torch.randn(c, dtype=torch.float64) if affine else None
    r = torch.randn(shape, dtype=torch.float64) if residual else None
    _compare(x, w, b, r, activation, memory_efficient, True)


@pytest.mark.parametrize("activation", ["leaky_relu", "elu", "identity"])
def test_memory_efficient_is_exact_for_zero_and_tiny_weights(activation, device):
    """A weight too small to invert makes the layer keep its input for that call."""
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    w = torch.tensor([1.0, 0.0, 1e-9], dtype=torch.float64)
    _compare(x, w, torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64), None, activation, True,
             True, device=device)


def test_memory_efficient_elu_saturated_outputs_stay_finite():
    """fp16 elu outputs saturated at -alpha cannot be inverted; the gradients
    stay finite (no 0 * inf) and those of the other elements accurate."""
    x = torch.randn(64, 4, 8, dtype=torch.float64)
    x[0, :, 0] = -40.0  # z far below log(eps of float16)
    xa = x.half().requires_grad_()
    w = torch.ones(4, requires_grad=True)
    out = batch_norm_act(xa, None, None, w, None, True, activation="elu", memory_efficient=True)
    out.backward(torch.ones_like(out))
    assert torch.isfinite(xa.grad).all() and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("memory_efficient", [False, True])
def test_memory_efficient_keeps_the_output_not_the_input(memory_efficient):
    """The input is freed once its other users are done (the previous layer
    keeps the output anyway); it is never overwritten."""
    x0 = torch.randn(8, 4, 6, 6, requires_grad=True)
    x = x0 * 2
    kept = weakref.ref(x)
    copy_of_x = x.detach().clone()
    out = batch_norm_act(x, None, None, torch.ones(4, requires_grad=True), None, True,
                         activation="leaky_relu", memory_efficient=memory_efficient)
    assert torch.equal(x, copy_of_x)
    del x
    assert (kept() is None) == memory_efficient
    out.sum().backward()
    assert torch.isfinite(x0.grad).all()


def test_errors():
    x = torch.randn(4, 3, 5)
    with pytest.raises(ValueError, match="invertible activation"):
        batch_norm_act(x, None, None, training=True, activation="relu", memory_efficient=True)
    with pytest.raises(ValueError, match="invertible activation"):
        normext.BatchNormAct1d(3, activation="leaky_relu", negative_slope=0.0,
                               memory_efficient=True)
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        batch_norm_act(x, None, None, training=True, activation="gelu")
    with pytest.raises(RuntimeError, match="residual of shape"):
        batch_norm_act(x, None, None, training=True, residual=torch.randn(4, 3, 4))
    with pytest.raises(RuntimeError, match="residual"):
        batch_norm_act(x, None, None, training=True, residual=torch.randn(4, 3, 5).double())
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        batch_norm_act(torch.randn(1, 3), None, None, training=True)
    with pytest.raises(NotImplementedError):
        batch_norm_act(torch.ones(4, 3, dtype=torch.int64), None, None, training=True)


@pytest.mark.parametrize("activation", ["relu", "silu", "elu", "leaky_relu"])
def test_gradcheck_and_gradgradcheck(activation):
    x = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)

    def fn(x, r, w, b):
        return batch_norm_act(x, None, None, w, b, True, activation=activation, residual=r)

    assert torch.autograd.gradcheck(fn, (x, r, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, r, w, b))


def test_double_backward_through_memory_efficient_raises():
    x = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    out = batch_norm_act(x, None, None, training=True, activation="elu",
                         memory_efficient=True)
    with pytest.raises(NotImplementedError, match="memory_efficient=False"):
        torch.autograd.grad(out.square().sum(), x, create_graph=True)


@pytest.mark.parametrize("cls,torch_cls,shape", [
    (normext.BatchNormAct1d, torch.nn.BatchNorm1d, (6, 4, 5)),
    (normext.BatchNormAct2d, torch.nn.BatchNorm2d, (3, 4, 5, 5)),
    (normext.BatchNormAct3d, torch.nn.BatchNorm3d, (2, 4, 3, 3, 3)),
])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_module_steps_match_torch(cls, torch_cls, shape, momentum):
    """Several train steps then eval, against torch's BatchNorm + LeakyReLU with
    the residual; the checkpoint loads both ways with strict=True."""
    ref = torch_cls(4, momentum=momentum).double()
    layer = cls(4, momentum=momentum, activation="leaky_relu", negative_slope=0.2,
                memory_efficient=True).double()
    layer.load_state_dict(ref.state_dict(), strict=True)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.normal_()
    layer.load_state_dict(ref.state_dict(), strict=True)
    for step in range(3):
        x = torch.randn(shape, dtype=torch.float64)
        r = torch.randn(shape, dtype=torch.float64)
        out = layer(x, r)
        expected = F.leaky_relu(ref(x) + r, 0.2)
        assert_close(out, expected)
        out.square().sum().backward()
        expected.square().sum().backward()
        assert_close(layer.weight.grad, ref.weight.grad)
        assert_close(layer.bias.grad, ref.bias.grad)
    for key, value in ref.state_dict().items():
        assert_close(layer.state_dict()[key], value)
    layer.eval(), ref.eval()
    x = torch.randn(shape, dtype=torch.float64)
    assert_close(layer(x), F.leaky_relu(ref(x), 0.2))
    back = torch_cls(4).double()
    back.load_state_dict(layer.state_dict(), strict=True)


def test_module_repr_and_compile():
    layer = normext.BatchNormAct2d(4, activation="elu", alpha=0.5)
    assert "activation=elu, alpha=0.5" in repr(layer)
    x, r = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    compiled = torch.compile(copy.deepcopy(layer), backend="aot_eager", fullgraph=True)
    assert_close(compiled(x, r), copy.deepcopy(layer)(x, r))


@pytest.mark.parametrize("activation,kept", [("relu", False), ("elu", False), ("silu", True)])
def test_residual_is_kept_only_for_silu(activation, kept):
    """With a residual the layer takes the activation's derivative from its
    output (which the next layer keeps anyway) and lets the residual go;
    silu's derivative needs the activation's input, so it keeps the residual."""
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    r0 = torch.randn(4, 3, 5, 5, requires_grad=True)
    r = r0 * 1.5
    gone = weakref.ref(r)
    out = batch_norm_act(x, None, None, torch.ones(3, requires_grad=True), None, True,
                         activation=activation, residual=r)
    del r
    assert (gone() is not None) == kept
    out.square().sum().backward()
    assert torch.isfinite(r0.grad).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("activation,negative_slope,alpha,reference", [
    ("leaky_relu", -0.3, 1.0, lambda z: F.leaky_relu(z, -0.3)),
    ("elu", 0.01, -0.6, lambda z: F.elu(z, -0.6)),
])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_negative_slope_or_alpha_with_residual(activation, negative_slope, alpha, reference,
                                               layout, training):
    """A negative slope or alpha makes the output positive for some negative
    inputs, so the derivative cannot come from the output: with a residual
    the layer keeps it and recomputes the activation's input. Output and
    every gradient against torch in float64; the op refuses an output there."""
    x, r = (layout_variants(torch.randn(4, 3, 5, 5, dtype=torch.float64) * 2)[layout]
            for _ in range(2))
    w = torch.rand(3, dtype=torch.float64) + 0.5
    b = torch.randn(3, dtype=torch.float64)
    xa, ra, wa, ba = _leaves(x, r, w, b)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    out = batch_norm_act(xa, rm, rv, wa, ba, training, 0.1, 1e-5, activation, negative_slope,
                         alpha, ra)
    xr, rr, wr, br = _leaves(x, r, w, b)
    expected = reference(F.batch_norm(xr, torch.zeros(3, dtype=torch.float64),
                                      torch.ones(3, dtype=torch.float64), wr, br, training, 0.1,
                                      1e-5) + rr)
    assert_close(out, expected, torch.float64)
    grad = torch.randn_like(expected)
    for got, want in zip(torch.autograd.grad(out, (xa, ra, wa, ba), grad),
                         torch.autograd.grad(expected, (xr, rr, wr, br), grad)):
        assert_close(got, want, torch.float64)
    _, mean, invstd = torch.ops.normext.batch_norm_act_forward(
        x, w, b, None, None, True, 0.1, 1e-5, activation, negative_slope, alpha, r)
    with pytest.raises(ValueError, match="negative slope or elu with a negative alpha"):
        torch.ops.normext.batch_norm_act_backward(
            grad, x, None, out.detach(), w, b, mean, invstd, True, activation, negative_slope,
            alpha, False)


SPECIAL_VALUES = [-float("inf"), -2.0, -0.0, 0.0, 3.0, 6.0, 7.0, float("inf"), float("nan")]


@pytest.mark.parametrize("activation,negative_slope", [
    ("identity", 0.01), ("relu", 0.01), ("relu6", 0.01), ("leaky_relu", 0.1),
    ("leaky_relu", 0.0)])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_piecewise_linear_activations_at_edges_match_torch(activation, negative_slope, residual, dtype, layout):
    """The piecewise-linear activations' values at infinities, NaN, the kinks
    and zero, and the gradients there, bit for bit as torch's (activation.h):
    eval mode with unit statistics and an eps that rounds away, so that the
    activation's input is the input itself."""
    if activation == "identity" and not residual:
        pytest.skip("the plain batch norm: no activation")
    values = torch.tensor(SPECIAL_VALUES, dtype=dtype)
    x = layout_variants(values.repeat(2, 3, 2, 1))[layout]  # 2x3x2x9: every value per channel
    r = torch.zeros_like(x) if residual else None
    stats = torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype)
    xa, ra = _leaves(x, r)
    eps = 1e-20  # var + eps rounds to 1 (torch before 2.14 refuses an eps of 0)
    out = batch_norm_act(xa, *stats, None, None, False, 0.1, eps, activation, negative_slope,
                         1.0, ra)
    xr, rr = _leaves(x, r)
    z = F.batch_norm(xr, *stats, None, None, False, 0.1, eps)
    z = z + rr if residual else z
    reference = {"identity": lambda t: t, "relu": F.relu, "relu6": F.relu6,
                 "leaky_relu": lambda t: F.leaky_relu(t, negative_slope)}[activation]
    expected = reference(z)
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
    # The sign of a zero follows the affine's arithmetic, and a NaN's has no meaning.
    signed = (x != 0) & ~expected.isnan()
    assert torch.equal(out.signbit()[signed], expected.signbit()[signed])
    # torch's derivative at NaN differs between its vector loops and their
    # scalar tails (relu6, leaky_relu): compared everywhere else.
    grad = torch.ones_like(x)
    for got, want in zip(torch.autograd.grad(out, [t for t in (xa, ra) if t is not None], grad),
                         torch.autograd.grad(expected, [t for t in (xr, rr) if t is not None],
                                             grad)):
        torch.testing.assert_close(got[~x.isnan()], want[~x.isnan()], rtol=0, atol=0)


@pytest.mark.parametrize("activation", ["silu", "elu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_smooth_activations_at_edges_match_torch(activation, dtype):
    """silu and elu where their exp overflows or underflows, at the
    infinities and NaN: torch's values and gradients (0, -0, NaN and inf
    where torch has them; results below FLT_MIN may flush to 0, activation.h),
    in eval mode with unit statistics as above."""
    values = torch.tensor(SMOOTH_EDGE_VALUES, dtype=dtype)
    x = values.repeat(2, 3, 1, 1).requires_grad_()
    stats = torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype)
    out = batch_norm_act(x, *stats, None, None, False, 0.1, 1e-20, activation, 0.01, 1.0)
    (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
    xr = x.detach().clone().requires_grad_()
    expected = getattr(F, activation)(xr)
    (expected_grad,) = torch.autograd.grad(expected, xr, torch.ones_like(expected))
    # (torch's bfloat16 elu derivative at NaN is not NaN in all of its loops.)
    number = ~x.isnan()
    for got, want in ((out, expected), (grad[number], expected_grad[number])):
        torch.testing.assert_close(got, want, atol=1e-36, rtol=EDGE_RTOL[dtype], equal_nan=True)
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got.isinf(), want.isinf())


def test_weights_invertible_rule():
    """memory_efficient keeps the output only where every |weight| >= 1e-3 *
    max(1, |bias|): a weight of 0, a NaN or one too small for its bias falls back."""
    w = torch.tensor([1.0, -0.5, 2e-3])
    assert ops.batch_norm_weights_invertible(w, None)
    assert ops.batch_norm_weights_invertible(w, torch.tensor([0.0, 3.0, 2.0]))
    assert not ops.batch_norm_weights_invertible(w, torch.tensor([0.0, 0.0, 2.5]))
    assert not ops.batch_norm_weights_invertible(torch.tensor([1.0, 0.0]), None)
    assert not ops.batch_norm_weights_invertible(torch.tensor([1.0, float("nan")]), None)
    assert ops.batch_norm_weights_invertible(None, torch.tensor([5.0]))
    with pytest.raises(RuntimeError, match="expected a bias of 3 elements"):
        ops.batch_norm_weights_invertible(w, torch.ones(2))


class _ResidualBlock(torch.nn.Module):
    """conv-BN-ReLU, conv-BN, add the input, ReLU: fuse gives two fused layers."""

    def __init__(self, channels=4):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(channels, momentum=0.3)
        self.conv2 = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(channels)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + x)


def _train_steps(model, reference, steps=2):
    """Outputs, input gradients and state of `model` against `reference` (torch's layers)."""
    for step in range(steps):
        x = torch.randn(3, 4, 5, 5, dtype=torch.float64, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_()
        out, expected = model(x), reference(x_ref)
        assert_close(out, expected, msg=f"step {step}: output")
        out.square().sum().backward()
        expected.square().sum().backward()
        assert_close(x.grad, x_ref.grad, msg=f"step {step}: input grad")
    model = getattr(model, "_orig_mod", model)  # (torch.compile's wrapper)
    state = model.state_dict()
    for name, value in reference.state_dict().items():
        assert_close(state[name], value, msg=name)
    grads = {name: p.grad for name, p in model.named_parameters()}
    for name, p in reference.named_parameters():  # accumulated over the steps
        assert_close(grads[name], p.grad, msg=f"{name}.grad")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fused_model_torch_export(training):
    """torch.export of a fused model: each fused layer is one normext op in
    the graph, and the exported module trains like torch's layers."""
    torch.manual_seed(0)
    reference = _ResidualBlock().double().train(training)
    fused = normext.fuse(copy.deepcopy(reference))
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    exported = torch.export.export(fused, (x,))
    targets = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.normext.batch_norm_act.default) == 2
    assert torch.ops.aten.relu.default not in targets and torch.ops.aten.add.Tensor not in targets
    _train_steps(exported.module(), reference)


def test_fused_model_compile_fullgraph():
    """torch.compile(fullgraph=True) of a fused model (no graph breaks) trains
    like torch's layers."""
    torch.manual_seed(0)
    reference = _ResidualBlock().double()
    compiled = torch.compile(normext.fuse(copy.deepcopy(reference)), backend="aot_eager",
                             fullgraph=True)
    _train_steps(compiled, reference)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bias_without_weight_16bit(dtype, device):
    """A 16-bit bias without a weight (torch accepts it for a 16-bit input):
    the fused op reads it in the accumulate type where its gradients have that type."""
    x = torch.randn(4, 6, 5, 3, device=device, dtype=dtype, requires_grad=True)
    r = torch.randn_like(x, requires_grad=True)
    b = torch.randn(6, device=device, dtype=dtype, requires_grad=True)
    out = torch.ops.normext.batch_norm_act(x, None, b, None, None, True, 0.1, 1e-5,
                                           "leaky_relu", 0.1, 1.0, r, False)
    leaves = [t.detach().double().requires_grad_() for t in (x, r, b)]
    expected = F.leaky_relu(F.batch_norm(leaves[0], None, None, None, leaves[2], True) + leaves[1],
                            0.1)
    assert_close(out, expected, dtype)
    grad = torch.randn_like(expected)
    for got, want in zip(torch.autograd.grad(out, (x, r, b), grad.to(dtype)),
                         torch.autograd.grad(expected, leaves, grad)):
        assert got.dtype == dtype
        assert_close(got, want, dtype, factor=4)


# Shapes whose float16 passes cross the CPU kernels' float tiles (512
# elements, csrc/common/cpu/loops.h: kStageElements): runs longer than a
# tile; channels-last rows several to a tile, one row in two slices, and
# grouped rows (over 1024 channels) in three slices.
TILE_SHAPES = [((2, 3, 24, 25), "contiguous"), ((3, 40, 5, 5), "channels_last"),
               ((2, 600, 2, 2), "channels_last"), ((2, 1100, 2, 3), "channels_last")]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,layout", TILE_SHAPES, ids=lambda v: str(v))
# (With a residual the backward takes the derivative from the rounded output:
# exact where rounding keeps its sign, as for ReLU and LeakyReLU.)
@pytest.mark.parametrize("activation,residual,memory_efficient",
                         [("relu", False, False), ("silu", True, False), ("elu", True, True),
                          ("identity", False, False), ("relu6", False, False),
                          ("leaky_relu", True, False), ("elu", False, False),
                          ("leaky_relu", False, True)])
def test_16bit_tiles_match_the_float32_kernels(dtype, shape, layout, activation, residual,
                                               memory_efficient):
    """Eval mode: the 16-bit fused passes compute what the float32 kernels do on
    the widened input, rounded once, so the output and the input and residual gradients
    equal the float32 op's on the same values, rounded, bit for bit; training
    mode against torch in float64 (memory_efficient: the output alone is exact,
    its backward reading the rounded output)."""
    c = shape[1]
    x = layout_variants(torch.randn(shape, dtype=torch.float64))[layout]
    w, b = torch.rand(c, dtype=torch.float64) + 0.5, torch.randn(c, dtype=torch.float64)
    r = torch.randn(shape, dtype=torch.float64) if residual else None
    rm, rv = torch.randn(c), torch.rand(c) + 0.5
    grad = torch.randn(shape).to(dtype)
    results = {}
    for kind in (dtype, torch.float32):
        xa = x.to(dtype).to(kind).requires_grad_()
        ra = None if r is None else r.to(dtype).to(kind).requires_grad_()
        out = batch_norm_act(xa, rm.clone(), rv.clone(), w.float(), b.float(), False, 0.1, 1e-5,
                             activation, 0.1, 0.7, ra, memory_efficient)
        inputs = [t for t in (xa, ra) if t is not None]
        grads = torch.autograd.grad(out, inputs, grad.to(kind))
        results[kind] = [out, *grads]
    # memory_efficient's backward reads the rounded output: only the output is exact.
    exact = 1 if memory_efficient else len(results[dtype])
    for got, want in zip(results[dtype][:exact], results[torch.float32][:exact]):
        assert got.dtype == dtype
        assert torch.equal(got, want.to(dtype))
    _compare(x, w, b, r, activation, memory_efficient, True, dtype,
             4.0 if memory_efficient else 1.0)

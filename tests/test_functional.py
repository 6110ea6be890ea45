"""normext.functional.batch_norm against torch.nn.functional.batch_norm:
every flag combination in float64, gradcheck/gradgradcheck, double backward
(create_graph=True) against torch's second derivatives, forward-mode AD and
torch.func transforms."""

import contextlib
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad as fwAD
from torch.autograd import gradcheck, gradgradcheck

import normext
from normext.functional import batch_norm
from conftest import DEVICE_PARAMS, assert_close

SHAPES = {
    "2D": ((6, 3), torch.contiguous_format),
    "3D": ((4, 3, 5), torch.contiguous_format),
    "4D": ((3, 3, 4, 5), torch.contiguous_format),
    "4D-channels_last": ((3, 3, 4, 5), torch.channels_last),
    "5D-channels_last_3d": ((2, 3, 2, 3, 4), torch.channels_last_3d),
}


def _input(shape, memory_format, device, dtype=torch.float64, requires_grad=True):
    x = torch.randn(shape, dtype=dtype, device=device) * 2 + 0.5
    return x.contiguous(memory_format=memory_format).requires_grad_(requires_grad)


FLAG_COMBOS = [
    combo for combo in itertools.product(
        [True, False],  # weight
        [True, False],  # bias
        [True, False],  # running stats
        [True, False],  # training
        [0.1, 0.0, 1.0],  # momentum
    )
    if combo[2] or combo[3]  # eval needs running stats
]


def _combo_id(combo):
    w, b, r, t, m = combo
    return f"w{int(w)}-b{int(b)}-r{int(r)}-{'train' if t else 'eval'}-m{m}"


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("combo", FLAG_COMBOS, ids=_combo_id)
def test_matches_torch_float64(combo, shape_name, device):
    has_weight, has_bias, has_running, training, momentum = combo
    shape, memory_format = SHAPES[shape_name]
    C = shape[1]
    x = _input(shape, memory_format, device)
    x_ref = x.detach().clone().requires_grad_()
    opts = dict(dtype=torch.float64, device=device)
    w = (torch.rand(C, **opts) + 0.5).requires_grad_() if has_weight else None
    b = torch.randn(C, **opts).requires_grad_() if has_bias else None
    # torch's CUDA backward mishandles weight=None with a bias (a grad_bias of
    # shape [0]); a weight of ones is the same function.
    w_ref = w.detach().clone().requires_grad_() if has_weight else (
        torch.ones(C, **opts) if has_bias and device == "cuda" else None)
    b_ref = b.detach().clone().requires_grad_() if has_bias else None
    if has_running:
        rm, rv = torch.randn(C, **opts), torch.rand(C, **opts) + 0.5
        rm_ref, rv_ref = rm.clone(), rv.clone()
    else:
        rm = rv = rm_ref = rv_ref = None
    out = batch_norm(x, rm, rv, w, b, training, momentum, 1e-4)
    expected = F.batch_norm(x_ref, rm_ref, rv_ref, w_ref, b_ref, training, momentum, 1e-4)
    assert_close(out, expected)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    if has_running:
        assert_close(rm, rm_ref)
        assert_close(rv, rv_ref)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    assert_close(x.grad, x_ref.grad)
    if has_weight:
        assert_close(w.grad, w_ref.grad)
    if has_bias:
        assert_close(b.grad, b_ref.grad)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_keyword_arguments_and_defaults(device):
    x = torch.randn(4, 3, dtype=torch.float64, device=device)
    rm, rv = torch.zeros(3, dtype=torch.float64, device=device), torch.ones(
        3, dtype=torch.float64, device=device)
    # defaults: eval mode, no weight/bias
    assert_close(batch_norm(x, rm, rv), F.batch_norm(x, rm, rv))
    kwargs = dict(weight=torch.rand(3, dtype=torch.float64, device=device),
                  bias=torch.rand(3, dtype=torch.float64, device=device), training=True,
                  momentum=0.5, eps=1e-3)
    rm2, rv2 = rm.clone(), rv.clone()
    assert_close(batch_norm(x, running_mean=rm, running_var=rv, **kwargs),
                 F.batch_norm(x, running_mean=rm2, running_var=rv2, **kwargs))
    assert_close(rm, rm2)
    assert_close(rv, rv2)


def test_torch_function_override():
    """Tensor subclasses with __torch_function__ see the call, like F.batch_norm."""
    seen = []

    class Logged(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            seen.append(func)
            return super().__torch_function__(func, types, args, kwargs or {})

    x = torch.randn(4, 3, dtype=torch.float64).as_subclass(Logged)
    out = batch_norm(x, None, None, training=True)
    assert batch_norm in seen
    assert_close(out.as_subclass(torch.Tensor),
                 F.batch_norm(x.as_subclass(torch.Tensor), None, None, training=True))


# ---------------------------------------------------------------------------
# gradcheck / gradgradcheck

GRADCHECK_CASES = [
    # (shape, memory format, training, weight, bias)
    ((3, 2), torch.contiguous_format, True, True, True),
    ((3, 2, 3), torch.contiguous_format, True, True, False),
    ((2, 2, 3, 2), torch.contiguous_format, True, True, True),
    ((2, 2, 3, 2), torch.contiguous_format, True, False, False),
    ((2, 2, 3, 2), torch.contiguous_format, False, True, True),
    ((2, 2, 3, 2), torch.contiguous_format, False, False, True),
    ((2, 3, 2, 2), torch.channels_last, True, True, True),
    ((2, 3, 2, 2), torch.channels_last, True, False, True),
    ((2, 3, 2, 2), torch.channels_last, False, True, False),
    ((2, 2, 2, 1, 2), torch.channels_last_3d, True, True, True),
]


def _gradcheck_inputs(case, device):
    shape, memory_format, training, has_weight, has_bias = case
    C = shape[1]
    opts = dict(dtype=torch.float64, device=device)
    x = _input(shape, memory_format, device)
    w = (torch.rand(C, **opts) + 0.5).requires_grad_() if has_weight else None
    b = torch.randn(C, **opts).requires_grad_() if has_bias else None
    rm, rv = torch.randn(C, **opts), torch.rand(C, **opts) + 0.5
    inputs = tuple(t for t in (x, w, b) if t is not None)

    def fn(*args):
        args = list(args)
        x = args.pop(0).contiguous(memory_format=memory_format)
        w = args.pop(0) if has_weight else None
        b = args.pop(0) if has_bias else None
        # clones: the training-mode update must not leak between evaluations
        return batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-3)

    return fn, inputs


def _case_id(case):
    shape, memory_format, training, w, b = case
    fmt = {torch.contiguous_format: "contiguous", torch.channels_last: "channels_last",
           torch.channels_last_3d: "channels_last_3d"}[memory_format]
    return f"{len(shape)}D-{fmt}-{'train' if training else 'eval'}-w{int(w)}-b{int(b)}"


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=_case_id)
# torch's forward-AD check scripts a helper of its own
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_gradcheck(case, device):
    fn, inputs = _gradcheck_inputs(case, device)
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5, check_forward_ad=True)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=_case_id)
def test_gradgradcheck(case, device):
    fn, inputs = _gradcheck_inputs(case, device)
    assert gradgradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------
# double backward against torch


def _gradient_penalty(module, x, target):
    """A WGAN-GP style computation: the norm of d(loss)/d(x), back-propagated."""
    out = module(x)
    loss = ((out - target) ** 2).mean() + out.sin().sum()
    (grad_x,) = torch.autograd.grad(loss, x, create_graph=True)
    penalty = (grad_x.flatten(1).norm(dim=1) - 1).pow(2).mean()
    params = [p for p in (module.weight, module.bias) if p is not None]
    grads = torch.autograd.grad(penalty, [x] + params, allow_unused=True,
                                materialize_grads=True)
    return out, grad_x, penalty, grads


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,memory_format", [
    ((6, 3), torch.contiguous_format),
    ((4, 3, 3, 3), torch.contiguous_format),
    ((4, 3, 3, 3), torch.channels_last),
], ids=["2D", "4D", "4D-channels_last"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_double_backward_matches_torch(affine, shape, memory_format, training, dtype, device):
    kind = {2: "BatchNorm1d", 4: "BatchNorm2d"}[len(shape)]
    theirs = getattr(torch.nn, kind)(3, affine=affine, device=device, dtype=dtype)
    if affine:
        with torch.no_grad():
            theirs.weight.uniform_(0.5, 1.5)
            theirs.bias.uniform_(-0.5, 0.5)
    with torch.no_grad():
        theirs.running_mean.uniform_(-0.5, 0.5)
        theirs.running_var.uniform_(0.5, 1.5)
    ours = getattr(normext, kind)(3, affine=affine, device=device, dtype=dtype)
    ours.load_state_dict(theirs.state_dict())
    ours.train(training)
    theirs.train(training)
    x = (torch.randn(shape, dtype=dtype, device=device) * 2).contiguous(
        memory_format=memory_format).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    target = torch.randn(shape, dtype=dtype, device=device)
    out, grad_x, penalty, grads = _gradient_penalty(ours, x, target)
    out_ref, grad_x_ref, penalty_ref, grads_ref = _gradient_penalty(theirs, x_ref, target)
    assert_close(out, out_ref)
    assert_close(grad_x, grad_x_ref)
    assert_close(penalty, penalty_ref)
    for name, mine, expected in zip(["input", "weight", "bias"], grads, grads_ref):
        assert_close(mine, expected, msg=f"second derivative wrt {name}")
    assert_close(ours.running_mean, theirs.running_mean)
    assert_close(ours.running_var, theirs.running_var)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_double_backward_reduced_precision_with_float32_params(dtype, device):
    """Mixed precision (half input, float32 module) through create_graph=True,
    against torch in float64."""
    ours = normext.BatchNorm2d(3, device=device)
    theirs = torch.nn.BatchNorm2d(3, device=device, dtype=torch.float64)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(4, 3, 3, 3, device=device).to(dtype).requires_grad_()
    x_ref = x.detach().double().requires_grad_()
    target = torch.zeros(4, 3, 3, 3, device=device)
    out, grad_x, _, grads = _gradient_penalty(ours, x, target.to(dtype))
    out_ref, grad_x_ref, _, grads_ref = _gradient_penalty(theirs, x_ref, target.double())
    assert out.dtype == dtype and grad_x.dtype == dtype
    assert grads[1].dtype == torch.float32
    assert_close(out, out_ref, dtype)
    assert_close(grad_x, grad_x_ref, dtype)
    for mine, expected in zip(grads, grads_ref):
        assert_close(mine, expected, dtype)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_double_backward_input_gradient_in_the_input_layout(training, device):
    """A channels-last input with a contiguous grad_output: the create_graph
    input gradient has torch's layout (channels-last, except in eval on CUDA,
    where torch keeps grad_output's)."""
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, device=device).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    running = (torch.zeros(3, dtype=torch.float64, device=device),
               torch.ones(3, dtype=torch.float64, device=device))
    g = torch.randn(2, 3, 4, 4, dtype=torch.float64, device=device)
    (grad,) = torch.autograd.grad(batch_norm(x, *running, training=training), x, g,
                                  create_graph=True)
    (expected,) = torch.autograd.grad(F.batch_norm(x, *running, training=training), x, g,
                                      create_graph=True)
    assert grad.stride() == expected.stride()
    assert_close(grad, expected)


@pytest.mark.filterwarnings("ignore:.*Profiler clears events")  # torch 2.11's profiler
@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("dtype,param_dtype", [
    (torch.float64, torch.float64), (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32), (torch.float16, torch.float16)], ids=str)
@pytest.mark.parametrize("layout,grad_layout", [
    (torch.contiguous_format, torch.contiguous_format),
    (torch.channels_last, torch.channels_last),
    (torch.channels_last, torch.contiguous_format)], ids=["nchw", "nhwc", "nhwc-dy-nchw"])
def test_eval_backward_with_frozen_parameters(layout, grad_layout, dtype, param_dtype, device):
    """Eval with parameters that want no gradient: the input gradient alone,
    by the normalize pass over dy (no reduction: the fused backward allocates
    no sums), torch's in value and layout."""
    from torch.profiler import ProfilerActivity, profile
    opts = dict(dtype=param_dtype, device=device)
    w, b = torch.rand(3, **opts) + 0.5, torch.randn(3, **opts)
    rm, rv = torch.randn(3, **opts), torch.rand(3, **opts) + 0.5
    x = (torch.randn(4, 3, 5, 6, device=device) * 2 + 1).to(dtype).contiguous(
        memory_format=layout).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    g = torch.randn(4, 3, 5, 6, device=device).to(dtype).contiguous(memory_format=grad_layout)
    out = batch_norm(x, rm, rv, w, b, False)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out.backward(g)
    F.batch_norm(x_ref, rm, rv, w, b, False).backward(g)
    assert_close(x.grad, x_ref.grad, dtype)
    assert x.grad.stride() == x_ref.grad.stride()
    if device == "cpu":  # (the CPU backward runs on this thread)
        names = [event.name for event in prof.events()]
        assert "normext::batch_norm_backward" in names and "aten::empty" not in names


@pytest.mark.filterwarnings("ignore:.*Profiler clears events")  # torch 2.11's profiler
@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_first_backward_without_create_graph_uses_fused_kernel(device):
    """A plain backward runs the fused backward op; a create_graph backward
    the differentiable composite instead. Both give torch's gradients."""
    from torch.profiler import ProfilerActivity, profile
    x = torch.randn(5, 3, 4, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.rand(3, dtype=torch.float64, device=device, requires_grad=True)
    g = torch.randn(5, 3, 4, dtype=torch.float64, device=device)
    out = batch_norm(x, None, None, w, b, True)
    ops_run = {}
    for create_graph in (False, True):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            ops_run[create_graph] = torch.autograd.grad(out, (x, w, b), g, retain_graph=True,
                                                        create_graph=create_graph)
        ops_run[create_graph, "names"] = {event.name for event in prof.events()}
    assert "normext::batch_norm_backward" in ops_run[False, "names"]
    assert "normext::batch_norm_backward" not in ops_run[True, "names"]
    refs = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    expected = torch.autograd.grad(F.batch_norm(refs[0], None, None, refs[1], refs[2], True),
                                   refs, g)
    for fused, composite, reference in zip(ops_run[False], ops_run[True], expected):
        assert_close(fused, reference)
        assert_close(composite, reference)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference_mode", "no_input_grad"])
def test_autograd_node_only_when_needed(mode, device):
    """One C++ node when a gradient is wanted (through the weight alone too),
    none otherwise; every path gives torch's output and running stats."""
    x = torch.randn(4, 3, 5, device=device, dtype=torch.float64)
    w = (torch.rand(3, device=device, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, device=device, dtype=torch.float64).requires_grad_()
    if mode == "grad":
        x.requires_grad_()
    running = [torch.zeros(3, device=device, dtype=torch.float64),
               torch.ones(3, device=device, dtype=torch.float64)]
    running_ref = [t.clone() for t in running]
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(
        mode, contextlib.nullcontext)
    with context():
        out = batch_norm(x, *running, w, b, True, 0.1, 1e-5)
    expected = F.batch_norm(x.detach(), *running_ref, w.detach(), b.detach(), True, 0.1, 1e-5)
    assert_close(out, expected)
    assert_close(running[0], running_ref[0])
    assert_close(running[1], running_ref[1])
    if mode in ("grad", "no_input_grad"):
        assert out.grad_fn is not None and "BatchNorm" in out.grad_fn.name()
        grad = torch.randn_like(out)
        out.backward(grad)
        x_ref = x.detach().clone().requires_grad_(x.requires_grad)
        w_ref, b_ref = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        F.batch_norm(x_ref, None, None, w_ref, b_ref, True, 0.1, 1e-5).backward(grad)
        assert_close(x.grad, x_ref.grad)
        assert_close(w.grad, w_ref.grad)
        assert_close(b.grad, b_ref.grad)
    else:
        assert out.grad_fn is None and not out.requires_grad


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_strided_running_stats(training, device):
    """Running stats that are views with a stride (every other element of a
    buffer) are read and updated in place like torch's."""
    x = torch.randn(4, 3, 5, device=device, dtype=torch.float64) * 2 + 1
    buffers = [torch.rand(6, device=device, dtype=torch.float64) + 0.5 for _ in range(2)]
    buffers_ref = [t.clone() for t in buffers]
    out = batch_norm(x, buffers[0][::2], buffers[1][1::2], None, None, training, 0.1, 1e-5)
    expected = F.batch_norm(x, buffers_ref[0][::2], buffers_ref[1][1::2], None, None, training,
                            0.1, 1e-5)
    assert_close(out, expected)
    assert_close(buffers[0], buffers_ref[0])
    assert_close(buffers[1], buffers_ref[1])


# ---------------------------------------------------------------------------
# forward-mode AD and torch.func transforms: torch's batch_norm computes them


def _transform_args(training, device):
    """(x, running_mean, running_var, weight, bias) in float64; no running
    stats in training (vmap cannot update unbatched running stats in place)."""
    opts = dict(dtype=torch.float64, device=device)
    x = torch.randn(4, 3, 5, **opts) * 2 + 0.5
    running = (None, None) if training else (torch.randn(3, **opts), torch.rand(3, **opts) + 0.5)
    return x, *running, torch.rand(3, **opts) + 0.5, torch.randn(3, **opts)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_ad_matches_torch(training, device):
    """Tangents of input, weight and bias, through forward_ad and torch.func.jvp;
    the running stats are updated as without tangents."""
    x, rm, rv, w, b = _transform_args(training, device)
    if training:
        rm, rv = torch.zeros(3, dtype=x.dtype, device=device), torch.ones(3, dtype=x.dtype,
                                                                          device=device)
    tangents = [torch.randn_like(t) for t in (x, w, b)]
    results = {}
    for name, fn in (("normext", batch_norm), ("torch", F.batch_norm)):
        running = (rm.clone(), rv.clone())
        with fwAD.dual_level():
            dual = [fwAD.make_dual(t, dt) for t, dt in zip((x, w, b), tangents)]
            out = fwAD.unpack_dual(fn(dual[0], *running, dual[1], dual[2], training))
        _, jvp_tangent = torch.func.jvp(
            lambda x, w, b: fn(x, rm.clone(), rv.clone(), w, b, training), (x, w, b),
            tuple(tangents))
        results[name] = (out.primal, out.tangent, jvp_tangent, *running)
    for name, ours, expected in zip(["output", "tangent", "jvp tangent", "running_mean",
                                     "running_var"], results["normext"], results["torch"]):
        assert ours is not None, name
        assert_close(ours, expected, msg=name)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("transform", ["grad", "vjp", "jacrev", "jacfwd", "hessian", "vmap"])
def test_func_transforms_match_torch(transform, training, device):
    x, rm, rv, w, b = _transform_args(training, device)

    def run(fn):
        def loss(x, w, b):
            return fn(x, rm, rv, w, b, training).sin().sum()
        if transform == "grad":
            return torch.func.grad(loss, argnums=(0, 1, 2))(x, w, b)
        if transform == "vjp":
            out, pullback = torch.func.vjp(lambda x, w: fn(x, rm, rv, w, b, training), x, w)
            return (out, *pullback(torch.ones_like(out)))
        if transform == "jacrev":
            return torch.func.jacrev(loss, argnums=(1, 2))(x, w, b)
        if transform == "jacfwd":
            return torch.func.jacfwd(loss, argnums=(1, 2))(x, w, b)
        if transform == "hessian":
            return (torch.func.hessian(loss, argnums=1)(x, w, b),)
        # a batch of 2 independent batch norms over x's batch dim
        return (torch.func.vmap(lambda x: fn(x, rm, rv, w, b, training), in_dims=1,
                                out_dims=1)(x.view(2, 2, 3, 5).transpose(0, 1)),)

    ours, expected = run(batch_norm), run(F.batch_norm)
    assert len(ours) == len(expected)
    for mine, theirs in zip(ours, expected):
        assert_close(mine, theirs)


def test_op_rejects_tangents():
    """The op itself has no forward derivative: an error, not a zero tangent."""
    x = torch.randn(4, 3, dtype=torch.float64)
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.ops.normext.batch_norm(fwAD.make_dual(x, torch.ones_like(x)), None, None, None,
                                     None, True, 0.1, 1e-5)

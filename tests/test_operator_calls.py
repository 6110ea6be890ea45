"""Per-call host work of the fused ops, counted with torch.profiler: the
ATen ops a call makes besides normext's own (allocating per-channel results
only), and no copy of a grad_output that differs from the input only on
size-1 dims."""

import re

import pytest
import torch
import torch.nn.functional as F

from normext import ops
from conftest import DEVICE_PARAMS, assert_close


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


def _python_calls_per_training_step(module) -> int:
    """Python function calls (sys.setprofile "call" events) in one training
    forward + backward of `module` on a small input, after warm-up steps."""
    import sys

    x = torch.randn(2, 16, 4, 4, requires_grad=True)
    grad = torch.randn(2, 16, 4, 4)

    def step():
        module(x).backward(grad)

    for _ in range(3):
        step()
    calls = 0

    def count(frame, event, arg):
        nonlocal calls
        calls += event == "call"

    sys.setprofile(count)
    try:
        step()
    finally:
        sys.setprofile(None)
    return calls


def test_module_runs_about_as_much_python_per_step_as_torch():
    """A small layer's time is mostly per-call host work: the module and the
    functional path run at most three Python functions more than torch's
    BatchNorm2d per training forward + backward (the TorchScript guards that
    keep them scriptable, and torch.compiler.is_compiling, which sends eager
    calls to the extension's direct entry instead of the op overload)."""
    import normext

    ours = _python_calls_per_training_step(normext.BatchNorm2d(16))
    theirs = _python_calls_per_training_step(torch.nn.BatchNorm2d(16))
    assert ours <= theirs + 3, (ours, theirs)


def test_direct_entries_match_the_ops_and_their_errors():
    """normext.functional's eager calls go to normext._C.batch_norm(_act)
    (csrc/batch_norm/python.cpp) instead of the op overloads: same outputs,
    same graph node, same exception types and messages."""
    from normext import _C
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    stats = [torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)]
    args = (x, w, None, *stats, True, 0.1, 1e-5)
    direct, op = _C.batch_norm(*args), torch.ops.normext.batch_norm(*args)
    assert torch.equal(direct, op) and direct.grad_fn.name() == op.grad_fn.name()
    act_args = args + ("elu", 0.01, 1.0, None, True)
    assert torch.equal(_C.batch_norm_act(*act_args), torch.ops.normext.batch_norm_act(*act_args))
    bad_calls = [  # (exception, call with the op)
        (RuntimeError, lambda f: f(x, torch.ones(4, dtype=torch.float64), None, None, None,
                                   True, 0.1, 1e-5)),
        (NotImplementedError, lambda f: f(torch.ones(4, 3, dtype=torch.long), None, None, None,
                                          None, True, 0.1, 1e-5)),
    ]
    for error, call in bad_calls:
        with pytest.raises(error) as from_op:
            call(torch.ops.normext.batch_norm)
        with pytest.raises(error, match=re.escape(str(from_op.value).splitlines()[0])):
            call(_C.batch_norm)
    with pytest.raises(ValueError, match="invertible"):
        _C.batch_norm_act(*args, "relu", 0.01, 1.0, None, True)

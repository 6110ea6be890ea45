"""torch.library.opcheck of every torch.ops.normext op (schema, declared
mutations, autograd registration, fake kernels and aot dispatch with dynamic
shapes), the fake kernels' argument checks, and empty inputs."""

import functools

import pytest
import torch

from normext import ops
from conftest import DEVICE_PARAMS, layout_variants

OPS = torch.ops.normext

# ---------------------------------------------------------------------------
# opcheck samples: (name, args) for every op


def _leaf(t):
    return t.detach().clone().requires_grad_()


@functools.cache
def _opcheck_samples(device):
    """(id, op name, args) for every op: built once per device (opcheck
    copies the arguments it mutates) from a fixed seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _build_samples(device)


def _build_samples(device):
    samples = []
    for dtype in (torch.float32, torch.float64):
        acc = dtype
        opts = dict(device=device, dtype=dtype)
        base = torch.randn(3, 4, 3, 5, **opts)
        layouts = layout_variants(base)
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
    return (samples + _fused_samples(device) + _layer_norm_samples(device)
            + _group_norm_samples(device))


def _layer_norm_samples(device):
    samples = []
    for dtype in (torch.float64, torch.bfloat16):
        opts = dict(device=device, dtype=dtype)
        x = torch.randn(3, 4, 5, **opts)
        w, b = torch.rand(4, 5, **opts) + 0.5, torch.randn(4, 5, **opts)
        for rms in (False, True):
            name = f"{'rms' if rms else 'layer'}_norm-{str(dtype)[6:]}"
            bias = None if rms else b
            samples.append((f"{name}-forward", "layer_norm_forward",
                            (_leaf(x), [4, 5], _leaf(w), _leaf(bias) if bias is not None else None,
                             1e-5, rms)))
            samples.append((f"{name}-forward-noaffine", "layer_norm_forward",
                            (_leaf(x), [5], None, None, 1e-5, rms)))
            samples.append((f"{name}-add-forward", "add_layer_norm_forward",
                            (_leaf(x), _leaf(torch.randn_like(x)), [4, 5], _leaf(w),
                             _leaf(bias) if bias is not None else None, 1e-5, rms)))
            _, mean, rstd = ops.layer_norm_forward(x, [4, 5], w, bias, 1e-5, rms)
            samples.append((f"{name}-backward", "layer_norm_backward",
                            (torch.randn_like(x), x, [4, 5], mean, rstd, w, rms,
                             [True, True, not rms])))
            samples.append((f"{name}-backward-grad_sum", "layer_norm_backward",
                            (torch.randn_like(x), x, [4, 5], mean, rstd, w, rms,
                             [True, False, False], torch.randn_like(x))))
            samples.append((f"{name}-backward-grad_sum-transposed", "layer_norm_backward",
                            (torch.randn_like(x), x, [4, 5], mean, rstd, w, rms,
                             [True, True, not rms], torch.randn(5, 4, 3, **opts).permute(2, 1, 0))))
    return samples


def _group_norm_samples(device):
    samples = []
    for dtype in (torch.float64, torch.bfloat16):
        opts = dict(device=device, dtype=dtype)
        w, b = torch.rand(6, **opts) + 0.5, torch.randn(6, **opts)
        for layout, x in layout_variants(torch.randn(3, 6, 4, 5, **opts)).items():
            name = f"group_norm-{str(dtype)[6:]}-{layout}"
            samples.append((f"{name}-forward", "group_norm_forward",
                            (_leaf(x), 3, _leaf(w), _leaf(b), 1e-5)))
            samples.append((f"{name}-forward-instance-noaffine", "group_norm_forward",
                            (_leaf(x), 6, None, None, 1e-5)))
            samples.append((f"{name}-forward-silu", "group_norm_forward",
                            (_leaf(x), 3, _leaf(w), _leaf(b), 1e-5, "silu")))
            # (the statistics from the CPU kernels: group norm has none on CUDA)
            _, mean, rstd = (t.to(device) for t in ops.group_norm_forward(
                x.cpu(), 3, w.cpu(), b.cpu(), 1e-5))
            samples.append((f"{name}-backward", "group_norm_backward",
                            (torch.randn_like(x), x, 3, mean, rstd, w, b, [True, True, True])))
            samples.append((f"{name}-backward-elu", "group_norm_backward",
                            (torch.randn_like(x), x, 3, mean, rstd, w, b, [True, True, True],
                             "elu", 0.01, 0.5)))
    return samples


def _fused_samples(device):
    samples = []
    opts = dict(device=device, dtype=torch.float64)
    x = torch.randn(3, 4, 3, 5, **opts)
    w, b = torch.rand(4, **opts) + 0.5, torch.randn(4, **opts)
    rm, rv = torch.randn(4, **opts), torch.rand(4, **opts) + 0.5
    for layout, xl in layout_variants(x).items():
        r, dy = torch.randn_like(xl), torch.randn_like(xl)
        for act, residual in (("relu", None), ("silu", r), ("leaky_relu", r), ("elu", None)):
            tag = f"{act}-{'res' if residual is not None else 'nores'}-{layout}"
            out, mean, invstd = ops.batch_norm_act_forward(
                xl, w, b, None, None, True, 0.1, 1e-5, act, 0.1, 0.5, residual)
            samples += [
                (f"act_forward-{tag}", "batch_norm_act_forward",
                 (xl, w, b, rm.clone(), rv.clone(), True, 0.1, 1e-5, act, 0.1, 0.5, residual)),
                (f"act_backward-{tag}", "batch_norm_act_backward",
                 (dy, xl, residual, None, w, b, mean, invstd, True, act, 0.1, 0.5, False, True)),
                (f"act-{tag}", "batch_norm_act",
                 (_leaf(xl), _leaf(w), _leaf(b), rm.clone(), rv.clone(), True, 0.1, 1e-5, act,
                  0.1, 0.5, None if residual is None else _leaf(residual), False)),
            ]
            if act != "silu":
                samples.append((f"act_backward-with_output-{tag}", "batch_norm_act_backward",
                                (dy, xl, None, out, w, b, mean, invstd, True, act, 0.1, 0.5,
                                 False, True)))
            sums = ops.batch_norm_act_backward_reduce(dy, xl, residual, None, w, b, mean,
                                                      invstd, act, 0.1, 0.5, False)
            count = float(xl.numel() // xl.shape[1])
            samples += [
                (f"act_elemt-{tag}", "batch_norm_act_elemt",
                 (xl, w, b, mean, invstd, act, 0.1, 0.5, residual)),
                (f"act_backward_reduce-{tag}", "batch_norm_act_backward_reduce",
                 (dy, xl, residual, None, w, b, mean, invstd, act, 0.1, 0.5, False)),
                (f"act_backward_elemt-{tag}", "batch_norm_act_backward_elemt",
                 (dy, xl, residual, None, w, b, mean, invstd, *sums[:2], count, act, 0.1, 0.5,
                  False)),
            ]
            if act in ("leaky_relu", "elu"):
                samples += [
                    (f"act_backward_reduce-from_output-{tag}", "batch_norm_act_backward_reduce",
                     (dy, out, residual, None, w, b, mean, invstd, act, 0.1, 0.5, True)),
                    (f"act_backward_elemt-from_output-{tag}", "batch_norm_act_backward_elemt",
                     (dy, out, residual, None, w, b, mean, invstd, *sums[:2], count, act, 0.1,
                      0.5, True)),
                ]
            if act in ("leaky_relu", "elu"):
                samples += [
                    (f"act_backward-from_output-{tag}", "batch_norm_act_backward",
                     (dy, out, residual, None, w, b, mean, invstd, True, act, 0.1, 0.5, True,
                      True)),
                    (f"act-memory_efficient-{tag}", "batch_norm_act",
                     (_leaf(xl), _leaf(w), _leaf(b), rm.clone(), rv.clone(), True, 0.1, 1e-5,
                      act, 0.1, 0.5, None if residual is None else _leaf(residual), True)),
                ]
    samples += [
        ("act_forward-eval", "batch_norm_act_forward",
         (x, w, b, rm.clone(), rv.clone(), False, 0.1, 1e-5, "relu6", 0.1, 0.5, None)),
        ("act_backward-eval-frozen", "batch_norm_act_backward",
         (torch.randn_like(x), x, None, None, w, b, rm, torch.rsqrt(rv + 1e-5), False, "relu6",
          0.1, 0.5, False, False)),
        ("weights_invertible", "batch_norm_weights_invertible", (w, b)),
        ("weights_invertible-zero-nobias", "batch_norm_weights_invertible", (w * 0, None)),
        ("act_backward_elemt-with_output", "batch_norm_act_backward_elemt",
         (torch.randn_like(x), x, None, torch.relu(x), w, b, x.mean((0, 2, 3)),
          torch.ones(4, **opts), torch.randn(4, **opts), torch.randn(4, **opts), 45.0, "relu",
          0.1, 0.5, False)),
        ("act-eval-noaffine", "batch_norm_act",
         (_leaf(x), None, None, rm.clone(), rv.clone(), False, 0.1, 1e-5, "identity", 0.1, 0.5,
          None, True)),
    ]
    return samples


_SAMPLE_IDS = [s[0] for s in _opcheck_samples("cpu")]


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("index", range(len(_SAMPLE_IDS)), ids=_SAMPLE_IDS)
def test_opcheck(index, device):
    _, name, args = _opcheck_samples(device)[index]
    if device == "cuda" and name.startswith("group_norm"):
        pytest.skip("the group norm ops have no CUDA kernels")
    op = getattr(OPS, name).default
    # schema (incl. the declared in-place mutations), autograd registration,
    # fake kernels (shapes, dtypes, strides) and aot dispatch with dynamic shapes
    result = torch.library.opcheck(op, args)
    assert all(v == "SUCCESS" for v in result.values()), result


def test_every_op_is_covered_by_opcheck():
    """Every op the extension registers (read from the dispatcher, so a new op
    without samples fails here) has opcheck samples."""
    registered = {name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("normext::")}
    assert "batch_norm" in registered
    assert {s[1] for s in _opcheck_samples("cpu")} == registered


# ---------------------------------------------------------------------------
# fake kernels and empty inputs


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

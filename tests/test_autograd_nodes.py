"""The autograd nodes of every normext norm (hand-written torch Nodes,
csrc/<norm>/autograd.cpp on common/autograd.h) keep the contracts of torch's
own: saved-tensor hooks, in-place and second-backward errors, retain_graph,
only the wanted gradients, threads, and compiled autograd."""

import copy
import threading

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import normext
from normext.functional import (add_layer_norm, batch_norm, batch_norm_act, group_norm,
                                group_norm_act, layer_norm, rms_norm)
from conftest import assert_close

# (name, layer call) for each node; memory_efficient keeps the output, and
# add_layer_norm its sum. The input is (4, 3, 5, 3): the layer norms take its
# last dim, the others its channels, with the same (3,) parameters.
CALLS = {
    "batch_norm": lambda x, w, b, r: batch_norm(x, None, None, w, b, True),
    "act": lambda x, w, b, r: batch_norm_act(x, None, None, w, b, True, activation="silu",
                                             residual=r),
    "act_memory_efficient": lambda x, w, b, r: batch_norm_act(
        x, None, None, w, b, True, activation="leaky_relu", memory_efficient=True),
    "act_derivative_from_output": lambda x, w, b, r: batch_norm_act(
        x, None, None, w, b, True, activation="relu", residual=r),
    "group_norm": lambda x, w, b, r: group_norm(x, 1, w, b),
    "group_norm_act": lambda x, w, b, r: group_norm_act(x, 3, w, b, activation="silu"),
    "layer_norm": lambda x, w, b, r: layer_norm(x, [3], w, b),
    "rms_norm": lambda x, w, b, r: rms_norm(x, [3], w, 1e-5),
    # Both outputs carry gradient: the node's sum through an op of its own.
    "add_layer_norm": lambda x, w, b, r: _sum_both(*add_layer_norm(x, r, [3], w, b)),
}

SHAPE = (4, 3, 5, 3)


def _sum_both(output, total):
    return output + total.sin()


def _reference(name, x, w, b, r):
    """The same call in torch's ops."""
    y = F.batch_norm(x, None, None, w, b, True)
    if name == "act":
        return F.silu(y + r)
    if name == "act_memory_efficient":
        return F.leaky_relu(y)
    if name == "act_derivative_from_output":
        return F.relu(y + r)
    if name == "group_norm":
        return F.group_norm(x, 1, w, b)
    if name == "group_norm_act":
        return F.silu(F.group_norm(x, 3, w, b))
    if name == "layer_norm":
        return F.layer_norm(x, [3], w, b)
    if name == "rms_norm":
        return F.rms_norm(x, [3], w, 1e-5)
    if name == "add_layer_norm":
        return _sum_both(F.layer_norm(x + r, [3], w, b), x + r)
    return y


def _normext_node(out):
    """The normext node that made `out`, or the one an op of its own consumed."""
    nodes = [out.grad_fn] + [next_node for next_node, _ in out.grad_fn.next_functions]
    return next(node for node in nodes if node is not None and "normext::" in node.name())


def _leaves(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    w = torch.rand(3, generator=gen, dtype=torch.float64) + 0.5
    b = torch.randn(3, generator=gen, dtype=torch.float64)
    r = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    return [t.requires_grad_() for t in (x, w, b, r)]


def _grads(name, call, seed=0):
    leaves = _leaves(seed)
    g = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed + 1),
                    dtype=torch.float64)
    out = call(*leaves)
    # (Zeros for the leaves a call does not take.)
    return out, torch.autograd.grad(out, leaves, g, allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize("name", CALLS)
def test_gradients_match_torch(name):
    out, grads = _grads(name, CALLS[name])
    expected_out, expected = _grads(name, lambda *t: _reference(name, *t))
    assert _normext_node(out) is not None
    assert_close(out, expected_out)
    for got, want in zip(grads, expected, strict=True):
        assert_close(got, want)


@pytest.mark.parametrize("name", CALLS)
def test_saved_tensor_hooks_pack_and_unpack_every_saved_tensor(name):
    """torch.autograd.graph.saved_tensors_hooks (CPU offloading, checkpointing
    tools) sees the tensors the node keeps; gradients are unchanged."""
    packed, unpacked = [], []

    def pack(t):
        packed.append(t.shape)
        return t.clone()

    def unpack(t):
        unpacked.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        out, grads = _grads(name, CALLS[name])
    _, expected = _grads(name, CALLS[name])
    assert torch.Size(SHAPE) in packed and len(unpacked) == len(packed)
    for got, want in zip(grads, expected, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("name", CALLS)
def test_inplace_change_of_a_saved_tensor_raises(name):
    x, w, b, r = _leaves()
    x2 = x * 1.0
    out = CALLS[name](x2, w, b, r)
    if name == "act_memory_efficient":
        out.add_(1)  # it keeps its output
    elif name == "add_layer_norm":
        out = add_layer_norm(x2, r, [3], w, b)[1].add_(1)  # it keeps its sum
    else:
        x2.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


@pytest.mark.parametrize("name", CALLS)
def test_second_backward_raises_and_retain_graph_allows_it(name):
    x, w, b, r = _leaves()
    out = CALLS[name](x, w, b, r)
    g = torch.randn_like(out)
    out.backward(g, retain_graph=True)
    first = x.grad.clone()
    out.backward(g)
    assert_close(x.grad, 2 * first)
    with pytest.raises(RuntimeError, match="second time"):
        out.backward(g)


@pytest.mark.parametrize("name", CALLS)
def test_only_the_inputs_that_require_grad_get_one(name):
    x, w, b, r = (t.detach() for t in _leaves())
    w.requires_grad_()
    out = CALLS[name](x, w, b, r)
    out.sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()
    assert x.grad is None and b.grad is None and r.grad is None
    (expected,) = torch.autograd.grad(_reference(name, x, w, b, r).sum(), [w])
    assert_close(w.grad, expected)


def test_backward_in_threads_matches_one_thread():
    """Graphs recorded and run backward in four threads at once."""
    expected = {name: _grads(name, call, seed=7)[1] for name, call in CALLS.items()}
    failures = []

    def work():
        try:
            for _ in range(5):
                for name, call in CALLS.items():
                    for got, want in zip(_grads(name, call, seed=7)[1], expected[name]):
                        assert torch.equal(got, want)
        except Exception as error:  # reported by the main thread
            failures.append(error)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[0]


class _Block(torch.nn.Module):
    """conv, fused BN + relu (memory-efficient or not), conv, fused BN +
    residual + relu, plain BN: every node kind in one backward."""

    def __init__(self, memory_efficient):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = normext.BatchNormAct2d(4, activation="leaky_relu",
                                          memory_efficient=memory_efficient)
        self.conv2 = torch.nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = normext.BatchNormAct2d(4, activation="relu")
        self.bn3 = normext.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn1(self.conv1(x))
        return self.bn3(self.bn2(self.conv2(y), x))


class _NormBlock(torch.nn.Module):
    """conv, GroupNorm + silu, conv, add + LayerNorm (both outputs used), RMSNorm
    and GroupNorm: the other norms' nodes in one backward."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.gn_act = normext.GroupNormAct(2, 4)
        self.conv2 = torch.nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.add_ln = normext.AddLayerNorm(5)
        self.rms = normext.RMSNorm(5)
        self.gn = normext.GroupNorm(4, 4)

    def forward(self, x):
        y, total = self.add_ln(self.conv2(self.gn_act(self.conv1(x))), x)
        return self.gn(self.rms(y) * total)


BLOCKS = {"batch_norm": lambda: _Block(False), "batch_norm_memory_efficient": lambda: _Block(True),
          "other_norms": _NormBlock}


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("block", BLOCKS)
def test_compiled_autograd_matches_eager(block, backend):
    """Compiled autograd (torch._dynamo.compiled_autograd) records each node as
    a call of its backward on its saved tensors: same gradients as eager."""
    from torch._dynamo import compiled_autograd
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    eager = BLOCKS[block]().double()
    traced = copy.deepcopy(eager)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    target = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    x_eager, x_traced = x.clone().requires_grad_(), x.clone().requires_grad_()
    (eager(x_eager) * target).sum().backward()
    with compiled_autograd._enable(torch.compile(backend=backend)):
        (traced(x_traced) * target).sum().backward()
    assert counters["compiled_autograd"]["captures"] == 1
    assert_close(x_traced.grad, x_eager.grad)
    traced_params = dict(traced.named_parameters())
    for name, p in eager.named_parameters():
        assert_close(traced_params[name].grad, p.grad, msg=f"grad of {name}")


@pytest.mark.skipif(not hasattr(torch.autograd.graph, "node_creation_hook"),
                    reason="torch.autograd.graph.node_creation_hook is newer than this torch")
@pytest.mark.parametrize("name", CALLS)
def test_node_creation_hook_sees_the_node(name):
    """torch.autograd.graph.node_creation_hook gets each node, complete."""
    seen = []
    with torch.autograd.graph.node_creation_hook(lambda node: seen.append(node.name())):
        out = CALLS[name](*_leaves())
    assert _normext_node(out).name() in seen


@pytest.mark.parametrize("op,call", [
    ("layer_norm_forward",
     lambda x, w: torch.ops.normext.layer_norm_forward(x, [3], w, None, 1e-5, True)),
    ("add_layer_norm_forward",
     lambda x, w: torch.ops.normext.add_layer_norm_forward(x, x, [3], w, None, 1e-5, False)),
    ("group_norm_forward",
     lambda x, w: torch.ops.normext.group_norm_forward(x, 3, w, None, 1e-5, "silu")),
])
def test_op_with_tangents_raises_naming_itself(op, call):
    """The ops have no forward derivative (normext.functional gives tangents to
    torch's ops): an error naming the op called, not a zero tangent."""
    x = torch.randn(SHAPE, dtype=torch.float64)
    w = torch.rand(3, dtype=torch.float64)
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match=f"normext::{op} has no"):
        call(x, fwAD.make_dual(w, torch.ones_like(w)))

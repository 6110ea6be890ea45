"""normext.SyncBatchNorm over gloo ranks on CPU: each rank holds a slice of one
global batch (uneven, one rank possibly empty), and everything must match
BatchNorm on the concatenated batch in one process."""

import copy
import datetime
import gc
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import normext

TIMEOUT = datetime.timedelta(seconds=60)  # a bug must fail, not hang CI


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(world_size, target, *args, backend="gloo"):
    port = _free_port()
    mp.start_processes(_init_and_run, args=(world_size, port, backend, target, args),
                       nprocs=world_size, join=True, start_method="spawn")


def _init_and_run(rank, world_size, port, backend, target, args):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=TIMEOUT)
    try:
        target(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def _slices(sizes):
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [slice(s, s + n) for s, n in zip(starts, sizes)]


def _check_layer(rank, world_size, sizes, memory_format, dtype, momentum, device="cpu"):
    torch.manual_seed(0)
    device = f"cuda:{rank}" if device == "cuda" else device
    C = 5
    x = (torch.randn(sum(sizes), C, 4, 3, dtype=torch.float64) * 3 + 7).to(device, dtype)
    x = x.contiguous(memory_format=memory_format)
    grad = torch.randn(x.shape, dtype=torch.float64).to(device, dtype)
    reference = torch.nn.BatchNorm2d(C, momentum=momentum).to(device, dtype)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.uniform_(-1, 1)
    sync = normext.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(reference))
    assert isinstance(sync, normext.SyncBatchNorm)

    mine = _slices(sizes)[rank]
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for step in range(2):
        x_full = x.clone().requires_grad_()
        out_full = reference(x_full)
        out_full.backward(grad)

        x_local = x[mine].clone().requires_grad_()
        out_local = sync(x_local)
        out_local.backward(grad[mine])

        torch.testing.assert_close(out_local, out_full[mine], **tol)
        torch.testing.assert_close(x_local.grad, x_full.grad[mine], **tol)
        # Parameter gradients are local; their sum over ranks is the full batch's.
        for name in ("weight", "bias"):
            summed = getattr(sync, name).grad.clone()
            dist.all_reduce(summed)
            torch.testing.assert_close(summed, getattr(reference, name).grad, **tol)
        torch.testing.assert_close(sync.running_mean, reference.running_mean, **tol)
        torch.testing.assert_close(sync.running_var, reference.running_var, **tol)
        assert int(sync.num_batches_tracked) == int(reference.num_batches_tracked) == step + 1
        for module in (sync, reference):
            module.zero_grad()
    if sizes[rank] > 0:
        assert out_local.is_contiguous(memory_format=memory_format)
    # Eval: local running stats, no communication needed.
    sync.eval()
    reference.eval()
    torch.testing.assert_close(sync(x[mine]), reference(x)[mine], **tol)


@pytest.mark.parametrize("sizes", [[3, 4], [2, 0, 5], [0, 0]],
                         ids=["2ranks", "3ranks-one-empty", "all-empty"])
def test_sync_matches_full_batch(sizes):
    _run(len(sizes), _check_layer, sizes, torch.contiguous_format, torch.float64, 0.1)


@pytest.mark.skipif(torch.cuda.device_count() < 2 or not dist.is_nccl_available()
                    or "cuda" not in normext.build_info()["backends"],
                    reason="needs 2 GPUs, NCCL and normext's CUDA kernels")
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_sync_nccl(memory_format):
    _run(2, _check_layer, [3, 4], memory_format, torch.float32, 0.1, "cuda", backend="nccl")


def test_sync_channels_last_momentum_none():
    _run(2, _check_layer, [5, 2], torch.channels_last, torch.float64, None)


def test_sync_float32_large_mean():
    _run(2, _check_layer, [4, 3], torch.contiguous_format, torch.float32, 0.1)


def _check_half(rank, world_size):
    torch.manual_seed(0)
    x = torch.randn(6, 4, 5, 5).to(torch.bfloat16)
    reference = torch.nn.BatchNorm2d(4)  # float32 params with a bfloat16 input
    sync = normext.convert(copy.deepcopy(reference), sync=True)
    mine = _slices([3, 3])[rank]
    out = sync(x[mine])
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference(x.float())[mine], rtol=2e-2, atol=3e-2)
    torch.testing.assert_close(sync.running_var, reference.running_var, rtol=1e-3, atol=1e-3)


def test_sync_bfloat16_input():
    _run(2, _check_half)


def _check_channel_mismatch(rank, world_size):
    layer = normext.SyncBatchNorm(4)
    channels = 4 if rank == 0 else 3
    # RuntimeError, as torch's "running_mean should contain 4 elements not 3"
    with pytest.raises(RuntimeError, match="rank 1 of the process group got an input with 3 "
                                           "channels"):
        layer(torch.randn(2, channels, 3, 3))


def test_sync_channel_mismatch_raises_on_every_rank():
    _run(2, _check_channel_mismatch)


def _check_no_channels(rank, world_size):
    """torch's ValueError for an input without channels, on every rank: the
    rank that has it does not leave the others waiting in a collective."""
    for flags in (dict(), dict(affine=False, track_running_stats=False)):
        layer = normext.SyncBatchNorm(3, **flags)
        with pytest.raises(ValueError, match="number of input channels should be non-zero"):
            layer(torch.randn(2, 3 if rank == 0 else 0, 2, 2))


def test_sync_input_without_channels_raises_on_every_rank():
    _run(2, _check_no_channels)


def _check_stateless_layer_any_channel_count(rank, world_size):
    """Without weight, bias or running stats, num_features constrains nothing,
    as in BatchNorm: every rank's 3 channels are normalized over the group."""
    torch.manual_seed(0)
    x = torch.randn(7, 3, 2, 2, dtype=torch.float64)
    flags = dict(affine=False, track_running_stats=False)
    layer = normext.SyncBatchNorm(4, **flags)
    mine = _slices([3, 4])[rank]
    torch.testing.assert_close(layer(x[mine]), torch.nn.BatchNorm2d(4, **flags)(x)[mine])
    # ranks that disagree all raise (gathering statistics of two sizes would abort gloo)
    with pytest.raises(RuntimeError, match=r"got inputs with \[3, 2\] channels"):
        layer(torch.randn(2, 3 - rank, 2, 2))


def test_sync_stateless_layer_takes_any_channel_count():
    _run(2, _check_stateless_layer_any_channel_count)


def _check_invalid_arguments(rank, world_size):
    """The checks of BatchNorm's eps and momentum, raised on every rank before
    any collective."""
    x = torch.randn(2, 3, 2, 2)
    for eps in (0.0, -1.0):
        with pytest.raises(ValueError, match="batch_norm eps must be positive"):
            normext.SyncBatchNorm(3, eps=eps)(x)
    for momentum, name in (("0.1", "str"), (torch.tensor([0.1]), "Tensor")):
        with pytest.raises(TypeError, match=f"argument 'momentum' .* must be float, not {name}"):
            normext.SyncBatchNorm(3, momentum=momentum)(x)
    layer = normext.SyncBatchNorm(3)  # the group still works
    assert torch.isfinite(layer(x)).all()


def test_sync_invalid_arguments_raise_like_batchnorm():
    _run(2, _check_invalid_arguments)


class _SmallCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.Conv2d(8, 8, 3, padding=1, stride=2), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.head = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.BatchNorm1d(6),
                                        torch.nn.Linear(6, 3))

    def forward(self, x):
        return self.head(self.features(x))


def _check_ddp(rank, world_size, sizes, fused=False):
    torch.manual_seed(0)
    model = _SmallCNN().double()
    reference = copy.deepcopy(model)
    if fused:
        synced = normext.fuse(model, sync=True)
        assert sum(type(m) is normext.SyncBatchNormAct for m in synced.modules()) == 2
        assert sum(type(m) is normext.SyncBatchNorm for m in synced.modules()) == 1
    else:
        synced = normext.convert(model, sync=True)
    ddp = torch.nn.parallel.DistributedDataParallel(synced)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    opt_ref = torch.optim.SGD(reference.parameters(), lr=0.1)
    total = sum(sizes)
    mine = _slices(sizes)[rank]
    for step in range(3):
        x = torch.randn(total, 3, 8, 8, dtype=torch.float64)
        y = torch.randint(0, 3, (total,))
        loss_ref = torch.nn.functional.cross_entropy(reference(x), y, reduction="sum") / total
        opt_ref.zero_grad()
        loss_ref.backward()
        opt_ref.step()
        # DDP averages gradients over ranks: scale the local share of the loss by world_size.
        local = torch.nn.functional.cross_entropy(ddp(x[mine]), y[mine], reduction="sum")
        opt.zero_grad()
        (local * world_size / total).backward()
        opt.step()
        summed = local.detach().clone()
        dist.all_reduce(summed)
        torch.testing.assert_close(summed / total, loss_ref.detach(), rtol=1e-9, atol=1e-9)
    for p, q in zip(ddp.module.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-8, atol=1e-8)
    for b, c in zip(ddp.module.buffers(), reference.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-8, atol=1e-8)
    # Tear DDP down (its reducer and the gradient hooks' pending work) on every
    # rank before the process group goes: otherwise an exiting rank can abort.
    del ddp, opt
    gc.collect()
    dist.barrier()


def test_ddp_training_matches_single_process():
    _run(2, _check_ddp, [5, 3])


def test_ddp_training_fused_sync_matches_single_process():
    _run(2, _check_ddp, [5, 3], True)


def test_no_process_group_runs_locally():
    assert not dist.is_initialized()
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5)
    reference = torch.nn.BatchNorm2d(3)
    layer = normext.SyncBatchNorm(3)
    torch.testing.assert_close(layer(x), reference(x))
    torch.testing.assert_close(layer.running_var, reference.running_var)
    for module in (torch.nn.SyncBatchNorm(3), layer):
        tracked = int(module.num_batches_tracked)
        with pytest.raises(ValueError, match="SyncBatchNorm number of input channels should be "
                                             "non-zero"):
            module(torch.randn(2, 0, 2, 2))
        assert int(module.num_batches_tracked) == tracked  # raised before counting the batch


def test_convert_sync_keeps_parameters():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4),
                                normext.BatchNorm2d(4, affine=False))
    weight = model[1].weight
    converted = normext.convert(model, sync=True)
    assert isinstance(converted[1], normext.SyncBatchNorm)
    assert isinstance(converted[2], normext.SyncBatchNorm)
    assert converted[1].weight is weight
    assert converted[2].weight is None


# ---- SyncBatchNormAct: the fused layer with statistics over the ranks

_ACTIVATIONS = {
    "identity": torch.nn.Identity(), "relu": torch.nn.ReLU(), "relu6": torch.nn.ReLU6(),
    "leaky_relu": torch.nn.LeakyReLU(0.1), "elu": torch.nn.ELU(0.7), "silu": torch.nn.SiLU(),
    # Negative parameters: the derivative cannot come from the output.
    "leaky_relu:negative": torch.nn.LeakyReLU(-0.3), "elu:negative": torch.nn.ELU(-0.6),
}


def _check_act_layers(rank, world_size, sizes, memory_format, cases):
    """For each (activation, with residual, memory_efficient, weight 0 in a
    channel): SyncBatchNormAct on this rank's slice against torch's BatchNorm2d,
    add and activation on the whole batch, over two training steps."""
    torch.manual_seed(0)
    C = 4
    mine = _slices(sizes)[rank]
    tol = dict(rtol=1e-9, atol=1e-9)
    for activation, with_residual, memory_efficient, zero_weight in cases:
        act, name = _ACTIVATIONS[activation], activation.split(":")[0]
        reference = torch.nn.BatchNorm2d(C).double()
        with torch.no_grad():
            reference.weight.uniform_(0.5, 1.5)
            reference.bias.uniform_(-1, 1)
            if zero_weight:
                reference.weight[1] = 0
        fused = normext.BatchNormAct2d(
            C, activation=name, negative_slope=getattr(act, "negative_slope", 0.01),
            alpha=getattr(act, "alpha", 1.0), memory_efficient=memory_efficient).double()
        fused.load_state_dict(reference.state_dict())
        sync = normext.convert(fused, sync=True)
        assert type(sync) is normext.SyncBatchNormAct and sync.weight is fused.weight
        assert (sync.activation, sync.memory_efficient) == (name, memory_efficient)
        for step in range(2):
            x = (torch.randn(sum(sizes), C, 3, 5, dtype=torch.float64) * 2 + 3).contiguous(
                memory_format=memory_format)
            r = torch.randn_like(x) if with_residual else None
            grad = torch.randn_like(x)
            x_full = x.clone().requires_grad_()
            r_full = r.clone().requires_grad_() if with_residual else None
            z = reference(x_full)
            out_full = act(z + r_full if with_residual else z)
            out_full.backward(grad)

            x_local = x[mine].clone().requires_grad_()
            r_local = r[mine].clone().requires_grad_() if with_residual else None
            out_local = sync(x_local, r_local)
            fused = x.device.type in normext.functional.FUSED_DEVICES
            if sizes[rank] > 0 and fused:  # memory_efficient keeps the output but for weight 0
                kept = out_local.grad_fn.saved_tensors[0]
                assert (kept.data_ptr() == out_local.data_ptr()) == (
                    memory_efficient and not zero_weight)
            out_local.backward(grad[mine])

            case = f"{activation} residual={with_residual} me={memory_efficient} step {step}"
            torch.testing.assert_close(out_local, out_full[mine], **tol, msg=case)
            torch.testing.assert_close(x_local.grad, x_full.grad[mine], **tol, msg=case)
            if with_residual:
                torch.testing.assert_close(r_local.grad, r_full.grad[mine], **tol, msg=case)
            for name in ("weight", "bias"):
                summed = getattr(sync, name).grad.clone()
                dist.all_reduce(summed)
                torch.testing.assert_close(summed, getattr(reference, name).grad, **tol,
                                           msg=case)
            torch.testing.assert_close(sync.running_mean, reference.running_mean, **tol)
            torch.testing.assert_close(sync.running_var, reference.running_var, **tol)
            assert int(sync.num_batches_tracked) == step + 1
            for module in (sync, reference):
                module.zero_grad()
        if sizes[rank] > 0:
            assert out_local.is_contiguous(memory_format=memory_format)


_ACT_CASES = [(a, r, False, False) for a in _ACTIVATIONS for r in (False, True)] + [
    ("leaky_relu", False, True, False), ("elu", True, True, False),
    ("identity", True, True, False), ("leaky_relu", True, True, True)]


def test_sync_act_matches_full_batch():
    _run(2, _check_act_layers, [3, 4], torch.contiguous_format, _ACT_CASES)


def test_sync_act_empty_rank_channels_last():
    cases = [("relu", True, False, False), ("silu", True, False, False),
             ("elu", True, True, False)]
    _run(3, _check_act_layers, [2, 0, 5], torch.channels_last, cases)


def _check_act_residual_mismatch(rank, world_size):
    """A residual of the wrong shape on one rank: every rank raises, none hangs."""
    layer = normext.SyncBatchNormAct(3)
    x = torch.randn(2, 3, 4, 4)
    residual = torch.randn(2, 3, 4, 4 if rank == 0 else 3)
    match = "residual of shape" if rank == 1 else "rank 1 of the process group got a residual"
    with pytest.raises(RuntimeError, match=match):
        layer(x, residual)
    assert torch.isfinite(layer(x, torch.randn_like(x))).all()  # the group still works


def test_sync_act_residual_mismatch_raises_on_every_rank():
    _run(2, _check_act_residual_mismatch)


def _check_composed(rank, world_size):
    """Where the layers compose instead of running fused kernels (CUDA until
    they have run on a GPU: functional.FUSED_DEVICES), SyncBatchNormAct is
    the synchronized batch norm, torch's add and activation: the same results,
    and the same error on every rank for a mismatched residual."""
    normext.functional.FUSED_DEVICES = ()
    _check_act_layers(rank, world_size, [3, 4], torch.contiguous_format,
                      [("relu", True, False, False), ("elu", True, True, False)])
    _check_act_residual_mismatch(rank, world_size)


def test_sync_act_composed_path():
    _run(2, _check_composed)


def test_sync_act_without_process_group_is_batch_norm_act():
    assert not dist.is_initialized()
    torch.manual_seed(0)
    x, r = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    layer = normext.SyncBatchNormAct(3, activation="elu", alpha=0.5, memory_efficient=True)
    reference = normext.BatchNormAct2d(3, activation="elu", alpha=0.5)
    torch.testing.assert_close(layer(x, r), reference(x, r))
    torch.testing.assert_close(layer.running_var, reference.running_var)
    assert layer.state_dict().keys() == torch.nn.BatchNorm2d(3).state_dict().keys()
    flags = torch.nn.BatchNorm2d(3).extra_repr()  # (bias=True in torch >= 2.12)
    assert repr(layer) == f"SyncBatchNormAct({flags}, activation=elu, alpha=0.5, " \
                          "memory_efficient=True)"
    with pytest.raises(ValueError, match="needs an invertible activation"):
        normext.SyncBatchNormAct(3, activation="relu", memory_efficient=True)


def test_convert_sync_timm_batch_norm_act():
    timm_norm = pytest.importorskip("timm.layers.norm_act")
    fusable = timm_norm.BatchNormAct2d(4, act_layer=torch.nn.SiLU)
    model = torch.nn.Sequential(fusable, timm_norm.BatchNormAct2d(4, act_layer=torch.nn.GELU))
    converted = normext.convert(model, sync=True)
    assert type(converted[0]) is normext.SyncBatchNormAct
    assert converted[0].activation == "silu" and converted[0].weight is fusable.weight
    assert not dict(converted[0].named_children())  # timm's act and drop are in the fused layer
    assert type(converted[1]) is timm_norm.BatchNormAct2d  # gelu: normext has no fused gelu
    assert converted.state_dict().keys() == model.state_dict().keys()
    x = torch.randn(2, 4, 3, 3)
    reference = copy.deepcopy(model)
    torch.testing.assert_close(converted(x), reference(x))

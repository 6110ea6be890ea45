"""normext.convert: swaps exact torch.nn.BatchNorm{1,2,3}d (and the lazy
ones) for normext's, sharing parameters and buffers, and leaves everything
else alone."""

import copy

import pytest
import torch

import normext
from conftest import DEVICE_PARAMS, assert_close

REPLACED = {torch.nn.BatchNorm1d: normext.BatchNorm1d, torch.nn.BatchNorm2d: normext.BatchNorm2d,
            torch.nn.BatchNorm3d: normext.BatchNorm3d}


class Block(torch.nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(channels)
        self.conv2 = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(channels, momentum=None)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


class MyBatchNorm2d(torch.nn.BatchNorm2d):
    """A user subclass: convert must not touch it."""

    def forward(self, x):
        return super().forward(x) * 0.5


class ResNetish(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3, padding=1, bias=False), torch.nn.BatchNorm2d(4),
            torch.nn.ReLU())
        self.blocks = torch.nn.Sequential(Block(4), Block(4))
        self.custom = MyBatchNorm2d(4)
        # a 3d branch over the (C, H, W) volume of the features
        self.volume = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3, padding=1),
                                          torch.nn.BatchNorm3d(2, affine=False))
        self.head = torch.nn.ModuleDict({
            "fc1": torch.nn.Linear(4 + 2, 8),
            "bn": torch.nn.BatchNorm1d(8, track_running_stats=False),
            "fc2": torch.nn.Linear(8, 3),
        })
        self.extra = torch.nn.ModuleList([torch.nn.BatchNorm1d(3), torch.nn.Identity()])

    def forward(self, x):
        x = self.custom(self.blocks(self.stem(x)))
        v = self.volume(x.unsqueeze(1))  # (N, 2, C, H, W)
        features = torch.cat([x.mean((2, 3)), v.mean((2, 3, 4))], dim=1)
        h = torch.relu(self.head["bn"](self.head["fc1"](features)))
        return self.extra[1](self.extra[0](self.head["fc2"](h)))


def _bn_types(model):
    return {name: type(m) for name, m in model.named_modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_convert_training_matches_torch(device):
    torch_model = ResNetish().to(device=device, dtype=torch.float64)
    ours = normext.convert(copy.deepcopy(torch_model))
    types = _bn_types(ours)
    assert types["stem.1"] is normext.BatchNorm2d
    assert types["blocks.0.bn1"] is normext.BatchNorm2d
    assert types["blocks.1.bn2"] is normext.BatchNorm2d
    assert types["volume.1"] is normext.BatchNorm3d
    assert types["head.bn"] is normext.BatchNorm1d
    assert types["extra.0"] is normext.BatchNorm1d
    assert types["custom"] is MyBatchNorm2d

    opt_t = torch.optim.SGD(torch_model.parameters(), lr=0.05, momentum=0.9)
    opt_o = torch.optim.SGD(ours.parameters(), lr=0.05, momentum=0.9)
    for step in range(3):
        x = torch.randn(4, 3, 6, 6, dtype=torch.float64, device=device)
        y = torch.randint(0, 3, (4,), device=device)
        losses = []
        for model, opt in ((torch_model, opt_t), (ours, opt_o)):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss)
        assert_close(losses[1], losses[0], msg=f"loss at step {step}")
    for (name, p), (_, q) in zip(torch_model.named_parameters(), ours.named_parameters()):
        assert_close(q, p, msg=name)
    for (name, b), (_, c) in zip(torch_model.named_buffers(), ours.named_buffers()):
        assert c.dtype == b.dtype
        assert_close(c, b, msg=name)
    torch_model.eval()
    ours.eval()
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64, device=device)
    assert_close(ours(x), torch_model(x))


def test_convert_keeps_parameters_buffers_and_flags():
    model = ResNetish().double()
    model.blocks[0].bn1.weight.requires_grad_(False)
    model.head["bn"].bias.requires_grad_(False)
    model.blocks[1].eval()  # a mixed training flag
    hook_calls = []
    model.stem[1].register_forward_hook(lambda *args: hook_calls.append(1))
    removed = model.stem[1].register_forward_pre_hook(lambda *args: hook_calls.append("removed"))
    before_modules = dict(model.named_modules())
    params = {name: p for name, p in model.named_parameters()}
    buffers = {name: b for name, b in model.named_buffers()}
    flags = {name: m.training for name, m in model.named_modules()}
    old_bns = {name: m for name, m in model.named_modules() if type(m) in REPLACED}

    converted = normext.convert(model)
    assert converted is model  # containers are updated in place

    for name, p in converted.named_parameters():
        assert p is params[name], name
        assert p.requires_grad == (name not in ("blocks.0.bn1.weight", "head.bn.bias")), name
        assert p.dtype == torch.float64 and p.device.type == "cpu"
    assert set(dict(converted.named_parameters())) == set(params)
    for name, b in converted.named_buffers():
        assert b is buffers[name], name
    assert set(dict(converted.named_buffers())) == set(buffers)
    for name, m in converted.named_modules():
        assert m.training == flags[name], name
        if name in old_bns:
            assert type(m) is REPLACED[type(old_bns[name])], name
            assert m is not old_bns[name]
            for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
                assert getattr(m, attr) == getattr(old_bns[name], attr), (name, attr)
        else:
            assert m is before_modules[name], name  # other modules are untouched
    # state_dict keys and values unchanged
    assert list(converted.state_dict()) == list(before_modules[""].state_dict())
    # hooks carried over, and a handle taken before the conversion still removes its hook
    removed.remove()
    converted(torch.randn(2, 3, 4, 4, dtype=torch.float64))
    assert hook_calls == [1]


def test_convert_leaves_other_modules_alone():
    sync = torch.nn.SyncBatchNorm(4)
    custom = MyBatchNorm2d(4)
    other_norm = torch.nn.LocalResponseNorm(2)  # a norm normext does not have
    model = torch.nn.Sequential(sync, custom, other_norm, torch.nn.BatchNorm2d(4))
    normext.convert(model)
    assert model[0] is sync and type(model[0]) is torch.nn.SyncBatchNorm
    assert model[1] is custom and type(model[1]) is MyBatchNorm2d
    assert model[2] is other_norm and type(model[2]) is torch.nn.LocalResponseNorm
    assert type(model[3]) is normext.BatchNorm2d


LAZY = [(torch.nn.LazyBatchNorm1d, normext.LazyBatchNorm1d, normext.BatchNorm1d, (4, 5, 3)),
        (torch.nn.LazyBatchNorm2d, normext.LazyBatchNorm2d, normext.BatchNorm2d, (4, 5, 3, 3)),
        (torch.nn.LazyBatchNorm3d, normext.LazyBatchNorm3d, normext.BatchNorm3d,
         (4, 5, 2, 3, 3))]


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("lazy,ours,final,shape", LAZY, ids=["1d", "2d", "3d"])
def test_convert_lazy_layers_matches_torch(lazy, ours, final, shape, device):
    """A lazy layer becomes normext's lazy layer (still an instance of
    torch's), which takes num_features from its first input and then is
    normext's layer; normext's kernels run from that first call on. Outputs,
    gradients and buffers match torch's lazy layer over training and eval steps."""
    reference = lazy(momentum=None, device=device, dtype=torch.float64)
    model = torch.nn.Sequential(lazy(momentum=None, device=device, dtype=torch.float64))
    layer = normext.convert(model)[0]
    assert type(layer) is ours and isinstance(layer, lazy)
    for step, training in enumerate([True, True, False]):
        reference.train(training)
        layer.train(training)
        x = torch.randn(shape, device=device, dtype=torch.float64, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_()
        out, expected = layer(x), reference(x_ref)
        assert type(layer) is final
        assert "normext" in out.grad_fn.name()
        assert_close(out, expected, msg=f"step {step}")
        grad = torch.randn_like(out)
        out.backward(grad)
        expected.backward(grad)
        assert_close(x.grad, x_ref.grad, msg=f"step {step}: input grad")
        for name, value in reference.state_dict().items():
            assert_close(layer.state_dict()[name], value, msg=f"step {step}: {name}")
    assert_close(layer.weight.grad, reference.weight.grad)
    assert_close(layer.bias.grad, reference.bias.grad)


@pytest.mark.parametrize("cls", [torch.nn.BatchNorm1d, torch.nn.BatchNorm2d,
                                 torch.nn.BatchNorm3d])
def test_convert_a_bare_batchnorm(cls):
    bn = cls(3)
    converted = normext.convert(bn)
    assert type(converted) is REPLACED[cls]
    assert converted.weight is bn.weight and converted.running_mean is bn.running_mean
    # other modules come back as themselves
    conv = torch.nn.Conv2d(3, 3, 1)
    assert normext.convert(conv) is conv
    # converting twice is harmless
    assert type(normext.convert(converted)) is REPLACED[cls]


def test_optimizer_created_before_convert_updates_converted_params():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4),
                                torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model = normext.convert(model)
    assert type(model[1]) is normext.BatchNorm1d
    weight_before = model[1].weight.detach().clone()
    bias_before = model[1].bias.detach().clone()
    loss = (model(torch.randn(8, 3)) - 1).pow(2).mean()
    loss.backward()
    assert model[1].weight.grad is not None
    opt.step()
    assert not torch.equal(model[1].weight.detach(), weight_before)
    assert not torch.equal(model[1].bias.detach(), bias_before)
    assert model[1].num_batches_tracked.item() == 1


def test_convert_state_dict_round_trip():
    torch_model = ResNetish()
    torch_model(torch.randn(2, 3, 4, 4))  # non-trivial running stats
    ours = normext.convert(copy.deepcopy(torch_model))
    fresh = ResNetish()
    fresh.load_state_dict(ours.state_dict(), strict=True)
    for key, value in torch_model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    fresh_ours = normext.convert(ResNetish())
    fresh_ours.load_state_dict(torch_model.state_dict(), strict=True)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_convert_keeps_device_and_dtype(device):
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.BatchNorm1d(3)).to(device)
    model[1].half()
    normext.convert(model)
    assert model[0].weight.device.type == device and model[0].weight.dtype == torch.float32
    assert model[1].weight.dtype == torch.float16 and model[1].running_mean.dtype == torch.float16
    assert model[1].running_mean.device.type == device

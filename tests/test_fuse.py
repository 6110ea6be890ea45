"""normext.fuse on torchvision models and nn.Sequential: the same losses as
the unfused torch model over three SGD steps in float64, every expected
pattern fused, the state_dict keys unchanged and the original left alone."""

import copy

import pytest
import torch

import normext

torchvision = pytest.importorskip("torchvision")


def _same_training(model, x, memory_efficient=False, steps=3, lr=1e-3):
    model = model.double()
    reference = copy.deepcopy(model)
    original_keys = list(model.state_dict())
    fused = normext.fuse(model, memory_efficient=memory_efficient)
    assert list(fused.state_dict()) == original_keys
    fused.load_state_dict(reference.state_dict(), strict=True)
    reference.load_state_dict(fused.state_dict(), strict=True)
    sgd_ref = torch.optim.SGD(reference.parameters(), lr=lr)
    sgd = torch.optim.SGD(fused.parameters(), lr=lr)
    x = x.double()
    for step in range(steps):
        torch.manual_seed(step)  # dropout and stochastic depth draw the same masks
        loss_ref = reference(x).square().mean()
        torch.manual_seed(step)
        loss = fused(x).square().mean()
        assert abs(loss.item() - loss_ref.item()) <= 1e-9 * max(1.0, abs(loss_ref.item())), step
        for opt, value in ((sgd_ref, loss_ref), (sgd, loss)):
            opt.zero_grad()
            value.backward()
            opt.step()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[key], value, rtol=1e-9, atol=1e-9)
    return fused, fused.normext_fuse_report


@pytest.mark.parametrize("name,fused,with_residual", [
    ("resnet18", 17, 8), ("resnet50", 49, 16), ("mobilenet_v2", 35, 0),
    ("efficientnet_b0", 33, 0)])
def test_torchvision_models(name, fused, with_residual):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10)
    original = copy.deepcopy(model)
    result, report = _same_training(model, torch.randn(4, 3, 64, 64))
    assert len(report.fused) == fused
    assert sum(1 for f in report.fused if f[2]) == with_residual
    assert isinstance(result, torch.fx.GraphModule)
    # the model given is left as it was (its layers are torch's)
    assert [type(m) for m in model.modules()] == [type(m) for m in original.modules()]
    # every BatchNorm is fused or converted, and each one left has its reason
    kinds = {type(m) for m in result.modules()}
    assert torch.nn.BatchNorm2d not in kinds
    assert all(reason for _, reason in report.left)


def test_resnet_residual_layers_take_the_add():
    model = torchvision.models.resnet18(num_classes=10)
    result = normext.fuse(model)
    layer = result.get_submodule("layer1.0.bn2")
    assert isinstance(layer, normext.BatchNormAct2d) and layer.activation == "relu"
    assert "add" not in str(result.code).split("layer1_0_bn2")[1].split("\n")[0]


def test_sequential_memory_efficient():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.LeakyReLU(0.1),
        torch.nn.Conv2d(8, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ELU(),
        torch.nn.Conv2d(8, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
    result, report = _same_training(model, torch.randn(4, 3, 16, 16), memory_efficient=True)
    assert [(f[1], f[3]) for f in report.fused] == [
        ("leaky_relu", True), ("elu", True), ("relu", False)]


class _Untraceable(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                        torch.nn.ReLU6())

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            return self.body(x)
        return self.body(-x)


def test_untraceable_model_fuses_sequential_patterns():
    torch.manual_seed(0)
    model = _Untraceable()
    result, report = _same_training(model, torch.randn(4, 3, 8, 8).abs())
    assert report.fused == [("body.1", "relu6", False, False)]
    assert isinstance(result.body[1], normext.BatchNormAct2d)
    assert isinstance(result.body[2], torch.nn.Identity)


@pytest.mark.parametrize("name,layers,fused", [("efficientnet_b0", 49, 33),
                                               ("regnety_016", 86, 82)])
def test_timm_models(name, layers, fused):
    """timm's BatchNormAct2d layers all become normext's (fused with the add
    and activation that follow where fx shows them); same losses, same keys."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    assert sum(type(m).__name__ == "BatchNormAct2d" for m in model.modules()) == layers
    result, report = _same_training(model, torch.randn(2, 3, 64, 64))
    assert len(report.fused) == fused
    kinds = [type(m) for m in result.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(kinds) == layers and set(kinds) == {normext.BatchNormAct2d}
    converted = normext.convert(timm.create_model(name, num_classes=10))
    assert sum(type(m) is normext.BatchNormAct2d for m in converted.modules()) == layers


def test_timm_resnet_looks_through_identity_drop_layers():
    """timm's ResNet blocks pass bn2 through drop_block (an nn.Identity when
    off) before act2: fuse looks through it, so every BatchNorm followed by an
    activation is fused; the shortcut's BatchNorms are left, as the residuals."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10)
    result, report = _same_training(model, torch.randn(2, 3, 64, 64))
    assert (len(report.fused), sum(1 for f in report.fused if f[2])) == (17, 8)
    assert [reason for _, reason in report.left] == [
        f"added as the residual of layer{i}.0.bn2" for i in (2, 3, 4)]

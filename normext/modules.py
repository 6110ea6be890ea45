"""Drop-in BatchNorm modules: subclasses of torch.nn.BatchNorm1d/2d/3d (same
constructor, parameters, buffers, state_dict, repr and input checks) whose
forward runs normext's kernels; BatchNormAct1d/2d/3d, the same layers with
their activation (and a residual add) fused; and LayerNorm, RMSNorm,
GroupNorm and InstanceNorm1d/2d/3d (and the lazy InstanceNorm classes),
subclasses of the torch.nn classes of those names."""

import torch

from . import functional, ops

__all__ = ["AddLayerNorm", "AddRMSNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormAct1d", "BatchNormAct2d",
           "BatchNormAct3d", "GroupNorm", "GroupNormAct", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
           "LayerNorm", "LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d",
           "LazyInstanceNorm1d", "LazyInstanceNorm2d", "LazyInstanceNorm3d", "RMSNorm"]


def traced_as_leaf(module: torch.nn.Module, *args: torch.fx.Proxy | None) -> torch.fx.Proxy:
    """`module` called on `args` as one call_module node. torch.fx's default
    tracer takes torch.nn's layers as leaves (by their __module__) and would
    trace into normext's."""
    tracer = args[0].tracer
    return tracer.create_proxy("call_module", tracer.path_of_module(module), args, {})


def _activation_repr(layer: torch.nn.Module) -> str:
    """A fused layer's activation and the parameter it uses, for extra_repr."""
    text = f"activation={layer.activation}"
    if layer.activation == "leaky_relu":
        text += f", negative_slope={layer.negative_slope}"
    elif layer.activation == "elu":
        text += f", alpha={layer.alpha}"
    return text


class _NormextForward:
    """torch.nn.modules.batchnorm._BatchNorm.forward with normext's batch_norm."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # (TorchScript cannot compile the fx check)
            if isinstance(input, torch.fx.Proxy):
                return traced_as_leaf(self, input)
        self._check_input_dim(input)
        # functional._batch_norm counts the batch in num_batches_tracked (and,
        # with momentum None, takes the cumulative average's factor from it).
        momentum: float | None = self.momentum
        counter: torch.Tensor | None = None
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            counter = self.num_batches_tracked
        elif momentum is None:
            momentum = 0.0
        # Batch statistics in training, and in eval when no running stats exist.
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        # Running stats are passed only when they are used or updated.
        pass_running = not self.training or self.track_running_stats
        return functional._batch_norm(
            input,
            self.running_mean if pass_running else None,
            self.running_var if pass_running else None,
            self.weight,
            self.bias,
            use_batch_stats,
            momentum,
            self.eps,
            counter,
        )


class BatchNorm1d(_NormextForward, torch.nn.BatchNorm1d):
    """torch.nn.BatchNorm1d on normext kernels; input (N, C) or (N, C, L)."""


class BatchNorm2d(_NormextForward, torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d on normext kernels; input (N, C, H, W)."""


class BatchNorm3d(_NormextForward, torch.nn.BatchNorm3d):
    """torch.nn.BatchNorm3d on normext kernels; input (N, C, D, H, W)."""


class LazyBatchNorm1d(_NormextForward, torch.nn.LazyBatchNorm1d):
    """torch.nn.LazyBatchNorm1d on normext kernels: num_features is taken from
    the first input, which turns the layer into a normext.BatchNorm1d."""

    cls_to_become = BatchNorm1d


class LazyBatchNorm2d(_NormextForward, torch.nn.LazyBatchNorm2d):
    """torch.nn.LazyBatchNorm2d on normext kernels; becomes a normext.BatchNorm2d."""

    cls_to_become = BatchNorm2d


class LazyBatchNorm3d(_NormextForward, torch.nn.LazyBatchNorm3d):
    """torch.nn.LazyBatchNorm3d on normext kernels; becomes a normext.BatchNorm3d."""

    cls_to_become = BatchNorm3d


class _BatchNormAct:
    """A torch.nn.BatchNorm*d (its parameters, buffers, state_dict and checks)
    whose output passes through an activation, after a residual add when
    forward is given one: activation(batch_norm(input) + residual), fused
    (normext.functional.batch_norm_act)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 activation: str = "relu", negative_slope: float = 0.01, alpha: float = 1.0,
                 memory_efficient: bool = False, device=None, dtype=None, **kwargs) -> None:
        # kwargs: the installed torch's keyword-only arguments (bias=, torch >= 2.12)
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype, **kwargs)
        self._set_activation(activation, negative_slope, alpha, memory_efficient)

    def _set_activation(self, activation: str, negative_slope: float, alpha: float,
                        memory_efficient: bool) -> None:
        ops._check_activation(activation, negative_slope, alpha, memory_efficient)
        self.activation = activation
        self.negative_slope = float(negative_slope)
        self.alpha = float(alpha)
        self.memory_efficient = memory_efficient

    def extra_repr(self) -> str:
        text = f"{super().extra_repr()}, {_activation_repr(self)}"
        if self.memory_efficient:
            text += ", memory_efficient=True"
        return text

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        # _NormextForward.forward's steps, inline like there: a helper both
        # called would cost every BatchNorm call a Python call.
        if isinstance(input, torch.fx.Proxy):
            return traced_as_leaf(self, input, residual)
        self._check_input_dim(input)
        momentum: float | None = self.momentum
        counter: torch.Tensor | None = None
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            counter = self.num_batches_tracked
        elif momentum is None:
            momentum = 0.0
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        pass_running = not self.training or self.track_running_stats
        return functional._batch_norm_act(
            input,
            self.running_mean if pass_running else None,
            self.running_var if pass_running else None,
            self.weight,
            self.bias,
            use_batch_stats,
            momentum,
            self.eps,
            self.activation,
            self.negative_slope,
            self.alpha,
            residual,
            self.memory_efficient,
            counter,
        )


class BatchNormAct1d(_BatchNormAct, torch.nn.BatchNorm1d):
    """torch.nn.BatchNorm1d fused with an activation (and residual add); input (N, C) or (N, C, L)."""


class BatchNormAct2d(_BatchNormAct, torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d fused with an activation (and residual add); input (N, C, H, W)."""


class BatchNormAct3d(_BatchNormAct, torch.nn.BatchNorm3d):
    """torch.nn.BatchNorm3d fused with an activation (and residual add); input (N, C, D, H, W)."""


class LayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm on normext kernels (normext.functional.layer_norm)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if isinstance(input, torch.fx.Proxy):
            return traced_as_leaf(self, input)
        return functional.layer_norm(input, self.normalized_shape, self.weight, self.bias,
                                     self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm on normext kernels (normext.functional.rms_norm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.fx.Proxy):
            return traced_as_leaf(self, x)
        return functional.rms_norm(x, self.normalized_shape, self.weight, self.eps)



class AddLayerNorm(LayerNorm):
    """torch.nn.LayerNorm (its parameters and state_dict) applied to input +
    residual: forward(input, residual) returns (layer_norm(input + residual),
    input + residual) in one fused pass (normext.functional.add_layer_norm),
    the pre-norm transformer's residual step."""

    def forward(self, input: torch.Tensor, residual: torch.Tensor):
        if isinstance(input, torch.fx.Proxy):
            return traced_as_leaf(self, input, residual)
        return functional.add_layer_norm(input, residual, self.normalized_shape, self.weight,
                                         self.bias, self.eps)


class AddRMSNorm(RMSNorm):
    """torch.nn.RMSNorm applied to input + residual: forward(input, residual)
    returns (rms_norm(input + residual), input + residual), fused
    (normext.functional.add_rms_norm)."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor):
        if isinstance(x, torch.fx.Proxy):
            return traced_as_leaf(self, x, residual)
        return functional.add_rms_norm(x, residual, self.normalized_shape, self.weight, self.eps)

class GroupNorm(torch.nn.GroupNorm):
    """torch.nn.GroupNorm on normext kernels (normext.functional.group_norm)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if isinstance(input, torch.fx.Proxy):
            return traced_as_leaf(self, input)
        return functional.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)


class GroupNormAct(GroupNorm):
    """torch.nn.GroupNorm (its parameters, state_dict and checks) whose output
    passes through an activation, fused (normext.functional.group_norm_act):
    GroupNorm + SiLU by default, the block of diffusion U-Nets. activation:
    "identity", "relu", "relu6", "leaky_relu" (negative_slope), "elu"
    (alpha) or "silu"."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5,
                 affine: bool = True, activation: str = "silu", negative_slope: float = 0.01,
                 alpha: float = 1.0, device=None, dtype=None, **kwargs) -> None:
        # kwargs: the installed torch's keyword-only arguments (bias=, torch >= 2.12)
        super().__init__(num_groups, num_channels, eps, affine, device=device, dtype=dtype,
                         **kwargs)
        ops._check_activation(activation, negative_slope, alpha, op="GroupNormAct")
        self.activation = activation
        self.negative_slope = float(negative_slope)
        self.alpha = float(alpha)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {_activation_repr(self)}"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if isinstance(input, torch.fx.Proxy):
            return traced_as_leaf(self, input)
        return functional.group_norm_act(input, self.num_groups, self.weight, self.bias, self.eps,
                                         self.activation, self.negative_slope, self.alpha)

class _NormextInstanceNorm:
    """torch.nn's _InstanceNorm (its checks, unbatched inputs and
    state_dict handling) with normext's instance_norm."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if isinstance(input, torch.fx.Proxy):
            return traced_as_leaf(self, input)
        return super().forward(input)

    def _apply_instance_norm(self, input: torch.Tensor) -> torch.Tensor:
        return functional.instance_norm(
            input, self.running_mean, self.running_var, self.weight, self.bias,
            self.training or not self.track_running_stats,
            self.momentum if self.momentum is not None else 0.0, self.eps)


class InstanceNorm1d(_NormextInstanceNorm, torch.nn.InstanceNorm1d):
    """torch.nn.InstanceNorm1d on normext kernels; input (N, C, L) or (C, L)."""


class InstanceNorm2d(_NormextInstanceNorm, torch.nn.InstanceNorm2d):
    """torch.nn.InstanceNorm2d on normext kernels; input (N, C, H, W) or (C, H, W)."""


class InstanceNorm3d(_NormextInstanceNorm, torch.nn.InstanceNorm3d):
    """torch.nn.InstanceNorm3d on normext kernels; input (N, C, D, H, W) or (C, D, H, W)."""


class LazyInstanceNorm1d(_NormextInstanceNorm, torch.nn.LazyInstanceNorm1d):
    """torch.nn.LazyInstanceNorm1d on normext kernels; becomes a normext.InstanceNorm1d."""

    cls_to_become = InstanceNorm1d


class LazyInstanceNorm2d(_NormextInstanceNorm, torch.nn.LazyInstanceNorm2d):
    """torch.nn.LazyInstanceNorm2d on normext kernels; becomes a normext.InstanceNorm2d."""

    cls_to_become = InstanceNorm2d


class LazyInstanceNorm3d(_NormextInstanceNorm, torch.nn.LazyInstanceNorm3d):
    """torch.nn.LazyInstanceNorm3d on normext kernels; becomes a normext.InstanceNorm3d."""

    cls_to_become = InstanceNorm3d

"""normext.SyncBatchNorm and SyncBatchNormAct: batch statistics over every
rank of a process group.

One collective in the forward (an all_gather of each rank's element count and
per-channel mean and biased variance, merged with Chan's formula) and one in
the backward (an all_reduce of sum(dy) and sum(dy * (x - mean)), with the
gradient at the activation's input in place of dy for SyncBatchNormAct).
Works with gloo on CPU tensors and NCCL on CUDA tensors.
"""

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from . import functional, ops
from .modules import _BatchNormAct, traced_as_leaf

__all__ = ["SyncBatchNorm", "SyncBatchNormAct"]


class _Fusion(NamedTuple):
    """What SyncBatchNormAct applies after the affine (normext.BatchNormAct's flags)."""
    activation: str
    negative_slope: float
    alpha: float
    memory_efficient: bool


def _check_ranks_have_channels(seen: list) -> None:
    """torch's error for an input without channels, on every rank (raised on
    the offending rank alone, it would leave the others in a collective)."""
    if 0 in seen:
        raise ValueError("SyncBatchNorm number of input channels should be non-zero (rank "
                         f"{seen.index(0)} of the process group got an input with 0 channels)")


_HEADER = 3  # a gathered row's [count, channels, residual matches the input]


def _merge_moments(gathered: torch.Tensor, channels: int):
    """Global (count, mean, biased var) from the ranks' [count, channels,
    residual_ok, mean(C), var(C)] rows, in float64: sum(n_i * (var_i +
    (mean_i - mean)^2)) adds non-negative terms only, so nothing cancels."""
    counts = gathered[:, 0]
    seen = gathered[:, 1]
    _check_ranks_have_channels(seen.tolist())
    bad_residual = (gathered[:, 2] == 0).nonzero().flatten().tolist()
    if bad_residual:  # RuntimeError, as the kernels' check of a residual
        raise RuntimeError(
            f"SyncBatchNormAct: rank {bad_residual[0]} of the process group got a residual "
            "whose shape, dtype or device differs from its input's")
    bad = (seen != channels).nonzero().flatten().tolist()
    if bad:  # RuntimeError, as torch's size checks of the per-channel tensors
        rank = bad[0]
        raise RuntimeError(
            f"SyncBatchNorm: rank {rank} of the process group got an input with "
            f"{int(seen[rank])} channels but the layer has {channels}")
    means = gathered[:, _HEADER:_HEADER + channels]
    variances = gathered[:, _HEADER + channels:]
    total = counts.sum()
    weights = (counts / total.clamp(min=1)).unsqueeze(1)
    mean = (weights * means).sum(0)
    var = (weights * (variances + (means - mean) ** 2)).sum(0)
    return float(total), mean, var


def _agreed_channel_count(input: torch.Tensor, group) -> int:
    """The channel count every rank's input has (one small all_gather), for a
    layer without per-channel tensors; a RuntimeError on every rank if they
    differ, where gathering differently sized statistics would abort gloo."""
    local = torch.tensor([input.size(1)], dtype=torch.float64, device=input.device)
    counts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(counts, local, group=group)
    seen = [int(c) for c in torch.cat(counts).tolist()]
    _check_ranks_have_channels(seen)
    if len(set(seen)) > 1:
        raise RuntimeError(
            f"SyncBatchNorm: the ranks of the process group got inputs with {seen} channels")
    return seen[0]


def _residual_matches(input: torch.Tensor, residual: torch.Tensor | None) -> bool:
    return residual is None or (residual.shape == input.shape and residual.dtype == input.dtype
                                and residual.device == input.device)


class _SyncBatchNorm(torch.autograd.Function):
    """The synchronized batch norm; with a fusion, activation(batch_norm(input)
    + residual) on the fused kernels. Without one, a residual is only checked
    (every rank raises if one rank's does not match its input)."""

    @staticmethod
    def forward(ctx, input, weight, bias, residual, running_mean, running_var, eps, momentum,
                channels, group, fusion):
        if input.size(1) == channels:
            mean, var = ops.batch_norm_moments(input)
            count = input.numel() // channels
        else:  # still join the collective so that no rank hangs; every rank then raises
            mean = var = torch.zeros(channels, device=input.device)
            count = 0
        residual_ok = _residual_matches(input, residual)
        local = torch.cat([
            torch.tensor([count, input.size(1), residual_ok], dtype=torch.float64,
                         device=input.device),
            mean.double(), var.double()])
        rows = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(rows, local, group=group)
        if not residual_ok:  # this rank's own, more precise, error
            ops._check_residual(input, residual)
        total, global_mean, global_var = _merge_moments(torch.stack(rows), channels)
        if total == 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, got input size "
                f"{input.size()} on this rank and 1 value per channel in all")
        stat_dtype = ops.accumulate_dtype(input.dtype)
        global_mean = global_mean.to(stat_dtype)
        if total == 0:  # every rank's batch is empty: BatchNorm's empty batch, stats unchanged
            invstd = torch.zeros_like(global_mean)
        else:
            invstd = ops.batch_norm_finalize(
                global_mean, global_var.to(stat_dtype), total, running_mean, running_var,
                momentum, eps)
        ctx.total, ctx.group, ctx.fusion = total, group, fusion
        ctx.bias_dtype = None if bias is None else bias.dtype
        if fusion is None:
            ctx.save_for_backward(input, weight, global_mean, invstd)
            return ops.batch_norm_elemt(input, weight, bias, global_mean, invstd)
        output = ops.batch_norm_act_elemt(input, weight, bias, global_mean, invstd,
                                          *fusion[:3], residual)
        # What normext.BatchNormAct keeps (csrc/batch_norm/autograd.cpp): the
        # output alone where memory_efficient can invert it; else the input,
        # with the output in place of a residual (not for silu).
        ctx.from_output = fusion.memory_efficient and ops.batch_norm_weights_invertible(
            weight, bias)
        derivative_from_output = (not ctx.from_output and residual is not None
                                  and ops.grad_from_output(*fusion[:3]))
        ctx.save_for_backward(
            output if ctx.from_output else input, weight, global_mean, invstd, bias,
            None if derivative_from_output else residual,
            output if derivative_from_output else None)
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        saved, weight, mean, invstd, *fused = ctx.saved_tensors
        if ctx.fusion is None:
            sum_dy, sum_dy_xmu, grad_weight, grad_bias = ops.batch_norm_backward_reduce(
                grad_out, saved, mean, invstd, weight)
        else:
            bias, residual, output = fused
            fused_args = (residual, output, weight, bias, mean, invstd)
            sum_dy, sum_dy_xmu, grad_weight, grad_bias = ops.batch_norm_act_backward_reduce(
                grad_out, saved, *fused_args, *ctx.fusion[:3], ctx.from_output)
        grad_input = grad_residual = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[3]:
            sums = torch.cat([sum_dy, sum_dy_xmu])
            dist.all_reduce(sums, group=ctx.group)
            sum_dy, sum_dy_xmu = sums.chunk(2)
            if ctx.total == 0:
                grad_input = torch.empty_like(grad_out)
                grad_residual = torch.empty_like(grad_out)
            elif ctx.fusion is None:
                grad_input = ops.batch_norm_backward_elemt(
                    grad_out, saved, mean, invstd, weight, sum_dy, sum_dy_xmu, ctx.total)
            else:
                grad_input, grad_residual = ops.batch_norm_act_backward_elemt(
                    grad_out, saved, *fused_args, sum_dy, sum_dy_xmu, ctx.total,
                    *ctx.fusion[:3], ctx.from_output)
        # Parameter gradients stay local: DistributedDataParallel averages them.
        grad_weight = grad_weight.to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_bias = grad_bias.to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        return (grad_input if ctx.needs_input_grad[0] else None, grad_weight, grad_bias,
                grad_residual if ctx.needs_input_grad[3] else None,
                None, None, None, None, None, None, None)


class SyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """Drop-in torch.nn.SyncBatchNorm (same constructor, state_dict and input
    ranks) on normext's kernels. Unlike torch's it also accepts CPU tensors
    (with a gloo process group). In eval mode, with a world size of 1, or
    without an initialized process group it runs the local kernels with no
    communication (torch.nn.SyncBatchNorm does the same).

    It subclasses _BatchNorm rather than torch.nn.SyncBatchNorm, which
    DistributedDataParallel refuses on CPU."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None, **kwargs):  # kwargs: `bias=` where torch has it
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         **kwargs)
        self.process_group = process_group

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _check_non_zero_input_channels(self, input):
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if isinstance(input, torch.fx.Proxy):
            return traced_as_leaf(self, input)
        return self._sync_forward(input, None, None)

    def _sync_forward(self, input: torch.Tensor, residual: torch.Tensor | None,
                      fusion: _Fusion | None) -> torch.Tensor:
        self._check_input_dim(input)
        group = self.process_group or (dist.group.WORLD if dist.is_available() else None)
        distributed = (self.training and dist.is_available() and dist.is_initialized()
                       and dist.get_world_size(group) > 1)
        if not distributed:  # (the distributed path raises it on every rank, after a collective)
            self._check_non_zero_input_channels(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        pass_running = not self.training or self.track_running_stats
        running_mean = self.running_mean if pass_running else None
        running_var = self.running_var if pass_running else None
        if not distributed:
            if fusion is None:
                return functional.batch_norm(input, running_mean, running_var, self.weight,
                                             self.bias, use_batch_stats, factor, self.eps)
            return functional.batch_norm_act(input, running_mean, running_var, self.weight,
                                             self.bias, use_batch_stats, factor, self.eps,
                                             *fusion[:3], residual, fusion.memory_efficient)
        functional._check_eps(self.eps, True)
        functional._check_momentum(factor)
        # A layer without per-channel tensors takes any channel count, as
        # BatchNorm does; the ranks must still agree on it.
        has_channel_state = any(t is not None for t in (self.weight, self.bias, running_mean,
                                                        running_var))
        channels = self.num_features if has_channel_state else _agreed_channel_count(input, group)
        if fusion is None or input.device.type in functional.FUSED_DEVICES:
            return _SyncBatchNorm.apply(input, self.weight, self.bias, residual, running_mean,
                                        running_var, self.eps, factor, channels, group, fusion)
        # Where the layers do not run fused kernels yet (functional.FUSED_DEVICES):
        # the synchronized batch norm (given the residual to check on every
        # rank alike), then torch's add and activation.
        z = _SyncBatchNorm.apply(input, self.weight, self.bias, residual, running_mean,
                                 running_var, self.eps, factor, channels, group, None)
        return functional._ACTIVATION_FUNCTIONS[fusion.activation](
            z if residual is None else z + residual, *fusion[1:3])

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """Like torch.nn.SyncBatchNorm.convert_sync_batchnorm, for torch.nn's and
        normext's BatchNorm layers: the new layers share the old ones'
        parameters and buffers. normext's BatchNormAct layers, and timm's
        BatchNormAct2d that normext.convert fuses, become SyncBatchNormAct
        layers with their activation; other BatchNorm subclasses with an
        activation of their own are left alone."""
        from .fuse import is_timm_batch_norm_act, timm_activation  # (fuse imports this module)
        converted = module
        fusion = None
        if isinstance(module, _BatchNormAct):
            fusion = _Fusion(module.activation, module.negative_slope, module.alpha,
                             module.memory_efficient)
        elif timm_activation(module) is not None:
            fusion = _Fusion(*timm_activation(module), False)
        elif is_timm_batch_norm_act(module):  # with an activation or drop layer normext lacks
            return module
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            if fusion is None:
                converted = SyncBatchNorm(module.num_features, module.eps, module.momentum,
                                          module.affine, module.track_running_stats,
                                          process_group)
            else:
                converted = SyncBatchNormAct(
                    module.num_features, module.eps, module.momentum, module.affine,
                    module.track_running_stats, *fusion, process_group=process_group)
            if module.affine:
                with torch.no_grad():
                    converted.weight = module.weight
                    converted.bias = module.bias  # None for bias=False
            converted.running_mean = module.running_mean
            converted.running_var = module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
            converted.training = module.training
            if hasattr(module, "qconfig"):
                converted.qconfig = module.qconfig
            if fusion is not None:
                return converted  # (timm's act and drop: in the fused layer)
        for name, child in module.named_children():
            converted.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return converted


class SyncBatchNormAct(_BatchNormAct, SyncBatchNorm):
    """normext.BatchNormAct2d (any input rank, as SyncBatchNorm) with batch
    statistics over the ranks of `process_group`: activation(batch_norm(input)
    + residual), the same constructor with process_group=, the same
    state_dict. memory_efficient keeps the output as BatchNormAct does.

    The CPU runs the fused kernels; elsewhere (functional.FUSED_DEVICES) the
    synchronized batch norm is followed by torch's add and activation."""

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(input, torch.fx.Proxy):
            return traced_as_leaf(self, input, residual)
        return self._sync_forward(input, residual, _Fusion(
            self.activation, self.negative_slope, self.alpha, self.memory_efficient))

"""Typed wrappers of the torch.ops.normext ops, and their fake (meta) kernels.

Statistics tensors (mean, var, invstd, sums) are 1-D with C elements in the
accumulate dtype: float32, or float64 for a float64 input.
"""

import math

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

from . import _extension  # noqa: F401  (registers the ops)

_ops = torch.ops.normext


def batch_norm_moments(input: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance over every dim but dim 1."""
    return _ops.batch_norm_moments.default(input)


def batch_norm_finalize(
    mean: Tensor, var: Tensor, count: float, running_mean: Tensor | None,
    running_var: Tensor | None, momentum: float, eps: float,
) -> Tensor:
    """invstd = 1/sqrt(var + eps); updates the running stats in place (running_var
    with the unbiased variance of `count` elements per channel)."""
    return _ops.batch_norm_finalize.default(
        mean, var, float(count), running_mean, running_var, momentum, eps)


def batch_norm_elemt(
    input: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, invstd: Tensor
) -> Tensor:
    """(input - mean) * invstd * weight + bias, per channel."""
    return _ops.batch_norm_elemt.default(input, weight, bias, mean, invstd)


def batch_norm_backward_reduce(
    grad_out: Tensor, input: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(sum dy, sum dy*(x-mean), grad_weight, grad_bias) per channel."""
    return _ops.batch_norm_backward_reduce.default(grad_out, input, mean, invstd, weight)


def batch_norm_backward_elemt(
    grad_out: Tensor, input: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None,
    sum_dy: Tensor, sum_dy_xmu: Tensor, count: float,
) -> Tensor:
    """The input gradient under batch statistics over `count` elements per channel."""
    return _ops.batch_norm_backward_elemt.default(
        grad_out, input, mean, invstd, weight, sum_dy, sum_dy_xmu, float(count))


def batch_norm_forward(
    input: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
    running_var: Tensor | None, training: bool, momentum: float, eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Fused forward: (output, mean, invstd); updates the running stats in training."""
    return _ops.batch_norm_forward.default(
        input, weight, bias, running_mean, running_var, training, momentum, eps)


def batch_norm(
    input: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
    running_var: Tensor | None, training: bool, momentum: float, eps: float,
) -> Tensor:
    """torch.nn.functional.batch_norm's output, differentiable through a C++
    autograd node (the fused forward and backward); updates the running stats
    in training."""
    # Spelled out (the op packet, no alias) so that TorchScript can compile it.
    return torch.ops.normext.batch_norm(
        input, weight, bias, running_mean, running_var, training, momentum, eps)


def batch_norm_backward(
    grad_out: Tensor, input: Tensor, weight: Tensor | None, save_mean: Tensor,
    save_invstd: Tensor, training: bool, parameter_grads: bool = True,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Fused backward: (grad_input, grad_weight, grad_bias); without
    parameter_grads the last two are None, and in eval nothing is reduced."""
    return _ops.batch_norm_backward.default(
        grad_out, input, weight, save_mean, save_invstd, training, parameter_grads)


# ---- fake kernels: shapes, dtypes and strides of the outputs, for torch.compile


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _like_input(input: Tensor) -> Tensor:
    """Mirrors csrc/common/channel_view.cpp: the kernels work in the memory
    format the strides suggest (as torch's batch norm does), keeping a dense
    input's strides and making anything else dense in that format."""
    memory_format = suggest_memory_format(input)
    if input.is_contiguous(memory_format=memory_format):
        return input.new_empty_strided(input.shape, input.stride())
    return torch.empty_like(input, memory_format=memory_format)


def _check_args(input: Tensor, grad_output: Tensor | None = None,
                **per_channel: Tensor | None) -> None:
    """The kernels' rank, shape and device checks (csrc/batch_norm/common.cpp),
    so that a fake run (torch.compile, meta tensors) raises where the kernels
    would instead of returning shapes for arguments they reject.

    Conditions on sizes go through torch._check (a RuntimeError, like the
    kernels' TORCH_CHECK): on symbolic sizes it records a runtime assertion
    instead of guarding on them, so torch.compile(dynamic=True) does not
    recompile for another batch or spatial size."""
    torch._check(input.dim() >= 2, lambda: (
        "batch_norm: expected an input of shape (N, C, ...) with at least "
        f"2 dims, got {input.dim()} dims"))
    if grad_output is not None:
        _check_shape_of_input(input, grad_output, "grad_output")
    channels = input.shape[1]
    for name, t in dict(per_channel, grad_output=grad_output).items():
        if t is None:
            continue
        torch._check(t.device == input.device, lambda: (
            f"batch_norm: expected {name} on the input's device {input.device} but it is on "
            f"{t.device}"))
        if name != "grad_output":
            torch._check(t.numel() == channels,
                         lambda: f"{name} should contain {channels} elements not {t.numel()}")
        if name.startswith("running_"):
            torch._check(t.dim() == 1, lambda: (
                f"batch_norm: expected {name} of shape [{channels}] but got {list(t.shape)}"))


def _check_shape_of_input(input: Tensor, other: Tensor, name: str) -> None:
    def message():
        return f"batch_norm: expected {name} of shape {list(input.shape)} but got " \
               f"{list(other.shape)}"
    torch._check(other.dim() == input.dim(), message)
    for other_size, size in zip(other.shape, input.shape):
        torch._check(other_size == size, message)


def _check_count(count: float, op: str) -> None:
    # ValueError, as the kernels raise (TORCH_CHECK_VALUE)
    torch._check_value(math.isfinite(count) and count > 0, lambda: (
        f"{op}: expected a positive element count per channel, got {count}"))


def _stat(input: Tensor) -> Tensor:
    return input.new_empty((input.shape[1],), dtype=accumulate_dtype(input.dtype))


def _param_dtype(input: Tensor, weight: Tensor | None) -> torch.dtype:
    return weight.dtype if weight is not None else accumulate_dtype(input.dtype)


@torch.library.register_fake("normext::batch_norm_moments")
def _(input):
    _check_args(input)
    return _stat(input), _stat(input)


@torch.library.register_fake("normext::batch_norm_finalize")
def _(mean, var, count, running_mean, running_var, momentum, eps):
    _check_count(count, "batch_norm_finalize")
    for name, t in (("var", var), ("running_mean", running_mean), ("running_var", running_var)):
        if t is not None:
            def message():
                return f"batch_norm_finalize: expected {name} of shape {list(mean.shape)} on " \
                       f"{mean.device}"
            torch._check(t.device == mean.device, message)
            torch._check(t.numel() == mean.numel(), message)
    return torch.empty_like(mean, memory_format=torch.contiguous_format)


@torch.library.register_fake("normext::batch_norm_elemt")
def _(input, weight, bias, mean, invstd):
    _check_args(input, weight=weight, bias=bias, mean=mean, invstd=invstd)
    return _like_input(input)


@torch.library.register_fake("normext::batch_norm_backward_reduce")
def _(grad_out, input, mean, invstd, weight):
    _check_args(input, grad_out, mean=mean, invstd=invstd, weight=weight)
    grad_type = _param_dtype(input, weight)
    return _stat(input), _stat(input), _stat(input).to(grad_type), _stat(input).to(grad_type)


@torch.library.register_fake("normext::batch_norm_backward_elemt")
def _(grad_out, input, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
    _check_count(count, "batch_norm_backward_elemt")
    _check_args(input, grad_out, mean=mean, invstd=invstd, weight=weight,
                sum_dy=sum_dy, sum_dy_xmu=sum_dy_xmu)
    return _like_input(input)


@torch.library.register_fake("normext::batch_norm_forward")
def _(input, weight, bias, running_mean, running_var, training, momentum, eps):
    _check_args(input, running_mean=running_mean, running_var=running_var, weight=weight,
                bias=bias)
    return _like_input(input), _stat(input), _stat(input)


@torch.library.register_fake("normext::batch_norm")
def _(input, weight, bias, running_mean, running_var, training, momentum, eps):
    _check_args(input, running_mean=running_mean, running_var=running_var, weight=weight,
                bias=bias)
    return _like_input(input)


@torch.library.register_fake("normext::batch_norm_backward")
def _(grad_out, input, weight, save_mean, save_invstd, training, parameter_grads=True):
    _check_args(input, grad_out, weight=weight, save_mean=save_mean, save_invstd=save_invstd)
    if not parameter_grads:
        return _like_input(input), None, None
    grad_type = _param_dtype(input, weight)
    return _like_input(input), _stat(input).to(grad_type), _stat(input).to(grad_type)


# ---- batch norm + activation (+ residual), fused


def batch_norm_act_forward(
    input: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
    running_var: Tensor | None, training: bool, momentum: float, eps: float, activation: str,
    negative_slope: float, alpha: float, residual: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(activation(batch_norm(input) + residual), mean, invstd); updates the
    running stats in training."""
    return _ops.batch_norm_act_forward.default(
        input, weight, bias, running_mean, running_var, training, momentum, eps, activation,
        negative_slope, alpha, residual)


def batch_norm_act_backward(
    grad_out: Tensor, saved: Tensor, residual: Tensor | None, output: Tensor | None,
    weight: Tensor | None, bias: Tensor | None, save_mean: Tensor, save_invstd: Tensor,
    training: bool, activation: str, negative_slope: float, alpha: float, saved_is_output: bool,
    parameter_grads: bool = True,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """(grad_input, grad_residual, grad_weight, grad_bias) of batch_norm_act_forward,
    from its input (`saved`) with its residual or with its output (the
    activation's derivative from the output: see grad_from_output), or, saved_is_output,
    from its output alone (an invertible activation: identity, leaky_relu or
    elu with a positive parameter). grad_residual: where a residual or an
    output is given."""
    return _ops.batch_norm_act_backward.default(
        grad_out, saved, residual, output, weight, bias, save_mean, save_invstd, training,
        activation, negative_slope, alpha, saved_is_output, parameter_grads)


def batch_norm_act(
    input: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
    running_var: Tensor | None, training: bool, momentum: float, eps: float, activation: str,
    negative_slope: float, alpha: float, residual: Tensor | None, memory_efficient: bool,
) -> Tensor:
    """activation(batch_norm(input) + residual), differentiable through a C++
    autograd node; memory_efficient keeps the output instead of the input for
    the backward."""
    return torch.ops.normext.batch_norm_act(
        input, weight, bias, running_mean, running_var, training, momentum, eps, activation,
        negative_slope, alpha, residual, memory_efficient)


_ACTIVATIONS = ("identity", "relu", "relu6", "leaky_relu", "elu", "silu")


def _check_activation(activation: str, negative_slope: float, alpha: float,
                      memory_efficient: bool = False, op: str = "batch_norm_act") -> None:
    """The kernels' ValueErrors (csrc/common/activation.cpp, csrc/batch_norm/common.cpp)."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"{op}: unknown activation '{activation}'; expected one of "
                         f"{', '.join(_ACTIVATIONS)}")
    if memory_efficient and not (activation == "identity"
                                 or (activation == "leaky_relu" and negative_slope > 0)
                                 or (activation == "elu" and alpha > 0)):
        raise ValueError("memory_efficient=True recovers the activation's input from its "
                         "output, so it needs an invertible activation: identity, leaky_relu "
                         "with negative_slope > 0, or elu with alpha > 0")


def _check_residual(input: Tensor, residual: Tensor | None, name: str = "residual") -> None:
    """check_same_as_input (csrc/batch_norm/common.cpp) for a residual or an output."""
    if residual is None:
        return
    _check_shape_of_input(input, residual, name)
    torch._check(residual.device == input.device, lambda: (
        f"batch_norm: expected {name} on the input's device {input.device} but it is on "
        f"{residual.device}"))
    torch._check(residual.dtype == input.dtype, lambda: (
        f"batch_norm: expected {name} of dtype {input.dtype} but got {residual.dtype}"))


@torch.library.register_fake("normext::batch_norm_act_forward")
def _(input, weight, bias, running_mean, running_var, training, momentum, eps, activation,
      negative_slope, alpha, residual):
    _check_activation(activation, negative_slope, alpha)
    _check_args(input, running_mean=running_mean, running_var=running_var, weight=weight,
                bias=bias)
    _check_residual(input, residual)
    return _like_input(input), _stat(input), _stat(input)


@torch.library.register_fake("normext::batch_norm_act")
def _(input, weight, bias, running_mean, running_var, training, momentum, eps, activation,
      negative_slope, alpha, residual, memory_efficient):
    _check_activation(activation, negative_slope, alpha, memory_efficient)
    _check_args(input, running_mean=running_mean, running_var=running_var, weight=weight,
                bias=bias)
    _check_residual(input, residual)
    return _like_input(input)


def grad_from_output(activation: str, negative_slope: float, alpha: float) -> bool:
    """Whether the activation's derivative is a function of its output
    (csrc/common/activation.h: grad_from_output)."""
    return (activation != "silu" and (activation != "leaky_relu" or negative_slope >= 0)
            and (activation != "elu" or alpha >= 0))


def _check_fused_grad(grad_out, saved, residual, output, weight, bias, activation,
                      negative_slope, alpha, saved_is_output, **stats) -> None:
    """The fused backward ops' checks (csrc/batch_norm/ops.h: fused_grad_inputs)."""
    _check_activation(activation, negative_slope, alpha, saved_is_output)
    torch._check_value(output is None or (not saved_is_output and residual is None
                                          and grad_from_output(activation, negative_slope,
                                                               alpha)), lambda: (
        "batch_norm_act_backward: an output is given with the forward's input, in place of "
        "the residual, and not for silu, leaky_relu with a negative slope or elu with a "
        "negative alpha"))
    _check_args(saved, grad_out, weight=weight, bias=bias, **stats)
    _check_residual(saved, residual)
    _check_residual(saved, output, "output")


@torch.library.register_fake("normext::batch_norm_act_backward")
def _(grad_out, saved, residual, output, weight, bias, save_mean, save_invstd, training,
      activation, negative_slope, alpha, saved_is_output, parameter_grads=True):
    _check_fused_grad(grad_out, saved, residual, output, weight, bias, activation, negative_slope,
                      alpha, saved_is_output, save_mean=save_mean, save_invstd=save_invstd)
    grad_residual = None if residual is None and output is None else _like_input(saved)
    if not parameter_grads:
        return _like_input(saved), grad_residual, None, None
    grad_type = _param_dtype(saved, weight)
    return (_like_input(saved), grad_residual, _stat(saved).to(grad_type),
            _stat(saved).to(grad_type))


# ---- the synchronized fused batch norm's pieces (normext.SyncBatchNormAct)


def batch_norm_act_elemt(
    input: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, invstd: Tensor,
    activation: str, negative_slope: float, alpha: float, residual: Tensor | None,
) -> Tensor:
    """activation((input - mean) * invstd * weight + bias + residual), per channel."""
    return _ops.batch_norm_act_elemt.default(input, weight, bias, mean, invstd, activation,
                                             negative_slope, alpha, residual)


def batch_norm_act_backward_reduce(
    grad_out: Tensor, saved: Tensor, residual: Tensor | None, output: Tensor | None,
    weight: Tensor | None, bias: Tensor | None, mean: Tensor, invstd: Tensor, activation: str,
    negative_slope: float, alpha: float, saved_is_output: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """batch_norm_backward_reduce through the activation (and residual), from
    what batch_norm_act_backward reads: (sum dz, sum dz*(x-mean), grad_weight,
    grad_bias), dz the gradient at the activation's input."""
    return _ops.batch_norm_act_backward_reduce.default(
        grad_out, saved, residual, output, weight, bias, mean, invstd, activation,
        negative_slope, alpha, saved_is_output)


def batch_norm_act_backward_elemt(
    grad_out: Tensor, saved: Tensor, residual: Tensor | None, output: Tensor | None,
    weight: Tensor | None, bias: Tensor | None, mean: Tensor, invstd: Tensor, sum_dy: Tensor,
    sum_dy_xmu: Tensor, count: float, activation: str, negative_slope: float, alpha: float,
    saved_is_output: bool,
) -> tuple[Tensor, Tensor | None]:
    """(grad_input, grad_residual) from the sums of batch_norm_act_backward_reduce
    over `count` elements per channel; grad_residual where a residual or an
    output is given."""
    return _ops.batch_norm_act_backward_elemt.default(
        grad_out, saved, residual, output, weight, bias, mean, invstd, sum_dy, sum_dy_xmu,
        float(count), activation, negative_slope, alpha, saved_is_output)


def batch_norm_weights_invertible(weight: Tensor | None, bias: Tensor | None) -> bool:
    """Whether memory_efficient can recover the normalized input from the
    output: every |weight| >= 1e-3 * max(1, |bias|) (a device-to-host copy
    of the answer)."""
    return weight is None or bool(_ops.batch_norm_weights_invertible.default(weight, bias))


@torch.library.register_fake("normext::batch_norm_act_elemt")
def _(input, weight, bias, mean, invstd, activation, negative_slope, alpha, residual):
    _check_activation(activation, negative_slope, alpha)
    _check_args(input, weight=weight, bias=bias, mean=mean, invstd=invstd)
    _check_residual(input, residual)
    return _like_input(input)


@torch.library.register_fake("normext::batch_norm_act_backward_reduce")
def _(grad_out, saved, residual, output, weight, bias, mean, invstd, activation, negative_slope,
      alpha, saved_is_output):
    _check_fused_grad(grad_out, saved, residual, output, weight, bias, activation, negative_slope,
                      alpha, saved_is_output, mean=mean, invstd=invstd)
    grad_type = _param_dtype(saved, weight)
    return _stat(saved), _stat(saved), _stat(saved).to(grad_type), _stat(saved).to(grad_type)


@torch.library.register_fake("normext::batch_norm_weights_invertible")
def _(weight, bias):
    torch._check(bias is None or (bias.numel() == weight.numel() and bias.device == weight.device),
                 lambda: f"batch_norm_weights_invertible: expected a bias of {weight.numel()} "
                         f"elements on {weight.device}")
    return weight.new_empty((), dtype=torch.bool)


@torch.library.register_fake("normext::batch_norm_act_backward_elemt")
def _(grad_out, saved, residual, output, weight, bias, mean, invstd, sum_dy, sum_dy_xmu, count,
      activation, negative_slope, alpha, saved_is_output):
    _check_count(count, "batch_norm_act_backward_elemt")
    _check_fused_grad(grad_out, saved, residual, output, weight, bias, activation, negative_slope,
                      alpha, saved_is_output, mean=mean, invstd=invstd, sum_dy=sum_dy,
                      sum_dy_xmu=sum_dy_xmu)
    grad_residual = None if residual is None and output is None else _like_input(saved)
    return _like_input(saved), grad_residual


# ---- layer norm (LayerNorm, and RMSNorm: rms=True, no mean, no bias)


def layer_norm_forward(
    input: Tensor, normalized_shape: list[int], weight: Tensor | None, bias: Tensor | None,
    eps: float, rms: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(output, mean, rstd) over the trailing normalized_shape; the statistics
    shaped as torch's native_layer_norm returns them (mean 0 where rms),
    differentiable in output (the backward is layer_norm_backward)."""
    return _ops.layer_norm_forward.default(input, normalized_shape, weight, bias, eps, rms)


def layer_norm_backward(
    grad_out: Tensor, input: Tensor, normalized_shape: list[int], mean: Tensor, rstd: Tensor,
    weight: Tensor | None, rms: bool, output_mask: list[bool], grad_sum: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(grad_input, grad_weight, grad_bias), each None unless output_mask asks for it;
    grad_sum (the input's shape and dtype) is added to grad_input in its pass."""
    return _ops.layer_norm_backward.default(grad_out, input, normalized_shape, mean, rstd, weight,
                                           rms, output_mask, grad_sum)


def _check_layer_norm(input: Tensor, normalized_shape, weight: Tensor | None,
                      bias: Tensor | None) -> None:
    """The kernels' checks (csrc/layer_norm/ops.h: rows_of) for a fake run."""
    shape = tuple(normalized_shape)
    torch._check(len(shape) > 0, lambda: "Expected normalized_shape to be at least 1-dimensional")
    for param in (weight, bias):
        torch._check(param is None or tuple(param.shape) == shape,
                     lambda: f"Expected weight to be of same shape as normalized_shape, but got "
                             f"weight of shape {list(param.shape)} and normalized_shape = "
                             f"{list(shape)}")
    torch._check(input.dim() >= len(shape) and tuple(input.shape[input.dim() - len(shape):])
                 == shape,
                 lambda: f"Given normalized_shape={list(shape)}, expected input with shape "
                         f"[*, {', '.join(map(str, shape))}], but got input of size"
                         f"{list(input.shape)}")
    torch._check(input.dtype.is_floating_point,
                 lambda: f"layer_norm: expected a floating-point input, got {input.dtype}")


def _layer_norm_stat_shape(input: Tensor, normalized_shape) -> list[int]:
    axis = input.dim() - len(normalized_shape)
    return list(input.shape[:axis]) + [1] * len(normalized_shape)


@torch.library.register_fake("normext::layer_norm_forward")
def _(input, normalized_shape, weight, bias, eps, rms):
    _check_layer_norm(input, normalized_shape, weight, bias)
    torch._check(not (rms and bias is not None), lambda: "layer_norm_forward: rms takes no bias")
    stat = input.new_empty(_layer_norm_stat_shape(input, normalized_shape),
                           dtype=accumulate_dtype(input.dtype))
    return input.new_empty(input.shape), stat, torch.empty_like(stat)


@torch.library.register_fake("normext::layer_norm_backward")
def _(grad_out, input, normalized_shape, mean, rstd, weight, rms, output_mask, grad_sum=None):
    _check_layer_norm(input, normalized_shape, weight, None)
    torch._check(grad_out.shape == input.shape and grad_out.dtype == input.dtype,
                 lambda: "layer_norm_backward: expected grad_out of the input's shape and dtype")
    torch._check(grad_sum is None or (grad_sum.shape == input.shape
                                      and grad_sum.dtype == input.dtype
                                      and grad_sum.device == input.device),
                 lambda: "layer_norm_backward: expected grad_sum of the input's shape, dtype "
                         "and device")
    param_dtype = input.dtype if weight is None else weight.dtype
    return (input.new_empty(input.shape) if output_mask[0] else None,
            input.new_empty(normalized_shape, dtype=param_dtype)
            if output_mask[1] and weight is not None else None,
            input.new_empty(normalized_shape, dtype=param_dtype) if output_mask[2] else None)


def add_layer_norm_forward(
    input: Tensor, residual: Tensor, normalized_shape: list[int], weight: Tensor | None,
    bias: Tensor | None, eps: float, rms: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(output, sum, mean, rstd): the layer norm (rms: RMSNorm) of sum = input
    + residual, rounded to the input's dtype, in one pass; differentiable in
    output and sum."""
    return _ops.add_layer_norm_forward.default(input, residual, normalized_shape, weight, bias,
                                               eps, rms)


@torch.library.register_fake("normext::add_layer_norm_forward")
def _(input, residual, normalized_shape, weight, bias, eps, rms):
    _check_layer_norm(input, normalized_shape, weight, bias)
    torch._check(not (rms and bias is not None), lambda: "layer_norm_forward: rms takes no bias")
    torch._check(residual.shape == input.shape and residual.dtype == input.dtype,
                 lambda: "add_layer_norm_forward: expected a residual of the input's shape, "
                         "dtype and device")
    stat = input.new_empty(_layer_norm_stat_shape(input, normalized_shape),
                           dtype=accumulate_dtype(input.dtype))
    return (input.new_empty(input.shape), input.new_empty(input.shape), stat,
            torch.empty_like(stat))


# ---- group norm (GroupNorm, and InstanceNorm: one group per channel)


def group_norm_forward(
    input: Tensor, groups: int, weight: Tensor | None, bias: Tensor | None, eps: float,
    activation: str = "identity", negative_slope: float = 0.01, alpha: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """(output, mean, rstd) with the statistics of each (sample, group), shaped
    (N, groups) as torch's native_group_norm returns them; the output (through
    the activation, batch_norm_act's names) in the input's memory format,
    differentiable (the backward is group_norm_backward)."""
    return _ops.group_norm_forward.default(input, groups, weight, bias, eps, activation,
                                          negative_slope, alpha)


def group_norm_backward(
    grad_out: Tensor, input: Tensor, groups: int, mean: Tensor, rstd: Tensor,
    weight: Tensor | None, bias: Tensor | None, output_mask: list[bool],
    activation: str = "identity", negative_slope: float = 0.01, alpha: float = 1.0,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(grad_input, grad_weight, grad_bias), each None unless output_mask asks
    for it; through the activation at the output recomputed from the input."""
    return _ops.group_norm_backward.default(grad_out, input, groups, mean, rstd, weight, bias,
                                           output_mask, activation, negative_slope, alpha)


def _check_group_norm(input: Tensor, groups: int, weight: Tensor | None,
                      bias: Tensor | None) -> None:
    """The kernels' checks (csrc/group_norm/ops.h: groups_view) for a fake run."""
    torch._check(input.dim() >= 2, lambda: f"Expected at least 2 dimensions for input tensor but "
                                           f"received {input.dim()}")
    channels = input.shape[1]
    torch._check(groups > 0, lambda: f"Expected num groups to be greater than 0, got {groups}")
    torch._check(channels % groups == 0,
                 lambda: f"Expected number of channels in input to be divisible by num_groups, "
                         f"but got input of shape {list(input.shape)} and num_groups={groups}")
    for name, param in (("weight", weight), ("bias", bias)):
        torch._check(param is None or (param.dim() == 1 and param.numel() == channels),
                     lambda: f"Expected {name} to be a vector of size equal to the number of "
                             f"channels in input, but got {name} of shape {list(param.shape)} "
                             f"and input of shape {list(input.shape)}")
    torch._check(input.dtype.is_floating_point,
                 lambda: f"group_norm: expected a floating-point input, got {input.dtype}")


@torch.library.register_fake("normext::group_norm_forward")
def _(input, groups, weight, bias, eps, activation="identity", negative_slope=0.01, alpha=1.0):
    _check_activation(activation, negative_slope, alpha, op="group_norm")
    _check_group_norm(input, groups, weight, bias)
    stat = input.new_empty((input.shape[0], groups), dtype=accumulate_dtype(input.dtype))
    return _like_input(input), stat, torch.empty_like(stat)


@torch.library.register_fake("normext::group_norm_backward")
def _(grad_out, input, groups, mean, rstd, weight, bias, output_mask, activation="identity",
      negative_slope=0.01, alpha=1.0):
    _check_activation(activation, negative_slope, alpha, op="group_norm")
    _check_group_norm(input, groups, weight, bias)
    torch._check(grad_out.shape == input.shape and grad_out.dtype == input.dtype,
                 lambda: "group_norm_backward: expected grad_out of the input's shape and dtype")
    param_dtype = input.dtype if weight is None else weight.dtype
    channels = (input.shape[1],)
    return (_like_input(input) if output_mask[0] else None,
            input.new_empty(channels, dtype=param_dtype)
            if output_mask[1] and weight is not None else None,
            input.new_empty(channels, dtype=param_dtype) if output_mask[2] else None)

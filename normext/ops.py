"""Typed wrappers of the torch.ops.normext ops, and their fake (meta) kernels.

Statistics tensors (mean, var, invstd, sums) are 1-D with C elements in the
accumulate dtype: float32, or float64 for a float64 input.
"""

import torch
from torch import Tensor

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


def batch_norm_backward(
    grad_out: Tensor, input: Tensor, weight: Tensor | None, save_mean: Tensor,
    save_invstd: Tensor, training: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Fused backward: (grad_input, grad_weight, grad_bias)."""
    return _ops.batch_norm_backward.default(
        grad_out, input, weight, save_mean, save_invstd, training)


# ---- fake kernels: shapes, dtypes and strides of the outputs, for torch.compile


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _channels_last_dense(t: Tensor) -> bool:
    """Mirrors csrc/batch_norm/common.cpp: memory is (dim0, dim2.., dim1) row-major."""
    expected = 1
    for d in [1] + list(range(t.dim() - 1, 1, -1)) + [0]:
        if t.size(d) == 1:
            continue
        if t.stride(d) != expected:
            return False
        expected *= t.size(d)
    return True


def _like_input(input: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """The kernels keep a contiguous or channels-last input's strides and make
    anything else contiguous."""
    dtype = input.dtype if dtype is None else dtype
    if input.is_contiguous() or _channels_last_dense(input):
        return input.new_empty_strided(input.shape, input.stride(), dtype=dtype)
    return input.new_empty(input.shape, dtype=dtype)


def _stat(input: Tensor) -> Tensor:
    return input.new_empty((input.shape[1],), dtype=accumulate_dtype(input.dtype))


def _param_dtype(input: Tensor, weight: Tensor | None) -> torch.dtype:
    return weight.dtype if weight is not None else accumulate_dtype(input.dtype)


@torch.library.register_fake("normext::batch_norm_moments")
def _(input):
    return _stat(input), _stat(input)


@torch.library.register_fake("normext::batch_norm_finalize")
def _(mean, var, count, running_mean, running_var, momentum, eps):
    return torch.empty_like(mean, memory_format=torch.contiguous_format)


@torch.library.register_fake("normext::batch_norm_elemt")
def _(input, weight, bias, mean, invstd):
    return _like_input(input)


@torch.library.register_fake("normext::batch_norm_backward_reduce")
def _(grad_out, input, mean, invstd, weight):
    grad_type = _param_dtype(input, weight)
    return _stat(input), _stat(input), _stat(input).to(grad_type), _stat(input).to(grad_type)


@torch.library.register_fake("normext::batch_norm_backward_elemt")
def _(grad_out, input, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
    return _like_input(input)


@torch.library.register_fake("normext::batch_norm_forward")
def _(input, weight, bias, running_mean, running_var, training, momentum, eps):
    return _like_input(input), _stat(input), _stat(input)


@torch.library.register_fake("normext::batch_norm_backward")
def _(grad_out, input, weight, save_mean, save_invstd, training):
    grad_type = _param_dtype(input, weight)
    return _like_input(input), _stat(input).to(grad_type), _stat(input).to(grad_type)

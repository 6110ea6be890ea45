"""normext.functional.batch_norm: torch.nn.functional.batch_norm on normext's kernels."""

import torch
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function_variadic

from . import ops

__all__ = ["batch_norm"]


def _reduction_dims(input: Tensor) -> list[int]:
    return [0] + list(range(2, input.dim()))


def _per_channel(t: Tensor, input: Tensor) -> Tensor:
    return t.reshape([1, -1] + [1] * (input.dim() - 2))


def _differentiable_backward(ctx, grad_out: Tensor):
    """The backward in differentiable torch ops, for create_graph=True (double
    backward): under batch statistics the mean and variance are recomputed
    from the input so the graph sees their dependence on it."""
    input, weight, save_mean, save_invstd = ctx.saved_tensors
    compute_dtype = ops.accumulate_dtype(input.dtype)
    x = input.to(compute_dtype)
    g = grad_out.to(compute_dtype)
    dims = _reduction_dims(input)
    if ctx.training:
        mean = x.mean(dims, keepdim=True)
        invstd = torch.rsqrt(x.var(dims, unbiased=False, keepdim=True) + ctx.eps)
    else:
        mean, invstd = _per_channel(save_mean, input), _per_channel(save_invstd, input)
    x_hat = (x - mean) * invstd
    scale = invstd if weight is None else invstd * _per_channel(weight.to(compute_dtype), input)
    if ctx.training:
        grad_input = (g - g.mean(dims, keepdim=True)
                      - x_hat * (g * x_hat).mean(dims, keepdim=True)) * scale
    else:
        grad_input = g * scale
    grad_weight = (g * x_hat).sum(dims)
    grad_bias = g.sum(dims)
    return grad_input.to(input.dtype), grad_weight, grad_bias


def _as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)  # skips the call when it is a no-op


class _BatchNorm(torch.autograd.Function):
    # forward(ctx, ...) rather than setup_context: apply() costs ~3 us instead
    # of ~16 us, which matters next to a batch norm of a small tensor.
    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, training, momentum, eps):
        output, save_mean, save_invstd = ops.batch_norm_forward(
            input, weight, bias, running_mean, running_var, training, momentum, eps)
        # The statistics are saved, not returned: an output would cost the
        # backward a zero gradient to materialize for each.
        ctx.save_for_backward(input, weight, save_mean, save_invstd)
        ctx.training, ctx.eps = training, eps
        ctx.bias_dtype = None if bias is None else bias.dtype
        return output

    @staticmethod
    def backward(ctx, grad_out):
        input, weight, save_mean, save_invstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            grad_input, grad_weight, grad_bias = _differentiable_backward(ctx, grad_out)
        else:
            grad_input, grad_weight, grad_bias = ops.batch_norm_backward(
                grad_out, input, weight, save_mean, save_invstd, ctx.training)
        needs = ctx.needs_input_grad
        grad_weight = _as_dtype(grad_weight, weight.dtype) if needs[1] else None
        grad_bias = _as_dtype(grad_bias, ctx.bias_dtype) if needs[2] else None
        return (grad_input if needs[0] else None, grad_weight, grad_bias,
                None, None, None, None, None)


def _torch_allows_zero_eps_in_eval() -> bool:
    try:
        torch.nn.functional.batch_norm(torch.ones(1, 1), torch.zeros(1), torch.ones(1), eps=0.0)
        return True
    except ValueError:
        return False


# torch 2.11 rejects eps <= 0 in every mode; later releases allow eps = 0 in
# eval (with other messages). normext follows the torch it runs with.
_ZERO_EPS_IN_EVAL = _torch_allows_zero_eps_in_eval()


def _check_eps(eps: float, training: bool) -> None:
    if not _ZERO_EPS_IN_EVAL:
        if eps <= 0.0:
            raise ValueError(f"batch_norm eps must be positive, but got {eps}")
    elif training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    elif eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Same signature, behaviour and errors as torch.nn.functional.batch_norm."""
    if has_torch_function_variadic(input, running_mean, running_var, weight, bias):
        return handle_torch_function(
            batch_norm, (input, running_mean, running_var, weight, bias), input,
            running_mean, running_var, weight=weight, bias=bias, training=training,
            momentum=momentum, eps=eps)
    if training:
        torch.nn.functional._verify_batch_size(input.size())
    _check_eps(eps, training)
    if torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (input, weight, bias)):
        output = _BatchNorm.apply(
            input, weight, bias, running_mean, running_var, training, momentum, eps)
    else:  # nothing to differentiate: skip autograd's bookkeeping
        output, _, _ = ops.batch_norm_forward(
            input, weight, bias, running_mean, running_var, training, momentum, eps)
    return output

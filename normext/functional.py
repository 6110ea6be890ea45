"""normext.functional: torch.nn.functional.batch_norm, layer_norm, rms_norm,
group_norm and instance_norm on normext's kernels, and batch_norm_act, batch
norm fused with its activation (and a residual add)."""

import sys

import torch
from torch import Tensor
from torch.autograd import forward_ad
from torch.overrides import handle_torch_function, has_torch_function_variadic

from . import ops
from ._extension import _C

__all__ = ["add_layer_norm", "add_rms_norm", "batch_norm", "batch_norm_act", "group_norm",
           "group_norm_act", "instance_norm", "layer_norm", "rms_norm"]


def _torch_allows_zero_eps_in_eval() -> bool:
    try:
        torch.nn.functional.batch_norm(torch.ones(1, 1), torch.zeros(1), torch.ones(1), eps=0.0)
        return True
    except ValueError:
        return False


# torch 2.11 rejects eps <= 0 in every mode; later releases allow eps = 0 in
# eval (with other messages). normext follows the torch it runs with.
_ZERO_EPS_IN_EVAL = _torch_allows_zero_eps_in_eval()


# The flag is a default argument: TorchScript takes those, not global bools.
def _check_eps(eps: float, training: bool, zero_eps_in_eval: bool = _ZERO_EPS_IN_EVAL) -> None:
    if not zero_eps_in_eval:
        if eps <= 0.0:
            raise ValueError(f"batch_norm eps must be positive, but got {eps}")
    elif training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    elif eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


_HEAP_TYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: a class defined in Python


def _type_name(value) -> str:
    """The name torch's argument errors give a value's type (C's tp_name): the
    bare name for classes defined in Python and for builtins, else module.name."""
    cls = type(value)
    if cls.__flags__ & _HEAP_TYPE or cls.__module__ == "builtins":
        return cls.__name__
    return f"{cls.__module__}.{cls.__name__}"


def _check_momentum(momentum: float) -> None:
    """torch's argument parser's TypeError for a momentum that is not a float:
    the op's own parser would raise RuntimeError, and take a 1-element 1-D
    tensor that torch rejects. torch takes Python numbers, numpy's number and
    bool scalars, symbolic numbers, and 0-dim tensors."""
    if isinstance(momentum, (float, int, torch.SymFloat, torch.SymInt)):
        return
    np = sys.modules.get("numpy")  # not imported: the value cannot be a numpy scalar
    if np is not None and isinstance(momentum, (np.number, np.bool_)):
        return
    if isinstance(momentum, Tensor) and momentum.dim() == 0 and not momentum.requires_grad:
        return
    raise TypeError(f"batch_norm(): argument 'momentum' (position 7) must be float, "
                    f"not {_type_name(momentum)}")


def _has_tangents(*tensors: Tensor | None) -> bool:
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


# Eager calls take the extension's direct entries (csrc/batch_norm/python.cpp:
# no boxed call, whose argument matching costs a small layer time); torch.compile
# and torch.export trace the ops themselves.
_batch_norm_op = torch.ops.normext.batch_norm.default
_batch_norm_direct = _C.batch_norm


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
    """Same signature, behaviour and errors as torch.nn.functional.batch_norm.
    Under torch.func transforms and forward-mode AD it is torch's batch_norm."""
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                       None)


def _count_batch(num_batches_tracked: Tensor | None, momentum: float | None) -> float | None:
    """torch's _BatchNorm.forward before its batch_norm call: a module's
    num_batches_tracked counts the batch, and momentum None asks for the
    cumulative average (factor 1 / num_batches_tracked). Returns the factor."""
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if momentum is None:
            return 1.0 / float(num_batches_tracked)
    return momentum


def _check_args(input: Tensor, training: bool, momentum: float | None, eps: float,
                num_batches_tracked: Tensor | None) -> None:
    """batch_norm's argument errors, raised after the batch is counted (torch's
    modules count it first). Each check is called only for values it might reject."""
    try:
        # (a batch of one value per channel: no other dim above 1, or no channel)
        if training and (input.dim() < 2 or input.numel() == input.size(1)):
            torch.nn.functional._verify_batch_size(input.size())
        if not eps > 0.0:
            _check_eps(eps, training)
        if type(momentum) is not float and not (
                momentum is None and num_batches_tracked is not None):
            _check_momentum(momentum)
    except (ValueError, TypeError):
        _count_batch(num_batches_tracked, momentum)
        raise


def _batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    num_batches_tracked: Tensor | None,
) -> Tensor:
    """batch_norm, after the modules' step before it (_count_batch, given
    their num_batches_tracked when it counts; momentum may then be None). An
    eager call has the extension's entry count, which costs less than add_;
    a tensor subclass's counter counts here (its __torch_function__ sees add_)."""
    if has_torch_function_variadic(input, running_mean, running_var, weight, bias):
        momentum = _count_batch(num_batches_tracked, momentum)
        return handle_torch_function(
            batch_norm, (input, running_mean, running_var, weight, bias), input,
            running_mean, running_var, weight=weight, bias=bias, training=training,
            momentum=momentum, eps=eps)
    # TorchScript checks argument types, and has neither transforms nor tangents.
    if not torch.jit.is_scripting():
        # torch.func transforms (vmap, grad, jvp, ...) and forward-mode AD
        # tangents: normext's op has neither batching rules nor a forward
        # derivative, torch's batch_norm has both.
        if torch._C._are_functorch_transforms_active() or (
                forward_ad._current_level >= 0 and _has_tangents(input, weight, bias)):
            momentum = _count_batch(num_batches_tracked, momentum)
            return torch.nn.functional.batch_norm(
                input, running_mean, running_var, weight, bias, training, momentum, eps)
        if torch.compiler.is_compiling():  # traced: the count as torch's, and the op
            momentum = _count_batch(num_batches_tracked, momentum)
            _check_args(input, training, momentum, eps, None)
            return _batch_norm_op(input, weight, bias, running_mean, running_var, training,
                                  momentum, eps)
        if num_batches_tracked is not None and type(num_batches_tracked) is not Tensor:
            momentum, num_batches_tracked = _count_batch(num_batches_tracked, momentum), None
        _check_args(input, training, momentum, eps, num_batches_tracked)
        return _batch_norm_direct(input, weight, bias, running_mean, running_var, training,
                                  momentum, eps, num_batches_tracked)
    momentum = _count_batch(num_batches_tracked, momentum)
    if training:
        torch.nn.functional._verify_batch_size(input.size())
    _check_eps(eps, training)
    assert momentum is not None  # (TorchScript's refinement) a module's momentum None counts
    return ops.batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps)


_ACTIVATION_FUNCTIONS = {
    "identity": lambda z, negative_slope, alpha: z,
    "relu": lambda z, negative_slope, alpha: torch.nn.functional.relu(z),
    "relu6": lambda z, negative_slope, alpha: torch.nn.functional.relu6(z),
    "leaky_relu": lambda z, negative_slope, alpha: torch.nn.functional.leaky_relu(
        z, negative_slope),
    "elu": lambda z, negative_slope, alpha: torch.nn.functional.elu(z, alpha),
    "silu": lambda z, negative_slope, alpha: torch.nn.functional.silu(z),
}

_batch_norm_act_op = torch.ops.normext.batch_norm_act.default
_batch_norm_act_direct = _C.batch_norm_act

# The devices whose fused kernels the layers run. The CUDA kernels are
# compiled and registered (torch.ops.normext.batch_norm_act* run them) but have
# not yet passed tests/test_batch_norm_act.py on a GPU; until they have, the
# layers compose normext's batch norm with torch's add and activation there.
FUSED_DEVICES = ("cpu",)


def batch_norm_act(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation: str = "relu",
    negative_slope: float = 0.01,
    alpha: float = 1.0,
    residual: Tensor | None = None,
    memory_efficient: bool = False,
) -> Tensor:
    """activation(batch_norm(input, ...) + residual) in one pass over memory
    each way, with batch_norm's arguments and errors. activation: "identity",
    "relu", "relu6", "leaky_relu" (negative_slope), "elu" (alpha) or "silu";
    residual: None or a tensor of the input's shape and dtype.

    memory_efficient=True (identity, leaky_relu with negative_slope > 0, elu
    with alpha > 0; ValueError otherwise) keeps the output instead of the
    input for the backward, which recovers the normalized input from it; the
    input is never overwritten. It keeps the input instead for a call where a
    channel's weight is too small to invert (|weight| < 1e-3 * max(1, |bias|)),
    so that gradients stay exact for every weight. With elu, elements whose
    output has saturated to -alpha in the output's dtype (input below about
    log(eps) of that dtype) cannot be inverted: their input gradients lose
    accuracy.

    The CPU runs the fused kernels. Elsewhere (on CUDA until its fused
    kernels have run on a GPU: FUSED_DEVICES), under torch.func transforms and
    with forward-mode tangents, the same result is composed from batch_norm,
    an add and the activation, keeping the input (memory_efficient has no
    effect there)."""
    return _batch_norm_act(input, running_mean, running_var, weight, bias, training, momentum,
                           eps, activation, negative_slope, alpha, residual, memory_efficient,
                           None)


def _batch_norm_act(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    activation: str,
    negative_slope: float,
    alpha: float,
    residual: Tensor | None,
    memory_efficient: bool,
    num_batches_tracked: Tensor | None,
) -> Tensor:
    """batch_norm_act, counting a module's batch as _batch_norm does."""
    tensors = (input, running_mean, running_var, weight, bias, residual)
    if has_torch_function_variadic(*tensors):
        momentum = _count_batch(num_batches_tracked, momentum)
        return handle_torch_function(
            batch_norm_act, tensors, input, running_mean, running_var, weight=weight,
            bias=bias, training=training, momentum=momentum, eps=eps, activation=activation,
            negative_slope=negative_slope, alpha=alpha, residual=residual,
            memory_efficient=memory_efficient)
    ops._check_activation(activation, negative_slope, alpha, memory_efficient)
    if input.device.type in FUSED_DEVICES and not (
            torch._C._are_functorch_transforms_active()
            or (forward_ad._current_level >= 0
                and _has_tangents(input, weight, bias, residual))):
        if torch.compiler.is_compiling():
            momentum = _count_batch(num_batches_tracked, momentum)
            _check_args(input, training, momentum, eps, None)
            return _batch_norm_act_op(input, weight, bias, running_mean, running_var, training,
                                      momentum, eps, activation, negative_slope, alpha, residual,
                                      memory_efficient)
        if num_batches_tracked is not None and type(num_batches_tracked) is not Tensor:
            momentum, num_batches_tracked = _count_batch(num_batches_tracked, momentum), None
        _check_args(input, training, momentum, eps, num_batches_tracked)
        return _batch_norm_act_direct(input, weight, bias, running_mean, running_var, training,
                                      momentum, eps, activation, negative_slope, alpha, residual,
                                      memory_efficient, num_batches_tracked)
    z = _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                    num_batches_tracked)
    if residual is not None:
        z = z + residual
    return _ACTIVATION_FUNCTIONS[activation](z, negative_slope, alpha)


# The devices whose layer-norm kernels the functions (and the modules) run;
# elsewhere layer_norm, rms_norm and the add_ variants are torch's. The CUDA
# kernels (csrc/layer_norm/cuda) are compiled and registered (the
# torch.ops.normext.layer_norm* ops run them) but have not yet passed
# tests/test_cuda.py on a GPU; until they have, CUDA inputs go to torch.
LAYER_NORM_DEVICES = ("cpu",)

_layer_norm_op = torch.ops.normext.layer_norm_forward.default


def _runs_layer_norm(input: Tensor, normalized_shape: tuple, *params: Tensor | None) -> bool:
    """Whether normext's kernels take this call: a floating-point input on a
    device with kernels, parameters of normalized_shape on its device in one
    dtype, its own (or float32 for a 16-bit input, torch's mixed-dtype case), and no
    torch.func transform or forward-mode tangent. torch's function takes the
    others, raising its own errors for bad arguments."""
    if input.device.type not in LAYER_NORM_DEVICES or not input.dtype.is_floating_point:
        return False
    k = len(normalized_shape)
    if k == 0 or input.dim() < k or tuple(input.shape[input.dim() - k:]) != normalized_shape:
        return False
    for param in params:
        if param is not None and (param.device != input.device
                                  or tuple(param.shape) != normalized_shape):
            return False
    return _takes_param_dtypes(input, params) and not (
        torch._C._are_functorch_transforms_active()
        or (forward_ad._current_level >= 0 and _has_tangents(input, *params)))


def _takes_param_dtypes(input: Tensor, params) -> bool:
    """The parameters (None: absent) share one dtype, the input's or float32
    for a 16-bit input: what torch's kernels take, which raise for others."""
    dtypes = {param.dtype for param in params if param is not None}
    mixed = input.dtype in (torch.float16, torch.bfloat16)
    return len(dtypes) <= 1 and dtypes <= {input.dtype, torch.float32 if mixed else input.dtype}


def _shape_tuple(normalized_shape) -> tuple:
    if isinstance(normalized_shape, int):
        return (normalized_shape,)
    return tuple(normalized_shape)


def layer_norm(
    input: Tensor,
    normalized_shape: list[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Same signature, behaviour and errors as torch.nn.functional.layer_norm:
    normalizes over the trailing normalized_shape, float32 statistics for
    16-bit inputs; the output is contiguous."""
    if has_torch_function_variadic(input, weight, bias):
        return handle_torch_function(layer_norm, (input, weight, bias), input, normalized_shape,
                                     weight=weight, bias=bias, eps=eps)
    shape = _shape_tuple(normalized_shape)
    if not _runs_layer_norm(input, shape, weight, bias):
        return torch.nn.functional.layer_norm(input, normalized_shape, weight, bias, eps)
    return _layer_norm_op(input, list(shape), weight, bias, eps, False)[0]


def rms_norm(
    input: Tensor,
    normalized_shape: list[int],
    weight: Tensor | None = None,
    eps: float | None = None,
) -> Tensor:
    """Same signature, behaviour and errors as torch.nn.functional.rms_norm:
    x / sqrt(mean(x^2) + eps) * weight over the trailing normalized_shape;
    eps=None is the input dtype's machine epsilon, as torch."""
    if has_torch_function_variadic(input, weight):
        return handle_torch_function(rms_norm, (input, weight), input, normalized_shape,
                                     weight=weight, eps=eps)
    shape = _shape_tuple(normalized_shape)
    if not _runs_layer_norm(input, shape, weight):
        return torch.nn.functional.rms_norm(input, normalized_shape, weight, eps)
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    return _layer_norm_op(input, list(shape), weight, None, eps, True)[0]



_add_layer_norm_op = torch.ops.normext.add_layer_norm_forward.default


def _runs_add_layer_norm(input: Tensor, residual: Tensor, shape: tuple,
                         *params: Tensor | None) -> bool:
    return (isinstance(residual, Tensor) and residual.shape == input.shape
            and residual.dtype == input.dtype and residual.device == input.device
            and not (forward_ad._current_level >= 0 and _has_tangents(residual))
            and _runs_layer_norm(input, shape, *params))


def add_layer_norm(
    input: Tensor,
    residual: Tensor,
    normalized_shape: list[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """The pre-norm transformer's residual step, fused: returns
    (layer_norm(input + residual), input + residual), the sum rounded to the
    input's dtype as torch's add, equal to the composition of torch's
    functions, with one pass over memory in the forward."""
    if has_torch_function_variadic(input, residual, weight, bias):
        return handle_torch_function(add_layer_norm, (input, residual, weight, bias), input,
                                     residual, normalized_shape, weight=weight, bias=bias,
                                     eps=eps)
    shape = _shape_tuple(normalized_shape)
    if not _runs_add_layer_norm(input, residual, shape, weight, bias):
        total = input + residual
        return torch.nn.functional.layer_norm(total, normalized_shape, weight, bias, eps), total
    output, total, _, _ = _add_layer_norm_op(input, residual, list(shape), weight, bias, eps,
                                             False)
    return output, total


def add_rms_norm(
    input: Tensor,
    residual: Tensor,
    normalized_shape: list[int],
    weight: Tensor | None = None,
    eps: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(rms_norm(input + residual), input + residual), fused as
    add_layer_norm; eps=None is the dtype's machine epsilon, as torch."""
    if has_torch_function_variadic(input, residual, weight):
        return handle_torch_function(add_rms_norm, (input, residual, weight), input, residual,
                                     normalized_shape, weight=weight, eps=eps)
    shape = _shape_tuple(normalized_shape)
    if not _runs_add_layer_norm(input, residual, shape, weight):
        total = input + residual
        return torch.nn.functional.rms_norm(total, normalized_shape, weight, eps), total
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    output, total, _, _ = _add_layer_norm_op(input, residual, list(shape), weight, None, eps,
                                             True)
    return output, total

# The devices whose group-norm kernels group_norm and instance_norm run;
# elsewhere they call torch's.
GROUP_NORM_DEVICES = ("cpu",)
_group_norm_op = torch.ops.normext.group_norm_forward.default


def _runs_group_norm(input: Tensor, groups: int, *params: Tensor | None) -> bool:
    """Whether normext's kernels take this call: a floating-point (N, C, *)
    input on a device with kernels, C divisible into `groups` groups,
    per-channel parameters on its device in one dtype, its own (or float32 for
    a 16-bit input), and no torch.func transform or forward-mode tangent. torch's
    function takes the others, raising its own errors for bad arguments."""
    if (input.device.type not in GROUP_NORM_DEVICES or not input.dtype.is_floating_point
            or input.dim() < 2 or not isinstance(groups, int) or groups <= 0
            or input.shape[1] % groups != 0):
        return False
    for param in params:
        if param is not None and (param.device != input.device
                                  or param.shape != (input.shape[1],)):
            return False
    return _takes_param_dtypes(input, params) and not (
        torch._C._are_functorch_transforms_active()
        or (forward_ad._current_level >= 0 and _has_tangents(input, *params)))


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Same signature, behaviour and errors as torch.nn.functional.group_norm:
    normalizes each sample over groups of num_groups channels, float32
    statistics for 16-bit inputs; the output keeps the input's memory format
    (contiguous, channels_last or channels_last_3d)."""
    if has_torch_function_variadic(input, weight, bias):
        return handle_torch_function(group_norm, (input, weight, bias), input, num_groups,
                                     weight=weight, bias=bias, eps=eps)
    if not _runs_group_norm(input, num_groups, weight, bias):
        return torch.nn.functional.group_norm(input, num_groups, weight, bias, eps)
    torch.nn.functional._verify_batch_size(
        [input.size(0) * input.size(1) // num_groups, num_groups] + list(input.size()[2:]))
    return _group_norm_op(input, num_groups, weight, bias, eps)[0]


def group_norm_act(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    activation: str = "silu",
    negative_slope: float = 0.01,
    alpha: float = 1.0,
) -> Tensor:
    """activation(group_norm(input, ...)) in one pass each way (diffusion
    U-Nets' GroupNorm + SiLU): group_norm's arguments and checks, then
    batch_norm_act's activations ("identity", "relu", "relu6", "leaky_relu"
    with negative_slope, "elu" with alpha, "silu"); the backward recomputes the
    activation's input from the input, keeping nothing else."""
    if has_torch_function_variadic(input, weight, bias):
        return handle_torch_function(group_norm_act, (input, weight, bias), input, num_groups,
                                     weight=weight, bias=bias, eps=eps, activation=activation,
                                     negative_slope=negative_slope, alpha=alpha)
    ops._check_activation(activation, negative_slope, alpha, op="group_norm_act")
    if not _runs_group_norm(input, num_groups, weight, bias):
        return _ACTIVATION_FUNCTIONS[activation](
            torch.nn.functional.group_norm(input, num_groups, weight, bias, eps), negative_slope,
            alpha)
    torch.nn.functional._verify_batch_size(
        [input.size(0) * input.size(1) // num_groups, num_groups] + list(input.size()[2:]))
    return _group_norm_op(input, num_groups, weight, bias, eps, activation, negative_slope,
                          alpha)[0]


def instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Same signature, behaviour and errors as torch.nn.functional.instance_norm:
    each (sample, channel) normalized by its own statistics (a group norm with
    a group per channel), and running_mean/running_var, where given, moved
    towards the batch's average of those statistics (the variance unbiased);
    with use_input_stats=False the running statistics normalize, as batch
    norm's eval does."""
    if has_torch_function_variadic(input, running_mean, running_var, weight, bias):
        return handle_torch_function(
            instance_norm, (input, running_mean, running_var, weight, bias), input,
            running_mean=running_mean, running_var=running_var, weight=weight, bias=bias,
            use_input_stats=use_input_stats, momentum=momentum, eps=eps)
    channels = input.shape[1] if input.dim() >= 2 else 1
    if ((running_mean is None) != (running_var is None) or eps <= 0.0 or input.numel() == 0
            or not _runs_group_norm(input, channels, weight, bias, running_mean, running_var)):
        return torch.nn.functional.instance_norm(input, running_mean, running_var, weight, bias,
                                                 use_input_stats, momentum, eps)
    if not use_input_stats:  # batch norm's eval
        if running_mean is None:
            raise RuntimeError(
                "Expected running_mean and running_var to be defined when use_input_stats is false")
        return batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps)
    torch.nn.functional._verify_spatial_size(input.size())
    output, mean, _ = _group_norm_op(input, channels, weight, bias, eps)
    if running_mean is not None:
        with torch.no_grad():
            # The instances' unbiased variances from the input (a pass over it
            # only where running statistics are kept: rstd holds var + eps,
            # which loses a variance far below eps), and the update in at
            # least float32, rounded once to the statistics' dtype.
            var = input.to(mean.dtype).var(tuple(range(2, input.dim())), correction=1)
            dtype = torch.promote_types(running_mean.dtype, mean.dtype)
            for running, batch in ((running_mean, mean), (running_var, var)):
                running.copy_(running.to(dtype) * (1 - momentum)
                              + batch.mean(0).to(dtype) * momentum)
    return output

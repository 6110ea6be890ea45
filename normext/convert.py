"""normext.convert: swap torch.nn norm layers for normext's in a model."""

import torch

from . import functional
from .modules import (BatchNorm1d, BatchNorm2d, BatchNorm3d, GroupNorm, InstanceNorm1d,
                      InstanceNorm2d, InstanceNorm3d, LayerNorm, LazyBatchNorm1d, LazyBatchNorm2d,
                      LazyBatchNorm3d, LazyInstanceNorm1d, LazyInstanceNorm2d, LazyInstanceNorm3d,
                      RMSNorm)
from .sync_batchnorm import SyncBatchNorm

__all__ = ["convert"]

# Exact types only: subclasses (SyncBatchNorm or user classes) may change
# behaviour that a swap would lose. A lazy layer not yet initialized becomes
# normext's lazy layer, which turns into normext's layer at its first input.
_REPLACEMENTS = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
    torch.nn.LazyBatchNorm1d: LazyBatchNorm1d,
    torch.nn.LazyBatchNorm2d: LazyBatchNorm2d,
    torch.nn.LazyBatchNorm3d: LazyBatchNorm3d,
    torch.nn.LayerNorm: LayerNorm,
    torch.nn.RMSNorm: RMSNorm,
    torch.nn.GroupNorm: GroupNorm,
    torch.nn.InstanceNorm1d: InstanceNorm1d,
    torch.nn.InstanceNorm2d: InstanceNorm2d,
    torch.nn.InstanceNorm3d: InstanceNorm3d,
    torch.nn.LazyInstanceNorm1d: LazyInstanceNorm1d,
    torch.nn.LazyInstanceNorm2d: LazyInstanceNorm2d,
    torch.nn.LazyInstanceNorm3d: LazyInstanceNorm3d,
}


def _layer_norm_2d(self, x):  # timm's LayerNorm2d: LayerNorm over the channels of NCHW
    return functional.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight,
                                 self.bias, self.eps).permute(0, 3, 1, 2)


def _group_norm_act(self, x):  # timm's GroupNormAct: the norm, then its drop and activation
    fused = self.__dict__.get("_normext_activation")  # set by convert
    if fused is not None:
        return functional.group_norm_act(x, self.num_groups, self.weight, self.bias, self.eps,
                                         *fused)
    return self.act(self.drop(functional.group_norm(x, self.num_groups, self.weight, self.bias,
                                                    self.eps)))


# timm's norm layers that are normext's computations under another name
# (matched by class name in timm's modules: timm is never imported), and the
# forward their converted class runs on normext's functionals.
_TIMM_FORWARDS = {
    "LayerNorm": lambda self, x: functional.layer_norm(x, self.normalized_shape, self.weight,
                                                       self.bias, self.eps),
    "LayerNorm2d": _layer_norm_2d,
    "RmsNorm": lambda self, x: functional.rms_norm(x, self.normalized_shape, self.weight,
                                                   self.eps),
    "GroupNorm": lambda self, x: functional.group_norm(x, self.num_groups, self.weight,
                                                       self.bias, self.eps),
    "GroupNorm1": lambda self, x: functional.group_norm(x, self.num_groups, self.weight,
                                                        self.bias, self.eps),
    "GroupNormAct": _group_norm_act,
}
_timm_classes: dict[type, type] = {}


def _is_timm_norm(cls: type) -> bool:
    return cls.__module__.startswith("timm.layers.") and cls.__name__ in _TIMM_FORWARDS


_TIMM_PREFIX = "_Timm"


def _timm_replacement(cls: type) -> type:
    """A subclass of timm's `cls` (so isinstance checks, attributes, repr and
    state_dict keys stay timm's) whose forward runs normext's kernels. It is
    this module's attribute _Timm<name>, which pickle finds (__getattr__
    below makes it in a process that has not converted yet)."""
    if cls not in _timm_classes:
        replacement = type(cls.__name__, (cls,), {
            "forward": _TIMM_FORWARDS[cls.__name__], "__module__": __name__,
            "__qualname__": _TIMM_PREFIX + cls.__name__,
            "__doc__": f"timm's {cls.__name__} on normext's kernels (normext.convert)."})
        _timm_classes[cls] = replacement
        globals()[replacement.__qualname__] = replacement
    return _timm_classes[cls]


def __getattr__(name: str) -> type:
    """The converted timm classes, for unpickling a converted model in a
    process that has not converted one yet (imports timm)."""
    if name.startswith(_TIMM_PREFIX) and name[len(_TIMM_PREFIX):] in _TIMM_FORWARDS:
        import timm.layers
        return _timm_replacement(getattr(timm.layers, name[len(_TIMM_PREFIX):]))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _swap_class(module: torch.nn.Module, cls: type) -> torch.nn.Module:
    """A module of class `cls` sharing `module`'s state: the very same
    parameters and buffers (optimizers that reference them keep working), flags
    and hook dicts (handles taken before the swap still remove their hooks)."""
    swapped = cls.__new__(cls)
    swapped.__dict__.update(module.__dict__)
    return swapped


def convert(module: torch.nn.Module, sync: bool = False, process_group=None,
            include: tuple[type, ...] | None = None) -> torch.nn.Module:
    """Return `module` with every torch.nn.BatchNorm1d/2d/3d (and
    LazyBatchNorm1d/2d/3d), LayerNorm, RMSNorm, GroupNorm and
    InstanceNorm1d/2d/3d (and LazyInstanceNorm1d/2d/3d) replaced by the normext
    class, like torch.nn.SyncBatchNorm.convert_sync_batchnorm: the converted
    layers share parameters and buffers with the originals (same device,
    dtype, requires_grad and training flag; state_dict keys unchanged),
    containers are updated in place, and other modules are left alone.

    include: the torch.nn classes to convert (e.g. (torch.nn.LayerNorm,));
    every class normext supports by default.

    timm's LayerNorm, LayerNorm2d (channels-first, ConvNeXt's), RmsNorm,
    GroupNorm, GroupNorm1 and GroupNormAct (where timm is installed) become
    subclasses of themselves whose forward runs normext's kernels, with their
    attributes and state_dict keys (GroupNormAct with its activation fused
    where normext has it and its drop layer is off); include may name them.

    timm's BatchNormAct2d (a BatchNorm2d subclass with an activation; where
    timm is installed) becomes a normext.BatchNormAct2d with that activation,
    when its drop layer is an identity and normext fuses its activation (with
    include, where it names torch.nn.BatchNorm2d).

    With sync=True every torch.nn or normext BatchNorm layer becomes a
    normext.SyncBatchNorm over `process_group` (default: the whole world),
    and every normext.BatchNormAct (and timm BatchNormAct2d as above) a
    normext.SyncBatchNormAct; other norms are left alone."""
    if include is not None:
        include = tuple(include)
        unknown = [cls for cls in include if cls not in _REPLACEMENTS and not _is_timm_norm(cls)]
        if unknown:
            raise ValueError(f"normext.convert: include names classes normext does not convert: "
                             f"{unknown}; it converts {list(_REPLACEMENTS)}")
    if sync:
        return SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    return _convert(module, include)


def _convert(module: torch.nn.Module, include: tuple[type, ...] | None) -> torch.nn.Module:
    replacement = _REPLACEMENTS.get(type(module))
    if replacement is None and _is_timm_norm(type(module)):
        replacement = _timm_replacement(type(module))
    from .fuse import _fused_layer, _module_activation, timm_activation  # (fuse imports this)
    if replacement is not None and (include is None or type(module) in include):
        swapped = _swap_class(module, replacement)
        if type(module).__name__ == "GroupNormAct" and _is_timm_norm(type(module)):
            # the activation fused where normext has it and the drop layer is off
            act = swapped.act
            spec = ("identity", 0.01, 1.0) if type(act) is torch.nn.Identity else (
                _module_activation(act))
            swapped._normext_activation = (
                spec if type(swapped.drop) is torch.nn.Identity else None)
        return swapped
    activation = timm_activation(module)
    if activation is not None and (include is None or torch.nn.BatchNorm2d in include):
        return _fused_layer(module, activation, memory_efficient=False)[0]
    for name, child in module.named_children():
        converted = _convert(child, include)
        if converted is not child:
            module.add_module(name, converted)
    return module

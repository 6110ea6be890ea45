"""normext.fuse: replace each BatchNorm followed by an activation (optionally
through a residual add) with one fused normext.BatchNormAct layer."""

import dataclasses
import logging
import operator

import torch
import torch.nn.functional as F

from . import modules
from .convert import _REPLACEMENTS, _swap_class, convert

__all__ = ["FuseReport", "fuse"]

_log = logging.getLogger("normext")

_BATCH_NORMS = {
    torch.nn.BatchNorm1d: modules.BatchNormAct1d,
    torch.nn.BatchNorm2d: modules.BatchNormAct2d,
    torch.nn.BatchNorm3d: modules.BatchNormAct3d,
    modules.BatchNorm1d: modules.BatchNormAct1d,
    modules.BatchNorm2d: modules.BatchNormAct2d,
    modules.BatchNorm3d: modules.BatchNormAct3d,
}
_INVERTIBLE = ("identity", "leaky_relu", "elu")


@dataclasses.dataclass
class FuseReport:
    """What fuse did: `fused` lists (BatchNorm name, activation, with residual,
    memory_efficient); `left` lists (BatchNorm name, why it was not fused)."""
    fused: list = dataclasses.field(default_factory=list)
    left: list = dataclasses.field(default_factory=list)


def _module_activation(module) -> tuple[str, float, float] | None:
    """(activation, negative_slope, alpha) of an activation module normext fuses."""
    if type(module) is torch.nn.ReLU:
        return "relu", 0.01, 1.0
    if type(module) is torch.nn.ReLU6 or (type(module) is torch.nn.Hardtanh
                                          and (module.min_val, module.max_val) == (0.0, 6.0)):
        return "relu6", 0.01, 1.0
    if type(module) is torch.nn.LeakyReLU:
        return "leaky_relu", float(module.negative_slope), 1.0
    if type(module) is torch.nn.ELU:
        return "elu", 0.01, float(module.alpha)
    if type(module) is torch.nn.SiLU:
        return "silu", 0.01, 1.0
    return None


_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu_: "relu",
              F.relu6: "relu6", F.silu: "silu", F.leaky_relu: "leaky_relu", F.elu: "elu"}
_METHODS = {"relu": "relu", "relu_": "relu"}
_ADDS = (operator.add, operator.iadd, torch.add)


def _node_activation(node, gm) -> tuple[str, float, float] | None:
    """The activation an fx node applies to its first argument, if normext fuses it."""
    if node.op == "call_module":
        return _module_activation(gm.get_submodule(node.target))
    if node.op == "call_function" and node.target in _FUNCTIONS:
        name = _FUNCTIONS[node.target]
        if name == "leaky_relu":
            slope = node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", 0.01)
            return (name, float(slope), 1.0) if isinstance(slope, (int, float)) else None
        if name == "elu":
            alpha = node.args[1] if len(node.args) > 1 else node.kwargs.get("alpha", 1.0)
            return (name, 0.01, float(alpha)) if isinstance(alpha, (int, float)) else None
        return name, 0.01, 1.0
    if node.op == "call_method" and node.target in _METHODS and len(node.args) == 1:
        return _METHODS[node.target], 0.01, 1.0
    return None


def is_timm_batch_norm_act(module) -> bool:
    """Whether `module` is timm's BatchNormAct2d (matched by name: timm is never imported)."""
    cls = type(module)
    return cls.__name__ == "BatchNormAct2d" and cls.__module__.startswith("timm.")


def timm_activation(module) -> tuple[str, float, float] | None:
    """For timm's BatchNormAct2d (a torch.nn.BatchNorm2d subclass, matched by
    name so that timm is never imported here) whose drop layer is an identity
    and whose activation normext fuses (or is an identity): that activation."""
    if not is_timm_batch_norm_act(module):
        return None
    if type(getattr(module, "drop", None)) is not torch.nn.Identity:
        return None
    act = getattr(module, "act", None)
    if type(act) is torch.nn.Identity:
        return "identity", 0.01, 1.0
    return _module_activation(act)


def _is_batch_norm(module) -> bool:
    """A BatchNorm fuse may give an activation: torch's, normext's, or timm's
    BatchNormAct2d without an activation of its own."""
    return type(module) in _BATCH_NORMS or timm_activation(module) == ("identity", 0.01, 1.0)


def _fused_layer(bn, activation, memory_efficient: bool):
    """A BatchNormAct sharing bn's parameters, buffers and flags."""
    if timm_activation(bn) is not None:
        layer = _swap_class(bn, modules.BatchNormAct2d)
        layer._modules = {}  # timm's act and drop (no state): not the fused layer's children
    else:
        layer = _swap_class(bn, _BATCH_NORMS[type(bn)])
    name, negative_slope, alpha = activation
    efficient = memory_efficient and (name in _INVERTIBLE) and (
        name != "leaky_relu" or negative_slope > 0) and (name != "elu" or alpha > 0)
    layer._set_activation(name, negative_slope, alpha, efficient)
    return layer, efficient


def _set_submodule(root: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    root.get_submodule(parent).add_module(name, module)


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer, with timm's BatchNormAct2d as a leaf."""

    def is_leaf_module(self, module: torch.nn.Module, qualified_name: str) -> bool:
        return timm_activation(module) is not None or super().is_leaf_module(
            module, qualified_name)


def _fuse_graph(gm: torch.fx.GraphModule, memory_efficient: bool, report: FuseReport) -> None:
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        bn = gm.get_submodule(node.target)
        own = timm_activation(bn)
        if own is not None and own[0] != "identity":  # timm's layer with its activation
            layer, efficient = _fused_layer(bn, own, memory_efficient)
            _set_submodule(gm, node.target, layer)
            report.fused.append((node.target, own[0], False, efficient))
            continue
        if not _is_batch_norm(bn):
            continue
        users = list(node.users)
        if len(users) != 1:
            report.left.append((node.target, f"its output has {len(users)} users"))
            continue
        # nn.Identity modules on the way (timm's drop_block and drop_path when off)
        identities, user, residual = [], users[0], None
        while user.op == "call_module" and len(user.users) == 1 and not user.kwargs \
                and user.args == ((identities[-1] if identities else node),) \
                and type(gm.get_submodule(user.target)) is torch.nn.Identity:
            identities.append(user)
            user = next(iter(user.users))
        last = identities[-1] if identities else node
        if user.op == "call_function" and user.target in _ADDS and len(user.args) == 2 \
                and not user.kwargs and len(user.users) == 1:
            other = user.args[1] if user.args[0] is last else user.args[0]
            if isinstance(other, torch.fx.Node) and other is not last:
                residual, user = other, next(iter(user.users))
        activation = _node_activation(user, gm)
        if activation is None and user.op == "call_module" and user.args[1:2] == (last,) \
                and isinstance(gm.get_submodule(user.target), modules._BatchNormAct):
            report.left.append((node.target, f"added as the residual of {user.target}"))
            continue
        if activation is None:
            what = "an add and then " if residual is not None else ""
            report.left.append((node.target, f"followed by {what}{user.op} {user.target}, "
                                             f"not an activation normext fuses"))
            continue
        layer, efficient = _fused_layer(bn, activation, memory_efficient)
        _set_submodule(gm, node.target, layer)
        with graph.inserting_after(user):
            args = (node.args[0],) if residual is None else (node.args[0], residual)
            fused = graph.call_module(node.target, args)
        user.replace_all_uses_with(fused)
        add = user.args[0] if residual is not None else None
        graph.erase_node(user)
        if add is not None:
            graph.erase_node(add)
        for identity in reversed(identities):
            graph.erase_node(identity)
        graph.erase_node(node)
        report.fused.append((node.target, activation[0], residual is not None, efficient))
    graph.lint()
    gm.recompile()


def _fuse_sequentials(module: torch.nn.Module, memory_efficient: bool, report: FuseReport,
                      prefix: str = "") -> None:
    """Module patterns where the model does not trace: a BatchNorm followed by an
    activation in an nn.Sequential (the activation becomes an nn.Identity)."""
    for name, child in module.named_children():
        _fuse_sequentials(child, memory_efficient, report, f"{prefix}{name}.")
    if not isinstance(module, torch.nn.Sequential):
        return
    names = list(module._modules)
    for first, second in zip(names, names[1:]):
        bn, act = module._modules[first], module._modules[second]
        activation = _module_activation(act)
        if _is_batch_norm(bn) and activation is not None:
            layer, efficient = _fused_layer(bn, activation, memory_efficient)
            module._modules[first] = layer
            module._modules[second] = torch.nn.Identity()
            report.fused.append((prefix + first, activation[0], False, efficient))


def fuse(model: torch.nn.Module, memory_efficient: bool = False, sync: bool = False,
         process_group=None) -> torch.nn.Module:
    """The model with each BatchNorm1d/2d/3d (torch's or normext's) whose
    output goes only to an activation (ReLU, ReLU6, LeakyReLU, ELU, SiLU, as
    modules or functions), or only to an add whose result goes only to one,
    replaced by a normext.BatchNormAct layer computing both (and the add).
    nn.Identity modules between them (timm's drop_block and drop_path when
    they are off) are looked through.

    Found by torch.fx tracing: the result is then a torch.fx.GraphModule and
    `model` is left as it was. Where the model does not trace, BatchNorm +
    activation pairs inside nn.Sequential containers are fused in place (the
    activation becomes an nn.Identity). Either way the fused layers share the
    BatchNorms' parameters and buffers, and the state_dict keys are unchanged.
    The BatchNorms left unfused are converted as normext.convert does.

    memory_efficient=True gives the layers with an invertible activation
    (LeakyReLU with a positive slope, ELU) normext's memory-efficient mode.
    The result's `normext_fuse_report` (a FuseReport) lists what was fused and
    which BatchNorms were left alone and why; the counts are also logged
    (logger "normext", level INFO).

    sync=True then makes every layer synchronized over `process_group`
    (default: the whole world), as normext.convert(sync=True) does: fused
    layers become normext.SyncBatchNormAct, the others normext.SyncBatchNorm."""
    report = FuseReport()
    try:
        result = torch.fx.GraphModule(model, _Tracer().trace(model), type(model).__name__)
    except Exception as error:  # anything fx cannot trace: fall back to module patterns
        _log.info("normext.fuse: %s does not trace with torch.fx (%s: %s); fusing "
                  "nn.Sequential patterns", type(model).__name__, type(error).__name__, error)
        result = model
        _fuse_sequentials(result, memory_efficient, report)
    else:
        _fuse_graph(result, memory_efficient, report)
        # The unfused BatchNorms, as new normext layers (the original model keeps its own).
        for path, _ in report.left:
            layer = result.get_submodule(path)
            if type(layer) in _REPLACEMENTS:
                _set_submodule(result, path, _swap_class(layer, _REPLACEMENTS[type(layer)]))
            elif timm_activation(layer) is not None:
                _set_submodule(result, path, _fused_layer(layer, timm_activation(layer), False)[0])
    if sync:
        result = convert(result, sync=True, process_group=process_group)
    elif result is model:
        convert(result)
    result.normext_fuse_report = report
    _log.info("normext.fuse: fused %d BatchNorm + activation patterns (%d with a residual "
              "add), left %d BatchNorms unfused", len(report.fused),
              sum(1 for f in report.fused if f[2]), len(report.left))
    return result

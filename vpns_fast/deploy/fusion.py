"""Graph rewrites for CPU inference, on a ``torch.fx`` trace of the (folded, eval-mode) network:

* ``fold_batchnorm``: every eval-mode BatchNorm2d that only normalizes one convolution's output is
  folded into that convolution (scaled weight, shifted bias). Zeros of the weight stay exact zeros
  (a per-output-channel scale), so the pruned density is unchanged.
* ``fuse_epilogues``: a sparse convolution whose only use is ``+ residual`` and/or a ReLU computes
  them in its output loop (``SparseConv2d(x, residual)`` with ``relu=True``) instead of two more
  passes over the activation.

Why (ResNet-18 at 224, batch 1, 10% kept, 2 threads, torch profiler): of 12.9 ms per image the
unfused engine spent 1.8 ms in batch norm, 0.2 ms in ReLU and 0.16 ms in residual adds.

A network that ``torch.fx`` cannot trace (data-dependent control flow) is left as it is, with the
reason returned; nothing else depends on the rewrite.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)
_RELU_METHODS = ("relu", "relu_")
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)


def trace(model: nn.Module) -> tuple[fx.GraphModule | None, str]:
    """``(graph module, "")`` or ``(None, why not)``. A root that is itself one leaf layer (a bare
    Conv2d) is not traced: its trace would inline the layer into a function call."""
    if fx.Tracer().is_leaf_module(model, ""):
        return None, f"the model is a single {type(model).__name__} layer"
    try:
        return fx.symbolic_trace(model), ""
    except Exception as exc:  # any tracing failure only means "no graph rewrites"
        first_line = (str(exc).strip().splitlines() or [""])[0][:160]
        return None, f"torch.fx cannot trace {type(model).__name__} ({type(exc).__name__}: {first_line})"


def _module(graph_module: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    return graph_module.get_submodule(node.target)


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _replace_module(graph_module: fx.GraphModule, name: str, module: nn.Module) -> None:
    graph_module.set_submodule(name, module)


def fold_batchnorm(graph_module: fx.GraphModule) -> list[str]:
    """Folds each eval-mode BatchNorm2d into the Conv2d that feeds only it; returns the folded
    convolutions' names. The graph module is changed in place."""
    folded = []
    for node in list(graph_module.graph.nodes):
        bn = _module(graph_module, node)
        if not isinstance(bn, nn.BatchNorm2d) or bn.training or not bn.track_running_stats:
            continue
        source = node.args[0] if node.args else None
        conv = _module(graph_module, source) if isinstance(source, fx.Node) else None
        if type(conv) is not nn.Conv2d or len(source.users) != 1 or conv.training:
            continue
        _replace_module(graph_module, source.target, fuse_conv_bn_eval(conv, bn))
        node.replace_all_uses_with(source)
        graph_module.graph.erase_node(node)
        folded.append(source.target)
    graph_module.graph.lint()
    graph_module.delete_all_unused_submodules()
    graph_module.recompile()
    return folded


def _is_relu(graph_module: fx.GraphModule, node: fx.Node, value: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(_module(graph_module, node), nn.ReLU) and node.args[:1] == (value,)
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        return node.args[:1] == (value,)  # in place or not: the layer's output has no other use
    if node.op == "call_method" and node.target in _RELU_METHODS:
        return node.args[:1] == (value,)
    return False


def _residual_of(node: fx.Node, value: fx.Node) -> fx.Node | None:
    """The other operand when ``node`` is ``value + other`` (other a tensor node), else None."""
    if node.op != "call_function" or node.target not in _ADD_FUNCTIONS or len(node.args) != 2:
        return None
    if node.kwargs.get("alpha", 1) != 1 or "out" in node.kwargs:
        return None
    first, second = node.args
    other = second if first is value else first if second is value else None
    if not isinstance(other, fx.Node) or other is value:
        return None
    return other


def fuse_epilogues(graph_module: fx.GraphModule, fusable: type[nn.Module]) -> dict[str, list[str]]:
    """For each ``fusable`` layer (a module whose forward takes ``(x, residual=None)`` and which has a
    ``relu`` flag): absorbs a following ``+ residual`` (when the layer's output has no other use)
    and then a following ReLU. Returns {layer name: ["add", "relu"] (what was fused)}."""
    fused: dict[str, list[str]] = {}
    for node in list(graph_module.graph.nodes):
        layer = _module(graph_module, node)
        if not isinstance(layer, fusable) or len(node.args) != 1 or node.kwargs:
            continue
        parts, tail = [], node
        user = _only_user(tail)
        residual = _residual_of(user, tail) if user is not None else None
        if residual is not None:
            # the layer runs just before the add (a ResNet block computes its downsampled residual
            # after the second conv): moving it later is valid, its only use is the add
            user.prepend(node)
            node.args = (node.args[0], residual)
            user.replace_all_uses_with(node)
            graph_module.graph.erase_node(user)
            parts.append("add")
        user = _only_user(tail)
        if user is not None and _is_relu(graph_module, user, tail):
            layer.relu = True
            user.replace_all_uses_with(node)
            graph_module.graph.erase_node(user)
            parts.append("relu")
        if parts:
            fused[node.target] = parts
    graph_module.graph.lint()
    graph_module.delete_all_unused_submodules()
    graph_module.recompile()
    return fused


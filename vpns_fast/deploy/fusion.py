"""Graph rewrites for CPU inference, on a ``torch.fx`` trace of the (folded, eval-mode) network:

* ``fold_batchnorm``: every eval-mode BatchNorm2d that only normalizes one convolution's output is
  folded into that convolution (scaled weight, shifted bias). Zeros of the weight stay exact zeros
  (a per-output-channel scale), so the pruned density is unchanged.
* ``fuse_epilogues``: a sparse convolution (or the engine's dense one, ``DenseConv2d``) whose only
  use is ``+ residual`` and/or an activation (ReLU, SiLU, ReLU6, Hardswish, Sigmoid, Hardsigmoid) computes them
  in its output loop (``SparseConv2d(x, residual)`` with ``activation="relu"``) instead of two more passes over
  the activation.
* ``mark_reusable_residuals``: a fused call that is the last reader of its residual (a tensor one of the engine's
  layers made, no view of it read later, no hook involved) may let a DenseConv2d add the convolution into the
  residual in place, or a SparseConv2d write its output there, instead of writing a new tensor
  (``residual_reusable``, checked on every run for hooks).

Why (ResNet-18 at 224, batch 1, 10% kept, 2 threads, torch profiler): of 12.9 ms per image the
unfused engine spent 1.8 ms in batch norm, 0.2 ms in ReLU and 0.16 ms in residual adds.

Both rewrite only layers called from one place (a flag or a folded scale would change every call),
absorb only a residual of the layer output's exact shape (from shape propagation on the example), and
never move a layer across an in-place write. The caller checks the whole rewritten model against the
original and converts without the rewrite if they differ. A network that ``torch.fx`` cannot trace
(data-dependent control flow) is left as it is, with the reason returned.
"""
from __future__ import annotations

import builtins
import contextlib
import copy
import functools
import operator
import re
import sys
import threading
import warnings
from collections import Counter
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx import _symbolic_trace
from torch.nn.modules import module as module_globals
from torch.nn.utils.fusion import fuse_conv_bn_eval

from vpns_fast.errors import exception_reason

# The activations a fused epilogue computes (sparse_cpu.EPILOGUE_ACTIVATIONS), as a traced graph calls them.
_ACTIVATION_MODULES = {nn.ReLU: "relu", nn.SiLU: "silu", nn.ReLU6: "relu6", nn.Hardswish: "hardswish",
                       nn.Sigmoid: "sigmoid", nn.Hardsigmoid: "hardsigmoid"}
_ACTIVATION_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.silu: "silu", F.relu6: "relu6",
                         F.hardswish: "hardswish", torch.sigmoid: "sigmoid", torch.sigmoid_: "sigmoid",
                         F.sigmoid: "sigmoid", F.hardsigmoid: "hardsigmoid"}
_ACTIVATION_METHODS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid"}
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
# Python operators on tensors: their result left unused in a trace is a lost augmented assignment.
_ARITHMETIC = {operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod,
               operator.pow, operator.matmul, operator.and_, operator.or_, operator.xor, operator.lshift,
               operator.rshift}


_HOOK_KINDS = (("_forward_pre_hooks", "forward pre-hook"), ("_forward_hooks", "forward hook"),
               ("_backward_pre_hooks", "backward pre-hook"), ("_backward_hooks", "backward hook"))


def _hooks(module: nn.Module) -> list[tuple[str, object]]:
    """``(kind, hook)`` for each hook registered on ``module`` itself."""
    return [(kind, hook) for attribute, kind in _HOOK_KINDS
            for hook in (getattr(module, attribute, None) or {}).values()]


def module_hooks(module: nn.Module) -> list[str]:
    """The hooks registered on ``module`` itself, each as ``"<kind> <name>"`` (e.g. ``forward pre-hook
    WeightNorm``): a layer carrying any must stay the module it is and be called as such, or they stop
    running (a feature-capture hook) or compute on another value (a weight norm recomputing the weight)."""
    return [f"{kind} {getattr(hook, '__name__', type(hook).__name__)}" for kind, hook in _hooks(module)]


def copy_sharing_hooks(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)`` whose hooks are the caller's own objects, not copies: a hook that records into
    its object (a feature list, a counter, the instance of a bound method outside the model) keeps recording
    where its owner reads. A method of one of the model's modules is rebound to the copy, as deepcopy does: it
    reads and writes that module's state (``self.saved``), which must be the copy's. A tensor attribute
    computed with autograd (the weight ``torch.nn.utils.weight_norm`` recomputes before each call), which
    deepcopy refuses, is copied detached."""
    own = {id(module) for module in model.modules()}
    memo: dict[int, object] = {id(hook): hook for module in model.modules() for _, hook in _hooks(module)
                               if id(getattr(hook, "__self__", None)) not in own}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)


# A torch.fx trace patches nn.Module.__call__ and __getattr__ (and the functions it wraps in the traced code's
# globals) for the whole process while it runs: a module called in another thread meanwhile raised "NameError:
# module is not installed as a submodule" (a server deploying a second model while it serves the first failed
# every call during the trace). The traces here patch for their own thread only, one at a time (two traces at
# once would each restore what the other patched).
_TRACE_LOCK = threading.Lock()


def _in_thread_only(patched, original):
    """``patched`` when called from the thread that creates this function, ``original`` from any other."""
    owner = threading.get_ident()

    @functools.wraps(patched)
    def dispatch(*args, **kwargs):
        return (patched if threading.get_ident() == owner else original)(*args, **kwargs)
    return dispatch


@contextlib.contextmanager
def _patches_for_this_thread_only():
    """While it is open, torch.fx's patcher installs each patch wrapped by ``_in_thread_only``. The patcher is
    torch's private ``torch.fx._symbolic_trace._Patcher``; without it (another torch) nothing is changed."""
    from torch.fx import _symbolic_trace

    patcher = getattr(_symbolic_trace, "_Patcher", None)
    if patcher is None or not hasattr(patcher, "patch") or not hasattr(patcher, "patch_method"):
        yield
        return
    real_patch, real_patch_method = patcher.patch, patcher.patch_method

    def patch(self, frame_dict, name, new_fn, *args, **kwargs):
        original = frame_dict[name] if name in frame_dict else getattr(builtins, name, None)
        return real_patch(self, frame_dict, name, new_fn if original is None else _in_thread_only(new_fn, original),
                          *args, **kwargs)

    def patch_method(self, cls, name, new_fn, *args, **kwargs):
        return real_patch_method(self, cls, name, _in_thread_only(new_fn, getattr(cls, name)), *args, **kwargs)

    patcher.patch, patcher.patch_method = patch, patch_method
    try:
        yield
    finally:
        patcher.patch, patcher.patch_method = real_patch, real_patch_method


def trace(model: nn.Module) -> tuple[fx.GraphModule | None, str]:
    """``(graph module, "")`` or ``(None, why not)``. A root that is itself one leaf layer (a bare
    Conv2d) is not traced: its trace would inline the layer into a function call; nor is a model with
    hooks on a module the trace inlines (the model itself, a block), which would no longer run."""
    tracer = fx.Tracer()
    if tracer.is_leaf_module(model, ""):
        return None, f"the model is a single {type(model).__name__} layer"
    for name, module in model.named_modules():
        hooks = module_hooks(module)
        if hooks and (not name or not tracer.is_leaf_module(module, name)):
            return None, (f"{name or 'the model'} has hooks ({', '.join(hooks[:3])}) that a torch.fx trace, "
                          "which inlines it, would not run")
    try:
        with _TRACE_LOCK, _patches_for_this_thread_only():
            graph_module = fx.symbolic_trace(model)
    except Exception as exc:  # any tracing failure only means "no graph rewrites"
        return None, f"torch.fx cannot trace {type(model).__name__} ({exception_reason(exc, 160)})"
    _restore_assert_messages(graph_module)
    registered = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    for node in graph_module.graph.nodes:
        if node.op == "get_attr" and node.target not in registered:
            # the trace copied the tensor the attribute held then: a value the model sets while it runs (a hook
            # saving a feature map into `self.saved`) would stay the example's
            return None, (f"{type(model).__name__} reads `{node.target}`, a tensor attribute that is neither a "
                          "parameter nor a buffer, which a torch.fx trace would freeze at its traced value")
        if node.op == "call_function" and node.target in _ARITHMETIC and not node.users:
            # torch.fx records `a += b` as a new tensor `a + b`: where `a` is a view (`head = y[:, :8]; head +=
            # conv(x)`), the write into `y` is lost and the result is left unused
            return None, (f"torch.fx dropped an in-place update of {type(model).__name__} (`{node.name}`: a `+=` "
                          "into a view or an alias is traced as a new tensor)")
    return graph_module, ""


_PROXY_IN_MESSAGE = re.compile(r"Proxy\((\w+)\)")


class InlinedBlockHookWarning(UserWarning):
    """A hook registered on a block the CPU engine's graph rewrite inlined: the block is never called, so the
    hook will not run."""


class InlinedBlock(nn.Module):
    """A block of the model that the engine's torch.fx rewrite inlined (``layer1`` of a ResNet): it holds the
    block's remaining layers under their names but is never called itself, so a hook registered on it would never
    run: registering one warns (a tool that hooks every module, a model summary, goes on). ``block[i]`` is the
    layer the block held at position ``i`` (``network.layer1[0]``) where it is still there: a batch norm folded into
    the conv before it, or a ReLU fused into it, is gone (IndexError saying so)."""

    def _warn_hook(self, register, *args, **kwargs):
        warnings.warn("this block was inlined by the CPU engine's graph rewrite and is never called, so a hook on it "
                      "will not run: hook one of its layers or the deployed module, or register the hook on the "
                      "model before deploying it (it then converts without the rewrite)", InlinedBlockHookWarning,
                      stacklevel=3)
        return register(self, *args, **kwargs)

    def register_forward_hook(self, *args, **kwargs):
        return self._warn_hook(nn.Module.register_forward_hook, *args, **kwargs)

    def register_forward_pre_hook(self, *args, **kwargs):
        return self._warn_hook(nn.Module.register_forward_pre_hook, *args, **kwargs)

    def register_full_backward_hook(self, *args, **kwargs):
        return self._warn_hook(nn.Module.register_full_backward_hook, *args, **kwargs)

    def __getitem__(self, index):
        if isinstance(index, str):
            return self._modules[index]
        if not isinstance(index, int) or isinstance(index, bool):
            raise TypeError(f"{type(self).__name__} indices must be integers or names, got {type(index).__name__}")
        if index < 0:
            raise IndexError("an inlined block takes its layers' own positions (>= 0): the layers the rewrite "
                             "folded or fused away are no longer counted from its end")
        if str(index) not in self._modules:
            raise IndexError(f"layer {index} of this block is not in the converted network (out of range, or a "
                             "batch norm or activation the engine's rewrite folded or fused into the layer before it)")
        return self._modules[str(index)]


def mark_inlined_blocks(graph_module: fx.GraphModule) -> None:
    """Makes every module the trace kept only as a holder of layers (a plain ``nn.Module``, never called) an
    :class:`InlinedBlock`."""
    for name, module in graph_module.named_modules():
        if name and type(module) is nn.Module:
            module.__class__ = InlinedBlock


def traced_assert(condition, template: str, *values) -> None:
    """``torch._assert(condition, template.format(*values))``, the message formatted only when it fails. Traced
    again (torch.fx re-traces a graph module's code when it is unpickled), it records itself as one call."""
    if isinstance(condition, fx.Proxy):
        return condition.tracer.create_proxy("call_function", traced_assert, (condition, template, *values), {})
    if not condition:
        raise AssertionError(template.format(*values))


def _restore_assert_messages(graph_module: fx.GraphModule) -> None:
    """A model's ``torch._assert(h == size, f"... got {h}")`` is traced with the message formatted then, on the
    trace's proxies: a deployed torchvision ViT given 96-px images said "Expected 64 but got Proxy(getitem_2)!".
    Each such assert is rewritten to format the message from those nodes' values when it fails."""
    graph = graph_module.graph
    nodes = {node.name: node for node in graph.nodes}
    changed = False
    for node in graph.nodes:
        if (node.op != "call_function" or node.target is not torch._assert or len(node.args) != 2
                or not isinstance(node.args[1], str)):
            continue
        names = _PROXY_IN_MESSAGE.findall(node.args[1])
        if not names or not all(name in nodes for name in names):
            continue
        template = _PROXY_IN_MESSAGE.sub("{}", node.args[1].replace("{", "{{").replace("}", "}}"))
        node.target, node.args = traced_assert, (node.args[0], template, *(nodes[name] for name in names))
        changed = True
    if changed:
        graph_module.recompile()


def _module(graph_module: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    return graph_module.get_submodule(node.target)


def _called_once(graph_module: fx.GraphModule) -> set[str]:
    """The modules called from one place only: what is folded into a module, or fused into it as a
    flag, would otherwise change its other calls too."""
    calls = Counter(n.target for n in graph_module.graph.nodes if n.op == "call_module")
    return {target for target, count in calls.items() if count == 1}


_INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem}


def _mutates(graph_module: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` may write into one of its inputs (in-place methods and functions, modules
    built with ``inplace=True``); unknown modules of the user's own count as writing."""
    if node.op == "call_method":
        return str(node.target).endswith("_")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return node.target in _INPLACE_FUNCTIONS or name.endswith("_") or bool(node.kwargs.get("inplace"))
    if node.op == "call_module":
        module = graph_module.get_submodule(node.target)
        if getattr(module, "inplace", False):
            return True
        return not type(module).__module__.startswith(("torch.nn", "vpns_fast."))
    return False


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _attributes_read(graph_module: fx.GraphModule) -> set[str]:
    """The modules some of whose parameters or buffers the graph reads directly (``get_attr``: code that calls
    ``F.conv2d(h, self.conv.weight)`` or reads ``self.bn.running_var``), by name."""
    return {node.target.rpartition(".")[0] for node in graph_module.graph.nodes if node.op == "get_attr"}


def fold_batchnorm(graph_module: fx.GraphModule) -> list[str]:
    """Folds each eval-mode BatchNorm2d into the Conv2d that feeds only it; returns the folded
    convolutions' names. The graph module is changed in place. Not where the model's code also reads the
    convolution's or the batch norm's tensors itself: it would read the folded ones."""
    folded = []
    single = _called_once(graph_module)
    read = _attributes_read(graph_module)
    for node in list(graph_module.graph.nodes):
        bn = _module(graph_module, node)
        if not isinstance(bn, nn.BatchNorm2d) or bn.training or not bn.track_running_stats:
            continue
        source = node.args[0] if node.args else None
        conv = _module(graph_module, source) if isinstance(source, fx.Node) else None
        if (type(conv) is not nn.Conv2d or len(source.users) != 1 or conv.training
                or source.target not in single or module_hooks(conv) or module_hooks(bn)
                or source.target in read or node.target in read):
            continue  # a hook on either, or the model's own reads of their tensors, would see the unfolded values
        graph_module.set_submodule(source.target, fuse_conv_bn_eval(conv, bn))
        node.replace_all_uses_with(source)
        graph_module.graph.erase_node(node)
        folded.append(source.target)
    graph_module.graph.lint()
    graph_module.delete_all_unused_submodules()
    graph_module.recompile()
    return folded


def _epilogue_activation(graph_module: fx.GraphModule, node: fx.Node, value: fx.Node) -> str | None:
    """The name of the activation ``node`` applies to ``value`` (a name in sparse_cpu.EPILOGUE_ACTIVATIONS), or
    None when it is none the epilogues compute. In place or not: the layer's output has no other use. Modules
    of exactly those classes only (a subclass may compute something else), without hooks, and a ReLU6 only with
    its own bounds (``min_val`` and ``max_val`` are attributes of any ``nn.Hardtanh``: one set to other values
    was fused as ``clamp(0, 6)``)."""
    if node.args[:1] != (value,):
        return None
    if node.op == "call_module":
        module = _module(graph_module, node)
        kind = _ACTIVATION_MODULES.get(type(module))
        if kind == "relu6" and (module.min_val, module.max_val) != (0.0, 6.0):
            return None
        return kind if kind is not None and not module_hooks(module) else None
    if node.op == "call_function":
        return _ACTIVATION_FUNCTIONS.get(node.target)
    if node.op == "call_method":
        return _ACTIVATION_METHODS.get(node.target)
    return None


def _shape(node: fx.Node):
    meta = node.meta.get("tensor_meta")
    return (tuple(meta.shape), meta.dtype) if meta is not None and hasattr(meta, "shape") else None


def _residual_of(node: fx.Node, value: fx.Node) -> fx.Node | None:
    """The other operand when ``node`` is ``value + other`` with ``other`` a tensor of exactly the
    layer output's shape and dtype (known from shape propagation), else None. ``other += value``
    writes into ``other``: only fused when nothing else reads it."""
    if node.op != "call_function" or node.target not in _ADD_FUNCTIONS or len(node.args) != 2:
        return None
    if node.kwargs.get("alpha", 1) != 1 or "out" in node.kwargs:
        return None
    first, second = node.args
    other = second if first is value else first if second is value else None
    if not isinstance(other, fx.Node) or other is value:
        return None
    if _shape(other) is None or _shape(other) != _shape(value) or _shape(value)[1] != torch.float32:
        return None
    if node.target is operator.iadd and first is other and len(other.users) != 1:
        return None
    return other


def _nothing_writes_between(graph_module: fx.GraphModule, start: fx.Node, end: fx.Node) -> bool:
    """No node after ``start`` and before ``end`` may write into a tensor (moving ``start`` down to
    ``end`` must not let it read something changed in between)."""
    node = start.next
    while node is not end:
        if _mutates(graph_module, node):
            return False
        node = node.next
    return True


def fuse_epilogues(graph_module: fx.GraphModule, fusable: type[nn.Module] | tuple[type[nn.Module], ...],
                   example: torch.Tensor) -> dict[str, list[str]]:
    """For each ``fusable`` layer (a class or a tuple of them) called from one place (a module whose forward takes ``(x,
    residual=None)`` and which has an ``activation`` attribute): absorbs a following ``+ residual`` (when the
    layer's output has no other use, the residual has the output's shape on ``example``, and nothing
    in between writes in place) and then a following activation (ReLU, SiLU, ReLU6, Hardswish, Sigmoid,
    Hardsigmoid). Returns {layer name: ["add", "relu"]} (the parts absorbed, the activation by its name)."""
    from torch.fx.passes.shape_prop import ShapeProp

    with torch.no_grad():
        ShapeProp(graph_module).propagate(example)
    fused: dict[str, list[str]] = {}
    single = _called_once(graph_module)
    for node in list(graph_module.graph.nodes):
        layer = _module(graph_module, node)
        if (not isinstance(layer, fusable) or len(node.args) != 1 or node.kwargs
                or node.target not in single):
            continue
        parts, tail = [], node
        user = _only_user(tail)
        residual = _residual_of(user, tail) if user is not None else None
        if residual is not None and _nothing_writes_between(graph_module, node, user):
            # the layer runs just before the add (a ResNet block computes its downsampled residual
            # after the second conv): moving it later is valid, its only use is the add
            user.prepend(node)
            node.args = (node.args[0], residual)
            user.replace_all_uses_with(node)
            graph_module.graph.erase_node(user)
            parts.append("add")
        user = _only_user(tail)
        activation = _epilogue_activation(graph_module, user, tail) if user is not None else None
        if activation is not None:
            layer.activation = activation
            user.replace_all_uses_with(node)
            graph_module.graph.erase_node(user)
            parts.append(activation)
        if parts:
            fused[node.target] = parts
    graph_module.graph.lint()
    graph_module.delete_all_unused_submodules()
    graph_module.recompile()
    return fused


# torch.fx tracing now (symbolic_trace) or torch.compile / torch.export; is_fx_tracing itself logs a warning.
_fx_symbolic_tracing = getattr(_symbolic_trace, "is_fx_symbolic_tracing", None) or _symbolic_trace.is_fx_tracing


def _tracing() -> bool:
    return _fx_symbolic_tracing() or torch.compiler.is_compiling()


def _references_seen(value) -> int:
    return sys.getrefcount(value)


def _references_of_a_sole_local() -> int:
    value = object()  # held by this frame's local only, as the marked graph's code holds a residual
    return _references_seen(value)


# What sys.getrefcount reports, one call down, for an object nothing but its caller's local variable holds (3 on
# CPython 3.11); measured rather than assumed, as interpreters count arguments differently.
_SOLE_LOCAL_REFERENCES = _references_of_a_sole_local()
# The module classes a marked call may involve (the engine's own, registered by mark_reusable_residuals): a module
# swapped in since (a wrapper that keeps its input) turns the reuse off.
_REUSE_SAFE_TYPES: set[type] = set()


def residual_reuse_allowed(residual: torch.Tensor, *modules: nn.Module) -> bool:
    """Whether a call marked by :func:`mark_reusable_residuals` may write into ``residual`` now. Not when anything
    but the marked graph's own variable holds the tensor (an ``fx.Interpreter`` recording values, a wrapper or a
    hook keeping it: its reference count says so); not while a hook is registered on one of ``modules`` (the layer
    that made the residual, the layers that read it, the layer itself) or on every module
    (``torch.nn.modules.module.register_module_forward_hook``), since a hook may keep a view of it; not when one of
    them is no longer a class of the engine's (a module swapped in since); and not while torch.fx traces the graph
    again (``create_feature_extractor``, or unpickling, which re-traces): the new graph would keep the answer as a
    constant although it may read the residual later (a feature it returns). The marked graph calls it on every
    run, with the residual as its own local variable."""
    if _references_seen(residual) > _SOLE_LOCAL_REFERENCES + 1:  # + 1: this function's own parameter
        return False
    return reuse_allowed_by_modules(*modules)


def reuse_allowed_by_modules(*modules: nn.Module) -> bool:
    """:func:`residual_reuse_allowed` less its reference count: no tracing, no hook on ``modules`` or on every
    module, and each of them a class of the engine's. A compiled call plan (vpns_fast.deploy.call_plan), whose
    values nothing outside it holds, decides by this when it is made, and checks the hooks again on every run."""
    if _tracing() or (module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks
                      or module_globals._global_backward_hooks or module_globals._global_backward_pre_hooks):
        return False
    return all(type(m) in _REUSE_SAFE_TYPES and not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                                                     or m._backward_pre_hooks) for m in modules)


def mark_reusable_residuals(graph_module: fx.GraphModule, reusing: tuple[type[nn.Module], ...],
                            fresh: tuple[type[nn.Module], ...],
                            wanted: Callable[[fx.Node, nn.Module], bool] | None = None) -> list[str]:
    """Lets each fused layer of a ``reusing`` class that is the last reader of its residual write its output into
    the residual: its call gets ``residual_reusable=residual_reuse_allowed(<the layers involved>)``, which the
    graph evaluates on every run (see :func:`residual_reuse_allowed`); returns those layers' names. Only where
    the write cannot be seen: the residual comes from a call to a ``fresh`` module (one returning a new tensor,
    never a view of another: the engine's convolutions and poolings); every reader of it is such a call too, or
    this layer, coming before it in the graph (a view made of the residual could be read after the write); the
    residual is not also the layer's input; and no layer involved has a hook now. Run after the other rewrites,
    on the final order. A layer whose class sets ``adds_into_residual = False`` (it always writes a new output) is
    not marked: the mark's check would cost every run for nothing; nor is a call for which ``wanted(node, layer)``
    (where given) is false."""
    _REUSE_SAFE_TYPES.update(reusing + fresh)
    order = {node: index for index, node in enumerate(graph_module.graph.nodes)}
    marked = []
    for node in list(graph_module.graph.nodes):
        layer = _module(graph_module, node)
        if (not isinstance(layer, reusing) or not getattr(layer, "adds_into_residual", True) or len(node.args) != 2
                or node.kwargs or module_hooks(layer) or (wanted is not None and not wanted(node, layer))):
            continue
        residual = node.args[1]
        if residual is node.args[0]:  # the layer reads its input while it writes
            continue
        producer = _module(graph_module, residual) if isinstance(residual, fx.Node) else None
        if not isinstance(producer, fresh) or module_hooks(producer):
            continue
        readers = [user for user in residual.users if user is not node]
        if all(isinstance(_module(graph_module, user), fresh) and not module_hooks(_module(graph_module, user))
               and order[user] < order[node] for user in readers):
            with graph_module.graph.inserting_before(node):
                involved = [graph_module.graph.get_attr(target)
                            for target in dict.fromkeys([residual.target, *(user.target for user in readers),
                                                         node.target])]
                allowed = graph_module.graph.call_function(residual_reuse_allowed, (residual, *involved))
            node.kwargs = {"residual_reusable": allowed}
            marked.append(node.target)
    graph_module.graph.lint()
    graph_module.recompile()
    return marked


def mark_aligned_outputs(graph_module: fx.GraphModule, aligned: type[nn.Module]) -> list[str]:
    """Passes ``aligned_output=True`` to each call of an ``aligned`` layer (exactly that class: SparseConv2d) made
    from one place whose output is read only by calls of such layers (as their input or their fused residual), none
    of them with hooks, one of them reading it in place as its input (``reads_input_in_place``: a 1x1 conv, the
    reader whose loads the layout aligns), and returns the layers' names: that output's channels may then lie apart
    by whole vectors (see SparseConv2d), a layout only those readers see. Not for an output the graph returns or
    anything else reads (code written for NCHW may ``.view`` it), nor for the layer called by other code."""
    single = _called_once(graph_module)
    marked = []
    for node in graph_module.graph.nodes:
        layer = _module(graph_module, node)
        if (type(layer) is not aligned or node.target not in single or module_hooks(layer) or not node.users
                or "aligned_output" in node.kwargs):
            continue
        readers = {user: _module(graph_module, user) for user in node.users}
        if (all(type(reader) is aligned and not module_hooks(reader) for reader in readers.values())
                and any(user.args[:1] == (node,) and reader.reads_input_in_place for user, reader in readers.items())):
            node.kwargs = {**node.kwargs, "aligned_output": True}
            marked.append(node.target)
    graph_module.graph.lint()
    graph_module.recompile()
    return marked


def unmark_aligned_outputs(graph_module: fx.GraphModule) -> None:
    """Undoes :func:`mark_aligned_outputs`: every call writes a contiguous output again."""
    for node in graph_module.graph.nodes:
        if "aligned_output" in node.kwargs:
            node.kwargs = {key: value for key, value in node.kwargs.items() if key != "aligned_output"}
    graph_module.recompile()


def unmark_reusable_residuals(graph_module: fx.GraphModule) -> None:
    """Undoes :func:`mark_reusable_residuals`: the calls lose ``residual_reusable`` and the checks go."""
    graph = graph_module.graph
    for node in list(graph.nodes):
        if "residual_reusable" in node.kwargs:
            node.kwargs = {key: value for key, value in node.kwargs.items() if key != "residual_reusable"}
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is residual_reuse_allowed and not node.users:
            graph.erase_node(node)
    modules = dict(graph_module.named_modules())
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users and node.target in modules:  # the checks' module arguments
            graph.erase_node(node)
    graph.lint()
    graph_module.recompile()


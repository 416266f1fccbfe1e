"""Compiled call plans: a converted network's calls for one input shape, run as one C++ call.

``convert_for_cpu`` gives a traced graph (``torch.fx``) whose forward reaches each layer through the module tree and
runs each layer's Python (checks, caches of offsets and packed weights, the choice of kernel) on every call. For a
given input shape those calls are the same every time: :func:`build` walks the graph once, calls each node as the
graph would, and records the kernel call each layer made, with the arguments it computed (each layer class's
``add_to_plan``), into the extension's ``CallPlan`` (csrc/call_plan.cpp); a node with no kernel step of its own (a
torch function, a layer the engine leaves, a tensor method) becomes a step that calls it back in Python. The plan
then runs them back to back in C++ (the GIL released), dropping each value after its last use as the graph does.

Why: at batch 1 with sparse layers that Python was a measurable share of a call (ResNet-50 at 5% kept: 12% of the
main thread's samples on a Zen 5 host, while the second thread waited). With plans, in one process, batch 1, 2
threads, the same deployed module with and without: ResNet-18 and ResNet-50 at 5-50% kept 1.06-1.12x, mobile networks
1.06-1.43x, a ViT 1.01-1.03x; batch 32 0.99-1.04x (bench/results/cpu-call-plan-ab-2026-12-06-amd*.txt).

A plan gives the graph's output or is not used:
- :func:`build` compares the plan's output with the graph's on the call that makes it, bit for bit, and refuses the
  plan (with the reason) where they differ, or where the graph computes a value that is no tensor and that the
  input's shape does not decide (an ``.item()``); a shape of an intermediate tensor kept as a value, and the shape
  and strides of a tensor a Python step made before a kernel step reads it, are checked on every run
  (``expect_sizes``: a shape the data decides raises ShapeChanged, and that input shape is refused).
- :meth:`PlanEntry.current` and :meth:`NetworkPlan.hooks_on_called`, on every call: the same network, graph forward
  and module tree along every called path; no engine layer edited since (:func:`sparse_cpu.layer_edits`); the modules
  the plan runs itself with their class, forward and tensor objects, and the torch modules' attributes it read, as
  they were; no forward hook on a called module (:func:`hooks_on`: nor on the network or every module). The C++ side
  checks that no weight or buffer of a called module changed in place or was given other memory.
Where any of that fails, the network's own forward runs, and a new plan is made where one can be.
"""
from __future__ import annotations

import dataclasses
import operator

import torch
from torch import fx, nn
from torch.nn.modules import module as module_globals
from torch.nn.modules.utils import _list_with_default

from vpns_fast.deploy import fusion, sparse_cpu

_ENABLED = {"on": True}
# Plans (and refusals) a module keeps, one per input shape: the least recently made goes first.
MAX_PLANS = 8


def set_call_plans(enabled: bool) -> bool:
    """Whether deployed CPU models run their network through a compiled call plan (on by default; off: the traced
    graph's forward on every call); returns the previous setting. For A/B measurements."""
    previous = _ENABLED["on"]
    _ENABLED["on"] = bool(enabled)
    return previous


def call_plans_enabled() -> bool:
    return _ENABLED["on"]


class _NeverRaised(Exception):
    """Stands for the extension's ShapeChanged where the extension is not built (no plan runs there)."""


# What a plan's run raises where a shape it kept as a value differs on this input (csrc/vpns_ops.h, ShapeChanged).
ShapeChanged: type[Exception] = sparse_cpu._ops().ShapeChanged if sparse_cpu.available()[0] else _NeverRaised


def plan_key(x: torch.Tensor) -> tuple:
    """What a plan is made for: the input's shape, strides, dtype and device."""
    return tuple(x.shape), x.stride(), x.dtype, x.device


def _graph_output(network: nn.Module, x: torch.Tensor):
    """``network(x)`` through its graph, recording no gradient (as a plan runs)."""
    with torch.no_grad():
        return network(x)


def hooks_on(network: nn.Module) -> bool:
    """Whether a forward hook is registered on ``network`` or on every module: its call then goes through the
    network's own forward, which runs them (a plan would call around them)."""
    return bool(module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks
                or network._forward_hooks or network._forward_pre_hooks)


@dataclasses.dataclass(frozen=True)
class NetworkPlan:
    """A compiled plan and the modules it calls (see the module's docstring)."""

    compiled: object  # the extension's CallPlan
    edges: tuple  # (parent, name, child) along every called module's path
    called: tuple  # every module the graph calls
    attributes: tuple  # (module, name, value frozen) the plan read from torch modules
    tensor_attributes: tuple  # (module, name, tensor) that get_attr nodes read
    kernels: tuple  # (module, its class, the class's forward) of every module the plan runs as its own step
    tensors: tuple  # (module, "_buffers" or "_parameters", name, tensor) of those modules
    step_nodes: tuple  # for each step, the graph node it was made for: (its op, its target or name)
    python_calls: tuple  # the Python steps' callables, which the compiled plan holds weakly
    # the extension's ObjectChecks, made from the fields above: of edges, tensor_attributes, kernels and tensors
    # (:func:`_unchanged_checks`), and that no called module has a forward hook (:func:`_hookless_checks`)
    unchanged: object = dataclasses.field(init=False, repr=False)
    hookless: object = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "unchanged", _unchanged_checks(self.edges, self.called, self.tensor_attributes,
                                                                 self.kernels, self.tensors))
        object.__setattr__(self, "hookless", _hookless_checks(self.called))

    @property
    def steps(self) -> int:
        return self.compiled.steps

    def tree_unchanged(self) -> bool:
        """Whether the module tree along every called path, the tensors the graph reads, the modules the plan runs
        itself (class, forward, tensors) and the torch modules' attributes read are as when the plan was made."""
        return self.unchanged() and all(_frozen(getattr(module, name)) == value
                                        for module, name, value in self.attributes)

    def hooks_on_called(self) -> bool:
        return not self.hookless()

    def run(self, x: torch.Tensor) -> torch.Tensor | None:
        """The network's output for ``x`` (of the plan's key), or None when a tensor the plan was made from has
        changed in place since (the plan is stale). Raises ``ShapeChanged`` (of the extension) where a tensor's shape
        that the plan kept as a value differs on this input (a shape the data decides)."""
        return self.compiled.run(x)

    def run_timed(self, x: torch.Tensor) -> tuple[torch.Tensor | None, list[tuple[str, str, str, float]]]:
        """:meth:`run`, and for each step (op, target, step name, seconds): the graph node it was made for (``op``
        ``call_module``: ``target`` is the module's path; else the node's name), the extension's step, and its time
        inside the whole call. No steps where the plan is stale."""
        output, seconds = self.compiled.run_timed(x)
        if not seconds:  # stale
            return output, []
        return output, [(*node, name, time)
                        for node, name, time in zip(self.step_nodes, self.compiled.step_names, seconds, strict=True)]


def seconds_by_module(steps) -> dict[str | None, float]:
    """Steps as :meth:`NetworkPlan.run_timed` gives them, their times summed by the module each was made for (its
    path), those of the nodes that are no module call (torch functions, tensor methods) under None."""
    total: dict[str | None, float] = {}
    for op, target, _, seconds in steps:
        key = target if op == "call_module" else None
        total[key] = total.get(key, 0.0) + seconds
    return total


def _instance_dict_checked(checks, owner, seen: set) -> dict:
    """``owner.__dict__``, with a check (once per owner) that it stays that dict."""
    mapping = owner.__dict__
    if id(owner) not in seen:
        seen.add(id(owner))
        checks.add_instance_dict(owner, mapping)
    return mapping


def _attribute_dict_checked(checks, owner, where: str, seen: set) -> dict:
    """``owner``'s ``where`` dict (``_modules``, ``_buffers``, ...), checked to stay the one its ``__dict__`` holds."""
    mapping = _instance_dict_checked(checks, owner, seen)[where]
    if (id(owner), where) not in seen:
        seen.add((id(owner), where))
        checks.add_item(owner.__dict__, where, mapping)
    return mapping


def _unchanged_checks(edges, called, tensor_attributes, kernels, tensors):
    """The extension's ObjectChecks of what :meth:`NetworkPlan.tree_unchanged` compares, each as the lookup Python
    makes: ``parent._modules[name] is child`` along every called path, with no attribute of that name in the
    parent's instance dict (which the traced forward's ``self.name`` would find first); ``getattr(owner, name) is
    tensor`` for the graph's get_attr tensors; for every module the plan runs itself its class, its class's forward,
    no forward on the instance, and each of its parameters and buffers. The dicts themselves are checked to stay the
    instance's, the called modules' hook dicts too (:func:`_hookless_checks` reads them: one replaced, by
    ``m._forward_hooks = OrderedDict()``, makes the plan stale and a new one is made)."""
    checks, seen = sparse_cpu._ops().ObjectChecks(), set()
    for parent, name, child in edges:
        checks.add_item(_attribute_dict_checked(checks, parent, "_modules", seen), name, child)
        checks.add_absent(parent.__dict__, name)
    for module in called:
        for where in _HOOK_DICTS:
            _attribute_dict_checked(checks, module, where, seen)
    for owner, name, tensor in tensor_attributes:  # few (a traced graph's constants): the full lookup, __getattr__
        checks.add_attribute(owner, name, tensor)
    for kind, forward in dict.fromkeys((kind, forward) for _, kind, forward in kernels):  # a few classes
        checks.add_attribute(kind, "forward", forward)
    for module, kind, _ in kernels:
        checks.add_type(module, kind)
        checks.add_absent(_instance_dict_checked(checks, module, seen), "forward")
    for module, where, name, tensor in tensors:
        checks.add_item(_attribute_dict_checked(checks, module, where, seen), name, tensor)
    return checks


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks")


def _hookless_checks(called):
    """The extension's ObjectChecks that every called module's forward hook dicts are empty (that they are still
    the module's is :func:`_unchanged_checks`' part)."""
    checks = sparse_cpu._ops().ObjectChecks()
    for module in dict.fromkeys(called):
        for where in _HOOK_DICTS:
            checks.add_empty(module.__dict__[where])
    return checks


def _frozen(value):
    """A value as compared on every run: a list (which may change in place) as a tuple."""
    return tuple(value) if isinstance(value, list) else value


@dataclasses.dataclass(frozen=True)
class PlanEntry:
    """What a module keeps for one input shape: a plan, or why none (``reason``), and what it was made from."""

    plan: NetworkPlan | None
    reason: str
    network: nn.Module
    forward: object  # the graph's forward function then
    edits: int  # sparse_cpu.layer_edits() then
    instance_forward: object = None  # a forward set on the network instance then (no plan is made with one)

    @classmethod
    def made(cls, network: nn.Module, x: torch.Tensor) -> tuple[PlanEntry, torch.Tensor]:
        """(entry, the network's output for ``x``): a plan made by :func:`build`, or the reason why not."""
        edits, forward = sparse_cpu.layer_edits(), type(network).forward
        plan, reason, output = build(network, x)
        return cls(plan, reason, network, forward, edits, network.__dict__.get("forward")), output

    def refused(self, reason: str) -> PlanEntry:
        """This entry without its plan, for ``reason``."""
        return dataclasses.replace(self, plan=None, reason=reason)

    def current(self, network: nn.Module) -> bool:
        """Whether the entry still describes ``network``: the same network, graph forward, forward set on the
        instance (or none) and engine layers (no edit since), and for a plan the same module tree."""
        return (network is self.network and sparse_cpu.layer_edits() == self.edits
                and type(network).forward is self.forward and network.__dict__.get("forward") is self.instance_forward
                and (self.plan is None or self.plan.tree_unchanged()))


class NetworkPlans:
    """A deployed module's plans, one entry per input shape (at most MAX_PLANS, the least recently made dropped
    first), and when each is used. Not pickled: the module drops it and makes a new one on its next call."""

    def __init__(self):
        self.entries: dict[tuple, PlanEntry] = {}  # replaced, never changed in place: other threads may read it

    def output(self, network: nn.Module, x: torch.Tensor):
        """``network(x)`` with no gradient recorded, whether or not the caller turned them off: through the plan for
        ``x``'s key where it is current and no hook is registered (gradients off inside it, csrc/call_plan.cpp),
        else the graph under ``torch.no_grad()`` (a new plan made where the entry is missing or stale). A deployed
        model's fast path calls it without ``torch.no_grad()`` around it, whose enter and exit cost more than
        the plan's own checks right after a call (vpns_fast.deploy.runtime.DeployedModel._fast_input)."""
        return self._output(network, x, timed=False)[0]

    def timed_output(self, network: nn.Module, x: torch.Tensor):
        """(``network(x)`` as :meth:`output` gives it, each step's (op, target, step name, seconds) as
        :meth:`NetworkPlan.run_timed` gives them where the plan ran, else None)."""
        return self._output(network, x, timed=True)

    def _output(self, network: nn.Module, x: torch.Tensor, timed: bool):
        if not call_plans_enabled() or hooks_on(network):
            return _graph_output(network, x), None  # a plan would call around the hooks
        entries, key = self.entries, plan_key(x)
        entry = entries.get(key)
        if entry is not None and entry.current(network):
            if entry.plan is None or entry.plan.hooks_on_called():
                # refused, and nothing it depends on has changed; or hooks to run
                return _graph_output(network, x), None
            try:
                out, steps = entry.plan.run_timed(x) if timed else (entry.plan.run(x), None)
            except ShapeChanged:  # a shape the data decides: no plan for this network and shape
                self._keep(key, entry.refused("a shape that the data decides (not the input's) changed between "
                                              "calls"), entries, network)
                return _graph_output(network, x), None
            if out is not None:
                return out, steps
            # else a tensor it was made from changed in place: a new plan
        # (no lock: two threads meeting a new shape at once each make a plan, and one is kept; a lock held while the
        # network's own code runs could deadlock, a deployed model called inside another's graph)
        with torch.no_grad():
            entry, out = PlanEntry.made(network, x)
        self._keep(key, entry, entries, network)
        return out, None

    def _keep(self, key: tuple, entry: PlanEntry, entries: dict, network: nn.Module) -> None:
        """``entries`` with ``entry`` for ``key``, less the entries no longer current (they hold a replaced network's
        or the old weights' copies) and the least recently made beyond MAX_PLANS, as a new dict."""
        kept = {k: v for k, v in entries.items() if k != key and v.current(network)}
        while len(kept) >= MAX_PLANS:
            del kept[next(iter(kept))]
        kept[key] = entry
        self.entries = kept

    def summary(self) -> list[dict]:
        """One dict an entry: ``input_shape``, ``steps`` (0 where refused) and ``refused`` (why not, or "")."""
        return [{"input_shape": key[0], "steps": entry.plan.steps if entry.plan else 0, "refused": entry.reason}
                for key, entry in self.entries.items()]


class PlanRefused(Exception):
    """Why a network gets no plan for an input (the message)."""


_ENGINE_CONVS = (sparse_cpu.SparseConv2d, sparse_cpu.DenseConv2d, sparse_cpu.WinogradConv2d)
_ENGINE_ONE_INPUT = (sparse_cpu.SeparableMaxPool2d, sparse_cpu.GlobalAvgPool2d, sparse_cpu.SparseLinear,
                     sparse_cpu.DenseLinear)
_CONV_KEYWORDS = frozenset({"residual", "residual_reusable", "aligned_output"})


def build(network: nn.Module, x: torch.Tensor) -> tuple[NetworkPlan | None, str, torch.Tensor]:
    """(plan or None, why not, the network's output for ``x``): ``x``'s call through the graph, each layer called as
    the graph calls it, recorded into a plan where every call can be. The output is the call's own, whether or not
    a plan was made."""
    builder = _Builder(network)
    try:
        plan, output = builder.walk(x)
    except PlanRefused as refused:
        return None, str(refused), builder.output_or_run(x)
    got = plan.run(x)
    if got is None or got.shape != output.shape or got.stride() != output.stride() or not torch.equal(got, output):
        return None, "the plan's output differed from the network's on the example", output
    watched = {id(t): t for m in builder.called for t in (*m.buffers(recurse=False), *m.parameters(recurse=False))}
    for tensor in watched.values():
        if tensor.is_inference():
            return None, ("a layer holds an inference tensor (made in torch.inference_mode), whose changes no "
                          "version counter shows"), output
        plan.watch(tensor)
    return NetworkPlan(plan, tuple(builder.edges.values()), tuple(builder.called), tuple(builder.attributes),
                       tuple(builder.tensor_attributes), tuple(builder.kernels), tuple(builder.tensors),
                       tuple(builder.step_nodes), tuple(builder.python_calls)), "", output


class _Builder:
    def __init__(self, network: nn.Module):
        self.network = network
        self.edges: dict[tuple[int, str], tuple] = {}
        self.called: list[nn.Module] = []
        self.attributes: list[tuple] = []
        self.values: dict[fx.Node, object] = {}
        self.slots: dict[fx.Node, int] = {}
        self.slotted: set[fx.Node] = set()  # the nodes whose tensors the plan holds in their slots when it runs
        self.tensor_attributes: list[tuple] = []  # (module, name, tensor) read by get_attr nodes
        self.split: set[fx.Node] = set()  # nodes giving a sequence whose tensors their step keeps item by item
        self.kernels: list[tuple] = []  # (module, class, forward) of the modules run as the plan's own steps
        self.tensors: list[tuple] = []  # (module, "_buffers" / "_parameters", name, tensor) of those
        self.python_made: set[fx.Node] = set()  # the tensors Python steps make (their shapes the data may decide)
        # the tensors a step checks on every run: their sizes (False), or their sizes and strides (True)
        self.expected: dict[fx.Node, bool] = {}
        self.step_nodes: list[tuple[str, str]] = []  # (op, module path or node name) for each step added
        self.python_calls: list[_NodeCall] = []  # kept alive here and by the NetworkPlan: the plan holds them weakly
        self.finished = None

    def output_or_run(self, x: torch.Tensor) -> torch.Tensor:
        return self.finished if self.finished is not None else self.network(x)

    def walk(self, x: torch.Tensor):
        network = self.network
        if not isinstance(network, fx.GraphModule):
            raise PlanRefused(f"the network is a {type(network).__name__}, not a traced graph")
        if "forward" in network.__dict__:
            raise PlanRefused("the network has a forward of its own, set on the instance, which its graph is not")
        if not sparse_cpu.available()[0]:
            raise PlanRefused("the C++ extension is not available")
        if torch.is_grad_enabled() and x.requires_grad:
            raise PlanRefused("the input needs a gradient")
        nodes = list(network.graph.nodes)
        placeholders = [n for n in nodes if n.op == "placeholder"]
        outputs = [n for n in nodes if n.op == "output"]
        if len(placeholders) != 1 or len(outputs) != 1 or not isinstance(outputs[0].args[0], fx.Node):
            raise PlanRefused("the graph does not take one tensor and return one")
        last_use = {}
        for index, node in enumerate(nodes):
            for used in node.all_input_nodes:
                last_use[used] = index
        self.slots = {node: index for index, node in enumerate(nodes)}  # slot 0: the placeholder, first node
        if nodes[0] is not placeholders[0]:
            raise PlanRefused("the graph's input is not its first node")
        result = outputs[0].args[0]
        plan = sparse_cpu._ops().CallPlan(len(nodes), self.slots[result])
        for index, node in enumerate(nodes):
            if node.op == "placeholder":
                self.values[node] = x
                self.slotted.add(node)
                continue
            if node.op == "output":
                break
            before = plan.steps
            self.values[node] = self._step(plan, node)
            label = (node.op, node.target if node.op == "call_module" else node.name)
            self.step_nodes += [label] * (plan.steps - before)
            if node.op != "get_attr" and isinstance(self.values[node], torch.Tensor):
                self.slotted.add(node)
            done = [used for used in node.all_input_nodes
                    if last_use[used] == index and used is not result and used in self.slotted]
            released = [self.slots[used] for used in done]
            if last_use.get(node) is None and node is not result and node in self.slotted:
                released.append(self.slots[node])  # nothing reads it
            if released and plan.steps:
                plan.release_after_last_step(released)
            for used in done:  # dropped here too, as the graph drops them: a batch-32 call's activations would
                self.values[used] = None  # otherwise all be held at once (gigabytes on ResNet-50)
        output = self.values[result]
        if result not in self.slotted:
            raise PlanRefused("the graph returns no tensor it made")
        self.finished = output
        return plan, output

    def _attribute(self, target: str):
        """A get_attr node's value: a submodule (kept on the tree's checked paths), or a parameter or buffer (its
        owner's attribute checked on every run too: the Python steps that read it hold the tensor itself)."""
        owner_path, _, name = target.rpartition(".")
        owner = self._module(owner_path) if owner_path else self.network
        if name in owner._modules:
            return self._module(target)
        value = getattr(owner, name, None)
        if not isinstance(value, torch.Tensor):
            raise PlanRefused(f"{target} is neither a submodule nor a tensor")
        self.tensor_attributes.append((owner, name, value))
        return value

    def _module(self, target: str) -> nn.Module:
        module = self.network
        for name in target.split(".") if target else ():
            child = module._modules.get(name)
            if child is None:
                raise PlanRefused(f"{target} is not a submodule")
            if name in module.__dict__:  # what the graph's self.name finds first
                raise PlanRefused(f"{target}: an attribute of the instance hides the submodule of that name")
            self.edges[(id(module), name)] = (module, name, child)
            module = child
        return module

    def _value(self, arg):
        return fx.node.map_arg(arg, self.values.__getitem__)

    def _step(self, plan, node: fx.Node):
        """Adds ``node``'s call to ``plan`` and returns its value for the example."""
        if node.op == "get_attr":
            return self._attribute(node.target)
        if node.op not in ("call_function", "call_module", "call_method"):
            raise PlanRefused(f"{node.name}: a {node.op} node")
        if node.target is fusion.residual_reuse_allowed:
            # its reference count is the graph's own business: a plan's values are held by nothing else
            return fusion.reuse_allowed_by_modules(*self._value(node.args[1:]))
        if node.op == "call_function" and node.target is operator.getitem and node.args[0] in self.split:
            self.python_made.add(node)
            return self.values[node.args[0]][node.args[1]]  # its slot filled by the step that made the sequence
        function = self._callable(node)
        args, kwargs = self._value(node.args), self._value(node.kwargs)
        out = function(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            if self._kernel_step(plan, node, args, kwargs, out):
                self._kernel_module_recorded(node)
            else:
                self._python_step(plan, node, function)
                self.python_made.add(node)
        elif self._constant_for_the_shape(plan, node):
            pass
        elif isinstance(out, (tuple, list)):
            self._python_step(plan, node, function, self._taken_items(node, out))
        else:
            raise PlanRefused(f"{node.name}: gives a {type(out).__name__}, not a tensor (a plan passes tensors "
                              "only, and values that the input's shape alone decides)")
        return out

    def _taken_items(self, node: fx.Node, out) -> list[fx.Node]:
        """The getitem nodes that take ``node``'s sequence apart, those of them that take a tensor (their slots the
        step fills); refused where anything else reads the sequence or an item that is no tensor is read."""
        taken = []
        for user in node.users:
            if user.op != "call_function" or user.target is not operator.getitem or not isinstance(user.args[1], int):
                raise PlanRefused(f"{node.name}: gives a {type(out).__name__} that {user.name} reads whole (a plan "
                                  "passes tensors only)")
            item = out[user.args[1]]
            if isinstance(item, torch.Tensor):
                taken.append(user)
            elif user.users:
                raise PlanRefused(f"{user.name}: takes a {type(item).__name__} from {node.name}, not a tensor")
        self.split.add(node)
        return taken

    def _callable(self, node: fx.Node):
        if node.op == "call_module":
            module = self._module(node.target)
            self.called.append(module)
            return module
        if node.op == "call_method":
            name = node.target
            return lambda receiver, *args, **kwargs: getattr(receiver, name)(*args, **kwargs)
        return node.target

    def _constant_for_the_shape(self, plan, node: fx.Node) -> bool:
        """Whether ``node``'s (non-tensor) value is fixed by the input's shape: a shape query of a tensor, or an
        operator, a builtin, a ``math`` function or an assert (``torch._assert``, or the engine's rewrite of it that
        formats its message late: a check on the shape) of values that are no tensors."""
        queried = ((node.op == "call_method" and node.target in ("size", "dim"))
                   or (node.op == "call_function" and node.target is getattr and node.args[1:] in (("shape",),
                                                                                                 ("ndim",))))
        if queried:
            tensor = node.args[0]
            # the input's shape is the plan's key; an intermediate's may depend on the data (a boolean mask's
            # selection, nonzero), so a step checks it on every run
            if tensor in self.slotted and tensor.op != "placeholder":
                self._expect(plan, tensor, strides=False)
            return True
        inputs_constant = all(not isinstance(self.values[n], torch.Tensor) for n in node.all_input_nodes)
        return inputs_constant and node.op == "call_function" and (
            node.target in (torch._assert, fusion.traced_assert)
            or getattr(node.target, "__module__", None) in ("_operator", "operator", "builtins", "math"))

    def _kernel_module_recorded(self, node: fx.Node) -> None:
        """For a module call the plan now makes itself: its class, forward and tensors, checked on every run."""
        if node.op != "call_module":
            return
        module = self.called[-1]
        self.kernels.append((module, type(module), type(module).forward))
        self.tensors += [(module, where, name, tensor) for where in ("_buffers", "_parameters")
                         for name, tensor in getattr(module, where).items()]

    def _python_step(self, plan, node: fx.Node, function, taken: list[fx.Node] | None = None) -> None:
        """``node``'s call as a Python step; ``taken``: where it gives a sequence, the getitem nodes whose tensors
        the step keeps (in their slots)."""
        tensor_nodes = [n for n in node.all_input_nodes if n in self.slotted]
        constants = {n: self.values[n] for n in node.all_input_nodes if n not in tensor_nodes}
        call = _NodeCall(function, node.args, node.kwargs, tensor_nodes, constants,
                         None if taken is None else [user.args[1] for user in taken])
        outputs = [self.slots[node]] if taken is None else [self.slots[user] for user in taken]
        if outputs:
            self.python_calls.append(call)
            plan.add_python_call(str(node.target) if node.op != "call_function" else node.name,
                                 [self.slots[n] for n in tensor_nodes], outputs, call)

    def _expect(self, plan, tensor: fx.Node, strides: bool) -> None:
        """A step that checks ``tensor``'s sizes (and ``strides``) on every run, unless one already checks as much."""
        if tensor in self.expected and (self.expected[tensor] or not strides):
            return
        value = self.values[tensor]
        plan.add_expect_sizes(self.slots[tensor], list(value.shape), list(value.stride()) if strides else [])
        self.expected[tensor] = strides

    def _expect_layouts(self, plan, nodes) -> None:
        """Before a kernel step made for its inputs' shapes: a check of the sizes and strides of each input that a
        Python step made (the data may decide them: ``y[:, :, mask]``); the others follow from the plan's input."""
        for used in nodes:
            if used in self.python_made:
                self._expect(plan, used, strides=True)

    def _kernel_step(self, plan, node: fx.Node, args, kwargs, out) -> bool:
        """Adds ``node``'s call as the extension's own step where it has one (False: it has not), after the checks of
        :meth:`_expect_layouts` on its inputs (an engine layer's ``add_to_plan`` that then declines leaves them before
        the Python step that follows: they only make the plan give way to the graph sooner)."""
        target, slot = node.target, self.slots[node]
        inputs = [n for n in node.all_input_nodes if n in self.slotted]
        if node.op == "call_function":
            if target is torch.flatten and not kwargs and 1 <= len(args) <= 3 and node.args[0] in self.slotted:
                start, end = (list(args[1:]) + [0, -1][len(args) - 1:])[:2]
                self._expect_layouts(plan, inputs)
                plan.add_flatten(self.slots[node.args[0]], slot, start, end)
                return True
            return False
        if node.op != "call_module" or not node.args or node.args[0] not in self.slotted:
            return False
        module, input_slot, x = self.called[-1], self.slots[node.args[0]], args[0]
        kind = type(module)
        if kind in _ENGINE_CONVS:
            if len(args) > 2 or set(kwargs) - _CONV_KEYWORDS:
                return False
            residual_arg = node.args[1] if len(node.args) > 1 else node.kwargs.get("residual")
            if residual_arg is not None and residual_arg not in self.slotted:
                return False
            residual = None if residual_arg is None else self.values[residual_arg]
            residual_slot = -1 if residual_arg is None else self.slots[residual_arg]
            self._expect_layouts(plan, inputs)
            return module.add_to_plan(plan, (input_slot, residual_slot, slot), x, residual,
                                      **{k: v for k, v in kwargs.items() if k != "residual"})
        if len(args) != 1 or kwargs:
            return False
        if kind in (*_ENGINE_ONE_INPUT, nn.AdaptiveAvgPool2d, nn.Flatten):
            self._expect_layouts(plan, inputs)
        if kind in _ENGINE_ONE_INPUT:
            return module.add_to_plan(plan, (input_slot, slot), x)
        if kind is nn.AdaptiveAvgPool2d and x.dim() == 4:
            self.attributes.append((module, "output_size", _frozen(module.output_size)))
            size = _list_with_default(module.output_size, x.size())  # as F.adaptive_avg_pool2d
            plan.add_adaptive_avg_pool(input_slot, slot, [size, size] if isinstance(size, int) else list(size))
            return True
        if kind is nn.Flatten:
            self.attributes += [(module, "start_dim", module.start_dim), (module, "end_dim", module.end_dim)]
            plan.add_flatten(input_slot, slot, module.start_dim, module.end_dim)
            return True
        return False


class _NodeCall:
    """A graph node's call as a plan's Python step: ``function`` with the node's arguments, its tensors the step's
    inputs (in ``tensor_nodes``' order) and its other values as they were when the plan was made."""

    def __init__(self, function, args, kwargs, tensor_nodes: list[fx.Node], constants: dict,
                 items: list[int] | None = None):
        self.function, self.args, self.kwargs = function, args, kwargs
        self.tensor_nodes, self.constants, self.items = tensor_nodes, constants, items

    def __call__(self, *tensors):
        values = dict(zip(self.tensor_nodes, tensors))
        values.update(self.constants)
        args = fx.node.map_arg(self.args, values.__getitem__)
        kwargs = fx.node.map_arg(self.kwargs, values.__getitem__)
        out = self.function(*args, **kwargs)
        if self.items is None:
            return out
        return out[self.items[0]] if len(self.items) == 1 else [out[i] for i in self.items]  # the step's slots

"""Layer by layer against ONNX Runtime: where each engine's time goes in one whole call, on the same network.

This engine: the deployed network (``vpns_fast.deploy.deploy`` at the batch given, its per-layer choices measured)
run through its compiled call plan with each step timed where it runs, in the middle of a whole call (its caches as
a call leaves them, unlike the isolated timings of ``vpns bench-infer --layers``); where no plan is made, a torch.fx
interpreter times each node instead. ONNX Runtime: the
dense folded network exported as ``bench infer`` exports it, in the same session settings, with its own per-node
profiling on; its fused and layout-reordering nodes are mapped back to the torch module each came from, and what
maps to no module (ONNX Runtime's NCHWc reorders, for one) gets a row of its own. Medians over ``--iters`` calls
after two warm-up calls; each side's plain calls are timed too (neither profiler is free).

    .venv/bin/python -m bench.ort_layers resnet50 0.5 [--batch 1] [--threads 2] [--iters 10] > report.txt

Run it on a quiet machine: the engines are timed one after the other, not interleaved.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import statistics
import tempfile
import time

import torch
from torch import fx

from bench.cases.infer import add_pruned_model_arguments, checked_pruned_model_arguments, pruned_model

# What maps to no torch module: ONNX Runtime's layout reorders and reshapes, and this engine's function and method
# calls (flatten, an add left unfused). An elementwise ONNX node ONNX Runtime runs on its own counts for the layer
# whose output it reads (onnx_module_names), not here.
OTHER = "(no module)"


class TimedInterpreter(fx.Interpreter):
    """Runs a GraphModule node by node, adding each call's seconds to ``seconds[name]``: the module's path for a
    module call, OTHER for anything else (functions, methods)."""

    def __init__(self, graph_module: fx.GraphModule):
        super().__init__(graph_module)
        self.seconds: dict[str, float] = collections.defaultdict(float)

    def run_node(self, node: fx.Node):
        if node.op in ("placeholder", "output", "get_attr"):
            return super().run_node(node)
        start = time.perf_counter()
        result = super().run_node(node)
        self.seconds[node.target if node.op == "call_module" else OTHER] += time.perf_counter() - start
        return result


def our_layer_ms(network: fx.GraphModule, x: torch.Tensor,
                 iters: int) -> tuple[dict[str, float], float, float, str]:
    """({layer: median ms over the calls}, median ms of a timed call, median ms of a plain call, how the layers were
    timed): each step of the network's compiled call plan timed inside the whole call (the plain calls run the plan
    too), or where no plan is made, the graph interpreted node by node (the plain calls: the graph's forward)."""
    from vpns_fast.deploy import call_plan

    plans = call_plan.NetworkPlans()
    per_call: list[dict[str, float]] = []
    timed, plain = [], []
    with torch.inference_mode():
        for _ in range(2):
            plans.output(network, x)
        (entry,) = plans.summary()
        how = (f"its compiled call plan's {entry['steps']} steps timed inside each call" if entry["steps"] else
               f"interpreted node by node (no compiled call plan: {entry['refused']})")
        for _ in range(iters):
            start = time.perf_counter()
            if entry["steps"]:
                _, steps = plans.timed_output(network, x)
                if steps is None:
                    raise RuntimeError("the compiled call plan was not run (stale or refused)")
                seconds = {OTHER if module is None else module: step_seconds
                           for module, step_seconds in call_plan.seconds_by_module(steps).items()}
            else:
                interpreter = TimedInterpreter(network)
                interpreter.run(x)
                seconds = interpreter.seconds
            timed.append(time.perf_counter() - start)
            per_call.append(dict(seconds))
            start = time.perf_counter()
            plans.output(network, x)
            plain.append(time.perf_counter() - start)
    names = dict.fromkeys(name for call in per_call for name in call)
    return ({name: 1e3 * statistics.median(call.get(name, 0.0) for call in per_call) for name in names},
            1e3 * statistics.median(timed), 1e3 * statistics.median(plain), how)


# ONNX ops that ONNX Runtime fuses into the convolution or linear layer before them: a fused node is named after its
# last output, and traced back through these to the layer.
ELEMENTWISE = {"Relu", "Add", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Mul", "LeakyRelu"}


def onnx_module_names(graph) -> dict[str, str]:
    """{value name or node name: the torch module that makes it} for the values and nodes of the ONNX model
    ``graph`` (as the exporter names them): a node reading a weight (an initializer named ``<module>.weight``)
    belongs to that module; an elementwise node (ELEMENTWISE: ONNX Runtime fuses it into that layer) to the module of
    its first input that has one; any other node to the last module scope the exporter recorded for it
    (``pkg.torch.onnx.name_scopes``)."""
    weights = {initializer.name for initializer in graph.graph.initializer}
    producers = {output: node for node in graph.graph.node for output in node.output}
    names: dict[str, str] = {}

    def module_of(value: str, depth: int = 0) -> str | None:
        if value in names:
            return names[value]
        node = producers.get(value)
        if node is None or depth > 8:
            return None
        found = next((name[:-len(".weight")] for name in node.input if name in weights and name.endswith(".weight")),
                     None)
        if found is None and node.op_type in ELEMENTWISE:
            found = next((module for module in (module_of(name, depth + 1) for name in node.input) if module), None)
        if found is None:
            scopes = next((prop.value for prop in node.metadata_props if prop.key == "pkg.torch.onnx.name_scopes"),
                          "[]")
            modules = [scope.strip(" '") for scope in scopes.strip("[]").split(",")][1:-1]
            found = modules[-1] if modules else None
        if found is not None:
            names[value] = found
        return found

    for value in producers:
        module_of(value)
    for node in graph.graph.node:  # and by the node's own name (a graph output's value is renamed, e.g. "logits")
        module = next((names[output] for output in node.output if output in names), None)
        if node.name and module is not None:
            names.setdefault(node.name, module)
    return names


def ort_node_module(node_name: str, modules: dict[str, str]) -> str:
    """The torch module an ONNX Runtime node of the profile (its name, ``_kernel_time`` cut) comes from: nodes keep
    the name of the value they write (``_nchwc`` added where ONNX Runtime moved them to its blocked layout) or of the
    ONNX node; OTHER for its own (layout reorders)."""
    for name in (node_name, node_name.removesuffix("_nchwc")):
        if name in modules:
            return modules[name]
    return OTHER


def ort_profile_layers(events: list[dict], modules: dict[str, str],
                       warmup: int) -> tuple[dict[str, float], dict[str, str], float]:
    """From ONNX Runtime's profile ``events`` (its JSON): ({module: median ms a run}, {module: the ops ONNX Runtime
    ran for it}, median ms a profiled run), the first ``warmup`` runs left out; ``modules``:
    :func:`onnx_module_names` of the model it ran."""
    runs = sorted((event["ts"], event["ts"] + event["dur"]) for event in events
                  if event.get("cat") == "Session" and event.get("name") == "model_run")[warmup:]
    if not runs:
        raise ValueError("the profile holds no timed model_run")
    per_run: list[dict[str, float]] = [collections.defaultdict(float) for _ in runs]
    ops: dict[str, set[str]] = collections.defaultdict(set)
    for event in events:
        name = event.get("name", "")
        if event.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        index = next((i for i, (begin, end) in enumerate(runs) if begin <= event["ts"] <= end), None)
        if index is None:  # a warm-up run's
            continue
        module = ort_node_module(name[:-len("_kernel_time")], modules)
        per_run[index][module] += event["dur"] / 1e3
        ops[module].add(event.get("args", {}).get("op_name", "?"))
    names = dict.fromkeys(module for run in per_run for module in run)
    return ({module: statistics.median(run.get(module, 0.0) for run in per_run) for module in names},
            {module: "+".join(sorted(op_names)) for module, op_names in ops.items()},
            statistics.median((end - begin) / 1e3 for begin, end in runs))


def ort_layer_ms(network: torch.nn.Module, x: torch.Tensor, threads: int,
                 iters: int) -> tuple[dict[str, float], dict[str, str], float, float]:
    """ONNX Runtime on ``network`` exported as ``bench infer`` exports it: ({module: median ms}, {module: ops},
    median ms a profiled run, median ms of a plain call in a session without profiling)."""
    from vpns_fast.deploy.baselines import onnxruntime_session
    from vpns_fast.deploy.export import ONNX_OPSET, onnx_model

    graph, _ = onnx_model(network.eval(), x, ONNX_OPSET)
    array = x.contiguous().numpy()
    with tempfile.TemporaryDirectory(prefix="vpns-ort-layers-") as folder:
        session = onnxruntime_session(graph, threads, profile_prefix=os.path.join(folder, "ort"))
        name = session.get_inputs()[0].name
        for _ in range(2 + iters):
            session.run(None, {name: array})
        with open(session.end_profiling()) as file:
            events = json.load(file)
    layers, ops, profiled = ort_profile_layers(events, onnx_module_names(graph), warmup=2)
    session = onnxruntime_session(graph, threads)
    plain = []
    for index in range(2 + iters):
        start = time.perf_counter()
        session.run(None, {name: array})
        if index >= 2:
            plain.append(time.perf_counter() - start)
    return layers, ops, profiled, 1e3 * statistics.median(plain)


def format_rows(ours: dict[str, float], ort: dict[str, float], ort_ops: dict[str, str]) -> str:
    """One line per module in either engine (this engine's order, then ONNX Runtime's others): each side's ms, the
    ratio ours / ONNX Runtime (above 1: this engine is slower there) and the ops ONNX Runtime ran; then the
    sums."""
    lines = [f"{'module':<26} {'onnxruntime ms':>14} {'ours ms':>9} {'ours/ort':>8}  onnxruntime ops"]
    for module in list(ours) + [module for module in ort if module not in ours]:
        theirs, mine = ort.get(module), ours.get(module)
        ratio = f"{mine / theirs:8.2f}" if theirs and mine is not None else f"{'-':>8}"
        lines.append(f"{module[:26]:<26} {'-' if theirs is None else f'{theirs:.3f}':>14} "
                     f"{'-' if mine is None else f'{mine:.3f}':>9} {ratio}  {ort_ops.get(module, '-')}")
    total_ort, total_ours = sum(ort.values()), sum(ours.values())
    lines.append(f"{'sum':<26} {total_ort:14.3f} {total_ours:9.3f} {total_ours / total_ort:8.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_pruned_model_arguments(parser, iters=10)
    args = parser.parse_args(argv)
    checked_pruned_model_arguments(parser, args)
    from vpns_fast.deploy import baselines, runtime, sparse_cpu
    from vpns_fast.environment import torch_threads

    if baselines.onnxruntime_version() is None:
        parser.error("onnxruntime is not installed (pip install onnxruntime)")
    model = pruned_model(args.arch, args.density, "uniform")  # the same pruning as the `infer` case
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with torch_threads(args.threads):
        deployed = runtime.deploy(model, example_input_size=(args.batch, 3, 224, 224))
        dense = runtime.deploy(model, policy="dense")
        if not isinstance(deployed.network, fx.GraphModule):
            print(f"error: the deployed {args.arch} is not a torch.fx graph ({deployed.info.get('fusion')}); "
                  "nothing to time layer by layer", flush=True)
            return 1
        x = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        ours, timed, plain, how = our_layer_ms(deployed.network, x, args.iters)
        ort, ort_ops, profiled, ort_plain = ort_layer_ms(dense.network, x, args.threads, args.iters)
    print(f"# {args.arch} at 224, {args.density} kept per layer (torchvision random init, magnitude), batch "
          f"{args.batch}, {args.threads} threads; torch {torch.__version__}, onnxruntime "
          f"{baselines.onnxruntime_version()}, python {platform.python_version()}, sparse kernel "
          f"{sparse_cpu.kernel_isa()}; {args.iters} calls after 2 warm-up calls, medians; {now}; core round trip "
          f"{sparse_cpu.core_round_trip_ns():.0f} ns")
    print(f"this engine: {plain:.2f} ms a plain call, {timed:.2f} ms a timed call ({how}); ONNX Runtime: "
          f"{ort_plain:.2f} ms a plain call, {profiled:.2f} ms a profiled run; plain calls ours / ONNX Runtime "
          f"{plain / ort_plain:.2f}x")
    print(format_rows(ours, ort, ort_ops))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Case `infer`: sparse CPU inference of magnitude-pruned ResNets (``vpns_fast.deploy.sparse_cpu``).

Measurement points (CPU only, float32, no grad), each with ``mask`` in its shape and params:
* per layer (``params.scope == "layer"``): every distinct Conv2d of ResNet-18 at 224 (and, with
  ``--sizes full``, ResNet-50's): weight shape, input shape and stride, the first layer of each
  distinct triple named;
* end to end (``params.scope == "model"``): ResNet-18 and ResNet-50 at 224.
Densities 0.5 / 0.2 / 0.1 / 0.05, batch 1 (and 32 with ``--sizes full``). ``--sizes small``: the first
few distinct layers of ResNet-18 and ResNet-18 end to end at 32 px, density 0.1, batch 1 (a smoke test).

Weights: torchvision's random init (seed 0, eval mode), pruned unstructured by magnitude, ``mask``
* ``uniform`` - every Conv2d/Linear keeps its own top-|w| fraction (the same density everywhere);
* ``global``  - one magnitude threshold over all of them (with the init's per-layer scale, early
  layers stay much denser than late ones; ``params.layer_density`` is the real density).

Implementations:
* ``sparse_cpu`` (backend) - per layer the raw ``SparseConv2d.from_dense``; end to end
  ``convert_for_cpu(policy="measure")`` (a layer goes sparse only where it measured faster; max
  pooling swapped for the separable one under the same rule), called as ``deploy()``'s module calls it: through
  its compiled call plan (``call_plan.NetworkPlans``; ``params.call_plan`` gives its steps, or why none was made;
  before 2026-12-06's run ag the rows timed the traced graph's forward); ``params.sparse_layers`` /
  ``params.layers`` count the Conv2d/Linear it made sparse, ``params.pool_swapped`` the pooling;
  ``params.network_choice`` / ``params.winograd_choice`` the notes of the whole-network timings (None where none
  ran);
* ``deployed`` (backend, per layer only) - the layer as ``convert_for_cpu(policy="measure")`` deploys
  it: sparse where its own measurement found the sparse kernel ``min_speedup`` times faster, else the
  dense module. Timed afresh after that decision, so these rows check the target "no layer slower
  than dense by more than 5%"; ``params.deployed`` records the choice and ``params.decision_speedup``
  the speedup the decision saw;
Baselines (the first is the reference):
* ``dense`` - the torch module (oneDNN), same thread count;
* ``torch_sparse_csr`` - per layer only: the weight as ``torch.sparse`` CSR times the im2col matrix
  of ``F.unfold``; end to end it is a skipped row with the reason;
* ``dense_separable_pool`` - end to end only: the dense model with ``SeparableMaxPool2d``, which
  ``convert_for_cpu`` also swaps in, so the sparse layers' own share of the speedup shows;
* end to end, the engines a deployer would otherwise pick, on the same pruned network:
  ``onnxruntime`` (the network exported by ``vpns_fast.deploy.export.onnx_model``, CPU execution
  provider, graph optimizations on, the same thread count; ``params.onnxruntime_version``),
  ``compiled`` (``torch.compile``, inductor with freezing; skipped with ``--no-compile``) and
  ``deepsparse`` (DeepSparse 1.8 in its own Python, named by ``VPNS_DEEPSPARSE_PYTHON``, driven
  through ``bench/deepsparse_server.py``; ``params.deepsparse_version``); each skipped with its
  reason when unavailable.
Outputs are checked against ``dense`` before timing: max |error| <= 1e-4 (1 + max |dense|) per layer,
1e-3 (1 + max |dense|) end to end. ``setup`` adds the measured facts (real layer density, layers
made sparse, end-to-end error) to the config's params, which the rows carry.
"""
from __future__ import annotations

import copy
import datetime
import functools
import os
import platform
import signal
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from bench.cases.common import Candidate, Config, VerificationError, Workload, no_grad
from bench.registry import conv_layers
from bench.timing import input_copy_count, rotating_times_ms
from vpns_fast.deploy import call_plan, sparse_cpu
from vpns_fast.errors import exception_reason

NAME = "infer"
OP_NAME = "sparse CPU inference (SparseConv2d / convert_for_cpu)"
SUPPORTED_DTYPES = ("float32",)
DENSITIES = {"full": (0.5, 0.2, 0.1, 0.05), "small": (0.1,)}
BATCHES = {"full": (1, 32), "small": (1,)}
MASKS = ("uniform", "global")
# (models per layer, models end to end, image size) per --sizes
POINTS = {"full": (("resnet18", "resnet50"), ("resnet18", "resnet50"), 224),
          "small": (("resnet18",), ("resnet18",), 32)}
SMALL_LAYER_COUNT = 4  # distinct layers per model with --sizes small
LAYER_BASELINES = ["dense", "torch_sparse_csr"]
MODEL_BASELINES = ["dense", "torch_sparse_csr", "dense_separable_pool", "onnxruntime", "compiled", "deepsparse"]
BASELINE_NAMES = ("dense", "torch_sparse_csr", "dense_separable_pool", "onnxruntime", "compiled", "deepsparse")
DEEPSPARSE_PYTHON = "VPNS_DEEPSPARSE_PYTHON"  # a python that can import deepsparse (bench/README.md)
# DeepSparse 1.8 dates from before opset 18; it is given the TorchScript exporter's opset-13 file, which it
# ran in every point measured (the opset-18 file was not tried with it)
DEEPSPARSE_OPSET = 13
EXTRA_IMPLS = ("sparse_cpu", "deployed")
LAYER_TOLERANCE, MODEL_TOLERANCE = 1e-4, 1e-3  # max |error| / (1 + max |dense|)
CONVERT_REPEATS = {(1, "full"): 15, (32, "full"): 5}  # convert_for_cpu's timed calls per layer; 1 on small
CSR_END_TO_END_SKIP = ("per layer only: CSR + unfold materialises every layer's im2col matrix and is slower than "
                       "dense on most layers (see this run's per-layer rows), so a whole network of it is too slow "
                       "to be a useful baseline and is not timed end to end")
DESCRIPTION = ("sparse CPU inference of magnitude-pruned ResNet-18/50 (uniform and global masks, densities "
               "0.5-0.05): per Conv2d layer and end to end; impl sparse_cpu (SparseConv2d, convert_for_cpu "
               "policy=measure); baselines: dense (torch), torch_sparse_csr (CSR + unfold, per layer), "
               "dense_separable_pool, onnxruntime, compiled (inductor, freezing), deepsparse (end to end); "
               "CPU only")


def sparse_engine_points(device_type: str, dtypes: list[str] | None) -> bool:
    """Whether a run on ``device_type`` for ``dtypes`` has points of the sparse engine: a CPU float32 engine."""
    return device_type == "cpu" and (not dtypes or "float32" in dtypes)


def distinct_layers(model_name: str, image_size: int, sizes: str) -> tuple:
    """``conv_layers`` of the model, the first SMALL_LAYER_COUNT only with ``--sizes small``."""
    layers = conv_layers(model_name, image_size)
    return layers[:SMALL_LAYER_COUNT] if sizes == "small" else layers


def configs(device_type: str, sizes: str, dtypes: list[str] | None = None) -> list[Config]:
    if not sparse_engine_points(device_type, dtypes):
        return []
    layer_models, model_models, image_size = POINTS[sizes]
    points = []
    for model_name in dict.fromkeys(layer_models + model_models):
        layers = distinct_layers(model_name, image_size, sizes) if model_name in layer_models else ()
        for mask in MASKS:
            for density in DENSITIES[sizes]:
                for batch in BATCHES[sizes]:
                    common = {"model": model_name, "sizes": sizes, "image_size": image_size, "batch": batch,
                              "density": density, "mask": mask}
                    for name, weight_shape, input_shape, stride in layers:
                        shape = (f"{model_name} {name} w={list(weight_shape)} x={[batch, *input_shape]} s={stride[0]} "
                                 f"density={density} mask={mask}")
                        points.append(Config(NAME, shape, "float32", "fwd", {
                            **common, "scope": "layer", "layer": name, "weight_shape": list(weight_shape),
                            "input_shape": [batch, *input_shape], "stride": list(stride)}))
                    if model_name in model_models:
                        shape = f"{model_name} end-to-end B={batch} {image_size}px density={density} mask={mask}"
                        points.append(Config(NAME, shape, "float32", "fwd", {**common, "scope": "model"}))
    return points


# The decision table's rows of poolings (convert_for_cpu's replace_pooling), which params.sparse_layers leaves out.
POOLING_ROW_TYPES = ("MaxPool2d", "AdaptiveAvgPool2d")


@functools.lru_cache(maxsize=1)  # configs come grouped by (model, mask, density): one pruned model alive
def pruned_model(model_name: str, density: float, mask: str, seed: int = 0) -> nn.Module:
    """torchvision ``model_name`` (random init, eval) with its Conv2d/Linear weights, and the packed input
    projection of each nn.MultiheadAttention (its out_proj is a Linear), pruned by magnitude."""
    import torchvision

    if mask not in MASKS:
        raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
    with torch.random.fork_rng(devices=[]):  # the caller's random stream is left where it was
        torch.manual_seed(seed)
        model = getattr(torchvision.models, model_name)().eval()
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    weights += [m.in_proj_weight for m in model.modules()
                if isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None]
    with torch.no_grad():
        if mask == "global":
            magnitudes = torch.cat([w.abs().flatten() for w in weights])
            threshold = torch.kthvalue(magnitudes, max(1, int(magnitudes.numel() * (1 - density)))).values
            thresholds = [threshold] * len(weights)
            del magnitudes
        else:
            thresholds = [torch.kthvalue(w.abs().flatten(), max(1, int(w.numel() * (1 - density)))).values
                          for w in weights]
        if density < 1.0:
            for w, t in zip(weights, thresholds):
                w.mul_(w.abs() > t)
    return model


def add_pruned_model_arguments(parser, iters: int | None = None) -> None:
    """The arguments of the scripts that run one :func:`pruned_model` (bench.cpu_layers, bench.winograd_ab,
    bench.deepsparse_layers): ``arch density [--batch] [--threads]``, and ``[--iters]`` (default ``iters``) when
    ``iters`` is given; :func:`checked_pruned_model_arguments` checks them."""
    parser.add_argument("arch", help="a torchvision classification model, e.g. resnet50, regnet_x_400mf")
    parser.add_argument("density", type=float, help="the fraction of each Conv2d/Linear weight (and attention input "
                        "projection) kept")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    if iters is not None:
        parser.add_argument("--iters", type=int, default=iters)


def checked_pruned_model_arguments(parser, args) -> None:
    """``parser.error`` (one line, exit 2) for arguments of :func:`add_pruned_model_arguments` out of range."""
    import torchvision

    if not 0.0 < args.density <= 1.0:
        parser.error(f"density: expected a number in (0, 1], got {args.density}")
    if min(args.batch, args.threads) < 1:
        parser.error(f"--batch, --threads: expected integers >= 1, got {args.batch}, {args.threads}")
    if getattr(args, "iters", 1) < 1:
        parser.error(f"--iters: expected an integer >= 1, got {args.iters}")
    if args.arch not in torchvision.models.list_models(module=torchvision.models):
        parser.error(f"arch: expected a torchvision classification model (torchvision.models.list_models()), "
                     f"got {args.arch!r}")


def add_switch_ab_arguments(parser) -> None:
    """The arguments the one-process A/B scripts of an engine switch share (bench.prefetch_ab,
    bench.private_planes_ab, bench.output_prefetch_ab, bench.aligned_outputs_ab, bench.pointwise_ab): ``[--threads]
    [--density]``; :func:`checked_switch_ab_arguments` checks them."""
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--density", type=float, default=0.1)


def switch_ab_header(what: str, args, more: str = "") -> str:
    """The first line of a switch A/B script's report: ``what`` it compares, its threads, the sparse kernel, the
    versions, the machine, the commit (with "+changes" when the tree differs from it), the time (UTC), its arguments
    and ``more``."""
    from bench.environment import git_state
    from vpns_fast.deploy import sparse_cpu
    from vpns_fast.environment import cpu_model_name, cpu_vendor

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    commit, dirty = git_state()
    tree = f"commit {(commit or 'unknown')[:7]}{'+changes' if dirty else ''}"
    return (f"# {what}; {args.threads} threads, kernel {sparse_cpu.kernel_isa()}; torch {torch.__version__}, python "
            f"{platform.python_version()}, {cpu_model_name()} ({cpu_vendor() or 'vendor unknown'}); {tree}; {now}; "
            f"{vars(args)}{more}")


def print_switch_ab_report(args, header: str, switch, default, lines) -> int:
    """The body of a switch A/B script's ``main`` once its arguments are checked: ``args.threads`` threads, the
    ``header`` line, then the lines ``lines()`` returns, with the engine ``switch`` (a ``sparse_cpu.set_*`` function)
    at ``default`` meanwhile and set back to what it was afterwards, even on an error. Returns 0, the exit status."""
    torch.set_num_threads(args.threads)
    print(header)
    previous = switch(default)
    try:
        for line in lines():
            print(line, flush=True)
    finally:
        switch(previous)
    return 0


def checked_switch_ab_arguments(parser, args, min_threads: int = 1) -> None:
    """``parser.error`` (one line, exit 2) for arguments of :func:`add_switch_ab_arguments` out of range, or when the
    sparse CPU engine is unavailable."""
    from vpns_fast.deploy import sparse_cpu

    if args.threads < min_threads:
        parser.error(f"--threads: expected an integer >= {min_threads}, got {args.threads}")
    if not 0 < args.density <= 1:
        parser.error(f"--density: expected a fraction in (0, 1], got {args.density}")
    available, reason = sparse_cpu.available()
    if not available:
        parser.error(f"the sparse CPU engine is unavailable: {reason}")


def converted_pruned_network(model_name: str, density: float, batch: int) -> tuple[nn.Module, torch.Tensor]:
    """(``pruned_model(model_name, density, "uniform")`` converted by ``sparse_cpu.convert_for_cpu`` for ``batch``
    images at 224, that input): the network part of the engine-switch A/B scripts, with the engine's switches as
    they stand when it is called (its per-layer choices are measured then)."""
    model = pruned_model(model_name, density, "uniform")
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        converted, _table = sparse_cpu.convert_for_cpu(model, x)
    return converted, x


def inference_call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` under ``torch.inference_mode()``: the timed call of the engine-switch A/B scripts."""
    with torch.inference_mode():
        return module(x)


def switched_network_times(network: nn.Module, x: torch.Tensor, names: tuple[str, str], switch, rounds: int,
                           agree) -> dict[str, list[float]]:
    """A converted network's calls on ``x`` both ways of an engine switch, in one process (the network part of the
    switch A/B scripts): ``switch(name)`` sets the switch for a run's name, ``names`` the baseline, then the way
    ``network`` was converted. The outputs are compared first (``agree(baseline's, the other's)``; AssertionError
    when they disagree: a switch that changes the values is not timed), then ``rounds`` rounds of one call each,
    in rotating order (``bench.timing.rotating_times_ms``): {name: ms a call}. The switch is left at ``names[1]``."""
    baseline, converted_as = names
    run = functools.partial(network, x)
    with torch.inference_mode():
        try:
            switch(converted_as)
            expected = run()
            switch(baseline)
            if not agree(run(), expected):
                raise AssertionError(f"{baseline} and {converted_as} gave different outputs")
            return rotating_times_ms({name: run for name in names}, rounds, switch)
        finally:
            switch(converted_as)

def csr_unfold_conv(conv: nn.Conv2d):
    """Baseline ``torch_sparse_csr``: the CSR weight [C_out, C_in*KH*KW] times F.unfold's im2col matrix."""
    weight = conv.weight.detach()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        csr = weight.reshape(weight.shape[0], -1).to_sparse_csr()
    out_channels = weight.shape[0]

    def run(x):
        n, _, h, w = x.shape
        columns = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)  # [N, CKK, L]
        out_h = (h + 2 * conv.padding[0] - conv.dilation[0] * (conv.kernel_size[0] - 1) - 1) // conv.stride[0] + 1
        out_w = (w + 2 * conv.padding[1] - conv.dilation[1] * (conv.kernel_size[1] - 1) - 1) // conv.stride[1] + 1
        if n == 1:
            out = torch.sparse.mm(csr, columns[0]).unsqueeze(0)
        else:
            out = torch.sparse.mm(csr, columns.transpose(0, 1).reshape(columns.shape[1], -1))
            out = out.reshape(out_channels, n, -1).transpose(0, 1)
        out = out.reshape(n, out_channels, out_h, out_w)
        return out if conv.bias is None else out + conv.bias.view(1, -1, 1, 1)

    return run


def with_separable_pooling(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.MaxPool2d):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child,
                    sparse_cpu.SeparableMaxPool2d.from_module(module))
    return model


def _max_error(output, reference) -> tuple[float, float]:
    return float((output - reference).abs().max()), 1.0 + float(reference.abs().max())


def comparer(tolerance: float, what: str):
    def compare(output, reference, impl_name):
        if not isinstance(output, torch.Tensor) or output.shape != reference.shape:
            raise VerificationError(f"infer: {impl_name} returned {getattr(output, 'shape', type(output).__name__)}, "
                                    f"dense {tuple(reference.shape)} ({what})")
        error, scale = _max_error(output, reference)
        if not error <= tolerance * scale:
            raise VerificationError(f"infer: {impl_name} differs from dense by {error:.3g} (bound "
                                    f"{tolerance:g} * {scale:.3g}) ({what})")
    return compare


def setup(config: Config, device_type: str, *, compile_baselines: bool = True, seed: int = 0) -> Workload:
    """The shared setup factory: the pruned model, input copies and implementations of one point."""
    if device_type != "cpu":
        raise ValueError(f"infer is a CPU case, got device {device_type!r}")
    p = config.params
    model = pruned_model(p["model"], p["density"], p["mask"], seed)
    available, unavailable_reason = sparse_cpu.available()
    generator = torch.Generator().manual_seed(seed)
    if p["scope"] == "layer":
        input_shape = tuple(p["input_shape"])
    else:
        input_shape = (p["batch"], 3, p["image_size"], p["image_size"])
    copies = input_copy_count("cpu", 4 * torch.Size(input_shape).numel(), p["sizes"])
    inputs = [torch.randn(input_shape, generator=generator) for _ in range(copies)]

    if p["scope"] == "layer":
        conv = model.get_submodule(p["layer"])
        p["layer_density"] = float(torch.count_nonzero(conv.weight)) / conv.weight.numel()
        sparse = sparse_cpu.SparseConv2d.from_dense(conv) if available else None
        deployed = None
        if available:
            repeats = CONVERT_REPEATS.get((p["batch"], p["sizes"]), 1)
            deployed, table = sparse_cpu.convert_for_cpu(conv, inputs[0], policy="measure", repeats=repeats)
            p["deployed"], p["decision_speedup"] = table[0]["chosen"], table[0]["speedup"]
            p["sparse_kernel_isa"] = sparse_cpu.kernel_isa()
        candidates = [Candidate("dense", "baseline", no_grad(conv)),
                      Candidate("torch_sparse_csr", "baseline", no_grad(csr_unfold_conv(conv))),
                      Candidate("sparse_cpu", "backend", no_grad(sparse) if sparse is not None else None,
                                None if available else unavailable_reason),
                      Candidate("deployed", "backend", no_grad(deployed) if deployed is not None else None,
                                None if available else unavailable_reason)]
        return Workload(config, inputs, candidates, list(LAYER_BASELINES), comparer(LAYER_TOLERANCE, config.shape),
                        images_per_call=p["batch"])

    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    p["layers"] = len(weights)
    p["model_density"] = sum(float(torch.count_nonzero(w)) for w in weights) / sum(w.numel() for w in weights)
    candidates = [Candidate("dense", "baseline", no_grad(model)),
                  Candidate("torch_sparse_csr", "baseline", None, CSR_END_TO_END_SKIP),
                  Candidate("dense_separable_pool", "baseline", no_grad(with_separable_pooling(model)))]
    candidates += deployer_baselines(model, inputs, p, compile_baselines)
    if available:
        repeats = CONVERT_REPEATS.get((p["batch"], p["sizes"]), 1)
        start = time.perf_counter()  # the conversion measures every layer: its setup, as the baselines' compiles
        summary: dict = {}
        converted, table = sparse_cpu.convert_for_cpu(model, inputs[0], policy="measure", repeats=repeats,
                                                      summary=summary)
        setup_seconds = time.perf_counter() - start
        # what the whole-network timings measured and chose (a row alone did not say why run r kept 3 of
        # ResNet-18's Winograd layers where the A/B before kept all 10)
        p["network_choice"], p["winograd_choice"] = summary.get("network"), summary.get("winograd")
        p["sparse_layers"] = sum(row["chosen"] == "sparse" and row["type"] not in POOLING_ROW_TYPES for row in table)
        p["sparse_kernel_isa"] = sparse_cpu.kernel_isa()
        p["pool_swapped"] = any(row["chosen"] == "sparse" and row["type"] == "MaxPool2d" for row in table)
        p["winograd_layers"] = sum(isinstance(m, sparse_cpu.WinogradConv2d) for m in converted.modules())
        p["convert_repeats"] = repeats
        # as deploy()'s module runs it: through a compiled call plan, made on the first call; the error is the
        # plan's own (the second call's)
        plans = call_plan.NetworkPlans()

        def planned(x, plans=plans, converted=converted):
            return plans.output(converted, x)

        with torch.no_grad():
            planned(inputs[0])
            error, _scale = _max_error(planned(inputs[0]), model(inputs[0]))
        (plan,) = plans.summary()
        p["call_plan"] = f"{plan['steps']} steps" if plan["steps"] else f"none: {plan['refused']}"
        p["end_to_end_error"] = error
        # the multiply-adds of the nonzero weights (Conv2d / Linear), what every implementation must do at
        # least: the rows' TFLOP/s and fraction_of_peak then compare each to the measured sgemm peak
        p["nonzero_flops"], p["dense_flops"] = sparse_cpu.table_flops(table)
        candidates.append(Candidate("sparse_cpu", "backend", no_grad(planned), setup_seconds=setup_seconds))
    else:
        candidates.append(Candidate("sparse_cpu", "backend", None, unavailable_reason))
    return Workload(config, inputs, candidates, list(MODEL_BASELINES), comparer(MODEL_TOLERANCE, config.shape),
                    images_per_call=p["batch"], flops=p.get("nonzero_flops"))


def deployer_baselines(model: nn.Module, inputs: list, params: dict, compile_baselines: bool) -> list[Candidate]:
    """End to end: the engines a deployer would otherwise run on the same pruned network, ONNX Runtime,
    torch.compile (inductor, freezing) and DeepSparse, each skipped with its reason when unavailable;
    their versions go into ``params``."""
    from vpns_fast.deploy import baselines

    candidates = []
    params["onnxruntime_version"] = baselines.onnxruntime_version()
    if params["onnxruntime_version"] is None:
        candidates.append(Candidate("onnxruntime", "baseline", None, "onnxruntime is not installed"))
    else:
        start = time.perf_counter()
        run, exporter = baselines.onnxruntime_runner(model, inputs[0])
        params["onnxruntime_exporter"] = exporter
        params["onnxruntime_settings"] = baselines.ONNXRUNTIME_SETTINGS
        candidates.append(Candidate("onnxruntime", "baseline", run, setup_seconds=time.perf_counter() - start))
    if not compile_baselines:
        candidates.append(Candidate("compiled", "baseline", None, "torch.compile disabled (--no-compile)"))
    else:
        # Dynamo recompiles one code object at most 8 times (ResNet-18 and -50 share ResNet.forward), then runs it
        # eagerly without a word: from the 9th end-to-end point on, "compiled" was eager torch
        torch._dynamo.reset()
        start = time.perf_counter()
        run = baselines.compiled_runner(model)
        try:
            run(inputs[0])
            candidates.append(Candidate("compiled", "baseline", run, setup_seconds=time.perf_counter() - start))
        except Exception as exc:  # no C compiler, inductor bug: recorded, not hidden
            candidates.append(Candidate("compiled", "baseline", None,
                                        f"torch.compile failed: {exception_reason(exc, 300)}"))
    candidates.append(deepsparse_candidate(model, inputs, params))
    return candidates


def deepsparse_candidate(model: nn.Module, inputs: list, params: dict) -> Candidate:
    """DeepSparse on the same network, run by bench/deepsparse_server.py in the python named by
    VPNS_DEEPSPARSE_PYTHON (its own environment); skipped with the reason when that is not set."""

    python = os.environ.get(DEEPSPARSE_PYTHON)
    if not python:
        return Candidate("deepsparse", "baseline", None,
                         f"set {DEEPSPARSE_PYTHON} to a python with deepsparse 1.8 installed (bench/README.md)")
    try:
        server = DeepSparseServer(python, model, inputs, torch.get_num_threads(), params)
    except RuntimeError as exc:
        return Candidate("deepsparse", "baseline", None, str(exc))
    params["deepsparse_version"] = server.version
    return Candidate("deepsparse", "baseline", server.run, setup_seconds=server.setup_seconds)


class DeepSparseServer:
    """A DeepSparse engine in another process (bench/deepsparse_server.py), driven line by line; the
    timed call includes the request and passing the logits back through a file, which the others do not
    pay: the server times each engine call itself, and the row's ``params["deepsparse_engine_ms"]`` lists
    those times, to set against the timed calls (what is left is that traffic).

    The process is stopped (SIGSTOP) between its calls and continued for each: DeepSparse's worker
    threads keep spinning while idle, and alive they slowed every other implementation of the run
    (ResNet-18 at 10% kept, batch 1: the engine 17.1 ms and dense torch 42.6 ms per call, against 12.4 ms
    and 32.7 ms in the run with the process stopped between calls)."""

    current: DeepSparseServer | None = None

    def __init__(self, python: str, model: nn.Module, inputs: list, threads: int, params: dict):
        import atexit
        import subprocess
        import tempfile

        import numpy as np

        from vpns_fast.deploy.export import onnx_model

        start = time.perf_counter()
        self.folder = tempfile.mkdtemp(prefix="vpns-deepsparse-")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the opset-13 fallback to the TorchScript exporter is intended here
            graph, _ = onnx_model(model.eval(), inputs[0], DEEPSPARSE_OPSET)
        onnx_path = os.path.join(self.folder, "model.onnx")
        with open(onnx_path, "wb") as file:
            file.write(graph.SerializeToString())
        np.savez(os.path.join(self.folder, "inputs.npz"), **{str(i): x.numpy() for i, x in enumerate(inputs)})
        self.index = {x.data_ptr(): i for i, x in enumerate(inputs)}
        self.output = os.path.join(self.folder, "logits.npy")
        server = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "deepsparse_server.py")
        if DeepSparseServer.current is not None:  # the previous point's engine: one alive at a time
            DeepSparseServer.current.close()
        self.process = subprocess.Popen([python, server], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        DeepSparseServer.current = self
        atexit.register(self.close)
        self.engine_ms = params.setdefault("deepsparse_engine_ms", [])
        answer = self._ask({"load": onnx_path, "inputs": os.path.join(self.folder, "inputs.npz"),
                            "batch": int(inputs[0].shape[0]), "threads": int(threads)})
        self.version = answer["version"]
        self.setup_seconds = time.perf_counter() - start
        os.kill(self.process.pid, signal.SIGSTOP)

    def _ask(self, request: dict) -> dict:
        import json

        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"deepsparse server exited (code {self.process.poll()})")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"deepsparse: {answer['error']}")
        return answer

    def run(self, x: torch.Tensor) -> torch.Tensor:
        import numpy as np

        os.kill(self.process.pid, signal.SIGCONT)
        try:
            answer = self._ask({"run": self.index[x.data_ptr()], "output": self.output})
        finally:
            os.kill(self.process.pid, signal.SIGSTOP)
        self.engine_ms.append(1e3 * answer["engine_seconds"])
        return torch.from_numpy(np.load(self.output))

    def close(self) -> None:
        """Ends the server and removes its folder (the ONNX file and a copy of every input)."""
        import shutil

        self.process.kill()
        self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)

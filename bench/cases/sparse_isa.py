"""Case `sparse_isa`: the sparse CPU kernel's vector instruction sets against each other, in one process.

The engine picks one kernel per CPU (``vpns_fast.deploy.sparse_cpu.kernel_isa()``: the widest it has, AVX-512, else
AVX2, else a portable loop). This case times every kernel
the CPU runs on the same layers and networks, so the choice (and the README's A/B figures) can be checked on any
machine.

Measurement points (CPU only, float32, no grad), weights as in case ``infer`` (torchvision random init, seed
0, every Conv2d/Linear pruned by magnitude to ``density`` = 0.1, uniform):
* per layer (``params.scope == "layer"``): every distinct Conv2d of ResNet-18 at 224 (and ResNet-50's with
  ``--sizes full``), batch 1, each as ``SparseConv2d.from_dense``, and the model's classifier ``fc`` (a Linear,
  ``params.kind == "linear"``: the gathered product of batches below 8) at batch 1 as ``SparseLinear.from_dense``;
* end to end (``params.scope == "model"``): ResNet-18 and ResNet-50 at 224, batch 1, and ResNet-18 at batch 32
  (``--sizes full``), converted with ``convert_for_cpu(policy="sparse")``: every conv sparse, so that no
  timing-based decision differs between runs.
``--sizes small``: the first few distinct layers of ResNet-18, its classifier, and ResNet-18 end to end at 32 px (a
smoke test).

Implementations:
* ``default`` (backend) - the kernel this CPU gets by default (``params.default_isa``);
Baselines (the first is the reference):
* ``scalar``, ``avx2``, ``avx512`` - the same module with that kernel forced (``set_kernel_isa`` before the
  call, the previous choice put back after; ``default`` is called the same way); skipped with the reason on a
  CPU that lacks it. ``default`` against its own kernel shows the run's noise.
Outputs are checked against ``scalar`` before timing, with case ``infer``'s bounds.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from bench.cases.common import Candidate, Config, Workload, no_grad
from bench.cases.infer import (
    LAYER_TOLERANCE,
    MODEL_TOLERANCE,
    comparer,
    distinct_layers,
    pruned_model,
    sparse_engine_points,
)
from bench.timing import input_copy_count
from vpns_fast.deploy import sparse_cpu

NAME = "sparse_isa"
OP_NAME = "the sparse CPU kernel per instruction set (sparse_cpu.set_kernel_isa)"
SUPPORTED_DTYPES = ("float32",)
DENSITY = 0.1
# (models per layer, (model, batch) end to end, image size) per --sizes
POINTS = {"full": (("resnet18", "resnet50"), (("resnet18", 1), ("resnet50", 1), ("resnet18", 32)), 224),
          "small": (("resnet18",), (("resnet18", 1),), 32)}
BASELINES = list(reversed(sparse_cpu.KERNEL_ISAS))  # scalar first: every CPU runs it
BASELINE_NAMES = tuple(BASELINES)
EXTRA_IMPLS = ("default",)
DESCRIPTION = ("the sparse CPU kernel with each instruction set this CPU runs (scalar, avx2, avx512) and the "
               "default choice, per ResNet-18/50 layer and end to end, 10% kept; CPU only")


def configs(device_type: str, sizes: str, dtypes: list[str] | None = None) -> list[Config]:
    if not sparse_engine_points(device_type, dtypes):
        return []
    layer_models, model_points, image_size = POINTS[sizes]
    points = []
    for model_name in layer_models:
        for name, weight_shape, input_shape, stride in distinct_layers(model_name, image_size, sizes):
            shape = f"{model_name} {name} w={list(weight_shape)} x={[1, *input_shape]} s={stride[0]} density={DENSITY}"
            points.append(Config(NAME, shape, "float32", "fwd", {
                "model": model_name, "sizes": sizes, "image_size": image_size, "batch": 1, "density": DENSITY,
                "scope": "layer", "layer": name, "weight_shape": list(weight_shape),
                "input_shape": [1, *input_shape], "stride": list(stride)}))
        out_features, in_features = classifier_shape(model_name)
        shape = f"{model_name} fc w={[out_features, in_features]} x={[1, in_features]} density={DENSITY}"
        points.append(Config(NAME, shape, "float32", "fwd", {
            "model": model_name, "sizes": sizes, "image_size": image_size, "batch": 1, "density": DENSITY,
            "scope": "layer", "kind": "linear", "layer": "fc", "weight_shape": [out_features, in_features],
            "input_shape": [1, in_features]}))
    for model_name, batch in model_points:
        shape = f"{model_name} end-to-end B={batch} {image_size}px density={DENSITY}"
        points.append(Config(NAME, shape, "float32", "fwd", {
            "model": model_name, "sizes": sizes, "image_size": image_size, "batch": batch, "density": DENSITY,
            "scope": "model"}))
    return points


def classifier_shape(model_name: str) -> tuple[int, int]:
    """(out_features, in_features) of torchvision ``model_name``'s ``fc`` (ResNets), from its constructor alone."""
    import torchvision

    with torch.device("meta"):
        fc = getattr(torchvision.models, model_name)().fc
    return fc.out_features, fc.in_features


def with_kernel(isa: str, module) -> Callable:
    """``module`` called with the sparse kernel ``isa``, the previous choice put back after the call."""
    def run(x):
        previous = sparse_cpu.set_kernel_isa(isa)
        try:
            return module(x)
        finally:
            sparse_cpu.set_kernel_isa(previous)
    return no_grad(run)


def setup(config: Config, device_type: str, *, compile_baselines: bool = True, seed: int = 0) -> Workload:
    if device_type != "cpu":
        raise ValueError(f"sparse_isa is a CPU case, got device {device_type!r}")
    p = config.params
    available, unavailable_reason = sparse_cpu.available()
    if p["scope"] == "layer":
        input_shape = tuple(p["input_shape"])
    else:
        input_shape = (p["batch"], 3, p["image_size"], p["image_size"])
    generator = torch.Generator().manual_seed(seed)
    copies = input_copy_count("cpu", 4 * torch.Size(input_shape).numel(), p["sizes"])
    inputs = [torch.randn(input_shape, generator=generator) for _ in range(copies)]
    model = pruned_model(p["model"], DENSITY, "uniform", seed)
    flops = None
    module = None
    if available:
        if p.get("kind") == "linear":
            linear = model.get_submodule(p["layer"])
            module = sparse_cpu.SparseLinear.from_dense(linear)
            flops = 2 * int(torch.count_nonzero(linear.weight)) * p["batch"]
        elif p["scope"] == "layer":
            conv = model.get_submodule(p["layer"])
            module = sparse_cpu.SparseConv2d.from_dense(conv)
            out_h, out_w = module(inputs[0]).shape[2:]
            flops = 2 * int(torch.count_nonzero(conv.weight)) * out_h * out_w * p["batch"]
        else:
            module, table = sparse_cpu.convert_for_cpu(model, inputs[0], policy="sparse")
            flops, _dense_flops = sparse_cpu.table_flops(table)
        p["default_isa"] = sparse_cpu.kernel_isa()
        here = sparse_cpu.kernel_isas()
    candidates = []
    for name in (*BASELINES, "default"):
        if not available:
            candidates.append(Candidate(name, "baseline" if name in BASELINES else "backend", None,
                                        unavailable_reason))
            continue
        isa = p["default_isa"] if name == "default" else name
        reason = None if isa in here else f"this CPU has no {isa} (it runs {', '.join(here)})"
        candidates.append(Candidate(name, "baseline" if name in BASELINES else "backend",
                                    with_kernel(isa, module) if reason is None else None, reason))
    tolerance = LAYER_TOLERANCE if p["scope"] == "layer" else MODEL_TOLERANCE
    return Workload(config, inputs, candidates, list(BASELINES), comparer(tolerance, config.shape),
                    images_per_call=p["batch"], flops=flops)

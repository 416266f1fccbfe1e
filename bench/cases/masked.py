"""Case `masked`: every masked layer's effective weight ``w * (|s| > t)`` with the STE, at once.

One training step masks every Conv2d/Linear weight of the model; this case does exactly that
for the ResNet-18/50 weight shapes of ``bench/registry.py`` (all layers together), for the three
score granularities (unstructured on both models, kernel and channel on ResNet-18), in modes
``fwd`` (the effective weights, as a training forward computes them: scores and weights require
grad, autograd records, no backward) and ``full`` (fwd + backward of a random upstream gradient
to ``grad_w`` and ``grad_s``). The threshold is the global one at density 0.1.

Implementations:
* backends, per layer (a Python loop over layers, as the model's layers run): ``torch`` calls
  ``MaskedWeightFunction.apply`` (the reference autograd Function), ``triton`` calls
  ``masked_weight_triton`` (one fused launch per layer and direction);
* ``triton_multi`` - ``masked_weights_triton``: every layer in one launch per direction;
Baselines:
* ``eager``    - as the release code writes it: ``m = (|s| > t).float()``, a plain autograd STE
  ``m_ste = m + (|s| - |s|.detach())`` (bracketed so the forward is exactly ``m``: the unbracketed
  ``m + |s| - |s|.detach()`` rounds ``m + |s|`` and is not exactly 0 or 1), ``w * m_ste``;
* ``compiled`` - ``torch.compile(fullgraph=True)`` of that per-layer loop, compiled before timing.
Effective weights and ``grad_w`` (``g * m``) are compared exactly; ``grad_s`` (a sum over each
score's group of ``g * w``, summed in another order by each implementation) within a bound
relative to the group's ``sum |g * w|``.
"""
from __future__ import annotations

import math

import torch

from bench.cases.common import (
    Candidate,
    Config,
    VerificationError,
    Workload,
    backend_skip_reason,
    compiled_candidate,
)
from bench.registry import score_shapes
from bench.timing import input_copy_count
from vpns_fast import ops
from vpns_fast.kernels.masked import MaskedWeightFunction
from vpns_fast.nn.masked_layers import initial_scores, score_shape

NAME = "masked"
# The registry has no op for the mask alone: it is the part of masked_conv2d / masked_linear
# before cuDNN / cuBLAS, and a backend that serves masked_conv2d has a masked-weight function.
OP_NAME = "masked_conv2d"
MODES = ("fwd", "full")
DENSITY = 0.1
# (model, granularity) points: unstructured everywhere, the structured ones on ResNet-18.
POINTS = (("resnet18", "unstructured"), ("resnet18", "kernel"), ("resnet18", "channel"),
          ("resnet50", "unstructured"))
SUPPORTED_DTYPES = ("float32", "bfloat16")  # weights and scores share it
DEFAULT_DTYPES = {"cpu": ("float32",), "cuda": ("float32", "bfloat16")}
BASELINES = ["eager", "compiled"]
BASELINE_NAMES = tuple(BASELINES)
EXTRA_IMPLS = ("triton_multi",)  # implementations that are neither a backend nor a baseline
# grad_s: |error| <= rtol * |expected| + group_atol * sum_group |g * w| (order of summation).
GRADIENT_TOLERANCE = {"float32": (1e-5, 1e-5), "bfloat16": (1.6e-2, 4e-3)}
DESCRIPTION = (f"w * (|s| > t) with the STE for every Conv2d/Linear of ResNet-18/50 at once (density {DENSITY}), "
               f"unstructured/kernel/channel scores, modes fwd and full (fwd + bwd to grad_w, grad_s); impls: "
               f"per-layer backends, triton_multi (one launch); baselines: eager (release STE), compiled")


def configs(device_type: str, sizes: str, dtypes: list[str] | None = None) -> list[Config]:
    chosen = [d for d in (dtypes or DEFAULT_DTYPES[device_type]) if d in SUPPORTED_DTYPES]
    points = []
    for model_name, granularity in POINTS:
        shapes = score_shapes(model_name, sizes)
        weight_count = sum(math.prod(shape) for shape in shapes)
        score_count = sum(math.prod(score_shape(torch.Size(shape), granularity)) for shape in shapes)
        for dtype in chosen:
            for mode in MODES:
                points.append(Config(NAME, f"{model_name} {granularity} W={weight_count} S={score_count} "
                                           f"({len(shapes)} layers)", dtype, mode,
                                     {"model": model_name, "sizes": sizes, "granularity": granularity,
                                      "density": DENSITY, "weight_count": weight_count,
                                      "score_count": score_count, "layer_count": len(shapes)}))
    return points


# ---------------------------------------------------------------- implementations, over all layers

def release_masked_weight(weight, scores, threshold):
    """One layer's effective weight as the release code computes it, with a plain autograd STE:
    the forward is exactly ``w * m``; the score gradient flows through ``|s|`` (``g * w * sign(s)``)."""
    magnitude = scores.abs()
    mask = (magnitude > threshold).to(weight.dtype)  # the release's .float(), in the weights' dtype
    return weight * (mask + (magnitude - magnitude.detach()))


def eager_masked_weights(weights, scores, threshold):
    """The release code's masked weights, layer by layer (a few small kernels each)."""
    return [release_masked_weight(w, s, threshold) for w, s in zip(weights, scores)]


def torch_masked_weights(weights, scores, threshold):
    return [MaskedWeightFunction.apply(w, s, threshold) for w, s in zip(weights, scores)]


def triton_masked_weights(weights, scores, threshold):
    from vpns_fast.kernels.masked import masked_weight_triton

    return [masked_weight_triton(w, s, threshold) for w, s in zip(weights, scores)]


def triton_multi_masked_weights(weights, scores, threshold):
    from vpns_fast.kernels.masked import masked_weights_triton

    return list(masked_weights_triton(weights, scores, threshold))


def _mode_runner(masked_weights_fn, mode):
    """One timed call of ``mode`` on an input copy ``(weights, scores, threshold, upstream)``."""
    if mode == "fwd":
        def run(inputs):
            weights, scores, threshold, _ = inputs
            return [w.detach() for w in masked_weights_fn(weights, scores, threshold)]
        return run

    def run(inputs):
        weights, scores, threshold, upstream = inputs
        effective = masked_weights_fn(weights, scores, threshold)
        grads = torch.autograd.grad(effective, [*weights, *scores], upstream)
        n = len(weights)
        return [w.detach() for w in effective], list(grads[:n]), list(grads[n:])
    return run


# ---------------------------------------------------------------- verification

def _check_tensor(what, got, expected, impl_name, index):
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape or got.dtype != expected.dtype:
        raise VerificationError(f"masked: {impl_name} {what}[{index}] is {getattr(got, 'shape', type(got))} "
                                f"{getattr(got, 'dtype', '')}, expected {tuple(expected.shape)} {expected.dtype}")


def make_compare(first_input, dtype_name):
    weights, scores, _, upstream = first_input
    rtol, group_atol = GRADIENT_TOLERANCE[dtype_name]
    # The summation-order bound of each score gradient: sum over its group of |g * w|.
    magnitude_sums = None
    if upstream is not None:
        magnitude_sums = [(g.float() * w.detach().float()).abs().sum_to_size(s.shape)
                          for g, w, s in zip(upstream, weights, scores)]

    def compare(output, reference, impl_name):
        parts = [("w_eff", output, reference)] if not isinstance(reference, tuple) else \
            list(zip(("w_eff", "grad_w", "grad_s"), output, reference))
        for what, got_list, expected_list in parts:
            if len(got_list) != len(expected_list):
                raise VerificationError(f"masked: {impl_name} returned {len(got_list)} {what}, "
                                        f"expected {len(expected_list)}")
            for i, (got, expected) in enumerate(zip(got_list, expected_list)):
                _check_tensor(what, got, expected, impl_name, i)
                if what != "grad_s":
                    if not torch.equal(got, expected):  # a product by 0 or 1: exact
                        raise VerificationError(f"masked: {impl_name} {what}[{i}] differs from eager in "
                                                f"{int((got != expected).sum())} of {got.numel()} entries")
                    continue
                error = (got.float() - expected.float()).abs()
                bound = rtol * expected.float().abs() + group_atol * magnitude_sums[i]
                if bool((error > bound).any()):
                    worst = int((error - bound).flatten().argmax())
                    raise VerificationError(f"masked: {impl_name} grad_s[{i}] differs from eager beyond the "
                                            f"summation bound: entry {worst} got {got.flatten()[worst].item():.6g} "
                                            f"expected {expected.flatten()[worst].item():.6g}")
    return compare


# ---------------------------------------------------------------- setup

def bytes_moved(weight_count, score_count, itemsize, mode) -> int:
    """Floor: fwd reads w, s and writes w_eff; bwd reads g, w, s and writes grad_w, grad_s."""
    forward = (2 * weight_count + score_count) * itemsize
    if mode == "fwd":
        return forward
    return forward + (3 * weight_count + 2 * score_count) * itemsize


def _random_layers(shapes, granularity, dtype, device_type, generator, mode):
    weights, scores, upstream = [], [], []
    for shape in shapes:
        fan_in = math.prod(shape[1:])
        # Kaiming-normal magnitudes (never zeros); HYDRA's scaled score init from them.
        w = torch.randn(shape, generator=generator, device=device_type) * math.sqrt(2 / fan_in)
        weights.append(w.to(dtype).requires_grad_())
        scores.append(initial_scores(w, granularity, "scaled").to(dtype).requires_grad_())
        if mode == "full":
            upstream.append(torch.randn(shape, generator=generator, device=device_type).to(dtype))
    threshold = ops.topk_threshold([s.detach() for s in scores], DENSITY, "global")
    return weights, scores, threshold, upstream or None


def setup(config: Config, device_type: str, *, compile_baselines: bool = True, seed: int = 0) -> Workload:
    """The shared setup factory: layer copies, threshold, implementations for one config."""
    p, mode = config.params, config.mode
    dtype = getattr(torch, config.dtype)
    shapes = score_shapes(p["model"], p["sizes"])
    generator = torch.Generator(device=device_type).manual_seed(seed)
    per_copy = (p["weight_count"] * (2 if mode == "full" else 1) + p["score_count"]) * dtype.itemsize
    copies = [_random_layers(shapes, p["granularity"], dtype, device_type, generator, mode)
              for _ in range(input_copy_count(device_type, per_copy, p["sizes"]))]

    candidates = [Candidate("eager", "baseline", _mode_runner(eager_masked_weights, mode)),
                  compiled_candidate(compile_baselines, eager_masked_weights,
                                     lambda compiled: _mode_runner(compiled, mode), copies[0])]
    per_layer = {"torch": torch_masked_weights, "triton": triton_masked_weights}
    for backend in ops.BACKEND_NAMES:
        reason = backend_skip_reason(OP_NAME, backend, device_type)
        if reason is None and backend not in per_layer:
            reason = f"no masked-weight function is wired into the bench for backend {backend!r}"
        candidates.append(Candidate(backend, "backend", None if reason else _mode_runner(per_layer[backend], mode),
                                    reason))
    triton_reason = backend_skip_reason(OP_NAME, "triton", device_type)
    candidates.append(Candidate("triton_multi", "backend",
                                None if triton_reason else _mode_runner(triton_multi_masked_weights, mode),
                                triton_reason))
    return Workload(config, copies, candidates, list(BASELINES), make_compare(copies[0], config.dtype),
                    bytes_moved=bytes_moved(p["weight_count"], p["score_count"], dtype.itemsize, mode),
                    notes={"bytes_moved": "floor: fwd reads w, s, writes w_eff; bwd reads g, w, s, writes "
                                          "grad_w, grad_s"})

"""Case `conv`: one masked convolution ``conv2d(x, w * (|s| > t))`` with the STE, per conv shape.

Measurement points: every distinct Conv2d of torchvision ResNet-18 and ResNet-50 at 224 (weight,
input and stride; padding ``k // 2`` as in those models), batch 64 and 256, float32 and bfloat16
(x, weight and scores in that dtype), density 0.1 (each layer's own top 10%), unstructured scores
in modes ``fwd`` (no grad), ``bwd`` (the backward of a recorded forward, to x, weight and scores)
and ``full`` (both), and kernel / channel scores in mode ``fwd`` (where the tile-skipping
inference variant can apply; ``params.kept_tile_fraction`` says how much it can skip). CUDA
only; ``--sizes small`` is a smoke test (three ResNet-18 shapes at batch 2 and 32 px, which on a
CPU runs the triton paths through the interpreter and skips timing them).

Implementations:
* ``triton`` (backend) - ``ops.masked_conv2d`` on the triton backend: the measured dispatch of
  ``vpns_fast/ops/conv_dispatch.py`` (run ``vpns tune`` first, else it is ``cudnn``);
* ``cudnn`` - the fused mask kernel then cuDNN (``kernels/masked.py``);
* ``igemm`` - the Triton implicit-GEMM masked conv (``kernels/masked_conv.py``);
* ``igemm_tiles`` - its inference variant for a fixed mask, visiting only weight tiles that keep
  a weight (``prepare_sparse_tiles`` once in setup, then ``masked_conv2d_sparse``; fwd only);
* ``torch`` (backend) - the reference autograd Function, then cuDNN.
Baselines: ``eager`` (the release style: ``w * (mask + |s| - |s|.detach())`` then ``F.conv2d``;
the reference outputs are checked against) and ``compiled`` (``torch.compile(mode="max-autotune")``
of the same function; its compile time is the row's ``setup_seconds``).

Rows carry ``flops`` (dense: 2 N C_out OH OW C_in KH KW per direction; bwd counts input and
weight gradients, full all three) and TFLOP/s against the device's measured dense matmul peak in
the same dtype (``peak_tflop_per_s``; float32 as the process's TF32 setting allows).
Outputs and gradients are checked by relative Frobenius error ``|got - ref| / |ref|`` (TF32 and
bf16 make elementwise bounds meaningless; a wrong kernel is off by O(1)).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.cases.common import (
    Candidate,
    Config,
    VerificationError,
    Workload,
    backend_skip_reason,
    compiled_candidate,
)
from bench.registry import conv_layers
from vpns_fast import ops

NAME = "conv"
OP_NAME = "masked_conv2d"
DENSITY = 0.1
MODES = ("fwd", "bwd", "full")
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_DTYPES = ("float32", "bfloat16")
POINTS = {"full": (("resnet18", "resnet50"), (64, 256), 224), "small": (("resnet18",), (2,), 32)}
SMALL_LAYER_COUNT = 3
BASELINES = ["eager", "compiled"]
BASELINE_NAMES = tuple(BASELINES)
EXTRA_IMPLS = ("cudnn", "igemm", "igemm_tiles")
# (granularity, modes): the training directions on unstructured scores; structured scores in
# inference, where whole weight tiles can be skipped.
GRANULARITY_MODES = (("unstructured", MODES), ("kernel", ("fwd",)), ("channel", ("fwd",)))
# Relative Frobenius error, about ten times the unit roundoff of the operands (not measured on a
# GPU): TF32 / fp16 carry 10 mantissa bits (2**-11 = 4.9e-4), bf16 7 bits (2**-8 = 3.9e-3); a
# wrong kernel is off by O(1).
RELATIVE_TOLERANCE = {"float32": 5e-3, "bfloat16": 2e-2, "float16": 5e-3}
DESCRIPTION = ("one masked conv2d with the STE per distinct ResNet-18/50 conv shape, batch 64/256, fp32/bf16, "
               "modes fwd/bwd/full; impls: triton (measured dispatch), cudnn (fused mask + cuDNN), igemm "
               "(Triton implicit GEMM), torch; baselines: eager (release STE), compiled (max-autotune); "
               "TFLOP/s vs the measured dense matmul peak; CUDA (CPU: --sizes small smoke test)")


def configs(device_type: str, sizes: str, dtypes: list[str] | None = None) -> list[Config]:
    if device_type != "cuda" and sizes != "small":
        return []  # a GPU case: CPU convs are the infer case's business
    chosen = [d for d in (dtypes or DEFAULT_DTYPES) if d in SUPPORTED_DTYPES]
    models, batches, image_size = POINTS[sizes]
    points = []
    for model_name in models:
        layers = conv_layers(model_name, image_size)
        if sizes == "small":
            layers = layers[:SMALL_LAYER_COUNT]
        for name, weight_shape, input_shape, stride in layers:
            for batch in batches:
                for granularity, modes in GRANULARITY_MODES:
                    for dtype in chosen:
                        for mode in modes:
                            shape = (f"{model_name} {name} w={list(weight_shape)} x={[batch, *input_shape]} "
                                     f"s={stride[0]} {granularity}")
                            points.append(Config(NAME, shape, dtype, mode, {
                                "model": model_name, "layer": name, "sizes": sizes, "batch": batch,
                                "weight_shape": list(weight_shape), "input_shape": [batch, *input_shape],
                                "stride": stride[0], "padding": weight_shape[-1] // 2, "density": DENSITY,
                                "granularity": granularity}))
    return points


def conv_flops(input_shape, weight_shape, stride, padding, mode) -> int:
    n, _, h, w = input_shape
    c_out, c_in, kh, kw = weight_shape
    oh = (h + 2 * padding - kh) // stride + 1
    ow = (w + 2 * padding - kw) // stride + 1
    one = 2 * n * c_out * oh * ow * c_in * kh * kw
    return {"fwd": one, "bwd": 2 * one, "full": 3 * one}[mode]


def eager_masked_conv(x, weight, scores, threshold, stride, padding):
    """The release code's masked conv: a float mask, the STE through |s|, then F.conv2d."""
    magnitude = scores.abs()
    mask = (magnitude > threshold).to(weight.dtype)
    return F.conv2d(x, weight * (mask + (magnitude - magnitude.detach())), None, stride, padding)


def _implementations(stride, padding):
    from vpns_fast.kernels.masked import masked_conv2d_fused_mask_cudnn
    from vpns_fast.kernels.masked_conv import masked_conv2d_igemm

    def backend(name):
        def conv(x, weight, scores, threshold):
            with ops.use_backend(name):
                return ops.masked_conv2d(x, weight, scores, threshold, None, stride, padding)
        return conv

    return {
        "eager": lambda x, w, s, t: eager_masked_conv(x, w, s, t, stride, padding),
        "cudnn": lambda x, w, s, t: masked_conv2d_fused_mask_cudnn(x, w, s, t, None, stride, padding),
        "igemm": lambda x, w, s, t: masked_conv2d_igemm(x, w, s, t, None, stride, padding),
        "triton": backend("triton"),
        "torch": backend("torch"),
    }


def _mode_runner(conv, mode):
    """One timed call on an input copy ``(x, weight, scores, threshold, upstream)``."""
    if mode == "fwd":
        def run(inputs):
            x, weight, scores, threshold, _ = inputs
            with torch.no_grad():
                return conv(x, weight, scores, threshold)
        return run
    if mode == "full":
        def run(inputs):
            x, weight, scores, threshold, upstream = inputs
            out = conv(x, weight, scores, threshold)
            return (out.detach(), *torch.autograd.grad(out, (x, weight, scores), upstream))
        return run
    recorded = {}  # id(input copy) -> its forward's output, recorded once outside the timing

    def run(inputs):
        x, weight, scores, threshold, upstream = inputs
        out = recorded.get(id(inputs))
        if out is None:
            out = recorded[id(inputs)] = conv(x, weight, scores, threshold)
        return torch.autograd.grad(out, (x, weight, scores), upstream, retain_graph=True)
    return run


def make_compare(dtype_name):
    tolerance = RELATIVE_TOLERANCE[dtype_name]

    def compare(output, reference, impl_name):
        got_list = output if isinstance(output, tuple) else (output,)
        expected_list = reference if isinstance(reference, tuple) else (reference,)
        names = ("out", "grad_x", "grad_w", "grad_s") if len(expected_list) == 4 else \
            ("grad_x", "grad_w", "grad_s") if len(expected_list) == 3 else ("out",)
        for what, got, expected in zip(names, got_list, expected_list):
            if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
                raise VerificationError(f"conv: {impl_name} {what} is {getattr(got, 'shape', type(got))}, "
                                        f"expected {tuple(expected.shape)}")
            scale = float(expected.float().norm())
            error = float((got.float() - expected.float()).norm())
            if not error <= tolerance * max(scale, 1e-30):
                raise VerificationError(f"conv: {impl_name} {what} relative error {error / max(scale, 1e-30):.3g} "
                                        f"> {tolerance:g}")
    return compare


def setup(config: Config, device_type: str, *, compile_baselines: bool = True, seed: int = 0) -> Workload:
    from vpns_fast.nn.masked_layers import initial_scores

    p, mode = config.params, config.mode
    dtype = getattr(torch, config.dtype)
    generator = torch.Generator(device=device_type).manual_seed(seed)
    fan_in = p["weight_shape"][1] * p["weight_shape"][2] * p["weight_shape"][3]
    weight32 = torch.randn(p["weight_shape"], generator=generator, device=device_type) * (2 / fan_in) ** 0.5
    scores = initial_scores(weight32, p["granularity"], "scaled").to(dtype)
    threshold = ops.topk_threshold(scores, DENSITY)
    grad = mode != "fwd"
    x = torch.randn(p["input_shape"], generator=generator, device=device_type).to(dtype)
    upstream = None
    if grad:
        out_shape = eager_masked_conv(x, weight32.to(dtype), scores, threshold, p["stride"], p["padding"]).shape
        upstream = torch.randn(out_shape, generator=generator, device=device_type).to(dtype)
    inputs = [(x.requires_grad_(grad), weight32.to(dtype).requires_grad_(grad), scores.requires_grad_(grad),
               threshold, upstream)]

    impls = _implementations(p["stride"], p["padding"])
    candidates = [Candidate("eager", "baseline", _mode_runner(impls["eager"], mode)),
                  compiled_candidate(compile_baselines, impls["eager"], lambda compiled: _mode_runner(compiled, mode),
                                     inputs[0], mode="max-autotune")]
    for backend in ("torch", "triton", "cpp"):
        reason = backend_skip_reason(OP_NAME, backend, device_type)
        candidates.append(Candidate(backend, "backend", None if reason else _mode_runner(impls[backend], mode),
                                    reason))
    triton_reason = backend_skip_reason(OP_NAME, "triton", device_type)
    for name in ("cudnn", "igemm"):
        candidates.append(Candidate(name, "backend", None if triton_reason else _mode_runner(impls[name], mode),
                                    triton_reason))
    candidates.append(_tiles_candidate(inputs[0], p, mode, triton_reason))
    return Workload(config, inputs, candidates, list(BASELINES), make_compare(config.dtype),
                    flops=conv_flops(p["input_shape"], p["weight_shape"], p["stride"], p["padding"], mode),
                    images_per_call=p["batch"],
                    notes={"flops": "dense conv FLOPs of the timed directions (the mask skips none)"})


def _tiles_candidate(first_input, p, mode, triton_reason) -> Candidate:
    if mode != "fwd":
        return Candidate("igemm_tiles", "backend", None, "inference only: the tile-skipping variant has no backward")
    if triton_reason:
        return Candidate("igemm_tiles", "backend", None, triton_reason)
    from vpns_fast.kernels.masked_conv import masked_conv2d_sparse, prepare_sparse_tiles

    _, weight, scores, threshold, _ = first_input
    tiles = prepare_sparse_tiles(weight.detach(), scores.detach(), threshold)
    p["kept_tile_fraction"] = tiles.kept_tile_fraction

    def run(inputs):
        return masked_conv2d_sparse(inputs[0], tiles, None, p["stride"], p["padding"])
    return Candidate("igemm_tiles", "backend", run)

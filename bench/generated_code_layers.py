"""Sparse 1x1 layers one by one through the per-image kernel and through code generated for their nonzeros
(csrc/generated_conv.cpp), taking turns call by call in one process: the measurement behind the rule that picks
which layers take the generated code (``sparse_cpu._generated_code_pays``), for every candidate shape, whether the
rule takes it or not.

Layers: ResNet-50's 1x1 shapes at 14x14 and 7x7 outputs (and those of its earlier stages, which the rule refuses),
each as ResNet-50 calls it: the reducing layers with ReLU, the expanding ones with bias + residual + ReLU.
``--density`` of each weight kept at random, batch ``--batch``, inputs contiguous, or with ``--aligned`` as the
engine hands a sparse layer's output on (channels padded to 64-byte multiples, which the per-image kernel reads
faster) and aligned outputs; layers alone can still differ from inside a network (bench.generated_code_ab
decides). "per-image" is SparseConv2d with the generated code switched off, "generated" the extension's op on the
layer's code (written once, untimed; its bytes are printed). Both outputs must be equal bit for bit. Medians of the
per-round ratios per-image / generated (above 1: the code pays), p20-p80.

    .venv/bin/python -m bench.generated_code_layers [--threads 2] [--density 0.1] [--batch 32] [--rounds 30] [--aligned]
"""
from __future__ import annotations

import argparse
import functools

import torch

from bench.cases.infer import add_switch_ab_arguments, checked_switch_ab_arguments, switch_ab_header
from bench.runner import round_ratio_line
from bench.timing import rotating_times_ms
from vpns_fast import _extension
from vpns_fast.deploy import sparse_cpu

# (C_in, C_out, size, kind): ResNet-50's 1x1 convolutions with 14x14 and 7x7 outputs, then two of its
# 28x28 and 56x56 ones (refused by the rule: the copy into the lanes outweighs)
LAYER_SHAPES = [(256, 1024, 14, "expanding"), (1024, 256, 14, "reducing"), (1024, 512, 14, "reducing"),
                (512, 2048, 7, "expanding"), (2048, 512, 7, "reducing"), (128, 512, 28, "expanding"),
                (64, 256, 56, "expanding")]
NAMES = ("per-image", "generated")


def _layer(in_channels: int, out_channels: int, density: float, generator):
    weight = torch.randn(out_channels, in_channels, 1, 1, generator=generator)
    weight *= torch.rand(weight.shape, generator=generator) < density
    return sparse_cpu.SparseConv2d(weight, torch.randn(out_channels, generator=generator), activation="relu")


def _label(shape) -> str:
    in_channels, out_channels, size, kind = shape
    return f"{in_channels} -> {out_channels} at {size}x{size} ({kind})"


def _activation(batch: int, channels: int, size: int, generator, aligned: bool) -> torch.Tensor:
    """Random activations, contiguous or (``aligned``) with their channels padded as a sparse layer's aligned output
    hands them on (``sparse_cpu.aligned_channel_stride``)."""
    values = torch.randn(batch, channels, size, size, generator=generator)
    if not aligned:
        return values
    stride = sparse_cpu.aligned_channel_stride(size, size)
    padded = torch.zeros(batch * channels * stride).as_strided(values.shape, (channels * stride, stride, size, 1))
    return padded.copy_(values)


def _layer_line(shape, density: float, batch: int, rounds: int, generator, aligned: bool = False) -> str:
    in_channels, out_channels, size, kind = shape
    label = _label(shape) + (", aligned" if aligned else "")
    ops = _extension.load()
    layer = _layer(in_channels, out_channels, density, generator)
    x = _activation(batch, in_channels, size, generator, aligned)
    residual = _activation(batch, out_channels, size, generator, aligned) if kind == "expanding" else None
    code, table = layer._compute_geometry(size, size, 0, packing="generated")
    activation = sparse_cpu.EPILOGUE_ACTIVATIONS.get(layer.activation, 0)
    runs = {"per-image": functools.partial(layer, x, residual, aligned_output=aligned),
            "generated": functools.partial(ops.sparse_pointwise_generated, x, code, table, layer.bias, residual,
                                           activation, aligned)}
    with torch.inference_mode():
        previous = sparse_cpu.set_generated_code(False)
        try:
            outputs = {name: run() for name, run in runs.items()}
            if not torch.equal(outputs["per-image"], outputs["generated"]):
                raise AssertionError(f"{label}: the generated code's outputs differ from the per-image kernel's")
            times = rotating_times_ms(runs, rounds)
        finally:
            sparse_cpu.set_generated_code(previous)
    taken = "taken" if sparse_cpu._generated_code_pays(layer.weight_shape, size, size) else "refused"
    return (round_ratio_line(label, times["per-image"], times["generated"], NAMES)
            + f"; code {code.mapped_bytes / 2**20:.2f} MiB; the shape rule: {taken}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_switch_ab_arguments(parser)
    parser.add_argument("--batch", type=int, default=32, help="a multiple of 16")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--aligned", action="store_true",
                        help="inputs and residuals with channels padded, aligned outputs: as inside the engine")
    parser.add_argument("--match", default="", help="only the layers whose line starts with this, e.g. '256 -> 1024'")
    args = parser.parse_args(argv)
    checked_switch_ab_arguments(parser, args)
    if args.batch < 16 or args.batch % 16:
        parser.error(f"--batch: expected a positive multiple of 16, got {args.batch}")
    if args.rounds < 1:
        parser.error(f"--rounds: expected an integer >= 1, got {args.rounds}")
    if sparse_cpu.kernel_isa() != "avx512":
        parser.error(f"the sparse kernel is {sparse_cpu.kernel_isa()}: the generated code is AVX-512's")
    torch.set_num_threads(args.threads)
    print(switch_ab_header("sparse 1x1 layers, per-image kernel / generated code", args))
    for index, shape in enumerate(LAYER_SHAPES):
        if not _label(shape).startswith(args.match):
            continue
        # a generator a shape: --match times the same weights and inputs as a full run
        generator = torch.Generator().manual_seed(index)
        print(_layer_line(shape, args.density, args.batch, args.rounds, generator, args.aligned), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What channel-aligned outputs change (SparseConv2d's ``aligned_output=True``, which the engine's graph passes where
a 1x1 conv reads the output in place): the same layer or converted network with its outputs laid out aligned and
contiguous, taking turns call by call in one process.

Layers: ResNet-50's 1x1 convolutions at 14x14 and 7x7 (the sizes whose planes, 196 and 49 floats, leave channels
off a 32-byte boundary), 10% kept (magnitude of a random weight), bias and ReLU fused, the expanding ones with a
residual; "aligned" gives each its input and residual as aligned outputs and asks for one. Networks: torchvision
ResNet-50 and ResNet-18, every Conv2d/Linear pruned by magnitude to ``density`` (as ``bench infer``), converted
once; the calls the engine marks are switched (marked and unmarked between runs). Medians of the per-round ratios
plain / aligned (above 1: the layout pays), with their p20-p80.

    .venv/bin/python -m bench.aligned_outputs_ab [--threads 2] [--density 0.1] [--rounds 30] > report.txt
"""
from __future__ import annotations

import argparse
import functools

import torch

from bench.cases.infer import (
    add_switch_ab_arguments,
    checked_switch_ab_arguments,
    converted_pruned_network,
    switch_ab_header,
    switched_network_times,
)
from bench.runner import round_ratio_line
from bench.timing import rotating_times_ms
from vpns_fast.deploy import fusion, sparse_cpu

# (C_in, C_out, size, with residual)
LAYER_SHAPES = [(256, 1024, 14, True), (1024, 256, 14, False), (512, 2048, 7, True), (2048, 512, 7, False)]
# (model, batch, rounds as a multiple of --rounds)
NETWORKS = [("resnet50", 32, 0.25), ("resnet50", 1, 1.0), ("resnet18", 1, 1.0)]


def aligned_copy(x: torch.Tensor) -> torch.Tensor:
    """``x`` laid out as an aligned output of a sparse conv (channels ``aligned_channel_stride`` floats apart,
    zeros between them)."""
    batch, channels, height, width = x.shape
    stride = sparse_cpu.aligned_channel_stride(height, width)
    buffer = torch.zeros(batch, channels, stride)
    buffer[:, :, :height * width] = x.flatten(2)
    return buffer.as_strided(x.shape, (channels * stride, stride, width, 1))


def _set_layout(network: torch.fx.GraphModule, name: str) -> None:
    """The network's sparse calls that may write aligned outputs do when a run's name is "aligned"; none does
    otherwise."""
    fusion.unmark_aligned_outputs(network)
    if name == "aligned":
        fusion.mark_aligned_outputs(network, sparse_cpu.SparseConv2d)


def _layer_lines(density: float, rounds: int) -> list[str]:
    lines = [f"## 1x1 layers, {density} kept, bias + ReLU fused; one call a round, ms"]
    generator = torch.Generator().manual_seed(0)
    for in_channels, out_channels, size, with_residual in LAYER_SHAPES:
        weight = torch.randn(out_channels, in_channels, 1, 1, generator=generator)
        weight[torch.rand(weight.shape, generator=generator) >= density] = 0
        bias = torch.randn(out_channels, generator=generator)
        layer = sparse_cpu.SparseConv2d(weight, bias, activation="relu")
        for batch in (32, 1):
            x = torch.randn(batch, in_channels, size, size, generator=generator)
            residual = torch.randn(batch, out_channels, size, size, generator=generator) if with_residual else None
            x_aligned = aligned_copy(x)
            residual_aligned = aligned_copy(residual) if with_residual else None
            with torch.inference_mode():
                aligned = functools.partial(layer, x_aligned, residual_aligned, aligned_output=True)
                if not torch.equal(layer(x, residual), aligned()):
                    raise AssertionError("the aligned layout changed the values")
                times = rotating_times_ms({"plain": functools.partial(layer, x, residual), "aligned": aligned},
                                          rounds if batch == 1 else max(3, rounds // 4))
            lines.append(round_ratio_line(f"{in_channels:4d} -> {out_channels:4d} at {size}x{size}, batch {batch:2d}"
                                          + (", residual" if with_residual else ""), times["plain"], times["aligned"],
                                          ("plain", "aligned")))
    return lines


def _network_lines(density: float, rounds: int) -> list[str]:
    lines = [f"## networks, {density} kept per layer, converted once; one call a round"]
    for model_name, batch, share in NETWORKS:
        converted, x = converted_pruned_network(model_name, density, batch)
        fusion.unmark_aligned_outputs(converted)
        marked = len(fusion.mark_aligned_outputs(converted, sparse_cpu.SparseConv2d))
        times = switched_network_times(converted, x, ("plain", "aligned"), functools.partial(_set_layout, converted),
                                       max(3, int(rounds * share)), torch.equal)
        lines.append(round_ratio_line(f"{model_name} batch {batch:2d} ({marked} calls aligned)", times["plain"],
                                      times["aligned"], ("plain", "aligned")))
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_switch_ab_arguments(parser)
    parser.add_argument("--rounds", type=int, default=30, help="rounds at batch 1 (a quarter of them at batch 32)")
    args = parser.parse_args(argv)
    checked_switch_ab_arguments(parser, args)
    if args.rounds < 1:
        parser.error(f"--rounds: expected an integer >= 1, got {args.rounds}")
    torch.set_num_threads(args.threads)
    print(switch_ab_header("SparseConv2d's aligned_output plain / aligned", args))
    for line in _layer_lines(args.density, args.rounds) + _network_lines(args.density, args.rounds):
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What the engine's dense 1x1 kernel changes (DenseConv2d's 1x1, stride-1 layers through the C++ extension's
``pointwise_conv`` rather than oneDNN; ``sparse_cpu.set_pointwise_conv``): the same layer or converted network with
the switch on and off, taking turns call by call in one process.

Layers: ResNet-50's ten 1x1 stride-1 shapes, dense, bias + residual + ReLU fused, at batch 1 and 32, inputs and
residuals channels_last (as the engine hands them over). Networks: torchvision ResNet-50 and ResNet-18, every
Conv2d/Linear pruned by magnitude to ``density`` (default 0.5, where the engine keeps most convolutions dense; as
``bench infer`` prunes), converted once with the switch on; the switch is flipped between runs, so both sides run the
same per-layer choices. Medians of the per-round ratios oneDNN / pointwise (above 1: the kernel pays), with their
p20-p80, and the two CPUs' cache-line round trip measured after each line (``sparse_cpu.core_round_trip_ns``): on
the 2-vCPU KVM guest measured, oneDNN's 1x1 calls slowed more than this kernel's when the vCPUs were apart.

    .venv/bin/python -m bench.pointwise_ab [--threads 2] [--density 0.5] [--rounds 30] > report.txt
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
from vpns_fast.deploy import sparse_cpu

# (C_in, C_out, size): ResNet-50's 1x1 stride-1 convolutions
LAYER_SHAPES = [(64, 64, 56), (64, 256, 56), (256, 64, 56), (256, 128, 56), (128, 512, 28), (512, 128, 28),
                (256, 1024, 14), (1024, 256, 14), (512, 2048, 7), (2048, 512, 7)]
# (model, batch, rounds as a multiple of --rounds)
NETWORKS = [("resnet50", 1, 1.0), ("resnet18", 1, 1.0), ("resnet50", 32, 0.2)]
NAMES = ("oneDNN", "pointwise")


def _switch(name: str) -> None:
    sparse_cpu.set_pointwise_conv(name == "pointwise")


def _round_trip() -> str:
    return f"; round trip {sparse_cpu.core_round_trip_ns():.0f} ns"


def _layer_lines(rounds: int) -> list[str]:
    lines = ["## 1x1 layers, dense, bias + residual + ReLU fused; one call a round, ms"]
    generator = torch.Generator().manual_seed(0)
    for in_channels, out_channels, size in LAYER_SHAPES:
        layer = sparse_cpu.DenseConv2d(torch.randn(out_channels, in_channels, 1, 1, generator=generator),
                                       torch.randn(out_channels, generator=generator), activation="relu")
        for batch in (1, 32):
            x = torch.randn(batch, in_channels, size, size, generator=generator).contiguous(
                memory_format=torch.channels_last)
            residual = torch.randn(batch, out_channels, size, size, generator=generator).contiguous(
                memory_format=torch.channels_last)
            run = functools.partial(layer, x, residual)
            with torch.inference_mode():
                outputs = {}
                for name in NAMES:
                    _switch(name)
                    outputs[name] = run()
                if not torch.allclose(outputs["pointwise"], outputs["oneDNN"], rtol=1e-4, atol=1e-4 * in_channels):
                    raise AssertionError("the pointwise kernel and oneDNN disagree")
                times = rotating_times_ms({name: run for name in NAMES}, rounds if batch == 1 else max(3, rounds // 5),
                                          _switch)
            lines.append(round_ratio_line(f"{in_channels:4d} -> {out_channels:4d} at {size}x{size}, batch {batch:2d}",
                                          times["oneDNN"], times["pointwise"], NAMES) + _round_trip())
    return lines


def _network_lines(density: float, rounds: int) -> list[str]:
    lines = [f"## networks, {density} kept per layer, converted once (the kernel on); one call a round"]
    for model_name, batch, share in NETWORKS:
        _switch("pointwise")
        converted, x = converted_pruned_network(model_name, density, batch)
        dense_1x1 = sum(1 for module in converted.modules() if type(module) is sparse_cpu.DenseConv2d
                        and module.weight.shape[2:] == (1, 1) and module.stride == (1, 1))
        times = switched_network_times(converted, x, NAMES, _switch, max(3, int(rounds * share)),
                                       functools.partial(torch.allclose, rtol=1e-4, atol=1e-4))
        lines.append(round_ratio_line(f"{model_name} batch {batch:2d} ({dense_1x1} dense 1x1 stride-1 layers)",
                                      times["oneDNN"], times["pointwise"], NAMES) + _round_trip())
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_switch_ab_arguments(parser)
    parser.set_defaults(density=0.5)
    parser.add_argument("--rounds", type=int, default=30, help="rounds at batch 1 (a fifth of them at batch 32)")
    args = parser.parse_args(argv)
    checked_switch_ab_arguments(parser, args)
    if args.rounds < 1:
        parser.error(f"--rounds: expected an integer >= 1, got {args.rounds}")
    if not sparse_cpu.pointwise_conv_supported():
        parser.error("the engine's dense 1x1 kernel cannot run here (it needs the C++ extension and AVX2 + FMA)")
    torch.set_num_threads(args.threads)
    print(switch_ab_header("DenseConv2d's 1x1 layers oneDNN / pointwise_conv", args))
    try:
        for line in _layer_lines(args.rounds) + _network_lines(args.density, args.rounds):
            print(line, flush=True)
    finally:
        _switch("pointwise")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

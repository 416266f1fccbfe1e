"""What the sparse kernel's next-tile requests change (``sparse_cpu.set_next_tile_prefetch``): the same
converted network or layer with them on and off, taking turns call by call in one process.

Layers: ResNet-50's 1x1 convolutions that add a residual and two 3x3 ones, at 10% kept (magnitude of a random
weight), bias and ReLU fused, with and without a residual of the output's shape. Networks: torchvision ResNet-50
and ResNet-18, every Conv2d/Linear pruned by magnitude to ``density`` (as ``bench infer``), converted once;
medians of the per-round ratios off / on (above 1: the requests pay), with their p20-p80.

    .venv/bin/python -m bench.prefetch_ab [--threads 2] [--density 0.1] > report.txt
"""
from __future__ import annotations

import argparse
import functools

import numpy as np
import torch

from bench.cases.infer import (
    add_switch_ab_arguments,
    checked_switch_ab_arguments,
    converted_pruned_network,
    print_switch_ab_report,
    switch_ab_header,
)
from bench.runner import round_ratio_line
from bench.timing import rotating_times_ms
from vpns_fast.deploy import sparse_cpu

# (C_in, C_out, size, kernel) at batch 32: ResNet-50's expanding 1x1 convs at each stage, and 3x3 ones
LAYER_SHAPES = [(64, 256, 56, 1), (128, 512, 28, 1), (256, 1024, 14, 1), (512, 2048, 7, 1),
                (64, 64, 56, 3), (128, 128, 28, 3)]
# (model, batch, rounds)
NETWORKS = [("resnet50", 32, 10), ("resnet18", 32, 10), ("resnet50", 1, 40), ("resnet18", 1, 40)]


def _prefetch_for(name: str) -> None:
    """Sets the requests on or off as a run's name ends in " on" / " off" (before its call, untimed)."""
    sparse_cpu.set_next_tile_prefetch(name.endswith(" on"))


def _layer_lines(density: float, calls: int) -> list[str]:
    lines = [f"## layers at batch 32, {density} kept, bias + ReLU fused; medians of {calls} alternating calls, ms"]
    generator = torch.Generator().manual_seed(0)
    for in_channels, out_channels, size, kernel in LAYER_SHAPES:
        weight = torch.randn(out_channels, in_channels, kernel, kernel, generator=generator)
        weight[torch.rand(weight.shape, generator=generator) >= density] = 0
        conv = sparse_cpu.SparseConv2d(weight, torch.randn(out_channels, generator=generator), padding=kernel // 2,
                                       activation="relu")
        x = torch.randn(32, in_channels, size, size, generator=generator)
        residual = torch.randn(32, out_channels, size, size, generator=generator)
        with torch.inference_mode():
            results = {(prefetch, r is not None): conv(x, r) for prefetch in (False, True) for r in (None, residual)}
            if not (torch.equal(results[False, True], results[True, True])
                    and torch.equal(results[False, False], results[True, False])):
                raise AssertionError("the requests changed the values")
            del results  # their buffers go back to the engine's cache: no timed call maps fresh pages
            plain, fused = functools.partial(conv, x), functools.partial(conv, x, residual)
            times = rotating_times_ms({"plain off": plain, "plain on": plain, "residual off": fused,
                                       "residual on": fused}, calls, _prefetch_for)
        medians = {name: np.median(values) for name, values in times.items()}
        lines.append(f"{in_channels:4d} -> {out_channels:4d} {kernel}x{kernel} at {size}x{size}: "
                     f"without residual {medians['plain off']:6.2f} -> {medians['plain on']:6.2f}, "
                     f"with residual {medians['residual off']:6.2f} -> {medians['residual on']:6.2f}  (off -> on)")
    return lines


def _network_lines(density: float) -> list[str]:
    lines = [f"## networks, {density} kept per layer, converted once; per-round ratios off / on"]
    for model_name, batch, rounds in NETWORKS:
        converted, x = converted_pruned_network(model_name, density, batch)
        with torch.inference_mode():
            expected = converted(x)
            sparse_cpu.set_next_tile_prefetch(False)
            if not torch.equal(converted(x), expected):
                raise AssertionError("the requests changed the network's output")
            run = functools.partial(converted, x)
            times = rotating_times_ms({"network off": run, "network on": run}, rounds, _prefetch_for)
        lines.append(round_ratio_line(f"{model_name} batch {batch:2d}", times["network off"], times["network on"],
                                      ("off", "on")))
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_switch_ab_arguments(parser)
    parser.add_argument("--calls", type=int, default=15, help="alternating calls per layer variant")
    args = parser.parse_args(argv)
    checked_switch_ab_arguments(parser, args)
    if args.calls < 1:
        parser.error(f"--calls: expected an integer >= 1, got {args.calls}")
    return print_switch_ab_report(args, switch_ab_header("sparse_cpu.set_next_tile_prefetch off / on", args),
                                  sparse_cpu.set_next_tile_prefetch, True,
                                  lambda: _layer_lines(args.density, args.calls) + _network_lines(args.density))


if __name__ == "__main__":
    raise SystemExit(main())

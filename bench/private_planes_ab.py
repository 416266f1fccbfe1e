"""What private planes change (``sparse_cpu.set_private_planes_bytes``), by where the host put the two cores: the
same converted network or layer with planes shared (threshold 0) and private (layers: every plane, whatever its
size; networks: the default threshold; with two threads, by position bands: each thread fills only the rows its
share of positions reads), taking turns
in one process, each round tagged with the two CPUs' cache-line round trip (``sparse_cpu.core_round_trip_ns``).

A round is 20 calls of each way (their medians), the order rotating round by round, then the round trip measured
with the engine idle. Rounds are grouped as the cores sharing an L3 (round trip < 150 ns) or not (>= 250 ns; the
machine this was written on measured 50-110 and 310-360 ns); per group, the medians of each way's round medians and
of the per-round ratios shared / private (above 1: private planes pay), with their p20-p80. Layers (batch 1, 10%
kept, bias and ReLU fused) also with one thread, which the placement does not touch. Networks: torchvision
ResNet-18 / ResNet-50 pruned by magnitude to ``density`` (as ``bench infer``), batch 1, converted once. A group with
no round is reported as such: the host may keep one placement for the whole run.

    .venv/bin/python -m bench.private_planes_ab [--seconds 120] [--density 0.1] > report.txt
"""
from __future__ import annotations

import argparse
import functools

import torch

from bench.cases.infer import (
    add_switch_ab_arguments,
    checked_switch_ab_arguments,
    converted_pruned_network,
    inference_call,
    print_switch_ab_report,
    switch_ab_header,
)
from bench.placement import APART_FROM_NS, SHARED_BELOW_NS, grouped_summary, placement_grouped_rounds
from vpns_fast.deploy import sparse_cpu

# (C_in, C_out, size, kernel, stride) at batch 1: planes of 460 KB, 262 KB and 861 KB
LAYER_SHAPES = [(128, 256, 28, 3, 2), (256, 256, 14, 3, 1), (64, 64, 56, 3, 1)]
NETWORKS = ["resnet18", "resnet50"]
CALLS_PER_ROUND = 20


def _grouped(runs: dict[str, functools.partial], thresholds: dict[str, int], seconds: float,
             max_rounds: int | None = None) -> dict[str, list]:
    """Rounds of CALLS_PER_ROUND calls each way, each run with its threshold set, grouped by placement
    (bench.placement)."""
    return placement_grouped_rounds(runs, lambda name: sparse_cpu.set_private_planes_bytes(thresholds[name]), seconds,
                                    CALLS_PER_ROUND, max_rounds)


def _layer_lines(density: float, seconds: float, threads: int) -> list[str]:
    lines = [f"## layers at batch 1, {density} kept, bias + ReLU fused; ms (medians of round medians)"]
    generator = torch.Generator().manual_seed(0)
    runs, thresholds = {}, {}
    for in_channels, out_channels, size, kernel, stride in LAYER_SHAPES:
        weight = torch.randn(out_channels, in_channels, kernel, kernel, generator=generator)
        weight[torch.rand(weight.shape, generator=generator) >= density] = 0
        conv = sparse_cpu.SparseConv2d(weight, torch.randn(out_channels, generator=generator), stride=stride,
                                       padding=kernel // 2, activation="relu")
        x = torch.randn(1, in_channels, size, size, generator=generator)
        name = f"{in_channels:4d} -> {out_channels:4d} {kernel}x{kernel} stride {stride} at {size}x{size}"
        with torch.inference_mode():
            sparse_cpu.set_private_planes_bytes(0)
            expected = conv(x)
            sparse_cpu.set_private_planes_bytes(1 << 40)
            if not torch.equal(conv(x), expected):
                raise AssertionError(f"{name}: private planes changed the values")
        for way, threshold in (("shared", 0), ("private", 1 << 40)):
            runs[f"{name} {way}"] = functools.partial(inference_call, conv, x)
            thresholds[f"{name} {way}"] = threshold
    for thread_count in sorted({threads, 1}, reverse=True):
        torch.set_num_threads(thread_count)
        groups = _grouped(runs, thresholds, seconds)
        for name in dict.fromkeys(key.rsplit(" ", 1)[0] for key in runs):
            for group in ("shared", "apart"):
                lines.append(grouped_summary(f"{name}, {thread_count} thread(s), cores {group:6s}", groups[group],
                                             f"{name} shared", f"{name} private", ("shared", "private")))
    torch.set_num_threads(threads)
    return lines


def _network_lines(density: float, seconds: float, default_threshold: int) -> list[str]:
    lines = [f"## networks at batch 1, {density} kept per layer, converted once; shared: threshold 0, private: "
             f"{default_threshold} bytes (the default)"]
    for model_name in NETWORKS:
        converted, x = converted_pruned_network(model_name, density, 1)
        with torch.inference_mode():
            sparse_cpu.set_private_planes_bytes(0)
            expected = converted(x)
            sparse_cpu.set_private_planes_bytes(default_threshold)
            if not torch.equal(converted(x), expected):
                raise AssertionError(f"{model_name}: private planes changed the network's output")
        run = functools.partial(inference_call, converted, x)
        groups = _grouped({"shared": run, "private": run}, {"shared": 0, "private": default_threshold}, seconds)
        for group in ("shared", "apart"):
            lines.append(grouped_summary(f"{model_name} cores {group:6s}", groups[group], "shared", "private"))
        if groups["between"]:
            lines.append(f"{model_name}: {len(groups['between'])} rounds with a round trip between "
                         f"{SHARED_BELOW_NS:.0f} and {APART_FROM_NS:.0f} ns, or none measured, left out")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_switch_ab_arguments(parser)
    parser.add_argument("--seconds", type=float, default=120.0, help="seconds of rounds per layer set and network")
    args = parser.parse_args(argv)
    checked_switch_ab_arguments(parser, args, min_threads=2)  # one thread shares nothing
    if not args.seconds > 0:
        parser.error(f"--seconds: expected a positive number, got {args.seconds}")
    try:
        trip = sparse_cpu.core_round_trip_ns(20000)
    except RuntimeError as error:
        parser.error(f"cannot measure the cores' round trip here: {str(error).splitlines()[0]}")
    default_threshold = sparse_cpu.PRIVATE_PLANES_BYTES
    header = switch_ab_header("sparse_cpu.set_private_planes_bytes shared / private", args,
                              f"; CPUs 0 and 1 round trip {trip:.0f} ns at the start")
    return print_switch_ab_report(args, header, sparse_cpu.set_private_planes_bytes, default_threshold,
                                  lambda: (_layer_lines(args.density, args.seconds, args.threads)
                                           + _network_lines(args.density, args.seconds, default_threshold)))


if __name__ == "__main__":
    raise SystemExit(main())

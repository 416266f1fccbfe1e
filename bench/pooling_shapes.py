"""The engine's pooling kernels against torch's, layer by layer over a grid of shapes: what the conversion's rule for
swapping poolings stands on (``vpns_fast.deploy.sparse_cpu._pooling_rule``).

For each pooling (global average to 1x1; max 3x3 stride 2 padding 1, ResNet's stem; max 2x2 stride 2, VGG's; max 3x3
stride 1 padding 1, Inception's pooling branch; max 5x5 stride 1 padding 2, YOLO's spatial pyramid pooling), batch,
channels x plane size and layout (NCHW, channels_last): torch's module and the engine's (GlobalAvgPool2d,
SeparableMaxPool2d) on the same random input, one call each way a round in alternating order, warm caches (the
layer's input read again and again; inside ResNet-50, where its input was just written by both cores, the average
pooling's kernel gained more than alone: ``bench.global_avg_pool_ab``). One line a point: both medians and torch /
kernel (above 1: the kernel is faster), and whether the rule swaps that layer without timing it.

    .venv/bin/python -m bench.pooling_shapes [--rounds 30] [--threads 2] [--batches 1,8] > report.txt
"""
from __future__ import annotations

import argparse
import datetime
import statistics

import torch
from torch import nn

from bench.environment import device_name
from bench.timing import rotating_times_ms

# (channels, plane side): ResNet's, VGG's and MobileNet's pooled activations, and few channels over large planes
SHAPES = [(8, 112), (32, 112), (64, 112), (64, 56), (256, 56), (512, 28), (1024, 14), (96, 7), (1280, 7), (2048, 7)]


def poolings():
    """{name: (torch's module, the engine's, the smallest plane side it is timed at)}."""
    from vpns_fast.deploy import sparse_cpu

    found = {"global average": (nn.AdaptiveAvgPool2d(1), sparse_cpu.GlobalAvgPool2d(), 1)}
    for name, pool in (("max 3x3 s2 p1", nn.MaxPool2d(3, 2, 1)), ("max 2x2 s2", nn.MaxPool2d(2, 2)),
                       ("max 3x3 s1 p1", nn.MaxPool2d(3, 1, 1)), ("max 5x5 s1 p2", nn.MaxPool2d(5, 1, 2))):
        found[name] = (pool, sparse_cpu.SeparableMaxPool2d.from_module(pool), 14)
    return found


def alternating_ms(first, second, x: torch.Tensor, rounds: int) -> tuple[float, float]:
    """Median ms of ``first(x)`` and ``second(x)`` after three warm-up calls each, one call each a round in turns
    (bench.timing.rotating_times_ms)."""
    with torch.inference_mode():
        for _ in range(3):
            first(x), second(x)
        times = rotating_times_ms({"first": lambda: first(x), "second": lambda: second(x)}, rounds)
    return statistics.median(times["first"]), statistics.median(times["second"])


def _batch_sizes(text: str) -> list[int] | None:
    """``--batches``' value as integers, or None unless it is comma-separated integers >= 1."""
    try:
        batches = [int(value) for value in text.split(",")]
    except ValueError:
        return None
    return batches if min(batches) >= 1 else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--shapes", type=int, default=len(SHAPES), help="the first this many of the shape grid")
    args = parser.parse_args(argv)
    batches = _batch_sizes(args.batches)
    if batches is None:
        parser.error(f"--batches: expected comma-separated integers >= 1, got {args.batches!r}")
    for flag in ("rounds", "threads", "shapes"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag}: expected an integer >= 1, got {getattr(args, flag)}")
    from vpns_fast.deploy import sparse_cpu

    if not sparse_cpu.available()[0]:
        parser.error(f"the C++ extension is not available here: {sparse_cpu.available()[1]}")
    torch.set_num_threads(args.threads)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"# pooling kernels against torch's, {args.threads} threads, {device_name('cpu')}, "
          f"torch {torch.__version__}; {args.rounds} rounds of one call each way, alternating; {now}")
    print(f"{'pooling':15s} {'batch':>5s} {'channels':>8s} {'plane':>7s} {'layout':13s} {'torch ms':>9s} "
          f"{'kernel ms':>9s} {'torch/kernel':>12s}  rule")
    generator = torch.Generator().manual_seed(0)
    for name, (theirs, ours, smallest) in poolings().items():
        for batch in batches:
            for channels, side in SHAPES[:args.shapes]:
                if side < smallest:
                    continue
                for layout in (torch.contiguous_format, torch.channels_last):
                    x = torch.randn(batch, channels, side, side, generator=generator).contiguous(memory_format=layout)
                    torch_ms, kernel_ms = alternating_ms(theirs, ours, x, args.rounds)
                    rule = sparse_cpu._pooling_rule(theirs, x)
                    print(f"{name:15s} {batch:5d} {channels:8d} {f'{side}x{side}':>7s} "
                          f"{'channels_last' if layout is torch.channels_last else 'NCHW':13s} {torch_ms:9.4f} "
                          f"{kernel_ms:9.4f} {torch_ms / kernel_ms:11.2f}x  {'swap' if rule else 'timed'}",
                          flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

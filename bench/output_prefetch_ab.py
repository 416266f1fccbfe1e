"""What requesting the next tile's output lines for writing changes (``sparse_cpu.set_output_prefetch_for_write``):
the same converted network with the requests for writing (x86 ``prefetchw``) and for reading, taking turns in one
process.

Networks: torchvision ResNet-50 and ResNet-18, every Conv2d/Linear pruned by magnitude to ``density`` (as
``bench infer``), converted once. Batch 1: rounds of 20 calls each way, grouped by where the host put the two cores
(``bench.placement``: the cache-line round trip measured after each round), for ``--seconds`` a network. Batch 32:
one call each way a round, ``--rounds`` rounds in rotating order. Medians of the per-round ratios read / write
(above 1: requesting for writing pays), with their p20-p80.

    .venv/bin/python -m bench.output_prefetch_ab [--seconds 120] [--rounds 10] [--density 0.1] > report.txt
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
from bench.placement import grouped_summary, placement_grouped_rounds
from bench.runner import round_ratio_line
from bench.timing import rotating_times_ms
from vpns_fast.deploy import sparse_cpu

NETWORKS = ["resnet50", "resnet18"]


def _request_for(name: str) -> None:
    """Requests for writing when a run's name is "write", for reading otherwise (before its calls, untimed)."""
    sparse_cpu.set_output_prefetch_for_write(name == "write")


def _converted(model_name: str, density: float, batch: int):
    """(network converted for ``batch``, its input), after checking that the requests change no value."""
    converted, x = converted_pruned_network(model_name, density, batch)
    with torch.inference_mode():
        _request_for("read")
        expected = converted(x)
        _request_for("write")
        if not torch.equal(converted(x), expected):
            raise AssertionError(f"{model_name}: the requests changed the network's output")
    return converted, x


def _network_lines(density: float, seconds: float, rounds: int) -> list[str]:
    lines = [f"## batch 1, {density} kept per layer, converted once; rounds grouped by the cores' placement"]
    for model_name in NETWORKS:
        converted, x = _converted(model_name, density, 1)
        run = functools.partial(inference_call, converted, x)
        groups = placement_grouped_rounds({"read": run, "write": run}, _request_for, seconds)
        for group, found in groups.items():
            if found or group != "between":
                lines.append(grouped_summary(f"{model_name} cores {group:7s}", found, "read", "write"))
    lines.append(f"## batch 32, one call each way a round, {rounds} rounds")
    for model_name in NETWORKS:
        converted, x = _converted(model_name, density, 32)
        run = functools.partial(inference_call, converted, x)
        times = rotating_times_ms({"read": run, "write": run}, rounds, _request_for)
        lines.append(round_ratio_line(f"{model_name} batch 32", times["read"], times["write"], ("read", "write")))
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_switch_ab_arguments(parser)
    parser.add_argument("--seconds", type=float, default=120.0, help="seconds of batch-1 rounds a network")
    parser.add_argument("--rounds", type=int, default=10, help="batch-32 rounds a network")
    args = parser.parse_args(argv)
    checked_switch_ab_arguments(parser, args, min_threads=2)  # one thread shares nothing
    if not args.seconds > 0:
        parser.error(f"--seconds: expected a positive number, got {args.seconds}")
    if args.rounds < 1:
        parser.error(f"--rounds: expected an integer >= 1, got {args.rounds}")
    return print_switch_ab_report(args, switch_ab_header("sparse_cpu.set_output_prefetch_for_write read / write", args),
                                  sparse_cpu.set_output_prefetch_for_write, True,
                                  lambda: _network_lines(args.density, args.seconds, args.rounds))


if __name__ == "__main__":
    raise SystemExit(main())

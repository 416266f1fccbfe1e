"""The batch-in-lanes 3x3 kernel (``sparse_cpu.set_batch_lanes``) on whole networks, on and off taking turns in one
process: the check behind the default (README, "Batches in the vector lanes").

Each point ``ARCH:KEPT:BATCH`` (``bench.isa_ab``'s points) is a torchvision network at 224 px, every Conv2d/Linear
pruned by magnitude to the fraction ``KEPT``, converted once (its per-layer decisions measured with the kernel on);
the switch is read at each call of the converted network. Its outputs both ways must be equal bit for bit. Then rounds
of calls each way (10 at batch 1, 2 at larger batches), grouped by where the host put the first two CPUs
(``bench.placement``), for ``--seconds`` a point. Medians of the per-round ratios off / on (above 1: the kernel pays),
with their p20-p80. Batches that are no multiple of 16 never run it: such points check that nothing else moved.

    .venv/bin/python -m bench.batch_lanes_ab [--seconds 75] [--points resnet50:0.1:32,resnet18:0.1:32] > report.txt
"""
from __future__ import annotations

import functools

import torch

from bench.cases.infer import converted_pruned_network, inference_call, print_switch_ab_report, switch_ab_header
from bench.isa_ab import CALLS_PER_ROUND_BATCH_1, CALLS_PER_ROUND_LARGER, parsed_points_arguments
from bench.placement import grouped_summary, placement_grouped_rounds
from vpns_fast.deploy import sparse_cpu

DEFAULT_POINTS = "resnet50:0.1:32,resnet50:0.05:32,resnet18:0.1:32,resnet18:0.05:32,resnet50:0.5:32,mobilenet_v2:0.1:32"


def switch_point_lines(arch: str, density: float, batch: int, seconds: float, switch=sparse_cpu.set_batch_lanes
                       ) -> list[str]:
    """One point's lines: the network converted once, its outputs with ``switch`` (a ``sparse_cpu.set_*`` function
    taking a bool) off and on checked equal bit for bit, then rounds each way grouped by placement."""
    converted, x = converted_pruned_network(arch, density, batch)
    outputs = {}
    for name, enabled in (("off", False), ("on", True)):
        switch(enabled)
        outputs[name] = inference_call(converted, x)
    if not torch.equal(outputs["off"], outputs["on"]):
        raise AssertionError(f"{arch}: the outputs with {switch.__name__} off and on differ")
    run = functools.partial(inference_call, converted, x)
    groups = placement_grouped_rounds({"off": run, "on": run}, lambda name: switch(name == "on"), seconds,
                                      CALLS_PER_ROUND_BATCH_1 if batch == 1 else CALLS_PER_ROUND_LARGER)
    label = f"{arch} {density:g} kept, batch {batch}"
    return [grouped_summary(f"{label}, cores {group}", found, "off", "on")
            for group, found in groups.items() if found or group != "between"]


def avx512_switch_ab_main(argv, doc: str, default_points: str, switch, what: str) -> int:
    """The main of an A/B script of an AVX-512 kernel's ``switch`` (a ``sparse_cpu.set_*`` function taking a bool):
    its points (``bench.isa_ab``'s arguments), refused unless the sparse kernel is AVX-512 (``what`` names the
    kernel), then :func:`switch_point_lines` for each."""
    parser, args, points = parsed_points_arguments(argv, doc.splitlines()[0], default_points)
    if sparse_cpu.kernel_isa() != "avx512":
        parser.error(f"the sparse kernel is {sparse_cpu.kernel_isa()}: {what} is AVX-512's")
    return print_switch_ab_report(
        args, switch_ab_header(f"sparse_cpu.{switch.__name__} off / on", args), switch, True,
        lambda: (line for point in points for line in switch_point_lines(*point, args.seconds, switch)))


def main(argv=None) -> int:
    return avx512_switch_ab_main(argv, __doc__, DEFAULT_POINTS, sparse_cpu.set_batch_lanes,
                                 "the batch-in-lanes kernel")


if __name__ == "__main__":
    raise SystemExit(main())

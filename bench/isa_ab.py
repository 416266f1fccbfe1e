"""The sparse kernel's AVX-512 and AVX2 paths on whole networks (``sparse_cpu.set_kernel_isa``), taking turns in one
process: the check behind the default kernel on a CPU that runs both (the README's tables of the kernels).

Each point ``ARCH:KEPT:BATCH`` is a torchvision network at 224 px, every Conv2d/Linear pruned by magnitude to the
fraction ``KEPT`` (as ``bench infer``), converted once with the AVX2 kernel set (its per-layer decisions measured
with it); the dense layers' 1x1 kernel and Winograd transforms switch with the sparse one. Its outputs both ways
are compared first. Then rounds of calls each way (10 at batch 1, 2 at larger batches), grouped by where the host
put the first two CPUs (``bench.placement``: the cache-line round trip measured after each round), for
``--seconds`` a point. Medians of the per-round ratios AVX2 / AVX-512 (above 1: AVX-512 pays), with their p20-p80.

    .venv/bin/python -m bench.isa_ab [--seconds 75] [--points resnet50:0.05:1,resnet18:0.1:32] > report.txt
"""
from __future__ import annotations

import argparse
import functools

from bench.cases.infer import converted_pruned_network, inference_call, print_switch_ab_report, switch_ab_header
from bench.placement import grouped_summary, placement_grouped_rounds
from vpns_fast.deploy import sparse_cpu

ARCHES = ("resnet18", "resnet50", "mobilenet_v2")
DEFAULT_POINTS = ("resnet50:0.05:1,resnet18:0.05:1,resnet50:0.1:1,resnet18:0.1:1,mobilenet_v2:0.1:1,"
                  "resnet50:0.05:32,resnet18:0.1:32,resnet50:0.5:1")
# Calls of each kernel a round: enough at batch 1 that a round's median is steady, few where a call takes 0.1-1 s.
CALLS_PER_ROUND_BATCH_1, CALLS_PER_ROUND_LARGER = 10, 2
# The largest relative difference allowed between the two kernels' outputs (max |a - b| / max |a|): they sum the
# same nonzeros in the same order, but the dense layers' Winograd transforms round differently per vector width.
AGREEMENT = 1e-5


def parse_points(text: str) -> list[tuple[str, float, int]]:
    """``ARCH:KEPT:BATCH,...`` as (arch, fraction kept, batch); ValueError saying what is wrong."""
    points = []
    for item in text.split(","):
        fields = item.strip().split(":")
        if len(fields) != 3 or fields[0] not in ARCHES:
            raise ValueError(f"expected ARCH:KEPT:BATCH with ARCH one of {', '.join(ARCHES)}, got {item!r}")
        try:
            density, batch = float(fields[1]), int(fields[2])
        except ValueError:
            raise ValueError(f"expected a fraction and an integer in {item!r}") from None
        if not 0 < density <= 1 or batch < 1:
            raise ValueError(f"expected KEPT in (0, 1] and BATCH >= 1, got {item!r}")
        points.append((fields[0], density, batch))
    return points


def _point_lines(arch: str, density: float, batch: int, seconds: float) -> list[str]:
    converted, x = converted_pruned_network(arch, density, batch)
    outputs = {}
    for isa in ("avx2", "avx512"):
        sparse_cpu.set_kernel_isa(isa)
        outputs[isa] = inference_call(converted, x)
    scale = float(outputs["avx2"].abs().max()) or 1.0
    difference = float((outputs["avx2"] - outputs["avx512"]).abs().max()) / scale
    if not difference <= AGREEMENT:
        raise AssertionError(f"{arch}: the two kernels' outputs differ by {difference:.1e} of the largest")
    run = functools.partial(inference_call, converted, x)
    groups = placement_grouped_rounds({"avx2": run, "avx512": run}, sparse_cpu.set_kernel_isa, seconds,
                                      CALLS_PER_ROUND_BATCH_1 if batch == 1 else CALLS_PER_ROUND_LARGER)
    label = f"{arch} {density:g} kept, batch {batch}"
    lines = [grouped_summary(f"{label}, cores {group}", found, "avx2", "avx512")
             for group, found in groups.items() if found or group != "between"]
    return lines + [f"  ({label}: outputs differ by {difference:.1e} of the largest)"]


def parsed_points_arguments(argv, description: str, default_points: str):
    """(parser, arguments, points) of a network switch A/B script's command line (--threads, --seconds, --points),
    each checked, the engine checked to be available; errors through the parser."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=75.0, help="seconds of rounds a point")
    parser.add_argument("--points", default=default_points, help="ARCH:KEPT:BATCH,... (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads: expected an integer >= 1, got {args.threads}")
    if not args.seconds > 0:
        parser.error(f"--seconds: expected a positive number, got {args.seconds}")
    try:
        points = parse_points(args.points)
    except ValueError as error:
        parser.error(f"--points: {error}")
    available, reason = sparse_cpu.available()
    if not available:
        parser.error(f"the sparse CPU engine is unavailable: {reason}")
    return parser, args, points


def main(argv=None) -> int:
    parser, args, points = parsed_points_arguments(argv, __doc__.splitlines()[0], DEFAULT_POINTS)
    if "avx512" not in sparse_cpu.kernel_isas():
        parser.error(f"this CPU runs only {', '.join(sparse_cpu.kernel_isas())}: nothing to compare AVX-512 with")
    return print_switch_ab_report(
        args, switch_ab_header("sparse_cpu.set_kernel_isa avx2 / avx512", args), sparse_cpu.set_kernel_isa, "avx2",
        lambda: (line for point in points for line in _point_lines(*point, args.seconds)))


if __name__ == "__main__":
    raise SystemExit(main())

"""What compiled call plans change (``call_plan.set_call_plans``): the same deployed module called through its plan and
through the traced graph's forward, taking turns in one process, each round tagged with the two CPUs' cache-line
round trip (``bench.placement``).

Networks: torchvision models pruned by magnitude to each density (as ``bench infer``), deployed once
(``vpns_fast.deploy``, ``policy="measure"``) for the batch size, called with random images in
``torch.inference_mode``. Their outputs are compared first, bit for bit. A round is ``--calls`` calls of each way (their
medians), the order rotating round by round; per placement group, the medians of each way's round medians and of
the per-round ratios graph / plan (above 1: the plan pays), with their p20-p80.

    .venv/bin/python -m bench.call_plan_ab [--networks resnet18,resnet50] [--densities 0.5,0.1,0.05] [--batch 1]
        [--seconds 40] [--calls 20] [--threads 2] > report.txt
"""
from __future__ import annotations

import argparse
import functools

import torch

from bench.cases.infer import pruned_model, switch_ab_header
from bench.placement import grouped_summary, placement_grouped_rounds
from vpns_fast.deploy import call_plan, runtime, sparse_cpu


def _call(model, images):
    with torch.inference_mode():
        return model(images)


def _network_lines(name: str, density: float, batch: int, seconds: float, calls: int) -> list[str]:
    model = runtime.deploy(pruned_model(name, density, "uniform"), example_input_size=(batch, 3, 224, 224))
    images = torch.rand(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    call_plan.set_call_plans(False)
    expected = _call(model, images)
    call_plan.set_call_plans(True)
    if not torch.equal(_call(model, images), expected) or not torch.equal(_call(model, images), expected):
        raise AssertionError(f"{name} at {density} kept: the plan changed the output")
    (plan,) = model.call_plans()
    note = f"{plan['steps']} steps" if plan["steps"] else f"no plan: {plan['refused']}"
    run = functools.partial(_call, model, images)
    groups = placement_grouped_rounds({"graph": run, "plan": run}, lambda way: call_plan.set_call_plans(way == "plan"),
                                      seconds, calls)
    label = f"{name} {density} kept batch {batch} ({note})"
    return [grouped_summary(f"{label}, cores {group}", groups[group], "graph", "plan")
            for group in ("shared", "apart", "between") if groups[group]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", default="resnet18,resnet50")
    parser.add_argument("--densities", default="0.5,0.1,0.05")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=40.0, help="seconds of rounds per network and density")
    parser.add_argument("--calls", type=int, default=20, help="calls of each way in a round")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    try:
        densities = [float(d) for d in args.densities.split(",")]
    except ValueError:
        parser.error(f"--densities: expected fractions separated by commas, got {args.densities!r}")
    if not all(0 < d <= 1 for d in densities):
        parser.error(f"--densities: expected fractions in (0, 1], got {args.densities!r}")
    for flag, value in (("--batch", args.batch), ("--calls", args.calls), ("--threads", args.threads)):
        if value < 1:
            parser.error(f"{flag}: expected a positive integer, got {value}")
    if not args.seconds > 0:
        parser.error(f"--seconds: expected a positive number, got {args.seconds}")
    available, reason = sparse_cpu.available()
    if not available:
        parser.error(f"the sparse CPU engine is unavailable: {reason}")
    torch.set_num_threads(args.threads)
    print(switch_ab_header("call_plan.set_call_plans graph / plan", args), flush=True)
    previous = call_plan.call_plans_enabled()
    try:
        for name in args.networks.split(","):
            for density in densities:
                for line in _network_lines(name, density, args.batch, args.seconds, args.calls):
                    print(line, flush=True)
    finally:
        call_plan.set_call_plans(previous)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

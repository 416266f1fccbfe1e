"""GlobalAvgPool2d against torch's AdaptiveAvgPool2d(1) inside one deployed network, taking turns in one process.

The network is deployed once (``vpns_fast.deploy`` at the batch given); each round puts one pooling in as
``avgpool`` (the compiled call plan is made again for the edited module tree, then warmed), times ``--calls`` plain
calls, then the other. Per-round ratios torch / GlobalAvgPool2d (above 1: the kernel pays), median and p20-p80,
with the pooling step's own median time each way from the plan's timed calls.

    .venv/bin/python -m bench.global_avg_pool_ab resnet50 0.1 [--batch 1] [--rounds 20] [--calls 20] > report.txt
"""
from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn

from bench.builds_ab import timed_plan_calls
from bench.cases.infer import add_pruned_model_arguments, checked_pruned_model_arguments, pruned_model
from bench.environment import device_name


def timed_calls(network: nn.Module, plans, x: torch.Tensor, calls: int) -> tuple[float, float]:
    """(median ms of ``calls`` plain calls, median ms of the avgpool step in as many timed calls)."""
    plain_ms, steps_ms = timed_plan_calls(network, plans, x, calls, ("avgpool",))
    return plain_ms, steps_ms["avgpool"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_pruned_model_arguments(parser)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args(argv)
    checked_pruned_model_arguments(parser, args)
    import vpns_fast as vf
    from vpns_fast.deploy import call_plan, sparse_cpu

    torch.set_num_threads(args.threads)
    x = torch.randn(args.batch, 3, 224, 224)
    network = vf.deploy(pruned_model(args.arch, args.density, "uniform")).network
    chosen = type(network.avgpool).__name__  # the conversion's own timing may keep either: both are put in below
    poolings = {"torch": nn.AdaptiveAvgPool2d(1), "kernel": sparse_cpu.GlobalAvgPool2d()}
    plans = call_plan.NetworkPlans()
    print(f"# {args.arch} at {args.density} kept, batch {args.batch}, {args.threads} threads, {device_name('cpu')}; "
          f"{args.rounds} rounds of {args.calls} calls each way, the order alternating; the deployment chose {chosen}")
    ratios, steps = [], {"torch": [], "kernel": []}
    with torch.inference_mode():
        for round_index in range(args.rounds):
            ms = {}
            order = ("torch", "kernel") if round_index % 2 == 0 else ("kernel", "torch")
            for name in order:
                network.avgpool = poolings[name]
                ms[name], step = timed_calls(network, plans, x, args.calls)
                steps[name].append(step)
            ratios.append(ms["torch"] / ms["kernel"])
            print(f"round {round_index + 1}: torch {ms['torch']:.2f} ms, kernel {ms['kernel']:.2f} ms "
                  f"({ratios[-1]:.3f}x); the step {steps['torch'][-1]:.3f} -> {steps['kernel'][-1]:.3f} ms",
                  flush=True)
    ordered = sorted(ratios)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    print(f"torch / kernel: median {statistics.median(ratios):.3f}x (p20-p80 {pick(0.2):.3f}-{pick(0.8):.3f}x); "
          f"the step's median {statistics.median(steps['torch']):.3f} -> {statistics.median(steps['kernel']):.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

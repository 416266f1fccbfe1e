"""GlobalAvgPool2d against torch's AdaptiveAvgPool2d(1) inside one deployed network, taking turns in one process.

The network is deployed once (``vpns_fast.deploy`` at the batch given); each round puts one pooling in as
``avgpool`` (the compiled call plan is made again for the edited module tree) and times ``--calls`` plain and as
many step-timed calls (bench.ort_layers.our_layer_ms), then the other. Per-round ratios torch / GlobalAvgPool2d
(above 1: the kernel pays), median and p20-p80, with the pooling step's own median time each way from the plan's
timed calls.

    .venv/bin/python -m bench.global_avg_pool_ab resnet50 0.1 [--batch 1] [--rounds 20] [--calls 20] > report.txt
"""
from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn

from bench.cases.infer import add_pruned_model_arguments, checked_pruned_model_arguments, pruned_model
from bench.environment import device_name
from bench.ort_layers import our_layer_ms
from bench.runner import round_ratio_line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_pruned_model_arguments(parser)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args(argv)
    checked_pruned_model_arguments(parser, args)
    import vpns_fast as vf
    from vpns_fast.deploy import sparse_cpu

    torch.set_num_threads(args.threads)
    x = torch.randn(args.batch, 3, 224, 224)
    network = vf.deploy(pruned_model(args.arch, args.density, "uniform")).network
    chosen = type(network.avgpool).__name__  # the conversion's own timing may keep either: both are put in below
    poolings = {"torch": nn.AdaptiveAvgPool2d(1), "kernel": sparse_cpu.GlobalAvgPool2d()}
    print(f"# {args.arch} at {args.density} kept, batch {args.batch}, {args.threads} threads, {device_name('cpu')}; "
          f"{args.rounds} rounds of {args.calls} calls each way, the order alternating; the deployment chose {chosen}")
    plain, steps = {"torch": [], "kernel": []}, {"torch": [], "kernel": []}
    for round_index in range(args.rounds):
        for name in ("torch", "kernel") if round_index % 2 == 0 else ("kernel", "torch"):
            network.avgpool = poolings[name]  # the call plan is made again for the edited module tree
            layers_ms, _timed_ms, plain_ms, _how = our_layer_ms(network, x, args.calls)
            plain[name].append(plain_ms)
            steps[name].append(layers_ms["avgpool"])
        print(f"round {round_index + 1}: torch {plain['torch'][-1]:.2f} ms, kernel {plain['kernel'][-1]:.2f} ms "
              f"({plain['torch'][-1] / plain['kernel'][-1]:.3f}x); the step {steps['torch'][-1]:.3f} -> "
              f"{steps['kernel'][-1]:.3f} ms", flush=True)
    print(round_ratio_line("the whole call", plain["torch"], plain["kernel"], ("torch", "kernel")))
    print(f"the step's median: torch {statistics.median(steps['torch']):.3f} ms, kernel "
          f"{statistics.median(steps['kernel']):.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

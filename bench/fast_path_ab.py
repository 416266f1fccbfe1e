"""A deployed module's fast path against its general path, calls taking turns in one process.

The network is deployed once (``vpns_fast.deploy`` at the batch given). Each round times ``--calls`` calls of the
module (its fast path: the input stage with its checks and the compiled call plan, two calls of the extension) and
as many of a module whose forward is the general path (``DeployedModel._checked_forward``: each check in Python,
under ``torch.no_grad()``), one of each in turn, the first of each pair alternating; both go through
``nn.Module.__call__``. Images: uniform float32 in [0, 1], or uint8 with ``--uint8``. Per-round ratios
general / fast (above 1: the fast path pays), median and p20-p80.

    .venv/bin/python -m bench.fast_path_ab resnet50 0.05 [--batch 1] [--rounds 10] [--calls 40] [--uint8] > report.txt
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from bench.cases.infer import add_pruned_model_arguments, checked_pruned_model_arguments, pruned_model
from bench.environment import device_name
from bench.runner import round_ratio_line


class GeneralPath(nn.Module):
    """``deployed``'s general path behind a module call of its own, as the fast path is behind the deployed one's."""

    def __init__(self, deployed: nn.Module):
        super().__init__()
        self.deployed = deployed

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.deployed._checked_forward(images)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_pruned_model_arguments(parser)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--uint8", action="store_true", help="uint8 images in [0, 255] (default: float32 in [0, 1])")
    args = parser.parse_args(argv)
    checked_pruned_model_arguments(parser, args)
    if args.rounds < 1 or args.calls < 1:
        parser.error(f"--rounds and --calls must be at least 1, got {args.rounds} and {args.calls}")
    import vpns_fast as vf

    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch, 3, 224, 224, generator=generator)
    if args.uint8:
        images = (images * 255).to(torch.uint8)
    deployed = vf.deploy(pruned_model(args.arch, args.density, "uniform"),
                         example_input_size=(args.batch, 3, 224, 224))
    general = GeneralPath(deployed)
    deployed(images)  # the call plan
    if not torch.equal(deployed(images), general(images)):
        raise RuntimeError("the fast path's output differs from the general path's")
    plans = deployed.call_plans()
    if deployed._fast_input(images) is None or len(plans) != 1 or not plans[0]["steps"]:
        raise RuntimeError(f"the module does not take its fast path here (its call plans: {plans})")
    print(f"# {args.arch} at {args.density} kept, batch {args.batch}, {args.threads} threads, "
          f"{'uint8' if args.uint8 else 'float32'} images, {device_name('cpu')}; {args.rounds} rounds of "
          f"{args.calls} calls each way, one of each in turn, the first alternating")
    medians = {"general": [], "fast": []}
    for round_index in range(args.rounds):
        seconds = {"general": [], "fast": []}
        for call in range(args.calls):
            pair = (("general", general), ("fast", deployed))
            for name, module in pair if (round_index + call) % 2 == 0 else pair[::-1]:
                start = time.perf_counter()
                module(images)
                seconds[name].append(time.perf_counter() - start)
        for name in medians:
            medians[name].append(1e3 * statistics.median(seconds[name]))
        print(f"round {round_index + 1}: general {medians['general'][-1]:.3f} ms, fast {medians['fast'][-1]:.3f} ms "
              f"({medians['general'][-1] / medians['fast'][-1]:.3f}x)", flush=True)
    print(round_ratio_line("a call", medians["general"], medians["fast"], ("general", "fast")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Winograd's F(4x4, 3x3) in the CPU engine, end to end: the same pruned torchvision model converted twice by
``convert_for_cpu(policy="measure")``, with Winograd allowed and with ``winograd=False``, and ONNX Runtime on the
same network, the three taking turns in rotating order call by call in one process; prints what each conversion
chose and the per-round ratios (median, p20-p80).

    .venv/bin/python -m bench.winograd_ab resnet50 0.5 [--batch 1] [--threads 2] [--rounds 30] [--image-size 224]
"""
from __future__ import annotations

import argparse
import datetime
import functools
import platform
import time

import numpy as np
import torch

from bench.cases.infer import add_pruned_model_arguments, checked_pruned_model_arguments, pruned_model
from bench.runner import round_ratios
from bench.timing import rotating_times_ms
from vpns_fast.deploy import baselines, sparse_cpu


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_pruned_model_arguments(parser)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args(argv)
    checked_pruned_model_arguments(parser, args)
    if args.rounds < 1 or args.image_size < 32:
        parser.error(f"--rounds: expected an integer >= 1, --image-size: >= 32; got {args.rounds}, {args.image_size}")
    torch.set_num_threads(args.threads)
    model = pruned_model(args.arch, args.density, "uniform")  # the same pruning as the `infer` case
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0))
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"# {args.arch} at {args.image_size}, {args.density} kept per layer, batch {args.batch}, {args.threads} "
          f"threads; torch {torch.__version__}, onnxruntime {baselines.onnxruntime_version()}, "
          f"{platform.processor() or 'cpu'}, {now}")
    runs = {}
    for label, winograd in (("winograd", True), ("oneDNN only", False)):
        summary: dict = {}
        start = time.perf_counter()
        runs[label], _ = sparse_cpu.convert_for_cpu(model, x, summary=summary, winograd=winograd,
                                                    repeats=15 if args.batch == 1 else 5)
        layers = list(runs[label].modules())
        print(f"{label}: converted in {time.perf_counter() - start:.1f} s, "
              f"{sum(isinstance(m, sparse_cpu.SparseConv2d) for m in layers)} sparse convs, "
              f"{sum(isinstance(m, sparse_cpu.WinogradConv2d) for m in layers)} by Winograd; "
              f"Winograd: {summary.get('winograd')}; whole network: {summary.get('network')}")
    run_ort, _ = baselines.onnxruntime_runner(model, x)
    runs["onnxruntime"] = run_ort
    with torch.no_grad():
        for run in runs.values():
            run(x)
            run(x)
        times = rotating_times_ms({label: functools.partial(run, x) for label, run in runs.items()}, args.rounds)
    for label, values in times.items():
        print(f"{label}: median {np.median(values):.2f} ms")
    for numerator, denominator in (("onnxruntime", "winograd"), ("onnxruntime", "oneDNN only"),
                                   ("oneDNN only", "winograd")):
        # p20/p80 interpolated, as the harness's rows and bench.engines_table quote them
        ratios = round_ratios(times[numerator], times[denominator])
        print(f"{denominator} against {numerator}: {np.median(ratios):.3f}x (p20-p80 {np.quantile(ratios, 0.2):.3f}-"
              f"{np.quantile(ratios, 0.8):.3f}x, "
              f"{args.rounds} rounds)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

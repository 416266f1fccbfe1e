"""Where the CPU engine's time goes, layer by layer: a torchvision classification model (ResNets, RegNet,
MobileNet, EfficientNet, ...; random init, seed 0), every Conv2d/Linear pruned by magnitude to the same
density, through ``benchmark_inference(..., layers=True)`` and the table ``vpns bench-infer --layers`` prints
(decisions, dense and sparse times, GFLOP/s, share of the machine's dense peak measured in the same run: the
better of an sgemm and a oneDNN conv), against dense torch and ONNX Runtime (when installed).

    .venv/bin/python -m bench.cpu_layers resnet18 0.1 [--batch 1] [--threads 2] [--iters 15] > report.txt
"""
from __future__ import annotations

import argparse
import datetime
import platform

import torch

from bench.cases.infer import add_pruned_model_arguments, checked_pruned_model_arguments, pruned_model
from vpns_fast.cli import _print_bench_rows
from vpns_fast.deploy import baselines, runtime


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_pruned_model_arguments(parser, iters=15)
    args = parser.parse_args(argv)
    checked_pruned_model_arguments(parser, args)
    model = pruned_model(args.arch, args.density, "uniform")  # the same pruning as the `infer` case
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"# {args.arch} at 224, {args.density} kept per layer (torchvision random init, magnitude), "
          f"{args.threads} threads; torch {torch.__version__}, onnxruntime {baselines.onnxruntime_version()}, "
          f"python {platform.python_version()}; {now}; "
          f"vpns_fast.deploy.runtime.benchmark_inference(model, ({args.batch},), threads={args.threads}, "
          f"iters={args.iters}, layers=True)")
    rows = runtime.benchmark_inference(model, (args.batch,), threads=args.threads, iters=args.iters, layers=True)
    _print_bench_rows(rows, True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

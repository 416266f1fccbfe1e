"""Winograd's F(4x4, 3x3) in the CPU engine, end to end: the same pruned torchvision model converted twice by
``convert_for_cpu(policy="measure")``, with Winograd allowed and with ``winograd=False``, and ONNX Runtime on the
same network, the three taking turns in rotating order call by call in one process; prints what each conversion
chose and the per-round ratios (median, p20-p80).

With ``--layers``, first ResNet's four 3x3 stride-1 shapes at the batch (dense, bias and ReLU fused, channels_last):
oneDNN (``DenseConv2d``) against the kernel with its products in torch's batched sgemm (the [36, C_in, C_out] weight)
and in the engine's 1x1 tile (the packed panels, once per vector kernel this CPU runs), one call each a round.

    .venv/bin/python -m bench.winograd_ab resnet50 0.5 [--batch 1] [--threads 2] [--rounds 30] [--image-size 224]
        [--layers]
"""
from __future__ import annotations

import argparse
import datetime
import functools
import time

import numpy as np
import torch

from bench.cases.infer import add_pruned_model_arguments, checked_pruned_model_arguments, pruned_model
from bench.cases.sparse_isa import with_kernel
from bench.runner import round_ratios
from bench.timing import rotating_times_ms
from vpns_fast.deploy import baselines, sparse_cpu, winograd
from vpns_fast.environment import cpu_model_name

# (channels, size): ResNet's 3x3 stride-1 convolutions (C_in = C_out)
LAYER_SHAPES = [(64, 56), (128, 28), (256, 14), (512, 7)]


def _layer_lines(batch: int, rounds: int) -> list[str]:
    lines = [f"## 3x3 stride-1 layers, dense, bias + ReLU fused, batch {batch}; one call each a round, median ms"]
    generator = torch.Generator().manual_seed(0)
    ops = sparse_cpu._ops()
    for channels, size in LAYER_SHAPES:
        weight = torch.randn(channels, channels, 3, 3, generator=generator) * (2 / (9 * channels)) ** 0.5
        bias = torch.randn(channels, generator=generator)
        x = torch.randn(batch, channels, size, size, generator=generator).contiguous(memory_format=torch.channels_last)
        onednn = sparse_cpu.DenseConv2d(weight, bias, padding=1, activation="relu")
        batched, panels = winograd.winograd_weight(weight), winograd.winograd_panels(weight)
        runs = {"oneDNN": functools.partial(onednn, x),
                "batched sgemm": functools.partial(ops.winograd_conv2d, x, batched, bias, [1, 1], None, 1)}
        for isa in sparse_cpu.kernel_isas():
            if isa != "scalar":
                conv = functools.partial(ops.winograd_conv2d, weight=panels, bias=bias, padding=[1, 1], activation=1)
                runs[f"panels {isa}"] = functools.partial(with_kernel(isa, conv), x)
        with torch.inference_mode():
            expected = onednn(x)
            for label, run in runs.items():
                if not torch.allclose(run(), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max())):
                    raise AssertionError(f"{label} and oneDNN disagree")
            times = rotating_times_ms(runs, rounds if batch == 1 else max(3, rounds // 5))
        medians = {label: float(np.median(values)) for label, values in times.items()}
        fastest = min((label for label in runs if label.startswith("panels")), key=medians.get)
        ratios = ", ".join(f"{label} / {fastest} {np.median(round_ratios(times[label], times[fastest])):.2f}x"
                           for label in runs if label != fastest)
        lines.append(f"{channels:3d} channels at {size}x{size}: "
                     + ", ".join(f"{label} {value:.3f}" for label, value in medians.items()) + f"; {ratios}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_pruned_model_arguments(parser)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--layers", action="store_true", help="time ResNet's 3x3 stride-1 layers first")
    args = parser.parse_args(argv)
    checked_pruned_model_arguments(parser, args)
    if args.rounds < 1 or args.image_size < 32:
        parser.error(f"--rounds: expected an integer >= 1, --image-size: >= 32; got {args.rounds}, {args.image_size}")
    if args.layers and not sparse_cpu.pointwise_conv_supported():
        parser.error("--layers: the packed panels need the C++ extension and a CPU with AVX2 + FMA")
    torch.set_num_threads(args.threads)
    model = pruned_model(args.arch, args.density, "uniform")  # the same pruning as the `infer` case
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0))
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"# {args.arch} at {args.image_size}, {args.density} kept per layer, batch {args.batch}, {args.threads} "
          f"threads; torch {torch.__version__}, onnxruntime {baselines.onnxruntime_version()}, "
          f"{cpu_model_name()}, {now}")
    if args.layers:
        for line in _layer_lines(args.batch, args.rounds):
            print(line, flush=True)
    runs = {}
    for label, allowed in (("winograd", True), ("oneDNN only", False)):
        summary: dict = {}
        start = time.perf_counter()
        runs[label], _ = sparse_cpu.convert_for_cpu(model, x, summary=summary, winograd=allowed,
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

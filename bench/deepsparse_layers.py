"""Layer by layer against DeepSparse: this engine's per-layer table (``benchmark_inference(..., layers=True)``,
each layer timed alone on its real input) next to DeepSparse's own per-layer analysis
(``deepsparse.debug_analysis``, run by the python named in VPNS_DEEPSPARSE_PYTHON, see bench/README.md) of the
same pruned network exported to ONNX, each DeepSparse subgraph against the sum of the layers it covers.

    VPNS_DEEPSPARSE_PYTHON=/tmp/dsvenv/bin/python .venv/bin/python -m bench.deepsparse_layers resnet50 0.1 \\
        --batch 32 > report.txt

DeepSparse fuses runs of layers into one subgraph (its "pyramids", over ResNet's first stages); a row then
covers several of this engine's layers. DeepSparse's analysis mode runs each subgraph apart, and its total there
need not be its plain calls' time (both are reported), so the rows compare each engine's share of its own time.
Run it on a quiet machine: the two engines are timed one after the other, not interleaved.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import warnings

import torch

from bench.cases.infer import (
    DEEPSPARSE_OPSET,
    DEEPSPARSE_PYTHON,
    add_pruned_model_arguments,
    checked_pruned_model_arguments,
    pruned_model,
)


def module_name(onnx_output: str) -> str | None:
    """The torch module that produced an ONNX node output named by torch's exporter, e.g.
    ``/layer1/layer1.0/downsample/downsample.0/Conv_output_0`` -> ``layer1.0.downsample.0``; None for names
    without a module scope (a graph output such as ``logits``). The exporter names each scope level by the
    module's path from its parent's scope (``layer1.0`` under ``layer1``): only the new part is kept."""
    scopes = onnx_output.strip("/").split("/")[:-1]
    parts: list[str] = []
    for scope in scopes:
        if parts and scope.startswith(parts[-1] + "."):
            scope = scope[len(parts[-1]) + 1:]
        parts.append(scope)
    return ".".join(parts) or None


def side_by_side(analysis: dict, decisions: list[dict]) -> list[dict]:
    """One row per DeepSparse subgraph of ``analysis`` (debug_analysis's JSON): its time, the layers of
    ``decisions`` (this engine's per-layer table) it covers and the sum of their times as they run (sparse or
    dense), ``None`` when it covers none of them."""
    ours = {row["name"]: row.get("sparse_ms") if row.get("chosen") == "sparse" else row.get("dense_ms")
            for row in decisions}
    rows = []
    for layer in analysis["layer_info"]:
        names = [module_name(output) for output in layer["canonical_name"].split(",")]
        covered = [name for name in names if name in ours and ours[name] is not None]
        rows.append({"deepsparse": layer["name"], "deepsparse_ms": layer["average_run_time_in_ms"],
                     "layers": covered, "ours_ms": sum(ours[name] for name in covered) if covered else None})
    return rows


def format_side_by_side(rows: list[dict]) -> str:
    """The rows of :func:`side_by_side` as aligned text: each side's time and its share of the sum over the rows
    both sides timed, and the ratio of the shares (above 1: this engine spends a larger part of its time there than
    DeepSparse does). Shares, not times, are compared: DeepSparse's analysis mode runs each subgraph apart."""
    both = [row for row in rows if row["ours_ms"] is not None]
    both_ds, both_ours = sum(row["deepsparse_ms"] for row in both), sum(row["ours_ms"] for row in both)
    lines = [f"{'deepsparse subgraph':<24} {'deepsparse ms':>13} {'share':>6} {'ours ms':>9} {'share':>6} "
             f"{'ratio':>6}  layers"]
    for row in rows:
        ours = row["ours_ms"]
        if ours is None or both_ds <= 0 or both_ours <= 0:
            lines.append(f"{row['deepsparse'][:24]:<24} {row['deepsparse_ms']:13.3f} {'-':>6} {'-':>9} {'-':>6} "
                         f"{'-':>6}  -")
            continue
        ds_share, our_share = row["deepsparse_ms"] / both_ds, ours / both_ours
        ratio = f"{our_share / ds_share:6.2f}" if ds_share > 0 else f"{'-':>6}"
        lines.append(f"{row['deepsparse'][:24]:<24} {row['deepsparse_ms']:13.3f} {100 * ds_share:5.1f}% "
                     f"{ours:9.3f} {100 * our_share:5.1f}% {ratio}  {','.join(row['layers'])}")
    lines.append(f"{'rows both timed':<24} {both_ds:13.3f} {'100%':>6} {both_ours:9.3f} {'100%':>6}")
    return "\n".join(lines)


# DeepSparse's plain calls, timed in its own python: its analysis mode runs each subgraph apart. ResNet-50 at batch
# 32 and 1 (2026-12-05): its total there was 0.78-1.19x its plain calls on a quiet machine, so the report gives
# both.
PLAIN_CALLS = """
import sys, time, numpy, deepsparse
path, batch, threads, iters = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
engine = deepsparse.compile_model(path, batch_size=batch, num_cores=threads)
images = [numpy.random.default_rng(0).random((batch, 3, 224, 224), dtype=numpy.float32)]
for _ in range(2):
    engine(images)
times = []
for _ in range(iters):
    start = time.perf_counter()
    engine(images)
    times.append(time.perf_counter() - start)
print(1e3 * sorted(times)[len(times) // 2])
"""


def deepsparse_analysis(python: str, model: torch.nn.Module, batch: int, threads: int, iters: int) -> dict:
    """debug_analysis's JSON for ``model`` exported as ``bench infer`` exports it for DeepSparse, with
    ``plain_call_ms``: the median of ``iters`` plain engine calls on the same file."""
    from vpns_fast.deploy.export import onnx_model

    with tempfile.TemporaryDirectory(prefix="vpns-deepsparse-layers-") as folder:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the opset-13 fallback to the TorchScript exporter is intended here
            graph, _ = onnx_model(model.eval(), torch.rand(batch, 3, 224, 224), DEEPSPARSE_OPSET)
        onnx_path, json_path = os.path.join(folder, "model.onnx"), os.path.join(folder, "analysis.json")
        with open(onnx_path, "wb") as file:
            file.write(graph.SerializeToString())
        command = [python, "-m", "deepsparse.debug_analysis", onnx_path, "-b", str(batch), "-ncores", str(threads),
                   "-wi", "2", "-bi", str(iters), "-q", "-x", json_path]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0 or not os.path.exists(json_path):
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"deepsparse.debug_analysis failed (exit {done.returncode}): {tail[0]}")
        with open(json_path) as file:
            analysis = json.load(file)
        done = subprocess.run([python, "-c", PLAIN_CALLS, onnx_path, str(batch), str(threads), str(iters)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"DeepSparse's plain calls failed (exit {done.returncode}): {tail[0]}")
        analysis["plain_call_ms"] = float(done.stdout.split()[-1])
        return analysis


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_pruned_model_arguments(parser, iters=10)
    args = parser.parse_args(argv)
    checked_pruned_model_arguments(parser, args)
    python = os.environ.get(DEEPSPARSE_PYTHON)
    if not python:
        parser.error(f"set {DEEPSPARSE_PYTHON} to a python with deepsparse 1.8 installed (bench/README.md)")
    from vpns_fast.deploy import runtime, sparse_cpu

    model = pruned_model(args.arch, args.density, "uniform")  # the same pruning as the `infer` case
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rows = runtime.benchmark_inference(model, (args.batch,), threads=args.threads, iters=args.iters, layers=True,
                                       baselines=())
    deployed = next(row for row in rows if row["backend"] == "deploy")
    try:
        analysis = deepsparse_analysis(python, model, args.batch, args.threads, args.iters)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"# {args.arch} at 224, {args.density} kept per layer (torchvision random init, magnitude), batch "
          f"{args.batch}, {args.threads} threads; torch {torch.__version__}, python {platform.python_version()}, "
          f"sparse kernel {sparse_cpu.kernel_isa()}; deepsparse.debug_analysis -b {args.batch} -ncores "
          f"{args.threads} -bi {args.iters}; {now}; core round trip {sparse_cpu.core_round_trip_ns():.0f} ns")
    plain = analysis["plain_call_ms"]
    print(f"this engine: {deployed['latency_ms']:.2f} ms a call ({1e3 * args.batch / deployed['latency_ms']:.1f} "
          f"images/s); DeepSparse: {plain:.2f} ms a plain call ({1e3 * args.batch / plain:.1f} images/s), "
          f"{analysis['average_total_time']:.2f} ms in its analysis, which runs each subgraph apart "
          f"({analysis['average_total_time'] / plain:.2f}x)")
    print(format_side_by_side(side_by_side(analysis, deployed["decisions"])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

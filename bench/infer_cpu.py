"""``python -m bench.infer_cpu``: sparse CPU inference (``vpns_fast.sparse_cpu``) against dense torch
(oneDNN, same thread count) and ``torch.sparse`` CSR + unfold (im2col), per ResNet-18 @224 conv layer
and end to end; prints tables and appends JSON rows (the ``bench/runner.py`` schema, case ``infer``)
to ``bench/results/local-cpu.jsonl``.

Weights: torchvision ResNet-18 (random init, eval mode), pruned unstructured at each density either
per layer (``--masks uniform``: every Conv2d/Linear keeps its top-|w| fraction; the density is the
same everywhere) or by global magnitude (``--masks global``: one threshold over all layers; with
random-init weights the early layers stay much denser than the late ones). Each implementation is
timed in interleaved rounds (a burst of load hits all alike), rotating input copies larger than the
last-level cache; rows carry the 1-minute load average at the time.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from bench.environment import REPO_ROOT, environment_fields
from bench.timing import Timing, input_copy_count, time_calls
from vpns_fast import sparse_cpu

SCHEMA = "vpns_fast.bench/1"
CASE = "infer"


def resnet18(density: float, masks: str, seed: int = 0) -> nn.Module:
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.resnet18().eval()
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        if masks == "global":
            magnitudes = torch.cat([w.abs().flatten() for w in weights])
            threshold = torch.kthvalue(magnitudes, max(1, int(magnitudes.numel() * (1 - density)))).values
            thresholds = [threshold] * len(weights)
        else:
            thresholds = [torch.kthvalue(w.abs().flatten(), max(1, int(w.numel() * (1 - density)))).values
                          for w in weights]
        if density < 1.0:
            for w, t in zip(weights, thresholds):
                w.mul_(w.abs() > t)
    return model


def conv_layers_with_inputs(model: nn.Module, x: torch.Tensor) -> list[tuple[str, nn.Conv2d, torch.Size]]:
    """Every Conv2d with the shape of its input, in forward order (the model is the shape registry)."""
    found = []
    handles = [m.register_forward_pre_hook(lambda m, inputs, name=name: found.append((name, m, inputs[0].shape)))
               for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return found


def csr_unfold_conv(conv: nn.Conv2d) -> callable:
    """The second baseline: MKL/torch CSR weight times the im2col matrix from F.unfold."""
    weight = conv.weight.detach()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        csr = weight.reshape(weight.shape[0], -1).to_sparse_csr()
    out_channels = weight.shape[0]

    def run(x):
        n, _, h, w = x.shape
        columns = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)  # [N, CKK, L]
        out_h = (h + 2 * conv.padding[0] - conv.dilation[0] * (conv.kernel_size[0] - 1) - 1) // conv.stride[0] + 1
        out_w = (w + 2 * conv.padding[1] - conv.dilation[1] * (conv.kernel_size[1] - 1) - 1) // conv.stride[1] + 1
        if n == 1:
            out = torch.sparse.mm(csr, columns[0]).unsqueeze(0)
        else:
            out = torch.sparse.mm(csr, columns.transpose(0, 1).reshape(columns.shape[1], -1))
            out = out.reshape(out_channels, n, -1).transpose(0, 1)
        out = out.reshape(n, out_channels, out_h, out_w)
        return out if conv.bias is None else out + conv.bias.view(1, -1, 1, 1)

    return run


def interleaved(runs: dict[str, callable], inputs: list, repeats: int, rounds: int = 3) -> dict[str, Timing]:
    per_round = max(1, repeats // rounds)
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            times[name] += time_calls(run, inputs, per_round, "cpu").times_ms
    return {name: Timing(t) for name, t in times.items()}


def make_rows(environment: dict, shape: str, params: dict, timings: dict[str, Timing], baselines: list[str],
              batch: int) -> list[dict]:
    rows = []
    for name, timing in timings.items():
        rows.append({
            "schema": SCHEMA, **environment, "load_average_1m": os.getloadavg()[0], "case": CASE, "impl": name,
            "impl_kind": "baseline" if name in baselines else "backend", "status": "ok", "skip_reason": None,
            "error": None, "dtype": "float32", "shape": shape, "mode": "fwd", "params": params,
            "median_ms": timing.median_ms, "p20_ms": timing.p20_ms, "p80_ms": timing.p80_ms, "repeats": timing.repeats,
            "images_per_s": batch / (timing.median_ms / 1e3),
            "speedup": {b: timings[b].median_ms / timing.median_ms for b in baselines if b in timings}})
    return rows


def bench_layers(density: float, masks: str, batch: int, repeats: int, environment: dict) -> list[dict]:
    model = resnet18(density, masks)
    rows, seen = [], set()
    print(f"\nper layer, ResNet-18 @224, batch {batch}, density {density} ({masks} masks), load "
          f"{os.getloadavg()[0]:.2f}")
    print(f"{'layer':<22} {'weight':<18} {'dens':>5} {'dense ms':>9} {'csr+unfold':>10} {'sparse ms':>9} "
          f"{'x dense':>7} {'x csr':>6}")
    for name, conv, in_shape in conv_layers_with_inputs(model, torch.randn(1, 3, 224, 224)):
        key = (tuple(conv.weight.shape), tuple(in_shape[1:]), conv.stride)
        if key in seen:  # identical shapes: one row each
            continue
        seen.add(key)
        shape = (batch, *in_shape[1:])
        copies = input_copy_count("cpu", 4 * int(torch.Size(shape).numel()))
        inputs = [torch.randn(shape) for _ in range(copies)]
        sparse = sparse_cpu.SparseConv2d.from_dense(conv)
        runs = {"dense": conv, "csr_unfold": csr_unfold_conv(conv), "sparse_direct": sparse}
        with torch.no_grad():
            expected = conv(inputs[0])
            for impl in ("csr_unfold", "sparse_direct"):
                error = float((runs[impl](inputs[0]) - expected).abs().max())
                assert error <= 1e-4 * (1 + float(expected.abs().max())), f"{name} {impl}: error {error}"
            timings = interleaved(runs, inputs, repeats)
        real_density = sparse.density
        shape_text = f"{name} w={list(conv.weight.shape)} x={list(shape)} s={conv.stride[0]}"
        params = {"model": "resnet18", "layer": name, "batch": batch, "density": density, "masks": masks,
                  "layer_density": real_density}
        rows += make_rows(environment, shape_text, params, timings, ["dense", "csr_unfold"], batch)
        d, c, s = (timings[k].median_ms for k in ("dense", "csr_unfold", "sparse_direct"))
        print(f"{name:<22} {str(tuple(conv.weight.shape)):<18} {real_density:5.3f} {d:9.3f} {c:10.3f} {s:9.3f} "
              f"{d / s:7.2f} {c / s:6.2f}")
    return rows


def with_separable_pooling(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.MaxPool2d):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child,
                    sparse_cpu.SeparableMaxPool2d.from_module(module))
    return model


def bench_end_to_end(density: float, masks: str, batch: int, repeats: int, environment: dict,
                     show_table: bool) -> list[dict]:
    model = resnet18(density, masks)
    copies = input_copy_count("cpu", 4 * batch * 3 * 224 * 224)
    inputs = [torch.randn(batch, 3, 224, 224) for _ in range(copies)]
    converted, table = sparse_cpu.convert_for_cpu(model, inputs[0], policy="measure",
                                                  repeats=max(3, 15 if batch == 1 else 5))
    if show_table:
        print(sparse_cpu.format_decisions(table))
    runs = {"dense": model, "dense_separable_pool": with_separable_pooling(model), "sparse_measured": converted}
    with torch.no_grad():
        expected = model(inputs[0])
        error = float((converted(inputs[0]) - expected).abs().max())
        assert error <= 1e-3 * (1 + float(expected.abs().max())), f"end to end error {error}"
        timings = interleaved(runs, inputs, repeats)
    chosen = sum(row["chosen"] == "sparse" for row in table)
    params = {"model": "resnet18", "batch": batch, "density": density, "masks": masks,
              "sparse_layers": chosen, "layers": len(table), "end_to_end_error": error}
    rows = make_rows(environment, f"resnet18 B={batch} 224px", params, timings, ["dense", "dense_separable_pool"],
                     batch)
    d, p, s = (timings[k] for k in ("dense", "dense_separable_pool", "sparse_measured"))
    print(f"end to end ResNet-18 @224 B={batch} density {density} ({masks}): dense {d.median_ms:.2f} ms "
          f"[{d.p20_ms:.2f}, {d.p80_ms:.2f}], dense+separable pool {p.median_ms:.2f} ms, sparse (measured policy, "
          f"{chosen}/{len(table)} layers swapped) {s.median_ms:.2f} ms [{s.p20_ms:.2f}, {s.p80_ms:.2f}]: "
          f"{d.median_ms / s.median_ms:.2f}x dense images/s, {p.median_ms / s.median_ms:.2f}x dense+separable pool; "
          f"load {os.getloadavg()[0]:.2f}")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.infer_cpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.2, 0.1, 0.05])
    parser.add_argument("--batches", type=int, nargs="+", default=[1])
    parser.add_argument("--masks", choices=["uniform", "global"], nargs="+", default=["uniform"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--skip-layers", action="store_true", help="end to end only")
    parser.add_argument("--skip-end-to-end", action="store_true", help="per layer only")
    parser.add_argument("--show-decisions", action="store_true", help="print convert_for_cpu's table")
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "bench", "results", "local-cpu.jsonl"))
    args = parser.parse_args(argv)
    ok, reason = sparse_cpu.available()
    if not ok:
        print(f"sparse CPU kernels unavailable: {reason}", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    environment = environment_fields("cpu")
    rows = []
    for masks in args.masks:
        for batch in args.batches:
            for density in args.densities:
                if not args.skip_layers:
                    rows += bench_layers(density, masks, batch, args.repeats, environment)
                if not args.skip_end_to_end:
                    rows += bench_end_to_end(density, masks, batch, max(3, args.repeats if batch == 1 else 5),
                                             environment, args.show_decisions)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "a") as out:
        for row in rows:
            out.write(json.dumps(row) + "\n")
    print(f"\nappended {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

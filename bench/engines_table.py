"""The README's table of the CPU engine against the engines deployers use, from the rows of ``python -m bench infer``
(the end-to-end points): images/s of dense torch, ONNX Runtime, DeepSparse and the engine, then the engine's
speedup over ONNX Runtime and DeepSparse as the median of the per-round ratios with their p20-p80 range, and
DeepSparse's own time per call (measured inside its process) over the engine's median time.

    .venv/bin/python -m bench.engines_table bench/results/cpu-engines-2026-12-04-amd-q.jsonl

Rows written before ``speedup_round_median`` existed get it from their ``speedup_rounds``; rows older still
(before 2026-12-03's run j) have no per-round ratios, and their speedup columns print "-". A point the engine
(``sparse_cpu``) did not run is left out; an engine missing at a point prints "-". A point measured twice in
the rows given (two runs' files) is refused: one table is one run.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics

import numpy as np

ENGINE = "sparse_cpu"
NAMES = {"resnet18": "ResNet-18", "resnet50": "ResNet-50"}
HEADER = ("| network, kept | batch | torch eager dense | ONNX Runtime | DeepSparse | vpns_fast | vs ONNX Runtime "
          "| vs DeepSparse | vs DeepSparse's engine alone |\n|---|---|---|---|---|---|---|---|---|")


def _speedup(row: dict, baseline: str) -> str:
    """``median (p20-p80)`` of the engine's per-round ratios over ``baseline``, or "-"."""
    rounds = (row.get("speedup_rounds") or {}).get(baseline)
    if not rounds:
        return "-"
    median = (row.get("speedup_round_median") or {}).get(baseline, float(np.median(rounds)))
    return f"{median:.2f}x ({np.quantile(rounds, 0.2):.2f}-{np.quantile(rounds, 0.8):.2f})"


def table(rows: list[dict]) -> str:
    """The markdown table of the end-to-end points in ``rows``, ResNet-18 before ResNet-50, the most kept first;
    ValueError for a point and engine measured twice."""
    points: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        params = row.get("params") or {}
        if row.get("status") == "ok" and params.get("scope") == "model":
            point = (params["model"], params["density"], params["batch"])
            impls = points.setdefault(point, {})
            if row["impl"] in impls:
                raise ValueError(f"{row['impl']} at {point} appears twice: pass one run's rows at a time")
            impls[row["impl"]] = row
    lines = [HEADER]
    for (model, density, batch), impls in sorted(points.items(), key=lambda item: (item[0][0], -item[0][1],
                                                                                   item[0][2])):
        engine = impls.get(ENGINE)
        if engine is None:
            continue
        alone = "-"
        deepsparse_ms = (impls.get("deepsparse", {}).get("params") or {}).get("deepsparse_engine_ms")
        if deepsparse_ms:
            alone = f"{statistics.median(deepsparse_ms) / engine['median_ms']:.2f}x"
        per_second = [f"{impls[impl]['images_per_s']:.1f}" if impl in impls else "-"
                      for impl in ("dense", "onnxruntime", "deepsparse", ENGINE)]
        lines.append(f"| {NAMES.get(model, model)}, {density * 100:g}% | {batch} | {' | '.join(per_second)} | "
                     f"{_speedup(engine, 'onnxruntime')} | {_speedup(engine, 'deepsparse')} | {alone} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", nargs="+", type=pathlib.Path, help="jsonl files written by `python -m bench infer`")
    args = parser.parse_args(argv)
    rows = []
    for path in args.rows:
        try:
            rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except (OSError, json.JSONDecodeError) as error:
            parser.error(f"rows: cannot read {path} as JSON lines ({error})")
    try:
        print(table(rows))
    except ValueError as error:
        parser.error(f"rows: {error}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

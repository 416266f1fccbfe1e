"""``python -m bench``: time each case under every backend that implements its op and against
the case's baselines; print a table and append one JSON row per measurement (see README.md)."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Iterable
from typing import TextIO

import numpy as np
import torch

from bench.cases import CASES
from bench.cases.common import Workload, canonical_dtype_name
from bench.environment import REPO_ROOT, environment_fields
from bench.timing import CPU_WARMUP_SECONDS, Timing, measured_copy_bandwidth, measured_matmul_peak, time_calls
from vpns_fast import ops
from vpns_fast.environment import torch_threads

SCHEMA = "vpns_fast.bench/1"
DEFAULT_REPEATS = {"cpu": 10, "cuda": 100}


def default_out_path(device_type: str) -> str:
    return os.path.join(REPO_ROOT, "bench", "results", f"local-{device_type}.jsonl")


def verify_workload(workload: Workload) -> dict[str, str]:
    """Run every implementation once on the first input copy and check it against the first
    baseline. An implementation that crashes or gives a wrong answer is taken out of the run (a
    wrong answer's timing would be worse than no timing) and its error returned by name, to be
    recorded; the other implementations and points still run (a GPU session is short)."""
    reference_name = workload.baseline_names[0]
    reference = workload.candidate(reference_name)
    if reference.run is None:
        raise RuntimeError(f"{workload.config.case}: the reference baseline {reference_name!r} cannot run: "
                           f"{reference.skip_reason}")
    expected = reference.run(workload.inputs[0])
    errors = {}
    for candidate in workload.candidates:
        if candidate.run is None or candidate is reference:
            continue
        try:
            output = candidate.run(workload.inputs[0])
            workload.compare(output, expected, candidate.name)
        except Exception as exc:  # VerificationError included: a wrong answer is an error row
            errors[candidate.name] = f"{type(exc).__name__}: {exc}"
            print(f"ERROR: {workload.config.case} {workload.config.shape} {workload.config.dtype} "
                  f"{workload.config.mode}: {candidate.name} {errors[candidate.name]}", file=sys.stderr)
    return errors


# Timed calls are split into this many rounds, the implementations taking turns round by round: a
# burst of load on the shared CPU machines then hits every implementation, not only the one being
# timed when it came (seen this session: ResNet-18 at 10% kept, batch 1, took 8.4 ms per call in the
# engine in one quiet period and 11-16 ms within the same hour).
INTERLEAVED_ROUNDS = 5


def interleaved_timings(candidates: list, inputs: list, repeats: int, device_type: str,
                        cpu_warmup_seconds: float) -> tuple[dict[str, Timing], dict[str, list[float]]]:
    """Each candidate's ``repeats`` timed calls, in up to INTERLEAVED_ROUNDS rounds of turns (who
    goes first rotates); warm-up before each candidate's first round only. Also each candidate's median
    per round, for ratios taken round by round (a burst of load hits both sides of a round's ratio)."""
    rounds = max(1, min(INTERLEAVED_ROUNDS, repeats))
    times: dict[str, list[float]] = {c.name: [] for c in candidates}
    round_medians: dict[str, list[float]] = {c.name: [] for c in candidates}
    for round_ in range(rounds):
        calls = repeats // rounds + (1 if round_ < repeats % rounds else 0)
        turn = candidates[round_ % len(candidates):] + candidates[:round_ % len(candidates)] if candidates else []
        for candidate in turn:
            warmup = cpu_warmup_seconds if round_ == 0 else 0.0
            timed = time_calls(candidate.run, inputs, calls, device_type, warmup).times_ms
            times[candidate.name] += timed
            round_medians[candidate.name].append(Timing(timed).median_ms)
    return {name: Timing(values) for name, values in times.items()}, round_medians


def round_ratios(baseline_rounds: list[float], candidate_rounds: list[float]) -> list[float]:
    """The baseline's time over the candidate's, round by round (> 1: the candidate is faster)."""
    return [base / mine for base, mine in zip(baseline_rounds, candidate_rounds) if mine > 0]


def round_ratio_line(label: str, baseline_rounds: list[float], candidate_rounds: list[float],
                     names: tuple[str, str]) -> str:
    """One line of an A/B script's report: the rounds, each side's median ms (``names``: baseline, candidate), and
    the median of the per-round ratios baseline / candidate with their p20-p80 (interpolated, as the harness's rows
    and bench.engines_table quote them)."""
    ratios = round_ratios(baseline_rounds, candidate_rounds)
    first, second = names
    return (f"{label}: {len(ratios):3d} rounds, {first} {np.median(baseline_rounds):8.3f} ms, {second} "
            f"{np.median(candidate_rounds):8.3f} ms; {first} / {second} {np.median(ratios):.3f}x (p20-p80 "
            f"{np.quantile(ratios, 0.2):.3f}-{np.quantile(ratios, 0.8):.3f}x)")


def measure_workload(workload: Workload, device_type: str, repeats: int, ceiling_bytes_per_s: float | None,
                     environment: dict, cpu_warmup_seconds: float = CPU_WARMUP_SECONDS) -> list[dict]:
    errors = verify_workload(workload)
    timings, round_medians = interleaved_timings(
        [c for c in workload.candidates if c.run is not None and c.name not in errors], workload.inputs, repeats,
        device_type, cpu_warmup_seconds)
    baseline_medians = {name: timings[name].median_ms for name in workload.baseline_names if name in timings}
    config = workload.config
    peak_flops = measured_matmul_peak(device_type, config.dtype) if workload.flops else None
    rows = []
    for candidate in workload.candidates:
        timing = timings.get(candidate.name)
        row = {"schema": SCHEMA, **environment, "case": config.case, "impl": candidate.name,
               "impl_kind": candidate.kind,
               "status": "ok" if timing else "error" if candidate.name in errors else "skipped",
               "skip_reason": candidate.skip_reason, "error": errors.get(candidate.name), "dtype": config.dtype,
               "shape": config.shape,
               "mode": config.mode, "params": config.params, "median_ms": None, "p20_ms": None, "p80_ms": None,
               "repeats": None, "input_copies": len(workload.inputs), "bytes_moved": workload.bytes_moved,
               "gb_per_s": None, "ceiling_gb_per_s": ceiling_bytes_per_s / 1e9 if ceiling_bytes_per_s else None,
               "fraction_of_ceiling": None, "images_per_s": None, "speedup": {}, "speedup_rounds": {},
               "speedup_p20": {}, "speedup_p80": {}, "speedup_round_median": {},
               "setup_seconds": candidate.setup_seconds, "flops": workload.flops, "tflop_per_s": None,
               "peak_tflop_per_s": peak_flops / 1e12 if peak_flops else None, "fraction_of_peak": None}
        if timing:
            row.update(median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms,
                       repeats=timing.repeats,
                       speedup={name: median / timing.median_ms for name, median in baseline_medians.items()})
            for name in baseline_medians:
                # the spread of the speedup: per-round ratios (the ratio of two medians has none of its own)
                ratios = round_ratios(round_medians[name], round_medians[candidate.name])
                if ratios:
                    row["speedup_rounds"][name] = ratios
                    row["speedup_p20"][name] = float(np.quantile(ratios, 0.2))
                    row["speedup_p80"][name] = float(np.quantile(ratios, 0.8))
                    row["speedup_round_median"][name] = float(np.median(ratios))
            if workload.images_per_call:
                row["images_per_s"] = workload.images_per_call / (timing.median_ms / 1e3)
            if workload.flops:
                row["tflop_per_s"] = workload.flops / (timing.median_ms / 1e3) / 1e12
                row["fraction_of_peak"] = row["tflop_per_s"] * 1e12 / peak_flops
            if workload.bytes_moved:
                bytes_per_s = workload.bytes_moved / (timing.median_ms / 1e3)
                row["gb_per_s"] = bytes_per_s / 1e9
                if ceiling_bytes_per_s:
                    row["fraction_of_ceiling"] = bytes_per_s / ceiling_bytes_per_s
        rows.append(row)
    return rows


def format_table(rows: list[dict], baseline_names: list[str]) -> str:
    first = rows[0]
    lines = [f"\n{first['case']} | {first['shape']} | {first['dtype']} | {first['mode']} "
             f"| {first['input_copies']} input copies"]
    width = max(13, 2 + max(len(row["impl"]) for row in rows))
    columns = {name: max(14, 4 + len(name)) for name in baseline_names}
    header = f"  {'impl':<{width}}{'median ms':>11}{'p20 ms':>10}{'p80 ms':>10}{'GB/s|TF':>9}{'%ceil':>7}{'img/s':>9}"
    header += "".join(f"{'vs ' + name:>{columns[name]}}" for name in baseline_names)
    lines.append(header)
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"  {row['impl']:<{width}}{row['status'].upper()}: {row['error'] or row['skip_reason']}")
            continue
        bandwidth = f"{row['gb_per_s']:9.2f}" if row["gb_per_s"] is not None else \
            f"{row['tflop_per_s']:6.1f}TF" if row["tflop_per_s"] is not None else f"{'-':>9}"
        fraction = row["fraction_of_ceiling"] or row["fraction_of_peak"]
        fraction = f"{100 * fraction:6.1f}%" if fraction else f"{'-':>7}"
        images = f"{row['images_per_s']:9.1f}" if row["images_per_s"] is not None else f"{'-':>9}"
        speedups = "".join(f"{row['speedup'][n]:{columns[n] - 1}.2f}x" if n in row["speedup"]
                           else f"{'-':>{columns[n]}}" for n in baseline_names)
        lines.append(f"  {row['impl']:<{width}}{row['median_ms']:11.3f}{row['p20_ms']:10.3f}{row['p80_ms']:10.3f}"
                     f"{bandwidth}{fraction}{images}{speedups}")
    return "\n".join(lines)


def run_cases(case_names: Iterable[str], *, device: str = "cpu", sizes: str = "full", dtypes: list[str] | None = None,
              repeats: int | None = None, out_path: str | None = None, threads: int | None = None,
              compile_baselines: bool = True, cpu_warmup_seconds: float = CPU_WARMUP_SECONDS,
              stream: TextIO | None = sys.stdout, match: str | None = None) -> list[dict]:
    """Measure the named cases; append their rows to ``out_path`` (JSON Lines) and return them.
    The table goes to ``stream``; None runs quietly. ``match``: a regular expression; only the
    measurement points whose shape contains a match are run."""
    case_names = list(case_names)
    unknown = [name for name in case_names if name not in CASES]
    if unknown:
        raise ValueError(f"unknown case(s) {unknown}; known: {sorted(CASES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA device is available")
    # the caller's count is given back, whatever the run set
    with torch_threads((threads or os.cpu_count() or 1) if device == "cpu" else None):
        return _run_cases(case_names, device, sizes, dtypes, repeats, out_path, compile_baselines, cpu_warmup_seconds,
                          stream, match)


def _run_cases(case_names, device, sizes, dtypes, repeats, out_path, compile_baselines, cpu_warmup_seconds, stream,
               match) -> list[dict]:
    repeats = repeats or DEFAULT_REPEATS[device]
    dtypes = [canonical_dtype_name(d) for d in dtypes] if dtypes else None
    out_path = out_path or default_out_path(device)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    ceiling = measured_copy_bandwidth(device)
    if stream:
        print(f"device: {environment_fields(device)['device_name']}, threads {torch.get_num_threads()}, "
              f"copy bandwidth {ceiling / 1e9:.1f} GB/s (the %ceil reference); rows -> {out_path}", file=stream)
    all_rows = []
    for case_name in case_names:
        case = CASES[case_name]
        configs = case.configs(device, sizes, dtypes)
        if match is not None:
            configs = [config for config in configs if re.search(match, config.shape)]
        if not configs and stream:
            print(f"\n{case_name}: no measurement point on {device} with dtype(s) {dtypes or 'default'}; it "
                  f"supports {', '.join(case.SUPPORTED_DTYPES)}", file=stream)
        for config in configs:
            workload = case.setup(config, device, compile_baselines=compile_baselines)
            rows = measure_workload(workload, device, repeats, ceiling, environment_fields(device), cpu_warmup_seconds)
            with open(out_path, "a") as out_file:
                for row in rows:
                    out_file.write(json.dumps(row, allow_nan=False) + "\n")
            if stream:
                print(format_table(rows, workload.baseline_names), file=stream, flush=True)
            all_rows.extend(rows)
            del workload  # free this workload's input copies before the next is built
    return all_rows


def list_cases(device: str, sizes: str, stream: TextIO | None = None) -> None:
    stream = stream or sys.stdout
    for name, case in CASES.items():
        configs = case.configs(device, sizes)
        print(f"{name}: {case.DESCRIPTION}", file=stream)
        print(f"  op {case.OP_NAME!r}; {len(configs)} measurement points on {device} with --sizes {sizes}, e.g.",
              file=stream)
        for config in configs[:3]:
            print(f"    {config.shape} | {config.dtype} | {config.mode}", file=stream)
    print("backends:", file=stream)
    for backend, facts in ops.backend_report().items():
        available = facts["devices"][device]
        state = "available" if available["available"] else f"unavailable ({available['reason']})"
        print(f"  {backend:<7} on {device}: {state}; ops: {', '.join(facts['ops']) or 'none'}", file=stream)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Time vpns_fast ops under each backend and against their baselines. "
                    "CASE is one of: list, all, " + ", ".join(CASES))
    parser.add_argument("cases", nargs="+", metavar="CASE", help="case names, or 'all', or 'list'")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", choices=("small", "full"), default="full",
                        help="small: a few layers and batch 2 (a smoke test); full: whole models, real batches")
    parser.add_argument("--dtype", nargs="+", dest="dtypes", metavar="DTYPE",
                        help="restrict to these dtypes (float32/fp32, bfloat16/bf16, uint8 ...)")
    parser.add_argument("--repeats", type=int, help=f"timed calls per implementation (default {DEFAULT_REPEATS})")
    parser.add_argument("--threads", type=int, help="CPU threads (default: all cores); recorded in each row")
    parser.add_argument("--out", help="JSON Lines file the rows are appended to "
                                      "(default bench/results/local-<device>.jsonl)")
    parser.add_argument("--match", metavar="REGEX", help="run only the measurement points whose shape matches, "
                        "e.g. 'end-to-end B=1 ' or 'resnet50'")
    parser.add_argument("--no-compile", dest="compile_baselines", action="store_false",
                        help="skip the torch.compile baselines (they take minutes to compile on a CPU)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cases == ["list"]:
        list_cases(args.device, args.sizes)
        return 0
    case_names = list(CASES) if args.cases == ["all"] else args.cases
    if "list" in case_names or "all" in case_names:
        build_parser().error("'list' and 'all' stand alone")
    unknown = [name for name in case_names if name not in CASES]
    if unknown:
        build_parser().error(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    rows = run_cases(case_names, device=args.device, sizes=args.sizes, dtypes=args.dtypes, repeats=args.repeats,
                     out_path=args.out, threads=args.threads, compile_baselines=args.compile_baselines,
                     match=args.match)
    failed = sorted({row["impl"] for row in rows if row["status"] == "error"})
    if failed:
        print(f"\nFAILED: {', '.join(failed)} raised instead of running (rows with status 'error')", file=sys.stderr)
        return 1
    return 0

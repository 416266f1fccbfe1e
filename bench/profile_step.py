"""Where a stage-1 step's time goes: torch.profiler over the `train_step` case's implementations.

    PYTHONPATH=. python -m bench.profile_step --out FOLDER [--match 'B=256 224px pad=16 channels_last']

The first GPU runs measured the library's stage-1 step 1.11-1.29x the time of a dense fine-tuning step
(ResNet-18, B=256) in every precision and layout (bench/results/GPU.md), 5-6 ms of unexplained time.
This profiles the same steps the case times (same setup factory, same inputs), each implementation
warmed up and then profiled for ``--steps`` steps, and writes per implementation:

* ``<impl>.txt``: the operators and kernels by device time (self), then by host time (self);
* a summary line per implementation on stdout and in ``summary.jsonl``: wall time per step, the device's
  busy time per step (the sum of kernel times) and the host time, so a host-bound step shows as wall
  time well above the device's busy time.

On a CPU (``--device cpu``, small sizes) it runs the same code with CPU activity only: a dry run.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench.cases import train_step
from bench.environment import git_state


def _profile(run, inputs, steps: int, device_type: str):
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == "cuda" else [])
    synchronize = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)
    synchronize()
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for i in range(steps):
            run(inputs[i % len(inputs)])
        synchronize()
    wall_ms = (time.perf_counter() - start) * 1e3 / steps
    return prof, wall_ms


def _device_busy_ms(prof, steps: int) -> float | None:
    """Sum of kernel (device) self times per step; None on a CPU run."""
    events = prof.key_averages()
    total_us = sum(getattr(e, "self_device_time_total", 0) or 0 for e in events)
    return total_us / 1e3 / steps if total_us else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="a folder (created) for the tables and summary.jsonl")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default="full")
    parser.add_argument("--dtype", nargs="*", default=None)
    parser.add_argument("--match", default="B=256 224px pad=16 channels_last")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rows", type=int, default=40, help="rows of each table")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    commit, dirty = git_state()
    configs = [c for c in train_step.configs(args.device, args.sizes, args.dtype) if re.search(args.match, c.shape)]
    if not configs:
        parser.error(f"--match {args.match!r} selects no train_step point on {args.device} ({args.sizes})")
    for config in configs:
        workload = train_step.setup(config, args.device)
        for candidate in workload.candidates:
            if candidate.run is None:
                continue
            for i in range(args.warmup):
                candidate.run(workload.inputs[i % len(workload.inputs)])
            prof, wall_ms = _profile(candidate.run, workload.inputs, args.steps, args.device)
            busy_ms = _device_busy_ms(prof, args.steps)
            events = prof.key_averages()
            name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{config.shape}_{config.dtype}_{candidate.name}")
            with open(os.path.join(args.out, f"{name}.txt"), "w") as f:
                if args.device == "cuda":
                    f.write(events.table(sort_by="self_device_time_total", row_limit=args.rows) + "\n")
                f.write(events.table(sort_by="self_cpu_time_total", row_limit=args.rows) + "\n")
            row = {"case": "profile_step", "shape": config.shape, "dtype": config.dtype, "impl": candidate.name,
                   "steps": args.steps, "wall_ms_per_step": wall_ms, "device_busy_ms_per_step": busy_ms,
                   "device": args.device, "device_name": torch.cuda.get_device_name() if args.device == "cuda"
                   else "cpu", "torch": torch.__version__, "git_commit": commit, "git_dirty": dirty}
            busy = "-" if busy_ms is None else f"{busy_ms:.2f}"
            print(f"{config.shape} {config.dtype} {candidate.name:10} wall {wall_ms:8.2f} ms/step, "
                  f"device busy {busy} ms/step -> {name}.txt", flush=True)
            with open(os.path.join(args.out, "summary.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

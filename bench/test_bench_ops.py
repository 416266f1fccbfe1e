"""pytest-benchmark runs of the same cases, through the same setup factories as ``python -m bench``.

    .venv/bin/python -m pytest bench --benchmark-enable                 # small sizes, quick
    VPNS_BENCH_SIZES=full .venv/bin/python -m pytest bench --benchmark-enable

Environment: VPNS_BENCH_SIZES (small|full, default small), VPNS_BENCH_DEVICE (cpu|cuda, default
cuda when available), VPNS_BENCH_COMPILE=0 to skip the torch.compile baselines.
Each test checks its implementation against the case's reference baseline before timing it.
"""
from __future__ import annotations

import itertools
import os

import pytest
import torch

from bench.cases import CASES
from bench.environment import environment_fields
from vpns_fast import ops

SIZES = os.environ.get("VPNS_BENCH_SIZES", "small")
DEVICE = os.environ.get("VPNS_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
COMPILE_BASELINES = os.environ.get("VPNS_BENCH_COMPILE", "1") != "0"


def _points():
    for case in CASES.values():
        for config in case.configs(DEVICE, SIZES):
            for impl in (*case.BASELINE_NAMES, *ops.BACKEND_NAMES, *getattr(case, "EXTRA_IMPLS", ())):
                test_id = f"{case.NAME}-{config.shape}-{config.dtype}-{config.mode}-{impl}"
                yield pytest.param(case.NAME, config, impl, id=test_id.replace(" ", "_"))


# Consecutive tests share a config (one per implementation): keep the last workload so its
# inputs are built, and its compiled baseline compiled, once per config rather than per test.
_last_workload = {}


def _workload_for(case_name, config):
    key = (case_name, config.shape, config.dtype, config.mode)
    if key not in _last_workload:
        _last_workload.clear()
        _last_workload[key] = CASES[case_name].setup(config, DEVICE, compile_baselines=COMPILE_BASELINES)
    return _last_workload[key]


@pytest.mark.parametrize("case_name, config, impl", list(_points()))
def test_op_speed(benchmark, case_name, config, impl):
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("VPNS_BENCH_DEVICE=cuda but no CUDA device is available")
    workload = _workload_for(case_name, config)
    names = [candidate.name for candidate in workload.candidates]
    if impl not in names:
        pytest.skip(f"{impl} is not an implementation of this {case_name} config")
    candidate = workload.candidate(impl)
    if candidate.run is None:
        pytest.skip(candidate.skip_reason)
    reference = workload.candidate(workload.baseline_names[0])
    # (train_step mutates its state at every call: its compare only checks the loss, its
    # equivalence with the release step was verified in setup, from a common state.)
    workload.compare(candidate.run(workload.inputs[0]), reference.run(workload.inputs[0]), impl)

    inputs, call_index = workload.inputs, itertools.count()

    def one_call():
        candidate.run(inputs[next(call_index) % len(inputs)])
        if DEVICE == "cuda":
            torch.cuda.synchronize()  # pytest-benchmark reads a host clock

    benchmark.extra_info.update(environment_fields(DEVICE), case=case_name, impl=impl, shape=config.shape,
                                dtype=config.dtype, mode=config.mode, bytes_moved=workload.bytes_moved,
                                images_per_call=workload.images_per_call, input_copies=len(inputs))
    benchmark(one_call)

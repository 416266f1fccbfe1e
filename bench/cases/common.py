"""What a case's setup factory returns, and how backends become benchmark candidates."""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from vpns_fast import ops
from vpns_fast.errors import exception_reason
from vpns_fast.ops.backends import BackendError

DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16",
                 "half": "float16", "u8": "uint8"}


def canonical_dtype_name(name: str) -> str:
    return DTYPE_ALIASES.get(name, name)


class VerificationError(AssertionError):
    """An implementation's output differs from the baseline's: its timing would be meaningless."""


@dataclass
class Candidate:
    """One implementation timed in a workload: a backend of the op, or a baseline."""
    name: str
    kind: str  # "backend" or "baseline"
    run: Callable[[Any], Any] | None  # takes one input copy, returns what `compare` checks
    skip_reason: str | None = None
    # Seconds spent before timing that the timing excludes (torch.compile), when it matters.
    setup_seconds: float | None = None


@dataclass
class Config:
    """One measurement point of a case: a shape, a dtype, a mode."""
    case: str
    shape: str
    dtype: str
    mode: str
    params: dict


@dataclass
class Workload:
    config: Config
    inputs: list  # independent copies of the input, rotated by the timing loop
    candidates: list[Candidate]
    baseline_names: list[str]  # the first is the reference outputs are checked against
    compare: Callable[[Any, Any, str], None]  # raises VerificationError
    bytes_moved: int | None = None  # minimal bytes read + written by one call
    images_per_call: int | None = None  # images one call processes (a training step's batch)
    flops: int | None = None  # floating-point operations of one call (compute-bound ops)
    notes: dict = field(default_factory=dict)

    def candidate(self, name: str) -> Candidate:
        for candidate in self.candidates:
            if candidate.name == name:
                return candidate
        raise KeyError(f"{self.config.case} has no implementation {name!r}; "
                       f"it has {[c.name for c in self.candidates]}")


def backend_skip_reason(op_name: str, backend: str, device_type: str) -> str | None:
    """Why ``backend`` cannot be timed for ``op_name`` on ``device_type``, or None when it can."""
    if backend == "triton" and device_type == "cpu":
        # Under TRITON_INTERPRET=1 (the test suite sets it) triton "runs" on the CPU through a
        # Python interpreter: a correctness tool whose timing means nothing.
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            return "triton on CPU runs through the interpreter (TRITON_INTERPRET=1); not timed"
    try:
        with ops.use_backend(backend):
            ops.resolve(op_name, device_type)
    except BackendError as exc:
        return str(exc)
    return None


def no_grad(fn: Callable) -> Callable:
    """``fn`` called under ``torch.no_grad()`` (inference candidates)."""
    def run(x):
        with torch.no_grad():
            return fn(x)
    return run


def backend_candidates(op_name: str, device_type: str, make_run: Callable[[str], Callable]) -> list[Candidate]:
    """A candidate per backend; those that cannot serve the op carry their skip reason."""
    candidates = []
    for backend in ops.BACKEND_NAMES:
        reason = backend_skip_reason(op_name, backend, device_type)
        candidates.append(Candidate(backend, "backend", None if reason else make_run(backend), reason))
    return candidates


def compiled_candidate(compile_baselines: bool, fn: Callable, make_run: Callable[[Callable], Callable],
                       first_input, **compile_options) -> Candidate:
    """Baseline ``compiled``: ``torch.compile(fn, fullgraph=True, **compile_options)``, wrapped by
    ``make_run`` into a timed call, compiled (forward, and backward where the run has one) on
    ``first_input`` before any timing; the compile time becomes ``setup_seconds``. A failed
    compile is a skipped candidate with the error, never hidden."""
    if not compile_baselines:
        return Candidate("compiled", "baseline", None, "torch.compile disabled (--no-compile)")
    # Dynamo caches compiled code per code object with a recompile limit (8): every workload would
    # recompile the same function and soon fall back to eager silently. A reset gives each
    # workload its own compilation; `fullgraph` turns any graph break into an error.
    torch._dynamo.reset()
    run = make_run(torch.compile(fn, dynamic=False, fullgraph=True, **compile_options))
    start = time.perf_counter()
    try:
        run(first_input)
        run(first_input)
    except Exception as exc:  # no C compiler, inductor bug, ...: record it, do not hide it
        return Candidate("compiled", "baseline", None, f"torch.compile failed: {exception_reason(exc, 300)}")
    return Candidate("compiled", "baseline", run, setup_seconds=time.perf_counter() - start)

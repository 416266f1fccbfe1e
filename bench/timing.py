"""Timing loops: perf_counter on the CPU, CUDA events with an L2 flush on the GPU.

Both loops call ``run(inputs[i % len(inputs)])``, rotating among input copies so that an input
smaller than the last-level cache is not timed cache-hot (the CPU has no cheap cache flush);
on CUDA the L2 is flushed before every call instead, as ``triton.testing.do_bench`` does.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bench.environment import last_level_cache_bytes

# Rotating through this many bytes of copies evicts the last-level cache between reuses.
CACHE_EVICTION_FACTOR = 2
MAX_INPUT_COPIES = 32
# CUDA: H100 L2 is 50 MB, H200 the same; 256 MB is what triton's do_bench writes.
CUDA_FLUSH_BYTES = 256 * 1024 ** 2
CPU_WARMUP_SECONDS = 0.05
CPU_MAX_WARMUP_CALLS = 20
CUDA_WARMUP_CALLS = 10


@dataclass
class Timing:
    times_ms: list[float]

    @property
    def median_ms(self) -> float:
        return float(np.median(self.times_ms))

    @property
    def p20_ms(self) -> float:
        return float(np.quantile(self.times_ms, 0.2))

    @property
    def p80_ms(self) -> float:
        return float(np.quantile(self.times_ms, 0.8))

    @property
    def repeats(self) -> int:
        return len(self.times_ms)


SMOKE_TEST_INPUT_COPIES = 2


def input_copy_count(device_type: str, bytes_per_copy: int, sizes: str = "full") -> int:
    """How many independent input copies to rotate through on ``device_type``."""
    if device_type != "cpu" or bytes_per_copy <= 0:
        return 1  # CUDA flushes L2 before each call instead
    if sizes == "small":
        return SMOKE_TEST_INPUT_COPIES  # `--sizes small` checks the harness, its numbers are cache-hot anyway
    needed = math.ceil(CACHE_EVICTION_FACTOR * last_level_cache_bytes() / bytes_per_copy)
    return max(1, min(MAX_INPUT_COPIES, needed))


def time_calls(run: Callable[[Any], Any], inputs: Sequence[Any], repeats: int, device_type: str,
               cpu_warmup_seconds: float = CPU_WARMUP_SECONDS) -> Timing:
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if device_type == "cuda":
        return _time_cuda(run, inputs, repeats)
    return _time_cpu(run, inputs, repeats, cpu_warmup_seconds)


def rotating_times_ms(runs: dict[str, Callable[[], Any]], rounds: int,
                      prepare: Callable[[str], Any] | None = None) -> dict[str, list[float]]:
    """Each run's time in ms, one call a round, the runs taking turns in an order that rotates round by round (so
    none always follows the same one); ``prepare(name)``, untimed, before each call. For the one-process A/B
    scripts (``bench.winograd_ab``, ``bench.prefetch_ab``); ratios round by round with ``runner.round_ratios``."""
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            if prepare is not None:
                prepare(name)
            start = time.perf_counter()
            runs[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def _time_cpu(run, inputs, repeats, warmup_seconds) -> Timing:
    call = 0
    warm_start = time.perf_counter()
    while True:  # at least one call; keep warming for a short while when calls are fast
        run(inputs[call % len(inputs)])
        call += 1
        if time.perf_counter() - warm_start >= warmup_seconds or call >= CPU_MAX_WARMUP_CALLS:
            break
    times_ms = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(inputs[call % len(inputs)])
        times_ms.append((time.perf_counter() - start) * 1e3)
        call += 1
    return Timing(times_ms)


def _time_cuda(run, inputs, repeats) -> Timing:
    flush_buffer = torch.empty(CUDA_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    for call in range(CUDA_WARMUP_CALLS):
        run(inputs[call % len(inputs)])
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for call in range(repeats):
        flush_buffer.zero_()
        starts[call].record()
        run(inputs[call % len(inputs)])
        ends[call].record()
    torch.cuda.synchronize()
    return Timing([start.elapsed_time(end) for start, end in zip(starts, ends)])


def measured_copy_bandwidth(device_type: str) -> float:
    """Bytes/s of a large ``copy_`` (read + write) on this device: the practical memory ceiling
    that memory-bound ops are compared against (a measurement, not the datasheet peak)."""
    nbytes = 256 * 1024 ** 2 if device_type == "cuda" else 4 * last_level_cache_bytes()
    source = torch.full((nbytes // 4,), 0.5, device=device_type)  # a copy's speed ignores the values
    destination = torch.empty_like(source)
    timing = time_calls(lambda _: destination.copy_(source), [None], repeats=5, device_type=device_type,
                        cpu_warmup_seconds=0.0)
    return 2 * nbytes / (timing.median_ms / 1e3)


_MATMUL_PEAKS: dict = {}


@contextlib.contextmanager
def _matmul_tf32(enabled: bool):
    """CUDA matmuls in TF32 (or IEEE fp32) for the duration, through the fp32_precision API where
    torch has it (mixing it with the legacy allow_tf32 flags makes torch's legacy getters raise)."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        previous = matmul.fp32_precision
        matmul.fp32_precision = "tf32" if enabled else "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = previous
    else:
        previous = matmul.allow_tf32
        matmul.allow_tf32 = enabled
        try:
            yield
        finally:
            matmul.allow_tf32 = previous


def measured_matmul_peak(device_type: str, dtype_name: str) -> float:
    """FLOP/s of a large dense matmul in ``dtype_name`` on this device, measured once per run:
    the practical compute ceiling that compute-bound ops (convolutions) are compared against.
    float32 follows the convolutions' TF32 setting (``conv_allows_tf32``)."""
    # Convolutions use TF32 when cuDNN may (default on) while matmuls default to IEEE fp32: the
    # float32 peak is measured under the convolutions' setting, else conv rows could exceed 100%.
    from vpns_fast.kernels.masked_conv import conv_allows_tf32

    tf32 = conv_allows_tf32()
    key = (device_type, dtype_name, tf32)
    if key not in _MATMUL_PEAKS:
        size = 8192 if device_type == "cuda" else 1024
        dtype = getattr(torch, dtype_name)
        a = torch.randn(size, size, device=device_type).to(dtype)
        b = torch.randn(size, size, device=device_type).to(dtype)
        with _matmul_tf32(tf32):
            timing = time_calls(lambda _: a @ b, [None], repeats=10, device_type=device_type,
                                cpu_warmup_seconds=0.0)
        _MATMUL_PEAKS[key] = 2 * size ** 3 / (timing.median_ms / 1e3)
    return _MATMUL_PEAKS[key]

"""Facts recorded beside every measurement: device, versions, date, commit, threads."""
from __future__ import annotations

import datetime
import functools
import os
import platform
import subprocess
import time

import torch

from vpns_fast.environment import cpu_model_name

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_vector_extensions() -> list[str]:
    """AVX2 / AVX-512 presence: CPU kernels' speed depends on it more than on the model name."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [f for f in ("avx2", "fma", "avx512f", "avx512bw", "amx_tile") if f in flags]
    except OSError:
        pass
    return []


def device_name(device_type: str) -> str:
    if device_type == "cuda":
        return torch.cuda.get_device_name()
    extensions = "+".join(cpu_vector_extensions()) or "no AVX2"
    return f"{cpu_model_name()} ({os.cpu_count()} cores, {extensions})"


def last_level_cache_bytes() -> int:
    """Size of the CPU's largest cache (from sysfs); 32 MiB when it cannot be read."""
    largest = 0
    cache_dir = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(cache_dir):
            if not entry.startswith("index"):
                continue
            with open(os.path.join(cache_dir, entry, "size")) as size_file:
                text = size_file.read().strip()
            multiplier = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}.get(text[-1:], 1)
            largest = max(largest, int(text.rstrip("KMG")) * multiplier)
    except (OSError, ValueError):
        pass
    return largest or 32 * 1024 ** 2


@functools.cache
def git_state() -> tuple[str | None, bool | None]:
    """(commit, whether the working tree differs from it); (None, None) outside a checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=10, check=True).stdout
        return commit, bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        return None, None


def triton_version() -> str | None:
    try:
        import triton
    except Exception:  # not installed, or a broken install: the row says so with null
        return None
    return triton.__version__


# Environment variables that change timings without changing the code: thread pools, the
# allocator (glibc's mmap threshold moved a batch-32 conv between 39.5 and 75 ms, see
# vpns_fast.deploy.sparse_cpu.compare_layer_times), a preloaded allocator, and this project's knobs.
TIMING_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MALLOC_MMAP_THRESHOLD_",
              "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX", "LD_PRELOAD", "TRITON_INTERPRET",
              "VPNS_FAST_IGEMM_AUTOTUNE", "VPNS_FAST_CONV_AUTOTUNE", "VPNS_FAST_CONV_TABLE")


def core_round_trip_ns() -> float | None:
    """The cache-line round trip between the first two CPUs the calling thread may run on
    (``sparse_cpu.core_round_trip_ns``, the smaller of two measurements), or None where it cannot be measured (one
    CPU, not Linux, no C++ extension, pinning refused). Why: a 2-vCPU virtual machine ran the sparse engine at batch 1
    1.22-1.35x slower (1.39-1.45x before private planes) while its host kept the two vCPUs on cores that do not share
    an L3 (310-360 ns here, against 50-110 ns), and moves them every few seconds to minutes; a row says which it was
    when its measurement began. bench/placement.py groups the A/B scripts' rounds by it."""
    from vpns_fast.deploy import sparse_cpu

    if not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2 or not sparse_cpu.available()[0]:
        return None
    time.sleep(0.02)  # OpenMP's threads stop spinning after the last parallel region first
    try:
        return round(min(sparse_cpu.core_round_trip_ns(20000) for _ in range(2)), 1)
    except RuntimeError:  # e.g. pinning refused
        return None


def environment_fields(device_type: str) -> dict:
    commit, dirty = git_state()
    return {
        "device_type": device_type,
        "device_name": device_name(device_type),
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "triton_version": triton_version(),
        "python_version": platform.python_version(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "git_dirty": dirty,
        # Other processes on a small CPU machine skew timings; the row says how busy it was.
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "core_round_trip_ns": core_round_trip_ns() if device_type == "cpu" else None,
        "timing_env": {name: os.environ[name] for name in TIMING_ENV if name in os.environ},
    }

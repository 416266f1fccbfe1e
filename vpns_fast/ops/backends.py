"""Backend registry: which implementation of an op runs for a given call.

Three backends share one op namespace:

* ``torch``  - the plain-PyTorch references (``vpns_fast.kernels.*_ref``); always present.
* ``triton`` - Triton kernels; runs on CUDA tensors, or on CPU tensors when the Triton
  interpreter is on (``TRITON_INTERPRET=1`` set before triton is imported).
* ``cpp``    - C++ CPU kernels from ``csrc/`` (the ``vpns_fast._C`` extension).

Selection per call: a forced backend (``use_backend(name)`` context, else the
``VPNS_FAST_BACKEND`` environment variable) or, when none is forced, the first backend of the
device's preference list that is available and implements the op. Forcing a backend that is
unavailable or lacks the op raises :class:`BackendError`; there is never a silent fallback.
"""
from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

BACKEND_NAMES = ("torch", "triton", "cpp")
ENV_VAR = "VPNS_FAST_BACKEND"

# Automatic choice, best first. Interpreted Triton on the CPU is a correctness tool, never
# picked automatically.
PREFERENCE = {"cuda": ("triton", "torch"), "cpu": ("cpp", "torch")}


class BackendError(RuntimeError):
    """A backend was asked for that cannot serve the call."""


@dataclass
class Backend:
    name: str
    # device type -> (available, reason when not). Evaluated lazily and cached per device type.
    probe: Callable[[str], tuple[bool, str]]
    ops: dict[str, Callable] = field(default_factory=dict)
    _cache: dict[str, tuple[bool, str]] = field(default_factory=dict)

    def availability(self, device_type: str) -> tuple[bool, str]:
        if device_type not in self._cache:
            self._cache[device_type] = self.probe(device_type)
        return self._cache[device_type]


def _probe_torch(device_type: str) -> tuple[bool, str]:
    if device_type == "cuda":  # `vpns info` said "cuda available" beside cuda_available False (an outside review)
        import torch

        return (True, "") if torch.cuda.is_available() else (False, "no CUDA device is available")
    return True, ""


def _probe_triton(device_type: str) -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return False, f"triton is not importable ({exc.__class__.__name__}: {exc})"
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device_type == "cuda":
        if interpreted:
            return False, "TRITON_INTERPRET=1 is set, so triton cannot compile for CUDA"
        import torch

        if not torch.cuda.is_available():
            return False, "no CUDA device is available"
        return True, ""
    if device_type == "cpu":
        if interpreted:
            return True, ""
        return False, "triton runs on CPU tensors only under TRITON_INTERPRET=1 (set before importing triton)"
    return False, f"triton does not support device type {device_type!r}"


def _probe_cpp(device_type: str) -> tuple[bool, str]:
    if device_type != "cpu":
        return False, f"the cpp backend runs on CPU tensors only, not {device_type!r}"
    from vpns_fast import _extension

    return _extension.status()


_BACKENDS: dict[str, Backend] = {
    "torch": Backend("torch", _probe_torch),
    "triton": Backend("triton", _probe_triton),
    "cpp": Backend("cpp", _probe_cpp),
}

_local = threading.local()


def register(backend: str, op_name: str, fn: Callable) -> None:
    """Make ``fn`` the ``backend`` implementation of ``op_name``."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
    _BACKENDS[backend].ops[op_name] = fn


def _check_name(name: str, source: str) -> str:
    if name not in _BACKENDS:
        raise BackendError(f"unknown backend {name!r} from {source}; expected one of {', '.join(BACKEND_NAMES)}")
    return name


def forced_backend() -> str | None:
    """The backend forced by ``use_backend`` (innermost) or ``VPNS_FAST_BACKEND``, else None."""
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]  # None when the innermost block said "auto"
    env = os.environ.get(ENV_VAR, "").strip()
    if env and env != "auto":
        return _check_name(env, f"the environment variable {ENV_VAR}")
    return None


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force every op call inside the block onto backend ``name`` (``"auto"`` lifts forcing)."""
    if name != "auto":
        _check_name(name, "use_backend()")
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(name if name != "auto" else None)
    try:
        yield
    finally:
        stack.pop()


def resolve(op_name: str, device_type: str) -> tuple[str, Callable]:
    """The (backend name, implementation) that serves ``op_name`` on ``device_type``."""
    forced = forced_backend()
    if forced is not None:
        backend = _BACKENDS[forced]
        ok, reason = backend.availability(device_type)
        if not ok:
            raise BackendError(f"backend {forced!r} was forced for {op_name!r} but is unavailable for "
                               f"{device_type} tensors: {reason}")
        if op_name not in backend.ops:
            have = ", ".join(sorted(backend.ops)) or "none"
            raise BackendError(f"backend {forced!r} was forced but does not implement {op_name!r} (it has: {have})")
        return forced, backend.ops[op_name]
    for name in PREFERENCE.get(device_type, ("torch",)):
        backend = _BACKENDS[name]
        if op_name in backend.ops and backend.availability(device_type)[0]:
            return name, backend.ops[op_name]
    raise BackendError(f"no backend implements {op_name!r} for {device_type} tensors")


def backend_op(backend: str, op_name: str) -> Callable | None:
    """``op_name`` of ``backend`` when it registered one (an optional companion of an op that
    :func:`resolve` chose this backend for), else None."""
    return _BACKENDS[backend].ops.get(op_name)


def dispatch(op_name: str, device_type: str, *args: Any, **kwargs: Any) -> Any:
    """Call the implementation :func:`resolve` picks with ``args`` and ``kwargs``."""
    return resolve(op_name, device_type)[1](*args, **kwargs)


def backend_report() -> dict[str, dict]:
    """For each backend: ops, and per device type whether it is available and why not."""
    report = {}
    for name, backend in _BACKENDS.items():
        report[name] = {
            "ops": sorted(backend.ops),
            "devices": {dev: dict(zip(("available", "reason"), backend.availability(dev))) for dev in ("cpu", "cuda")},
        }
    return report

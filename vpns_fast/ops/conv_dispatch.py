"""Measured dispatch of ``masked_conv2d`` on the triton backend: per call shape, the faster of
the Triton implicit-GEMM masked conv (``kernels/masked_conv.py``, ``igemm``) and the fused mask
kernel + cuDNN (``cudnn``).

Public Triton implicit-GEMM convs reach 0.2x to 1.2x cuDNN depending on shape and dtype
(FlagGems' published figures), so neither can be chosen by rule. The choice comes from a table
of measured times, kept on disk and reused across runs:

* key: the device name and the torch / triton versions (a section each), then the call's shape:
  input shape, weight shape, score shape, stride, padding, dilation, groups, dtype, layout,
  bias, and ``train`` (forward + backward timed) or ``infer`` (forward only);
* value: the chosen implementation and each candidate's median milliseconds.

A shape without an entry runs ``cudnn`` (what the backend did before the table existed), unless
``VPNS_FAST_CONV_AUTOTUNE=1``, which measures it on first use and records it. ``vpns tune``
(:func:`tune`) fills the table for a model ahead of training. The table lives at
``$VPNS_FAST_CONV_TABLE``, else ``~/.cache/vpns_fast/conv_dispatch.json``; it is written
atomically under a file lock (concurrent processes merge their entries) and a damaged file is
reported and ignored, never silently overwritten. A tune off the GPU (interpreter timings) writes only
to a table named by ``--table`` or ``$VPNS_FAST_CONV_TABLE``, never to the per-user default.
"""
from __future__ import annotations

import functools
import json
import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

from vpns_fast.kernels._common import as_pair, is_channels_last
from vpns_fast.kernels.masked_conv import conv_allows_tf32

TABLE_FORMAT = "vpns_fast.conv_dispatch"
TABLE_VERSION = 1
CANDIDATES = ("igemm", "cudnn")
DEFAULT_CHOICE = "cudnn"


class ConvDispatchTableWarning(UserWarning):
    """The conv dispatch table could not be read (every shape then runs the default) or saved (the choices last
    for this process only)."""


class DispatchTableError(ValueError):
    """A dispatch table file that cannot be read (damaged, or another format or version)."""


def chosen_table_path() -> str | None:
    """The table the user named with $VPNS_FAST_CONV_TABLE, else None (the per-user default applies)."""
    return os.environ.get("VPNS_FAST_CONV_TABLE") or None


def default_table_path() -> str:
    return chosen_table_path() or _per_user_table_path(os.environ.get("HOME"))


@functools.lru_cache(maxsize=8)  # the table is looked up per conv call: expanduser alone took 3 us of 11
def _per_user_table_path(home: str | None) -> str:
    return os.path.join(home or os.path.expanduser("~"), ".cache", "vpns_fast", "conv_dispatch.json")


def autotune_enabled() -> bool:
    return os.environ.get("VPNS_FAST_CONV_AUTOTUNE", "0") == "1"


@functools.cache
def device_section(device: torch.device) -> str:
    """The table section of ``device``: its name and the versions that decide kernel speed."""
    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return (f"{name} | torch {torch.__version__} | triton {triton.__version__} | "
            f"cudnn {torch.backends.cudnn.version()}")


# A conv stride / padding / dilation as nn.Conv2d holds it (padding may be a string such as "same").
ConvArg = int | tuple | list | str

GRADS = {"search": (True, False, True), "finetune": (True, True, False), "infer": (False, False, False)}


def needed_grads(x: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor) -> tuple[bool, bool, bool]:
    """Which of (x, weight, scores) this call differentiates: stage 1 trains scores, stage 2
    weights, and the timed backward differs accordingly."""
    if not torch.is_grad_enabled():
        return (False, False, False)
    return (bool(x.requires_grad), bool(weight.requires_grad), bool(scores.requires_grad))


def call_key(x: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor, bias: torch.Tensor | None,
             stride: ConvArg, padding: ConvArg, dilation: ConvArg, groups: int, grads: tuple[bool, bool, bool]) -> str:
    """The shape part of a table key: everything the relative speed of the candidates depends on
    (shapes, dtypes, autocast, layout, TF32 for float32, the gradients computed)."""
    # Not the legacy torch.backends.cudnn.allow_tf32: it raises once conv precision was set through
    # the new torch.backends.cudnn.conv.fp32_precision API (conv and RNN flags then differ).
    tf32 = x.dtype == torch.float32 and conv_allows_tf32()
    return _format_key(tuple(x.shape), tuple(weight.shape), tuple(scores.shape), as_pair(stride), as_pair(padding),
                       as_pair(dilation), groups, x.dtype, weight.dtype, scores.dtype, _autocast_dtype(x.device),
                       is_channels_last(x), tf32, bias is not None, tuple(grads))


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


@functools.lru_cache(maxsize=4096)  # called per layer and forward: format each shape once
def _format_key(x, w, s, stride, padding, dilation, groups, x_dtype, w_dtype, s_dtype, autocast, channels_last,
                tf32, bias, grads) -> str:
    return json.dumps({"x": list(x), "w": list(w), "s": list(s), "stride": list(stride), "padding": list(padding),
                       "dilation": list(dilation), "groups": groups, "dtype": _dtype_name(x_dtype),
                       "weight_dtype": _dtype_name(w_dtype), "scores_dtype": _dtype_name(s_dtype),
                       "autocast": _dtype_name(autocast), "layout": "channels_last" if channels_last else "nchw",
                       "tf32": tf32, "bias": bias, "grads": dict(zip(("x", "weight", "scores"), grads)),
                       "mode": "train" if any(grads) else "infer"}, sort_keys=True)


class DispatchTable:
    """The on-disk table: ``{section: {call key: {"choice": name, "ms": {name: median}}}}``."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = os.fspath(path) if path is not None else default_table_path()
        self.sections: dict[str, dict[str, dict]] = {}
        self.load_error: str | None = None
        if os.path.exists(self.path):
            try:
                self.sections = self._read(self.path)
            except DispatchTableError as error:
                # Kept on disk as it is (save() refuses to replace it); every shape runs cudnn.
                self.load_error = str(error)
                warnings.warn(f"{error}; conv dispatch falls back to {DEFAULT_CHOICE!r} for every shape",
                              ConvDispatchTableWarning, stacklevel=2)

    @staticmethod
    def _read(path: str) -> dict:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DispatchTableError(f"conv dispatch table {path} is unreadable: {error}") from None
        if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
            raise DispatchTableError(f"{path} is not a vpns_fast conv dispatch table")
        if data.get("version") != TABLE_VERSION:
            raise DispatchTableError(f"conv dispatch table {path} has version {data.get('version')!r}; this "
                                     f"vpns_fast reads version {TABLE_VERSION} (run `vpns tune` with "
                                     f"--table elsewhere, or delete the file)")
        sections = data.get("sections")
        if not isinstance(sections, dict) or not all(
                isinstance(entries, dict) and all(isinstance(e, dict) and e.get("choice") in CANDIDATES
                                                  for e in entries.values())
                for entries in sections.values()):
            raise DispatchTableError(f"conv dispatch table {path} is damaged (bad 'sections')")
        return sections

    def lookup(self, section: str, key: str) -> str | None:
        entry = self.sections.get(section, {}).get(key)
        return None if entry is None else entry["choice"]

    def record(self, section: str, key: str, times_ms: dict[str, float]) -> str:
        """Store measured medians (``inf`` for a candidate that cannot run); returns the choice."""
        finite = {name: ms for name, ms in times_ms.items() if ms == ms and ms != float("inf")}
        if not finite:
            raise ValueError(f"no candidate ran for {key}")
        choice = min(finite, key=lambda name: (finite[name], name != DEFAULT_CHOICE))  # ties: cudnn
        self.sections.setdefault(section, {})[key] = {"choice": choice, "ms": finite}
        return choice

    def save(self) -> None:
        """Write atomically, merging the entries other processes saved meanwhile. The read-merge-
        write holds a lock on ``<path>.lock``, so processes autotuning at once keep each other's
        entries."""
        from vpns_fast.files import atomic_write, file_lock

        if self.load_error is not None:
            raise DispatchTableError(f"not replacing {self.path}: {self.load_error}. Move or delete it first.")
        with file_lock(self.path):
            sections = {}
            if os.path.exists(self.path):
                sections = self._read(self.path)
            for section, entries in self.sections.items():
                sections.setdefault(section, {}).update(entries)
            payload = {"format": TABLE_FORMAT, "version": TABLE_VERSION, "sections": sections}
            text = json.dumps(payload, indent=1, sort_keys=True).encode()
            atomic_write(self.path, lambda f: f.write(text), overwrite=True)


_TABLES: dict[str, DispatchTable] = {}


def table(path: str | None = None) -> DispatchTable:
    """The process-wide table for ``path`` (default :func:`default_table_path`), read once."""
    path = path or default_table_path()
    if path not in _TABLES:
        _TABLES[path] = DispatchTable(path)
    return _TABLES[path]


# --------------------------------------------------------------------------- measuring

def _cuda_timer(fn: Callable[[], None]) -> float:
    """Median milliseconds of ``fn`` on the current CUDA stream (triton's do_bench: warm-up,
    L2 flush between runs, CUDA events)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))


def _wall_timer(fn: Callable[[], None], repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


@functools.lru_cache(maxsize=1)
def candidates() -> dict[str, Callable]:
    """Name -> ``fn(x, weight, scores, threshold, bias, stride, padding, dilation, groups)``."""
    from vpns_fast.kernels.masked import masked_conv2d_fused_mask_cudnn

    found = {"cudnn": masked_conv2d_fused_mask_cudnn}
    try:
        from vpns_fast.kernels.masked_conv import masked_conv2d_igemm
    except ImportError:  # pragma: no cover - the kernel file ships with the package
        return found

    def igemm(x, weight, scores, threshold, bias, stride, padding, dilation, groups):
        # The Triton op is not autocast-aware and wants x and weight in one dtype. Under autocast
        # x is cast as autocast casts F.conv2d's operands; a weight in another dtype (fp32 master
        # weights) is refused: its STE would see the cast weight (grad_s = g * bf16(w)) where the
        # cuDNN path uses g * w, and switching implementations must not change the gradients.
        dtype = _autocast_dtype(x.device)
        if dtype is not None:
            if weight.dtype != dtype:
                raise TypeError(f"igemm under {dtype} autocast needs {dtype} weights, got {weight.dtype}")
            x = x.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            return masked_conv2d_igemm(x, weight, scores, threshold, bias, stride, padding, dilation, groups)

    found["igemm"] = igemm
    return found


def measure(x: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor, threshold: Any, bias: torch.Tensor | None,
            stride: ConvArg, padding: ConvArg, dilation: ConvArg, groups: int, grads: tuple[bool, bool, bool],
            timer: Callable[[Callable[[], None]], float] | None = None, premasked: bool = True) -> dict[str, float]:
    """Median ms of each candidate on this call: the forward, plus the backward to those of (x,
    weight, scores) that ``grads`` names, under the autocast state of the caller; ``inf`` for a
    candidate that refuses the call (e.g. groups != 1).

    ``premasked``: the cuDNN candidate is timed as ``F.conv2d`` on an already masked weight, as it
    runs when model-level mask batching computed every layer's weight in one launch (the default
    outside torch.distributed); the implicit-GEMM candidate masks inside, so it pays its masking."""
    timer = timer or (_cuda_timer if x.device.type == "cuda" else _wall_timer)
    autocast = _autocast_dtype(x.device)
    training = any(grads)
    x = x.detach().requires_grad_(grads[0])
    params = [weight.detach().requires_grad_(grads[1]), scores.detach().requires_grad_(grads[2])]
    bias = None if bias is None else bias.detach()
    leaves = [t for t in (x, *params) if t.requires_grad]
    runs = dict(candidates())
    if premasked:
        from vpns_fast.kernels.masked import masked_weight_ref

        with torch.no_grad():
            w_eff = masked_weight_ref(params[0], params[1], threshold).requires_grad_(grads[1] or grads[2])

        def conv_on_masked(x_, weight_, scores_, threshold_, bias_, stride_, padding_, dilation_, groups_):
            return torch.nn.functional.conv2d(x_, w_eff, bias_, stride_, padding_, dilation_, groups_)
        runs["cudnn"] = conv_on_masked
    times = {}
    for name, fn in runs.items():
        targets = leaves if name != "cudnn" or not premasked else \
            [t for t in (x, w_eff) if t.requires_grad]

        def step(fn=fn, targets=targets):
            with torch.set_grad_enabled(training), torch.autocast(x.device.type, dtype=autocast,
                                                                  enabled=autocast is not None):
                out = fn(x, params[0], params[1], threshold, bias, stride, padding, dilation, groups)
                if training:
                    torch.autograd.grad(out, targets, torch.ones_like(out))
        try:
            step()
        except (ValueError, TypeError, NotImplementedError, RuntimeError) as error:
            if isinstance(error, RuntimeError) and "out of memory" in str(error).lower():
                raise
            times[name] = float("inf")
            continue
        times[name] = timer(step)
    return times


_SAVE_WARNED: set = set()


def choose(x: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor, threshold: Any, bias: torch.Tensor | None,
           stride: ConvArg, padding: ConvArg, dilation: ConvArg, groups: int) -> str:
    """The implementation for this call: the table's, else (autotune on) measure now, else cudnn.

    Always cudnn while tracing (``torch.compile``: no host-side measuring or file access) and in
    deterministic mode (``torch.use_deterministic_algorithms``): there the choice must not depend
    on a table file or on timing noise."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.are_deterministic_algorithms_enabled():
        return DEFAULT_CHOICE
    grads = needed_grads(x, weight, scores)
    key = call_key(x, weight, scores, bias, stride, padding, dilation, groups, grads)
    dispatch_table = table()
    section = device_section(x.device)
    choice = dispatch_table.lookup(section, key)
    if choice is None and autotune_enabled() and dispatch_table.load_error is None:
        times = measure(x, weight, scores, threshold, bias, stride, padding, dilation, groups, grads)
        choice = dispatch_table.record(section, key, times)
        try:
            dispatch_table.save()
        except (OSError, DispatchTableError) as error:  # keep training; the entry stays in memory
            if dispatch_table.path not in _SAVE_WARNED:
                _SAVE_WARNED.add(dispatch_table.path)
                warnings.warn(f"conv dispatch table not saved ({error}); measured choices last for this "
                              f"process only", ConvDispatchTableWarning, stacklevel=2)
    return choice or DEFAULT_CHOICE


def masked_conv2d_dispatch(x: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor, threshold: Any,
                           bias: torch.Tensor | None = None, stride: ConvArg = 1, padding: ConvArg = 0,
                           dilation: ConvArg = 1, groups: int = 1, *,
                           masked_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The ``triton`` backend of ``masked_conv2d``: the candidate :func:`choose` names, one choice
    per call. ``masked_weight`` (precomputed by model-level mask batching) is convolved directly
    unless the choice is the implicit-GEMM conv, which masks while loading weight tiles."""
    choice = choose(x, weight, scores, threshold, bias, stride, padding, dilation, groups)
    if masked_weight is not None and choice != "igemm":
        return torch.nn.functional.conv2d(x, masked_weight, bias, stride, padding, dilation, groups)
    fn = candidates().get(choice) or candidates()[DEFAULT_CHOICE]
    return fn(x, weight, scores, threshold, bias, stride, padding, dilation, groups)

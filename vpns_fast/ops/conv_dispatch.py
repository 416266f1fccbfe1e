"""Measured dispatch of ``masked_conv2d`` on the triton backend: per call shape, the faster of
the Triton implicit-GEMM masked conv (``kernels/masked_conv.py``, ``igemm``) and the fused mask
kernel + cuDNN (``cudnn``).

Public Triton implicit-GEMM convs range from 0.2x to 1.2x cuDNN depending on shape and dtype
(PERFORMANCE.md), so neither can be chosen by rule. The choice comes from a table of measured
times, kept on disk and reused across runs:

* key: the device name and the torch / triton versions (a section each), then the call's shape:
  input shape, weight shape, score shape, stride, padding, dilation, groups, dtype, layout,
  bias, and ``train`` (forward + backward timed) or ``infer`` (forward only);
* value: the chosen implementation and each candidate's median milliseconds.

A shape without an entry runs ``cudnn`` (what the backend did before the table existed), unless
``VPNS_FAST_CONV_AUTOTUNE=1``, which measures it on first use and records it. ``vpns tune``
(:func:`tune`) fills the table for a model ahead of training. The table lives at
``$VPNS_FAST_CONV_TABLE``, else ``~/.cache/vpns_fast/conv_dispatch.json``; it is written
atomically and a damaged file is reported and ignored, never silently overwritten.
"""
from __future__ import annotations

import functools
import json
import os
import time
import warnings
from typing import Callable

import torch

TABLE_FORMAT = "vpns_fast.conv_dispatch"
TABLE_VERSION = 1
CANDIDATES = ("igemm", "cudnn")
DEFAULT_CHOICE = "cudnn"


class DispatchTableError(ValueError):
    """A dispatch table file that cannot be read (damaged, or another format or version)."""


def default_table_path() -> str:
    return os.environ.get("VPNS_FAST_CONV_TABLE") or os.path.join(
        os.path.expanduser("~"), ".cache", "vpns_fast", "conv_dispatch.json")


def autotune_enabled() -> bool:
    return os.environ.get("VPNS_FAST_CONV_AUTOTUNE", "0") == "1"


@functools.lru_cache(maxsize=None)
def device_section(device: torch.device) -> str:
    """The table section of ``device``: its name and the versions that decide kernel speed."""
    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return f"{name} | torch {torch.__version__} | triton {triton.__version__}"


def _pair(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def call_key(x: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor, bias, stride, padding, dilation,
             groups, training: bool) -> str:
    """The shape part of a table key: everything the relative speed of the candidates depends on."""
    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return _format_key(tuple(x.shape), tuple(weight.shape), tuple(scores.shape), _pair(stride), _pair(padding),
                       _pair(dilation), groups, x.dtype, weight.dtype, _autocast_dtype(x.device), channels_last,
                       bias is not None, training)


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


@functools.lru_cache(maxsize=4096)  # called per layer and forward: format each shape once
def _format_key(x, w, s, stride, padding, dilation, groups, x_dtype, w_dtype, autocast, channels_last, bias,
                training) -> str:
    return json.dumps({"x": list(x), "w": list(w), "s": list(s), "stride": list(stride), "padding": list(padding),
                       "dilation": list(dilation), "groups": groups, "dtype": _dtype_name(x_dtype),
                       "weight_dtype": _dtype_name(w_dtype), "autocast": _dtype_name(autocast),
                       "layout": "channels_last" if channels_last else "nchw", "bias": bias,
                       "mode": "train" if training else "infer"}, sort_keys=True)


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
                              stacklevel=2)

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
        """Write atomically (merging entries another process saved meanwhile)."""
        from vpns_fast.checkpoint import atomic_write

        if self.load_error is not None:
            raise DispatchTableError(f"not replacing {self.path}: {self.load_error}. Move or delete it first.")
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
    from vpns_fast.kernels.masked import masked_conv2d_triton

    found = {"cudnn": masked_conv2d_triton}
    try:
        from vpns_fast.kernels.masked_conv import masked_conv2d_igemm
    except ImportError:  # pragma: no cover - the kernel file ships with the package
        return found

    def igemm(x, weight, scores, threshold, bias, stride, padding, dilation, groups):
        # The Triton op is not autocast-aware and wants x and weight in one dtype: cast them as
        # autocast casts F.conv2d's operands (the casts are differentiable; scores stay as they are).
        dtype = _autocast_dtype(x.device)
        if dtype is not None:
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            return masked_conv2d_igemm(x, weight, scores, threshold, bias, stride, padding, dilation, groups)

    found["igemm"] = igemm
    return found


def measure(x, weight, scores, threshold, bias, stride, padding, dilation, groups, training: bool,
            timer: Callable[[Callable[[], None]], float] | None = None) -> dict[str, float]:
    """Median ms of each candidate on this call (forward, plus backward when ``training``), under
    the autocast state of the caller; ``inf`` for a candidate that refuses the call (e.g. groups
    != 1)."""
    timer = timer or (_cuda_timer if x.device.type == "cuda" else _wall_timer)
    autocast = _autocast_dtype(x.device)
    x = x.detach().requires_grad_(training)
    params = [t.detach().requires_grad_(training) for t in (weight, scores)]
    bias = None if bias is None else bias.detach().requires_grad_(training)
    leaves = [t for t in (x, *params, bias) if t is not None and t.requires_grad]
    times = {}
    for name, fn in candidates().items():
        def step(fn=fn):
            with torch.set_grad_enabled(training), torch.autocast(x.device.type, dtype=autocast,
                                                                  enabled=autocast is not None):
                out = fn(x, params[0], params[1], threshold, bias, stride, padding, dilation, groups)
                if training:
                    torch.autograd.grad(out, leaves, torch.ones_like(out))
        try:
            step()
        except (ValueError, TypeError, NotImplementedError, RuntimeError) as error:
            if isinstance(error, RuntimeError) and "out of memory" in str(error).lower():
                raise
            times[name] = float("inf")
            continue
        times[name] = timer(step)
    return times


def choose(x, weight, scores, threshold, bias, stride, padding, dilation, groups) -> str:
    """The implementation for this call: the table's, else (autotune on) measure now, else cudnn."""
    if torch.compiler.is_compiling():
        return DEFAULT_CHOICE  # no host-side measuring or file access while tracing
    training = torch.is_grad_enabled() and (weight.requires_grad or scores.requires_grad or x.requires_grad)
    key = call_key(x, weight, scores, bias, stride, padding, dilation, groups, training)
    dispatch_table = table()
    section = device_section(x.device)
    choice = dispatch_table.lookup(section, key)
    if choice is None and autotune_enabled() and dispatch_table.load_error is None:
        times = measure(x, weight, scores, threshold, bias, stride, padding, dilation, groups, training)
        choice = dispatch_table.record(section, key, times)
        dispatch_table.save()
    return choice or DEFAULT_CHOICE


def masked_conv2d_dispatch(x, weight, scores, threshold, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """The ``triton`` backend of ``masked_conv2d``: the candidate :func:`choose` names."""
    fn = candidates().get(choose(x, weight, scores, threshold, bias, stride, padding, dilation, groups))
    if fn is None:
        fn = candidates()[DEFAULT_CHOICE]
    return fn(x, weight, scores, threshold, bias, stride, padding, dilation, groups)


# --------------------------------------------------------------------------- tuning a model

def tune(model: torch.nn.Module, example: torch.Tensor, training: bool = True,
         path: str | None = None, timer: Callable | None = None) -> list[dict]:
    """Measure every distinct masked conv call of ``model(example)`` and record it in the table.

    Runs one forward (in eval mode, without grad; the model is left as it was) to see each
    ``MaskedConv2d``'s input, then times both candidates on each distinct call shape (forward +
    backward when ``training``). Returns one row per shape:
    ``{"layer", "key", "ms": {...}, "choice"}``; the table is saved once at the end.
    """
    from vpns_fast.masked_layers import MaskedConv2d

    seen: dict[str, tuple] = {}

    def capture(layer, inputs, name):
        x = inputs[0]
        key = call_key(x, layer.weight, layer.scores, layer.bias, layer.stride, layer.padding, layer.dilation,
                       layer.groups, training)
        seen.setdefault(key, (name, layer, x.detach()))

    handles = [m.register_forward_pre_hook(lambda m, inputs, name=name: capture(m, inputs, name))
               for name, m in model.named_modules() if isinstance(m, MaskedConv2d)]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()  # same shapes, and BatchNorm statistics stay as they are
            model(example)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    if not seen:
        raise ValueError("model has no MaskedConv2d layer to tune (sparsify it first)")
    dispatch_table = table(path)
    rows = []
    # Measured under the caller's autocast state, like the forward that found the shapes.
    for key, (name, layer, x) in seen.items():
        times = measure(x, layer.mask_input_weight().detach(), layer.scores, layer.threshold,
                        layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups, training, timer)
        choice = dispatch_table.record(device_section(x.device), key, times)
        rows.append({"layer": name, "key": key, "ms": times, "choice": choice})
    dispatch_table.save()
    return rows

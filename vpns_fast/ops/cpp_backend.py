"""Registers the ops that the C++ extension (``csrc/``) implements as the ``cpp`` backend.

Registration never needs the extension: whether the ``cpp`` backend may serve a call is decided
by the registry's probe (``vpns_fast._extension.status()``), so this module imports without it.

Warm start. Mask search recomputes the threshold after every optimizer step over the same score
tensors, updated in place, and it moves very little between steps. The registered op therefore
remembers the last threshold per (tensors, k) and passes it to the kernel as a hint, which lets
float32 finish in one pass instead of two. A hint never changes the result (the kernel is exact
for any hint); a wrong one costs one extra pass, so the hint is only passed while the previous
call's threshold landed inside the kernel's band, i.e. while the last step was small.
Set ``WARM_START = False`` to turn this off.
"""
from __future__ import annotations

from typing import Sequence

import torch

from vpns_fast import _extension
from vpns_fast.ops.backends import register

WARM_START = True

# The kernel's warm band spans at least +-2^-9 (0.195%) of the hint for float32 and float64.
_WARM_BAND = 2.0 ** -9
_HINTED_DTYPES = (torch.float32, torch.float64)  # float16/bfloat16 take one pass anyway
_MAX_REMEMBERED = 1024

# (dtype, k, (data_ptr, numel) per tensor) -> (last threshold, whether a hint would have hit)
_last_threshold: dict[tuple, tuple[float, bool]] = {}


def _kernel():
    ext = _extension.load()
    if ext is None:
        raise RuntimeError(_extension.status()[1])
    return ext


def topk_threshold(tensors: Sequence[torch.Tensor], k: int, hint=None) -> torch.Tensor:
    """k-th smallest ``|s|`` over all ``tensors`` together: ``torch.kthvalue(cat(|s|), k)``.

    ``hint`` (a float or 0-dim tensor) is an explicit previous threshold for the warm start;
    without it the last threshold of the same tensors and ``k`` is used when it is likely to
    help. The result is exact either way.
    """
    ext = _kernel()
    tensors = list(tensors)
    k = int(k)
    if hint is not None:
        return ext.topk_threshold(tensors, k, float(hint))
    if not WARM_START or not tensors or tensors[0].dtype not in _HINTED_DTYPES:
        return ext.topk_threshold(tensors, k, None)
    key = (tensors[0].dtype, k, tuple((t.data_ptr(), t.numel()) for t in tensors))
    previous, previous_was_close = _last_threshold.get(key, (None, False))
    result = ext.topk_threshold(tensors, k, previous if previous_was_close else None)
    value = result.item()
    # A first repeat is assumed to be a small step; after that the last step decides.
    close = previous is None or abs(value - previous) <= _WARM_BAND * abs(previous)
    if len(_last_threshold) >= _MAX_REMEMBERED and key not in _last_threshold:
        _last_threshold.clear()
    _last_threshold[key] = (value, close)
    return result


register("cpp", "topk_threshold", topk_threshold)

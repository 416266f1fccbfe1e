"""Registers the ops that the C++ extension (``csrc/``) implements as the ``cpp`` backend.

Registration never needs the extension: whether the ``cpp`` backend may serve a call is decided
by the registry's probe (``vpns_fast._extension.status()``), so this module imports without it.
The registered threshold op is warm-started by the policy of :mod:`vpns_fast.ops.warm_start`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from vpns_fast import _extension
from vpns_fast.ops.backends import register
from vpns_fast.ops.warm_start import WarmStartThreshold

# The kernel's warm band spans at least +-2^-9 (0.195%) of the hint for float32 and float64;
# float16 / bfloat16 ignore the hint (their cold select is one pass).
_WARM_BAND = 2.0 ** -9
_HINTED_DTYPES = (torch.float32, torch.float64)


def _kernel():
    ext = _extension.load()
    if ext is None:
        raise RuntimeError(_extension.status()[1])
    return ext


def _select(tensors: list[torch.Tensor], k: int, hint: float | torch.Tensor | None) -> torch.Tensor:
    return _kernel().topk_threshold(tensors, k, None if hint is None else float(hint))


warm_start = WarmStartThreshold(_select, hinted_dtypes=_HINTED_DTYPES, band=_WARM_BAND)


def topk_threshold(tensors: Sequence[torch.Tensor], k: int, hint: float | torch.Tensor | None = None) -> torch.Tensor:
    """k-th smallest ``|s|`` over all ``tensors`` together: ``torch.kthvalue(cat(|s|), k)``.

    ``hint`` (a float or 0-dim tensor) is an explicit guess of the result; without it the
    warm-start policy chooses one. The result is exact either way.
    """
    if hint is not None:
        return _select(list(tensors), int(k), hint)
    return warm_start(tensors, k)


register("cpp", "topk_threshold", topk_threshold)

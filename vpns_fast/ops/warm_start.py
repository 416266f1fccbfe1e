"""Warm start of the top-k threshold: the policy of the ``cpp`` backend.

Mask search recomputes the threshold after every optimizer step over the same score tensors,
updated in place, and the threshold moves very little between steps. Both backends' radix
selects accept a *hint* (a guess of the result): a warm band around it resolves the high digits
in one pass when the answer falls inside, and the result is exact for any hint, so a hint only
ever changes speed.

The rule: the hint is the threshold last computed for the same score tensors
(same storage, sizes, dtype and device) and the same ``k``; it is withheld

* for dtypes the backend's kernel does not warm-start (``hinted_dtypes``), and
* when the backend gives its warm band (``band``, the relative half-width the band covers at
  least), after a step that moved the threshold by more than ``band`` of its value: a missed band
  costs a pass. That check reads the threshold on the host, so it is made where this is free:

  - ``cpp`` (CPU tensors): band 2^-9; a warm hit is about 2-3x faster than a cold select and a miss
    costs about 40% more (ResNet-18 / ResNet-50 score sizes; the timings are in csrc/threshold.cpp's header).
  - ``triton``: not warm-started. Its kernel takes a hint, but on an H200 a hinted select
    measured no faster than a cold one (kernels/threshold.py), so the backend selects cold.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# select(tensors, k, hint) -> the k-th smallest |s| over all tensors (hint: None or a 0-dim tensor)
Select = Callable[[list[torch.Tensor], int, torch.Tensor | None], torch.Tensor]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class WarmStartThreshold:
    """``select`` with the warm-start rule of this module: remembers the last threshold per
    (score tensors, k), up to ``max_entries`` of them (layer-scope thresholds keep one per layer),
    oldest dropped first. Set ``enabled = False`` to always select cold."""

    def __init__(self, select: Select, *, hinted_dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
                 band: float | None = None, max_entries: int = 1024):
        self.select = select
        self.hinted_dtypes = tuple(hinted_dtypes)
        self.band = band
        self.max_entries = max_entries
        self.enabled = True
        # key -> (last threshold, whether the step that produced it stayed inside the band)
        self._last: dict[tuple, tuple[torch.Tensor, bool]] = {}

    def __call__(self, tensors: torch.Tensor | Sequence[torch.Tensor], k: int) -> torch.Tensor:
        tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
        k = int(k)
        if (not self.enabled or not tensors or tensors[0].dtype not in self.hinted_dtypes
                or torch.compiler.is_compiling()):  # fake tensors have no data pointers to key on
            return self.select(tensors, k, None)
        key = (k, tuple((t.data_ptr(), t.numel(), t.dtype, t.device) for t in tensors))
        previous, previous_was_close = self._last.get(key, (None, False))
        threshold = self.select(tensors, k, previous if previous_was_close else None)
        # A first repeat is assumed to be a small step; after that the last step decides.
        close = True
        if self.band is not None and previous is not None:
            value, before = float(threshold), float(previous)
            close = abs(value - before) <= self.band * abs(before)
        if key not in self._last and len(self._last) >= self.max_entries:
            self._last.pop(next(iter(self._last)))
        self._last[key] = (threshold, close)
        return threshold

    def __len__(self) -> int:
        return len(self._last)

    def reset(self) -> None:
        """Forget every remembered threshold (the next call of each is a cold select)."""
        self._last.clear()

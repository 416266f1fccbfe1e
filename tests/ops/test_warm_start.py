"""The warm-start policy of the top-k threshold (vpns_fast/ops/warm_start.py), with a recording
select in place of a kernel: which hint each call gets."""
from __future__ import annotations

import torch

from vpns_fast.ops.warm_start import WarmStartThreshold


class RecordingSelect:
    """Returns the next of ``results`` and records the hint it was given."""

    def __init__(self, results):
        self.results = [torch.tensor(r) for r in results]
        self.hints = []

    def __call__(self, tensors, k, hint):
        self.hints.append(None if hint is None else float(hint))
        return self.results[len(self.hints) - 1]


def test_hint_is_the_last_threshold_of_the_same_tensors_and_k():
    select = RecordingSelect([1.0, 1.1, 2.0, 3.0])
    warm = WarmStartThreshold(select)
    scores = [torch.randn(10), torch.randn(3)]
    warm(scores, 5)
    warm(scores, 5)
    warm(scores, 6)  # another k: cold
    warm(scores[:1], 5)  # other tensors: cold
    assert select.hints == [None, 1.0, None, None]
    assert len(warm) == 3


def test_band_withholds_the_hint_after_a_large_step_only():
    select = RecordingSelect([1.0, 1.0078125, 5.0, 5.0078125, 5.015625])  # exact in float32
    warm = WarmStartThreshold(select, band=0.01)
    scores = torch.randn(10)
    for _ in range(5):
        warm(scores, 3)
    # 1.0 -> 1.0078 stays in the 1% band; 1.0078 -> 5.0 leaves it: the next is selected cold.
    assert select.hints == [None, 1.0, 1.0078125, None, 5.0078125]


def test_unhinted_dtypes_disabled_and_reset_select_cold():
    select = RecordingSelect([1.0] * 6)
    warm = WarmStartThreshold(select, hinted_dtypes=(torch.float32,))
    half = torch.randn(8).half()
    warm(half, 2)
    warm(half, 2)
    scores = torch.randn(8)
    warm(scores, 2)
    warm.enabled = False
    warm(scores, 2)
    warm.enabled = True
    warm.reset()
    warm(scores, 2)
    warm(scores, 2)
    assert select.hints == [None, None, None, None, None, 1.0]


def test_oldest_entry_is_dropped_when_full():
    select = RecordingSelect([1.0, 2.0, 3.0, 4.0])
    warm = WarmStartThreshold(select, max_entries=2)
    a, b, c = torch.randn(4), torch.randn(5), torch.randn(6)
    warm(a, 1)
    warm(b, 1)
    warm(c, 1)  # drops a
    warm(a, 1)
    assert select.hints == [None, None, None, None]
    assert len(warm) == 2

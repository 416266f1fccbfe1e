"""Top-k threshold over the magnitudes of one or more score tensors.

``t = kthvalue(cat(|s| for s in scores), k)`` with ``k`` 1-based: the k-th smallest magnitude.
A weight is kept when ``|s| > t`` (strict), so ties at ``t`` are pruned and exactly
``N - (number of |s| <= t)`` weights survive.
"""
from __future__ import annotations

from typing import Sequence

import torch


def topk_threshold_ref(scores: Sequence[torch.Tensor], k: int) -> torch.Tensor:
    """The release code's path: clone, abs, cat, ``torch.kthvalue``. ``1 <= k <= N``."""
    flat = torch.cat([s.detach().abs().flatten() for s in scores])
    return torch.kthvalue(flat, k).values

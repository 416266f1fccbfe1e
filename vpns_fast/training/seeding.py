"""Seeds derived from names: every epoch reseeds every RNG from (seed, run, phase, epoch), so a run
resumed from a checkpoint replays exactly the steps it would have taken."""
from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def derived_seed(*parts) -> int:
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)

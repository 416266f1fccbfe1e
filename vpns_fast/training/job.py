"""What the parts of a job share."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from vpns_fast.data import DataSplits
from vpns_fast.training.config import TrainConfig
from vpns_fast.training.loaders import Loaders
from vpns_fast.training.precision import Precision

if TYPE_CHECKING:
    from vpns_fast.training.metrics_log import MetricsLog


@dataclass
class JobContext:
    """The configuration, the data and its loaders, the precision, and where this process runs."""
    config: TrainConfig
    data: DataSplits
    loaders: Loaders
    precision: Precision
    device: torch.device
    world_size: int
    is_main: bool
    metrics: MetricsLog | None = None  # the job's metrics.csv / loggers, once open (rank 0)

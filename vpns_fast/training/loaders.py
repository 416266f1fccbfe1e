"""The data loaders of a job, for one process or for every rank of a DDP job."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from vpns_fast.data import make_loader
from vpns_fast.training import distributed as dist_utils


class Loaders:
    """Shuffled training loaders, made afresh from a seed every epoch (their order is a function of
    the seed alone, which keeps resume exact), and the unshuffled loaders of evaluation and
    label-mapping counts, made once per split."""

    def __init__(self, batch_size: int, num_workers: int, device: torch.device, world_size: int):
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = device.type == "cuda"
        self.world_size = world_size
        self._ordered: dict[int, tuple[Dataset, DataLoader]] = {}  # id(split) -> (split, loader)

    def shuffled(self, dataset: Dataset, seed: int, epoch: int) -> DataLoader:
        sampler = None
        if dist_utils.active():  # each rank its own share of the seed's permutation
            sampler = DistributedSampler(dataset, shuffle=True, seed=seed)
            sampler.set_epoch(epoch)
        return make_loader(dataset, self.batch_size, shuffle=sampler is None, num_workers=self.num_workers,
                           seed=seed, sampler=sampler, pin_memory=self.pin_memory)

    def ordered(self, dataset: Dataset) -> DataLoader:
        """The split's unshuffled loader, built once: it is the same every epoch, and rebuilding it
        would restart its worker processes. Under DDP every sample is seen exactly once over the ranks."""
        if id(dataset) not in self._ordered:  # the split is kept in the entry: its id stays unique
            sampler = list(range(dist_utils.rank(), len(dataset), self.world_size)) if dist_utils.active() else None
            loader = make_loader(dataset, self.batch_size, shuffle=False, num_workers=self.num_workers, seed=0,
                                 sampler=sampler, pin_memory=self.pin_memory)
            self._ordered[id(dataset)] = (dataset, loader)
        return self._ordered[id(dataset)][1]

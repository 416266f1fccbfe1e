"""The data loaders of a job, for one process or for every rank of a DDP job."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from vpns_fast.data import DataSplits, dataset_splits, load_dataset, make_loader
from vpns_fast.errors import SettingError
from vpns_fast.training import distributed as dist_utils
from vpns_fast.training.config import PythonObject, TrainConfig, dataset_parts


def load_job_data(config: TrainConfig, resuming: bool = False) -> DataSplits:
    """The job's splits: a named dataset loaded, a DataSplits as given, or a user's datasets split and resized
    to the run's image size (:func:`vpns_fast.data.dataset_splits`). SettingError (naming the field, so that the
    command line names the flag or config file that set it) where ``data_dir`` lacks the dataset's files, where no
    training item is left (the val fraction holding out every one, or an empty dataset), and, not when ``resuming``
    (a run that started so goes on as it started), where ``num_classes`` is not the dataset's or a val fraction above
    0 rounds to no val item."""
    c = config
    if isinstance(c.dataset, str):
        data = load_dataset(c.dataset, c.data_dir, c.data_image_size(), c.val_fraction, c.split_seed, c.download,
                            limit=c.limit)
        val_drawn = True  # val_fraction of the training images
    elif isinstance(c.dataset, DataSplits):
        data, val_drawn = c.dataset, False
    elif isinstance(c.dataset, PythonObject):
        raise ValueError(object_not_stored(c.dataset))
    else:
        train, val, test = dataset_parts(c.dataset)
        data = dataset_splits(train, val, test, num_classes=c.num_classes, image_size=c.data_image_size(),
                              val_fraction=c.val_fraction, seed=c.split_seed, limit=c.limit)
        val_drawn = val is None
    # num_classes is for Dataset objects; a named dataset or a DataSplits counts its own classes, and a different
    # count given beside one had been ignored without a word. Checked on the data, which alone knows the count of an
    # ImageFolder (a run started before the check, with the count ignored, resumes as it started).
    if c.num_classes is not None and c.num_classes != data.num_classes and not resuming:
        raise SettingError("num_classes", f"the dataset {data.name} has {data.num_classes} classes, got "
                           f"{c.num_classes!r}; leave num_classes out (it is for a dataset passed as Dataset objects)")
    val_drawn = val_drawn and c.val_fraction > 0
    if len(data.train) == 0:  # torch's sampler said "num_samples should be a positive integer value" (a review)
        if val_drawn and len(data.val):
            raise SettingError("val_fraction", f"nothing to train on: {c.val_fraction:g} held out every training "
                               f"image ({len(data.val)}) for val")
        raise SettingError("dataset", "nothing to train on: its train split is empty")
    if len(data.val) == 0 and val_drawn and not resuming:
        # silently none, the runs would keep their last epoch, not the best one the fraction asked to select
        raise SettingError("val_fraction", f"{c.val_fraction:g} of the {len(data.train)} training images rounds to "
                           f"no val image; raise it, or set it to 0 to train without a val split (each run then "
                           f"keeps its last epoch)")
    return data


def object_not_stored(placeholder: PythonObject) -> str:
    return (f"this run was given its {placeholder.field} as a Python object ({placeholder.description}), which "
            f"config.json cannot hold, so it cannot be resumed from the command line; resume it from Python with "
            f"the same object: vpns_fast.training.trainer.resume(OUT, {placeholder.field}=...)"
            + (" (or name the model as 'package.module:factory' so a run can rebuild it)"
               if placeholder.field == "model" else ""))


class Loaders:
    """Shuffled training loaders, made afresh from a seed every epoch (their order and every item's
    random augmentation are a function of the seed alone, which keeps resume exact and makes the
    batches the same for any ``num_workers``), and the unshuffled loaders of evaluation and
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
        # seeded_items: an item's augmentation comes from (seed, its index), not from whichever process's
        # RNG stream reads it (issue #14: 0 vs 2 workers gave other checkpoints under --deterministic)
        return make_loader(dataset, self.batch_size, shuffle=sampler is None, num_workers=self.num_workers,
                           seed=seed, sampler=sampler, pin_memory=self.pin_memory, seeded_items=True)

    def ordered(self, dataset: Dataset) -> DataLoader:
        """The split's unshuffled loader, built once: it is the same every epoch, and rebuilding it
        would restart its worker processes. Under DDP every sample is seen exactly once over the ranks."""
        if id(dataset) not in self._ordered:  # the split is kept in the entry: its id stays unique
            sampler = list(range(dist_utils.rank(), len(dataset), self.world_size)) if dist_utils.active() else None
            loader = make_loader(dataset, self.batch_size, shuffle=False, num_workers=self.num_workers, seed=0,
                                 sampler=sampler, pin_memory=self.pin_memory)
            self._ordered[id(dataset)] = (dataset, loader)
        return self._ordered[id(dataset)][1]

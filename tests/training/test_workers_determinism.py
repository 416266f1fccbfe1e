"""`num_workers` only changes how fast batches arrive, never what they hold: the random augmentation of a
sample is a function of (the epoch's loader seed, the sample's index), wherever it is drawn, and loading
leaves the main process's RNG alone. So a deterministic run gives the same checkpoints and results with
0 or 2 loader workers (issue #14, item 9)."""
import json
import random

import numpy as np
import pytest
import torch
from helpers import tiny_config
from torch.utils.data import Dataset

from vpns_fast.data import dataset_splits, load_dataset
from vpns_fast.pruning.checkpoint import load_checkpoint
from vpns_fast.training.loaders import Loaders
from vpns_fast.training.trainer import TwoStageTrainer

TIMING = ("wall_s", "train_s", "images_per_s")


def _batches(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(images.clone(), labels.clone()) for images, labels in loader]


def test_augmented_batches_do_not_depend_on_the_worker_count():
    data = load_dataset("synthetic", image_size=16, limit=24, seed=3)
    seen = {}
    for workers in (0, 2):
        loaders = Loaders(batch_size=5, num_workers=workers, device=torch.device("cpu"), world_size=1)
        torch.manual_seed(123)
        seen[workers] = (_batches(loaders.shuffled(data.train_augmented, seed=11, epoch=0)), torch.rand(4))
    (batches0, after0), (batches2, after2) = seen[0], seen[2]
    assert len(batches0) == len(batches2) == 5
    for (images0, labels0), (images2, labels2) in zip(batches0, batches2):
        assert torch.equal(labels0, labels2)
        assert torch.equal(images0, images2)
    # loading drew nothing from the main process's RNG: the model's random draws stay the same too
    assert torch.equal(after0, after2)
    torch.manual_seed(123)
    assert torch.equal(after0, torch.rand(4))


class _OwnRandomness(Dataset):
    """A user's dataset with its own random transforms on numpy's, ``random``'s and torch's global RNGs."""

    def __init__(self):
        self.images = torch.randint(0, 200, (30, 3, 8, 8), dtype=torch.uint8)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, j):
        shift = int(np.random.randint(0, 20)) + random.randrange(20) + int(torch.randint(0, 15, ()))
        return self.images[j] + shift, j % 3


def test_a_user_datasets_own_randomness_does_not_depend_on_the_worker_count():
    data = dataset_splits(_OwnRandomness(), num_classes=3, image_size=8, val_fraction=0.0)
    seen = {}
    for workers in (0, 2):
        loaders = Loaders(batch_size=4, num_workers=workers, device=torch.device("cpu"), world_size=1)
        torch.manual_seed(5)
        seen[workers] = (_batches(loaders.shuffled(data.train_augmented, seed=3, epoch=1)), torch.rand(3))
    assert len(seen[0][0]) == len(seen[2][0]) == 6
    for (images0, labels0), (images2, labels2) in zip(seen[0][0], seen[2][0]):
        assert torch.equal(labels0, labels2) and torch.equal(images0, images2)
    assert torch.equal(seen[0][1], seen[2][1])


def test_augmentation_follows_the_sample_and_the_seed_not_the_order():
    data = load_dataset("synthetic", image_size=16, limit=24, seed=3)
    loaders = Loaders(batch_size=24, num_workers=0, device=torch.device("cpu"), world_size=1)
    first = _batches(loaders.shuffled(data.train_augmented, seed=11, epoch=0))[0]
    again = _batches(loaders.shuffled(data.train_augmented, seed=11, epoch=0))[0]
    other = _batches(loaders.shuffled(data.train_augmented, seed=12, epoch=0))[0]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    # another seed: another order, and other crops or flips for at least some of the same samples
    assert not torch.equal(first[1], other[1])
    by_image_first = sorted(tuple(x.flatten().tolist()) for x in first[0])
    by_image_other = sorted(tuple(x.flatten().tolist()) for x in other[0])
    assert by_image_first != by_image_other


@pytest.mark.slow
def test_a_deterministic_run_gives_the_same_checkpoints_with_0_or_2_workers(tmp_path):
    outs = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        config = tiny_config(out, batch_size=8, num_workers=workers, methods=("vpns", "hydra"))
        results = TwoStageTrainer(config).run()
        outs[workers] = (out, [{k: v for k, v in row.items() if k not in TIMING} for row in results])
    (out0, rows0), (out2, rows2) = outs[0], outs[2]
    assert rows0 == rows2
    for run in ("vpns_d0.5", "hydra_d0.5"):
        best0 = load_checkpoint(out0 / "runs" / run / "best.pt")
        best2 = load_checkpoint(out2 / "runs" / run / "best.pt")
        assert sorted(best0["state_dict"]) == sorted(best2["state_dict"])
        differing = [k for k, v in best0["state_dict"].items() if not torch.equal(v, best2["state_dict"][k])]
        assert differing == []
        if best0["prompt"] is not None:
            assert torch.equal(best0["prompt"]["program"], best2["prompt"]["program"])
    written = [json.loads((out / "results.json").read_text())["runs"] for out in (out0, out2)]
    assert [{k: v for k, v in row.items() if k not in TIMING} for row in written[0]] == \
        [{k: v for k, v in row.items() if k not in TIMING} for row in written[1]]

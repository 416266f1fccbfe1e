"""Prune your own network on your own data with the Python API.

    python examples/prune_your_model.py [OUT_DIR]

The network is any ``nn.Module`` classifier and the data any ``torch.utils.data.Dataset`` of
``(image, label)`` pairs, images ``(3, H, W)`` as uint8 in [0, 255] or float in [0, 1]. Here both
are small stand-ins built in a few lines (scikit-learn's digits, 8x8 grey images, as RGB), so the
example runs in seconds; swap in your own.
"""
from __future__ import annotations

import sys
import tempfile

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset

import vpns_fast as vf
from vpns_fast.training import TrainConfig, TwoStageTrainer


def my_network(num_outputs: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, groups=2), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_outputs),
    )


def my_data() -> TensorDataset:
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16  # (N, 8, 8) in [0, 1]
    images = images.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()  # as RGB
    return TensorDataset(images, torch.tensor(digits.target))


def main(out: str) -> int:
    network = my_network(num_outputs=10)
    config = TrainConfig(model=network, dataset=my_data(), num_classes=10, input_size=16, prompt_size=2,
                         pretrain_epochs=10, methods=("vpns", "hydra"), densities=(0.2,), search_epochs=3,
                         finetune_epochs=3, batch_size=64, seed=0, out=out, progress=False)
    for row in TwoStageTrainer(config).run():
        print(f"{row['method']:>6} at density {row['actual_density']:.2f}: test accuracy {row['test_acc']:.2f}%")

    # The same building blocks without the trainer: mask your network, pick a density, report it.
    masked = vf.sparsify(my_network(num_outputs=10))
    vf.set_density(masked, 0.2)
    print(vf.density_report(masked, input_size=(3, 16, 16)))  # one example's shape: FLOPs too
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1:
        sys.exit(main(sys.argv[1]))
    with tempfile.TemporaryDirectory() as folder:
        sys.exit(main(folder))

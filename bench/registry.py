"""Shapes from real models, not invented: the Conv2d/Linear weights of torchvision ResNets.

Every such weight is a masked layer in VPNs (docs/method.md §1), so its shape is a score tensor's shape.
The models are built on the meta device: no weights are allocated or initialised.
"""
from __future__ import annotations

import functools

import torch

SCORE_MODELS = ("resnet18", "resnet50")
# `--sizes small`: the first few layers only, so CI smoke-tests the harness in seconds.
SMALL_LAYER_COUNT = 4


@functools.cache
def masked_weight_shapes(model_name: str) -> tuple[tuple[int, ...], ...]:
    """Shapes of every Conv2d and Linear weight of ``torchvision.models.<model_name>()``."""
    import torchvision

    if model_name not in SCORE_MODELS:
        raise ValueError(f"model must be one of {SCORE_MODELS}, got {model_name!r}")
    with torch.device("meta"):
        model = getattr(torchvision.models, model_name)()
    return tuple(tuple(module.weight.shape) for module in model.modules()
                 if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)))


def score_shapes(model_name: str, sizes: str) -> tuple[tuple[int, ...], ...]:
    shapes = masked_weight_shapes(model_name)
    if sizes == "small":
        return shapes[:SMALL_LAYER_COUNT]
    if sizes == "full":
        return shapes
    raise ValueError(f"sizes must be 'small' or 'full', got {sizes!r}")


# Prompt shapes: the release default (pad 16, in 224 = out 224, the frame overlays the image) and
# a shrunk image padded up to 224. Batches: the release's 64 (DTD, Pets) and 256 (CIFAR, ...).
PROMPT_PAD = 16
PROMPT_OUT_SIZE = 224
PROMPT_IN_SIZES = (224, 192)
PROMPT_BATCHES = {("cuda", "full"): (64, 256), ("cpu", "full"): (8, 32),
                  ("cuda", "small"): (2,), ("cpu", "small"): (2,)}

# Training step (case train_step): (model, image size, batches) per (device, sizes). ResNet-18 at
# 224 with the release's batches on a GPU; on a CPU a size it can afford; `small` is a smoke test.
TRAIN_STEP_POINTS = {("cuda", "full"): ("resnet18", 224, (64, 256)), ("cpu", "full"): ("resnet18", 64, (8,)),
                     ("cuda", "small"): ("small_resnet", 32, (64,)), ("cpu", "small"): ("small_resnet", 32, (8,))}
# The target task's classes (label-mapped from the source head, as in VPNs).
TRAIN_STEP_TARGET_CLASSES = 10


def train_step_pad(image_size: int) -> int:
    """The release's pad of 16 at 224, scaled to smaller images (at least 2 pixels)."""
    return max(2, image_size * PROMPT_PAD // PROMPT_OUT_SIZE)


@functools.cache
def conv_layers(model_name: str, image_size: int) -> tuple[tuple[str, tuple, tuple, tuple], ...]:
    """(name, weight shape, input shape [C, H, W], stride) of each Conv2d in forward order, found by a
    forward pass on the meta device (nothing allocated), the first of each distinct shape triple only."""
    import torchvision
    from torch import nn

    with torch.device("meta"):
        model = getattr(torchvision.models, model_name)().eval()
        found = []
        handles = [m.register_forward_pre_hook(
            lambda m, inputs, name=name: found.append((name, tuple(m.weight.shape), tuple(inputs[0].shape[1:]),
                                                       tuple(m.stride))))
                   for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        with torch.no_grad():
            model(torch.empty(1, 3, image_size, image_size))
        for handle in handles:
            handle.remove()
    distinct, seen = [], set()
    for name, weight_shape, input_shape, stride in found:
        if (weight_shape, input_shape, stride) not in seen:
            seen.add((weight_shape, input_shape, stride))
            distinct.append((name, weight_shape, input_shape, stride))
    return tuple(distinct)

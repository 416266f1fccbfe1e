"""Structured channel mode (docs/method.md §9) for ResNets and VGGs, opt-in via
``sparsify(..., structured=True)``.

What it sets up on a model whose convs are already channel-granularity masked layers:

* **Residual groups** (ResNets; a VGG has none, each conv is its own group). Every conv whose output
  feeds the same residual sum — the stem (when ``layer1`` starts with an identity shortcut), each
  block's last conv (``conv2`` / ``conv3``) and the downsample conv of a stage — shares ONE score
  vector: ``layer.scores`` is literally the same ``nn.Parameter`` object on every member, so its
  gradient is the sum over members. The shared score starts at the mean of the members' own
  initial scores **[decision]**.
* **Input-channel masking.** Each conv records the layer that produces its input
  (``in_mask_source``: the previous conv inside a block, the residual group for a block's first
  conv and downsample; in a VGG the previous conv of ``features``); its effective weight is
  ``W * out_mask * in_mask`` with ``in_mask`` the producer's current (detached) channel mask.
  ``weight_mask()`` includes it, so density reports, ``fold`` and exports see the true mask. The stem
  reads the image: no input mask.
* **Early-layer cap.** The first ``cap_layers`` convs (module order; release dev code: 5) may lose
  at most ``cap_sparsity`` (25%) of their channels; :func:`apply_channel_cap` (called by
  ``set_density``) gives an over-pruned layer — or its whole residual group — its own threshold
  keeping ``ceil((1 - cap_sparsity) * C)`` channels (ties at the threshold are still pruned).
* The classifier (ResNet ``fc``, VGG ``classifier``) is **excluded** (plain dense ``nn.Linear``)
  **[decision]**: the global threshold runs over conv channels only. In a VGG the
  first Linear reads the last conv's channels through pooling; slimming folds a pruned channel's
  constant into its bias (:mod:`vpns_fast.deploy.slim`), so no input mask is needed there.

The producer references are plain attributes (not submodules), so ``modules()`` and the state_dict
are unchanged; ``copy.deepcopy`` maps them onto the copy.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from vpns_fast.nn.masked_layers import MaskedConv2d, masked_layers

__all__ = ["structure_channels", "apply_channel_cap", "structured_config", "residual_groups", "unique_score_units",
           "channel_density"]

_IN_SOURCE = "in_mask_source"


def _resnet_blocks(model: nn.Module):
    from torchvision.models.resnet import BasicBlock, Bottleneck

    blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, (BasicBlock, Bottleneck))]
    if not blocks:
        raise ValueError("structured=True: the ResNet has no BasicBlock / Bottleneck blocks")
    return blocks


def residual_groups(model: nn.Module) -> tuple[list[list[str]], dict[str, str | None]]:
    """``(groups, producer)``: the lists of conv names that feed one residual stream (each list in
    module order), and for every conv the name of the conv that produces its input (``None`` for
    the stem). Works on plain and masked models alike (names only). A VGG's groups are its convs,
    one each, and a conv's producer is the previous conv of ``features``. Anything else: ValueError."""
    from torchvision.models import VGG
    from torchvision.models.resnet import Bottleneck, ResNet

    if isinstance(model, VGG):
        return _vgg_chain(model)
    if not isinstance(model, ResNet):
        raise ValueError(f"structured=True supports torchvision-style ResNets (resnet18/50, cifar_resnet18, "
                         f"small_resnet) and VGGs, got {type(model).__name__}")
    blocks = _resnet_blocks(model)
    groups: list[list[str]] = [["conv1"]]
    producer: dict[str, str | None] = {"conv1": None}
    for name, block in blocks:
        count = 3 if isinstance(block, Bottleneck) else 2
        convs = [f"{name}.conv{i}" for i in range(1, count + 1)]
        stream = groups[-1]
        producer[convs[0]] = stream[0]
        for prev, conv in zip(convs[:-1], convs[1:]):
            producer[conv] = prev
        if block.downsample is not None:
            if not (isinstance(block.downsample, nn.Sequential) and isinstance(block.downsample[0], nn.Conv2d)):
                raise ValueError(f"structured=True: {name}.downsample must be Sequential(conv, norm)")
            ds = f"{name}.downsample.0"
            producer[ds] = stream[0]
            groups.append([ds, convs[-1]])
        else:  # identity shortcut: the block output adds to the incoming stream
            stream.append(convs[-1])
    return groups, producer


def _vgg_chain(model: nn.Module) -> tuple[list[list[str]], dict[str, str | None]]:
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Sequential):
        raise ValueError("structured=True: the VGG's features must be an nn.Sequential")
    convs = [f"features.{index}" for index, m in enumerate(features) if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("structured=True: the VGG has no conv in features")
    outside = [name for name, m in model.named_modules()
               if isinstance(m, nn.Conv2d) and name not in convs]
    if outside:
        raise ValueError(f"structured=True: convs outside the VGG's features: {outside}")
    return [[name] for name in convs], dict(zip(convs, [None] + convs[:-1]))


def structure_channels(model: nn.Module, cap_layers: int = 5, cap_sparsity: float = 0.25) -> nn.Module:
    """Share residual-group scores (ResNets), wire input masks and mark the capped early layers (in place)."""
    if cap_layers < 0 or not 0 <= cap_sparsity < 1:
        raise ValueError(f"cap_layers must be >= 0 and cap_sparsity in [0, 1), got {cap_layers}, {cap_sparsity}")
    groups, producer = residual_groups(model)
    convs = {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    for name, m in convs.items():
        if not isinstance(m, MaskedConv2d):
            raise ValueError(f"structured=True needs every conv masked; {name!r} is not (do not exclude convs)")
        if m.granularity != "channel":
            raise ValueError("structured=True needs granularity='channel'")
        if m.groups != 1:
            raise ValueError(f"structured=True does not support grouped convs ({name!r})")
    unknown = set(convs) - set(producer)
    if unknown:
        raise ValueError(f"structured=True: convs outside the model's layout: {sorted(unknown)}")
    for members in groups:
        layers = [convs[n] for n in members]
        if len({m.out_channels for m in layers}) != 1:
            raise ValueError(f"residual group {members} has mismatched channel counts")
        with torch.no_grad():
            init = torch.stack([m.scores.detach() for m in layers]).mean(0)
        shared = nn.Parameter(init, requires_grad=layers[0].scores.requires_grad)
        for m in layers:
            m.scores = shared
    for name, m in convs.items():
        src = producer[name]
        object.__setattr__(m, _IN_SOURCE, convs[src] if src is not None else None)
        m.channel_cap = None
    ordered = [name for name in convs]  # module order
    for name in ordered[:cap_layers]:
        convs[name].channel_cap = float(cap_sparsity)
    model.structured_channel = {"cap_layers": int(cap_layers), "cap_sparsity": float(cap_sparsity)}
    return model


def structured_config(model: nn.Module) -> dict | None:
    """``{"cap_layers", "cap_sparsity"}`` of a structured model, else None."""
    for module in model.modules():  # the ResNet itself, or inside a wrapper
        cfg = getattr(module, "structured_channel", None)
        if isinstance(cfg, dict):
            return dict(cfg)
    return None


def unique_score_units(layers) -> list[tuple[nn.Parameter, list]]:
    """[(scores parameter, [layers sharing it])], each parameter once, in first-seen order."""
    units: dict[int, tuple[nn.Parameter, list]] = {}
    for layer in layers:
        units.setdefault(id(layer.scores), (layer.scores, []))[1].append(layer)
    return list(units.values())


@torch.no_grad()
def apply_channel_cap(layers) -> None:
    """After the thresholds are set: any unit (shared score vector) with a capped member that
    prunes more than its cap gets its own threshold keeping ``ceil((1 - cap) * C)`` channels."""
    for scores, members in unique_score_units(layers):
        caps = [m.channel_cap for m in members if getattr(m, "channel_cap", None) is not None]
        if not caps:
            continue
        cap = min(caps)
        channels = scores.numel()
        keep_min = math.ceil((1 - cap) * channels - 1e-9)
        if int(members[0].score_mask().sum()) >= keep_min:
            continue
        k = channels - keep_min
        magnitudes = scores.detach().abs().flatten()
        t = (torch.kthvalue(magnitudes, k).values if k >= 1
             else torch.tensor(float("-inf"), dtype=magnitudes.dtype, device=magnitudes.device))
        for m in members:
            m.set_threshold(t)


def channel_density(model: nn.Module) -> float:
    """Fraction of channel scores kept, each shared score vector counted once (what the global
    channel threshold of ``set_density`` targets before the early-layer cap)."""
    kept = total = 0
    for scores, members in unique_score_units([m for _, m in masked_layers(model)]):
        kept += int(members[0].score_mask().sum())
        total += scores.numel()
    return kept / total

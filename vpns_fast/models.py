"""Networks for VPNs: torchvision ImageNet models (pretrained source), CIFAR and small ResNets.

Every Conv2d/Linear is a plain ``nn.Conv2d``/``nn.Linear`` so that ``vpns_fast.pruning`` can swap
them for masked layers; state_dict keys follow torchvision so published checkpoints load as is.

Pretrained weights never come silently from nowhere: an explicit file (``weights=PATH``), else the
torch hub cache, else a download; offline with no file is a ``FileNotFoundError`` that names the
expected paths.
"""
from __future__ import annotations

import http.client
import os
import urllib.parse
from collections.abc import Mapping
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

__all__ = [
    "MODELS",
    "build_model",
    "default_input_size",
    "source_num_classes",
    "load_weights",
    "load_state_dict_file",
    "pretrained_weights_info",
]

MODELS = ("resnet18", "resnet50", "vgg16", "cifar_resnet18", "small_resnet")

# The torchvision weight sets the paper uses (docs/method.md §1).
_TORCHVISION = {
    "resnet18": (torchvision.models.resnet18, torchvision.models.ResNet18_Weights.IMAGENET1K_V1),
    "resnet50": (torchvision.models.resnet50, torchvision.models.ResNet50_Weights.IMAGENET1K_V2),
    "vgg16": (torchvision.models.vgg16, torchvision.models.VGG16_Weights.IMAGENET1K_V1),
}
# Head parameter names, used to read the source class count from a checkpoint before building.
_HEAD_WEIGHT_KEY = {
    "resnet18": "fc.weight",
    "resnet50": "fc.weight",
    "vgg16": "classifier.6.weight",
    "cifar_resnet18": "fc.weight",
    "small_resnet": "fc.weight",
}
_SMALL_DEFAULT_CLASSES = 10

# Set VPNS_FAST_OFFLINE=1 to never attempt a download (e.g. on air-gapped clusters where a
# connection attempt would hang instead of failing fast).
_OFFLINE_ENV = "VPNS_FAST_OFFLINE"


def _check_name(name: str) -> str:
    key = name.lower()
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {MODELS}")
    return key


def default_input_size(name: str) -> int:
    """Side length of the images the architecture was designed for."""
    return 224 if _check_name(name) in _TORCHVISION else 32


def source_num_classes(model: nn.Module) -> int:
    """Number of outputs of the model's final linear layer (the source label space)."""
    last = None
    for module in model.modules():
        # Duck-typed so that masked replacements of nn.Linear still count.
        if isinstance(module, nn.Linear) or (
            hasattr(module, "out_features") and hasattr(module, "in_features")
        ):
            last = module
    if last is None:
        raise ValueError("model has no linear layer")
    return int(last.out_features)


# --------------------------------------------------------------------------------------------
# Architectures


class SmallResNet(ResNet):
    """CIFAR-style ResNet: three stages of BasicBlocks (default widths 16/32/64, one block each).

    Reuses torchvision's ``ResNet._make_layer`` so block layout and key names match torchvision's.
    """

    def __init__(
        self,
        num_classes: int = _SMALL_DEFAULT_CLASSES,
        widths: tuple[int, ...] = (16, 32, 64),
        blocks: tuple[int, ...] = (1, 1, 1),
    ) -> None:
        nn.Module.__init__(self)  # ResNet.__init__ hard-codes four 64..512 stages
        self._norm_layer = nn.BatchNorm2d
        self.inplanes = widths[0]
        self.dilation = 1
        self.groups = 1
        self.base_width = 64
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.stages = len(widths)
        for index, (width, count) in enumerate(zip(widths, blocks)):
            layer = self._make_layer(BasicBlock, width, count, stride=1 if index == 0 else 2)
            setattr(self, f"layer{index + 1}", layer)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[-1], num_classes)
        _init_resnet(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for index in range(self.stages):
            x = getattr(self, f"layer{index + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _init_resnet(model: nn.Module) -> None:
    # Same init as torchvision's ResNet.__init__, for modules it did not create.
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.constant_(module.weight, 1)
            nn.init.constant_(module.bias, 0)


def _cifar_resnet18(num_classes: int) -> ResNet:
    model = ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
    # 32x32 inputs: a 3x3 stride-1 stem and no max-pool keep the spatial resolution.
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


def _build_architecture(name: str, num_classes: int) -> nn.Module:
    if name in _TORCHVISION:
        return _TORCHVISION[name][0](weights=None, num_classes=num_classes)
    if name == "cifar_resnet18":
        return _cifar_resnet18(num_classes)
    return SmallResNet(num_classes)


def _replace_head(model: nn.Module, num_classes: int) -> None:
    last_name = None
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last_name = module_name
    if last_name is None:
        raise ValueError("model has no linear head to replace")
    parent_name, _, child_name = last_name.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, child_name)
    setattr(parent, child_name, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))


# --------------------------------------------------------------------------------------------
# Weights


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state_dict from a ``.safetensors`` file or a ``torch.save`` file (.pt/.pth)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state: Any = load_file(path, device="cpu")
    else:
        # weights_only: a checkpoint is data, never code to execute.
        state = torch.load(path, map_location="cpu", weights_only=True)
    # Training checkpoints often wrap the weights; DataParallel prefixes every key.
    for wrapper_key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper_key), Mapping):
            state = state[wrapper_key]
            break
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} does not hold a state_dict (got {type(state).__name__})")
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    return dict(state)


def _format_keys(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _load_state_dict_checked(
    model: nn.Module, state: Mapping[str, torch.Tensor], source: str, strict: bool = True
) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{key}: checkpoint {tuple(state[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in set(expected) & set(state)
        if tuple(state[key].shape) != tuple(expected[key].shape)
    )
    if mismatched or (strict and (missing or unexpected)):
        lines = [f"weights in {source} do not match the {type(model).__name__} model:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_format_keys(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_format_keys(unexpected)}")
        if mismatched:
            lines.append(f"  shape mismatches ({len(mismatched)}): {_format_keys(mismatched)}")
        raise RuntimeError("\n".join(lines))
    model.load_state_dict(state, strict=strict)


def load_weights(model: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> nn.Module:
    """Load a .pt/.pth/.safetensors state_dict into ``model``; mismatches raise RuntimeError."""
    _load_state_dict_checked(model, load_state_dict_file(path), os.fspath(path), strict=strict)
    return model


def pretrained_weights_info(name: str) -> dict[str, Any]:
    """Where pretrained weights for ``name`` are looked for: url and hub-cache candidate paths."""
    key = _check_name(name)
    if key not in _TORCHVISION:
        raise ValueError(
            f"{name!r} has no published pretrained weights; pass weights=PATH to a checkpoint"
        )
    weights = _TORCHVISION[key][1]
    file_name = os.path.basename(urllib.parse.urlparse(weights.url).path)
    checkpoints = os.path.join(torch.hub.get_dir(), "checkpoints")
    stem = os.path.splitext(file_name)[0]
    return {
        "weights": weights,
        "url": weights.url,
        "file_name": file_name,
        "cache_paths": [
            os.path.join(checkpoints, file_name),
            os.path.join(checkpoints, stem + ".safetensors"),
        ],
    }


# Exceptions a failed download raises (URLError, socket errors and timeouts are OSError).
_NETWORK_ERRORS = (OSError, http.client.HTTPException)


def _download_state_dict(weights: Any) -> dict[str, torch.Tensor]:
    # A separate function so tests can forbid network access by replacing it.
    return weights.get_state_dict(progress=True, check_hash=True)


def _pretrained_state_dict(name: str) -> tuple[dict[str, torch.Tensor], str]:
    info = pretrained_weights_info(name)
    for path in info["cache_paths"]:
        if os.path.isfile(path):
            return load_state_dict_file(path), path
    reason = f"offline ({_OFFLINE_ENV} is set)"
    if not os.environ.get(_OFFLINE_ENV):
        try:
            return _download_state_dict(info["weights"]), info["url"]
        except _NETWORK_ERRORS as error:
            reason = f"download failed: {type(error).__name__}: {error}"
    paths = "\n".join(f"  {path}" for path in info["cache_paths"])
    raise FileNotFoundError(
        f"pretrained weights for {name} ({info['weights']}) are not available locally and could "
        f"not be downloaded ({reason}).\nLooked for:\n{paths}\n"
        f"Fix: on a machine with internet, download {info['url']} and either copy it to the first "
        f"path above or pass build_model({name!r}, weights='/path/to/{info['file_name']}') "
        f"(a torchvision state_dict saved with torch.save, or a .safetensors file)."
    )


def build_model(
    name: str,
    num_classes: int | None = None,
    weights: str | os.PathLike | None = None,
    *,
    pretrained: bool = False,
) -> nn.Module:
    """Build ``name`` (one of MODELS), optionally with pretrained weights.

    With weights (``weights=PATH`` or ``pretrained=True``) the checkpoint's classifier is kept when
    ``num_classes`` is None, else replaced by a fresh ``nn.Linear(in, num_classes)``.
    Without weights ``num_classes`` defaults to 1000 (torchvision models) or 10 (the small ones).
    """
    key = _check_name(name)
    if weights is None and not pretrained:
        default = 1000 if key in _TORCHVISION else _SMALL_DEFAULT_CLASSES
        return _build_architecture(key, default if num_classes is None else num_classes)

    if weights is not None:
        source = os.fspath(weights)
        state = load_state_dict_file(source)
    else:
        state, source = _pretrained_state_dict(key)
    head_key = _HEAD_WEIGHT_KEY[key]
    if head_key not in state:
        raise RuntimeError(f"weights in {source} have no {head_key!r}; not a {key} checkpoint?")
    model = _build_architecture(key, int(state[head_key].shape[0]))
    _load_state_dict_checked(model, state, source)
    if num_classes is not None:
        _replace_head(model, num_classes)
    return model

"""Networks for VPNs: every torchvision classification model, timm models, a user's own factory,
and the two small CIFAR-style ResNets.

A model is named in one of four ways (``MODEL_NAMING``):

* a built-in name of ``MODELS``: the three torchvision weight sets the paper uses and the small ones;
* any torchvision classification model (``torchvision.models.list_models(module=torchvision.models)``),
  e.g. ``mobilenet_v3_small``, ``vit_b_16``; pretrained weights are its weights enum's ``DEFAULT``;
* ``timm:NAME`` when timm is installed (``pip install vpns_fast[timm]``);
* ``package.module:factory`` for a user's own network: ``factory(num_classes=N, **kwargs)`` (``num_classes``
  only when the factory accepts it) must return an ``nn.Module``.

Every Conv2d/Linear of the built-in models is a plain ``nn.Conv2d``/``nn.Linear`` so that
``vpns_fast.pruning`` can swap them for masked layers; state_dict keys follow torchvision so published
checkpoints load as is.

Pretrained weights never come silently from nowhere: an explicit file (``weights=PATH``), else the
torch hub cache, else a download; offline with no file is a ``FileNotFoundError`` that names the
expected paths.
"""
from __future__ import annotations

import functools
import http.client
import importlib
import inspect
import os
import pickle
import re
import urllib.parse
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from vpns_fast.errors import exception_reason

__all__ = [
    "MODELS",
    "MODEL_NAMING",
    "build_model",
    "build_model_spec",
    "default_input_size",
    "model_kind",
    "source_num_classes",
    "torchvision_model_names",
    "load_weights",
    "load_state_dict_file",
    "pretrained_weights_info",
]

MODELS = ("resnet18", "resnet50", "vgg16", "cifar_resnet18", "small_resnet")
MODEL_NAMING = ("a torchvision classification model name (resnet18, mobilenet_v3_small, vit_b_16, ...: "
                "torchvision.models.list_models(module=torchvision.models)), 'timm:NAME' (pip install "
                "vpns_fast[timm]), 'package.module:factory' for your own network, or one of the small models "
                "cifar_resnet18, small_resnet")

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
_TIMM_EXTRA = "pip install 'vpns_fast[timm]' (or pip install timm)"
# An unusual class count: the parameters whose first dimension takes it are the classifier's.
_PROBE_CLASSES = 1237

# Set VPNS_FAST_OFFLINE=1 to never attempt a download (e.g. on air-gapped clusters where a
# connection attempt would hang instead of failing fast).
_OFFLINE_ENV = "VPNS_FAST_OFFLINE"


@functools.cache
def torchvision_model_names() -> tuple[str, ...]:
    """Every torchvision classification model (detection, segmentation, video and quantized ones live in
    submodules and are not listed)."""
    return tuple(torchvision.models.list_models(module=torchvision.models))


def model_kind(name: str) -> tuple[str, str]:
    """``(kind, key)`` of a model name: kind ``builtin``, ``torchvision``, ``timm`` or ``factory``."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model: expected a model name ({MODEL_NAMING}), got {name!r}")
    text = name.strip()
    if text.lower().startswith("timm:"):
        if not text[5:]:
            raise ValueError(f"model: expected 'timm:NAME', got {name!r}")
        return "timm", text[5:]
    if ":" in text:
        module, _, factory = text.partition(":")
        if not module or not factory:
            raise ValueError(f"model: expected 'package.module:factory', got {name!r}")
        return "factory", text
    key = text.lower()
    if key in MODELS:
        return "builtin", key
    if key in torchvision_model_names():
        return "torchvision", key
    raise ValueError(f"unknown model {name!r}; name a model as {MODEL_NAMING}")


def _check_name(name: str) -> str:
    kind, key = model_kind(name)
    if kind != "builtin":
        raise ValueError(f"{name!r} is not a built-in model ({', '.join(MODELS)})")
    return key


def _torchvision_weights(key: str):
    return torchvision.models.get_model_weights(key).DEFAULT


def _import_timm():
    try:
        import timm
    except ImportError as exc:
        raise ValueError(f"model: timm models need the optional extra timm: {_TIMM_EXTRA} ({exc})") from None
    return timm


def default_input_size(name: str | None) -> int:
    """Side length of the images the architecture was designed for (224 for a user's factory, and for
    ``None``: a module passed as an object, which names no architecture)."""
    if name is None:
        return 224
    kind, key = model_kind(name)
    if kind == "builtin":
        return 224 if key in _TORCHVISION else 32
    if kind == "torchvision":
        return int(_torchvision_weights(key).transforms().crop_size[0])
    if kind == "timm":
        timm = _import_timm()
        config = timm.get_pretrained_cfg(key) if timm.is_model(key) else None
        return int(config.input_size[-1]) if config is not None and config.input_size else 224
    return 224


def source_num_classes(model: nn.Module, input_size: int | None = None) -> int:
    """Number of outputs of the model (the source label space).

    With ``input_size``: measured by a dry forward of one ``(1, 3, S, S)`` image in eval mode, which works for
    any classifier. Without: the ``out_features`` of the last linear layer (masked replacements included).
    """
    if input_size is not None:
        return _dry_forward_classes(model, int(input_size))
    last = None
    for module in model.modules():
        # Duck-typed so that masked replacements of nn.Linear still count.
        if isinstance(module, nn.Linear) or (
            hasattr(module, "out_features") and hasattr(module, "in_features")
        ):
            last = module
    if last is None:
        raise ValueError("model has no linear layer; pass input_size to count its outputs by a dry forward")
    return int(last.out_features)


@torch.no_grad()
def _dry_forward_classes(model: nn.Module, input_size: int) -> int:
    modes = {module: module.training for module in model.modules()}
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    model.eval()  # eval: batch norm reads its running statistics and updates none, dropout is off
    try:
        output = model(torch.zeros(1, 3, input_size, input_size, device=device))
    finally:
        for module, mode in modes.items():
            module.training = mode
    if not isinstance(output, torch.Tensor) or output.dim() != 2:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ValueError(f"model: expected the network to return logits of shape (batch, classes), got {shape}")
    return int(output.shape[1])


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


def load_weights_only(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` onto the CPU: a checkpoint is data, never code to execute.
    Torch's note on a pickle protocol it did not write is not shown: the load succeeds, or the caller refuses
    the file by name."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        return torch.load(path, map_location="cpu", weights_only=True)


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state_dict from a ``.safetensors`` file or a ``torch.save`` file (.pt/.pth)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state: Any = load_file(path, device="cpu")
        else:
            state = load_weights_only(path)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"weights file {path}: holds Python objects a weights-only load refuses (a plain pickle, "
                         f"not tensors saved by torch.save); it is never executed") from exc
    except Exception as exc:  # torch.load and safetensors raise many kinds for a file that is not theirs
        raise ValueError(f"weights file {path}: not a state_dict saved by torch.save or safetensors "
                         f"({exception_reason(exc, 160)})") from exc
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
    """Where pretrained weights for a torchvision ``name`` are looked for: url and hub-cache candidate paths."""
    kind, key = model_kind(name)
    if kind == "builtin" and key in _TORCHVISION:
        weights = _TORCHVISION[key][1]
    elif kind == "torchvision":
        weights = _torchvision_weights(key)
    else:
        raise ValueError(
            f"{name!r} has no published pretrained weights; pass weights=PATH to a checkpoint"
        )
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
    paths = " or ".join(info["cache_paths"])
    raise FileNotFoundError(  # one line: the CLI prints it as its error
        f"pretrained weights for {name} ({info['weights']}) are not available locally and could "
        f"not be downloaded ({reason}); looked for {paths}. Fix: on a machine with internet, download "
        f"{info['url']} and either copy it to the first path or pass the file as the weights (--weights FILE, "
        f"build_model({name!r}, weights='/path/to/{info['file_name']}'): a torchvision state_dict saved with "
        f"torch.save, or a .safetensors file)"
    )


# --------------------------------------------------------------------------------------------
# Any torchvision model, timm, and a user's factory

# Settings torchvision's builders apply when they load published weights, applied here too since the
# weights are loaded from the hub cache or a file rather than through the builder.
_AUX_HEAD_PREFIXES = {"googlenet": ("aux1.", "aux2."), "inception_v3": ("AuxLogits.",)}


def _torchvision_defaults(key: str, with_weights: bool) -> dict:
    """Architecture arguments this package sets: no auxiliary heads (a training forward returns one logits
    tensor), torchvision's input transform when its weights are loaded, and a ViT built for the input size
    its default weights use."""
    defaults: dict[str, Any] = {}
    if key in _AUX_HEAD_PREFIXES:
        defaults.update(aux_logits=False, init_weights=not with_weights)
        if with_weights:
            defaults["transform_input"] = True
    if key.startswith("vit_"):
        defaults["image_size"] = int(_torchvision_weights(key).meta["min_size"][0])
    return defaults


# DenseNet's published files use the old key names `norm.1` for `norm1` (torchvision renames them on load).
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def _torchvision_state(key: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if key.startswith("densenet"):
        state = {(m.group(1) + m.group(2) if (m := _DENSENET_OLD_KEY.match(k)) else k): v for k, v in state.items()}
    prefixes = _AUX_HEAD_PREFIXES.get(key, ())
    return {k: v for k, v in state.items() if not k.startswith(prefixes)} if prefixes else state


def _import_factory(name: str):
    module_name, _, attribute = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"model {name!r}: cannot import module {module_name!r} ({exc}); is it on PYTHONPATH?") \
            from None
    factory: Any = module
    for part in attribute.split("."):
        if not hasattr(factory, part):
            raise ValueError(f"model {name!r}: module {module_name!r} has no {attribute!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ValueError(f"model {name!r}: {attribute!r} is a {type(factory).__name__}, not a callable factory")
    return factory


def _accepts(function, argument: str) -> bool:
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return False
    return argument in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def _construct(kind: str, key: str, num_classes: int | None, kwargs: dict) -> nn.Module:
    """The architecture with random weights; ``num_classes`` None: the architecture's own default."""
    if kind == "torchvision":
        classes = {} if num_classes is None else {"num_classes": num_classes}
        return torchvision.models.get_model(key, weights=None, **classes, **kwargs)
    if kind == "timm":
        timm = _import_timm()
        if not timm.is_model(key):
            raise ValueError(f"unknown timm model {key!r}; see timm.list_models()")
        classes = {} if num_classes is None else {"num_classes": num_classes}
        return timm.create_model(key, pretrained=False, **classes, **kwargs)
    factory = _import_factory(key)
    takes_classes = num_classes is not None and _accepts(factory, "num_classes")
    model = factory(**({"num_classes": num_classes} if takes_classes else {}), **kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {key!r}: the factory returned a {type(model).__name__}, expected an nn.Module")
    if num_classes is not None and not takes_classes:
        # a factory without num_classes: its last linear layer is the head
        if any(isinstance(m, nn.Linear) for m in model.modules()) and source_num_classes(model) != num_classes:
            _replace_head(model, num_classes)
    return model


def _head_keys(kind: str, key: str, kwargs: dict) -> list[str]:
    """State keys of the classifier: the parameters whose first dimension follows ``num_classes``."""
    try:
        with torch.device("meta"):  # no memory, no init cost
            probe = _construct(kind, key, _PROBE_CLASSES, kwargs)
    except (NotImplementedError, RuntimeError):  # builders that read tensor values (RegNet) need real ones
        probe = _construct(kind, key, _PROBE_CLASSES, kwargs)
    keys = [k for k, v in probe.state_dict().items() if v.dim() and v.shape[0] == _PROBE_CLASSES]
    if not keys:
        raise ValueError(f"model {key!r}: cannot find its classifier (no parameter follows num_classes)")
    return keys


def _pretrained_timm(key: str, kwargs: dict) -> nn.Module:
    timm = _import_timm()
    if os.environ.get(_OFFLINE_ENV):  # timm reads the hub itself: offline, it is not asked at all
        problem = f"are not read while {_OFFLINE_ENV} is set (timm fetches them through the Hugging Face hub)"
    else:
        try:
            return timm.create_model(key, pretrained=True, **kwargs)
        except Exception as error:  # hub and network errors come in many types
            problem = (f"are not in the Hugging Face hub cache and could not be downloaded "
                       f"({exception_reason(error)})")
    raise FileNotFoundError(
        f"pretrained weights for timm:{key} {problem}. Fix: download them on a machine with internet "
        f"(timm.create_model({key!r}, pretrained=True)) and save model.state_dict() to a file, then pass "
        f"weights='/path/to/file.pth'."
    )


def _build_any(kind: str, key: str, name: str, num_classes: int | None, weights, pretrained: bool,
               kwargs: dict) -> tuple[nn.Module, dict]:
    """(model, the kwargs that rebuild it with :func:`build_model`) for a torchvision, timm or factory name."""
    with_weights = weights is not None or pretrained
    if kind == "torchvision":
        kwargs = {**_torchvision_defaults(key, with_weights), **kwargs}
    if not with_weights:
        model = _construct(kind, key, num_classes, kwargs)
        return model, {**({} if num_classes is None else {"num_classes": num_classes}), **kwargs}
    if weights is None and kind == "timm":
        model = _pretrained_timm(key, kwargs)
        if num_classes is not None:
            model.reset_classifier(num_classes)
        return model, {"num_classes": int(model.num_classes), **kwargs}
    if weights is None and kind == "factory":
        raise ValueError(f"{name!r} has no published pretrained weights; pass weights=PATH to a checkpoint")
    if weights is not None:
        source = os.fspath(weights)
        state = load_state_dict_file(source)
    else:
        state, source = _pretrained_state_dict(key)
    if kind == "torchvision":
        state = _torchvision_state(key, state)
    heads = _head_keys(kind, key, kwargs)
    if heads[0] not in state:
        raise ValueError(f"weights in {source} have no {heads[0]!r}; not a {name} checkpoint?")
    source_classes = int(state[heads[0]].shape[0])
    classes = source_classes if num_classes is None else num_classes
    model = _construct(kind, key, classes, kwargs)
    if classes == source_classes:
        _load_state_dict_checked(model, state, source)
    else:  # a fresh head of `num_classes` outputs, as the architecture initialises it; the body from the file
        body = {k: v for k, v in state.items() if k not in heads}
        _load_state_dict_checked(model, {**model.state_dict(), **body}, source)
    return model, {"num_classes": classes, **kwargs}


# A file (a checkpoint, an export, a run's config.json) records its network by name, and a factory name
# ('package.module:factory') is code: rebuilding the network imports that module and calls that function with the
# file's own arguments. A crafted checkpoint naming 'os:system' ran a shell command when `vpns report` read it (an
# outside review, 2026-12-06). So a factory a file names is called only where it is trusted: named by this
# process's own caller (build_model / build_model_spec with it, as `vpns prune --model` does), or listed in this
# environment variable (comma-separated factory names; `*` trusts any).
TRUSTED_FACTORIES_VARIABLE = "VPNS_TRUSTED_FACTORIES"
_FACTORIES_NAMED_HERE: set[str] = set()


class UntrustedFactoryError(ValueError):
    """A file names a model factory that nothing has said to trust (see TRUSTED_FACTORIES_VARIABLE)."""


def check_file_model_name(name: str, source: str) -> None:
    """UntrustedFactoryError when the model name a file records (``source`` says which file, for the message) is a
    factory that is not trusted; any other name (torchvision, timm, the small models) passes."""
    try:
        kind, key = model_kind(name)
    except ValueError:  # not a model name at all: building it fails by itself, running nothing
        return
    if kind != "factory":
        return
    listed = {item.strip() for item in os.environ.get(TRUSTED_FACTORIES_VARIABLE, "").split(",") if item.strip()}
    if key in _FACTORIES_NAMED_HERE or key in listed or "*" in listed:
        return
    raise UntrustedFactoryError(
        f"{source} names its network by the factory {key!r}: rebuilding it would import that module and run that "
        f"function. If you trust the file, set {TRUSTED_FACTORIES_VARIABLE}={key} (comma-separated names, * for "
        "any); or build the network yourself and pass it as model=")


# Builder arguments a file may not set: they read or fetch other files (build_model's `weights` and `pretrained`,
# timm's `checkpoint_path`, `pretrained_cfg_overlay` with its URL, `cache_dir`), which a writer of the file has no
# business choosing for the reader (a review of the trusted-factory change).
_FILE_REFUSED_ARGUMENTS = ("weights", "pretrained", "checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay",
                           "cache_dir")


def check_file_model_record(name: str, kwargs, source: str) -> None:
    """:func:`check_file_model_name`, and UntrustedFactoryError where the file's builder arguments ``kwargs`` would
    have the builder read or fetch other files."""
    check_file_model_name(name, source)
    refused = sorted(key for key in (kwargs or {}) if key in _FILE_REFUSED_ARGUMENTS)
    if refused:
        raise UntrustedFactoryError(f"{source} sets the network builder's {', '.join(map(repr, refused))}, which "
                                    "would read or fetch other files: a file may not choose them")


def build_model_from_file(name: str, kwargs: dict, source: str) -> nn.Module:
    """``build_model(name, **kwargs)`` for the network a file records, after :func:`check_file_model_record`."""
    check_file_model_record(name, kwargs, source)
    return _built_with_spec(name, **kwargs)[0]


def build_model_spec(
    name: str,
    num_classes: int | None = None,
    weights: str | os.PathLike | None = None,
    *,
    pretrained: bool = False,
    **kwargs: Any,
) -> tuple[nn.Module, dict]:
    """Like :func:`build_model`, also returning ``{"name", "kwargs"}``: what rebuilds the same architecture
    with ``build_model(spec["name"], **spec["kwargs"])`` (the record a checkpoint keeps)."""
    kind, key = model_kind(name)
    if kind == "factory":  # named by the caller: files that name it later may rebuild it (check_file_model_name)
        _FACTORIES_NAMED_HERE.add(key)
    return _built_with_spec(name, num_classes, weights, pretrained=pretrained, **kwargs)


def _built_with_spec(name: str, num_classes: int | None = None, weights: str | os.PathLike | None = None, *,
                     pretrained: bool = False, **kwargs: Any) -> tuple[nn.Module, dict]:
    """:func:`build_model_spec` without counting a factory as named by this process's caller."""
    kind, key = model_kind(name)
    if kind == "builtin":
        if kwargs:
            raise ValueError(f"model {name!r} takes no architecture arguments, got {sorted(kwargs)}")
        model = _build_builtin(key, num_classes, weights, pretrained)
        return model, {"name": name, "kwargs": {"num_classes": source_num_classes(model)}}
    model, rebuild = _build_any(kind, key, name, num_classes, weights, pretrained, dict(kwargs))
    return model, {"name": name, "kwargs": rebuild}


def build_model(
    name: str,
    num_classes: int | None = None,
    weights: str | os.PathLike | None = None,
    *,
    pretrained: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Build the model ``name`` names (see ``MODEL_NAMING``), optionally with pretrained weights.

    With weights (``weights=PATH`` or ``pretrained=True``) the checkpoint's classifier is kept when
    ``num_classes`` is None, else replaced by a fresh one of ``num_classes`` outputs. Without weights
    ``num_classes`` defaults to the architecture's own (1000 for torchvision models, 10 for the small ones).
    ``kwargs`` go to the torchvision builder, ``timm.create_model`` or the factory.
    """
    return build_model_spec(name, num_classes, weights, pretrained=pretrained, **kwargs)[0]


def _build_builtin(key: str, num_classes: int | None, weights, pretrained: bool) -> nn.Module:
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
        raise ValueError(f"weights in {source} have no {head_key!r}; not a {key} checkpoint?")
    model = _build_architecture(key, int(state[head_key].shape[0]))
    _load_state_dict_checked(model, state, source)
    if num_classes is not None:
        _replace_head(model, num_classes)
    return model

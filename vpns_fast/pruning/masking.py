"""Pruning state of a model: turning layers into masked layers, thresholds, masks, reports,
folding the masks back into a plain model, and what each training stage may update."""
from __future__ import annotations

import copy
import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from vpns_fast import ops
from vpns_fast.nn.masked_layers import (
    GRANULARITIES,
    MASKED_TYPES,
    SCORE_INITS,
    MaskedConv2d,
    MaskedLinear,
    MaskLaunchBatching,
    masked_layers,
    remove_mask_launch_batching,
)
from vpns_fast.pruning.structured import apply_channel_cap, residual_groups, structure_channels, unique_score_units

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)


def _excluded(name: str, exclude: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude)


def sparsify(model: nn.Module, granularity: str = "unstructured", score_init: str = "scaled",
             exclude: str | Sequence[str] | None = None, *, structured: bool = False, cap_layers: int = 5,
             cap_sparsity: float = 0.25) -> nn.Module:
    """Replace every Conv2d and Linear of ``model`` in place by its masked version; returns ``model``.

    ``exclude``: glob patterns on qualified module names (``"fc"``, ``"layer4.*"``) to leave dense.
    The masked layers share the original weight and bias parameters. Every threshold starts at
    ``-inf`` (all weights kept) until :func:`set_density` is called.

    ``structured=True`` (docs/method.md §9; torchvision-style ResNets and VGGs, ``granularity="channel"`` only):
    the classifier stays dense, residual groups (ResNets) share one score vector, convs are input-masked by their
    producer's channel mask, and the first ``cap_layers`` convs keep at most ``cap_sparsity`` of
    their channels pruned (see :mod:`vpns_fast.pruning.structured`).
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if score_init not in SCORE_INITS:
        raise ValueError(f"score_init must be one of {SCORE_INITS}, got {score_init!r}")
    exclude = [exclude] if isinstance(exclude, str) else list(exclude or ())
    if structured:
        if granularity != "channel":
            raise ValueError(f"structured=True needs granularity='channel', got {granularity!r}")
        residual_groups(model)  # ValueError for anything but a torchvision-style ResNet or VGG
        excluded_convs = [n for n, m in model.named_modules() if type(m) is nn.Conv2d and _excluded(n, exclude)]
        if excluded_convs:
            raise ValueError(f"structured=True needs every conv masked; exclude leaves {excluded_convs} dense")
        exclude += [name for name, m in model.named_modules() if type(m) is nn.Linear]  # classifier stays dense
    if any(isinstance(m, MASKED_TYPES) for m in model.modules()):
        raise ValueError("model already has masked layers; sparsify a dense model")
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) in (nn.Conv2d, nn.Linear) and not _excluded(name, exclude)]
    if not targets:
        raise ValueError("model has no Conv2d or Linear layer left to sparsify"
                         + (f" after exclude={exclude}" if exclude else ""))
    for name, module in targets:
        masked_cls = MaskedConv2d if isinstance(module, nn.Conv2d) else MaskedLinear
        if not name:
            raise ValueError("the model itself is a Conv2d/Linear; wrap it in a container to sparsify it")
        model.set_submodule(name, masked_cls.from_dense(module, granularity, score_init))
    if structured:
        structure_channels(model, cap_layers, cap_sparsity)
    MaskLaunchBatching(model)  # one mask launch per forward on the triton backend
    return model


def _require_masked(model: nn.Module) -> list[tuple[str, nn.Module]]:
    layers = masked_layers(model)
    if not layers:
        raise ValueError("model has no masked layers; call vpns_fast.sparsify(model) first")
    return layers


@torch.no_grad()
def set_density(model: nn.Module, density: float, scope: str = "global") -> torch.Tensor:
    """Set every masked layer's threshold so that a ``density`` fraction of scores is kept.

    ``scope="global"``: one threshold over all layers' scores (VPNs); ``"layer"``: each layer keeps
    its own top ``density`` (HYDRA's layer-wise pruning). Returns the threshold(s).

    A score parameter shared by several layers (structured mode's residual groups) counts once,
    and all its layers get the same threshold (with ``scope="layer"`` one entry per shared score
    vector). Layers marked with a ``channel_cap`` (structured mode's early layers) are then capped,
    see :func:`vpns_fast.pruning.structured.apply_channel_cap`.
    """
    layers = [layer for _, layer in _require_masked(model)]
    units = unique_score_units(layers)
    scores = [param.detach() for param, _ in units]
    dtypes = {s.dtype for s in scores}
    if len(dtypes) > 1:  # the selection must see every score exactly as stored
        raise ValueError(f"masked layers hold scores of several dtypes {sorted(map(str, dtypes))}")
    thresholds = ops.topk_threshold(scores, density, scope)
    for i, (_, members) in enumerate(units):
        for layer in members:
            layer.set_threshold(thresholds if scope == "global" else thresholds[i])
    if any(getattr(layer, "channel_cap", None) is not None for layer in layers):
        apply_channel_cap(layers)
    return thresholds


def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """{qualified layer name: boolean mask shaped like its weight} (the effective mask: in structured
    mode the layer's output-channel mask times its producer's mask on the input channels)."""
    return {name: layer.weight_mask() for name, layer in _require_masked(model)}


def actual_density(model: nn.Module) -> float:
    """Fraction of masked-layer weights that are kept (effective masks, input masking included)."""
    kept = total = 0
    for _, layer in _require_masked(model):
        kept += int(layer.weight_mask().sum())
        total += layer.weight.numel()
    return kept / total


# --------------------------------------------------------------------------- report

@dataclass
class LayerDensity:
    name: str
    kind: str
    shape: tuple[int, ...]
    params: int
    kept: int
    dense_flops: int | None = None
    kept_flops: int | None = None

    @property
    def density(self) -> float:
        return self.kept / self.params if self.params else 1.0


@dataclass
class DensityReport:
    rows: list[LayerDensity] = field(default_factory=list)

    @property
    def params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def kept(self) -> int:
        return sum(r.kept for r in self.rows)

    @property
    def density(self) -> float:
        return self.kept / self.params if self.params else 1.0

    @property
    def dense_flops(self) -> int | None:
        return None if any(r.dense_flops is None for r in self.rows) else sum(r.dense_flops for r in self.rows)

    @property
    def kept_flops(self) -> int | None:
        return None if any(r.kept_flops is None for r in self.rows) else sum(r.kept_flops for r in self.rows)

    def to_dict(self) -> dict:
        return {"layers": [dict(vars(r), density=r.density) for r in self.rows],
                "params": self.params, "kept": self.kept, "density": self.density,
                "dense_flops": self.dense_flops, "kept_flops": self.kept_flops}

    def __str__(self) -> str:
        with_flops = self.dense_flops is not None
        header = ["layer", "type", "shape", "params", "kept", "density"] + (["FLOPs dense", "FLOPs kept"] * with_flops)
        lines = []
        for r in self.rows:
            row = [r.name, r.kind, "x".join(map(str, r.shape)), f"{r.params:,}", f"{r.kept:,}", f"{r.density:.4f}"]
            if with_flops:
                row += [_si(r.dense_flops), _si(r.kept_flops)]
            lines.append(row)
        total = ["total", "", "", f"{self.params:,}", f"{self.kept:,}", f"{self.density:.4f}"]
        if with_flops:
            total += [_si(self.dense_flops), _si(self.kept_flops)]
        widths = [max(len(str(x)) for x in col) for col in zip(header, *lines, total)]
        right = {3, 4, 5, 6, 7}

        def fmt(cells):
            return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                             for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

        rule = "-" * len(fmt(header))
        return "\n".join([fmt(header), rule, *map(fmt, lines), rule, fmt(total)])


def _si(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


@torch.no_grad()
def density_report(model: nn.Module, input_size: Sequence[int] | None = None) -> DensityReport:
    """Per-layer table of every Conv2d / Linear: shape, params, kept, density, and — when
    ``input_size = (C, H, W)`` is given — dense vs kept FLOPs (2 per multiply-add) for one image,
    measured by one forward pass on zeros (model mode and BN statistics are left untouched)."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not layers:
        raise ValueError("model has no Conv2d or Linear layer to report on")
    positions: dict[str, int] = {}
    if input_size is not None:
        positions = _output_positions(model, layers, input_size)
    rows = []
    for name, m in layers:
        mask = m.weight_mask() if isinstance(m, MASKED_TYPES) else None
        params = m.weight.numel()
        kept = params if mask is None else int(mask.sum())
        row = LayerDensity(name, ("masked " if mask is not None else "") + type(m).__name__.replace("Masked", ""),
                           tuple(m.weight.shape), params, kept)
        if name in positions:
            row.dense_flops, row.kept_flops = 2 * params * positions[name], 2 * kept * positions[name]
        rows.append(row)
    return DensityReport(rows)


def _output_positions(model, layers, input_size) -> dict[str, int]:
    """Output positions per layer (H_out * W_out for convs, tokens for linears) for one image."""
    if len(input_size) != 3:
        raise ValueError(f"input_size must be (C, H, W), got {tuple(input_size)}")
    positions: dict[str, int] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: positions.__setitem__(
        name, out[0, 0].numel() if isinstance(mod, nn.Conv2d) else out[0].numel() // out.shape[-1]))
        for name, m in layers]
    param = next(model.parameters())
    was_training = model.training
    model.eval()  # no BN statistics update
    try:
        model(torch.zeros(1, *input_size, device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return positions


# --------------------------------------------------------------------------- fold

@torch.no_grad()
def fold(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every masked layer replaced by a plain Conv2d / Linear holding
    ``weight * mask``: a torchvision-compatible state_dict, no scores, thresholds or hooks."""
    folded = copy.deepcopy(model)
    remove_mask_launch_batching(folded)
    for name, layer in masked_layers(folded):
        if isinstance(layer, MaskedConv2d):
            plain = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                              layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode,
                              device="meta")
        else:
            plain = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None, device="meta")
        plain.weight = nn.Parameter(layer.masked_weight(), requires_grad=layer.weight.requires_grad)
        if layer.bias is not None:
            plain.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=layer.bias.requires_grad)
        folded.set_submodule(name, plain)
    return folded


# --------------------------------------------------------------------------- stages

def set_trainable(model: nn.Module, *, weights: bool, scores: bool, norm_affine: bool) -> None:
    """Choose which parameter groups receive gradients.

    ``weights``: weights and biases of every layer (masked or not) other than normalization;
    ``scores``: the masked layers' scores; ``norm_affine``: BatchNorm/GroupNorm/LayerNorm affine.
    BN running statistics are untouched (they follow train/eval mode).
    """
    wanted = {"weights": weights, "scores": scores, "norm": norm_affine}
    for kind, params in parameter_groups(model).items():
        for param in params:
            param.requires_grad_(wanted[kind])


def prepare_mask_search(model: nn.Module) -> None:
    """Stage 1: only scores learn; weights and normalization affine are frozen."""
    _require_masked(model)
    set_trainable(model, weights=False, scores=True, norm_affine=False)


def prepare_finetune(model: nn.Module) -> None:
    """Stage 2: the mask is fixed (scores frozen); weights and normalization affine learn."""
    set_trainable(model, weights=True, scores=False, norm_affine=True)


def parameter_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """{"scores": [...], "weights": [...], "norm": [...]} for building per-group optimizers."""
    groups: dict[str, list[nn.Parameter]] = {"scores": [], "weights": [], "norm": []}
    seen: set[int] = set()  # a parameter shared by several modules (structured scores) is listed once
    for module in model.modules():
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if isinstance(module, NORM_TYPES):
                groups["norm"].append(param)
            elif pname == "scores" and isinstance(module, MASKED_TYPES):
                groups["scores"].append(param)
            else:
                groups["weights"].append(param)
    return groups


def load_masks(model: nn.Module, mask_dict: dict[str, torch.Tensor], layers: Iterable[str] | None = None) -> None:
    """Impose fixed masks (e.g. from OMP, random or IMP) through the scores: kept weights get
    score 1, pruned ones 0, threshold 0.5. Each mask has its layer's score shape."""
    for name, layer in _require_masked(model):
        if layers is not None and name not in layers:
            continue
        if name not in mask_dict:
            raise KeyError(f"no mask given for masked layer {name!r}")
        mask = mask_dict[name].to(layer.scores.device)
        if tuple(mask.shape) != tuple(layer.scores.shape):
            raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}, expected {tuple(layer.scores.shape)}")
        with torch.no_grad():
            layer.scores.copy_(mask.to(layer.scores.dtype))
            layer.set_threshold(0.5)

"""Pruning state of a model: turning layers into masked layers, thresholds, masks, reports,
folding the masks back into a plain model, and what each training stage may update."""
from __future__ import annotations

import copy
import fnmatch
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from vpns_fast import ops
from vpns_fast.environment import is_out_of_memory
from vpns_fast.errors import exception_reason, first_items
from vpns_fast.nn.masked_layers import (
    GRANULARITIES,
    MASKED_TYPES,
    SCORE_INITS,
    MaskedMultiheadAttention,
    MaskLaunchBatching,
    mask_attention_projection,
    mask_layer,
    masked_layers,
    remove_mask_launch_batching,
    unmask_attention,
)
from vpns_fast.pruning.matrices import count_flops, refuse_flop_count_over_memory, weight_matrices
from vpns_fast.pruning.structured import apply_channel_cap, residual_groups, structure_channels, unique_score_units

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)


def _excluded(name: str, exclude: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude)


class IdleLayerWarning(UserWarning):
    """A run's mask left a masked layer doing no work: it keeps no weight, or the eval-mode forward never calls it
    (``results.json``'s ``emptied_layers`` / ``unused_layers``)."""


class TiedScoresWarning(UserWarning):
    """``set_density`` kept fewer weights than the density asks for, by more than 1% of them: many scores tie at
    the threshold, and ties are pruned (the 0 / 1 scores ``load_masks`` writes, weights of magnitude 0)."""


class UnmaskedWeightsWarning(UserWarning):
    """``sparsify`` left weight matrices dense that it cannot mask (and that ``exclude`` did not name)."""


def sparsify(model: nn.Module, granularity: str = "unstructured", score_init: str = "scaled",
             exclude: str | Sequence[str] | None = None, *, structured: bool = False, cap_layers: int = 5,
             cap_sparsity: float = 0.25) -> nn.Module:
    """Mask every weight matrix of ``model`` in place; returns ``model``.

    Masked: Conv1d/2d/3d and Linear, their subclasses (each layer becomes a masked subclass of its
    own class, keeping its parameters, hooks and forward), and ``nn.MultiheadAttention``'s
    projections (its ``in_proj`` / ``q_proj`` / ``k_proj`` / ``v_proj`` and ``out_proj``). Reading a
    masked layer's ``weight`` gives the masked weight, also to code that passes it to a functional.
    A weight matrix that cannot be masked (ConvTranspose, Embedding, ..., or a weight-shaped parameter under
    another name than ``weight``, read by the model's own code: see :mod:`vpns_fast.pruning.matrices`) stays
    dense with an :class:`UnmaskedWeightsWarning` naming it and the fraction of weights it holds.

    ``exclude``: glob patterns on layer names (``"fc"``, ``"layer4.*"``, ``"*.in_proj"``) to leave
    dense on purpose. The masked layers keep the original weight and bias parameters. Every
    threshold starts at ``-inf`` (all weights kept) until :func:`set_density` is called.

    ``structured=True`` (docs/method.md §9; torchvision-style ResNets and VGGs, ``granularity="channel"`` only):
    the classifier stays dense, residual groups (ResNets) share one score vector, convs are input-masked by their
    producer's channel mask, and the first ``cap_layers`` convs keep at most ``cap_sparsity`` of
    their channels pruned (see :mod:`vpns_fast.pruning.structured`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
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
    matrices = weight_matrices(model)
    # every name a module goes by (a module registered twice, `self.b = self.a`, has two)
    names = [m.name for m in matrices] + [name for name, _ in model.named_modules(remove_duplicate=False)]
    unmatched = [pattern for pattern in exclude if not any(_excluded(name, [pattern]) for name in names)]
    if unmatched:  # a misspelt name left its layer masked, silently (an outside review)
        raise ValueError(f"exclude: {', '.join(map(repr, unmatched))} match(es) no layer of the model (the names "
                         "of its weight matrices: vpns_fast.pruning.masking.maskable_names(model))")
    targets = [m for m in matrices if m.maskable and not _excluded(m.name, exclude)]
    if not targets:
        raise ValueError("model has no maskable weight matrix (Conv1d/2d/3d, Linear or a subclass, "
                         "nn.MultiheadAttention) to sparsify" + (f" after exclude={exclude}" if exclude else ""))
    if any(not m.name for m in targets):
        raise ValueError("the model itself is a layer; wrap it in a container to sparsify it")
    _refuse_shared_weights(model, targets)
    for matrix in targets:  # module order: kaiming score init draws random numbers layer by layer
        if isinstance(matrix.module, nn.MultiheadAttention):
            mask_attention_projection(matrix.module, matrix.name.rsplit(".", 1)[-1], granularity, score_init)
        else:
            mask_layer(matrix.module, granularity, score_init)
    unmaskable = [m for m in matrices if not m.maskable and not _excluded(m.name, exclude)]
    if unmaskable:
        total = sum(m.weight.numel() for m in matrices)
        fraction = sum(m.weight.numel() for m in unmaskable) / total
        names = first_items((f"{m.name} ({m.kind})" for m in unmaskable), 8)
        bare = any(m.param_name != "weight" and not isinstance(m.module, nn.MultiheadAttention) for m in unmaskable)
        warnings.warn(f"sparsify: {len(unmaskable)} weight matrices hold {fraction:.2%} of the weights and cannot be "
                      f"masked; they stay dense: {names}. Name them in exclude= to keep them dense on purpose"
                      + ("; a parameter the model's code passes to a functional (F.conv2d(x, self.w)) is masked "
                         "once it is the weight of an nn.Conv2d / nn.Linear the code calls." if bare else "."),
                      UnmaskedWeightsWarning, stacklevel=2)
    if structured:
        structure_channels(model, cap_layers, cap_sparsity)
    MaskLaunchBatching(model)  # one mask launch per forward on the triton backend
    return model


def _refuse_shared_weights(model: nn.Module, targets) -> None:
    """ValueError where a weight to be masked is also registered under another name: tied layers (``dec.weight =
    enc.weight``) or an alias (``self.w = self.fc.weight``). Masking replaces one module's weight by a masked one,
    so the other name would go on reading the whole weight: a tied decoder ran dense while the density counted
    it as pruned (an outside review)."""
    names_of: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    for matrix in targets:
        names = names_of.get(id(matrix.weight), [])
        if len(names) > 1:
            raise ValueError(f"sparsify: the weight {names[0]} is also {', '.join(names[1:])} (tied or aliased): a "
                             "mask on one name would leave the other reading the whole weight; untie them, or name "
                             "every layer that holds it in exclude= to keep it dense")


def maskable_names(model: nn.Module) -> list[str]:
    """Names of the weight matrices ``sparsify`` can mask (masked or not yet), in module order: what
    ``exclude=`` patterns are matched against."""
    return [m.name for m in weight_matrices(model) if m.maskable]


def _require_masked(model: nn.Module) -> list[tuple[str, nn.Module]]:
    layers = masked_layers(model)
    if not layers:
        raise ValueError("model has no masked layers; call vpns_fast.sparsify(model) first")
    return layers


@torch.no_grad()
def set_density(model: nn.Module, density: float, scope: str = "global", *, check: bool = True) -> torch.Tensor:
    """Set every masked layer's threshold so that a ``density`` fraction of scores is kept.

    ``scope="global"``: one threshold over all layers' scores (VPNs); ``"layer"``: each layer keeps
    its own top ``density`` (HYDRA's layer-wise pruning). Returns the threshold(s).

    ``check`` (the trainer's per-step calls pass False: each check reads the scores back to the host): NaN scores
    are refused, naming their layers (a NaN is never kept, so the density came out below the one asked for), and
    a :class:`TiedScoresWarning` says when ties at the threshold pruned more than 1% of the weights beyond it.

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
    if check:
        _refuse_nan_scores(model, units)
    thresholds = ops.topk_threshold(scores, density, scope)
    for i, (_, members) in enumerate(units):
        for layer in members:
            layer.set_threshold(thresholds if scope == "global" else thresholds[i])
    if check:
        _warn_of_ties(scores, thresholds, density, scope)
    if any(getattr(layer, "channel_cap", None) is not None for layer in layers):
        apply_channel_cap(layers)
    return thresholds


def _refuse_nan_scores(model: nn.Module, units) -> None:
    """ValueError naming the masked layers whose scores hold NaN (an outside review: a diverged search's NaN
    scores were never kept, and the density came out at 0.35 where 0.5 was asked, without a word)."""
    broken = {id(param) for param, _ in units if bool(torch.isnan(param).any())}
    if broken:
        names = [name for name, layer in masked_layers(model) if id(layer.scores) in broken]
        raise ValueError(f"set_density: the scores of {first_items(map(repr, names))} hold NaN; a NaN score is "
                         "never kept, so the density would come out below the one asked for")


def _warn_of_ties(scores: list[torch.Tensor], thresholds: torch.Tensor, density: float, scope: str) -> None:
    """:class:`TiedScoresWarning` where ties at the threshold kept fewer scores than the selection's own count
    (``N - int((1 - density) * N)``, over all scores or per layer), by more than 1% of them. An outside review:
    ``set_density(model, 0.3)`` after ``load_masks`` (scores 0 and 1) pruned every weight."""
    groups = [scores] if scope == "global" else [[s] for s in scores]
    limits = [thresholds] * len(groups) if scope == "global" else list(thresholds)
    for group, threshold in zip(groups, limits):
        total = sum(s.numel() for s in group)
        wanted = total - ops.kth_index(density, total)
        kept = sum(int(ops.score_mask(s, threshold).sum()) for s in group)
        if wanted - kept > 0.01 * total:
            warnings.warn(f"set_density: {kept} of {total} scores kept where density {density:g} asks for {wanted}: "
                          f"{wanted - kept} more tie at the threshold {float(threshold):g} and ties are pruned (scores "
                          "of 0 and 1 from load_masks, weights of magnitude 0); set the scores apart, e.g. "
                          "magnitude scores, before choosing another density", TiedScoresWarning,
                          stacklevel=4)  # the caller of set_density, past torch.no_grad's wrapper
            return


def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """{qualified layer name: boolean mask shaped like its weight} (the effective mask: in structured
    mode the layer's output-channel mask times its producer's mask on the input channels)."""
    return {name: layer.weight_mask() for name, layer in _require_masked(model)}


def actual_density(model: nn.Module) -> float:
    """Fraction of the model's weights, over every weight matrix (see :mod:`vpns_fast.pruning.matrices`),
    that are kept: masked layers by their effective masks (input masking included), the others as
    dense. Equals ``density_report(model).density``."""
    _require_masked(model)
    kept = total = 0
    for matrix in weight_matrices(model):
        total += matrix.weight.numel()
        kept += int(matrix.layer.weight_mask().sum()) if matrix.layer is not None else matrix.weight.numel()
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
    masked: bool = True  # False: counted as dense (excluded, or a kind that cannot be masked)

    @property
    def density(self) -> float:
        return self.kept / self.params if self.params else 1.0


OTHER_OPS_ROW = "(other ops)"  # the report row of counted FLOPs that read no weight matrix (attention matmuls)


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

    @property
    def unused_layers(self) -> list[str] | None:
        """Masked weight matrices that did no FLOPs in the counted eval-mode forward: layers its forward never calls
        (an auxiliary head, a layer used only in training). Their weights still count in the density and in a
        global threshold, so the layers that run keep more than the density says: 0.61 of them at density 0.1
        where an unused 128x128 Linear sat beside a small conv net (an outside review). None where FLOPs were not
        counted."""
        if self.dense_flops is None:
            return None
        return [r.name for r in self.rows if r.masked and r.params and r.dense_flops == 0]

    def to_dict(self) -> dict:
        return {"layers": [dict(vars(r), density=r.density) for r in self.rows],
                "params": self.params, "kept": self.kept, "density": self.density,
                "dense_flops": self.dense_flops, "kept_flops": self.kept_flops, "unused_layers": self.unused_layers}

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
    """Per-matrix table of every weight matrix (see :mod:`vpns_fast.pruning.matrices`): shape, params,
    kept, density; unmasked matrices count as dense (``masked=False``; kind "masked ..." for the masked
    ones, "... (not maskable)" for kinds sparsify cannot mask). With ``input_size`` (one example's
    shape, e.g. ``(C, H, W)``) also dense vs kept FLOPs of one example, counted by
    ``torch.utils.flop_counter.FlopCounterMode`` on the folded model (2 per multiply-add), by one
    forward on zeros in eval mode (the model's mode and BN statistics are left untouched). A matrix's
    kept FLOPs are its dense FLOPs times its density; FLOPs of ops that read no weight matrix
    (attention's query-key and attention-value matmuls) are kept in full, in a last row
    ``(other ops)`` when there are any. The count's forward holds every layer's output: an image
    ``input_size`` whose estimated memory for that is more than is available raises MemoryError before it
    runs (:func:`~vpns_fast.pruning.matrices.refuse_flop_count_over_memory`)."""
    matrices = weight_matrices(model)
    if not matrices:
        raise ValueError("model has no weight matrix (Conv, Linear, MultiheadAttention, ...) to report on")
    rows = []
    for matrix in matrices:
        params = matrix.weight.numel()
        if matrix.layer is not None:
            row = LayerDensity(matrix.name, f"masked {matrix.kind}", tuple(matrix.weight.shape), params,
                               int(matrix.layer.weight_mask().sum()))
        else:
            kind = matrix.kind if matrix.maskable else f"{matrix.kind} (not maskable)"
            row = LayerDensity(matrix.name, kind, tuple(matrix.weight.shape), params, params, masked=False)
        rows.append(row)
    if input_size is not None:
        rows += _count_flops(model, rows, input_size)
    return DensityReport(rows)


def _count_flops(model: nn.Module, rows: list[LayerDensity], input_size: Sequence[int]) -> list[LayerDensity]:
    """Fills each row's FLOPs; returns the ``(other ops)`` row, if any."""
    if (not isinstance(input_size, Sequence) or len(input_size) < 1
            or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in input_size)):
        raise ValueError(f"input_size must be one example's shape, e.g. (C, H, W), got {input_size!r}")
    folded = fold(model)
    weights = {matrix.name: matrix.weight for matrix in weight_matrices(folded)}
    param = next(folded.parameters())
    refuse_flop_count_over_memory(folded, input_size, param)
    try:
        total, per_weight = count_flops(folded, [weights[row.name] for row in rows],
                                        torch.zeros(1, *input_size, device=param.device, dtype=param.dtype))
    except RuntimeError as exc:  # torch's own words from deep in the forward (an input smaller than a kernel)
        if is_out_of_memory(exc):
            raise
        raise ValueError(f"input_size {tuple(input_size)}: the model's forward failed on an input of that shape: "
                         f"{exception_reason(exc, with_type=False)}") from exc
    for row, flops in zip(rows, per_weight):
        row.dense_flops, row.kept_flops = flops, flops * row.kept // row.params if row.params else flops
    other = total - sum(per_weight)
    return [LayerDensity(OTHER_OPS_ROW, "no weight matrix", (), 0, 0, other, other, masked=False)] if other else []


# --------------------------------------------------------------------------- fold

@torch.no_grad()
def fold(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every masked layer turned back into its torch class (Conv2d, Linear, ...,
    nn.MultiheadAttention) holding ``weight * mask``: a state_dict the stock model loads, no scores,
    thresholds or hooks."""
    folded = copy.deepcopy(model)
    remove_mask_launch_batching(folded)
    for module in list(folded.modules()):
        if isinstance(module, MaskedMultiheadAttention):
            unmask_attention(module)  # its projections; out_proj is a masked layer of its own
    layers = [layer for _, layer in masked_layers(folded)]
    # every mask first: in structured mode a layer's mask reads its producer's scores
    weights = [nn.Parameter(layer.masked_weight(), requires_grad=layer.dense_weight.requires_grad) for layer in layers]
    for layer, weight in zip(layers, weights):
        layer._parameters["weight"] = weight
        layer.strip_masking()
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
    score 1, pruned ones 0, threshold 0.5. Each mask has its layer's score shape and holds booleans or 0 / 1; a
    mask for a layer the model does not mask is refused (a mask of 0.3s had pruned a whole layer, and a misspelt
    name was ignored: an outside review)."""
    masked = _require_masked(model)
    if layers is not None:  # a string had matched its substrings, a misspelt name nothing (an outside review)
        layers = [layers] if isinstance(layers, str) else list(layers)
        missing = sorted(set(layers) - {name for name, _ in masked})
        if missing:
            raise ValueError(f"layers: {first_items(map(repr, missing))} name(s) no masked layer of the model (its "
                             "masked layers: vpns_fast.masks(model).keys())")
    unknown = sorted(set(mask_dict) - {name for name, _ in masked})
    if unknown:
        raise ValueError(f"masks given for {len(unknown)} name(s) the model has no masked layer of: "
                         f"{first_items(map(repr, unknown))} (its masked layers: "
                         "vpns_fast.masks(model).keys())")
    for name, layer in masked:
        if layers is not None and name not in layers:
            continue
        if name not in mask_dict:
            raise KeyError(f"no mask given for masked layer {name!r}")
        mask = torch.as_tensor(mask_dict[name]).to(layer.scores.device)  # numpy arrays too
        if tuple(mask.shape) != tuple(layer.scores.shape):
            raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}, expected {tuple(layer.scores.shape)}")
        if mask.dtype != torch.bool and not ((mask == 0) | (mask == 1)).all():
            raise ValueError(f"mask for {name!r}: expected booleans or 0 / 1 values, got others (e.g. "
                             f"{mask[(mask != 0) & (mask != 1)].flatten()[0].item():g})")
        with torch.no_grad():
            layer.scores.copy_(mask.to(layer.scores.dtype))
            layer.set_threshold(0.5)


def checked_module(model: nn.Module, argument: str = "model") -> nn.Module:
    """The eager module behind ``model`` (a ``torch.compile`` wrapper gives the module it compiles, whose
    layers a conversion can see and replace; compiled code runs no module hooks) after refusing, with
    TypeError / ValueError naming ``argument``, what neither a copy nor a conversion can hold: TorchScript
    (its parameters and code are not the eager layers'), lazy layers never run (their weights would be
    drawn in the copy, not the caller's) and ``torch.nn.utils.prune`` masks."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{argument}: expected an nn.Module, got {type(model).__name__}")
    # torch._dynamo is imported by torch.compile: when it is not loaded, nothing was compiled
    dynamo = sys.modules.get("torch._dynamo.eval_frame")
    while dynamo is not None and isinstance(model, dynamo.OptimizedModule):
        model = model._orig_mod
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(f"{argument}: TorchScript modules ({type(model).__name__}) are not supported; pass the "
                        "eager nn.Module they were scripted or traced from")
    lazy = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()]
            if nn.parameter.is_lazy(tensor)]
    if lazy:
        raise ValueError(f"{argument}: {lazy[0]}{f' and {len(lazy) - 1} more' if len(lazy) > 1 else ''} "
                         "uninitialized (a lazy layer): run the model on one input first")
    refuse_torch_prune_hooks(model, argument)
    return model


def refuse_torch_prune_hooks(model: nn.Module, argument: str = "model") -> None:
    """ValueError naming the tensors of ``model`` that still carry a ``torch.nn.utils.prune`` mask: each is
    recomputed by a forward pre-hook from ``<name>_orig`` and ``<name>_mask``, which neither a copy of the
    model nor a converted layer can hold."""
    from torch.nn.utils import prune

    pruned = [f"{name or argument}.{hook._tensor_name}" for name, module in model.named_modules()
              for hook in module._forward_pre_hooks.values() if isinstance(hook, prune.BasePruningMethod)]
    if pruned:
        listed = ", ".join(pruned[:4]) + (f" and {len(pruned) - 4} more" if len(pruned) > 4 else "")
        raise ValueError(f"{argument}: {listed} still carr{'ies' if len(pruned) == 1 else 'y'} a "
                         "torch.nn.utils.prune mask; make the pruning permanent first with "
                         "torch.nn.utils.prune.remove(module, name)")

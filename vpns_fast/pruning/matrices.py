"""The weight matrices of a model, masked or not, and the FLOPs each one takes part in.

A *weight matrix* is the ``weight`` parameter (2-D or more) of any module, and each projection matrix
of an ``nn.MultiheadAttention`` (``in_proj_weight``, or ``q/k/v_proj_weight``). Conv1d/2d/3d, Linear
(and their subclasses) and the attention projections can be masked; any other (ConvTranspose,
Embedding, Bilinear, ...) cannot, and is listed so that reports count it as dense and ``sparsify``
can say so. So is a parameter under another name that is shaped like a weight (:func:`_weight_shaped`:
``self.w = nn.Parameter(...)`` read by ``F.conv2d(x, self.w)``, an RNN's ``weight_ih_l0``, CLIP's ``proj``).
Other parameters (biases, normalization affine, position embeddings, class tokens, relative position bias
tables, layer scales) are not weight matrices.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from vpns_fast import environment
from vpns_fast.nn.masked_layers import (
    ATTENTION_PROJECTIONS,
    MASKABLE_TYPES,
    MaskedMixin,
    MaskedMultiheadAttention,
)
from vpns_fast.nn.prompts import VisualPrompt


@dataclass(frozen=True)
class WeightMatrix:
    name: str              # the layer's qualified name; an attention projection: "<attention>.in_proj", ...
    module: nn.Module      # the module whose parameter it is
    param_name: str        # "weight", or an attention module's "in_proj_weight" / "q_proj_weight" / ...
    kind: str              # the torch layer type ("Conv2d", "MultiheadAttention", "Embedding", ...)
    maskable: bool
    layer: MaskedMixin | None = None  # the masked layer, when it is masked

    @property
    def weight(self) -> torch.Tensor:
        """The stored (dense) parameter."""
        return self.layer.dense_weight if self.layer is not None else self.module._parameters[self.param_name]


def _maskable(module: nn.Module) -> bool:
    weight = module._parameters.get("weight")
    return (isinstance(module, MASKABLE_TYPES) and isinstance(weight, nn.Parameter)
            and not isinstance(weight, nn.parameter.UninitializedParameter))


# Words in a parameter's name that say it is no weight matrix: position embeddings and tokens ([1, N, D] mostly,
# but not everywhere), relative position tables (Swin, BEiT, SAM's rel_pos_h, BoTNet's height_rel, LambdaNet's
# pos_emb), attention biases (LeViT), per-channel scales (EfficientViM's alpha [4, C]). Found by building one
# model of each of timm's name families that builds on the meta device, and every torchvision classifier
# (2026-12-07): with these words, the parameters taken as weight matrices were sequencer2d's LSTM weights only.
_NOT_WEIGHT_WORDS = ("bias", "embed", "token", "pos", "rel", "alpha", "scale", "gamma")  # word beginnings


def _weight_shaped(name: str, parameter: torch.Tensor) -> bool:
    """Whether a parameter that is no module's ``weight`` is taken as a weight matrix: two or more dimensions
    larger than 1, the first of them (a [C_out, C_in, ...] kernel or a [rows, columns] matrix; a [1, N, D]
    position embedding, a [heads, 1, 1] scale are not), and no word of its name (split at "_") beginning with one of
    _NOT_WEIGHT_WORDS."""
    if isinstance(parameter, nn.parameter.UninitializedParameter) or parameter.dim() < 2:
        return False
    words = name.lower().split("_")  # whole words: "pos" is not in "transpose" (a diff review)
    return (parameter.shape[0] > 1 and sum(size > 1 for size in parameter.shape) >= 2
            and not any(word.startswith(NOT) for word in words for NOT in _NOT_WEIGHT_WORDS))


def weight_matrices(model: nn.Module) -> list[WeightMatrix]:
    """Every weight matrix of ``model`` in module order, each parameter once (tied weights count once): the
    modules' weights first, then the weight-shaped parameters under other names (:func:`_weight_shaped`), so
    that an alias of a layer's weight (``self.w = self.fc.weight``) is the layer's."""
    found: list[WeightMatrix] = []
    seen: set[int] = set()

    def add(matrix: WeightMatrix) -> None:
        if id(matrix.weight) not in seen:
            seen.add(id(matrix.weight))
            found.append(matrix)

    for name, module in model.named_modules():
        if isinstance(module, MaskedMixin):
            add(WeightMatrix(name, module, "weight", module.kind, True, module))
        elif isinstance(module, nn.MultiheadAttention):
            for unit_name, param_name in ATTENTION_PROJECTIONS.items():
                param = module._parameters.get(param_name)
                qualified = f"{name}.{unit_name}" if name else unit_name
                if param is None:
                    continue
                if isinstance(module, MaskedMultiheadAttention) and unit_name in module._modules:
                    continue  # listed as its mask submodule, next in module order
                add(WeightMatrix(qualified, module, param_name, "MultiheadAttention", True))
        elif _maskable(module):
            add(WeightMatrix(name, module, "weight", type(module).__name__, True))
        else:
            weight = module._parameters.get("weight")
            if isinstance(weight, torch.Tensor) and not isinstance(weight, nn.parameter.UninitializedParameter) \
                    and weight.dim() >= 2:
                add(WeightMatrix(name, module, "weight", type(module).__name__, False))
    for name, module in model.named_modules():
        if (isinstance(module, (nn.MultiheadAttention, VisualPrompt)) or ".parametrizations." in f".{name}."):
            continue  # its projections are listed above; a prompt's program; a parametrized layer's original weight
        skipped = ("weight", "scores") if isinstance(module, MaskedMixin) else ("weight",)  # listed above; a mask's
        for param_name, param in module._parameters.items():
            if param is not None and param_name not in skipped and _weight_shaped(param_name, param):
                add(WeightMatrix(f"{name}.{param_name}" if name else param_name, module, param_name,
                                 f"parameter of a {type(module).__name__}", False))
    return found


class _WeightFlops(TorchDispatchMode):
    """Adds each counted op's FLOPs (FlopCounterMode's formulas) to the weight matrix it reads."""

    def __init__(self, formulas: dict, storages: dict[int, int]):
        super().__init__()
        self.formulas, self.storages = formulas, storages
        self.flops = [0] * (max(storages.values(), default=-1) + 1)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.formulas.get(func._overloadpacket)
        if formula is not None:
            for arg in tree_flatten((args, kwargs))[0]:
                index = self.storages.get(arg.untyped_storage().data_ptr()) if isinstance(arg, torch.Tensor) else None
                if index is not None:
                    self.flops[index] += int(formula(*args, **kwargs, out_val=out))
                    break
        return out


def count_flops(model: nn.Module, weights: list[torch.Tensor], example: torch.Tensor) -> tuple[int, list[int]]:
    """``(total, per_weight)``: FLOPs of one forward of ``model`` on ``example`` counted by
    ``torch.utils.flop_counter.FlopCounterMode`` (2 per multiply-add; matmuls, convolutions and
    attention), and the part of them in ops that read each of ``weights`` (plain parameters of
    ``model``, e.g. of a folded copy). Runs in eval mode with autograd on and attention on the math
    kernel: the CPU's fused attention kernels (``_scaled_dot_product_flash_attention_for_cpu``,
    ``_native_multi_head_attention``) have no FLOP formula, so FlopCounterMode would count them as 0."""
    storages = {w.untyped_storage().data_ptr(): i for i, w in enumerate(weights)}
    was_training = model.training
    requires_grad = [p.requires_grad for p in model.parameters()]
    model.eval()  # no BN statistics update
    try:
        for p in model.parameters():
            p.requires_grad_(True)  # keeps nn.MultiheadAttention off its fused inference path
        with torch.enable_grad(), torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH), \
                FlopCounterMode(display=False) as counter, _WeightFlops(counter.flop_registry, storages) as per_weight:
            model(example)
    finally:
        model.train(was_training)
        for p, flag in zip(model.parameters(), requires_grad):
            p.requires_grad_(flag)
    return counter.get_total_flops(), per_weight.flops


# Inputs of at most this many pixels are counted without an estimate first; larger ones are estimated at a copy
# scaled down to about this many.
FLOP_COUNT_ESTIMATE_PIXELS = 224 * 224


def refuse_flop_count_over_memory(model: nn.Module, input_size, param: torch.Tensor) -> None:
    """MemoryError naming ``input_size`` (``(C, H, W)``) where :func:`count_flops` on one example of it would hold
    more memory than Linux says is available: its forward runs with autograd on, so every layer's output is held
    until it ends. Estimated from one forward on an image scaled down to about FLOP_COUNT_ESTIMATE_PIXELS, the
    leaves' outputs scaled by the pixels; not estimated for other shapes, smaller images, a model off the CPU, or
    one that refuses the smaller size in any way (a ViT built for one size raises AssertionError; the count itself
    then says whether it runs at the size asked). A ResNet counted at 8192 x 8192 was
    killed by the kernel without a word (an outside review of `vpns report`)."""
    available = environment.available_memory_bytes()  # the host's: a model on a GPU holds its outputs there
    if (available is None or param.device.type != "cpu" or len(input_size) != 3
            or input_size[1] * input_size[2] <= FLOP_COUNT_ESTIMATE_PIXELS):
        return
    scale = math.sqrt(FLOP_COUNT_ESTIMATE_PIXELS / (input_size[1] * input_size[2]))
    small = (input_size[0], max(1, round(input_size[1] * scale)), max(1, round(input_size[2] * scale)))
    was_training = model.training
    model.eval()  # no BN statistics update
    try:
        example = torch.zeros(1, *small, device=param.device, dtype=param.dtype)
        held = environment.layer_bytes(model, lambda: model(example))
    except Exception:  # any refusal of the smaller size (a ViT's AssertionError too): no estimate
        return
    finally:
        model.train(was_training)
    needed = held.outputs * input_size[1] * input_size[2] / (small[1] * small[2])
    if needed > available:
        raise MemoryError(f"input_size {tuple(input_size)}: counting FLOPs at that size holds every layer's output, "
                          f"about {environment.memory_text(needed)}; {environment.memory_text(available)} are "
                          "available")

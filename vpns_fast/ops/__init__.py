"""Public functional ops of vpns_fast, autograd-aware, dispatched to a backend per call.

See :mod:`vpns_fast.ops.backends` for how the backend is chosen and forced.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from vpns_fast.kernels.masked import masked_conv2d_ref, masked_linear_ref, masked_weights_ref, score_mask_ref
from vpns_fast.kernels.prompt import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PROMPT_KINDS,
    check_prompt_region,
    prompt_normalize_ref,
)
from vpns_fast.kernels.threshold import topk_threshold_ref

# Importing a backend module registers its ops; whether they run is decided per call by availability.
from vpns_fast.ops import cpp_backend, triton_backend  # noqa: F401
from vpns_fast.ops.backends import (
    BACKEND_NAMES,
    BackendError,
    backend_op,
    backend_report,
    dispatch,
    forced_backend,
    register,
    resolve,
    use_backend,
)
from vpns_fast.ops.region_grad import conv2d_input_grad_in_boxes, narrow_input_grad

register("torch", "prompt_normalize", prompt_normalize_ref)
register("torch", "topk_threshold", topk_threshold_ref)
register("torch", "masked_conv2d", masked_conv2d_ref)
register("torch", "masked_linear", masked_linear_ref)
register("torch", "masked_weights", masked_weights_ref)

# A threshold as the ops take it: a Python number or a 0-dim tensor.
Threshold = float | torch.Tensor

__all__ = [
    "BACKEND_NAMES", "BackendError", "IMAGENET_MEAN", "IMAGENET_STD", "PROMPT_KINDS",
    "backend_report", "forced_backend", "resolve", "use_backend",
    "pad_prompt", "fix_prompt", "random_prompt", "expansive_prompt", "prompt_normalize",
    "kth_index", "topk_threshold", "keep_all_threshold", "score_mask", "masked_conv2d", "masked_linear",
    "masked_weights", "conv2d_input_grad_in_boxes", "narrow_input_grad",
]


# --------------------------------------------------------------------------- prompts

def _check_prompt_args(images: torch.Tensor, program: torch.Tensor, mean: Sequence[float],
                       std: Sequence[float]) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a (B, C, H, W) tensor, got {_describe(images)}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise TypeError(f"images must be float in [0, 1] or uint8 in [0, 255], got dtype {images.dtype}")
    if not isinstance(program, torch.Tensor) or program.dim() != 3 or program.shape[1] != program.shape[2]:
        raise ValueError(f"program must be a (C, out_size, out_size) tensor, got {_describe(program)}")
    c, h, w = images.shape[1:]
    if c != program.shape[0]:
        raise ValueError(f"images have {c} channels but program has {program.shape[0]}")
    if h != w:
        raise ValueError(f"images must be square (in_size x in_size), got {h}x{w}")
    if h > program.shape[-1]:
        raise ValueError(f"image size {h} exceeds the prompt's output size {program.shape[-1]}")
    if images.device != program.device:
        raise ValueError(f"images are on {images.device} but program is on {program.device}")
    if len(mean) != c or len(std) != c:
        raise ValueError(f"mean and std must have one entry per channel ({c}), got {len(mean)} and {len(std)}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std entries must be positive, got {tuple(std)}")


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)}"
    return f"a {type(x).__name__}"


def prompt_normalize(images: torch.Tensor, program: torch.Tensor, kind: str, *, pad: int = 0, mask_size: int = 0,
                     row: int = 0, col: int = 0, mean: Sequence[float] = IMAGENET_MEAN,
                     std: Sequence[float] = IMAGENET_STD, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The prompt op behind all four kinds (see :mod:`vpns_fast.kernels.prompt`)."""
    if kind not in PROMPT_KINDS:
        raise ValueError(f"kind must be one of {PROMPT_KINDS}, got {kind!r}")
    _check_prompt_args(images, program, mean, std)
    check_prompt_region(kind, program.shape[-1], pad, mask_size, row, col)
    return dispatch("prompt_normalize", images.device.type, images, program, kind, pad, mask_size, row, col,
                    tuple(float(m) for m in mean), tuple(float(s) for s in std), out_dtype)


def pad_prompt(images: torch.Tensor, program: torch.Tensor, pad: int, mean: Sequence[float] = IMAGENET_MEAN,
               std: Sequence[float] = IMAGENET_STD, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Zero-pad ``images`` to the program's size, add ``program`` on the outer ``pad`` pixels,
    clamp to [0, 1], normalize."""
    return prompt_normalize(images, program, "pad", pad=pad, mean=mean, std=std, out_dtype=out_dtype)


def fix_prompt(images: torch.Tensor, program: torch.Tensor, mask_size: int, mean: Sequence[float] = IMAGENET_MEAN,
               std: Sequence[float] = IMAGENET_STD, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """As :func:`pad_prompt`, adding ``sigmoid(program)`` on the top-left ``mask_size`` square."""
    return prompt_normalize(images, program, "fix", mask_size=mask_size, mean=mean, std=std, out_dtype=out_dtype)


def random_prompt(images: torch.Tensor, program: torch.Tensor, mask_size: int, offset: tuple[int, int],
                  mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                  out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """As :func:`fix_prompt`, with the square's top-left corner at ``offset = (row, col)``."""
    row, col = (int(v) for v in offset)
    return prompt_normalize(images, program, "random", mask_size=mask_size, row=row, col=col,
                            mean=mean, std=std, out_dtype=out_dtype)


def expansive_prompt(images: torch.Tensor, program: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
                     std: Sequence[float] = IMAGENET_STD, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Place ``images`` centred, add ``sigmoid(program)`` on the ring around them."""
    return prompt_normalize(images, program, "expansive", mean=mean, std=std, out_dtype=out_dtype)


# --------------------------------------------------------------------------- thresholds

def kth_index(density: float, n: int) -> int:
    """``k = int((1 - density) * n)``, exactly as the release code computes it."""
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ValueError(f"density must be a number in (0, 1], got {density!r}")
    return int((1 - density) * n)


def keep_all_threshold(like: torch.Tensor) -> torch.Tensor:
    """A threshold below every magnitude, so ``|s| > t`` keeps every weight."""
    return torch.tensor(float("-inf"), dtype=like.dtype, device=like.device)


def _as_score_list(scores: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(scores, torch.Tensor):
        tensors = [scores]
    elif isinstance(scores, Sequence) and not isinstance(scores, (str, bytes)):
        tensors = list(scores)
    else:
        raise TypeError(f"scores must be a tensor or a sequence of tensors, got {type(scores).__name__}")
    if not tensors:
        raise ValueError("scores must hold at least one tensor")
    for i, s in enumerate(tensors):
        if not isinstance(s, torch.Tensor) or not s.is_floating_point():
            raise TypeError(f"scores[{i}] must be a floating-point tensor, got {_describe(s)}"
                            + (f" of dtype {s.dtype}" if isinstance(s, torch.Tensor) else ""))
        if s.numel() == 0:
            raise ValueError(f"scores[{i}] is empty")
    first = tensors[0]
    for i, s in enumerate(tensors[1:], 1):
        if s.dtype != first.dtype or s.device != first.device:
            raise ValueError(f"all score tensors must share dtype and device: scores[0] is {first.dtype} on "
                             f"{first.device}, scores[{i}] is {s.dtype} on {s.device}")
    return tensors


def topk_threshold(scores: torch.Tensor | Sequence[torch.Tensor], density: float,
                   scope: str = "global") -> torch.Tensor:
    """Magnitude threshold that keeps the top ``density`` fraction of scores (``|s| > t``).

    ``scope="global"``: a 0-dim tensor equal to
    ``torch.kthvalue(cat(|s|), int((1 - density) * N)).values`` over all tensors together.
    ``scope="layer"``: a 1-D tensor with that threshold for each tensor on its own.
    When ``k < 1`` the threshold is ``-inf`` and every weight is kept.
    """
    tensors = _as_score_list(scores)
    if scope == "global":
        groups = [tensors]
    elif scope == "layer":
        groups = [[s] for s in tensors]
    else:
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    kth_index(density, 1)  # validates density before any work
    backend, impl = resolve("topk_threshold", tensors[0].device.type)
    ks = [kth_index(density, sum(s.numel() for s in group)) for group in groups]
    selected = [i for i, k in enumerate(ks) if k >= 1]  # k < 1: the group keeps every weight
    # layer scope: all layers' selects in one call where the backend has one (the triton backend)
    per_layer = backend_op(backend, "topk_threshold_layers") if scope == "layer" else None
    if per_layer is not None and len(selected) == len(groups):
        return per_layer(tensors, ks)
    if per_layer is not None and selected:
        found = dict(zip(selected, per_layer([tensors[i] for i in selected], [ks[i] for i in selected])))
    else:
        found = {i: impl(groups[i], ks[i]) for i in selected}
    thresholds = [found[i] if i in found else keep_all_threshold(group[0]) for i, group in enumerate(groups)]
    return thresholds[0] if scope == "global" else torch.stack(thresholds)


def _as_threshold(threshold: Threshold, scores: torch.Tensor) -> torch.Tensor:
    # A Python number becomes a tensor of the scores' dtype: torch.as_tensor alone would round it
    # to float32, and |s| > t would then disagree with the exact comparison for float64 scores.
    if isinstance(threshold, torch.Tensor) or not scores.is_floating_point():
        return torch.as_tensor(threshold, device=scores.device)
    return torch.as_tensor(threshold, dtype=scores.dtype, device=scores.device)


def score_mask(scores: torch.Tensor, threshold: Threshold) -> torch.Tensor:
    """Boolean keep-mask ``|s| > t`` in the scores' shape."""
    return score_mask_ref(scores, _as_threshold(threshold, scores))


# --------------------------------------------------------------------------- masked layers

def _check_masked(weight: torch.Tensor, scores: torch.Tensor, threshold: Threshold) -> torch.Tensor:
    if not isinstance(scores, torch.Tensor) or scores.dim() != weight.dim():
        raise ValueError(f"scores must have as many dims as the weight {tuple(weight.shape)}, got {_describe(scores)}")
    for d, (ns, nw) in enumerate(zip(scores.shape, weight.shape)):
        if ns not in (1, nw):
            raise ValueError(f"scores of shape {tuple(scores.shape)} do not broadcast to the weight "
                             f"{tuple(weight.shape)} (dim {d}: {ns} vs {nw})")
    threshold = _as_threshold(threshold, scores)
    if threshold.dim() != 0:
        raise ValueError(f"threshold must be a scalar, got shape {tuple(threshold.shape)}")
    return threshold


def masked_conv2d(x: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor, threshold: Threshold,
                  bias: torch.Tensor | None = None, stride: int | tuple[int, int] = 1,
                  padding: int | tuple[int, int] | str = 0, dilation: int | tuple[int, int] = 1, groups: int = 1, *,
                  masked_weight: torch.Tensor | None = None) -> torch.Tensor:
    """``conv2d(x, weight * (|scores| > threshold))`` with the STE backward to ``scores``.

    ``masked_weight``: that product already computed for this call (with its STE), as the
    model-level mask batching does; it is convolved directly unless the triton backend's measured
    dispatch picks the implicit-GEMM conv, which masks while loading weight tiles.
    """
    threshold = _check_masked(weight, scores, threshold)
    if weight.dim() != 4:
        raise ValueError(f"weight must be (C_out, C_in/groups, kH, kW), got {_describe(weight)}")
    backend, impl = resolve("masked_conv2d", x.device.type)
    if backend == "triton":  # its measured dispatch decides whether masked_weight is used
        return impl(x, weight, scores, threshold, bias, stride, padding, dilation, groups, masked_weight=masked_weight)
    if masked_weight is not None:
        return F.conv2d(x, masked_weight, bias, stride, padding, dilation, groups)
    return impl(x, weight, scores, threshold, bias, stride, padding, dilation, groups)


def masked_linear(x: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor, threshold: Threshold,
                  bias: torch.Tensor | None = None, *, masked_weight: torch.Tensor | None = None) -> torch.Tensor:
    """``linear(x, weight * (|scores| > threshold))`` with the STE backward to ``scores``;
    ``masked_weight`` as in :func:`masked_conv2d` (always used when given)."""
    threshold = _check_masked(weight, scores, threshold)
    if weight.dim() != 2:
        raise ValueError(f"weight must be (out_features, in_features), got {_describe(weight)}")
    if masked_weight is not None:
        return F.linear(x, masked_weight, bias)
    return dispatch("masked_linear", x.device.type, x, weight, scores, threshold, bias)


def masked_weights(weights: Sequence[torch.Tensor], scores: Sequence[torch.Tensor],
                   thresholds: torch.Tensor) -> list[torch.Tensor]:
    """``[w * (|s| > t) for each layer]`` with the STE backward, for many layers in one call.

    ``thresholds``: a 1-D tensor, one per layer. Weights share one dtype and device, scores one
    dtype. The ``triton`` backend computes all of them in one launch (and one backward launch);
    ``torch`` loops over the layers.
    """
    weights, scores = list(weights), list(scores)
    if not weights or len(weights) != len(scores):
        raise ValueError(f"masked_weights needs one score tensor per weight and at least one layer, got "
                         f"{len(weights)} weights and {len(scores)} score tensors")
    if not isinstance(thresholds, torch.Tensor) or thresholds.shape != (len(weights),):
        raise ValueError(f"thresholds must be a 1-D tensor with one entry per layer ({len(weights)}), got "
                         f"{_describe(thresholds)}")
    for w, s in zip(weights, scores):
        _check_masked(w, s, thresholds[0])
    return dispatch("masked_weights", weights[0].device.type, weights, scores, thresholds)

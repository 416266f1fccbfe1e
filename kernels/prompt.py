"""Visual prompt + clamp + normalize: ``out = (clamp(pad(x) + P * region, 0, 1) - mean) / std``.

``P`` is ``program`` for the "pad" kind and ``sigmoid(program)`` for the others (as in the
VPNs release). The image of side ``in_size`` is zero-padded to ``out_size`` with
``top = left = (out - in + 1) // 2``. The prompt region is computed from pixel indices alone,
so a fused kernel never needs a mask tensor:

=========  ==========================================================================
kind       region (row y, column x, both in [0, out_size))
=========  ==========================================================================
pad        the outer ``pad`` pixels: ``y < p or y >= out - p or x < p or x >= out - p``
fix        the ``mask_size`` square at the top-left corner
random     the ``mask_size`` square whose top-left corner is ``(row, col)``
expansive  every pixel outside the placed image
=========  ==========================================================================
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

PROMPT_KINDS = ("pad", "fix", "random", "expansive")


def image_offset(in_size: int, out_size: int) -> tuple[int, int]:
    """(top/left, bottom/right) zero padding that places the image inside the output."""
    return (out_size - in_size + 1) // 2, (out_size - in_size) // 2


def prompt_region_ref(kind: str, out_size: int, in_size: int, pad: int = 0, mask_size: int = 0,
                      row: int = 0, col: int = 0, device=None) -> torch.Tensor:
    """Boolean (out_size, out_size) map of the pixels the prompt is added to."""
    y = torch.arange(out_size, device=device)[:, None]
    x = torch.arange(out_size, device=device)[None, :]
    if kind == "pad":
        return (y < pad) | (y >= out_size - pad) | (x < pad) | (x >= out_size - pad)
    if kind in ("fix", "random"):
        r0, c0 = (0, 0) if kind == "fix" else (row, col)
        return (y >= r0) & (y < r0 + mask_size) & (x >= c0) & (x < c0 + mask_size)
    if kind == "expansive":
        top, _ = image_offset(in_size, out_size)
        inside = (y >= top) & (y < top + in_size) & (x >= top) & (x < top + in_size)
        return ~inside
    raise ValueError(f"kind must be one of {PROMPT_KINDS}, got {kind!r}")


def prompt_normalize_ref(images: torch.Tensor, program: torch.Tensor, kind: str, pad: int = 0,
                         mask_size: int = 0, row: int = 0, col: int = 0,
                         mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                         out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Reference prompt op. ``images``: (B, C, in, in) float in [0, 1] or uint8 in [0, 255];
    ``program``: (C, out, out). Differentiable in ``program`` (and in float ``images``)."""
    compute_dtype = program.dtype
    if images.dtype == torch.uint8:
        x = images.to(compute_dtype) / 255
    else:
        compute_dtype = torch.promote_types(images.dtype, program.dtype)
        x = images.to(compute_dtype)
    out_size, in_size = program.shape[-1], images.shape[-1]
    lo, hi = image_offset(in_size, out_size)
    region = prompt_region_ref(kind, out_size, in_size, pad, mask_size, row, col, device=program.device)
    prompt = program if kind == "pad" else torch.sigmoid(program)
    x = F.pad(x, (lo, hi, lo, hi), value=0.0) + prompt.to(compute_dtype) * region
    x = x.clamp(0, 1)
    mean_t = torch.as_tensor(mean, dtype=compute_dtype, device=x.device)[:, None, None]
    std_t = torch.as_tensor(std, dtype=compute_dtype, device=x.device)[:, None, None]
    out = (x - mean_t) / std_t
    return out if out_dtype is None else out.to(out_dtype)

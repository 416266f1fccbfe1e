"""Winograd's minimal filtering F(4x4, 3x3) for the CPU engine's dense 3x3 convolutions: the transform of the
filters (made once per layer) and the plain-PyTorch reference of the C++ kernel ``vpns_fast._C.winograd_conv2d``
(csrc/winograd.cpp), which computes the same tiles with the same transforms.

A 3x3 convolution at stride 1 is computed 4x4 outputs at a time: a 6x6 input tile ``d`` and a filter ``g`` go to
the transform domain (``B^T d B`` and ``G g G^T``, 36 points each), where the convolution is a product point by
point, summed over input channels (36 matrix products for a whole layer), and ``A^T m A`` brings each tile's 36
sums back as 16 outputs: 36 multiplies per 16 outputs and input channel instead of 144. The constants below are
those of the interpolation points 0, 1, -1, 2, -2 and infinity (Lavin and Gray, "Fast Algorithms for
Convolutional Neural Networks", 2016).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

TILE = 4  # outputs along each side of a tile
POINTS = 36  # 6 x 6 transform points

_INPUT_TRANSFORM = ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
                    (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1))  # B^T
_FILTER_TRANSFORM = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
                     (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))  # G
_OUTPUT_TRANSFORM = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))  # A^T


def winograd_weight(weight: torch.Tensor) -> torch.Tensor:
    """The filters ``weight`` ([C_out, C_in, 3, 3]) in the transform domain, as the kernel takes them:
    ``G g G^T`` of each filter, laid out [36, C_in, C_out] (point-major, row by row), float32 and contiguous.
    Computed in float64, so the only rounding is the final one to float32."""
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"winograd_weight: weight must be [C_out, C_in, 3, 3], got shape {tuple(weight.shape)}")
    g = torch.tensor(_FILTER_TRANSFORM, dtype=torch.float64)
    transformed = torch.einsum("ik,ockl,jl->ijco", g, weight.detach().to(torch.float64), g)
    return transformed.reshape(POINTS, weight.shape[1], weight.shape[0]).to(torch.float32).contiguous()


PANEL = 16  # output channels in a packed panel, as the engine's 1x1 kernel packs them


def winograd_panels(weight: torch.Tensor) -> torch.Tensor:
    """:func:`winograd_weight` in the packed panels the engine's 1x1 tile multiplies by, [36, C_out / 16, C_in, 16]
    (each point's [C_in, C_out] cut into 16 output channels at a time, as ``pointwise_conv_pack`` cuts a 1x1
    weight). ``C_out`` must be a multiple of 16."""
    if weight.dim() != 4 or weight.shape[0] % PANEL:
        raise ValueError(f"winograd_panels: weight must be [C_out, C_in, 3, 3] with C_out a multiple of {PANEL}, "
                         f"got shape {tuple(weight.shape)}")
    transformed = winograd_weight(weight)  # [36, C_in, C_out]
    points, in_channels, out_channels = transformed.shape
    return transformed.reshape(points, in_channels, out_channels // PANEL, PANEL).transpose(1, 2).contiguous()


def winograd_conv2d_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                              padding: tuple[int, int], residual: torch.Tensor | None = None,
                              relu: bool = False) -> torch.Tensor:
    """``relu?(F.conv2d(x, weight, bias, padding=padding) + residual)`` computed as the kernel computes it
    (float32 tiles, the same transforms and products), in plain PyTorch: the kernel's reference in tests.
    ``x``: [N, C_in, H, W]; ``weight``: [C_out, C_in, 3, 3]; stride and dilation 1, groups 1."""
    n, _, height, width = x.shape
    pad_h, pad_w = padding
    out_h, out_w = height + 2 * pad_h - 2, width + 2 * pad_w - 2
    tiles_h, tiles_w = -(-out_h // TILE), -(-out_w // TILE)
    # zero padding to whole tiles: tile (i, j) reads input rows 4i - pad_h .. 4i - pad_h + 5
    padded = F.pad(x.float(), (pad_w, TILE * tiles_w + 2 - width - pad_w, pad_h, TILE * tiles_h + 2 - height - pad_h))
    tiles = padded.unfold(2, 6, TILE).unfold(3, 6, TILE)  # [N, C_in, tiles_h, tiles_w, 6, 6]
    b_t = torch.tensor(_INPUT_TRANSFORM, dtype=torch.float32)
    a_t = torch.tensor(_OUTPUT_TRANSFORM, dtype=torch.float32)
    tile_count, out_channels = n * tiles_h * tiles_w, weight.shape[0]  # sizes spelled out: batch 0 has no -1
    transformed = torch.einsum("ik,nchwkl,jl->ijnhwc", b_t, tiles, b_t).reshape(POINTS, tile_count, x.shape[1])
    products = torch.bmm(transformed, winograd_weight(weight)).reshape(6, 6, n, tiles_h, tiles_w, out_channels)
    out = torch.einsum("ai,ijnhwk,bj->nkhawb", a_t, products, a_t)
    out = out.reshape(n, out_channels, TILE * tiles_h, TILE * tiles_w)[:, :, :out_h, :out_w]
    if bias is not None:
        out = out + bias.float().view(1, -1, 1, 1)
    if residual is not None:
        out = out + residual
    return torch.relu(out) if relu else out.contiguous()

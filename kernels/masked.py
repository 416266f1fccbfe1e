"""Masked weights with the straight-through estimator (STE), and the layers built on them.

Forward ``w_eff = w * m`` with ``m = |s| > t``. ``s`` has the weight's shape (unstructured),
``[C_out, C_in, 1, 1]`` (kernel) or ``[C_out, 1, 1, 1]`` (channel), broadcast over the weight.
Backward, as in the VPNs / HYDRA release code where ``abs`` sits outside the STE:
``dL/dw = g * m`` and ``dL/ds = sum_broadcast(g * w * sign(s))``; ``t`` gets no gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def score_mask_ref(scores: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Boolean keep-mask in the scores' shape: ``|s| > t``."""
    return scores.abs() > threshold


class MaskedWeightFunction(torch.autograd.Function):
    """Reference autograd Function for ``w * (|s| > t)`` with the STE backward."""

    @staticmethod
    def forward(ctx, weight, scores, threshold):
        mask = score_mask_ref(scores, threshold)
        ctx.save_for_backward(weight, scores, mask)
        return weight * mask.to(weight.dtype)

    @staticmethod
    def backward(ctx, grad_weff):
        weight, scores, mask = ctx.saved_tensors
        grad_weight = grad_scores = None
        if ctx.needs_input_grad[0]:
            grad_weight = grad_weff * mask.to(grad_weff.dtype)
        if ctx.needs_input_grad[1]:
            grad_scores = (grad_weff * weight * torch.sign(scores)).sum_to_size(scores.shape).to(scores.dtype)
        return grad_weight, grad_scores, None


def masked_weight_ref(weight, scores, threshold):
    return MaskedWeightFunction.apply(weight, scores, threshold)


def masked_conv2d_ref(x, weight, scores, threshold, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return F.conv2d(x, masked_weight_ref(weight, scores, threshold), bias, stride, padding, dilation, groups)


def masked_linear_ref(x, weight, scores, threshold, bias=None):
    return F.linear(x, masked_weight_ref(weight, scores, threshold), bias)

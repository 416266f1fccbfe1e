"""A convolution's input gradient on a few boxes of the input only, and the autograd op that
gives it to a prompt.

Why: a prompt's program gradient reads the gradient of the network input at the prompt's pixels
only (the pad frame is 27% of a 224 image; a 16-pixel square 0.5%), but autograd computes the
first convolution's whole input gradient. With three input channels that gradient is the worst
shaped convolution of a ResNet: on an H200 (ResNet-18, B=256, bf16, channels_last) cuDNN took
3.2 ms a step for it, most of the 4.8 ms a stage-1 step spent beyond a dense fine-tuning step,
which never needs it (torch.profiler, bench/profile_step.py).

:func:`conv2d_input_grad_in_boxes` computes the input gradient inside the given boxes, exactly
(the transposed convolution of the output-gradient rows and columns that reach each box) and
zero elsewhere; :func:`conv2d_input_grad_in_boxes_ref` is the whole gradient, masked.
:func:`narrow_input_grad` attaches it to a convolution's output.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

Box = tuple[int, int, int, int]  # rows [y0, y1) x columns [x0, x1)


def _pair(value) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _reaching_outputs(start: int, stop: int, size_out: int, kernel: int, stride: int, padding: int,
                      dilation: int) -> tuple[int, int]:
    """[first, last] output positions whose taps reach input positions [start, stop) on one axis:
    output o reads input o * stride - padding + k * dilation, k in [0, kernel)."""
    first = max(0, -((padding + start - (kernel - 1) * dilation) // -stride))  # ceil division
    last = min(size_out - 1, (stop - 1 + padding) // stride)
    return first, last


def conv2d_input_grad_in_boxes(grad_output: torch.Tensor, weight: torch.Tensor, input_shape: Sequence[int],
                               boxes: Sequence[Box], stride=1, padding=0, dilation=1, groups: int = 1,
                               memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """The input gradient of ``conv2d(input, weight, stride, padding, dilation, groups)`` inside
    ``boxes`` (disjoint), zero outside them. Each box costs one transposed convolution over the
    output-gradient rows and columns that reach it (the box plus the kernel's reach)."""
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    kernel = weight.shape[-2:]
    grad_input = torch.empty(tuple(input_shape), dtype=grad_output.dtype, device=grad_output.device,
                             memory_format=memory_format).zero_()
    weight = weight.to(grad_output.dtype)
    for y0, y1, x0, x1 in boxes:
        bounds = []
        for axis, (start, stop) in enumerate(((y0, y1), (x0, x1))):
            first, last = _reaching_outputs(start, stop, grad_output.shape[2 + axis], kernel[axis], stride[axis],
                                            padding[axis], dilation[axis])
            # the transposed convolution's output position j is input position origin + j
            origin = first * stride[axis] - padding[axis]
            bounds.append((first, last, origin))
        (fy, ly, oy), (fx, lx, ox) = bounds
        if fy > ly or fx > lx:
            continue  # no output reads this box: its gradient is zero
        part = F.conv_transpose2d(grad_output[:, :, fy:ly + 1, fx:lx + 1], weight, stride=stride,
                                  dilation=dilation, groups=groups)
        top, bottom = max(y0, oy), min(y1, oy + part.shape[2])
        left, right = max(x0, ox), min(x1, ox + part.shape[3])
        if top < bottom and left < right:
            grad_input[:, :, top:bottom, left:right] = part[:, :, top - oy:bottom - oy, left - ox:right - ox]
    return grad_input


def conv2d_input_grad_in_boxes_ref(grad_output: torch.Tensor, weight: torch.Tensor, input_shape: Sequence[int],
                                   boxes: Sequence[Box], stride=1, padding=0, dilation=1,
                                   groups: int = 1) -> torch.Tensor:
    """Reference: the whole input gradient (torch.nn.grad.conv2d_input), zeroed outside ``boxes``."""
    full = torch.nn.grad.conv2d_input(tuple(input_shape), weight.to(grad_output.dtype), grad_output,
                                      _pair(stride), _pair(padding), _pair(dilation), groups)
    inside = torch.zeros(tuple(input_shape[-2:]), dtype=torch.bool, device=grad_output.device)
    for y0, y1, x0, x1 in boxes:
        inside[y0:y1, x0:x1] = True
    return full * inside


class _InputGradInBoxes(torch.autograd.Function):
    """Identity on the convolution's output (marked dirty, so no copy and no view); its backward
    passes the output gradient on and gives the input the gradient inside the boxes."""

    @staticmethod
    def forward(ctx, output, conv_input, weight, boxes, stride, padding, dilation, groups):
        ctx.mark_dirty(output)
        ctx.save_for_backward(weight)
        ctx.geometry = (tuple(boxes), stride, padding, dilation, groups)
        ctx.input_meta = (conv_input.shape, conv_input.dtype, _memory_format(conv_input))
        return output

    @staticmethod
    def backward(ctx, grad_output):
        grad_input = None
        if ctx.needs_input_grad[1]:
            (weight,) = ctx.saved_tensors
            boxes, stride, padding, dilation, groups = ctx.geometry
            shape, dtype, memory_format = ctx.input_meta
            grad_input = conv2d_input_grad_in_boxes(grad_output, weight, shape, boxes, stride, padding, dilation,
                                                    groups, memory_format).to(dtype)
        return grad_output, grad_input, None, None, None, None, None, None


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def narrow_input_grad(output: torch.Tensor, conv_input: torch.Tensor, weight: torch.Tensor, boxes: Sequence[Box],
                      stride=1, padding=0, dilation=1, groups: int = 1) -> torch.Tensor:
    """``output`` (a convolution of ``conv_input.detach()``), now also differentiable in
    ``conv_input``, whose gradient is exact inside ``boxes`` and zero outside them.

    Only for an input whose gradient is read inside the boxes alone (a prompt's program gradient
    reads its region's pixels): anything reading the rest would see zeros. ``weight`` is the
    weight the convolution used (detached; for a masked layer, the masked weight)."""
    return _InputGradInBoxes.apply(output, conv_input, weight.detach(), tuple(tuple(b) for b in boxes),
                                   _pair(stride), _pair(padding), _pair(dilation), int(groups))

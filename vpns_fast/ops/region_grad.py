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
:func:`narrow_input_grad` marks a network input so that the ``conv2d`` calls on it use it.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from vpns_fast.kernels._common import int_pair, memory_format_of

Box = tuple[int, int, int, int]  # rows [y0, y1) x columns [x0, x1)

# RegionGradInput is a torch.Tensor subclass: its hundreds of inherited members stay out of the API pages.
__all__ = ["conv2d_input_grad_in_boxes", "conv2d_input_grad_in_boxes_ref", "narrow_input_grad"]


def _conv_pairs(stride, padding, dilation) -> tuple[tuple[int, int], ...]:
    return tuple(int_pair(v, name) for v, name in ((stride, "stride"), (padding, "padding"), (dilation, "dilation")))


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
    stride, padding, dilation = _conv_pairs(stride, padding, dilation)
    kernel = weight.shape[-2:]
    # Under vmap (is_grads_batched, a vectorized jacobian) the parts are batched: summed out of place, each
    # padded to the whole input, since a batched part cannot be written into an unbatched tensor.
    batched = _is_batched(grad_output)
    grad_input = None if batched else torch.empty(tuple(input_shape), dtype=grad_output.dtype,
                                                  device=grad_output.device, memory_format=memory_format).zero_()
    weight = weight.to(grad_output.dtype)
    height, width = input_shape[-2:]
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
            inside = part[:, :, top - oy:bottom - oy, left - ox:right - ox]
            if batched:
                padded = F.pad(inside, (left, width - right, top, height - bottom))
                grad_input = padded if grad_input is None else grad_input + padded
            else:
                grad_input[:, :, top:bottom, left:right] = inside
    if grad_input is None:  # batched, and no box read by any output
        grad_input = grad_output.new_zeros(tuple(input_shape))
    return grad_input


def _is_batched(t: torch.Tensor) -> bool:
    """A vmapped tensor: torch.vmap's, or the legacy one autograd's is_grads_batched uses."""
    functorch = torch._C._functorch
    return any(check is not None and check(t) for check in
               (getattr(functorch, "is_batchedtensor", None), getattr(functorch, "is_legacy_batchedtensor", None)))


def conv2d_input_grad_in_boxes_ref(grad_output: torch.Tensor, weight: torch.Tensor, input_shape: Sequence[int],
                                   boxes: Sequence[Box], stride=1, padding=0, dilation=1,
                                   groups: int = 1) -> torch.Tensor:
    """Reference: the whole input gradient (torch.nn.grad.conv2d_input), zeroed outside ``boxes``."""
    full = torch.nn.grad.conv2d_input(tuple(input_shape), weight.to(grad_output.dtype), grad_output,
                                      *_conv_pairs(stride, padding, dilation), groups)
    inside = torch.zeros(tuple(input_shape[-2:]), dtype=torch.bool, device=grad_output.device)
    for y0, y1, x0, x1 in boxes:
        inside[y0:y1, x0:x1] = True
    return full * inside


class _ConvWithInputGradInBoxes(torch.autograd.Function):
    """``conv2d(x, weight, bias)`` whose backward gives ``x`` the gradient inside the boxes only and
    the weight and bias their whole gradients (``torch.nn.grad.conv2d_weight``: the same
    ``convolution_backward`` autograd runs). The backward is written in differentiable ops, so a
    double backward (``create_graph=True``) is right too."""

    @staticmethod
    def forward(ctx, x, weight, bias, boxes, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.geometry = (boxes, stride, padding, dilation, groups)
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_output):
        with torch._C.DisableTorchFunctionSubclass():  # x may be a RegionGradInput
            x, weight = ctx.saved_tensors
            boxes, stride, padding, dilation, groups = ctx.geometry
            grad_x = grad_weight = grad_bias = None
            if ctx.needs_input_grad[0]:
                grad_x = conv2d_input_grad_in_boxes(grad_output, weight, x.shape, boxes, stride, padding, dilation,
                                                    groups, memory_format_of(x)).to(x.dtype)
            if ctx.needs_input_grad[1]:
                grad_weight = torch.nn.grad.conv2d_weight(x, weight.shape, grad_output, stride, padding, dilation,
                                                          groups)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_bias = grad_output.sum((0, 2, 3))
        return grad_x, grad_weight, grad_bias, None, None, None, None, None


_CONV2D_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV2D_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


class RegionGradInput(torch.Tensor):
    """A network input (the same data and autograd history as the tensor it was made from) whose
    gradient is read inside ``region_boxes`` only. A ``conv2d`` called on this very tensor, with
    grad enabled and the tensor not modified in place since, computes its input gradient inside
    the boxes only (:class:`_ConvWithInputGradInBoxes`; ``narrowed_convs`` counts them); every
    other op sees a plain tensor and returns one. Made by :func:`narrow_input_grad`."""

    region_boxes: tuple[Box, ...]
    created_version: int
    narrowed_convs: int

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(t is not cls and not issubclass(cls, t) for t in types):
            return NotImplemented  # another subclass's own __torch_function__ decides (we then see none)
        with torch._C.DisableTorchFunctionSubclass():
            if func is torch.conv2d and not torch.compiler.is_compiling():
                call = dict(zip(_CONV2D_ARGS, args), **kwargs)
                x = call.get("input")
                if isinstance(x, cls) and x._narrowable(call):
                    x.narrowed_convs += 1
                    return _narrowed_conv2d(x, {**_CONV2D_DEFAULTS, **call})
            return func(*args, **kwargs)

    def _narrowable(self, call: dict) -> bool:
        weight = call.get("weight")
        return (torch.is_grad_enabled() and self.requires_grad and self._version == self.created_version
                and self.dim() == 4 and isinstance(weight, torch.Tensor) and weight.dim() == 4
                and not isinstance(call.get("padding", 0), str))


def _narrowed_conv2d(x: torch.Tensor, call: dict) -> torch.Tensor:
    """conv2d as autocast would run it (operands cast to its dtype), input gradient in the boxes."""
    weight, bias, boxes = call["weight"], call["bias"], call["input"].region_boxes
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight, bias = (_autocast_cast(t, dtype) for t in (x, weight, bias))
    with torch.autocast(x.device.type, enabled=False):
        return _ConvWithInputGradInBoxes.apply(x, weight, bias, boxes,
                                               *_conv_pairs(call["stride"], call["padding"], call["dilation"]),
                                               int(call["groups"]))


def _autocast_cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """As autocast casts an operand of conv2d: floating point other than float64."""
    if t is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(dtype)


def narrow_input_grad(x: torch.Tensor, boxes: Sequence[Box]) -> torch.Tensor:
    """``x`` (same data, same autograd history) for a network whose only reader of ``x``'s gradient
    reads it inside ``boxes`` (a prompt's program reads its region's pixels): the ``conv2d`` calls
    on ``x`` itself then compute their input gradient inside the boxes only, exactly, and zero
    elsewhere. Their weight and bias gradients are whole. A tensor that needs no gradient (or an
    inference tensor) is returned as it is."""
    if x.is_inference() or not x.requires_grad:
        return x
    narrowed = x.as_subclass(RegionGradInput)
    narrowed.region_boxes = tuple(tuple(int(v) for v in box) for box in boxes)
    narrowed.created_version = x._version
    narrowed.narrowed_convs = 0
    return narrowed

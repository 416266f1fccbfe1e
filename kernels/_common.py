"""Host-side helpers shared by the kernel files: layouts, conv geometry arguments, offset limits."""
from __future__ import annotations

import operator
import os

import torch

# Set before triton is imported; under the interpreter kernels run on CPU tensors, op by op.
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# In-tensor offsets are computed in int32.
MAX_INT32_OFFSET = 2**31 - 1


def is_channels_last(t: torch.Tensor) -> bool:
    """Whether a 4-D tensor is channels_last contiguous and not also NCHW contiguous (the memory
    format ``F.conv2d`` gives its output for it)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def has_nhwc_strides(t: torch.Tensor) -> bool:
    """Whether a (B, C, H, W) tensor is laid out NHWC, also for a non-contiguous view of one
    (e.g. a batch slice of a channels_last tensor)."""
    if t.is_contiguous():
        return False
    if t.is_contiguous(memory_format=torch.channels_last):
        return True
    return t.shape[1] > 1 and t.stride(1) < t.stride(3)


def as_pair(value) -> tuple:
    """A conv argument as written, as a tuple: a sequence as given, anything else twice (a
    string such as ``padding="same"`` included)."""
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """The memory format a conv gives its output and input gradient for input ``t`` (as F.conv2d does)."""
    return torch.channels_last if is_channels_last(t) else torch.contiguous_format


def int_pair(value, name: str) -> tuple[int, int]:
    """A conv stride / padding / dilation as ``(h, w)`` ints: an integer (a Python, numpy or 0-d tensor
    one, as F.conv2d takes), or a sequence of one or two."""
    if isinstance(value, str):
        raise ValueError(f"{name}={value!r}: string {name} is not supported by the implicit-GEMM conv; "
                         f"pass integers")
    if not isinstance(value, (tuple, list)):
        value = (value,)
    if len(value) == 1:
        value = tuple(value) * 2
    try:
        pair = tuple(operator.index(v) for v in value)
    except TypeError:
        pair = ()
    if len(pair) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair

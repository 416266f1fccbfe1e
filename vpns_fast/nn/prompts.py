"""Visual prompt modules: a learnable ``program`` applied to every input image, then
clamp and normalization, all in one op (:func:`vpns_fast.ops.prompt_normalize`).

Each module's output equals the VPNs release module of the same kind given the same
``program`` (docs/method.md §2). Inputs are float images in [0, 1] or uint8 images in [0, 255], shaped
``(B, 3, in_size, in_size)``; the output is ``(B, 3, out_size, out_size)``, normalized.
"""
from __future__ import annotations

import threading
from collections.abc import Sequence

import torch
from torch import nn

from vpns_fast import ops

# Per thread: (id of the prompt, its region arguments) of the last forward, for the region of that very call
# (a random prompt draws its square anew each call; threads sharing one prompt must not see each other's).
_LAST_CALL = threading.local()


class VisualPrompt(nn.Module):
    """Common part of the four prompt kinds: the program, sizes and normalization."""

    kind: str = ""

    def __init__(self, out_size: int, in_size: int | None = None, mean=ops.IMAGENET_MEAN, std=ops.IMAGENET_STD,
                 channels: int = 3):
        super().__init__()
        in_size = out_size if in_size is None else in_size
        for name, value in (("out_size", out_size), ("in_size", in_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if in_size > out_size:
            raise ValueError(f"in_size ({in_size}) must not exceed out_size ({out_size})")
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean and std need {channels} entries, got {len(mean)} and {len(std)}")
        self.out_size, self.in_size = out_size, in_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        # Full-size program as in the release code; only the prompt region receives gradient.
        self.program = nn.Parameter(torch.zeros(channels, out_size, out_size))

    def _check_images(self, images: torch.Tensor) -> None:
        if images.dim() != 4 or images.shape[-2:] != (self.in_size, self.in_size):
            raise ValueError(f"{type(self).__name__} expects images of shape (B, {self.program.shape[0]}, "
                             f"{self.in_size}, {self.in_size}), got {tuple(images.shape)}")

    def num_learnable(self) -> int:
        """Program entries that receive gradient (the prompt region times channels)."""
        return int(self.region().sum()) * self.program.shape[0]

    def region(self) -> torch.Tensor:
        """Boolean (out_size, out_size) map of where the prompt is added."""
        from vpns_fast.kernels.prompt import prompt_region_ref

        return prompt_region_ref(self.kind, self.out_size, self.in_size, **self._region_args())

    def _region_args(self) -> dict:
        return {}

    def forward(self, images: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        return self._prompted(images, out_dtype, self._region_args())

    def _prompted(self, images: torch.Tensor, out_dtype: torch.dtype | None, region_args: dict) -> torch.Tensor:
        self._check_images(images)
        out = ops.prompt_normalize(images, self.program, self.kind, mean=self.mean, std=self.std,
                                   out_dtype=out_dtype, **region_args)
        _LAST_CALL.call = (id(self), region_args)
        return out

    def last_region_boxes(self) -> list[tuple[int, int, int, int]] | None:
        """The region of this thread's last forward of this prompt, as disjoint boxes (y0, y1, x0, x1): rows
        [y0, y1) x columns [x0, x1); None if this thread's last prompt call was another prompt's."""
        from vpns_fast.kernels.prompt import prompt_region_boxes

        call = getattr(_LAST_CALL, "call", None)
        if call is None or call[0] != id(self):
            return None
        return prompt_region_boxes(self.kind, self.out_size, self.in_size, **call[1])

    def extra_repr(self) -> str:
        extra = "".join(f", {k}={v}" for k, v in self._region_args().items())
        return f"out_size={self.out_size}, in_size={self.in_size}{extra}"


class PadPrompt(VisualPrompt):
    """Learnable frame of ``pad`` pixels (no sigmoid), the VPNs default (p = 16)."""

    kind = "pad"

    def __init__(self, out_size: int = 224, in_size: int | None = None, pad: int = 16, mean=ops.IMAGENET_MEAN,
                 std=ops.IMAGENET_STD):
        super().__init__(out_size, in_size, mean, std)
        if isinstance(pad, bool) or not isinstance(pad, int) or not 0 < pad < out_size / 2:
            raise ValueError(f"pad must be an integer in [1, out_size/2) = [1, {out_size / 2:g}), got {pad!r}")
        self.pad = pad

    def _region_args(self) -> dict:
        return {"pad": self.pad}


class FixPrompt(VisualPrompt):
    """``sigmoid(program)`` on a fixed ``mask_size`` square at the top-left corner."""

    kind = "fix"

    def __init__(self, out_size: int = 224, in_size: int | None = None, mask_size: int = 16,
                 mean=ops.IMAGENET_MEAN, std=ops.IMAGENET_STD):
        super().__init__(out_size, in_size, mean, std)
        if isinstance(mask_size, bool) or not isinstance(mask_size, int) or not 0 < mask_size <= out_size:
            raise ValueError(f"mask_size must be an integer in [1, out_size={out_size}], got {mask_size!r}")
        self.mask_size = mask_size

    def _region_args(self) -> dict:
        return {"mask_size": self.mask_size}


class RandomPrompt(FixPrompt):
    """As :class:`FixPrompt`, but the square moves to a random place at every forward.

    The corner is drawn uniformly from ``[0, out_size - mask_size)`` on each axis, the range the
    release code uses, from torch's RNG (or ``generator``), so runs are reproducible.
    """

    kind = "random"

    def __init__(self, out_size: int = 224, in_size: int | None = None, mask_size: int = 16,
                 mean=ops.IMAGENET_MEAN, std=ops.IMAGENET_STD, generator: torch.Generator | None = None):
        super().__init__(out_size, in_size, mask_size, mean, std)
        if mask_size >= out_size:
            raise ValueError(f"mask_size must be below out_size={out_size} for a random prompt, got {mask_size}")
        self.generator = generator
        self.last_offset = (0, 0)

    def _region_args(self) -> dict:
        row, col = self.last_offset
        return {"mask_size": self.mask_size, "row": row, "col": col}

    def forward(self, images: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        span = self.out_size - self.mask_size
        row, col = torch.randint(span, (2,), generator=self.generator).tolist()
        self.last_offset = (row, col)
        # this call's square, not last_offset read back (another thread may have drawn since)
        return self._prompted(images, out_dtype, {"mask_size": self.mask_size, "row": row, "col": col})


class ExpansivePrompt(VisualPrompt):
    """``sigmoid(program)`` on the zero ring around the centred (smaller) image."""

    kind = "expansive"


def normalize(images: torch.Tensor, mean=ops.IMAGENET_MEAN, std=ops.IMAGENET_STD,
              out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The unprompted input path: uint8 -> [0, 1], then ``(x - mean) / std`` per channel."""
    x = images.float() / 255 if images.dtype == torch.uint8 else images
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device)[:, None, None]
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device)[:, None, None]
    out = (x - mean_t) / std_t
    return out if out_dtype is None else out.to(out_dtype)


PROMPTS = {cls.kind: cls for cls in (PadPrompt, FixPrompt, RandomPrompt, ExpansivePrompt)}


def build_prompt(kind: str, out_size: int, in_size: int | None = None, size: int = 16,
                 mean: Sequence[float] = ops.IMAGENET_MEAN, std: Sequence[float] = ops.IMAGENET_STD) -> VisualPrompt:
    """A prompt module by kind name; ``size`` is the pad width or the square's side."""
    if kind not in PROMPTS:
        raise ValueError(f"prompt kind must be one of {tuple(PROMPTS)}, got {kind!r}")
    if kind == "pad":
        return PadPrompt(out_size, in_size, pad=size, mean=mean, std=std)
    if kind in ("fix", "random"):
        return PROMPTS[kind](out_size, in_size, mask_size=size, mean=mean, std=std)
    return ExpansivePrompt(out_size, in_size, mean=mean, std=std)

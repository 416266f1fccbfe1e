"""Masked layers: Conv2d / Linear whose effective weight is ``weight * (|scores| > threshold)``.

They subclass the torch layers, so ``weight`` and ``bias`` keep torchvision's state_dict names
and ``isinstance(layer, nn.Conv2d)`` still holds; ``scores`` is a parameter and ``threshold`` a
0-dim float32 buffer (``-inf`` keeps every weight until a density is set).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vpns_fast import ops

GRANULARITIES = ("unstructured", "kernel", "channel")
SCORE_INITS = ("scaled", "kaiming")


def score_shape(weight_shape: torch.Size, granularity: str) -> tuple[int, ...]:
    """Scores per weight (unstructured), per (out, in) kernel, or per output channel.

    A Linear weight's "kernel" is a single weight, so kernel granularity equals unstructured there.
    """
    if granularity == "unstructured":
        return tuple(weight_shape)
    if granularity == "kernel":
        return tuple(weight_shape[:2]) + (1,) * (len(weight_shape) - 2)
    if granularity == "channel":
        return (weight_shape[0],) + (1,) * (len(weight_shape) - 1)
    raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")


@torch.no_grad()
def initial_scores(weight: torch.Tensor, granularity: str = "unstructured", method: str = "scaled") -> torch.Tensor:
    """HYDRA's score initializations.

    ``scaled``: ``sqrt(6 / fan_in) * W / max|W|``. For structured scores the group's magnitude
    ``mean |W|`` over the pooled dims stands in for ``W`` **[decision]**.
    ``kaiming``: uniform in ``±1/sqrt(fan_in)`` (kaiming_uniform with a = sqrt(5), HYDRA's default).
    """
    fan_in = weight[0].numel()
    shape = score_shape(weight.shape, granularity)
    if method == "scaled":
        w = weight.detach().float()
        if granularity != "unstructured":
            dims = [d for d in range(w.dim()) if shape[d] == 1 and w.shape[d] != 1]
            w = w.abs().mean(dim=dims, keepdim=True) if dims else w
        peak = w.abs().max()
        scores = math.sqrt(6.0 / fan_in) * w / (peak if peak > 0 else 1.0)
        return scores.to(weight.dtype).reshape(shape)
    if method == "kaiming":
        bound = 1.0 / math.sqrt(fan_in)
        return torch.empty(shape, dtype=weight.dtype, device=weight.device).uniform_(-bound, bound)
    raise ValueError(f"score_init must be one of {SCORE_INITS}, got {method!r}")


class MaskedMixin:
    """Shared state of the masked layers: scores, threshold, granularity."""

    scores: nn.Parameter
    threshold: torch.Tensor
    granularity: str

    def _init_masking(self, granularity: str, score_init: str) -> None:
        self.granularity = granularity
        self.scores = nn.Parameter(initial_scores(self.weight, granularity, score_init))
        self.register_buffer("threshold", torch.tensor(float("-inf"), device=self.weight.device))
        # Set by MaskLaunchBatching for the duration of one model forward, else None; see
        # current_batched_weight for why it is checked against the tensors' versions.
        self.batched_weight: torch.Tensor | None = None
        self.batched_input_weight: torch.Tensor | None = None  # input_masked_weight() of that forward
        self._batched_versions: tuple | None = None

    def score_mask(self) -> torch.Tensor:
        """Boolean mask in the scores' shape."""
        return ops.score_mask(self.scores.detach(), self.threshold)

    def input_mask(self) -> torch.Tensor | None:
        """Structured mode (``vpns_fast.pruning.structured``): the producer's channel mask on this layer's
        input channels, shaped ``[1, C_in, 1, 1]``; None for plain masked layers."""
        source = getattr(self, "in_mask_source", None)
        if source is None:
            return None
        return source.score_mask().reshape(1, -1, *([1] * (self.weight.dim() - 2)))

    def weight_mask(self) -> torch.Tensor:
        """Boolean mask in the weight's shape (own mask, and the input mask in structured mode)."""
        mask = self.score_mask().expand_as(self.weight)
        in_mask = self.input_mask()
        return mask if in_mask is None else mask & in_mask

    def masked_weight(self) -> torch.Tensor:
        return self.weight.detach() * self.weight_mask().to(self.weight.dtype)

    def _versions(self) -> tuple:
        versions = (self.weight._version, self.scores._version, self.threshold._version)
        source = getattr(self, "in_mask_source", None)
        if source is not None:  # structured mode: the input mask is the producer's
            versions += (source.scores._version, source.threshold._version)
        return versions

    def set_batched_weight(self, weight: torch.Tensor | None, input_weight: torch.Tensor | None = None) -> None:
        """``weight``: the effective weight of this forward; ``input_weight``: the
        ``input_masked_weight()`` it was computed from (kept so structured mode does not build it
        twice per forward). None clears both."""
        self.batched_weight = weight
        self.batched_input_weight = None if weight is None else input_weight
        self._batched_versions = None if weight is None else self._versions()

    def current_batched_weight(self) -> torch.Tensor | None:
        """The weight MaskLaunchBatching computed for this forward, if it still describes this
        layer. A forward interrupted by a BaseException (Ctrl-C) skips the hook that clears it, so
        it is used only while weight, scores and threshold are unchanged since it was computed."""
        if self.batched_weight is None or self._batched_versions != self._versions():
            return None
        if torch.is_grad_enabled() and self.batched_weight.grad_fn is None and (
                self.weight.requires_grad or self.scores.requires_grad):
            return None  # computed without grad (an interrupted eval forward): no gradient would flow
        return self.batched_weight

    def __getstate__(self):  # deepcopy / pickle: never carry a per-forward (non-leaf) tensor
        state = super().__getstate__()
        state["batched_weight"], state["batched_input_weight"], state["_batched_versions"] = None, None, None
        return state

    def input_masked_weight(self) -> torch.Tensor:
        """The weight the score mask applies to: in structured mode with the producer's pruned
        input channels zeroed (they are not read), else the weight itself."""
        cached = getattr(self, "batched_input_weight", None)  # absent on layers pickled before it existed
        if cached is not None and self.current_batched_weight() is not None:
            return cached
        in_mask = self.input_mask()
        return self.weight if in_mask is None else self.weight * in_mask.to(self.weight.dtype)

    def set_threshold(self, threshold) -> None:
        if isinstance(threshold, torch.Tensor):  # device to device: no host sync per layer and step
            self.threshold.copy_(threshold.detach().to(self.threshold.device, self.threshold.dtype))
        else:
            self.threshold.fill_(float(threshold))

    @classmethod
    def from_dense(cls, dense: nn.Module, granularity: str = "unstructured", score_init: str = "scaled"):
        """A masked layer that shares ``dense``'s weight and bias parameters (no copy)."""
        # Built on the meta device so no throw-away weight is allocated or initialized.
        args, kwargs = cls._constructor_args(dense)
        layer = cls(*args, **kwargs, bias=dense.bias is not None, device="meta", granularity=granularity,
                    score_init="kaiming")
        layer.weight, layer.bias = dense.weight, dense.bias
        layer._init_masking(granularity, score_init)
        return layer


class MaskedConv2d(MaskedMixin, nn.Conv2d):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", device=None, dtype=None, granularity="unstructured",
                 score_init="kaiming"):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        self._init_masking(granularity, score_init)

    @staticmethod
    def _constructor_args(conv: nn.Conv2d) -> tuple[tuple, dict]:
        return ((conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                 conv.groups), {"padding_mode": conv.padding_mode})

    def forward(self, x):
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return ops.masked_conv2d(x, self.input_masked_weight(), self.scores, self.threshold, self.bias, self.stride,
                                 padding, self.dilation, self.groups, masked_weight=self.current_batched_weight())

    def extra_repr(self):
        return super().extra_repr() + f", granularity={self.granularity}"


class MaskedLinear(MaskedMixin, nn.Linear):
    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, granularity="unstructured",
                 score_init="kaiming"):
        super().__init__(in_features, out_features, bias, device, dtype)
        self._init_masking(granularity, score_init)

    @staticmethod
    def _constructor_args(linear: nn.Linear) -> tuple[tuple, dict]:
        return (linear.in_features, linear.out_features), {}

    def forward(self, x):
        return ops.masked_linear(x, self.weight, self.scores, self.threshold, self.bias,
                                 masked_weight=self.current_batched_weight())

    def extra_repr(self):
        return super().extra_repr() + f", granularity={self.granularity}"


MASKED_TYPES = (MaskedConv2d, MaskedLinear)


def masked_layers(model: nn.Module) -> list[tuple[str, MaskedConv2d | MaskedLinear]]:
    """(qualified name, layer) for every masked layer, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MASKED_TYPES)]


class MaskLaunchBatching:
    """Model forward hooks: every masked layer's effective weight from ONE ``ops.masked_weights``
    call before the forward, instead of one mask launch per layer (and likewise one fused STE
    backward launch instead of one per layer).

    Installed on the model by :func:`vpns_fast.pruning.sparsify`. It acts only where the op's
    backend is ``triton`` (CUDA tensors by default), only when all masked layers share one weight
    dtype, one score dtype and one device, and not under torch.distributed: there the one fused
    backward would make every masked parameter's gradient ready at the very end of the backward,
    and DDP could no longer overlap its all-reduce with the remaining backward (unmeasured, so
    the per-layer path is kept). Otherwise every layer masks its own weight as before. Layers are
    found at each forward, so layers swapped in or out later are handled. The weights are handed
    to the layers for the duration of the forward only (cleared even when it raises); a layer
    called outside the model's forward masks its own weight.
    """

    def __init__(self, model: nn.Module):
        model.register_forward_pre_hook(self._before)
        model.register_forward_hook(self._after, always_call=True)

    @staticmethod
    def _layers(model: nn.Module) -> list:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return []
        layers = [m for m in model.modules() if isinstance(m, MASKED_TYPES)]
        if len(layers) < 2:
            return []
        w0, s0 = layers[0].weight, layers[0].scores
        if any(m.weight.dtype != w0.dtype or m.weight.device != w0.device or m.scores.dtype != s0.dtype
               for m in layers):
            return []
        try:
            backend, _ = ops.resolve("masked_weights", w0.device.type)
        except ops.BackendError:
            return []
        return layers if backend == "triton" else []

    def _before(self, model: nn.Module, args) -> None:
        layers = self._layers(model)
        if not layers:
            return
        for layer in layers:  # anything left by an interrupted forward (maybe computed without grad)
            layer.set_batched_weight(None)
        thresholds = torch.stack([m.threshold for m in layers])
        input_weights = [m.input_masked_weight() for m in layers]
        weights = ops.masked_weights(input_weights, [m.scores for m in layers], thresholds)
        for layer, weight, input_weight in zip(layers, weights, input_weights):
            layer.set_batched_weight(weight, input_weight)

    def _after(self, model: nn.Module, args, output) -> None:
        for m in model.modules():
            if isinstance(m, MASKED_TYPES):
                m.set_batched_weight(None)


def remove_mask_launch_batching(model: nn.Module) -> None:
    """Remove :class:`MaskLaunchBatching` hooks from ``model`` and its submodules (e.g. from a
    deep copy of a sparsified model)."""
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [k for k, hook in hooks.items() if isinstance(getattr(hook, "__self__", None),
                                                                      MaskLaunchBatching)]:
                del hooks[key]
                module._forward_hooks_always_called.pop(key, None)

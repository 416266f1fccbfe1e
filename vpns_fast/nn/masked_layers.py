"""Masked layers: Conv1d/2d/3d, Linear (and their subclasses) and nn.MultiheadAttention projections whose
effective weight is ``weight * (|scores| > threshold)``.

They subclass the torch layers, so ``weight`` and ``bias`` keep torchvision's state_dict names and
``isinstance(layer, nn.Conv2d)`` still holds; reading ``layer.weight`` gives the masked weight (the stored
one is ``layer.dense_weight``). ``scores`` is a parameter and ``threshold`` a 0-dim float32 buffer (``-inf``
keeps every weight until a density is set).
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


MASKING_ATTRIBUTES = ("granularity", "batched_weight", "batched_input_weight", "_batched_versions", "in_mask_source",
                      "channel_cap")  # instance state of a masked layer beyond `scores` and `threshold`


class MaskedMixin:
    """Shared state of the masked layers: scores, threshold, granularity, and the ``weight`` every reader sees.

    ``weight`` is a class-level property: the effective weight ``W * (|s| > t)`` with the STE of
    docs/method.md §3, whoever reads it (the layer's own forward, or code that passes ``layer.weight``
    to a functional, as torchvision's Swin attention and ``nn.MultiheadAttention`` do). The dense
    parameter stays registered as ``_parameters["weight"]`` (:attr:`dense_weight`), so state_dict keys,
    ``parameters()``, optimizers and checkpoints are as before: ``nn.Module.__setattr__`` registers a
    Parameter without calling the property.

    Why a property and not ``torch.nn.utils.parametrize``: parametrize renames the state_dict key to
    ``parametrizations.weight.original`` (today's checkpoints and fold's stock-loadable output would
    need remapping) and refuses to pickle the module; speed decides nothing. Forward + backward of a
    sparsified model (scores trainable), CPU (2-core AMD EPYC, shared with other jobs), 7 interleaved
    rounds of 5 steps, median (min-max) ms per step -- the layers' own forward through the ops / a torch
    forward reading the ``weight`` property / parametrize:
    small_resnet, batch 8, 32x32: 85.8 (23.4-150) / 80.4 (23.3-96.2) / 53.1 (26.3-79.6);
    resnet18, batch 2, 64x64: 431 (318-2521) / 397 (338-435) / 377 (333-444).
    The spreads overlap and the fastest rounds are within 12% of each other. Conv2d and Linear keep
    their own forward through the ops (the triton backend's conv dispatch needs the dense weight and
    the scores); the property serves every other reader.
    """

    scores: nn.Parameter
    threshold: torch.Tensor
    granularity: str
    dense_class: type  # the torch class a masked class stands for; fold() turns a layer back into it

    @property
    def dense_weight(self) -> nn.Parameter:
        """The stored (unmasked) weight parameter."""
        return self._parameters["weight"]

    @property
    def weight(self) -> torch.Tensor | None:
        params = self.__dict__.get("_parameters")
        if params is None or "weight" not in params:
            raise AttributeError(f"{type(self).__name__} has no weight yet")
        if params["weight"] is None or "threshold" not in self._buffers:
            return params["weight"]  # inside the torch base class's __init__ (reset_parameters), before masking
        try:
            return self.effective_weight()
        except AttributeError as exc:
            # An AttributeError escaping a property makes nn.Module.__getattr__ return the dense
            # parameter instead: the mask would be bypassed without a word.
            raise RuntimeError(f"masked weight of {type(self).__name__}: {exc}") from exc

    @property
    def kind(self) -> str:
        """The torch layer type this masks, for reports."""
        return self.dense_class.__name__

    def effective_weight(self) -> torch.Tensor:
        """``W * mask`` with the STE: the weight MaskLaunchBatching computed for this forward when
        there is one, else computed here (the torch reference path on the CPU)."""
        batched = self.current_batched_weight()
        if batched is not None:
            return batched
        return ops.masked_weights([self.input_masked_weight()], [self.scores], self.threshold.reshape(1))[0]

    def _init_masking(self, granularity: str, score_init: str) -> None:
        weight = self.dense_weight
        self.granularity = granularity
        self.scores = nn.Parameter(initial_scores(weight, granularity, score_init))
        # in the scores' dtype: a float32 threshold rounded a float64 model's, which then kept 99 of 100 weights
        # where 50 were asked for (an outside review)
        self.register_buffer("threshold", torch.tensor(float("-inf"), device=weight.device, dtype=self.scores.dtype))
        # batched_weight: set by MaskLaunchBatching for the duration of one model forward, else None
        # (see current_batched_weight for why it is checked against the tensors' versions), with
        # batched_input_weight, the input_masked_weight() it was computed from.
        self.set_batched_weight(None)

    def strip_masking(self) -> None:
        """Drop scores, threshold and every other masking attribute, and turn the layer back into
        :attr:`dense_class` (fold() calls this on its copy after writing the folded weight)."""
        self._parameters.pop("scores", None)
        self._buffers.pop("threshold", None)
        for name in MASKING_ATTRIBUTES:
            self.__dict__.pop(name, None)
        self.__class__ = self.dense_class

    def score_mask(self) -> torch.Tensor:
        """Boolean mask in the scores' shape."""
        return ops.score_mask(self.scores.detach(), self.threshold)

    def input_mask(self) -> torch.Tensor | None:
        """Structured mode (``vpns_fast.pruning.structured``): the producer's channel mask on this layer's
        input channels, shaped ``[1, C_in, 1, 1]``; None for plain masked layers."""
        source = getattr(self, "in_mask_source", None)
        if source is None:
            return None
        return source.score_mask().reshape(1, -1, *([1] * (self.dense_weight.dim() - 2)))

    def weight_mask(self) -> torch.Tensor:
        """Boolean mask in the weight's shape (own mask, and the input mask in structured mode)."""
        mask = self.score_mask().expand_as(self.dense_weight)
        in_mask = self.input_mask()
        return mask if in_mask is None else mask & in_mask

    def masked_weight(self) -> torch.Tensor:
        """``W * mask`` without gradient (what fold() writes)."""
        weight = self.dense_weight
        return weight.detach() * self.weight_mask().to(weight.dtype)

    def _versions(self) -> tuple:
        versions = (self.dense_weight._version, self.scores._version, self.threshold._version)
        source = getattr(self, "in_mask_source", None)
        if source is not None:  # structured mode: the input mask is the producer's
            versions += (source.scores._version, source.threshold._version)
        return versions

    def set_batched_weight(self, weight: torch.Tensor | None, input_weight: torch.Tensor | None = None) -> None:
        """``weight``: the effective weight of this forward; ``input_weight``: the
        ``input_masked_weight()`` it was computed from (kept so structured mode does not build it
        twice per forward). None clears both."""
        # Through __dict__: nn.Module.__setattr__ would register a Parameter (the stem's input weight
        # is the dense weight itself) as a parameter of the layer for the duration of the forward.
        self.__dict__["batched_weight"] = weight
        self.__dict__["batched_input_weight"] = None if weight is None else input_weight
        self.__dict__["_batched_versions"] = None if weight is None else self._versions()

    def current_batched_weight(self) -> torch.Tensor | None:
        """The weight MaskLaunchBatching computed for this forward, if it still describes this
        layer. A forward interrupted by a BaseException (Ctrl-C) skips the hook that clears it, so
        it is used only while weight, scores and threshold are unchanged since it was computed."""
        batched = self.__dict__.get("batched_weight")  # absent on layers pickled before it existed
        if batched is None or self._batched_versions != self._versions():
            return None
        if torch.is_grad_enabled() and batched.grad_fn is None and (
                self.dense_weight.requires_grad or self.scores.requires_grad):
            return None  # computed without grad (an interrupted eval forward): no gradient would flow
        return batched

    def __getstate__(self):  # deepcopy / pickle: never carry a per-forward (non-leaf) tensor
        state = dict(super().__getstate__())
        state["batched_weight"], state["batched_input_weight"], state["_batched_versions"] = None, None, None
        return state

    def input_masked_weight(self) -> torch.Tensor:
        """The weight the score mask applies to: in structured mode with the producer's pruned
        input channels zeroed (they are not read), else the weight itself."""
        cached = self.__dict__.get("batched_input_weight")
        if cached is not None and self.current_batched_weight() is not None:
            return cached
        weight = self.dense_weight
        in_mask = self.input_mask()
        return weight if in_mask is None else weight * in_mask.to(weight.dtype)

    def set_threshold(self, threshold) -> None:
        if self.threshold.dtype != self.scores.dtype:  # a layer made before the threshold followed the scores
            self.threshold = self.threshold.to(self.scores.dtype)
        if isinstance(threshold, torch.Tensor):  # device to device: no host sync per layer and step
            self.threshold.copy_(threshold.detach().to(self.threshold.device, self.threshold.dtype))
        else:
            self.threshold.fill_(float(threshold))

    def extra_repr(self):
        return super().extra_repr() + f", granularity={self.granularity}"


class MaskedConv2d(MaskedMixin, nn.Conv2d):
    dense_class = nn.Conv2d

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", device=None, dtype=None, granularity="unstructured",
                 score_init="kaiming"):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        self._init_masking(granularity, score_init)

    def forward(self, x):
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return ops.masked_conv2d(x, self.input_masked_weight(), self.scores, self.threshold, self.bias, self.stride,
                                 padding, self.dilation, self.groups, masked_weight=self.current_batched_weight())


class MaskedLinear(MaskedMixin, nn.Linear):
    dense_class = nn.Linear

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, granularity="unstructured",
                 score_init="kaiming"):
        super().__init__(in_features, out_features, bias, device, dtype)
        self._init_masking(granularity, score_init)

    def forward(self, x):
        return ops.masked_linear(x, self.dense_weight, self.scores, self.threshold, self.bias,
                                 masked_weight=self.current_batched_weight())


def _init_as_masked(self, *args, granularity: str = "unstructured", score_init: str = "kaiming", **kwargs) -> None:
    """``__init__`` of the masked classes whose forward is the torch class's own (it reads the
    masked ``weight`` property): the torch constructor, then the masking state."""
    self.dense_class.__init__(self, *args, **kwargs)
    self._init_masking(granularity, score_init)


class MaskedConv1d(MaskedMixin, nn.Conv1d):
    """Conv1d on the torch reference path: ``W * mask`` (the ``weight`` property), then F.conv1d."""
    dense_class = nn.Conv1d
    __init__ = _init_as_masked


class MaskedConv3d(MaskedMixin, nn.Conv3d):
    """Conv3d on the torch reference path: ``W * mask`` (the ``weight`` property), then F.conv3d."""
    dense_class = nn.Conv3d
    __init__ = _init_as_masked


class MaskedProjection(MaskedMixin, nn.Module):
    """One projection matrix of a masked ``nn.MultiheadAttention`` (``in_proj_weight``, or
    ``q/k/v_proj_weight``): its scores and threshold. The weight Parameter is the attention module's
    own, registered here too so the mask code finds it as ``weight``; the state_dict holds it once,
    under the attention module's stock name."""

    dense_class = nn.MultiheadAttention

    def __init__(self, weight: nn.Parameter, granularity: str = "unstructured", score_init: str = "scaled"):
        super().__init__()
        self.weight = weight
        self._init_masking(granularity, score_init)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.pop(prefix + "weight", None)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if prefix + "weight" in missing_keys:  # loaded by the attention module under its own name
            missing_keys.remove(prefix + "weight")

    def extra_repr(self):
        return f"shape={tuple(self.dense_weight.shape)}, granularity={self.granularity}"


# nn.MultiheadAttention's projection matrices: {submodule name of the mask: parameter name}
ATTENTION_PROJECTIONS = {"in_proj": "in_proj_weight", "q_proj": "q_proj_weight", "k_proj": "k_proj_weight",
                         "v_proj": "v_proj_weight"}


def _projection_property(unit_name: str, param_name: str) -> property:
    def effective(self):
        unit = self.__dict__["_modules"].get(unit_name)
        if unit is None:  # left dense (exclude=)
            return self._parameters[param_name]
        return unit.weight
    return property(effective, doc=f"``{param_name}`` with its mask applied (STE), when it is masked")


class MaskedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose projection matrices read through their masks: each masked
    ``in_proj_weight`` / ``q/k/v_proj_weight`` is a property returning ``W * mask`` from its
    :class:`MaskedProjection` submodule (``in_proj``, ``q_proj``, ...), and ``out_proj`` is a masked
    Linear of its own. Its forward is torch's (F.multi_head_attention_forward, or the fused fast
    path in inference), given the masked weights."""

    dense_class = nn.MultiheadAttention
    in_proj_weight = _projection_property("in_proj", "in_proj_weight")
    q_proj_weight = _projection_property("q_proj", "q_proj_weight")
    k_proj_weight = _projection_property("k_proj", "k_proj_weight")
    v_proj_weight = _projection_property("v_proj", "v_proj_weight")

    def mask_units(self) -> list[MaskedMixin]:
        units = [self._modules[name] for name in ATTENTION_PROJECTIONS if name in self._modules]
        return units + ([self.out_proj] if isinstance(self.out_proj, MaskedMixin) else [])

    def forward(self, *args, **kwargs):
        # torch's forward reads each projection weight up to four times (fast-path checks, then the
        # call), and each read would build W * mask again: build it once for this forward.
        held = [unit for unit in self.mask_units() if unit.current_batched_weight() is None]
        for unit in held:
            unit.set_batched_weight(unit.effective_weight())
        try:
            return super().forward(*args, **kwargs)
        finally:
            for unit in held:
                unit.set_batched_weight(None)


def mask_attention_projection(attention: nn.MultiheadAttention, unit_name: str, granularity: str,
                              score_init: str) -> MaskedProjection:
    """Mask one projection matrix of ``attention`` in place (the module becomes a
    :class:`MaskedMultiheadAttention`); returns its mask submodule."""
    if unit_name not in ATTENTION_PROJECTIONS:
        raise ValueError(f"unit_name must be one of {tuple(ATTENTION_PROJECTIONS)}, got {unit_name!r}")
    if unit_name in attention._modules:
        raise ValueError(f"{unit_name} of this attention module is already masked")
    unit = MaskedProjection(attention._parameters[ATTENTION_PROJECTIONS[unit_name]], granularity, score_init)
    attention.__class__ = MaskedMultiheadAttention
    children = dict(attention._modules)  # masks first, in ATTENTION_PROJECTIONS order, then out_proj
    children[unit_name] = unit
    attention._modules.clear()
    attention._modules.update({name: children.pop(name) for name in ATTENTION_PROJECTIONS if name in children})
    attention._modules.update(children)
    return unit


def unmask_attention(attention: MaskedMultiheadAttention) -> None:
    """Fold each masked projection into its parameter (``W * mask``, no gradient history) and turn
    the module back into a plain ``nn.MultiheadAttention`` (``out_proj`` is folded on its own)."""
    for unit_name, param_name in ATTENTION_PROJECTIONS.items():
        unit = attention._modules.pop(unit_name, None)
        if unit is not None:
            dense = attention._parameters[param_name]
            attention._parameters[param_name] = nn.Parameter(unit.masked_weight(), requires_grad=dense.requires_grad)
    attention.__class__ = nn.MultiheadAttention


# Masked classes by the torch class they mask; classes made at run time for other subclasses are added.
_MASKED_CLASSES: dict[type, type] = {
    nn.Conv1d: MaskedConv1d, nn.Conv2d: MaskedConv2d, nn.Conv3d: MaskedConv3d, nn.Linear: MaskedLinear,
}
MASKABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)  # and their subclasses


def _new_masked_instance(dense_class: type):
    cls = masked_class(dense_class)
    return cls.__new__(cls)


def _reduce_made_class(self, protocol):
    # A class made at run time cannot be pickled by name: unpickling rebuilds it from the torch
    # (or user) class it masks, which can.
    _, _, *rest = object.__reduce_ex__(self, protocol)
    return (_new_masked_instance, (self.dense_class,), *rest)


def masked_class(cls: type) -> type:
    """The masked class of a Conv1d/2d/3d or Linear class, or of a subclass: for a subclass, a
    class made on first use, ``(MaskedMixin, cls)``, whose forward is ``cls``'s own reading the
    masked ``weight`` (e.g. ``NonDynamicallyQuantizableLinear``, timm's ``Conv2dSame``)."""
    masked = _MASKED_CLASSES.get(cls)
    if masked is not None:
        return masked
    if not (isinstance(cls, type) and issubclass(cls, MASKABLE_TYPES)):
        raise TypeError(f"cannot mask a {getattr(cls, '__name__', cls)}: Conv1d/2d/3d, Linear and their subclasses "
                        "are maskable (nn.MultiheadAttention through mask_attention_projection)")
    masked = type(f"Masked{cls.__name__}", (MaskedMixin, cls), {
        "dense_class": cls, "__init__": _init_as_masked, "__reduce_ex__": _reduce_made_class, "__module__": __name__,
        "__doc__": f"{cls.__name__} whose ``weight`` reads through its mask (see MaskedMixin)."})
    _MASKED_CLASSES[cls] = masked
    return masked


def mask_layer(layer: nn.Module, granularity: str = "unstructured", score_init: str = "scaled") -> nn.Module:
    """Mask a Conv1d/2d/3d or Linear (or a subclass) in place: it becomes an instance of
    :func:`masked_class` of its type, keeping its parameters, hooks and attributes; returns it."""
    cls = masked_class(type(layer))
    weight = layer._parameters.get("weight")
    if not isinstance(weight, nn.Parameter) or isinstance(weight, nn.parameter.UninitializedParameter):
        raise ValueError(f"cannot mask a {type(layer).__name__} without an initialized weight parameter")
    layer.__class__ = cls
    layer._init_masking(granularity, score_init)
    return layer


MASKED_TYPES = (MaskedMixin,)


def masked_layers(model: nn.Module) -> list[tuple[str, MaskedMixin]]:
    """(qualified name, layer) for every masked layer, in module order (an attention module's
    masked projections are its submodules ``in_proj`` / ``q_proj`` / ``k_proj`` / ``v_proj``)."""
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
        w0, s0 = layers[0].dense_weight, layers[0].scores
        if any(m.dense_weight.dtype != w0.dtype or m.dense_weight.device != w0.device or m.scores.dtype != s0.dtype
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

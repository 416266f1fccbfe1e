"""Inference modules for deployment: ``deploy(path_or_model)`` gives an ``nn.Module`` that takes
images (uint8 in [0, 255] or float in [0, 1], ``(B, 3, in, in)``) and returns target logits. Other
integer dtypes, float pixels outside [0, 1] (by more than vpns_fast.data.FLOAT_PIXEL_SLACK) and NaN / Inf pixels raise
ValueError rather than give wrong logits.

Backends per device:

* CPU: the network (the slim one when the masks are structured and the model is a ResNet or a
  VGG, the folded one otherwise) goes through :func:`vpns_fast.deploy.sparse_cpu.convert_for_cpu`, which
  picks the sparse C++ kernel or dense torch per layer (``policy="measure"`` times both). When the
  extension is missing, dense torch runs every layer and the reason is recorded in ``.decisions``.
* CUDA: the slim dense network for structured masks, the folded dense network otherwise, both
  channels_last for cuDNN. (2:4 semi-structured sparsity is not used.)
"""
from __future__ import annotations

import copy
import math
import operator
import os
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from vpns_fast._version import __version__
from vpns_fast.data import FLOAT_PIXEL_SLACK, check_float_pixel_range  # noqa: F401 - FLOAT_PIXEL_SLACK: its old home
from vpns_fast.deploy import fusion
from vpns_fast.errors import caller_stacklevel, exception_reason, shortened
from vpns_fast.nn.prompts import VisualPrompt, normalize

__all__ = ["DeployedModel", "deploy", "benchmark_inference"]

POLICIES = ("measure", "sparse", "dense")


class DeployedModel(nn.Module):
    """input stage (prompt op or normalization) -> network -> label mapping; eval mode, no grad.

    ``decisions``: per-layer rows (name, shapes, density, timings, ``chosen``, ``reason``); ``info``: device,
    network kind (slim / folded / plain), backend and, when the sparse CPU engine was not used, why.
    """

    def __init__(self, network: nn.Module, prompt: VisualPrompt | None, mapping: torch.Tensor | None,
                 mean, std, image_size: int, decisions: list, info: dict, class_names=None):
        super().__init__()
        self.network, self.prompt = network, prompt
        self.register_buffer("mapping", mapping.long() if mapping is not None else None)
        self.mapping_end = _mapping_end(self.mapping)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        # (H, W) of the images it takes (None: any size, a module without prompt or image size); image_size is
        # the side when they are square, else None
        self.image_shape = _image_shape(image_size)
        self.image_size = self.image_shape[0] if self.image_shape and len(set(self.image_shape)) == 1 else None
        self.decisions, self.info = decisions, info
        self.class_names = list(class_names) if class_names is not None else None
        self.eval()
        for param in self.parameters():
            param.requires_grad_(False)

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_call_plans", None)  # made again on the next call (the extension's plans do not pickle)
        state.pop("_input_stage", None)  # as _call_plans (it holds the extension's module)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        # pickled before these existed: the image shape from the side, the mapping's extent from the mapping
        if "image_shape" not in self.__dict__:
            self.image_shape = _image_shape(self.image_size)
        if "mapping_end" not in self.__dict__:
            self.mapping_end = _mapping_end(self._buffers.get("mapping"))

    @property
    def device(self) -> torch.device:
        return torch.device(self.info["device"])

    def _apply(self, fn, recurse=True):
        """``.half()``, ``.to(...)`` and the like are refused (TypeError) unless they leave the module float32 on
        its device, before any tensor changes: ``forward`` feeds the network float32 images on ``device``, so a
        cast module would fail on its next call, partly converted."""
        from vpns_fast.deploy.sparse_cpu import cast_by

        probe = cast_by(fn, self.device)
        if probe.dtype != torch.float32 or probe.device != torch.zeros(0, device=self.device).device:
            raise TypeError(f"DeployedModel runs float32 on {self.device}, as deployed; this call would make it "
                            f"{probe.dtype} on {probe.device} (deploy again for another device; images of any "
                            "float dtype or uint8 are converted by forward)")
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True):  # an inference module stays in eval mode
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self._fast_input(images)
        if x is None:  # every check in Python, with its own message
            return self._checked_forward(images)
        # no gradient recorded (NetworkPlans.output) and no label mapping on this path
        return self._network_plans().output(self._modules["network"], x)

    @torch.no_grad()
    def _checked_forward(self, images: torch.Tensor) -> torch.Tensor:
        """``forward`` as its steps spell it out: every check with its own message, any backend and input stage."""
        return self._mapped(self._network_output(self._network_input(images))[0])

    def _fast_input(self, images: torch.Tensor) -> torch.Tensor | None:
        """``_network_input(images)`` in one call of the extension (``input_stage``) and the range check, or None
        where the stage does not take the images (nothing run): this class's own steps (not a subclass's, none
        replaced on the instance), the CPU engine without prompt or label mapping, mean and std tuples of floats
        and images the one-pass stage takes (``_network_input`` takes the same ones with the same call). ``forward``
        then runs the network through its plans (vpns_fast.deploy.call_plan.NetworkPlans.output, which records no
        gradient either way) rather than under ``torch.no_grad()``: the same output as ``_checked_forward``'s, bit
        for bit, and the same errors.
        Why: between two calls of a network every line the Python code between them reads has left the caches
        (an Intel Xeon guest's L2 and much of its L3): right after a call of ResNet-50 at 5% kept, batch
        1, ``isinstance(x, torch.Tensor) and x.device.type`` took 37-39 us against 0.4 us warm, and the
        general path's steps before and after the plan 0.53 ms of a 12.7 ms call (medians of 40 and 60 calls,
        2026-12-07, bench/results/cpu-fast-path-ab-2026-12-07-intel-xeon.txt, with the A/B the README quotes)."""
        state = self.__dict__
        if (type(self) is not DeployedModel or type(images) is not torch.Tensor
                or state["info"].get("backend") != "sparse_cpu" or state["_modules"].get("prompt") is not None
                or state["_buffers"].get("mapping") is not None or not _FORWARD_STEPS.isdisjoint(state)):
            return None
        stage = state.get("_input_stage")
        if (stage is None or stage[0] is not state["mean"] or stage[1] is not state["std"]
                or stage[2] is not state["image_shape"]):
            stage = self._input_stage_arguments()
            if stage is None:
                return None
        return _in_range(stage[3].input_stage(images, *stage[4:]))

    def _input_stage_arguments(self) -> tuple | None:
        """(mean, std, image_shape as read, the extension, input_stage's mean, std, height, width), kept
        while those three attributes are the same objects, which stand for their values: tuples of floats (and
        ints or None for the shape), none of them changeable in place; None where the fast path does not take
        them (a list, which can change in place)."""
        from vpns_fast.deploy import sparse_cpu

        mean, std, shape = self.mean, self.std, self.image_shape
        if not (_float_tuple(mean) and _float_tuple(std)
                and (shape is None or (type(shape) is tuple and all(type(v) is int for v in shape)))
                and sparse_cpu.available()[0]):
            return None
        stage = (mean, std, shape, sparse_cpu._ops(), _three_per_channel(mean), _three_per_channel(std),
                 *_stage_shape(shape))
        self.__dict__["_input_stage"] = stage
        return stage

    @torch.no_grad()
    def timed_call(self, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """``forward(images)`` through the general path's steps (``_checked_forward``'s, the same output), and
        where its time went: ``input_ms`` (the checks and the input stage),
        ``network_ms``, ``total_ms``, and ``steps``: where the network ran through a compiled call plan, each step's
        ``(op, target, step, ms)`` timed inside the call (``op`` ``call_module``: ``target`` is the layer's path,
        as in ``decisions``; else a graph node's name), else None (no plan, or not the CPU engine)."""
        self._synchronized()
        start = time.perf_counter()
        x = self._network_input(images)
        self._synchronized()
        ready = time.perf_counter()
        logits, steps = self._network_output(x, timed=True)
        self._synchronized()
        done = time.perf_counter()
        out = self._mapped(logits)
        self._synchronized()
        timing = {"input_ms": 1e3 * (ready - start), "network_ms": 1e3 * (done - ready),
                  "total_ms": 1e3 * (time.perf_counter() - start),
                  "steps": None if steps is None else [(op, target, step, 1e3 * s) for op, target, step, s in steps]}
        return out, timing

    def _synchronized(self) -> None:
        """Waits for the GPU's queued work, where the module runs on one (a timing must not stop before it)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _network_input(self, images: torch.Tensor) -> torch.Tensor:
        """The network's input for ``images``: checked, on the device, through the prompt or the normalization.
        Under torch.jit.trace, refused first where the CPU engine runs the network (a call plan runs it as one
        C++ call, which a trace would record as a constant)."""
        if self.info.get("backend") == "sparse_cpu":
            from vpns_fast.deploy.sparse_cpu import refuse_tracing

            refuse_tracing("DeployedModel")
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images: expected a torch.Tensor, got {type(images).__name__}")
        if images.device.type == "meta":
            raise ValueError("images: a meta tensor has no values to classify")
        size = self.image_shape
        if images.dim() != 4 or images.shape[1] != 3 or (size is not None and tuple(images.shape[-2:]) != size):
            shape = f"(B, 3, {size[0]}, {size[1]})" if size is not None else "(B, 3, H, W)"
            raise ValueError(f"images: expected a shape {shape}, got {tuple(images.shape)}")
        if self.info.get("backend") == "sparse_cpu" and self.prompt is None:
            # the normalization in one pass where it takes the images (csrc/input_stage.cpp), bit for bit normalize's;
            # one value for every channel broadcast as normalize broadcasts it. The fast path's call.
            from vpns_fast.deploy import sparse_cpu

            staged = sparse_cpu._ops().input_stage(images, _three_per_channel(self.mean),
                                                   _three_per_channel(self.std), *_stage_shape(size))
            if staged is not None:
                return _in_range(staged)
        images = _checked_pixels(images).to(self.device, non_blocking=True)
        if images.dtype != torch.uint8 and images.dtype != torch.float32:
            images = images.float()
        x = self.prompt(images) if self.prompt is not None else normalize(images, self.mean, self.std)
        if self.info.get("channels_last"):
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _mapped(self, logits):
        """``logits`` through the label mapping, where the module has one."""
        if self.mapping is None:
            return logits
        if not isinstance(logits, torch.Tensor) or logits.dim() < 2:
            what = f"shape {tuple(logits.shape)}" if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"label_mapping: the network returns {what}, not (B, classes, ...) logits to map")
        if self.mapping_end > logits.shape[1]:
            raise ValueError(f"label_mapping: index {self.mapping_end - 1} is out of range for the network's "
                             f"{logits.shape[1]} outputs")
        return logits.index_select(1, self.mapping)

    def _network_output(self, x: torch.Tensor, timed: bool = False):
        """(``self.network(x)``, its steps): the network through a compiled call plan where the CPU engine runs it and
        one is made for ``x`` (vpns_fast.deploy.call_plan: the same calls, as one C++ call); the steps, with
        ``timed``, each step's (op, target, step, seconds) where the plan ran, else None."""
        if self.info.get("backend") != "sparse_cpu":
            return self.network(x), None
        plans = self._network_plans()
        return plans.timed_output(self.network, x) if timed else (plans.output(self.network, x), None)

    def _network_plans(self):
        from vpns_fast.deploy import call_plan

        plans = self.__dict__.get("_call_plans")
        if plans is None:  # made on the first call, and again after unpickling or a copy
            plans = self.__dict__.setdefault("_call_plans", call_plan.NetworkPlans())
        return plans

    def call_plans(self) -> list[dict]:
        """The compiled call plans this module holds, one per input shape met: ``input_shape``, ``steps`` (0 where
        refused) and ``refused`` (why not, or "")."""
        plans = self.__dict__.get("_call_plans")
        return plans.summary() if plans is not None else []


# DeployedModel's steps that _checked_forward calls and its fast path does in C++: one set on an instance (a
# patched step) sends calls the general way.
_FORWARD_STEPS = frozenset({"_network_input", "_network_output", "_mapped", "_checked_forward"})


def _three_per_channel(values) -> list[float]:
    """One mean or std per channel of an RGB image: three as given, or one repeated (as normalize broadcasts it);
    any other count as given, which input_stage does not take (it takes three), leaving those to normalize."""
    return list(values) * 3 if len(values) == 1 else list(values)


def _stage_shape(shape: tuple[int, int] | None) -> tuple[int, int]:
    """input_stage's (height, width) for a module's image shape: (0, 0) where it takes any size."""
    return shape if shape is not None else (0, 0)


def _in_range(staged: tuple[torch.Tensor, float, float] | None) -> torch.Tensor | None:
    """input_stage's normalized images (None where it did not take them) once their pixels pass
    check_float_pixel_range (ValueError naming ``images`` otherwise).
    Why here and not in the extension: one rule for every path. Its price on the fast path: 24 us right after a
    ResNet-50 call (1-1.5 us warm; medians of 60, 5% kept, batch 1, 2026-12-08,
    bench/results/cpu-input-stage-range-check-2026-12-08-intel-xeon.txt), about 0.2% of the call."""
    if staged is None:
        return None
    x, low, high = staged
    check_float_pixel_range(low, high, "images")
    return x


def _float_tuple(values) -> bool:
    return type(values) is tuple and all(type(v) is float for v in values)


def _mapping_end(mapping: torch.Tensor | None) -> int:
    """The outputs a label mapping reads (its largest index + 1; 0 for none): checked per call without a device
    sync."""
    return int(mapping.max()) + 1 if mapping is not None and mapping.numel() else 0


def _checked_pixels(images: torch.Tensor) -> torch.Tensor:
    """``images`` if they are uint8, or floating point with finite values in [0, 1] (within
    FLOAT_PIXEL_SLACK); otherwise ValueError. One min/max reduction (a device sync on CUDA)."""
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise ValueError(f"images: expected uint8 in [0, 255] or float in [0, 1], got dtype {images.dtype}")
    if images.numel():
        check_float_pixel_range(*(value.item() for value in torch.aminmax(images.detach())), "images")
    return images


# --------------------------------------------------------------------------- sources

def _source(model_or_path, prompt, label_mapping, mean, std, image_size, model=None) -> dict:
    """Normalize every accepted input to {network, prompt, mapping, mean, std, image_size, meta,
    kind} where network is plain (folded / slim) or masked."""
    from vpns_fast import ops

    if isinstance(model_or_path, (str, os.PathLike)):
        given = [name for name, value in (("prompt", prompt), ("label_mapping", label_mapping), ("mean", mean),
                                          ("std", std), ("image_size", image_size)) if value is not None]
        if given and not os.path.exists(model_or_path):  # the missing file first: the arguments may be right for it
            raise FileNotFoundError(f"{os.fspath(model_or_path)} does not exist")
        if given:
            raise ValueError(f"{given[0]}: only for a module; a file carries its own input stage and label "
                             "mapping")
        from vpns_fast.deploy.export import image_shape_of, load_any

        network, file_prompt, mapping, meta = load_any(model_or_path, model=model)
        use_prompt = meta.get("use_prompt", False)
        file_prompt = file_prompt if use_prompt else None
        return {"network": network, "prompt": file_prompt, "mapping": mapping,
                "mean": meta["normalization"]["mean"], "std": meta["normalization"]["std"],
                "image_size": image_shape_of(meta), "meta": meta, "kind": meta["kind"]}
    if not isinstance(model_or_path, nn.Module):
        raise TypeError(f"deploy takes a file path or an nn.Module, got {type(model_or_path).__name__}")
    if isinstance(model_or_path, DeployedModel):  # it takes images, not its network's normalized input
        raise ValueError("model_or_path: already a deployed module (DeployedModel); deploy the model or file it "
                         "came from (for another device or example size), or call it as it is")
    if model is not None:
        raise ValueError("model: only for a file path (the architecture to load its weights into); deploy a "
                         "module directly")
    from vpns_fast.nn.prompted_network import PromptedNetwork
    from vpns_fast.pruning.masking import checked_module

    model_or_path = checked_module(model_or_path, "model_or_path")
    from vpns_fast.deploy.export import refuse_nan

    # named here, as for a file: the engine's own check would blame whichever layer's output first differed
    refuse_nan(model_or_path, "model_or_path")
    if prompt is not None:
        if not isinstance(prompt, VisualPrompt):  # an nn.Identity failed on its missing .mean
            raise TypeError(f"prompt must be a VisualPrompt (vpns_fast.nn.prompts: PadPrompt, FixPrompt, ...), got "
                            f"{type(prompt).__name__}")
        refuse_nan(prompt, "prompt")
    mean, std = _channel_values(mean, "mean"), _channel_values(std, "std")
    asked = {"mean": mean, "std": std}  # the caller's own, before a PromptedNetwork's fill them in
    if image_size is not None:
        given = image_size
        try:
            image_size = operator.index(given)
        except TypeError:
            image_size = 0
        if image_size < 1 or isinstance(given, bool):
            raise ValueError(f"image_size: expected a positive int, got {given!r}")
    _refuse_other_dtypes(model_or_path, "model_or_path")
    if isinstance(model_or_path, PromptedNetwork):
        # it carries its own input path and mapping: an argument that differs would make the deployed module
        # compute something else than the network it was given
        net = model_or_path
        if prompt is not None and prompt is not net.prompt:
            raise ValueError("prompt: the PromptedNetwork carries its own prompt; deploy its .model to use another")
        own_mapping = net.mapping.mapping if net.mapping.mode != "none" else None
        if label_mapping is not None and (own_mapping is None or not torch.equal(
                _checked_label_mapping(label_mapping), own_mapping.detach().cpu().long())):
            raise ValueError("label_mapping: the PromptedNetwork carries its own label mapping ("
                             + ("none" if own_mapping is None else f"{own_mapping.numel()} classes")
                             + "); deploy its .model to use another")
        _refuse_other_normalization(mean, std, net, "the PromptedNetwork")
        prompt, label_mapping = net.prompt, own_mapping
        mean, std = mean or net.mean, std or net.std
        model_or_path = net.model
    if prompt is not None:  # the prompt op normalizes with its own and takes one size: other values are refused
        if image_size is not None and image_size != prompt.in_size:
            raise ValueError(f"image_size: the prompt takes {prompt.in_size}x{prompt.in_size} images, got "
                             f"{image_size}")
        _refuse_other_normalization(asked["mean"], asked["std"], prompt, "the prompt")
        mean, std, image_size = prompt.mean, prompt.std, prompt.in_size
    if label_mapping is not None:
        label_mapping = _checked_label_mapping(label_mapping)
    return {"network": model_or_path, "prompt": prompt,
            "mapping": label_mapping,
            "mean": mean or ops.IMAGENET_MEAN, "std": std or ops.IMAGENET_STD, "image_size": image_size,
            "meta": {}, "kind": "module"}


def _other_dtypes(module: nn.Module) -> str:
    """The floating dtypes other than float32 that ``module``'s tensors have, e.g. "torch.float64"; "" if none."""
    return ", ".join(sorted({str(t.dtype) for t in [*module.parameters(), *module.buffers()]
                             if t.is_floating_point() and t.dtype != torch.float32}))


def _refuse_other_dtypes(module: nn.Module, name: str) -> None:
    """ValueError naming ``name`` when ``module`` holds floating tensors other than float32: the input stage hands
    the network float32 images, which another dtype could never run."""
    other = _other_dtypes(module)
    if other:
        raise ValueError(f"{name}: float32 models only, got {other} tensors (call .float() on the model first)")


def _refuse_other_normalization(mean, std, owner, what: str) -> None:
    """ValueError naming ``mean`` or ``std`` when given and other than ``owner``'s (a PromptedNetwork or a
    prompt, which normalize with their own)."""
    for name, given, own in (("mean", mean, owner.mean), ("std", std, owner.std)):
        if given is not None and tuple(given) != tuple(float(value) for value in own):
            raise ValueError(f"{name}: {what} normalizes with its own {name} {tuple(own)}; got {given}")


def _image_shape(image_size) -> tuple[int, int] | None:
    """``(H, W)`` for an image size given as a side or as ``(H, W)``; None for None."""
    if image_size is None:
        return None
    if isinstance(image_size, (tuple, list)):
        return int(image_size[0]), int(image_size[1])
    return int(image_size), int(image_size)


def _channel_values(values, name: str) -> tuple[float, ...] | None:
    """``values`` (a mean or std of the RGB channels) as 3 floats, finite, and positive for ``std``; None
    stays None; ValueError naming ``name`` otherwise (a zero std made every logit NaN or infinite)."""
    if values is None:
        return None
    try:
        numbers = tuple(float(value) for value in values)
    except (TypeError, ValueError):
        numbers = ()
    if len(numbers) != 3 or not all(math.isfinite(value) for value in numbers) or (
            name == "std" and min(numbers) <= 0):
        what = "positive" if name == "std" else "finite"
        raise ValueError(f"{name}: expected 3 {what} numbers (one per RGB channel), got {values!r}")
    return numbers


def _checked_label_mapping(label_mapping) -> torch.Tensor:
    """``label_mapping`` as a 1-d int64 CPU tensor of indices >= 0 into the network's outputs, at least one;
    ValueError otherwise (fractions were truncated, and a bad index failed at every call with torch's message).
    Indices past the network's outputs are refused when deploy() first runs it."""
    try:
        mapping = torch.as_tensor(label_mapping).detach().cpu()
    except (TypeError, ValueError, RuntimeError):
        mapping = None
    if (mapping is None or mapping.dim() != 1 or mapping.numel() == 0 or mapping.is_floating_point()
            or mapping.is_complex() or mapping.dtype == torch.bool or int(mapping.min()) < 0):
        raise ValueError("label_mapping: expected a non-empty list of class indices >= 0 into the network's "
                         f"outputs (one per target class), got {shortened(repr(label_mapping), 80)}")
    return mapping.long()


def _granularity(network: nn.Module, meta: dict) -> str | None:
    from vpns_fast.nn.masked_layers import MASKED_TYPES

    found = {m.granularity for m in network.modules() if isinstance(m, MASKED_TYPES)}
    if found:
        return found.pop() if len(found) == 1 else "mixed"
    return meta.get("granularity")


def _inference_network(source: dict, want_slim: bool) -> tuple[nn.Module, str, str | None]:
    """(plain network, kind, why not slim) for the chosen device."""
    from vpns_fast.pruning.masking import fold, masked_layers

    network = source["network"]
    if source["kind"] == "slim":
        return network, "slim", None
    granularity = _granularity(network, source["meta"])
    if masked_layers(network):
        network = fold(network)  # a copy
    elif source["kind"] == "module":
        # the caller's module stays as it was: deploying sets eval mode, freezes the parameters and, for CUDA,
        # moves the network (the dense policy and the CUDA path would otherwise use it itself)
        network = fusion.copy_sharing_hooks(network)
    network = network.eval()
    if not want_slim:
        return network, "folded", "not requested"
    if granularity not in ("channel", "kernel"):
        return network, "folded", f"masks are {granularity or 'absent'}, not structured"
    from vpns_fast.deploy.slim import SlimError, slim_model

    try:
        slim, _, _ = slim_model(network)
    except SlimError as exc:
        return network, "folded", str(exc)
    return slim, "slim", None


def _dense_decisions(network: nn.Module, reason: str) -> list[dict]:
    """Rows in the schema of ``sparse_cpu.convert_for_cpu``'s table, every layer dense."""
    return [{"name": name, "type": type(m).__name__, "weight_shape": tuple(m.weight.shape), "input_shape": None,
             "density": float((m.weight != 0).float().mean()), "nnz": int((m.weight != 0).sum()),
             "dense_ms": None, "sparse_ms": None, "speedup": None, "chosen": "dense", "reason": reason}
            for name, m in network.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


# --------------------------------------------------------------------------- deploy

def deploy(model_or_path: str | os.PathLike | nn.Module, device: str | torch.device = "cpu",
           example_input_size: Sequence[int] | None = None, policy: str = "measure", *,
           prompt: VisualPrompt | None = None, label_mapping: torch.Tensor | Sequence[int] | None = None,
           mean: Sequence[float] | None = None, std: Sequence[float] | None = None, image_size: int | None = None,
           slim: bool = True, min_speedup: float = 1.05, model: nn.Module | None = None,
           winograd: bool = True) -> DeployedModel:
    """An inference module for a checkpoint path, an export path (dense / sparse / slim), or a
    (masked, plain or :class:`~vpns_fast.nn.PromptedNetwork`) module.

    ``example_input_size``: ``(B, 3, H, W)`` of the images the module will see (default
    ``(1, 3, in, in)``; 224 when a module comes without prompt or ``image_size``, which then accepts
    any image size), used by the CPU engine to measure. ``policy``: ``measure`` (per layer,
    sparse only if ``min_speedup`` times faster), ``sparse`` or ``dense``. ``slim``: slim structured
    ResNets and VGGs. For a module, ``prompt`` / ``label_mapping`` / ``mean`` / ``std`` /
    ``image_size`` describe the input path (a PromptedNetwork carries its own). ``model``: for a file whose
    network was passed as an object when training (the file cannot rebuild it), a dense module of the same
    architecture to load the weights into. Torch's global random stream is left where it was: a module is
    deployed without drawing from it; rebuilding a network from a file initializes its layers before the weights
    are loaded, under ``torch.random.fork_rng`` (which puts the stream back as it found it, so draws that other
    threads make meanwhile are drawn again after it). ``winograd``: the CPU engine may run dense 3x3 convolutions
    (stride 1) by Winograd's F(4x4, 3x3) where that measured faster than oneDNN on the layer (False: never;
    its float32 results differ from the exact ones by about 5e-6 of the output's largest magnitude, against
    3e-7 for a direct convolution). On the CPU without the sparse engine (the C++ extension not built, or not for
    this CPU) the network runs dense with torch, with a :class:`SparseEngineUnavailableWarning` saying why.
    """
    return _deploy(model_or_path, device, example_input_size, policy, prompt, label_mapping, mean, std,
                   image_size, slim, min_speedup, model, winograd)


# ``vpns_fast.deploy`` is this function and also the name of the subpackage it lives in. ``import
# vpns_fast.deploy.export as E`` walks attributes: ``vpns_fast.deploy`` (this function), then ``.export``, which a
# function lacks; Python then looks for the module "<that object's __name__>.export" in sys.modules, so naming the
# function after the subpackage lets such imports find their module. Its qualified name (repr, pickling with
# __module__) stays "deploy"; tracebacks name the code object, "deploy".
deploy.__name__ = "vpns_fast.deploy"


def _deploy(model_or_path, device, example_input_size, policy, prompt, label_mapping, mean, std, image_size, slim,
            min_speedup, model, winograd) -> DeployedModel:
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    for name, value in (("slim", slim), ("winograd", winograd)):
        if not isinstance(value, bool):  # slim="no" had been taken as true
            raise TypeError(f"{name} must be a bool, got {value!r}")
    from vpns_fast.deploy.sparse_cpu import check_min_speedup

    check_min_speedup(min_speedup)
    from vpns_fast.environment import resolve_device

    device = resolve_device(device)  # cpu or cuda: it refuses the others
    if isinstance(model_or_path, nn.Module):
        source = _source(model_or_path, prompt, label_mapping, mean, std, image_size, model)
    else:
        with torch.random.fork_rng(devices=[]):  # the rebuilt network's layers are initialized, then loaded
            source = _source(model_or_path, prompt, label_mapping, mean, std, image_size, model)
    network, network_kind, why_not_slim = _inference_network(source, slim)
    in_size = source["image_size"]
    # a module without prompt or image_size takes any size; it is measured at 224 unless told
    in_shape = _image_shape(in_size)
    batch_shape = (_example_shape(example_input_size, in_shape) if example_input_size is not None
                   else (1, 3, *(in_shape or (224, 224))))
    input_prompt = source["prompt"]
    if input_prompt is not None:
        input_prompt = copy.deepcopy(input_prompt).eval()
    info: dict[str, Any] = {"device": str(device), "network": network_kind, "policy": policy,
                            "source": source["kind"], "not_slim_because": why_not_slim, "channels_last": False}
    with torch.no_grad():
        # float32, as forward() passes images on, whatever torch's default dtype; from a generator of its own
        example_images = torch.rand(batch_shape, dtype=torch.float32, generator=torch.Generator().manual_seed(0))
        example = (input_prompt(example_images) if input_prompt is not None
                   else normalize(example_images, source["mean"], source["std"]))
    if _other_dtypes(network):  # a file's weights in a model= of other dtypes: used if it runs on float32 images
        _refuse_failing_example(network, example)
    if device.type == "cpu":
        # the shape deploy chose itself when a module takes any size: a model that fails on it is told so by name
        default_shape = batch_shape if example_input_size is None and in_shape is None else None
        network, decisions = _convert_cpu(network, example, policy, min_speedup, info, winograd, default_shape)
    else:
        # cuDNN runs the (slim) dense network; channels_last lets it use its NHWC kernels.
        network = network.to(device).to(memory_format=torch.channels_last)
        info.update(backend="cuda-dense" + ("-slim" if network_kind == "slim" else ""), channels_last=True)
        decisions = _dense_decisions(network, "cuda: cuDNN dense" + (" on the slim network"
                                                                     if network_kind == "slim" else ""))
        if input_prompt is not None:
            input_prompt = input_prompt.to(device)
    mapping = source["mapping"]
    module = DeployedModel(network, input_prompt, mapping, source["mean"], source["std"], in_size, decisions, info,
                           source["meta"].get("class_names")).to(device)
    if mapping is not None:  # a mapping that does not fit the network's outputs is refused now, not per call
        module(example_images[:1])
    return module


def _example_shape(example_input_size, image_shape: tuple[int, int] | None) -> tuple[int, ...]:
    """``example_input_size`` as a shape the deployed module accepts: ``(B, 3, H, W)`` with positive sizes,
    ``(H, W)`` equal to ``image_shape`` when the module takes one size only; ValueError naming it otherwise (the
    layers would be measured on images the module then refuses)."""
    try:
        shape = tuple(operator.index(size) for size in example_input_size)
    except (TypeError, ValueError):
        shape = None
    if shape is None or len(shape) != 4 or shape[1] != 3 or min(shape) < 1:
        raise ValueError(f"example_input_size must be (B, 3, H, W) with positive sizes, got {example_input_size!r}")
    if image_shape is not None and shape[2:] != image_shape:
        raise ValueError(f"example_input_size: the module takes {image_shape[0]}x{image_shape[1]} images, got "
                         f"{shape[2]}x{shape[3]}")
    return shape


class SparseEngineUnavailableWarning(UserWarning):
    """``deploy()`` on the CPU could not use the sparse engine (the C++ extension is not built, or not for this
    CPU): the network runs dense with torch. The message carries the reason, as ``.info["reason"]`` does."""


def _refuse_failing_example(network: nn.Module, example: torch.Tensor) -> None:
    """Runs ``network`` (a file's weights loaded into a ``model`` of other dtypes than float32) on ``example``;
    where it fails, the ValueError ``deploy(module)`` gives such a module, naming ``model``."""
    from vpns_fast.environment import is_out_of_memory

    try:
        with torch.no_grad():
            network(example.clone())
    except Exception as exc:
        if is_out_of_memory(exc):
            raise  # the machine's limit, not the example's
        raise ValueError(f"model: float32 models only, got {_other_dtypes(network)} tensors (call .float() on the "
                         f"model first; on float32 images it fails: {exception_reason(exc)})") from exc


def _default_example_error(cause: BaseException, default_shape: tuple[int, ...]) -> ValueError:
    """The refusal of a model that fails on the example deploy made itself (no ``example_input_size`` given)."""
    return ValueError(f"example_input_size: not given, and the model fails on images of the default shape "
                      f"{default_shape} ({exception_reason(cause)}); pass example_input_size=(B, 3, H, W) or "
                      "image_size=N with an image size the model takes")


def _convert_cpu(network: nn.Module, example: torch.Tensor, policy: str, min_speedup: float,
                 info: dict, winograd: bool, default_shape: tuple[int, ...] | None = None) -> tuple[nn.Module, list]:
    if policy == "dense":
        info.update(backend="torch-dense", reason="policy=dense")
        return network, _dense_decisions(network, "policy=dense")
    try:
        from vpns_fast.deploy import sparse_cpu
    except ImportError as exc:
        reason = f"vpns_fast.deploy.sparse_cpu not importable ({exc})"
    else:
        ok, reason = sparse_cpu.available()
        if ok:
            summary: dict = {}
            try:
                network, decisions = sparse_cpu.convert_for_cpu(network, example, policy=policy,
                                                                min_speedup=min_speedup, summary=summary,
                                                                winograd=winograd)
            except ValueError as exc:
                # the engine names its own argument, example_input, which deploy's caller never passed
                if default_shape is None or not str(exc).startswith(sparse_cpu.FAILING_EXAMPLE):
                    raise
                raise _default_example_error(exc.__cause__ or exc, default_shape) from exc
            info.update(backend="sparse_cpu", fusion=summary["fusion"], network_choice=summary.get("network"),
                        layout=summary.get("layout"), winograd=summary.get("winograd"))
            return network, decisions
        reason = f"sparse CPU engine unavailable: {reason}"
    # said, not only recorded: a deployer who asked for the sparse engine would otherwise time a dense network
    warnings.warn(f"deploy: {reason}; the network runs dense with torch", SparseEngineUnavailableWarning,
                  stacklevel=caller_stacklevel())
    info.update(backend="torch-dense", reason=reason)
    return network, _dense_decisions(network, reason)


# --------------------------------------------------------------------------- benchmark

BENCH_BASELINES = ("dense-torch", "onnxruntime")


class _RunnerNetwork(nn.Module):
    """A baseline engine's callable in the place of the network, so that it gets the same input stage."""

    def __init__(self, run):
        super().__init__()
        self.run = run

    def forward(self, x):
        return self.run(x)


def _percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values``, linearly interpolated between the two nearest (numpy's default): for an
    even count the median is the mean of the middle two. (Picking the value at a rounded index instead took the
    median latency and the median images/s from different rounds when the count was even, so a table showed
    1653 images/s beside 0.412 ms a call: an outside review.)"""
    ordered = sorted(values)
    position = min(len(ordered) - 1, max(0.0, q * (len(ordered) - 1)))
    below = int(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)


def _interleaved_seconds(modules: dict[str, nn.Module], images: torch.Tensor, rounds: int,
                         warmup: int) -> dict[str, list[float]]:
    """Seconds of one call of each module per round, the modules taking turns within each round (a
    burst of load on a shared machine hits them alike; per-round ratios cancel it)."""
    for module in modules.values():
        for _ in range(warmup):
            module(images)
    times: dict[str, list[float]] = {name: [] for name in modules}
    names = list(modules)
    for round_ in range(rounds):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:  # rotate who goes first
            if images.is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            modules[name](images)
            if images.is_cuda:
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return times


def benchmark_inference(path_or_model, batch_sizes=(1, 32), device: str = "cpu", threads: int | None = None,
                        iters: int = 10, warmup: int = 2, policy: str = "measure", *,
                        baselines: Sequence[str] = BENCH_BASELINES, layers: bool = False,
                        winograd: bool = True) -> list[dict]:
    """Images/s of the deployed module and of the baselines on the same network and input stage,
    for each batch size: ``dense-torch`` (the folded network in torch) and ``onnxruntime`` (that
    network exported to ONNX, CPU only, when onnxruntime is installed; otherwise a row with
    ``skipped`` saying why). The backends take turns call by call for ``iters`` rounds.

    One row per (batch, backend): ``images_per_s`` (median over rounds) with ``images_per_s_p20`` /
    ``_p80``, ``latency_ms`` (median), and for the deployed module ``speedup_vs_<baseline>``: the
    median of the per-round ratios with ``_p20`` / ``_p80``. ``layers``: the deployed row also carries
    its per-layer ``decisions``, ``fusion`` and the machine's ``peak_gflops`` measured in the run. ``winograd``:
    as :func:`deploy`'s, for the deployed module."""
    batch_sizes = tuple(batch_sizes)
    if not batch_sizes:
        raise ValueError("batch_sizes: expected at least one batch size")
    for name, value, least in [("batch_sizes", b, 1) for b in batch_sizes] + [
            ("threads", 1 if threads is None else threads, 1), ("iters", iters, 1), ("warmup", warmup, 0)]:
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name}: expected an integer >= {least}, got {value!r}")
    unknown = [name for name in baselines if name not in BENCH_BASELINES]
    if unknown:
        raise ValueError(f"baselines: expected names among {BENCH_BASELINES}, got {unknown}")
    from vpns_fast.environment import torch_threads

    # the caller's thread count and random stream are left where they were
    with torch_threads(threads), torch.random.fork_rng(devices=[]):
        return _benchmark_rows(path_or_model, batch_sizes, device, iters, warmup, policy, tuple(baselines),
                               layers, winograd)


def _check_same_outputs(modules: dict[str, nn.Module], images: torch.Tensor) -> None:
    """RuntimeError naming the first backend whose output on ``images`` is not the dense network's (NaN and
    infinities by place, the rest within 1e-3 (1 + max |logit|)): a wrong baseline, or engine, is not timed."""
    from vpns_fast.deploy.sparse_cpu import tensor_difference

    reference_name = "dense-torch"
    expected = modules[reference_name](images)
    for name, module in modules.items():
        if name != reference_name:
            problem = tensor_difference(module(images), expected, reference="the dense network's")
            if problem is not None:
                raise RuntimeError(f"{name}'s output {problem} against the dense network's at batch "
                                   f"{images.shape[0]}; not benchmarking it")


def _baseline_modules(dense: DeployedModel, images: torch.Tensor, baselines) -> tuple[dict, dict]:
    """({backend: module}, {backend: why skipped}) for the baselines that are not the dense module itself."""
    modules, skipped = {}, {}
    if "onnxruntime" in baselines:
        from vpns_fast.deploy import baselines as engines

        if dense.device.type != "cpu":
            skipped["onnxruntime"] = "a CPU baseline (this benchmark runs on " + str(dense.device) + ")"
        elif engines.onnxruntime_version() is None:
            skipped["onnxruntime"] = "onnxruntime is not installed (pip install onnxruntime)"
        else:
            with torch.no_grad():
                example = (dense.prompt(images) if dense.prompt is not None
                           else normalize(images, dense.mean, dense.std))
            run, exporter = engines.onnxruntime_runner(dense.network, example)
            modules["onnxruntime"] = DeployedModel(_RunnerNetwork(run), dense.prompt, dense.mapping, dense.mean,
                                                   dense.std, dense.image_shape, [],
                                                   {**dense.info, "backend": f"onnxruntime ({exporter})"})
    return modules, skipped


def _ratio_stats(numerators: list[float], denominators: list[float]) -> tuple[float, float, float]:
    ratios = [n / d for n, d in zip(numerators, denominators) if d > 0]
    return _percentile(ratios, 0.5), _percentile(ratios, 0.2), _percentile(ratios, 0.8)


def _benchmark_rows(path_or_model, batch_sizes, device, iters, warmup, policy, baselines, layers,
                    winograd) -> list[dict]:
    from vpns_fast.deploy import baselines as engines
    from vpns_fast.deploy import sparse_cpu

    rows = []
    # the dense network and the baselines do not depend on the batch (the ONNX export has a dynamic batch
    # axis): built once; the deployed module is built per batch, its per-layer choices measured at that batch.
    # All run the network the engine runs: the slim one for structured masks (as `vpns export --format slim` /
    # `--format onnx --slim` give a deployer), else the folded one
    dense = deploy(path_or_model, device, policy="dense")
    height, width = dense.image_shape or (224, 224)
    if dense.device.type == "cpu":
        _refuse_batches_over_memory(dense, batch_sizes, (height, width))
    first_images = torch.randint(0, 256, (batch_sizes[0], 3, height, width), dtype=torch.uint8)
    extra, skipped = _baseline_modules(dense, first_images.to(dense.device), baselines)
    versions = {"deploy": f"vpns_fast {__version__}", "dense-torch": f"torch {torch.__version__}",
                "onnxruntime": f"onnxruntime {engines.onnxruntime_version()}"}
    settings = {"onnxruntime": engines.ONNXRUNTIME_SETTINGS}
    from vpns_fast.environment import cpu_model_name

    measured_on = {"cpu": cpu_model_name() if dense.device.type == "cpu" else None,
                   "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for batch in batch_sizes:
        fast = deploy(path_or_model, device, example_input_size=(batch, 3, height, width), policy=policy,
                      winograd=winograd)
        images = torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8).to(dense.device)
        modules = {"deploy": fast, "dense-torch": dense, **extra}
        _check_same_outputs(modules, images)
        if "dense-torch" not in baselines:
            del modules["dense-torch"]
        times = _interleaved_seconds(modules, images, iters, warmup)
        for label, module in modules.items():
            # images/s from the latency's own quantiles (the slowest calls give the low images/s), so that the
            # median images/s is always batch / the median latency
            latency = {q: _percentile(times[label], q) for q in (0.2, 0.5, 0.8)}
            row = {"batch": batch, "backend": label, "network": module.info["network"],
                   "engine": module.info.get("backend"), "latency_ms": 1000 * latency[0.5],
                   "images_per_s": batch / latency[0.5], "images_per_s_p20": batch / latency[0.8],
                   "images_per_s_p80": batch / latency[0.2], "threads": torch.get_num_threads(),
                   "device": str(module.device), "rounds": iters, "engine_version": versions[label], **measured_on}
            if label in settings:
                row["engine_settings"] = settings[label]
            if (label == "deploy" and module.device.type == "cpu" and sparse_cpu.available()[0]
                    and any(d.get("chosen") == "sparse" for d in fast.decisions or [])):  # a sparse kernel ran
                row["sparse_kernel_isa"] = sparse_cpu.kernel_isa()
            if label == "deploy" and module.info.get("backend") == "sparse_cpu":
                row["call_plan"] = _call_plan_note(module, batch)
                if layers:
                    row["in_call"] = _in_call_profile(module, images, iters)
            if label == "deploy":
                for other in modules:
                    if other != "deploy":
                        median, low, high = _ratio_stats(times[other], times["deploy"])
                        row.update({f"speedup_vs_{other}": median, f"speedup_vs_{other}_p20": low,
                                    f"speedup_vs_{other}_p80": high})
                if layers:
                    row.update(decisions=fast.decisions, fusion=fast.info.get("fusion"),
                               network_choice=fast.info.get("network_choice"), winograd=fast.info.get("winograd"),
                               peak_gflops=_peak_gflops(fast.device))
            rows.append(row)
        for label, reason in skipped.items():
            rows.append({"batch": batch, "backend": label, "skipped": reason, "device": str(dense.device)})
    return rows


def _in_call_profile(module: DeployedModel, images: torch.Tensor, calls: int) -> dict | None:
    """Where ``module``'s calls on ``images`` spend their time, medians of ``calls`` timed calls
    (:meth:`DeployedModel.timed_call`): ``layers_ms`` {layer path: its steps' ms}, ``other_ms`` (the steps of no
    layer: torch functions and tensor methods), ``input_ms``, ``total_ms``, ``steps`` and ``calls``; None where the
    network does not run through a compiled call plan."""
    timings = [module.timed_call(images)[1] for _ in range(calls)]
    if any(t["steps"] is None for t in timings):
        return None
    from vpns_fast.deploy import call_plan

    per_call = [call_plan.seconds_by_module(timing["steps"]) for timing in timings]  # ms, as the steps give them
    names = [name for name in per_call[0] if name is not None]
    return {"layers_ms": {name: _percentile([c[name] for c in per_call], 0.5) for name in names},
            "other_ms": _percentile([c.get(None, 0.0) for c in per_call], 0.5),
            "input_ms": _percentile([t["input_ms"] for t in timings], 0.5),
            "total_ms": _percentile([t["total_ms"] for t in timings], 0.5),
            "steps": len(timings[0]["steps"]), "calls": calls}


def _call_plan_note(module: DeployedModel, batch: int) -> str:
    """How ``module`` ran its network for a batch of ``batch`` images: through a compiled call plan, or why not. (A
    plan's input shape is the network's, which a prompt may make larger than the images.)"""
    from vpns_fast.deploy import call_plan

    plan = next((p for p in module.call_plans() if p["input_shape"][0] == batch), None)
    if plan is not None and plan["steps"]:
        return f"a compiled call plan of {plan['steps']} steps"
    if plan is not None:
        why = plan["refused"]
    else:
        why = "none made" if call_plan.call_plans_enabled() else "turned off (call_plan.set_call_plans)"
    return f"its traced graph (no compiled call plan: {why})"


# A batch's peak memory over (its largest layer's input + output, measured at batch 1) x batch. Measured as the
# peak RSS growth of one call (10% kept, 224 px, 2026-12-04): ResNet-50 batch 32 1.36x (sparse engine) and 2.47x
# (dense torch), ResNet-18 batch 64 1.75x; the residual branch and the input stage are held beside that layer.
BATCH_MEMORY_FACTOR = 4.0


def _refuse_batches_over_memory(dense: DeployedModel, batch_sizes, image_shape: tuple[int, int]) -> None:
    """MemoryError naming the first batch size whose estimated peak memory is more than the machine has
    available: the kernel's out-of-memory killer would end the process without a word (a --batch of 100000 was
    killed so) where this is a one-line error."""
    from vpns_fast.environment import available_memory_bytes, layer_bytes, memory_text

    available = available_memory_bytes()
    if available is None:
        return
    one_image = torch.zeros(1, 3, *image_shape, dtype=torch.uint8)
    largest = layer_bytes(dense.network, lambda: dense(one_image)).largest_layer
    per_image = BATCH_MEMORY_FACTOR * largest + 5 * 3 * image_shape[0] * image_shape[1]  # + its uint8 and float
    for batch in batch_sizes:
        if batch * per_image > available:
            raise MemoryError(f"batch {batch} needs about {memory_text(batch * per_image)} (its largest layer's "
                              f"input and output, x{BATCH_MEMORY_FACTOR:g}); {memory_text(available)} are available")


def _peak_gflops(device: torch.device) -> float | None:
    if device.type != "cpu":
        return None
    from vpns_fast.deploy.sparse_cpu import measure_peak_gflops

    return measure_peak_gflops()

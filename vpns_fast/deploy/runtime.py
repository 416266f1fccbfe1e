"""Inference modules for deployment: ``deploy(path_or_model)`` gives an ``nn.Module`` that takes
images (uint8 in [0, 255] or float in [0, 1], ``(B, 3, in, in)``) and returns target logits. Other
integer dtypes, float pixels outside [0, 1] (by more than FLOAT_PIXEL_SLACK) and NaN / Inf pixels raise
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

import math
import os
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

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
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.image_size = None if image_size is None else int(image_size)  # None: any size (no prompt)
        self.decisions, self.info = decisions, info
        self.class_names = list(class_names) if class_names is not None else None
        self.eval()
        for param in self.parameters():
            param.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return torch.device(self.info["device"])

    def train(self, mode: bool = True):  # an inference module stays in eval mode
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = self.image_size
        if images.dim() != 4 or images.shape[1] != 3 or (size is not None and images.shape[-2:] != (size, size)):
            shape = f"(B, 3, {size}, {size})" if size is not None else "(B, 3, H, W)"
            raise ValueError(f"expected images of shape {shape}, got {tuple(images.shape)}")
        images = _checked_pixels(images).to(self.device, non_blocking=True)
        if images.dtype != torch.uint8 and images.dtype != torch.float32:
            images = images.float()
        x = self.prompt(images) if self.prompt is not None else normalize(images, self.mean, self.std)
        if self.info.get("channels_last"):
            x = x.contiguous(memory_format=torch.channels_last)
        logits = self.network(x)
        return logits.index_select(1, self.mapping) if self.mapping is not None else logits


# Float images may overshoot [0, 1] by this much (bicubic / Lanczos resizing rings past the ends); a 0..255
# image passed as float, or NaN / Inf pixels, would give silently wrong logits instead.
FLOAT_PIXEL_SLACK = 0.1


def _checked_pixels(images: torch.Tensor) -> torch.Tensor:
    """``images`` if they are uint8, or floating point with finite values in [0, 1] (within
    FLOAT_PIXEL_SLACK); otherwise ValueError. One min/max reduction (a device sync on CUDA)."""
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise ValueError(f"images: expected uint8 in [0, 255] or float in [0, 1], got dtype {images.dtype}")
    if images.numel():
        low, high = (value.item() for value in torch.aminmax(images.detach()))
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError("images: NaN or Inf pixels")
        if low < -FLOAT_PIXEL_SLACK or high > 1 + FLOAT_PIXEL_SLACK:
            raise ValueError(f"images: float pixels must lie in [0, 1], got values in [{low:g}, {high:g}] "
                             "(0..255 images: pass them as uint8, or divide by 255)")
    return images


# --------------------------------------------------------------------------- sources

def _source(model_or_path, prompt, label_mapping, mean, std, image_size, model=None) -> dict:
    """Normalize every accepted input to {network, prompt, mapping, mean, std, image_size, meta,
    kind} where network is plain (folded / slim) or masked."""
    from vpns_fast import ops

    if isinstance(model_or_path, (str, os.PathLike)):
        from vpns_fast.deploy.export import load_any

        network, file_prompt, mapping, meta = load_any(model_or_path, model=model)
        use_prompt = meta.get("use_prompt", False)
        file_prompt = file_prompt if use_prompt else None
        return {"network": network, "prompt": file_prompt, "mapping": mapping,
                "mean": meta["normalization"]["mean"], "std": meta["normalization"]["std"],
                "image_size": _image_size(meta, file_prompt), "meta": meta, "kind": meta["kind"]}
    if not isinstance(model_or_path, nn.Module):
        raise TypeError(f"deploy takes a file path or an nn.Module, got {type(model_or_path).__name__}")
    if model is not None:
        raise ValueError("model: only for a file path (the architecture to load its weights into); deploy a "
                         "module directly")
    from vpns_fast.nn.prompted_network import PromptedNetwork

    if isinstance(model_or_path, PromptedNetwork):
        net = model_or_path
        prompt = prompt if prompt is not None else net.prompt
        if label_mapping is None and net.mapping.mode != "none":
            label_mapping = net.mapping.mapping
        mean, std = mean or net.mean, std or net.std
        model_or_path = net.model
    if prompt is not None:
        mean, std = prompt.mean, prompt.std
    if image_size is None and prompt is not None:
        image_size = prompt.in_size
    return {"network": model_or_path, "prompt": prompt,
            "mapping": None if label_mapping is None else torch.as_tensor(label_mapping).long().cpu(),
            "mean": mean or ops.IMAGENET_MEAN, "std": std or ops.IMAGENET_STD, "image_size": image_size,
            "meta": {}, "kind": "module"}


def _image_size(meta: dict, prompt) -> int:
    if prompt is not None:
        return prompt.in_size
    if meta.get("input_size"):
        return int(meta["input_size"][-1])
    from vpns_fast.models import default_input_size

    return default_input_size(meta["model"]["name"])


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
        network = fold(network)
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
           slim: bool = True, min_speedup: float = 1.05, model: nn.Module | None = None) -> DeployedModel:
    """An inference module for a checkpoint path, an export path (dense / sparse / slim), or a
    (masked, plain or :class:`~vpns_fast.nn.PromptedNetwork`) module.

    ``example_input_size``: ``(B, 3, H, W)`` of the images the module will see (default
    ``(1, 3, in, in)``; 224 when a module comes without prompt or ``image_size``, which then accepts
    any image size), used by the CPU engine to measure. ``policy``: ``measure`` (per layer,
    sparse only if ``min_speedup`` times faster), ``sparse`` or ``dense``. ``slim``: slim structured
    ResNets and VGGs. For a module, ``prompt`` / ``label_mapping`` / ``mean`` / ``std`` /
    ``image_size`` describe the input path (a PromptedNetwork carries its own). ``model``: for a file whose
    network was passed as an object when training (the file cannot rebuild it), a dense module of the same
    architecture to load the weights into.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    from vpns_fast.environment import resolve_device

    device = resolve_device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda or auto, got {device}")
    source = _source(model_or_path, prompt, label_mapping, mean, std, image_size, model)
    network, network_kind, why_not_slim = _inference_network(source, slim)
    in_size = source["image_size"]
    # a module without prompt or image_size takes any size; it is measured at 224 unless told
    side = in_size if in_size is not None else 224
    batch_shape = tuple(example_input_size) if example_input_size is not None else (1, 3, side, side)
    if len(batch_shape) != 4:
        raise ValueError(f"example_input_size must be (B, 3, H, W), got {batch_shape}")
    input_prompt = source["prompt"]
    if input_prompt is not None:
        input_prompt = _copy_prompt(input_prompt).eval()
    info: dict[str, Any] = {"device": str(device), "network": network_kind, "policy": policy,
                            "source": source["kind"], "not_slim_because": why_not_slim, "channels_last": False}
    with torch.no_grad():
        example_images = torch.rand(batch_shape)
        example = (input_prompt(example_images) if input_prompt is not None
                   else normalize(example_images, source["mean"], source["std"]))
    if device.type == "cpu":
        network, decisions = _convert_cpu(network, example, policy, min_speedup, info)
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
                           source["meta"].get("class_names"))
    return module.to(device)


def _copy_prompt(prompt: VisualPrompt) -> VisualPrompt:
    import copy

    return copy.deepcopy(prompt)


def _convert_cpu(network: nn.Module, example: torch.Tensor, policy: str, min_speedup: float,
                 info: dict) -> tuple[nn.Module, list]:
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
            network, decisions = sparse_cpu.convert_for_cpu(network, example, policy=policy, min_speedup=min_speedup,
                                                            summary=summary)
            info.update(backend="sparse_cpu", fusion=summary["fusion"])
            return network, decisions
        reason = f"sparse CPU engine unavailable: {reason}"
    info.update(backend="torch-dense", reason=reason)
    return network, _dense_decisions(network, reason)


# --------------------------------------------------------------------------- benchmark

def _time(module: nn.Module, images: torch.Tensor, iters: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        module(images)
    if images.is_cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        module(images)
        if images.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def benchmark_inference(path_or_model, batch_sizes=(1, 32), device: str = "cpu", threads: int | None = None,
                        iters: int = 10, warmup: int = 2, policy: str = "measure") -> list[dict]:
    """Images/s and latency of the deployed module vs dense torch (the folded network) for each
    batch size. Returns one row per (batch, backend)."""
    batch_sizes = tuple(batch_sizes)
    if not batch_sizes:
        raise ValueError("batch_sizes: expected at least one batch size")
    for name, value, least in [("batch_sizes", b, 1) for b in batch_sizes] + [
            ("threads", 1 if threads is None else threads, 1), ("iters", iters, 1), ("warmup", warmup, 0)]:
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name}: expected an integer >= {least}, got {value!r}")
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        return _benchmark_rows(path_or_model, batch_sizes, device, iters, warmup, policy)
    finally:
        torch.set_num_threads(previous_threads)


def _benchmark_rows(path_or_model, batch_sizes, device, iters, warmup, policy) -> list[dict]:
    rows = []
    for batch in batch_sizes:
        dense = deploy(path_or_model, device, policy="dense", slim=False)
        size = dense.image_size or 224
        fast = deploy(path_or_model, device, example_input_size=(batch, 3, size, size), policy=policy)
        images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8).to(dense.device)
        for label, module in (("deploy", fast), ("dense-torch", dense)):
            times = sorted(_time(module, images, iters, warmup))
            median = times[len(times) // 2]
            rows.append({"batch": batch, "backend": label, "network": module.info["network"],
                         "engine": module.info.get("backend"), "latency_ms": 1000 * median,
                         "images_per_s": batch / median, "threads": torch.get_num_threads(),
                         "device": str(module.device)})
    return rows

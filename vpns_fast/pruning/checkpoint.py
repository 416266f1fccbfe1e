"""Checkpoints: a versioned dict of plain tensors and Python values, written atomically and
read with ``torch.load(..., weights_only=True)`` (no pickled code runs on load).

Layout (version 1)::

    {"format": "vpns_fast.checkpoint", "version": 1,
     "model": {"name": str | None, "kwargs": dict, "class": str},
     "granularity": str | None, "input_size": [C, H, W],
     "state_dict": {...},                       # masked layers carry `scores` and `threshold`
     "prompt": None | {"kind", "out_size", "in_size", "size", "mean", "std", "program"},
     "label_mapping": None | LongTensor,
     "meta": dict,                              # anything else the writer wants to keep
     "sha256": str}                             # of everything above, tensors included (see payload_sha256)

``model`` says how to rebuild the network: ``build_model(name, **kwargs)`` (``name`` a torchvision name,
``timm:NAME`` or ``package.module:factory``; see vpns_fast.models). ``name`` None: a module passed as an object,
which no file can rebuild; :func:`model_from_checkpoint` then needs ``model=``, a module of the same
architecture. ``class`` (the network's type, for messages) is absent from older checkpoints, and so is
``sha256``: such a file still loads, with a warning that it cannot be checked.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import warnings
from typing import Any

import torch
from torch import nn

from vpns_fast.errors import NetworkNotRebuildable, UncheckedFileWarning, exception_reason, state_dict_mismatch
from vpns_fast.files import atomic_write
from vpns_fast.nn.masked_layers import MASKED_TYPES
from vpns_fast.nn.prompts import VisualPrompt, build_prompt
from vpns_fast.pruning.structured import structured_config

FORMAT = "vpns_fast.checkpoint"
VERSION = 1


SHA_KEY = "sha256"


class CheckpointError(ValueError):
    """A file that is not a readable vpns_fast checkpoint of a supported version."""


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of a tensor's elements in row-major order (what checksums of checkpoints and exports
    read)."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def payload_sha256(payload: dict) -> str:
    """sha256 over every value of a checkpoint but its ``sha256``: each tensor's name, dtype, shape and bytes
    (torch.load does not notice a flipped byte in a tensor), every other value by its repr, dicts in key order."""
    # What it costs (issue #14): a sparsified ResNet-18 (weights + scores, 93.5 MB) on a 2-core AMD EPYC
    # shared with other jobs, torch 2.14.1, min of 5, 2026-12-03: save_checkpoint 240 ms with the hash,
    # 120 ms without; load_checkpoint 176 ms with the check, 59 ms without; the hash alone 97 ms (77 ms
    # of it sha256 over the bytes, the rest copying them out of the tensors). About 0.2 s a training epoch
    # (last.pt and best.pt), kept: a damaged checkpoint otherwise loads silently as wrong weights.
    digest = hashlib.sha256()

    def feed(name: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            digest.update(f"{name}|tensor|{value.dtype}|{tuple(value.shape)}\0".encode())
            digest.update(tensor_bytes(value))
        elif isinstance(value, dict):
            digest.update(f"{name}|dict|{len(value)}\0".encode())
            for key in sorted(value, key=repr):
                feed(f"{name}.{key!r}", value[key])
        elif isinstance(value, (list, tuple)):
            digest.update(f"{name}|{type(value).__name__}|{len(value)}\0".encode())
            for index, item in enumerate(value):
                feed(f"{name}[{index}]", item)
        else:
            digest.update(f"{name}|{value!r}\0".encode())

    feed("", {k: v for k, v in payload.items() if k != SHA_KEY})
    return digest.hexdigest()


_warned_unchecked = False


def _verify(path: str, payload: dict) -> None:
    global _warned_unchecked
    stored = payload.get(SHA_KEY)
    if stored is None:
        if not _warned_unchecked:  # once per process: a job may read many files of one old run
            _warned_unchecked = True
            warnings.warn(f"{path} has no sha256 (written by an older vpns_fast): loaded without an integrity "
                          f"check", UncheckedFileWarning, stacklevel=3)
        return
    if payload_sha256(payload) != stored:
        raise CheckpointError(f"{path} failed its integrity check (sha256 mismatch): the file is damaged; "
                              f"use another copy or rerun the training that wrote it")


def atomic_save(obj: Any, path: str | os.PathLike, overwrite: bool = False) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    atomic_write(path, lambda f: torch.save(obj, f), overwrite)


def prompt_spec(prompt: VisualPrompt) -> dict:
    size = getattr(prompt, "pad", getattr(prompt, "mask_size", 0))
    return {"kind": prompt.kind, "out_size": prompt.out_size, "in_size": prompt.in_size, "size": size,
            "mean": list(prompt.mean), "std": list(prompt.std), "program": prompt.program.detach().cpu()}


def in_float32(model: nn.Module) -> nn.Module:
    """``model`` (changed in place) in float32, where a stock network is rebuilt to load saved weights into: built
    under a float64 default dtype every layer was float64, the loaded weights were cast to it, and the CPU engine ran
    every layer dense; weights saved in float16 are loaded into float32 layers, as before. Not for a module a user
    passes (``model=``): its dtypes are its own (a float64 head cast to in its forward). ``Module.float`` keeps
    shared parameters shared (structured masks share their scores), which ``load_state_dict(assign=True)`` would
    not."""
    return model.float()


def prompt_from_spec(spec: dict) -> VisualPrompt:
    # float32 whatever torch's default dtype (under float64 the rebuilt prompt fed float64 to the network)
    prompt = in_float32(build_prompt(spec["kind"], spec["out_size"], spec["in_size"], spec["size"], spec["mean"],
                                     spec["std"]))
    with torch.no_grad():
        prompt.program.copy_(spec["program"])
    return prompt


def save_checkpoint(path, model: nn.Module, *, model_name: str | None, model_kwargs: dict | None = None,
                    input_size=None, prompt: VisualPrompt | None = None, label_mapping: torch.Tensor | None = None,
                    meta: dict | None = None, overwrite: bool = False) -> None:
    granularities = {m.granularity for m in model.modules() if isinstance(m, MASKED_TYPES)}
    if len(granularities) > 1:
        raise ValueError(f"model mixes granularities {sorted(granularities)}; one per checkpoint is supported")
    if prompt is not None:
        # the network's input is the prompt's output: a stored input_size of another size would mislead every
        # reader of the file (deploy and export take the prompt's sizes)
        network_input = [3, prompt.out_size, prompt.out_size]
        if input_size is not None and list(input_size)[-2:] != network_input[-2:]:
            raise ValueError(f"input_size: expected the network input the prompt gives, {tuple(network_input)}, "
                             f"got {tuple(input_size)}")
        input_size = network_input if input_size is None else input_size
    payload = {
        "format": FORMAT, "version": VERSION,
        "model": {"name": model_name, "kwargs": dict(model_kwargs or {}), "class": _class_path(model)},
        "granularity": next(iter(granularities), None),
        "structured": structured_config(model),  # None unless sparsify(..., structured=True)
        "input_size": list(input_size) if input_size is not None else None,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "prompt": prompt_spec(prompt) if prompt is not None else None,
        "label_mapping": label_mapping.detach().cpu() if label_mapping is not None else None,
        "meta": dict(meta or {}),
    }
    payload[SHA_KEY] = payload_sha256(payload)
    atomic_save(payload, path, overwrite=overwrite)


def _load_failure(exc: Exception, path: str) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in a few words. Not torch's own text when the file holds
    other objects than tensors: that suggests loading with ``weights_only=False``, which runs the file's code;
    nor for a file that is no torch.save file at all (a text file gave "IndexError: list index out of range")."""
    import pickle

    if isinstance(exc, EOFError):
        return "the file is empty or cut short"
    try:
        with open(path, "rb") as file:
            head = file.read(4)
    except OSError:
        head = b""
    # torch.save writes a zip archive, or (legacy format) a pickle stream, whose first byte is PROTO (0x80)
    if head and not head.startswith(b"PK\x03\x04") and head[:1] != b"\x80":
        return "not a file torch.save wrote: it is neither a zip archive nor a pickle stream"
    if isinstance(exc, pickle.UnpicklingError) and "weights_only" in str(exc):
        return "not a file of tensors and plain values: torch's safe loader refused it, and nothing in it was run"
    return exception_reason(exc)


EXPORT_TAG_PREFIX = "vpns_fast.export."  # vpns_fast.deploy.export.FORMAT_PREFIX, which this layer cannot import
MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors format's own limit on its JSON header


def _is_export(path: str) -> bool:
    """Whether ``path`` is a vpns_fast safetensors export (`vpns report` given one said only "no format tag"): the
    8-byte length, then the whole JSON header it gives is read, never the tensors. The tag had been looked for in the
    first 4096 bytes; the header's metadata is a map in no set order, and a sparse export of MobileNetV3-Small had
    the meta JSON first and the tag at byte ~12,200 (an outside trial)."""
    try:
        with open(path, "rb") as file:
            length = file.read(8)
            if len(length) < 8:
                return False
            size = int.from_bytes(length, "little")
            if not 2 <= size <= MAX_SAFETENSORS_HEADER:
                return False
            header = file.read(size)
    except OSError:
        return False
    if len(header) < size or header[:1] != b"{":
        return False
    try:
        metadata = json.loads(header.decode("utf-8")).get("__metadata__")
    except (UnicodeDecodeError, ValueError, AttributeError):  # AttributeError: JSON that is no object
        return False
    tag = metadata.get("vpns_fast.format") if isinstance(metadata, dict) else None
    return isinstance(tag, str) and tag.startswith(EXPORT_TAG_PREFIX)


def input_and_mapping_problem(input_size, label_mapping) -> str | None:
    """Why a file's ``input_size`` (None or 3 positive ints) or ``label_mapping`` (None, or a non-empty 1-d list or
    integer tensor of class indices >= 0) cannot be used, or None. The writers only write such values; a file edited
    by hand made `vpns infer` fail with a traceback (input size [3, 0, 0]) and an ONNX export map a class to the
    network's last output (index -1: an outside review)."""
    if input_size is not None:
        if (not isinstance(input_size, (list, tuple)) or len(input_size) != 3
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in input_size)):
            return f"input_size must be 3 positive integers [C, H, W], got {input_size!r}"
    if label_mapping is not None:
        values = label_mapping.tolist() if isinstance(label_mapping, torch.Tensor) else label_mapping
        is_integer = not isinstance(label_mapping, torch.Tensor) or not (
            label_mapping.is_floating_point() or label_mapping.is_complex() or label_mapping.dtype == torch.bool)
        if (not is_integer or not isinstance(values, list) or not values
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)):
            shown = values if isinstance(values, list) and len(values) <= 8 else f"{type(label_mapping).__name__}"
            return f"label_mapping must be a non-empty list of class indices >= 0, got {shown!r}"
    return None


def load_checkpoint(path) -> dict:
    """Read and validate a checkpoint; raises :class:`CheckpointError` with the reason."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    from vpns_fast.models import load_weights_only

    try:
        payload = load_weights_only(path)
    except Exception as exc:  # truncated, corrupted, or not a torch file at all
        raise CheckpointError(f"{path} is not a readable checkpoint ({_load_failure(exc, path)})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        if _is_export(path):
            raise CheckpointError(f"{path} is a vpns_fast export, not a checkpoint: this takes the .pt checkpoint a "
                                  "run wrote (`vpns infer` and `vpns bench-infer` take exports too)")
        raise CheckpointError(f"{path} is not a vpns_fast checkpoint (no format tag {FORMAT!r})")
    version = payload.get("version")
    if version != VERSION:
        newer = isinstance(version, int) and version > VERSION
        raise CheckpointError(f"{path} has checkpoint version {version!r}; this vpns_fast reads version {VERSION}"
                              + ("; it was written by a newer vpns_fast: upgrade to read it" if newer else ""))
    _verify(path, payload)
    problem = input_and_mapping_problem(payload.get("input_size"), payload.get("label_mapping"))
    if problem is not None:
        raise CheckpointError(f"{path}: {problem}")
    return payload


def _class_path(model: nn.Module) -> str:
    return f"{type(model).__module__}.{type(model).__qualname__}"


def model_from_checkpoint(payload: dict, model: nn.Module | None = None) -> nn.Module:
    """Rebuild the (masked) model a checkpoint describes and load its weights.

    ``model``: a dense module of the checkpoint's architecture to load into instead of rebuilding it (needed
    when the network was passed as an object); it is copied, never modified.
    """
    import copy

    from vpns_fast.models import build_model_from_file
    from vpns_fast.pruning.masking import UnmaskedWeightsWarning, maskable_names, sparsify

    record = payload["model"]
    built = model is None  # rebuilt here, under torch's default dtype: made float32 below (a user's module is not)
    if model is not None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model: expected an nn.Module of the checkpoint's architecture, got "
                             f"{type(model).__name__}")
        model = copy.deepcopy(model).cpu()
    elif record["name"] is None:
        raise NetworkNotRebuildable("this checkpoint", record.get("class", "a module"))
    else:
        model = build_model_from_file(record["name"], record["kwargs"], "this checkpoint")
    if payload["granularity"] is not None:
        masked_names = {k.rsplit(".", 1)[0] for k in payload["state_dict"] if k.endswith(".scores")}
        # every other weight matrix stayed dense (excluded when the checkpoint was made)
        dense_names = set(maskable_names(model))
        structured = payload.get("structured")  # absent in older checkpoints
        with warnings.catch_warnings():  # the checkpoint settled what stays dense; said once, when it was pruned
            warnings.simplefilter("ignore", UnmaskedWeightsWarning)
            sparsify(model, payload["granularity"], score_init="kaiming",
                     exclude=[glob.escape(name) for name in sorted(dense_names - masked_names)],
                     **({"structured": True, **structured} if structured else {}))
    try:
        (in_float32(model) if built else model).load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        what = record["name"] or record.get("class", "the module")
        if not built:  # the module passed, not the checkpoint's record, is what does not fit (an outside review)
            what = (f"the model= given, {type(model).__module__}.{type(model).__qualname__}; the checkpoint was made "
                    f"from {what}")
        raise ValueError(f"the checkpoint's weights do not fit the model ({what}): "
                         f"{state_dict_mismatch(exc)}") from exc
    return model

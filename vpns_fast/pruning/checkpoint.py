"""Checkpoints: a versioned dict of plain tensors and Python values, written atomically and
read with ``torch.load(..., weights_only=True)`` (no pickled code runs on load).

Layout (version 1)::

    {"format": "vpns_fast.checkpoint", "version": 1,
     "model": {"name": str, "kwargs": dict}, "granularity": str | None, "input_size": [C, H, W],
     "state_dict": {...},                       # masked layers carry `scores` and `threshold`
     "prompt": None | {"kind", "out_size", "in_size", "size", "mean", "std", "program"},
     "label_mapping": None | LongTensor,
     "meta": dict}                              # anything else the writer wants to keep
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from vpns_fast.files import atomic_write
from vpns_fast.nn.masked_layers import MASKED_TYPES
from vpns_fast.nn.prompts import VisualPrompt, build_prompt
from vpns_fast.pruning.structured import structured_config

FORMAT = "vpns_fast.checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A file that is not a readable vpns_fast checkpoint of a supported version."""


def atomic_save(obj: Any, path: str | os.PathLike, overwrite: bool = False) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    atomic_write(path, lambda f: torch.save(obj, f), overwrite)


def prompt_spec(prompt: VisualPrompt) -> dict:
    size = getattr(prompt, "pad", getattr(prompt, "mask_size", 0))
    return {"kind": prompt.kind, "out_size": prompt.out_size, "in_size": prompt.in_size, "size": size,
            "mean": list(prompt.mean), "std": list(prompt.std), "program": prompt.program.detach().cpu()}


def prompt_from_spec(spec: dict) -> VisualPrompt:
    prompt = build_prompt(spec["kind"], spec["out_size"], spec["in_size"], spec["size"], spec["mean"], spec["std"])
    with torch.no_grad():
        prompt.program.copy_(spec["program"])
    return prompt


def save_checkpoint(path, model: nn.Module, *, model_name: str, model_kwargs: dict | None = None,
                    input_size=None, prompt: VisualPrompt | None = None, label_mapping: torch.Tensor | None = None,
                    meta: dict | None = None, overwrite: bool = False) -> None:
    granularities = {m.granularity for m in model.modules() if isinstance(m, MASKED_TYPES)}
    if len(granularities) > 1:
        raise ValueError(f"model mixes granularities {sorted(granularities)}; one per checkpoint is supported")
    payload = {
        "format": FORMAT, "version": VERSION,
        "model": {"name": model_name, "kwargs": dict(model_kwargs or {})},
        "granularity": next(iter(granularities), None),
        "structured": structured_config(model),  # None unless sparsify(..., structured=True)
        "input_size": list(input_size) if input_size is not None else None,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "prompt": prompt_spec(prompt) if prompt is not None else None,
        "label_mapping": label_mapping.detach().cpu() if label_mapping is not None else None,
        "meta": dict(meta or {}),
    }
    atomic_save(payload, path, overwrite=overwrite)


def load_checkpoint(path) -> dict:
    """Read and validate a checkpoint; raises :class:`CheckpointError` with the reason."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupted, or not a torch file at all
        raise CheckpointError(f"{path} is not a readable checkpoint ({exc.__class__.__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a vpns_fast checkpoint (no format tag {FORMAT!r})")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {payload.get('version')!r}; this vpns_fast reads "
                              f"version {VERSION}")
    return payload


def model_from_checkpoint(payload: dict) -> nn.Module:
    """Rebuild the (masked) model a checkpoint describes and load its weights."""
    from vpns_fast.models import build_model
    from vpns_fast.pruning.masking import sparsify

    model = build_model(payload["model"]["name"], **payload["model"]["kwargs"])
    if payload["granularity"] is not None:
        masked_names = {k.rsplit(".", 1)[0] for k in payload["state_dict"] if k.endswith(".scores")}
        dense_names = {name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
        structured = payload.get("structured")  # absent in older checkpoints
        sparsify(model, payload["granularity"], score_init="kaiming", exclude=sorted(dense_names - masked_names),
                 **({"structured": True, **structured} if structured else {}))
    model.load_state_dict(payload["state_dict"])
    return model

"""Exporting a pruned checkpoint for deployment: dense, sparse, slim (safetensors) and ONNX.

Every safetensors export is one file: the tensors, and in the header's ``__metadata__`` (str -> str)

* ``vpns_fast.format``: ``vpns_fast.export.<kind>`` with kind ``dense``, ``sparse`` or ``slim``;
* ``vpns_fast.version``: the format version (:data:`VERSION`);
* ``vpns_fast.meta``: JSON: model name/kwargs, granularity, input size, prompt spec (program as
  base64 float32), whether the prompt is used at inference, label mapping, normalization
  mean/std, class names, per-layer encoding (sparse) or channel report and architecture (slim);
* ``vpns_fast.sha256``: sha256 over the format tag, version, meta JSON and every tensor (name,
  dtype, shape, bytes in name order), checked on load.

``dense`` keeps the folded model's torchvision state_dict keys and nothing else, so the stock model
loads it with ``load_state_dict(safetensors.torch.load_file(path))``; the prompt and mapping live
in the header. ``sparse`` stores each folded Conv/Linear weight in the smallest of: dense;
a bitmask over output channels / kernels / single weights plus the kept values; CSR over
``(out, in * kh * kw)`` with int16/int32 indices. No pickle anywhere: files load without the
trainer and without running code.

Measured (ResNet-18, 10 classes, random BN statistics, file sizes in KiB; dense = 43,727):
unstructured density 0.1: sparse 5,406 (18 layers bitmask-element, 3 CSR), slim 43,667 (0 channels
removed); density 0.02: sparse 1,173 (8 CSR), slim 19,985 (753 removed); kernel 0.3: sparse
11,811 (16 bitmask-kernel); channel 0.5: sparse 8,263, slim 10,138 (1,096 removed; block-output
channels stay, see :mod:`vpns_fast.deploy.slim`). Export takes 1-4 s each on a loaded 2-core CPU.
"""
from __future__ import annotations

import base64
import copy
import hashlib
import json
import math
import os
import struct
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from vpns_fast import ops
from vpns_fast.errors import NetworkNotRebuildable, caller_stacklevel, exception_reason, state_dict_mismatch
from vpns_fast.files import atomic_write, never_replaced
from vpns_fast.pruning.checkpoint import input_and_mapping_problem, tensor_bytes

__all__ = [
    "FORMATS", "VERSION", "ONNX_OPSET", "ExportFormatError", "MissingDependencyError", "OnnxExporterFallbackWarning",
    "export", "onnx_model", "read_export", "load_dense", "load_sparse", "load_slim", "load_any", "encode_weight",
    "decode_weight",
]

FORMATS = ("dense", "sparse", "slim", "onnx")
SAFETENSORS_KINDS = ("dense", "sparse", "slim")
FORMAT_PREFIX = "vpns_fast.export."
VERSION = 1
_KEY_FORMAT, _KEY_VERSION, _KEY_META, _KEY_SHA = ("vpns_fast.format", "vpns_fast.version", "vpns_fast.meta",
                                                  "vpns_fast.sha256")
ONNX_OPSET = 18
"""Default ONNX opset. The torch.export-based exporter translates natively to 18 at the lowest;
asked for 17 it exports 18 and converts down afterwards, which failed on these graphs (an
Unsqueeze "axes" input it could not turn back into an attribute) and left opset 18 anyway, so a
lower opset goes to the TorchScript exporter. Its files are ONNX IR version 10: onnxruntime 1.18.1
and 1.32 run them, 1.17.3 refuses IR 10 (checked); for such runtimes ``opset=17`` gives the
TorchScript exporter's IR 8 file (which 1.17.3 runs), with the fallback warning."""
_DYNAMO_MIN_OPSET = 18


class ExportFormatError(ValueError):
    """A file that is not a readable vpns_fast export of the expected kind and a supported version:
    truncated, corrupted, checksum mismatch, wrong format tag or version."""


class MissingDependencyError(ImportError):
    """An optional dependency (``onnx``) is not installed."""


# --------------------------------------------------------------------------- files

def atomic_write_bytes(data: bytes, path: str | os.PathLike, overwrite: bool = False) -> None:
    """``data`` to ``path`` through :func:`vpns_fast.files.atomic_write`."""
    atomic_write(path, lambda f: f.write(data), overwrite)


def _checksum(kind: str, version: str, meta_json: str, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for part in (FORMAT_PREFIX + kind, version, meta_json):
        h.update(part.encode())
        h.update(b"\0")
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(b"\0")
        h.update(tensor_bytes(t))
    return h.hexdigest()


def _write_safetensors(kind: str, tensors: dict[str, torch.Tensor], meta: dict, path, overwrite: bool) -> None:
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    meta_json = json.dumps(meta, sort_keys=True, default=_json_default)
    version = str(VERSION)
    metadata = {_KEY_FORMAT: FORMAT_PREFIX + kind, _KEY_VERSION: version, _KEY_META: meta_json,
                _KEY_SHA: _checksum(kind, version, meta_json, tensors)}
    atomic_write_bytes(save(tensors, metadata=metadata), path, overwrite=overwrite)


def _json_default(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return str(value)


def read_export(path, kind: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Read and verify a vpns_fast safetensors export; returns ``(tensors, meta)`` where ``meta``
    also carries ``"kind"``. ``kind`` (dense/sparse/slim) rejects files of another kind.
    Raises :class:`ExportFormatError` with the reason."""
    from safetensors.torch import load

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"export file {path} does not exist")
    with open(path, "rb") as f:
        data = f.read()
    metadata = _header_metadata(data, path)
    tag = metadata.get(_KEY_FORMAT)
    if not isinstance(tag, str) or not tag.startswith(FORMAT_PREFIX) or \
            tag[len(FORMAT_PREFIX):] not in SAFETENSORS_KINDS:
        raise ExportFormatError(f"{path} is not a vpns_fast export (format tag {tag!r}, expected "
                                f"{FORMAT_PREFIX}{{{','.join(SAFETENSORS_KINDS)}}})")
    file_kind = tag[len(FORMAT_PREFIX):]
    if kind is not None and file_kind != kind:
        raise ExportFormatError(f"{path} is a {file_kind!r} export, expected {kind!r}")
    if metadata.get(_KEY_VERSION) != str(VERSION):
        raise ExportFormatError(f"{path} has export version {metadata.get(_KEY_VERSION)!r}; this vpns_fast reads "
                                f"version {VERSION}")
    try:
        tensors = load(data)
    except Exception as exc:
        raise ExportFormatError(f"{path} is corrupted ({exc.__class__.__name__}: {exc})") from exc
    meta_json = metadata.get(_KEY_META, "")
    expected = _checksum(file_kind, metadata[_KEY_VERSION], meta_json, tensors)
    if metadata.get(_KEY_SHA) != expected:
        raise ExportFormatError(f"{path} failed its checksum (stored {metadata.get(_KEY_SHA)!r}, computed "
                                f"{expected!r}): the file was modified or damaged")
    try:
        meta = json.loads(meta_json)
    except ValueError as exc:  # pragma: no cover - the checksum covers the JSON
        raise ExportFormatError(f"{path} has unreadable metadata ({exc})") from exc
    problem = input_and_mapping_problem(meta.get("input_size"), meta.get("label_mapping"))
    if problem is not None:
        raise ExportFormatError(f"{path}: {problem}")
    meta["kind"] = file_kind
    return tensors, meta


def _header_metadata(data: bytes, path: str) -> dict:
    if len(data) < 8:
        raise ExportFormatError(f"{path} is empty" if not data else
                                f"{path} is truncated or not a vpns_fast file (only {len(data)} bytes)")
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8 or size > 100_000_000:
        raise ExportFormatError(f"{path} is neither a vpns_fast checkpoint nor a safetensors export (or it is "
                                "truncated: the header length it starts with does not fit in the file)")
    try:
        header = json.loads(data[8:8 + size].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ExportFormatError(f"{path} is neither a vpns_fast checkpoint nor a safetensors export (unreadable "
                                "header)") from exc
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        raise ExportFormatError(f"{path} is a safetensors file without vpns_fast metadata")
    return metadata


def file_kind(path) -> str:
    """``"checkpoint"`` (a torch zip file), or the export kind from a safetensors header."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder; expected a checkpoint (.pt) or a dense/sparse/slim export file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    if path.lower().endswith(".onnx"):
        raise ExportFormatError(f"{path} is an ONNX file, which onnxruntime runs (see README); vpns_fast loads "
                                "checkpoints (.pt) and dense/sparse/slim exports")
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"PK":
        return "checkpoint"
    with open(path, "rb") as f:
        data = f.read(8)
        if len(data) == 8:
            (size,) = struct.unpack("<Q", data)
            data += f.read(min(size, 100_000_000))
    tag = _header_metadata(data, path).get(_KEY_FORMAT, "")
    if isinstance(tag, str) and tag.startswith(FORMAT_PREFIX):
        return tag[len(FORMAT_PREFIX):]
    raise ExportFormatError(f"{path} is neither a vpns_fast checkpoint nor a vpns_fast export (tag {tag!r})")


# --------------------------------------------------------------------------- payload -> parts

def _load_payload(checkpoint_or_payload) -> dict:
    from vpns_fast.pruning.checkpoint import FORMAT, CheckpointError, load_checkpoint

    if isinstance(checkpoint_or_payload, dict):
        if checkpoint_or_payload.get("format") != FORMAT:
            raise CheckpointError(f"payload is not a vpns_fast checkpoint (no format tag {FORMAT!r})")
        return checkpoint_or_payload
    return load_checkpoint(checkpoint_or_payload)


def default_use_prompt(payload: dict) -> bool:
    """Whether inference applies the checkpoint's prompt: yes when it keeps one, unless it was
    trained with the release protocol, which evaluates without the prompt (docs/method.md §6)."""
    if payload.get("prompt") is None:
        return False
    config = (payload.get("meta") or {}).get("config") or {}
    return config.get("protocol", "prompted") != "release"


def _prompt_meta(spec: dict | None) -> dict | None:
    if spec is None:
        return None
    program = spec["program"].detach().cpu().float().contiguous()
    meta = {k: v for k, v in spec.items() if k != "program"}
    meta.update(program_shape=list(program.shape),
                program_float32_b64=base64.b64encode(tensor_bytes(program)).decode("ascii"))
    return meta


def prompt_from_meta(meta: dict | None):
    """The prompt module an export's metadata describes (or None)."""
    from vpns_fast.pruning.checkpoint import prompt_from_spec

    if meta is None:
        return None
    raw = base64.b64decode(meta["program_float32_b64"])
    program = torch.frombuffer(bytearray(raw), dtype=torch.float32).reshape(meta["program_shape"])
    spec = {k: v for k, v in meta.items() if k not in ("program_shape", "program_float32_b64")}
    return prompt_from_spec(dict(spec, program=program)).eval()


def _common_meta(payload: dict, use_prompt: bool | None, class_names) -> dict:
    prompt = payload.get("prompt")
    mapping = payload.get("label_mapping")
    mean, std = ((prompt["mean"], prompt["std"]) if prompt is not None else (ops.IMAGENET_MEAN, ops.IMAGENET_STD))
    ckpt_meta = payload.get("meta") or {}
    names = class_names if class_names is not None else ckpt_meta.get("class_names")
    return {
        "model": payload["model"], "granularity": payload.get("granularity"),
        "input_size": payload.get("input_size"),
        "prompt": _prompt_meta(prompt),
        "use_prompt": default_use_prompt(payload) if use_prompt is None else bool(use_prompt and prompt is not None),
        "label_mapping": None if mapping is None else [int(i) for i in mapping.reshape(-1).tolist()],
        "normalization": {"mean": list(map(float, mean)), "std": list(map(float, std))},
        "class_names": None if names is None else [str(n) for n in names],
        "checkpoint_meta": {k: v for k, v in ckpt_meta.items() if k in ("config", "stage", "selected")},
    }


def _folded_model(payload: dict, model: nn.Module | None = None) -> nn.Module:
    from vpns_fast.pruning.checkpoint import model_from_checkpoint
    from vpns_fast.pruning.masking import fold, masked_layers

    model = model_from_checkpoint(payload, model).eval()
    return fold(model).eval() if masked_layers(model) else model


def _build_plain(meta: dict, model: nn.Module | None = None) -> nn.Module:
    """The stock network the metadata names, or a copy of ``model`` (for a network passed as an object)."""
    from vpns_fast.models import build_model_from_file

    if model is not None:
        return copy.deepcopy(model).cpu()
    if meta["model"]["name"] is None:
        raise NetworkNotRebuildable("this file", meta["model"].get("class", "a module"))
    from vpns_fast.pruning.checkpoint import in_float32

    return in_float32(build_model_from_file(meta["model"]["name"], meta["model"]["kwargs"], "this file"))


def _load_state(model: nn.Module, state: dict, path) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ExportFormatError(f"{path}: weights do not fit the model the metadata names: "
                                f"{state_dict_mismatch(exc)}") from exc


def _mapping_tensor(meta: dict) -> torch.Tensor | None:
    mapping = meta.get("label_mapping")
    return None if mapping is None else torch.tensor(mapping, dtype=torch.long)


# --------------------------------------------------------------------------- sparse encoding

def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    flat = mask.reshape(-1).to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)]).reshape(-1, 8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.int32)
    return (flat.to(torch.int32) * weights).sum(1).to(torch.uint8)


def _unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    bits = (packed.to(torch.int32)[:, None] >> torch.arange(8, dtype=torch.int32)) & 1
    return bits.reshape(-1)[:count].bool()


def _group_dims(shape: tuple[int, ...]) -> dict[str, int]:
    """Group sizes of the bitmask encodings: output channel, kernel (out, in), single weight."""
    sizes = {"element": 1}
    if len(shape) >= 2:
        sizes["channel"] = math.prod(shape[1:])
    if len(shape) > 2:
        sizes["kernel"] = math.prod(shape[2:])
    return sizes


def encode_weight(name: str, weight: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict]:
    """The smallest exact encoding of ``weight``: ``(tensors, info)``; see the module docstring."""
    weight = weight.detach().cpu().contiguous()
    shape, itemsize = tuple(weight.shape), weight.element_size()
    numel = weight.numel()
    candidates: dict[str, int] = {"dense": numel * itemsize}
    group_nonzero: dict[str, torch.Tensor] = {}
    for group, size in _group_dims(shape).items():
        nonzero = (weight.reshape(-1, size) != 0).any(1)
        group_nonzero[group] = nonzero
        candidates[f"bitmask-{group}"] = math.ceil(nonzero.numel() / 8) + int(nonzero.sum()) * size * itemsize
    rows = shape[0] if len(shape) >= 2 else 1
    cols = numel // max(rows, 1)
    nnz = int((weight != 0).sum())
    index_dtype = torch.int16 if cols <= 2 ** 15 else torch.int32
    index_bytes = 2 if index_dtype == torch.int16 else 4
    indptr_dtype = torch.int32 if nnz < 2 ** 31 else torch.int64
    candidates["csr"] = (rows + 1) * (4 if indptr_dtype == torch.int32 else 8) + nnz * (index_bytes + itemsize)
    encoding = min(candidates, key=lambda k: (candidates[k], k != "dense"))
    info = {"encoding": encoding, "shape": list(shape), "dtype": str(weight.dtype).removeprefix("torch."),
            "nnz": nnz, "bytes": candidates[encoding], "dense_bytes": candidates["dense"]}
    if encoding == "dense":
        return {f"sparse::{name}::values": weight}, info
    if encoding.startswith("bitmask-"):
        group = encoding.removeprefix("bitmask-")
        size = _group_dims(shape)[group]
        nonzero = group_nonzero[group]
        values = weight.reshape(-1, size)[nonzero].reshape(-1)
        info.update(groups=int(nonzero.numel()), group_size=size)
        return {f"sparse::{name}::mask": _pack_bits(nonzero), f"sparse::{name}::values": values}, info
    matrix = weight.reshape(rows, cols)
    nonzero = matrix != 0
    indptr = torch.zeros(rows + 1, dtype=torch.int64)
    indptr[1:] = nonzero.sum(1).cumsum(0)
    indices = torch.nonzero(nonzero)[:, 1]
    info.update(rows=rows, cols=cols)
    return {f"sparse::{name}::indptr": indptr.to(indptr_dtype), f"sparse::{name}::indices": indices.to(index_dtype),
            f"sparse::{name}::values": matrix[nonzero]}, info


def decode_weight(name: str, tensors: dict[str, torch.Tensor], info: dict) -> torch.Tensor:
    """Inverse of :func:`encode_weight`."""
    shape, encoding = tuple(info["shape"]), info["encoding"]
    dtype = getattr(torch, info["dtype"])
    values = tensors[f"sparse::{name}::values"].to(dtype)
    numel = math.prod(shape)
    if encoding == "dense":
        return values.reshape(shape)
    if encoding.startswith("bitmask-"):
        groups, size = int(info["groups"]), int(info["group_size"])
        nonzero = _unpack_bits(tensors[f"sparse::{name}::mask"], groups)
        if groups * size != numel or int(nonzero.sum()) * size != values.numel():
            raise ValueError(f"bitmask of {name} does not match its values")
        out = torch.zeros(groups, size, dtype=dtype)
        out[nonzero] = values.reshape(-1, size)
        return out.reshape(shape)
    if encoding == "csr":
        rows, cols = int(info["rows"]), int(info["cols"])
        indptr = tensors[f"sparse::{name}::indptr"].long()
        indices = tensors[f"sparse::{name}::indices"].long()
        if indptr.numel() != rows + 1 or int(indptr[-1]) != values.numel() or indices.numel() != values.numel():
            raise ValueError(f"CSR arrays of {name} are inconsistent")
        row_of = torch.repeat_interleave(torch.arange(rows), indptr.diff())
        out = torch.zeros(rows, cols, dtype=dtype)
        out[row_of, indices] = values
        return out.reshape(shape)
    raise ValueError(f"unknown encoding {encoding!r} for {name}")


# --------------------------------------------------------------------------- export

def export(checkpoint_or_payload: str | os.PathLike | dict, format: str, path: str | os.PathLike, force: bool = False,
           *, slim: bool = False, use_prompt: bool | None = None, class_names: Sequence[str] | None = None,
           opset: int = ONNX_OPSET, model: nn.Module | None = None) -> dict:
    """Export a checkpoint (path or the dict :func:`vpns_fast.checkpoint.load_checkpoint` returns)
    to ``path`` in ``format`` (dense, sparse, slim, onnx). Nothing is overwritten without
    ``force``. ``slim`` (onnx only): export the slimmed network. ``use_prompt``: whether inference
    applies the stored prompt (default: :func:`default_use_prompt`). ``opset`` (onnx only): the
    ONNX opset (:data:`ONNX_OPSET`). Returns the metadata written.

    ONNX goes through the torch.export-based exporter (``torch.onnx.export(dynamo=True)``, which
    needs onnxscript); where that one cannot export (it raises, onnxscript is missing, or ``opset``
    is below 18) the TorchScript exporter writes the file and an
    :class:`OnnxExporterFallbackWarning` gives the reason in one line. The returned metadata and the
    file's ``vpns_fast.meta`` record ``exporter`` (``"torch.export"`` or ``"torchscript"``) and
    ``exporter_fallback_reason`` (None, or that reason).
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if slim and format != "onnx":
        raise ValueError(f"slim: only for format onnx (format {format!r} ignores it; format 'slim' writes the "
                         "slimmed network)")
    path = os.fspath(path)
    if (not isinstance(checkpoint_or_payload, dict) and os.path.exists(path)
            and os.path.exists(checkpoint_or_payload) and os.path.samefile(path, checkpoint_or_payload)):
        # even with force: the export would replace the only copy of what it is made from
        raise ValueError(f"path {path}: is the checkpoint being exported; write the export to another file")
    problem = never_replaced(path)
    if problem is not None:  # before "exists": force=True would not replace it either
        raise ValueError(f"path {problem}")
    if os.path.lexists(path) and not force:
        raise FileExistsError(f"{path} exists; pass force=True to replace it")
    payload = _load_payload(checkpoint_or_payload)
    meta = _common_meta(payload, use_prompt, class_names)
    folded = _folded_model(payload, model)
    _refuse_nan_pipeline(folded, prompt_from_meta(meta.get("prompt")) if meta.get("use_prompt") else None, meta,
                         "checkpoint" if isinstance(checkpoint_or_payload, dict) else os.fspath(checkpoint_or_payload))
    if format == "dense":
        _write_safetensors("dense", folded.state_dict(), meta, path, force)
    elif format == "sparse":
        tensors, layers = _sparse_tensors(folded)
        meta["layers"] = layers
        meta["bytes"] = {"weights_encoded": sum(i["bytes"] for i in layers.values()),
                         "weights_dense": sum(i["dense_bytes"] for i in layers.values())}
        _write_safetensors("sparse", tensors, meta, path, force)
    elif format == "slim":
        from vpns_fast.deploy.slim import slim_model

        model, architecture, report = slim_model(folded)
        linears = architecture.get("linears", {})  # a VGG's classifier: its rows count units, not channels
        meta.update(architecture=architecture, channels=report,
                    channels_dropped=sum(r["dropped"] for name, r in report.items() if name not in linears),
                    units_dropped=sum(r["dropped"] for name, r in report.items() if name in linears))
        _write_safetensors("slim", model.state_dict(), meta, path, force)
    else:
        _export_onnx(folded, meta, path, force, slim, opset)
    return meta


def _sparse_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    layer_weights = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    for key, value in model.state_dict().items():
        if key in layer_weights:
            encoded, info = encode_weight(key, value)
            tensors.update(encoded)
            layers[key] = info
        else:
            tensors[f"dense::{key}"] = value
    return tensors, layers


# --------------------------------------------------------------------------- load

def load_dense(path, model: nn.Module | None = None) -> tuple[nn.Module, Any, torch.Tensor | None, dict]:
    """``(model, prompt, label_mapping, meta)`` from a dense export; ``model`` is the stock model."""
    tensors, meta = read_export(path, "dense")
    model = _build_plain(meta, model)
    _load_state(model, tensors, path)
    return model.eval(), prompt_from_meta(meta.get("prompt")), _mapping_tensor(meta), meta


def load_sparse(path, model: nn.Module | None = None) -> tuple[nn.Module, Any, torch.Tensor | None, dict]:
    """``(model, prompt, label_mapping, meta)`` from a sparse export: the dense-shaped plain model
    with the folded (zero-filled) weights; ``prompt`` is None when none was kept."""
    tensors, meta = read_export(path, "sparse")
    state = {key.removeprefix("dense::"): value for key, value in tensors.items() if key.startswith("dense::")}
    try:
        for key, info in meta["layers"].items():
            state[key] = decode_weight(key, tensors, info)
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise ExportFormatError(f"{path}: sparse layer data is inconsistent ({exc.__class__.__name__}: {exc})") \
            from exc
    model = _build_plain(meta, model)
    _load_state(model, state, path)
    return model.eval(), prompt_from_meta(meta.get("prompt")), _mapping_tensor(meta), meta


def load_slim(path, with_meta: bool = False, model: nn.Module | None = None):
    """The slim network of a slim export (``nn.Module``, eval mode); with ``with_meta``,
    ``(model, prompt, label_mapping, meta)`` like the other loaders."""
    from vpns_fast.deploy.slim import SlimError, build_slim

    tensors, meta = read_export(path, "slim")
    try:
        model = build_slim(_build_plain(meta, model), meta["architecture"])
    except (SlimError, KeyError) as exc:
        raise ExportFormatError(f"{path}: slim architecture description is unusable ({exc})") from exc
    _load_state(model, tensors, path)
    model.eval()
    if with_meta:
        return model, prompt_from_meta(meta.get("prompt")), _mapping_tensor(meta), meta
    return model


def refuse_nan(module: nn.Module, what: str) -> None:
    """ValueError naming ``what`` and the first parameter or buffer of ``module`` that holds NaN: such a network
    computes NaN logits, which would be printed or written as results. Infinities pass (a class masked with a
    ``-inf`` bias is a model's choice), and so do a masked layer's scores: a NaN score only prunes its weight."""
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if name.rpartition(".")[2] == "scores":
            continue
        if tensor.is_floating_point() and bool(torch.isnan(tensor).any()):
            raise ValueError(f"{what}: {name} holds NaN values; refusing a network that computes NaN "
                             "(was the run diverging?)")


def load_any(path, model: nn.Module | None = None) -> tuple[nn.Module, Any, torch.Tensor | None, dict]:
    """``(model, prompt, label_mapping, meta)`` from a checkpoint or any safetensors export;
    a checkpoint gives its masked model and ``meta["kind"] == "checkpoint"``. A network holding NaN is refused
    (:func:`refuse_nan`)."""
    kind = file_kind(path)
    if kind == "dense":
        loaded = load_dense(path, model)
    elif kind == "sparse":
        loaded = load_sparse(path, model)
    elif kind == "slim":
        loaded = load_slim(path, with_meta=True, model=model)
    else:
        from vpns_fast.pruning.checkpoint import load_checkpoint, model_from_checkpoint

        payload = load_checkpoint(path)
        meta = _common_meta(payload, None, None)
        meta["kind"] = "checkpoint"
        loaded = (model_from_checkpoint(payload, model).eval(), prompt_from_meta(meta["prompt"]),
                  _mapping_tensor(meta), meta)
    _refuse_nan_pipeline(loaded[0], loaded[1], loaded[3], os.fspath(path))
    return loaded


def _refuse_nan_pipeline(network: nn.Module, prompt, meta: dict, what: str) -> None:
    """:func:`refuse_nan` on the network and on the prompt where inference applies it (one it does not apply
    cannot harm the logits)."""
    refuse_nan(network, what)
    if prompt is not None and meta.get("use_prompt"):
        refuse_nan(prompt, f"{what} prompt")


# --------------------------------------------------------------------------- onnx

class InputStage(nn.Module):
    """Prompt + clamp + normalization in plain tensor ops, ONNX-exportable: the prompt's added
    term ``program * region`` (``sigmoid(program) * region`` for fix/expansive) is a constant.
    Takes float images in [0, 1]."""

    def __init__(self, prompt_meta: dict | None, use_prompt: bool, mean, std):
        super().__init__()
        from vpns_fast.kernels.prompt import image_offset, prompt_region_ref

        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32)[:, None, None])
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32)[:, None, None])
        self.padding = (0, 0, 0, 0)
        self.register_buffer("delta", torch.zeros(0))
        self.has_prompt = bool(use_prompt and prompt_meta is not None)  # a Python flag: traced as a constant
        if self.has_prompt:
            prompt = prompt_from_meta(prompt_meta)
            if prompt.kind == "random":
                raise ValueError("a random prompt moves at every forward; it cannot be a constant ONNX graph")
            region = prompt_region_ref(prompt.kind, prompt.out_size, prompt.in_size, **prompt._region_args())
            program = prompt.program.detach()
            added = program if prompt.kind == "pad" else torch.sigmoid(program)
            self.delta = (added * region).float()
            lo, hi = image_offset(prompt.in_size, prompt.out_size)
            self.padding = (lo, hi, lo, hi)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        if self.has_prompt:
            if any(self.padding):
                x = nn.functional.pad(x, self.padding, value=0.0)
            x = torch.clamp(x + self.delta, 0.0, 1.0)
        return (x - self.mean) / self.std


class InferencePipeline(nn.Module):
    """input stage -> network -> label mapping, plain torch (what the ONNX file holds)."""

    def __init__(self, input_stage: nn.Module, network: nn.Module, mapping: torch.Tensor | None):
        super().__init__()
        self.input_stage, self.network = input_stage, network
        self.has_mapping = mapping is not None
        self.register_buffer("mapping", mapping if mapping is not None else torch.zeros(0, dtype=torch.long))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.network(self.input_stage(images))
        return logits.index_select(1, self.mapping) if self.has_mapping else logits


def onnx_pipeline(folded: nn.Module, meta: dict, slim: bool = False) -> InferencePipeline:
    if slim:
        from vpns_fast.deploy.slim import slim_model

        folded, _, _ = slim_model(folded)
    stage = InputStage(meta.get("prompt"), meta.get("use_prompt", False), meta["normalization"]["mean"],
                       meta["normalization"]["std"])
    return InferencePipeline(stage, folded, _mapping_tensor(meta)).eval()


def image_shape_of(meta: dict) -> tuple[int, int]:
    """``(H, W)`` of the images a file's pipeline takes: its prompt's input size when it uses one, else its
    ``input_size`` (which need not be square: a checkpoint saved with ``input_size=(3, 97, 131)``), else the
    model's default."""
    if meta.get("use_prompt") and meta.get("prompt"):
        side = int(meta["prompt"]["in_size"])
        return side, side
    if meta.get("input_size"):
        height, width = (int(side) for side in meta["input_size"][-2:])
        return height, width
    from vpns_fast.models import default_input_size

    side = default_input_size(meta["model"]["name"])
    return side, side


class OnnxExporterFallbackWarning(UserWarning):
    """The torch.export-based ONNX exporter could not export the pipeline; the file was written by
    the TorchScript exporter instead. The message carries the reason (exception type and first line)."""


def _dynamo_graph(pipeline: nn.Module, example: torch.Tensor, opset: int):
    """The ONNX ModelProto from ``torch.onnx.export(dynamo=True)``, batch axis dynamic; only public
    arguments that torch documents from 2.6 on. ``f=None`` returns the ONNXProgram without writing
    a file (given a path it would also write the weights to an external ``.data`` file beside it)."""
    program = torch.onnx.export(pipeline, (example,), input_names=["images"], output_names=["logits"],
                                opset_version=opset, dynamo=True, verbose=False,
                                dynamic_shapes=({0: torch.export.Dim("batch")},))
    return program.model_proto


def _torchscript_graph(pipeline: nn.Module, example: torch.Tensor, opset: int):
    """The ONNX ModelProto from the TorchScript exporter (``dynamo=False``), batch axis dynamic."""
    import io

    import onnx

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # Its deprecation notices and constant-folding notes (three on a prompted small_resnet)
        # only, so the fallback's one-line reason is not buried; tracer warnings (a trace that may
        # not generalize to other inputs) stay visible.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message="Constant folding - ", category=UserWarning)
        torch.onnx.export(pipeline, (example,), buffer, input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset,
                          dynamo=False)
    return onnx.load_from_string(buffer.getvalue())


def _onnx_graph(pipeline: nn.Module, example: torch.Tensor, opset: int):
    """``(ModelProto, fallback reason or None)``: the torch.export-based exporter first, the
    TorchScript one only where the first cannot export (reason: exception type and first line).

    Measured (wall time of the exporter call: first call in a fresh process, then repeats; 10
    classes, channel masks; torch 2.14.1, onnxscript 0.7.2, 2-core CPU shared with other jobs, load
    1-3): small_resnet at 32x32: TorchScript 1.5 s, then 0.4 s; torch.export-based 4.4 s, then 2.1 s.
    resnet18 at 224x224: TorchScript 3.3 s, then 1.2-1.4 s; torch.export-based 9.3 s, then 5.3-5.5 s
    (at load 5 both took about 1.5x as long). The new path is 3-5x slower (torch.export tracing, then
    onnxscript's optimizer): seconds per file, once per deployment, for the maintained exporter.
    """
    import onnx

    reason = None
    if opset < _DYNAMO_MIN_OPSET:
        reason = f"opset {opset} requested; the torch.export-based exporter writes opset {_DYNAMO_MIN_OPSET} or later"
    else:
        try:
            import onnxscript  # noqa: F401  (the new exporter's translation library)
        except ImportError:
            reason = "onnxscript is not installed (pip install vpns_fast[onnx] installs it)"
    if reason is None:
        try:
            model = _dynamo_graph(pipeline, example, opset)
            onnx.checker.check_model(model)
            return model, None
        except Exception as exc:  # any failure of the new path is a reason to try the old one, reported
            reason = exception_reason(exc, 300)
    try:
        return _torchscript_graph(pipeline, example, opset), reason
    except Exception as exc:
        raise RuntimeError(f"ONNX export failed with both exporters: torch.export-based: {reason}; TorchScript: "
                           f"{exception_reason(exc, 300)}") from exc


def onnx_model(network: nn.Module, example: torch.Tensor, opset: int = ONNX_OPSET):
    """``(onnx.ModelProto, fallback reason or None)`` of ``network`` (batch axis dynamic), in memory:
    the torch.export-based exporter, or the TorchScript one where that cannot export (see
    :func:`_onnx_graph`). What :func:`export` writes and the benchmarks' ONNX Runtime baseline runs."""
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 7:
        raise ValueError(f"opset must be an integer >= 7 (default {ONNX_OPSET}), got {opset!r}")
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        # nn.MultiheadAttention's inference fast path (aten::_native_multi_head_attention) has no
        # TorchScript symbolic (the torch.export path exports a ViT either way): both exporters
        # trace the plain composite path, the same computation.
        torch.backends.mha.set_fastpath_enabled(False)
        with torch.no_grad():
            return _onnx_graph(network, example, opset)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _export_onnx(folded: nn.Module, meta: dict, path: str, force: bool, slim: bool, opset: int) -> None:
    try:
        import onnx
    except ImportError as exc:
        raise MissingDependencyError("ONNX export needs the onnx package: pip install vpns_fast[onnx] "
                                     "(or pip install onnx)") from exc
    pipeline = onnx_pipeline(folded, meta, slim)
    height, width = image_shape_of(meta)
    model, reason = onnx_model(pipeline, torch.rand(2, 3, height, width, dtype=torch.float32), opset)
    meta.update(exporter="torch.export" if reason is None else "torchscript", exporter_fallback_reason=reason)
    onnx_meta = dict(meta, slim=slim, image_size=height if height == width else [height, width],
                     input="float32 images in [0, 1], (B, 3, H, W)")
    onnx_meta.pop("prompt", None)  # the program is baked into the graph
    entry = model.metadata_props.add()
    entry.key, entry.value = "vpns_fast.meta", json.dumps(onnx_meta, sort_keys=True, default=_json_default)
    onnx.checker.check_model(model)
    atomic_write_bytes(model.SerializeToString(), path, overwrite=force)
    if reason is not None:
        # at the caller's line, so Python's default filter shows it once per call site
        warnings.warn(f"ONNX export of {path} fell back to the TorchScript exporter: {reason}",
                      OnnxExporterFallbackWarning, stacklevel=caller_stacklevel())

"""A job's settings from a file (``vpns prune --config FILE``): JSON, or YAML when PyYAML is installed, with the
keys of the ``config.json`` a run writes, i.e. the fields of :class:`TrainConfig`. The accepted keys and their
types are read from the dataclass, so a field added to it is accepted here without further code."""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import types
import typing
from typing import Any

from vpns_fast.errors import SettingError
from vpns_fast.training.config import OBJECT_KEY, RUN_DATA_KEY, TrainConfig

YAML_SUFFIXES = (".yaml", ".yml")
# Settings merged key by key with the file's (a flag `--lr finetune_weights=0.05` changes that one rate and
# keeps the file's other optimizer settings); every other key is replaced whole.
MERGED_KEYS = ("optimizers", "model_kwargs")


def config_from_file(path: str, overrides: dict | None = None) -> TrainConfig:
    """The :class:`TrainConfig` of the settings in ``path``, with ``overrides`` (fields set on the command line)
    taking precedence; keys the file leaves out keep the dataclass's defaults. A one-line ``ValueError`` naming
    the file and the key for an unknown key, a value of the wrong type, or one out of its range."""
    return config_from_settings(path, read_config_file(path), overrides)


def config_from_settings(path: str, settings: dict, overrides: dict | None = None) -> TrainConfig:
    """:func:`config_from_file` of the ``settings`` :func:`read_config_file` read from ``path``: a caller that keeps
    them can name the file in a later refusal too (:func:`named_by_file`: the command line, for the data stage's)."""
    values, overrides = dict(settings), overrides or {}
    if "model" not in overrides and isinstance(values.get("model"), str):
        # the file names the network: a factory it names is code (models.check_file_model_name)
        from vpns_fast.models import check_file_model_record

        check_file_model_record(values["model"], values.get("model_kwargs"), f"--config {path}")
    _check_names(path, {key: value for key, value in values.items() if key not in overrides})
    for key, value in overrides.items():
        if key in MERGED_KEYS and isinstance(values.get(key), dict):
            values[key] = _merged(key, values[key], value)
        else:
            values[key] = value
    try:
        return TrainConfig(**values)
    except TypeError as exc:  # a value of the right JSON type but the wrong shape, deep inside a setting
        raise ValueError(f"--config {path}: {exc}") from None
    except SettingError as exc:  # a value out of range: named with the file where the file set it
        raise named_by_file(exc, path, settings, overrides) from None


def named_by_file(error: SettingError, path: str, settings: dict, overrides: dict) -> Exception:
    """``error`` told with the file (``--config PATH: field: reason``) where the file's ``settings`` set what it
    refuses and the ``overrides`` (flags) did not; else ``error`` itself, for the caller to name."""
    if error.field in settings and not _overrides_set(error, overrides):
        return ValueError(f"--config {path}: {error}")
    return error


def _overrides_set(error: SettingError, overrides: dict) -> bool:
    """Whether the overrides (flags) set what ``error`` refuses: its field, and within a merged key the part it
    names (an optimizer group's lr that a flag set, not one the file set beside a flag's other setting)."""
    if error.field not in overrides:
        return False
    value = overrides[error.field]
    for name in error.part if error.field in MERGED_KEYS else ():
        if not isinstance(value, dict) or name not in value:
            return False
        value = value[name]
    return True


def read_config_file(path: str) -> dict:
    """The settings in ``path``, checked: an object whose every key is a :class:`TrainConfig` field and every
    value of that field's type (a list for a tuple field, an integer where a number is expected)."""
    data = _load(path)
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected an object of settings (the keys of a run's config.json), "
                         f"got {_json_type(data)}")
    # what a run's config.json records beside its settings (its data's fingerprint): not a setting to rerun with
    data = {key: value for key, value in data.items() if key != RUN_DATA_KEY}
    hints = field_types()
    unknown = [key for key in data if key not in hints]
    if unknown:
        raise ValueError(f"--config {path}: " + "; ".join(_unknown_key(str(key), hints) for key in unknown))
    values = {}
    for key, value in data.items():
        try:
            values[key] = _checked(key, value, hints[key])
        except ValueError as exc:
            raise ValueError(f"--config {path}: {exc}") from None
    return values


def _check_names(path: str, values: dict) -> None:
    """The dataset and device the file names (and no flag replaces) exist here, before any work."""
    from vpns_fast.data import canonical_dataset_name
    from vpns_fast.environment import resolve_device

    try:
        if isinstance(values.get("dataset"), str):
            try:
                canonical_dataset_name(values["dataset"])
            except ValueError as exc:
                raise ValueError(f"dataset: {str(exc).removeprefix('name: ')}") from None
        if "device" in values:
            resolve_device(values["device"])
    except ValueError as exc:
        raise ValueError(f"--config {path}: {exc}") from None


def field_types() -> dict[str, Any]:
    """Each :class:`TrainConfig` field and its type (the annotations evaluated)."""
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig)}


def _load(path: str) -> Any:
    if os.path.isdir(path):
        raise ValueError(f"--config {path}: is a folder; expected a settings file (e.g. OUT/config.json)")
    if not os.path.exists(path):
        raise ValueError(f"--config {path}: no such file")
    if path.lower().endswith(YAML_SUFFIXES):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"--config {path}: reading YAML needs PyYAML (pip install pyyaml); or write the "
                             "settings as JSON") from None
        try:
            with open(path, encoding="utf-8") as f:
                return yaml.safe_load(f)
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ValueError(f"--config {path}: not valid YAML ({_one_line(exc)})") from None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"--config {path}: not valid JSON ({_one_line(exc)}); YAML files must end in .yaml or "
                         ".yml") from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _unknown_key(key: str, hints: dict) -> str:
    close = difflib.get_close_matches(key, list(hints), n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"the keys are the fields of TrainConfig: {', '.join(hints)}"
    return f"unknown key {key!r} ({hint})"


def _checked(key: str, value: Any, hint: Any) -> Any:
    """``value`` as the field takes it (lists become tuples for tuple fields); ValueError when it does not fit."""
    if isinstance(value, dict) and OBJECT_KEY in value:
        raise ValueError(f"{key}: the run was given its {key} as a Python object ({value[OBJECT_KEY]}), which a "
                         f"file cannot rebuild; set {key} to a name, or run it from Python")
    item = _bare_item_hint(hint)
    if item is not None and not isinstance(value, (list, tuple)) and _fits(value, item):
        return (value,)  # one method or density given bare, as TrainConfig takes it
    if not _fits(value, hint):
        shown = "" if value is None else f" {value!r}"
        raise ValueError(f"{key}: expected {_expected(hint)}, got {_json_type(value)}{shown}"[:300])
    if tuple in (hint, typing.get_origin(hint)):
        return tuple(value)
    return value


def _bare_item_hint(hint: Any) -> Any:
    """The item type of a ``tuple[X, ...]`` field (whose one item may be given bare), else None."""
    args = typing.get_args(hint)
    return args[0] if typing.get_origin(hint) is tuple and len(args) == 2 and args[1] is Ellipsis else None


def _fits(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arm) for arm in typing.get_args(hint))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    if origin in (tuple, list) or hint in (tuple, list):
        args = typing.get_args(hint)
        item = args[0] if len(args) == 1 or (len(args) == 2 and args[1] is Ellipsis) else Any
        return isinstance(value, (list, tuple)) and all(_fits(v, item) for v in value)
    return isinstance(value, origin or hint) if isinstance(origin or hint, type) else True


def _expected(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_expected(arm) for arm in typing.get_args(hint))
    if origin in (tuple, list):
        item = _expected(typing.get_args(hint)[0])
        listed = f"a list of {item.removeprefix('a ').removeprefix('an ')}s"
        return f"{item} or {listed}" if _bare_item_hint(hint) is not None else listed
    names = {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string",
             dict: "an object"}
    return names.get(origin or hint, str(hint))


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             tuple: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def _merged(key: str, base: dict, update: dict) -> dict:
    merged = {name: dict(spec) if isinstance(spec, dict) else spec for name, spec in base.items()}
    for name, spec in update.items():
        if key == "optimizers" and isinstance(merged.get(name), dict):
            merged[name].update(spec)
        else:
            merged[name] = spec
    return merged

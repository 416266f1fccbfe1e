"""The configuration of a pruning job: every method x density it runs, and how (see docs/method.md)."""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from vpns_fast.data import DataSplits, canonical_dataset_name, check_fraction
from vpns_fast.errors import SettingError
from vpns_fast.models import default_input_size
from vpns_fast.nn.masked_layers import GRANULARITIES, SCORE_INITS
from vpns_fast.nn.prompts import PROMPTS, build_prompt
from vpns_fast.pruning.methods import METHODS, get_method

PROTOCOLS = ("release", "prompted")
AMP_MODES = ("none", "bf16", "fp16")
OPTIMIZER_GROUPS = ("search_scores", "search_prompt", "hydra_scores", "finetune_weights", "finetune_prompt",
                    "pretrain")


def default_optimizers() -> dict[str, dict]:
    """The method's defaults (docs/method.md): Adam 1e-4 for stage-1 scores and prompt, SGD 0.01 for
    HYDRA's scores and for stage 2; weight decay 1e-4 everywhere; cosine schedules per epoch."""
    adam = {"name": "adam", "lr": 1e-4, "momentum": 0.0, "weight_decay": 1e-4}
    sgd = {"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4}
    return {"search_scores": dict(adam), "search_prompt": dict(adam), "hydra_scores": dict(sgd),
            "finetune_weights": dict(sgd), "finetune_prompt": dict(sgd),
            "pretrain": dict(sgd, lr=0.1)}


# A network or dataset passed as a Python object has no JSON form: config.json keeps this description.
OBJECT_KEY = "python_object"
WEIGHTS_KEY = "weights_sha256"
# the key of a run's config.json that records its data (DataSplits.fingerprint), beside the settings
RUN_DATA_KEY = "data"


@dataclass(frozen=True)
class PythonObject:
    """What config.json records of a model or dataset passed as an object: its type. A run directory whose
    config holds one is resumed from Python with the same object (``resume(out, model=..., dataset=...)``),
    not from the command line."""
    field: str
    description: str
    # a module's state (parameters and buffers) when the run started, by payload_sha256: resuming with a module of
    # other weights pruned the later runs from other dense weights, without a word (an outside review)
    weights_sha256: str | None = None

    def to_json(self) -> dict:
        return {OBJECT_KEY: self.description, **({WEIGHTS_KEY: self.weights_sha256} if self.weights_sha256 else {})}


def describe_object(value: Any) -> str:
    """``package.module.Class`` of an object, or of each dataset in a list, tuple or dict of them."""
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(describe_object(v) for v in value) + ")"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {describe_object(v)}" for k, v in value.items()) + "}"
    if value is None:
        return "None"
    return f"{type(value).__module__}.{type(value).__qualname__}"


def dataset_parts(dataset: Any) -> tuple[Dataset, Dataset | None, Dataset | None]:
    """(train, val, test) of the dataset forms TrainConfig takes besides a name and a DataSplits."""
    if isinstance(dataset, Dataset):
        return dataset, None, None
    if isinstance(dataset, dict) and set(dataset) <= {"train", "val", "test"} and "train" in dataset:
        return dataset["train"], dataset.get("val"), dataset.get("test")
    if isinstance(dataset, (list, tuple)) and 1 <= len(dataset) <= 3:
        parts = list(dataset) + [None] * (3 - len(dataset))
        if all(part is None or isinstance(part, Dataset) for part in parts) and isinstance(parts[0], Dataset):
            return parts[0], parts[1], parts[2]
    raise SettingError("dataset", f"expected a dataset name, a DataSplits, a torch.utils.data.Dataset, or "
                       f"(train, val, test) datasets (a tuple, or a dict with train / val / test), got "
                       f"{describe_object(dataset)}")


# YAML reads 1e-4 (no dot) as a string (PyYAML follows YAML 1.1): the likeliest way to write the default lr wrongly.
_NUMBER_AS_TEXT = " (text, not a number: YAML reads 1e-4 as text; write 1.0e-4)"


def _reads_as_number(value: Any) -> bool:
    try:
        return isinstance(value, str) and math.isfinite(float(value))
    except ValueError:
        return False


# Fields that hold an integer (None allowed for those in _OPTIONAL_FIELDS; num_classes is checked with the dataset).
_INTEGER_FIELDS = ("search_epochs", "finetune_epochs", "pretrain_epochs", "hydra_epochs", "batch_size", "seed",
                   "split_seed", "prompt_size", "image_size", "input_size", "limit", "num_workers")
_OPTIONAL_FIELDS = ("hydra_epochs", "prompt_size", "image_size", "input_size", "limit")


@dataclass
class TrainConfig:
    """The job's settings. ``model``: a model name (vpns_fast.models.MODEL_NAMING) or an ``nn.Module`` (dense, not
    yet sparsified; copied, never modified), with ``model_kwargs`` for the builder of a name. ``dataset``: a name
    (vpns_fast.data.DATASETS), a ``DataSplits``, or a ``torch.utils.data.Dataset`` / (train, val, test) datasets
    with ``num_classes`` (items as vpns_fast.data's module doc describes). config.json records an object by its
    type only (:class:`PythonObject`), so such a run is resumed from Python, given the object again."""
    dataset: Any = "digits"
    data_dir: str | None = None
    download: bool = False
    model: Any = "small_resnet"
    weights: str | None = None          # a weights file, or "pretrained" (torchvision weights)
    model_kwargs: dict = field(default_factory=dict)  # architecture arguments for the builder of a model name
    num_classes: int | None = None      # the classes of a dataset passed as Dataset objects (else None or the
                                        # dataset's own count: another is refused when the data is loaded)
    methods: tuple[str, ...] = ("vpns",)
    densities: tuple[float, ...] = (0.1,)
    search_epochs: int = 30             # stage 1
    finetune_epochs: int = 30           # stage 2 (and each IMP round)
    pretrain_epochs: int = 0            # dense training from scratch when no weights are given
    hydra_epochs: int | None = None     # HYDRA's epochs per stage, if not those above (paper: 60)
    batch_size: int = 256
    seed: int = 7
    split_seed: int = 0                 # the val split stays the same across seeds
    protocol: str = "release"
    device: str = "auto"
    amp: str = "none"
    channels_last: bool = False
    deterministic: bool = False
    prompt: str = "pad"
    prompt_size: int | None = None      # pad width / square side; default 16 at 224, scaled
    image_size: int | None = None       # data size = prompt in_size; default the network input
    input_size: int | None = None       # network input = prompt out_size; default the model's
    label_mapping: str = "auto"         # flm | ilm | none | auto (flm for a kept source head)
    scope: str = "global"
    hydra_scope: str = "layer"
    granularity: str = "unstructured"
    structured: bool = False            # structured channel mode (ResNets, VGGs; granularity "channel")
    score_init: str = "scaled"
    schedule: str = "cosine"
    optimizers: dict = field(default_factory=default_optimizers)
    imp_rate: float = 0.2
    val_fraction: float = 0.1
    limit: int | None = None
    num_workers: int = 0
    keep_checkpoints: str = "last"      # last | all (one file per phase and epoch)
    mask_from: str | None = None        # checkpoint whose masks the transfer methods impose
    progress: bool = True
    logger: Any = ()                    # tensorboard, wandb, both (a list or "a,b"); metrics.csv is always written
    out: str | None = None

    def __post_init__(self):
        self._check_types()
        self._check_model_and_dataset()
        # a module's starting weights, hashed once (every checkpoint records the config); None where the run
        # starts from a weights file instead, or the module has lazy parameters not yet initialized
        self._starting_weights_sha256 = (module_weights_sha256(self.model) if isinstance(self.model, nn.Module)
                                         and self.weights is None else None)
        for m in self.methods:
            if m not in METHODS:  # get_method's own refusal names no field (a config file or flag could not be told)
                raise SettingError("methods", f"expected methods among {', '.join(METHODS)}, got {m!r}")
            if get_method(m).mask == "fixed" and self.mask_from is None:
                raise SettingError("methods", f"method {m!r} needs mask_from, the checkpoint whose masks it "
                                   f"fine-tunes (`vpns transfer CHECKPOINT` gives it)")
        if not self.methods:
            raise SettingError("methods", "expected at least one method")
        if not self.densities:  # an empty list ran nothing and reported success (an outside review)
            raise SettingError("densities", "expected at least one density")
        if not 0 < self.imp_rate < 1:  # checked when IMP's rounds were planned, after config.json was written
            raise SettingError("imp_rate", f"expected a number in (0, 1), got {self.imp_rate}")
        for d in self.densities:
            if not 0 < d <= 1:
                raise SettingError("densities", f"expected densities in (0, 1], got {d}")
        folders = [f"{d:g}" for d in self.densities]  # each density is one run folder, runs/<method>_d<density:g>
        repeated = sorted({name for name in folders if folders.count(name) > 1})
        if repeated:
            raise SettingError("densities", f"{', '.join(repeated)} given more than once; list each density once")
        checks = {"protocol": (self.protocol, PROTOCOLS), "amp": (self.amp, AMP_MODES),
                  "scope": (self.scope, ("global", "layer")), "hydra_scope": (self.hydra_scope, ("global", "layer")),
                  "granularity": (self.granularity, GRANULARITIES),
                  "label_mapping": (self.label_mapping, ("auto", "flm", "ilm", "none")),
                  "schedule": (self.schedule, ("cosine", "constant")),
                  "score_init": (self.score_init, SCORE_INITS), "prompt": (self.prompt, tuple(PROMPTS)),
                  "keep_checkpoints": (self.keep_checkpoints, ("last", "all"))}
        for name, (value, allowed) in checks.items():
            if value not in allowed:
                raise SettingError(name, f"expected one of {allowed}, got {value!r}")
        if self.structured and self.granularity != "channel":
            raise SettingError("structured", f"needs granularity='channel' (--granularity channel), got "
                               f"{self.granularity!r}")
        # The ranges, each refused here only: the CLI names the flag that set the field, a config file the file.
        for name in ("search_epochs", "finetune_epochs", "pretrain_epochs", "hydra_epochs", "num_workers"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise SettingError(name, f"expected an integer >= 0, got {getattr(self, name)}")
        if self.batch_size < 1:
            raise SettingError("batch_size", f"expected an integer >= 1, got {self.batch_size}")
        check_fraction(self.val_fraction, "val_fraction")
        for name in ("input_size", "image_size", "prompt_size"):  # 0 was read as "the default" (an outside review)
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise SettingError(name, f"expected an integer >= 1, got {getattr(self, name)}")
        # seeds that differed only above 32 bits drew the same split (torch's CPU generator keeps 32 bits of a
        # seed), and 2**64 overflowed in torch (an outside review)
        if not 0 <= self.split_seed < 2**32:
            raise SettingError("split_seed", f"expected an integer in [0, 2**32), got {self.split_seed}")
        if self.limit is not None and self.limit < 1:
            raise SettingError("limit", f"expected an integer >= 1, got {self.limit}")
        merged = default_optimizers()
        for group, spec in dict(self.optimizers).items():
            if group not in merged:
                raise SettingError("optimizers", f"unknown optimizer group {group!r}; groups are {OPTIMIZER_GROUPS}",
                                   (group,))
            if not isinstance(spec, dict):
                raise SettingError("optimizers", f"{group}: expected a dict such as {{'name': 'sgd', 'lr': 0.01}}, "
                                   f"got {spec!r}", (group,))
            for key in spec:  # a typo ("learning_rate") had been kept and never used
                if key not in merged[group]:
                    raise SettingError("optimizers", f"unknown key {key!r} for {group}; the keys are "
                                       f"{', '.join(merged[group])}", (group, key))
            merged[group].update(spec)
            if merged[group]["name"] not in ("sgd", "adam", "adamw"):
                raise SettingError("optimizers", f"the optimizer for {group} must be sgd, adam or adamw, got "
                                   f"{merged[group]['name']!r}", (group, "name"))
            for key in ("lr", "momentum", "weight_decay"):
                value = merged[group][key]
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                    raise SettingError("optimizers", f"{key} of {group}: expected a finite number >= 0, got "
                                       f"{value!r}{_NUMBER_AS_TEXT if _reads_as_number(value) else ''}",
                                       (group, key))
        self.optimizers = merged
        self.logger = logger_names(self.logger)
        if "tensorboard" in self.logger and self.out is None:
            raise SettingError("logger", "tensorboard writes its event files under out; set out (--out)")
        self._check_geometry()

    def _check_types(self) -> None:
        """Each field's type, before any range: a wrong one had raised TypeError deep inside a check, or passed and
        failed at run() ("1.5 epochs"), or trained ("x" as a seed). Integers may be any integral number (numpy's
        too, kept as int); one method or density may be given bare."""
        for name in _INTEGER_FIELDS:
            value = getattr(self, name)
            if value is None and name in _OPTIONAL_FIELDS:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise SettingError(name, f"expected an integer{' or None' if name in _OPTIONAL_FIELDS else ''}, got "
                                   f"{value!r}")
            setattr(self, name, int(value))
        if isinstance(self.imp_rate, bool) or not isinstance(self.imp_rate, numbers.Real):  # val_fraction: below
            raise SettingError("imp_rate", f"expected a number, got {self.imp_rate!r}")
        # one method or density given bare: "vpns" had been read as the methods 'v', 'p', ... and 0.2 had raised
        # "'float' object is not iterable" (an outside review)
        if isinstance(self.methods, str):
            self.methods = (self.methods,)
        if isinstance(self.densities, numbers.Real) and not isinstance(self.densities, bool):
            self.densities = (self.densities,)
        for name, kind, word in (("methods", str, "a string"), ("densities", numbers.Real, "a number")):
            items = getattr(self, name)
            if isinstance(items, (str, bytes)) or not isinstance(items, (list, tuple)) or not all(
                    isinstance(item, kind) and not isinstance(item, bool) for item in items):
                raise SettingError(name, f"expected {word} or a list of them, got {items!r}")
        self.methods, self.densities = tuple(self.methods), tuple(float(d) for d in self.densities)
        if not isinstance(self.optimizers, dict):
            raise SettingError("optimizers", f"expected a dict of optimizer groups, got {self.optimizers!r}")

    def _check_model_and_dataset(self) -> None:
        if isinstance(self.model, nn.Module):
            if self.weights == "pretrained":
                raise SettingError("weights", "'pretrained' needs a model name; for a module, pass a weights file or "
                                   "load its weights yourself")
        elif not isinstance(self.model, (str, PythonObject)):
            raise SettingError("model", f"expected a model name or an nn.Module, got {describe_object(self.model)}")
        if not isinstance(self.model_kwargs, dict):
            raise SettingError("model_kwargs", f"expected a dict, got {type(self.model_kwargs).__name__}")
        if self.model_kwargs and not isinstance(self.model, str):
            raise SettingError("model_kwargs", "only a model name takes architecture arguments")
        if isinstance(self.dataset, str):
            try:
                canonical_dataset_name(self.dataset)
            except ValueError as exc:  # named "name:" by the data module, and only once the job loaded its data
                raise SettingError("dataset", str(exc).removeprefix("name: ")) from None
            return
        if isinstance(self.dataset, (DataSplits, PythonObject)):
            return
        dataset_parts(self.dataset)
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise SettingError("num_classes", f"a dataset passed as Dataset objects needs its number of classes (an "
                               f"integer >= 1), got {self.num_classes!r}")

    def _check_geometry(self) -> None:
        """Prompt and image sizes, checked before anything is written or trained."""
        input_size = self.network_input_size()  # also rejects unknown models
        image_size = self.data_image_size()
        if image_size > input_size:
            raise SettingError("image_size", f"{image_size} must not exceed the network input_size ({input_size})")
        if not any(get_method(m).prompt_in_search or get_method(m).prompt_in_finetune for m in self.methods):
            return
        if self.protocol == "release" and image_size != input_size:
            raise SettingError("protocol", f"'release' feeds its unprompted steps and its evaluation the images as "
                               f"they are, so image_size ({image_size}) must equal input_size ({input_size}); use "
                               f"protocol 'prompted' to place smaller images inside a prompt")
        if self.prompt == "expansive" and image_size == input_size:
            raise SettingError("prompt", "the expansive prompt fills the ring around a smaller image: set image_size "
                               f"below input_size ({input_size}), with protocol 'prompted'")
        try:
            build_prompt(self.prompt, input_size, image_size, self.pad_prompt_size())
        except ValueError as exc:  # the prompt's own check ("pad must be ...") named neither flag nor file
            raise SettingError("prompt_size", str(exc)) from None

    def network_input_size(self) -> int:
        """The network's input side (the prompt's output): ``input_size``, or the model's own (224 for a module
        passed as an object)."""
        if self.input_size:
            return self.input_size
        return default_input_size(self.model) if isinstance(self.model, str) else 224

    def data_image_size(self) -> int:
        """The side of the images the data loaders yield (the prompt's input)."""
        return self.image_size or self.network_input_size()

    def pad_prompt_size(self) -> int:
        """Pad width / square side: ``prompt_size``, or the release's p = 16 at 224, scaled to the input."""
        return self.prompt_size or max(1, round(16 * self.network_input_size() / 224))

    @property
    def starting_weights_sha256(self) -> str | None:
        """:func:`module_weights_sha256` of a model passed as a module, hashed once when the config was made; None
        for a model name, a run that starts from ``weights``, or a module with lazy parameters."""
        return self._starting_weights_sha256

    def model_description(self) -> str:
        return self.model if isinstance(self.model, str) else _described(self.model, "model").description

    def dataset_description(self) -> str:
        return self.dataset if isinstance(self.dataset, str) else _described(self.dataset, "dataset").description

    def to_dict(self) -> dict:
        """The config as JSON data; a model or dataset passed as an object becomes ``{"python_object": type}``."""
        # not dataclasses.asdict: it deep-copies every field, a whole network or dataset included
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("model", "dataset"):
            if not isinstance(data[name], str):
                data[name] = _described(data[name], name, self.starting_weights_sha256 if name == "model"
                                        else None).to_json()
        return json.loads(json.dumps(data))

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """The config of ``to_dict``'s data; an object's description comes back as a :class:`PythonObject`."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        for name in ("input_size", "image_size", "prompt_size"):
            if values.get(name) == 0:  # written before 0 was refused, when it meant the default: resumes as such
                values[name] = None
        for name in ("model", "dataset"):
            if isinstance(values.get(name), dict) and OBJECT_KEY in values[name]:
                recorded = values[name].get(WEIGHTS_KEY)
                values[name] = PythonObject(name, str(values[name][OBJECT_KEY]),
                                            recorded if isinstance(recorded, str) else None)
        return cls(**values)

    def identity(self) -> dict:
        """What must match for a run directory to be resumed (not presentation options)."""
        data = self.to_dict()
        for key in ("progress", "out", "num_workers", "keep_checkpoints", "logger"):
            data.pop(key)
        if isinstance(data["model"], dict):  # folders written before modules' weights were hashed have none:
            data["model"].pop(WEIGHTS_KEY, None)  # the same run still (resume checks the weights themselves)
        return data


LOGGERS = ("tensorboard", "wandb")


def logger_names(value: Any) -> tuple[str, ...]:
    """``TrainConfig.logger`` as a tuple of names: a name, comma-separated names or a list of them; None or
    "none" for none (metrics.csv is written either way)."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(item, str) for item in items):
        raise SettingError("logger", f"expected a name, comma-separated names or a list of names "
                           f"({', '.join(LOGGERS)}), got {value!r}")
    names = tuple(dict.fromkeys(item.strip() for item in items if item.strip() and item.strip() != "none"))
    for name in names:
        if name not in LOGGERS:
            raise SettingError("logger", f"unknown logger {name!r}; expected {' or '.join(LOGGERS)} (or none)")
    return names


def _described(value: Any, name: str, weights_sha256: str | None = None) -> PythonObject:
    return value if isinstance(value, PythonObject) else PythonObject(name, describe_object(value), weights_sha256)


def module_weights_sha256(module: nn.Module) -> str | None:
    """sha256 of a module's parameters and buffers (each one's name, dtype, shape and bytes); None while it has
    lazy parameters not yet initialized (nn.LazyLinear before its first forward)."""
    from torch.nn.parameter import is_lazy

    from vpns_fast.pruning.checkpoint import payload_sha256

    if any(is_lazy(tensor) for tensor in module.state_dict().values()):
        return None
    return payload_sha256({"state_dict": module.state_dict()})

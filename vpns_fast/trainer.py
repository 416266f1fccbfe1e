"""The two-stage trainer (SPEC §2) and the baselines on the same footing (SPEC §3).

For each method x density a *run* starts from the dense weights and walks through *phases*:
``search`` (stage 1: scores [+ prompt] learn, weights and norm affine frozen, threshold
recomputed after every optimizer step) and ``finetune`` (stage 2: mask fixed, weights, norm
affine [+ prompt] learn). IMP is a chain of finetune phases with magnitude pruning and
rewinding between them. Every epoch ends with an evaluation (with and without the prompt) and
an atomic checkpoint; each epoch reseeds every RNG from (seed, run, phase, epoch), so resuming
from a checkpoint replays the same steps.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import shutil
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vpns_fast import distributed as dist_utils
from vpns_fast.baselines import (
    Method, apply_imp_round, get_method, imp_densities, magnitude_scores, random_scores,
)
from vpns_fast.checkpoint import atomic_save, atomic_write, load_checkpoint, save_checkpoint
from vpns_fast.data import DataSplits, load_dataset, make_loader
from vpns_fast.environment import resolve_device
from vpns_fast.evaluation import PromptedNetwork, count_correct
from vpns_fast.label_mapping import LabelMapping
from vpns_fast.masked_layers import GRANULARITIES
from vpns_fast.models import build_model, default_input_size, source_num_classes
from vpns_fast.ops import IMAGENET_MEAN, IMAGENET_STD
from vpns_fast.prompts import build_prompt
from vpns_fast.pruning import (
    actual_density, density_report, load_masks, masked_layers, parameter_groups, prepare_finetune, prepare_mask_search, set_density,
    sparsify,
)

PROTOCOLS = ("release", "prompted")
AMP_MODES = ("none", "bf16", "fp16")
OPTIMIZER_GROUPS = ("search_scores", "search_prompt", "hydra_scores", "finetune_weights", "finetune_prompt",
                    "pretrain")


def default_optimizers() -> dict[str, dict]:
    """SPEC §2-§3 defaults: Adam 1e-4 for stage-1 scores and prompt, SGD 0.01 for HYDRA's
    scores and for stage 2; weight decay 1e-4 everywhere; cosine schedules per epoch."""
    adam = {"name": "adam", "lr": 1e-4, "momentum": 0.0, "weight_decay": 1e-4}
    sgd = {"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4}
    return {"search_scores": dict(adam), "search_prompt": dict(adam), "hydra_scores": dict(sgd),
            "finetune_weights": dict(sgd), "finetune_prompt": dict(sgd),
            "pretrain": dict(sgd, lr=0.1)}


@dataclass
class TrainConfig:
    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    model: str = "small_resnet"
    weights: str | None = None          # a weights file, or "pretrained" (torchvision weights)
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
    structured: bool = False            # SPEC §4 structured channel mode (ResNets, VGGs; granularity "channel")
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
    out: str | None = None

    def __post_init__(self):
        self.methods = tuple(self.methods)
        self.densities = tuple(float(d) for d in self.densities)
        for m in self.methods:
            if get_method(m).mask == "fixed" and self.mask_from is None:
                raise ValueError(f"method {m!r} needs mask_from, the checkpoint whose masks it fine-tunes")
        if not self.methods:
            raise ValueError("methods must name at least one method")
        for d in self.densities:
            if not 0 < d <= 1:
                raise ValueError(f"density must be in (0, 1], got {d}")
        checks = {"protocol": (self.protocol, PROTOCOLS), "amp": (self.amp, AMP_MODES),
                  "scope": (self.scope, ("global", "layer")), "hydra_scope": (self.hydra_scope, ("global", "layer")),
                  "granularity": (self.granularity, GRANULARITIES),
                  "label_mapping": (self.label_mapping, ("auto", "flm", "ilm", "none")),
                  "schedule": (self.schedule, ("cosine", "constant")),
                  "keep_checkpoints": (self.keep_checkpoints, ("last", "all"))}
        for name, (value, allowed) in checks.items():
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if self.structured and self.granularity != "channel":
            raise ValueError(f"structured=True needs granularity='channel', got {self.granularity!r}")
        for name in ("search_epochs", "finetune_epochs", "pretrain_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        merged = default_optimizers()
        for group, spec in dict(self.optimizers).items():
            if group not in merged:
                raise ValueError(f"unknown optimizer group {group!r}; groups are {OPTIMIZER_GROUPS}")
            merged[group].update(spec)
            if merged[group]["name"] not in ("sgd", "adam", "adamw"):
                raise ValueError(f"optimizer for {group} must be sgd, adam or adamw, got {merged[group]['name']!r}")
        self.optimizers = merged
        self._check_geometry()

    def _check_geometry(self) -> None:
        """Prompt and image sizes, checked before anything is written or trained."""
        if self.hydra_epochs is not None and self.hydra_epochs < 0:
            raise ValueError(f"hydra_epochs must be >= 0, got {self.hydra_epochs}")
        input_size = self.input_size or default_input_size(self.model)  # also rejects unknown models
        image_size = self.image_size or input_size
        if image_size > input_size:
            raise ValueError(f"image_size ({image_size}) must not exceed the network input_size ({input_size})")
        if not any(get_method(m).prompt_in_search or get_method(m).prompt_in_finetune for m in self.methods):
            return
        if self.protocol == "release" and image_size != input_size:
            raise ValueError(f"protocol 'release' feeds its unprompted steps and its evaluation the images as they "
                             f"are, so image_size ({image_size}) must equal input_size ({input_size}); use protocol "
                             f"'prompted' to place smaller images inside a prompt")
        if self.prompt == "expansive" and image_size == input_size:
            raise ValueError("the expansive prompt fills the ring around a smaller image: set image_size below "
                             f"input_size ({input_size}), with protocol 'prompted'")
        build_prompt(self.prompt, input_size, image_size, self.prompt_size or default_prompt_size(input_size))

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def identity(self) -> dict:
        """What must match for a run directory to be resumed (not presentation options)."""
        data = self.to_dict()
        for key in ("progress", "out", "num_workers", "keep_checkpoints"):
            data.pop(key)
        return data


@dataclass
class Phase:
    name: str
    kind: str          # "search" or "finetune"
    epochs: int
    use_prompt: bool
    density: float     # the density this phase's mask has (recomputed each step when searching)
    scope: str


def default_prompt_size(input_size: int) -> int:
    """The release's pad width p = 16 at 224, scaled to the network input."""
    return max(1, round(16 * input_size / 224))


def derived_seed(*parts) -> int:
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def environment() -> dict:
    """:func:`vpns_fast.environment.describe` plus what this run adds: ranks, command, time."""
    from vpns_fast.environment import describe

    return {**describe(), "world_size": torch.distributed.get_world_size() if dist_utils.active() else 1,
            "argv": sys.argv, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _make_optimizer(params: list[nn.Parameter], spec: dict) -> torch.optim.Optimizer:
    if spec["name"] == "sgd":
        return torch.optim.SGD(params, lr=spec["lr"], momentum=spec["momentum"], weight_decay=spec["weight_decay"])
    cls = torch.optim.Adam if spec["name"] == "adam" else torch.optim.AdamW
    return cls(params, lr=spec["lr"], weight_decay=spec["weight_decay"])


class TwoStageTrainer:
    """Runs every (method, density) of a :class:`TrainConfig`; see the module docstring."""

    def __init__(self, config: TrainConfig, force: bool = False, resuming: bool = False):
        self.config = config
        self.force = force
        self.resuming = resuming
        self.device = resolve_device(config.device)
        self.rank, self.world_size = dist_utils.init_from_env(self.device.type)
        if self.world_size > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(self.device)
        if config.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=False)
            torch.backends.cudnn.benchmark = False
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        self.is_main = self.rank == 0
        self.out = config.out
        self.results: list[dict] = []
        self._data: DataSplits | None = None
        self._ordered_loaders: dict[int, tuple] = {}  # id(split) -> (split, loader); see _ordered_loader

    # ------------------------------------------------------------------ setup

    def _prepare_out_dir(self) -> None:
        """Refuse to mix runs: an existing output directory is continued only by `vpns resume`,
        and replaced only when forced (its earlier runs are then deleted)."""
        if self.out is None:
            return
        config_path = os.path.join(self.out, "config.json")
        # every rank checks (so all refuse together) before rank 0 deletes or writes anything
        existing = os.path.exists(config_path) and not self.resuming
        if existing:
            with open(config_path) as f:
                same = TrainConfig.from_dict(json.load(f)).identity() == self.config.identity()
            if not self.force:
                if same:
                    raise FileExistsError(f"{self.out} already holds this run; continue it with `vpns resume "
                                          f"{self.out}` or pass --force to start over")
                raise FileExistsError(f"{self.out} holds a run with a different config; choose another --out or "
                                      f"pass --force to replace it")
        dist_utils.barrier()
        if self.is_main:
            if existing:
                for name in ("runs", "plots"):
                    shutil.rmtree(os.path.join(self.out, name), ignore_errors=True)
                for name in ("results.json", "dense.pt"):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(self.out, name))
            os.makedirs(self.out, exist_ok=True)
            self._write_json("config.json", self.config.to_dict())
        dist_utils.barrier()  # no rank looks for checkpoints before rank 0 has cleared a forced --out

    def _write_json(self, name: str, data: Any) -> None:
        if self.out is None or not self.is_main:
            return
        text = json.dumps(data, indent=2).encode()
        atomic_write(os.path.join(self.out, name), lambda f: f.write(text), overwrite=True)

    def data(self) -> DataSplits:
        if self._data is None:
            c = self.config
            self._data = load_dataset(c.dataset, c.data_dir, self.image_size, c.val_fraction, c.split_seed,
                                      c.download, limit=c.limit)
        return self._data

    @property
    def input_size(self) -> int:
        return self.config.input_size or default_input_size(self.config.model)

    @property
    def image_size(self) -> int:
        return self.config.image_size or self.input_size

    @property
    def prompt_size(self) -> int:
        return self.config.prompt_size or default_prompt_size(self.input_size)

    def _build_dense(self) -> tuple[nn.Module, dict, str]:
        """The dense starting model, its state (reloaded at every run) and the mapping mode."""
        c = self.config
        data = self.data()
        # a from-scratch model (and anything random in building it) must not depend on what ran
        # before in this process: `vpns resume` rebuilds it in a fresh one
        seed_everything(derived_seed(c.seed, "dense-init"))
        if c.weights is not None:
            model = build_model(c.model, weights=None if c.weights == "pretrained" else c.weights,
                                pretrained=c.weights == "pretrained")
        else:
            model = build_model(c.model, num_classes=data.num_classes)
            if c.pretrain_epochs > 0:
                self._pretrain(model)
        mode = c.label_mapping
        if mode == "auto":
            mode = "none" if source_num_classes(model) == data.num_classes else "flm"
        if mode == "none" and source_num_classes(model) != data.num_classes:
            raise ValueError(f"label_mapping 'none' needs a head of {data.num_classes} classes; the model has "
                             f"{source_num_classes(model)} (use flm or ilm)")
        return model, copy.deepcopy(model.state_dict()), mode

    def _pretrain(self, model: nn.Module) -> None:
        """Dense training from scratch (the embedded default has no published weights)."""
        c = self.config
        path = os.path.join(self.out, "dense.pt") if self.out else None
        if path and os.path.exists(path):
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return
        model.to(self.device)
        network = PromptedNetwork(model, None, LabelMapping(self.data().num_classes, "none"), IMAGENET_MEAN, IMAGENET_STD,
                                  c.channels_last).to(self.device)
        optimizer = _make_optimizer(list(model.parameters()), c.optimizers["pretrain"])
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, c.pretrain_epochs))
        scaler = self._grad_scaler()
        for epoch in range(c.pretrain_epochs):
            seed_everything(derived_seed(c.seed, "pretrain", epoch))
            self._train_epoch(network, [optimizer], Phase("pretrain", "finetune", c.pretrain_epochs, False, 1.0,
                                                          "global"), None, epoch, f"dense pretrain {epoch + 1}", scaler)
            scheduler.step()
        model.cpu()
        if path and self.is_main:
            atomic_save(model.state_dict(), path, overwrite=True)

    def phases(self, method: Method, density: float) -> list[Phase]:
        c = self.config
        if method.mask == "search":
            scope = c.scope if method.name == "vpns" else c.hydra_scope
            search, finetune = c.search_epochs, c.finetune_epochs
            if method.name == "hydra" and c.hydra_epochs is not None:
                search = finetune = c.hydra_epochs
            return [Phase("search", "search", search, method.prompt_in_search, density, scope),
                    Phase("finetune", "finetune", finetune, method.prompt_in_finetune, density, scope)]
        if method.mask == "imp":
            rounds = imp_densities(density, c.imp_rate)
            return [Phase(f"imp-round-{r}", "finetune", c.finetune_epochs, method.prompt_in_finetune, d, "global")
                    for r, d in enumerate(rounds)]
        return [Phase("finetune", "finetune", c.finetune_epochs, method.prompt_in_finetune, density, "global")]

    # ------------------------------------------------------------------ run all

    def run(self) -> list[dict]:
        c = self.config
        self._prepare_out_dir()
        data = self.data()
        dense_model, self._dense_state, self._mapping_mode = self._build_dense()
        self._dense_model = dense_model
        self._env = environment()
        single = {"dense": 1.0}
        if c.mask_from is not None:
            single.update(transfer=self._checkpoint_density(), **{"transfer+vp": self._checkpoint_density()})
        runs = [(m, single[m] if m in single else d) for m in c.methods
                for d in ((single[m],) if m in single else c.densities)]
        if self.is_main and c.progress:
            print(f"vpns_fast: {c.dataset} ({data.summary() if hasattr(data, 'summary') else ''}) | "
                  f"{c.model} on {self.device} | {len(runs)} runs | protocol {c.protocol}", flush=True)
        for method_name, density in runs:
            self.results.append(self.run_one(get_method(method_name), density))
            self._write_results()
        if self.is_main:
            from vpns_fast.results import results_table, write_plots

            if self.out:
                plots = write_plots(self.out, self.results)
            if c.progress:
                print("\n" + results_table(self.results), flush=True)
                if self.out:
                    print(f"\nresults: {os.path.join(self.out, 'results.json')}  plots: {', '.join(plots)}", flush=True)
        return self.results

    def _write_results(self) -> None:
        self._write_json("results.json", {"config": self.config.to_dict(), "env": self._env, "runs": self.results})

    def run_dir(self, method: str, density: float) -> str | None:
        if self.out is None:
            return None
        return os.path.join(self.out, "runs", f"{method}_d{density:g}")

    # ------------------------------------------------------------------ one run

    def _fresh_model(self) -> nn.Module:
        model = copy.deepcopy(self._dense_model)
        model.load_state_dict(self._dense_state)
        sparsify(model, self.config.granularity, self.config.score_init, structured=self.config.structured)
        model.to(self.device)
        if self.config.channels_last:
            model.to(memory_format=torch.channels_last)
            for _, layer in masked_layers(model):  # scores feed the threshold/mask kernels, not cuDNN
                layer.scores.data = layer.scores.data.contiguous()
        return model

    def _set_threshold(self, model: nn.Module, density: float, scope: str) -> None:
        # structured mode: set_density dedupes shared group scores and applies the early-layer cap
        thresholds = set_density(model, density, scope)
        self._broadcast_thresholds(model)
        return thresholds

    @staticmethod
    def _broadcast_thresholds(model: nn.Module) -> None:
        """Rank 0's thresholds everywhere, so masks are identical by construction (the scores
        already are, after the gradient all-reduce): one broadcast for all layers, every step."""
        if not dist_utils.active():
            return
        layers = [layer for _, layer in masked_layers(model)]
        values = dist_utils.broadcast_(torch.stack([layer.threshold for layer in layers]))
        for layer, value in zip(layers, values):
            layer.threshold.copy_(value)

    def _init_mask(self, model: nn.Module, method: Method, density: float, phases: list[Phase]) -> None:
        c = self.config
        if method.mask == "search":
            self._set_threshold(model, density, phases[0].scope)
        elif method.mask == "magnitude":
            magnitude_scores(model)
            self._set_threshold(model, density, "global")
        elif method.mask == "random":
            generator = torch.Generator().manual_seed(derived_seed(c.seed, method.name, density, "random-mask"))
            random_scores(model, generator)
            self._set_threshold(model, density, "global")
        elif method.mask == "fixed":
            self._impose_checkpoint_masks(model)
        # imp round 0 and dense: thresholds stay at -inf (all weights kept)

    def _checkpoint_density(self) -> float:
        from vpns_fast.checkpoint import model_from_checkpoint

        return round(actual_density(model_from_checkpoint(load_checkpoint(self.config.mask_from))), 6)

    def _impose_checkpoint_masks(self, model: nn.Module) -> None:
        payload = load_checkpoint(self.config.mask_from)
        state = payload["state_dict"]
        masks = {}
        for name, layer in masked_layers(model):
            if f"{name}.scores" not in state:
                raise ValueError(f"{self.config.mask_from} has no mask for layer {name!r}; was it made for "
                                 f"model {self.config.model!r} with granularity {self.config.granularity!r}?")
            masks[name] = state[f"{name}.scores"].abs() > state[f"{name}.threshold"]
        load_masks(model, masks)

    def _phase_setup(self, model, prompt, phase: Phase, index: int, method: Method) -> None:
        if phase.name.startswith("imp-round-") and index > 0:
            apply_imp_round(model, phase.density)
            self._broadcast_thresholds(model)
            # rewind every non-score tensor (weights, BN affine and statistics) to the dense start
            model.load_state_dict({k: v.to(self.device) for k, v in self._dense_state.items()}, strict=False)
            if prompt is not None:
                with torch.no_grad():
                    prompt.program.zero_()
        if phase.kind == "search":
            prepare_mask_search(model)
        else:
            prepare_finetune(model)

    def _optimizers(self, model, prompt, phase: Phase, method: Method) -> list[torch.optim.Optimizer]:
        specs = self.config.optimizers
        groups = parameter_groups(model)
        optimizers = []
        if phase.kind == "search":
            optimizers.append(_make_optimizer(groups["scores"],
                                              specs["search_scores" if method.name == "vpns" else "hydra_scores"]))
            if phase.use_prompt:
                optimizers.append(_make_optimizer([prompt.program], specs["search_prompt"]))
        else:
            optimizers.append(_make_optimizer(groups["weights"] + groups["norm"], specs["finetune_weights"]))
            if phase.use_prompt:
                optimizers.append(_make_optimizer([prompt.program], specs["finetune_prompt"]))
        return optimizers

    def _schedulers(self, optimizers, phase: Phase):
        if self.config.schedule == "constant":
            return [torch.optim.lr_scheduler.LambdaLR(o, lambda epoch: 1.0) for o in optimizers]
        return [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=max(1, phase.epochs)) for o in optimizers]

    def run_one(self, method: Method, density: float) -> dict:
        c = self.config
        data = self.data()
        phases = self.phases(method, density)
        seed_everything(derived_seed(c.seed, method.name, density, "init"))  # e.g. score_init "kaiming"
        model = self._fresh_model()
        uses_prompt = any(p.use_prompt for p in phases)
        prompt = (build_prompt(c.prompt, self.input_size, self.image_size, self.prompt_size, IMAGENET_MEAN, IMAGENET_STD)
                  .to(self.device) if uses_prompt else None)
        mapping = LabelMapping(data.num_classes, self._mapping_mode, source_num_classes(model)).to(self.device)
        network = PromptedNetwork(model, prompt, mapping, IMAGENET_MEAN, IMAGENET_STD, c.channels_last)
        run_dir = self.run_dir(method.name, density)
        state = {"phase": 0, "epoch": 0, "history": [], "best": None, "train_seconds": 0.0, "images": 0,
                 "wall_seconds": 0.0}
        optimizer_states = None
        resumed = self._load_run_state(run_dir, network)
        if resumed is not None:
            state, optimizer_states = resumed
            if state.get("done"):
                if self.is_main and c.progress:
                    print(f"[{method.name} d={density:g}] already complete, skipped", flush=True)
                return state["result"]
        else:
            self._init_mask(model, method, density, phases)
            if self._mapping_mode == "flm":  # ILM fits at the start of every epoch, the first included
                self._refit_mapping(network, force=True)
        start = time.perf_counter() - state["wall_seconds"]
        for index in range(state["phase"], len(phases)):
            phase = phases[index]
            if state["epoch"] == 0:
                self._phase_setup(model, prompt, phase, index, method)
            else:  # resuming inside the phase: its setup already happened
                (prepare_mask_search if phase.kind == "search" else prepare_finetune)(model)
            optimizers = self._optimizers(model, prompt, phase, method)
            schedulers = self._schedulers(optimizers, phase)
            scaler = self._grad_scaler()  # one per phase: its loss scale carries over epochs
            if optimizer_states is not None:
                for obj, saved in zip(optimizers + schedulers + ([scaler] if scaler else []), optimizer_states):
                    obj.load_state_dict(saved)
                optimizer_states = None
            for epoch in range(state["epoch"], phase.epochs):
                seed_everything(derived_seed(c.seed, method.name, density, index, epoch))
                if self._mapping_mode == "ilm":
                    self._refit_mapping(network, force=False)
                t0 = time.perf_counter()
                images, loss, acc = self._train_epoch(network, optimizers, phase, method, epoch,
                                                      f"{method.name} d={density:g} {phase.name} {epoch + 1}/{phase.epochs}",
                                                      scaler)
                state["train_seconds"] += time.perf_counter() - t0
                state["images"] += images
                for s in schedulers:
                    s.step()
                record = {"phase": phase.name, "epoch": epoch + 1, "train_loss": loss, "train_acc": acc}
                record.update(self._evaluate_all(network, with_test=phase is phases[-1]))
                state["history"].append(record)
                if phase is phases[-1]:
                    self._track_best(state, record, network, run_dir)
                state["epoch"] = epoch + 1
                if state["epoch"] == phase.epochs:
                    state["phase"], state["epoch"] = index + 1, 0
                state["wall_seconds"] = time.perf_counter() - start
                if epoch + 1 == phase.epochs:
                    self._save_search_end(run_dir, network, phase, method, density)  # before last.pt moves on
                # at a phase boundary the next phase builds fresh optimizers: save none
                stateful = optimizers + schedulers + ([scaler] if scaler else []) if state["epoch"] else []
                self._save_run_state(run_dir, network, state, stateful, phase, epoch, method, density)
            if phase.epochs == 0:
                self._save_search_end(run_dir, network, phase, method, density)
            state["epoch"] = 0
        if state["best"] is None:  # the final phase had no epochs (e.g. --finetune-epochs 0)
            record = {"phase": phases[-1].name, "epoch": 0, **self._evaluate_all(network, with_test=True)}
            state["history"].append(record)
            self._track_best(state, record, network, run_dir)
        result = self._result_row(method, density, network, state, time.perf_counter() - start)
        state.update(done=True, result=result)
        self._save_run_state(run_dir, network, state, [], None, None, method, density)
        if self.is_main and c.progress:
            print(f"[{method.name} d={density:g}] test acc {result['test_acc']:.2f}% "
                  f"(with prompt: {_fmt(result['test_acc_prompt'])}) | density {result['actual_density']:.4f} | "
                  f"{result['images_per_s']:.0f} img/s", flush=True)
        return result

    def _save_search_end(self, run_dir, network, phase: Phase, method, density) -> None:
        if phase.kind == "search" and run_dir and self.is_main:
            self._save_model(os.path.join(run_dir, "mask.pt"), network, method, density, {"stage": "search-end"})

    # ------------------------------------------------------------------ steps

    def _eval_uses_prompt(self, network: PromptedNetwork) -> bool:
        return network.prompt is not None and self.config.protocol == "prompted"

    def _refit_mapping(self, network: PromptedNetwork, force: bool) -> None:
        if self._mapping_mode == "none":
            return
        loader = self._ordered_loader(self.data().train)
        use_prompt = network.prompt is not None

        def network_input(images):
            return network.network_input(images, use_prompt)

        reduce = dist_utils.all_reduce_sum if dist_utils.active() else None
        if force:
            network.mapping.fit(network.model, loader, network_input, self.device, reduce)
        else:
            network.mapping.on_epoch_start(network.model, loader, network_input, self.device, reduce)

    def _loader(self, dataset, shuffle: bool, seed: int):
        c = self.config
        sampler = None
        if dist_utils.active() and shuffle:
            sampler = torch.utils.data.distributed.DistributedSampler(dataset, shuffle=True, seed=seed)
            shuffle = False
        elif dist_utils.active():  # evaluation and mapping counts: every sample exactly once over the ranks
            sampler = list(range(dist_utils.rank(), len(dataset), self.world_size))
        return make_loader(dataset, c.batch_size, shuffle=shuffle, num_workers=c.num_workers, seed=seed,
                           sampler=sampler, pin_memory=self.device.type == "cuda")

    def _ordered_loader(self, dataset):
        """The unshuffled loader of a split (evaluation, label-mapping counts), built once: it is
        the same every epoch, and rebuilding it would restart its worker processes."""
        if id(dataset) not in self._ordered_loaders:  # the split is kept in the entry: its id stays unique
            self._ordered_loaders[id(dataset)] = (dataset, self._loader(dataset, shuffle=False, seed=0))
        return self._ordered_loaders[id(dataset)][1]

    def _autocast(self):
        if self.config.amp == "none":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.config.amp == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _grad_scaler(self):
        return torch.amp.GradScaler(self.device.type) if self.config.amp == "fp16" else None

    def _train_epoch(self, network: PromptedNetwork, optimizers, phase: Phase, method, epoch: int, label: str,
                     scaler=None):
        """One epoch; returns (images seen, mean loss, accuracy %)."""
        c = self.config
        data = self.data()
        seed = derived_seed(c.seed, phase.name, epoch, "loader")
        # Release protocol: a prompted step on a test-style batch, then an unprompted step on an
        # augmented batch (SPEC §2). Without a prompt, or with protocol "prompted", one step.
        if phase.use_prompt and c.protocol == "release":
            plan = [(self._loader(data.train, True, seed), True), (self._loader(data.train_augmented, True, seed + 1), False)]
        elif phase.use_prompt:
            plan = [(self._loader(data.train, True, seed), True)]
        else:
            plan = [(self._loader(data.train_augmented, True, seed), False)]
        for loader, _ in plan:
            if isinstance(getattr(loader, "sampler", None), torch.utils.data.distributed.DistributedSampler):
                loader.sampler.set_epoch(epoch)
        trainable = network
        if dist_utils.active():
            trainable = nn.parallel.DistributedDataParallel(
                network, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=network.prompt is not None)
        network.train()
        # loss and correct predictions accumulate on the device: reading them every step would
        # stall a GPU twice per step; the progress bar reads them every few steps only
        running = torch.zeros(2, dtype=torch.float64, device=self.device)
        seen = 0
        steps = len(plan[0][0])
        bar = None
        if c.progress and self.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, desc=label, leave=False, dynamic_ncols=True, file=sys.stderr)
        t0 = time.perf_counter()
        for batches in zip(*(loader for loader, _ in plan)):
            for (images, labels), (_, use_prompt) in zip(batches, plan):
                images = images.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
                with self._autocast():
                    logits = trainable(images, use_prompt)
                    loss = F.cross_entropy(logits.float(), labels)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    # an unprompted step leaves the prompt's optimizer without gradients, and the
                    # scaler refuses to step an optimizer it recorded no gradient check for
                    for o in optimizers:
                        if any(p.grad is not None for group in o.param_groups for p in group["params"]):
                            scaler.step(o)
                    scaler.update()
                else:
                    loss.backward()
                    for o in optimizers:
                        o.step()
                for o in optimizers:
                    o.zero_grad(set_to_none=True)
                if phase.kind == "search":  # SPEC: the threshold follows the scores after every step
                    self._set_threshold(network.model, phase.density, phase.scope)
                running[0] += loss.detach().double() * labels.numel()
                running[1] += (logits.detach().argmax(1) == labels).sum()
                seen += labels.numel()
            if bar is not None:
                bar.update(1)
                if bar.n % 10 == 0 or bar.n == steps:
                    total_loss, correct = running.tolist()
                    elapsed = time.perf_counter() - t0
                    bar.set_postfix(loss=f"{total_loss / max(seen, 1):.3f}", acc=f"{100 * correct / max(seen, 1):.1f}",
                                    img_s=f"{seen * self.world_size / max(elapsed, 1e-9):.0f}")
        if bar is not None:
            bar.close()
        if dist_utils.active():  # BN running statistics diverge per rank: all evaluate rank 0's (the saved) model
            for buffer in network.buffers():
                dist_utils.broadcast_(buffer)
        totals = torch.cat([running.cpu(), torch.tensor([seen], dtype=torch.float64)])
        total_loss, correct, seen = dist_utils.all_reduce_sum(totals).tolist()
        return int(seen), total_loss / max(seen, 1), 100 * correct / max(seen, 1)

    def evaluate(self, network: PromptedNetwork, dataset, use_prompt: bool) -> float:
        """Top-1 accuracy in percent (summed over ranks)."""
        counts = count_correct(network, self._ordered_loader(dataset), use_prompt, self.device,
                               self._autocast)
        correct, total = dist_utils.all_reduce_sum(counts).tolist()
        return 100 * correct / max(total, 1.0)

    def _evaluate_all(self, network: PromptedNetwork, with_test: bool) -> dict:
        data = self.data()
        record = {}
        splits = [("val", data.val)] + ([("test", data.test)] if with_test else [])
        for name, dataset in splits:
            if len(dataset) == 0:
                continue
            record[f"{name}_acc"] = self.evaluate(network, dataset, use_prompt=False)
            record[f"{name}_acc_prompt"] = (self.evaluate(network, dataset, use_prompt=True)
                                            if network.prompt is not None else None)
        return record

    def _selection_key(self, network) -> str:
        return "val_acc_prompt" if self._eval_uses_prompt(network) else "val_acc"

    def _track_best(self, state: dict, record: dict, network, run_dir) -> None:
        key = self._selection_key(network)
        best = state["best"]
        # no val split: the last epoch is selected (never select on the test set)
        if key not in record or best is None or record[key] > best[key]:
            state["best"] = dict(record)
            if run_dir and self.is_main:
                self._save_model(os.path.join(run_dir, "best.pt"), network, None, None, {"selected": record},
                                 overwrite=True)

    # ------------------------------------------------------------------ checkpoints

    def _save_model(self, path, network: PromptedNetwork, method, density, meta: dict, overwrite: bool = True):
        save_checkpoint(path, network.model, model_name=self.config.model,
                        model_kwargs=self._model_kwargs(), input_size=(3, self.input_size, self.input_size),
                        prompt=network.prompt, label_mapping=network.mapping.mapping if self._mapping_mode != "none" else None,
                        meta=dict(meta, config=self.config.to_dict()), overwrite=overwrite)

    def _model_kwargs(self) -> dict:
        if self.config.weights is None:
            return {"num_classes": self.data().num_classes}
        return {"num_classes": source_num_classes(self._dense_model)}

    def _save_run_state(self, run_dir, network, state, stateful, phase, epoch, method, density) -> None:
        if run_dir is None or not self.is_main:
            return
        meta = {"training": {"state": state, "optimizers": [o.state_dict() for o in stateful],
                             "method": method.name, "density": density}}
        self._save_model(os.path.join(run_dir, "last.pt"), network, method, density, meta, overwrite=True)
        if self.config.keep_checkpoints == "all" and phase is not None:
            self._save_model(os.path.join(run_dir, f"{phase.name}-epoch{epoch + 1:03d}.pt"), network, method,
                             density, meta, overwrite=True)

    def _load_run_state(self, run_dir, network: PromptedNetwork):
        if run_dir is None:
            return None
        path = os.path.join(run_dir, "last.pt")
        if not os.path.exists(path):
            return None
        payload = load_checkpoint(path)
        network.model.load_state_dict(payload["state_dict"])
        if network.prompt is not None and payload["prompt"] is not None:
            with torch.no_grad():
                network.prompt.program.copy_(payload["prompt"]["program"])
        if payload["label_mapping"] is not None:
            network.mapping.set_mapping(payload["label_mapping"])
        training = payload["meta"]["training"]
        return training["state"], training["optimizers"] or None

    # ------------------------------------------------------------------ results

    def _result_row(self, method: Method, density: float, network, state: dict, wall: float) -> dict:
        model = network.model
        report = density_report(model, (3, self.input_size, self.input_size))
        best = state["best"] or {}
        last = state["history"][-1] if state["history"] else {}
        selected_by = self._selection_key(network)
        if best and selected_by not in best:  # no val split: the last epoch was selected
            selected_by = "last_epoch"
        return {
            "method": method.name, "density": density, "actual_density": actual_density(model),
            "test_acc": best.get("test_acc"), "test_acc_prompt": best.get("test_acc_prompt"),
            "val_acc": best.get("val_acc"), "val_acc_prompt": best.get("val_acc_prompt"),
            "selected_epoch": best.get("epoch"), "selected_by": selected_by,
            # every accuracy comes as a pair: without the prompt, and `_prompt` with it (None when
            # the method has none); which one is the headline depends on the protocol
            "last_test_acc": last.get("test_acc"), "last_test_acc_prompt": last.get("test_acc_prompt"),
            "protocol": self.config.protocol,
            # --limit: every split capped at this many images; accuracies are not comparable with
            # full-data runs, so each row says so (None: the whole dataset)
            "limit": self.config.limit,
            "params_kept": report.kept, "params_total": report.params,
            "flops_kept": report.kept_flops, "flops_dense": report.dense_flops,
            "epochs": {p.name: p.epochs for p in self.phases(method, density)},
            "wall_s": wall, "train_s": state["train_seconds"],
            "images_per_s": state["images"] / max(state["train_seconds"], 1e-9),
            "history": state["history"],
        }


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.2f}%"


def resume(out_dir: str, progress: bool = True) -> list[dict]:
    """Continue the run stored in ``out_dir`` from its last checkpoints."""
    path = os.path.join(out_dir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{out_dir} has no config.json; it is not a `vpns prune` output directory")
    with open(path) as f:
        config = TrainConfig.from_dict(json.load(f))
    config.out, config.progress = out_dir, progress
    trainer = TwoStageTrainer(config, resuming=True)
    return trainer.run()


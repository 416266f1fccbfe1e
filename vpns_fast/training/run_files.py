"""The output directory of a job: ``config.json``, ``results.json``, and per run ``runs/<method>_d<density>/``
with ``last.pt`` (the model and where training stands, for resume), ``best.pt`` (the selected
epoch) and, after a mask search, ``mask.pt``. Only rank 0 writes."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from typing import Any

import torch

from vpns_fast.environment import describe
from vpns_fast.nn.prompted_network import PromptedNetwork
from vpns_fast.pruning.checkpoint import atomic_write, load_checkpoint, save_checkpoint
from vpns_fast.training import distributed as dist_utils
from vpns_fast.training.config import TrainConfig
from vpns_fast.training.state import RunState


def prepare_out_dir(config: TrainConfig, force: bool, resuming: bool, is_main: bool) -> None:
    """Refuse to mix runs: an existing output directory is continued only by `vpns resume`,
    and replaced only when forced (its earlier runs are then deleted)."""
    out = config.out
    if out is None:
        return
    config_path = os.path.join(out, "config.json")
    # every rank checks (so all refuse together) before rank 0 deletes or writes anything
    existing = os.path.exists(config_path) and not resuming
    if existing:
        with open(config_path) as f:
            same = TrainConfig.from_dict(json.load(f)).identity() == config.identity()
        if not force:
            if same:
                raise FileExistsError(f"{out} already holds this run; continue it with `vpns resume "
                                      f"{out}` or pass --force to start over")
            raise FileExistsError(f"{out} holds a run with a different config; choose another --out or "
                                  f"pass --force to replace it")
    dist_utils.barrier()
    if is_main:
        if existing:
            for name in ("runs", "plots"):
                shutil.rmtree(os.path.join(out, name), ignore_errors=True)
            for name in ("results.json", "dense.pt"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(out, name))
        os.makedirs(out, exist_ok=True)
        write_json(out, "config.json", config.to_dict())
    dist_utils.barrier()  # no rank looks for checkpoints before rank 0 has cleared a forced --out


def write_json(out: str, name: str, data: Any) -> None:
    text = json.dumps(data, indent=2).encode()
    atomic_write(os.path.join(out, name), lambda f: f.write(text), overwrite=True)


def environment() -> dict:
    """:func:`vpns_fast.environment.describe` plus what this job adds: ranks, command, time."""
    return {**describe(), "world_size": torch.distributed.get_world_size() if dist_utils.active() else 1,
            "argv": sys.argv, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def run_dir(out: str | None, method: str, density: float) -> str | None:
    if out is None:
        return None
    return os.path.join(out, "runs", f"{method}_d{density:g}")


class RunCheckpoints:
    """The checkpoints of one run. Each holds the masked model, its prompt and label mapping, and
    the job's config; nothing is written without a run directory, or on ranks other than 0."""

    def __init__(self, directory: str | None, config: TrainConfig, model_name: str | None, model_kwargs: dict,
                 keeps_mapping: bool, is_main: bool):
        self.directory = directory
        self.config = config
        self.model_name = model_name  # None: a module passed as an object (load it with model=)
        self.model_kwargs = model_kwargs
        self.keeps_mapping = keeps_mapping
        self.writes = directory is not None and is_main

    def _save(self, name: str, network: PromptedNetwork, meta: dict) -> None:
        size = self.config.network_input_size()
        save_checkpoint(os.path.join(self.directory, name), network.model, model_name=self.model_name,
                        model_kwargs=self.model_kwargs, input_size=(3, size, size), prompt=network.prompt,
                        label_mapping=network.mapping.mapping if self.keeps_mapping else None,
                        meta=dict(meta, config=self.config.to_dict()), overwrite=True)

    def save_mask(self, network: PromptedNetwork) -> None:
        """``mask.pt``: the network as the mask search left it."""
        if self.writes:
            self._save("mask.pt", network, {"stage": "search-end"})

    def save_best(self, network: PromptedNetwork, record: dict) -> None:
        if self.writes:
            self._save("best.pt", network, {"selected": record})

    def save_last(self, network: PromptedNetwork, state: RunState, stateful: list, method: str, density: float,
                  epoch_name: str | None = None) -> None:
        """``last.pt`` with ``state`` and the optimizer, scheduler (and fp16 scaler) states of the
        phase under way; with ``keep_checkpoints="all"`` also a copy named ``<epoch_name>.pt``."""
        if not self.writes:
            return
        meta = {"training": {"state": state.to_dict(), "optimizers": [o.state_dict() for o in stateful],
                             "method": method, "density": density}}
        self._save("last.pt", network, meta)
        if self.config.keep_checkpoints == "all" and epoch_name is not None:
            self._save(f"{epoch_name}.pt", network, meta)

    def load_last(self, network: PromptedNetwork) -> tuple[RunState, list | None] | None:
        """Load ``last.pt`` into ``network``: (its state, the saved optimizer states or None), or
        None when the run has not started."""
        if self.directory is None:
            return None
        path = os.path.join(self.directory, "last.pt")
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
        return RunState.from_dict(training["state"]), training["optimizers"] or None

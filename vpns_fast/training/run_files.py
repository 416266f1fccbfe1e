"""The output directory of a job: ``config.json``, ``results.json``, and per run ``runs/<method>_d<density>/``
with ``last.pt`` (the model and where training stands, for resume), ``best.pt`` (the selected
epoch) and, after a mask search, ``mask.pt``; ``dense.pt`` (``dense-pretrain.pt`` while it trains) after
dense pretraining. Only rank 0 writes, holding the folder's lock (``.vpns.lock``) for the whole job."""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch

from vpns_fast.environment import describe
from vpns_fast.errors import first_items
from vpns_fast.files import FileLockedError, atomic_write, file_lock, sweep_partial_writes
from vpns_fast.nn.prompted_network import PromptedNetwork
from vpns_fast.pruning.checkpoint import load_checkpoint, save_checkpoint
from vpns_fast.training import distributed as dist_utils
from vpns_fast.training.config import RUN_DATA_KEY, TrainConfig
from vpns_fast.training.state import RunState

LOCK_NAME = ".vpns"  # file_lock adds ".lock"
# what a vpns job writes at the top of its folder: all of it goes when --force replaces the run
JOB_FILES = ("config.json", "results.json", "metrics.csv", "dense.pt", "dense-pretrain.pt")
JOB_FOLDERS = ("runs", "plots", "tensorboard", "wandb")  # the last two: --logger tensorboard / wandb


class RunInUseError(ValueError):
    """Another process is running or resuming the job of this output directory."""


@contextlib.contextmanager
def run_folder_lock(out: str | None, is_main: bool) -> Iterator[None]:
    """Hold ``OUT/.vpns.lock`` while a job writes ``out`` (rank 0 takes it): a second `vpns prune` or
    `vpns resume` on the folder is refused instead of redoing the work into the same files. Under DDP
    every rank calls this and rank 0's answer is broadcast, so a refusal raises the same error on every
    rank (the others would otherwise wait at the job's first barrier for a rank 0 that has left)."""
    if out is None:
        yield
        return
    # what this job makes: the folders of out that do not exist yet (outermost first), and the lock file
    made = _missing_folders(out) if is_main else []
    lock_made = is_main and not os.path.exists(os.path.join(out, LOCK_NAME + ".lock"))
    with contextlib.ExitStack() as held:
        refused = False
        if is_main:
            try:
                held.enter_context(file_lock(os.path.join(out, LOCK_NAME), wait=False))
            except FileLockedError:
                refused = True
        if dist_utils.main_decides(refused):
            raise RunInUseError(f"{out} is in use by another vpns process (it holds "
                                f"{os.path.join(out, LOCK_NAME)}.lock); wait for it to finish, then "
                                f"`vpns resume {out}`")
        try:
            yield
        except BaseException:
            if lock_made:  # a job that failed before writing anything leaves nothing of its own behind
                _remove_what_the_job_made(out, made)
            raise


def _missing_folders(out: str) -> list[str]:
    """The folders of ``out`` (itself and its parents) that do not exist, outermost first."""
    missing, path = [], os.path.abspath(out)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        missing.append(path)
        path = os.path.dirname(path)
    return missing[::-1]


def _remove_what_the_job_made(out: str, made: list[str]) -> None:
    """Remove the lock file this failed job made in ``out`` (an empty file; a later job makes its own), then the
    folders it made that are empty, innermost first, while the job still holds the lock: another job on the folder
    meanwhile is refused, and one that opened the lock file before it was unlinked finds it gone once it has the
    lock (file_lock checks), so no two jobs ever share the folder."""
    try:
        os.unlink(os.path.join(out, LOCK_NAME + ".lock"))
        for folder in reversed(made):
            os.rmdir(folder)  # a folder the job wrote into is not empty: it and those around it stay
    except OSError:
        pass


# the same choices from Python, where the messages reach a library user too (an outside review)
FORCE_IN_PYTHON = "(in Python: TrainConfig(out=...), TwoStageTrainer(config, force=True))"


def _foreign_entries(out: str) -> list[str]:
    """What ``out`` holds besides this job's lock file (a folder without config.json is no vpns run)."""
    if not os.path.isdir(out):
        return []
    return sorted(name for name in os.listdir(out) if name != LOCK_NAME + ".lock")


def refuse_foreign_out_dir(config: TrainConfig, force: bool, resuming: bool) -> None:
    """A new job does not write into a folder of other files (no config.json: not a vpns run) unless
    forced; checked before anything, the folder's lock file included, is created in it."""
    out = config.out
    if out is None or resuming or force or os.path.exists(os.path.join(out, "config.json")):
        return
    entries = _foreign_entries(out)
    if entries:
        raise FileExistsError(f"--out {out} exists and is not a vpns run (no config.json; it holds "
                              f"{first_items(entries)}); choose another "
                              f"--out or pass --force to write into it {FORCE_IN_PYTHON}")


def refuse_existing_run(config: TrainConfig, force: bool, resuming: bool) -> bool:
    """FileExistsError where ``config.out`` holds a run (its ``config.json``) and neither ``force`` nor
    ``resuming`` says what to do with it; whether it holds one that a forced job replaces. A job calls it before
    it reads its data, so that a refusal comes at once (:func:`prepare_out_dir` deletes only after the data)."""
    out = config.out
    if out is None or resuming or not os.path.exists(os.path.join(out, "config.json")):
        return False
    if not force:
        with open(os.path.join(out, "config.json")) as f:
            try:
                same = TrainConfig.from_dict(json.load(f)).identity() == config.identity()
            except (ValueError, TypeError):  # a config this version refuses (a value out of today's range)
                same = False
        if same:
            raise FileExistsError(f"{out} already holds this run; continue it with `vpns resume {out}` "
                                  "(vpns_fast.training.trainer.resume(out) in Python) or pass --force to start "
                                  f"over {FORCE_IN_PYTHON}")
        raise FileExistsError(f"{out} holds a run with a different config; choose another --out or "
                              f"pass --force to replace it {FORCE_IN_PYTHON}")
    return True


def prepare_out_dir(config: TrainConfig, force: bool, resuming: bool, is_main: bool) -> None:
    """Refuse to mix runs: an existing output directory is continued only by `vpns resume`,
    and replaced only when forced (its earlier runs are then deleted); a folder that holds other
    files is used only when forced. ``config.json`` is written later, by :func:`write_config`."""
    out = config.out
    if out is None:
        return
    # every rank checks (so all refuse together) before rank 0 deletes or writes anything
    existing = refuse_existing_run(config, force, resuming)
    dist_utils.barrier()
    if is_main:
        if existing:  # config.json too: a rerun that fails before writing its own leaves no stale one
            for name in JOB_FOLDERS:
                shutil.rmtree(os.path.join(out, name), ignore_errors=True)
            for name in JOB_FILES:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(out, name))
        if resuming:  # what writes killed midway left behind (the folder's lock keeps other writers out)
            for folder in [out, os.path.join(out, "plots")] + _run_folders(out):
                sweep_partial_writes(folder)
        os.makedirs(out, exist_ok=True)
    dist_utils.barrier()  # no rank looks for checkpoints before rank 0 has cleared a forced --out


def _run_folders(out: str) -> list[str]:
    runs = os.path.join(out, "runs")
    return [os.path.join(runs, name) for name in sorted(os.listdir(runs))] if os.path.isdir(runs) else []


def write_config(config: TrainConfig, resuming: bool, is_main: bool, data_fingerprint: dict | None = None) -> None:
    """``config.json``, once the job's data has loaded: a job that fails before that leaves no config
    that would block its corrected rerun. It also records ``data_fingerprint`` (``DataSplits.fingerprint``)
    under "data", which a resume checks (:func:`check_same_data`)."""
    if config.out is not None and is_main and not resuming:
        write_json(config.out, "config.json", {**config.to_dict(), RUN_DATA_KEY: data_fingerprint})


def check_same_data(config: TrainConfig, data_fingerprint: dict) -> None:
    """ValueError where a resumed run's data differs from what it started with (classes, or a split's items): its
    later epochs would train, select and test on other images than its earlier ones. Runs recorded before data
    was fingerprinted are not checked."""
    with open(os.path.join(config.out, "config.json")) as f:
        recorded = json.load(f).get(RUN_DATA_KEY)
    if not isinstance(recorded, dict):
        return
    advice = "resume needs the data the run started with; or start a new run (--out elsewhere, or --force)"
    if recorded.get("classes") != data_fingerprint["classes"]:
        then, now = recorded.get("classes") or [], data_fingerprint["classes"]
        raise ValueError(f"{config.out}: the data's classes changed since the run started ({len(then)} then, "
                         f"{len(now)} now: {_difference(then, now)}); {advice}")
    for split, now in data_fingerprint["splits"].items():
        then = (recorded.get("splits") or {}).get(split)
        if then is not None and then != now:
            same_size = then.get("size") == now["size"]
            raise ValueError(f"{config.out}: the {split} split's images changed since the run started "
                             f"({then.get('size')} then, {now['size']} now{', other files' if same_size else ''}); "
                             f"{advice}")


def _difference(then: list, now: list) -> str:
    gone, new = [c for c in then if c not in now], [c for c in now if c not in then]
    parts = ([f"gone {first_items(map(repr, gone))}"] if gone else []) + (
        [f"new {first_items(map(repr, new))}"] if new else [])
    return ", ".join(parts) or "the same names in another order"


def strict_json(data: Any) -> Any:
    """``data`` with every non-finite float as None: JSON has no NaN or Infinity (Python writes them as
    bare ``NaN``, which strict parsers reject)."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {k: strict_json(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [strict_json(v) for v in data]
    return data


def write_json(out: str, name: str, data: Any) -> None:
    text = json.dumps(strict_json(data), indent=2, allow_nan=False).encode()
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
                 keeps_mapping: bool, is_main: bool, class_names: list[str] | None = None):
        self.directory = directory
        # the data's class names, in label order: exports and deploy() name predictions by them, and evaluation
        # refuses data whose classes differ (labels are indices: another folder was scored by position)
        self.class_names = class_names
        self.config = config
        self.model_name = model_name  # None: a module passed as an object (load it with model=)
        self.model_kwargs = model_kwargs
        self.keeps_mapping = keeps_mapping
        self.writes = directory is not None and is_main

    def _save(self, name: str, network: PromptedNetwork, meta: dict) -> None:
        sweep_partial_writes(self.directory)  # an earlier save killed midway: the run's lock keeps others out
        size = self.config.network_input_size()
        save_checkpoint(os.path.join(self.directory, name), network.model, model_name=self.model_name,
                        model_kwargs=self.model_kwargs, input_size=(3, size, size), prompt=network.prompt,
                        label_mapping=network.mapping.mapping if self.keeps_mapping else None,
                        meta=dict(meta, config=self.config.to_dict(),
                                  **({"class_names": list(self.class_names)} if self.class_names else {})),
                        overwrite=True)

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

    def kept_note(self) -> str:
        """For a job that stops: which checkpoint of this run holds its last finished epoch."""
        if self.directory is None or not os.path.exists(os.path.join(self.directory, "last.pt")):
            return ""
        return f" (the run's last finished epoch is kept in {os.path.join(self.directory, 'last.pt')})"

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

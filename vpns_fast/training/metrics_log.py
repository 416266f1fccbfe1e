"""Per-epoch metrics of a job: ``OUT/metrics.csv`` always, TensorBoard and Weights & Biases on request
(``TrainConfig.logger``), the plain per-epoch line of ``--no-progress``, and the whole job's ETA.

Every sink receives the same rows (:data:`COLUMNS`). Only rank 0 opens sinks. ``metrics.csv`` is rewritten
atomically after every epoch, one row per (run, phase, epoch): a job killed after writing an epoch's row but
before saving its checkpoint runs that epoch again on resume, and the new row replaces the old one, so the
file never holds an epoch twice.
"""
from __future__ import annotations

import csv
import importlib.util
import io
import math
import os
from collections.abc import Callable

import torch
from torch import nn

from vpns_fast.files import atomic_write
from vpns_fast.nn.masked_layers import masked_layers
from vpns_fast.pruning.masking import actual_density
from vpns_fast.training.config import TrainConfig

METRICS_FILE = "metrics.csv"
TENSORBOARD_FOLDER = "tensorboard"
# one row per epoch; accuracies in percent, blank where a value does not exist (no val split, no prompt,
# no test evaluation outside the final phase, per-layer thresholds that differ)
COLUMNS = ("run", "method", "density", "phase", "epoch", "epochs", "train_loss", "train_acc", "val_acc",
           "val_acc_prompt", "test_acc", "test_acc_prompt", "threshold", "actual_density", "lr", "lr_prompt",
           "images_per_s", "seconds")
_KEY = ("run", "phase", "epoch")           # what identifies a row: a re-run epoch replaces its row
_LABELS = ("run", "method", "density", "phase", "epoch", "epochs")  # not scalars: TensorBoard/wandb skip them
# logger -> (the module it needs, the extra that installs it)
LOGGER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


def check_loggers(names) -> None:
    """Before the job touches anything: each requested logger's package must be importable."""
    for name in names:
        module, extra = LOGGER_PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"--logger {name}: needs the {module} package (pip install 'vpns_fast[{extra}]')")


# ----------------------------------------------------------------------------------------- rows

def shared_threshold(model: nn.Module) -> float | None:
    """The masked layers' threshold when they all share one (global scope), else None (per-layer scope)."""
    layers = [layer for _, layer in masked_layers(model)]
    if not layers:
        return None
    values = set(torch.stack([layer.threshold.detach().float().reshape(()) for layer in layers]).cpu().tolist())
    return values.pop() if len(values) == 1 else None


def epoch_row(run: str, method: str, density: float, phase: str, epoch: int, epochs: int, record: dict,
              model: nn.Module, learning_rates: list[float], images: int, train_seconds: float,
              seconds: float) -> dict:
    """One row of :data:`COLUMNS`. ``record`` is the epoch's history entry (loss and accuracies),
    ``learning_rates`` those the epoch trained with: the scores' or weights' optimizer, then the prompt's.
    Counting the kept weights costs 95 ms per epoch for a ResNet-18 on a 2-core CPU, next to its epochs."""
    return {"run": run, "method": method, "density": density, "phase": phase, "epoch": epoch, "epochs": epochs,
            "train_loss": record.get("train_loss"), "train_acc": record.get("train_acc"),
            "val_acc": record.get("val_acc"), "val_acc_prompt": record.get("val_acc_prompt"),
            "test_acc": record.get("test_acc"), "test_acc_prompt": record.get("test_acc_prompt"),
            "threshold": shared_threshold(model), "actual_density": actual_density(model),
            "lr": learning_rates[0] if learning_rates else None,
            "lr_prompt": learning_rates[1] if len(learning_rates) > 1 else None,
            "images_per_s": images / max(train_seconds, 1e-9), "seconds": seconds}


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.2f}%"


def epoch_line(label: str, row: dict, eta: float | None) -> str:
    """The one plain line ``--no-progress`` prints per epoch."""
    val = _pct(row["val_acc"])
    if row["val_acc_prompt"] is not None:
        val += f" (prompt {_pct(row['val_acc_prompt'])})"
    return (f"[{label}] {row['phase']} {row['epoch']}/{row['epochs']} | loss {row['train_loss']:.4f} | "
            f"acc {_pct(row['train_acc'])} | val acc {val} | {row['seconds']:.1f} s | job ETA {format_duration(eta)}")


# ----------------------------------------------------------------------------------------- the ETA

class JobClock:
    """The whole job's remaining time: optimizer steps left in every phase of every run, times the
    seconds per step measured so far (evaluation and checkpoints included, so it counts them too)."""

    def __init__(self):
        self._phases: dict[str, list[tuple[int, int]]] = {}  # run -> [(epochs, steps per epoch)] per phase
        self._left: dict[str, int] = {}                       # run -> steps left
        self._seconds = 0.0
        self._steps = 0

    def plan(self, run: str, phases: list[tuple[int, int]]) -> None:
        self._phases[run] = phases
        self._left[run] = sum(epochs * steps for epochs, steps in phases)

    def start(self, run: str, phase: int, epoch: int, done: bool) -> None:
        """A run starts (or resumes at ``epoch`` of ``phase``, or was already ``done``)."""
        phases = self._phases[run]
        if done or phase >= len(phases):
            self._left[run] = 0
        else:
            self._left[run] = sum(e * s for e, s in phases[phase:]) - epoch * phases[phase][1]

    def epoch_done(self, run: str, phase: int, seconds: float) -> None:
        steps = self._phases[run][phase][1]
        self._left[run] = max(0, self._left[run] - steps)
        self._steps += steps
        self._seconds += seconds

    def eta(self, steps_into_epoch: int = 0, epoch_seconds: float = 0.0) -> float | None:
        """Seconds left in the job; ``steps_into_epoch`` already taken in the epoch under way (whose
        ``epoch_seconds`` give the rate before any epoch has finished). None: nothing measured yet."""
        if self._steps:
            rate = self._seconds / self._steps
        elif steps_into_epoch:
            rate = epoch_seconds / steps_into_epoch
        else:
            return None
        return max(0, sum(self._left.values()) - steps_into_epoch) * rate

    def progress_eta(self, steps_into_epoch: int, epoch_seconds: float) -> str:
        return format_duration(self.eta(steps_into_epoch, epoch_seconds))


# ----------------------------------------------------------------------------------------- sinks

def _csv_text(value) -> str:
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else str(value)  # repr: every digit, "inf" / "-inf"


class CsvSink:
    """``OUT/metrics.csv``; a resumed job continues the rows already there."""

    def __init__(self, out: str, resuming: bool):
        self.path = os.path.join(out, METRICS_FILE)
        self.rows: list[dict[str, str]] = self._read() if resuming and os.path.exists(self.path) else []
        self._index = {tuple(row[k] for k in _KEY): i for i, row in enumerate(self.rows)}

    def _read(self) -> list[dict[str, str]]:
        with open(self.path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not set(_KEY) <= set(reader.fieldnames):
                raise ValueError(f"{self.path}: not a metrics file of vpns (its header lacks "
                                 f"{', '.join(_KEY)}); move it away to resume")
            # columns of an older version that wrote fewer stay blank
            return [{c: row.get(c) or "" for c in COLUMNS} for row in reader]

    def epoch(self, row: dict, step: int) -> None:
        text = {c: _csv_text(row.get(c)) for c in COLUMNS}
        key = tuple(text[k] for k in _KEY)
        if key in self._index:
            self.rows[self._index[key]] = text
        else:
            self._index[key] = len(self.rows)
            self.rows.append(text)
        # the whole file each time, atomically: 9 ms with 430 rows (fsync included; 2-core EPYC), next to
        # epochs of seconds to hours, and no half-written or repeated row can survive a kill
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        data = buffer.getvalue().encode()
        atomic_write(self.path, lambda f: f.write(data), overwrite=True)

    def prompt(self, run: str, picture: torch.Tensor, step: int) -> None:
        pass  # plots/prompt.png holds it

    def finish(self, runs: list[dict], table: str) -> None:
        pass  # results.json holds it

    def close(self) -> None:
        pass


def _scalars(row: dict) -> dict[str, float]:
    return {name: float(value) for name, value in row.items()
            if name not in _LABELS and value is not None and math.isfinite(float(value))}


# what the final table holds in TensorBoard and wandb: the columns of results_table, by their results.json keys
TABLE_KEYS = ("method", "density", "actual_density", "test_acc", "test_acc_prompt", "val_acc", "selected_epoch",
              "last_test_acc", "params_kept", "flops_kept", "images_per_s", "wall_s")


class TensorBoardSink:
    """``OUT/tensorboard/``: each column as the scalar ``<run>/<column>`` over the run's epochs (all phases),
    each run's learned prompt as ``<run>/prompt``, the final table as the text ``results``."""

    def __init__(self, out: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=os.path.join(out, TENSORBOARD_FOLDER))

    def epoch(self, row: dict, step: int) -> None:
        for name, value in _scalars(row).items():
            self.writer.add_scalar(f"{row['run']}/{name}", value, step)
        self.writer.flush()

    def prompt(self, run: str, picture: torch.Tensor, step: int) -> None:
        self.writer.add_image(f"{run}/prompt", picture, step, dataformats="CHW")

    def finish(self, runs: list[dict], table: str) -> None:
        # four leading spaces: markdown shows the table as preformatted text, its columns aligned
        self.writer.add_text("results", "\n".join("    " + line for line in table.splitlines()))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A Weights & Biases run, offline unless ``WANDB_MODE`` says otherwise (nothing leaves the machine
    by default; ``wandb sync`` uploads later). Files go under ``OUT/wandb/`` unless ``WANDB_DIR`` is set."""

    def __init__(self, config: TrainConfig):
        import wandb

        self.wandb = wandb
        name = os.path.basename(os.path.normpath(config.out)) if config.out else None
        directory = config.out if config.out and not os.environ.get("WANDB_DIR") else None
        try:
            # console "off": wandb would otherwise wrap stdout and stderr, under the progress bars and the
            # plain per-epoch lines; silent: no banner of its own on the job's output
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "vpns_fast", name=name, dir=directory,
                                  mode=os.environ.get("WANDB_MODE") or "offline", config=config.to_dict(),
                                  settings=wandb.Settings(console="off", silent=True))
        except Exception as exc:  # e.g. online mode without a login: one line, before any training
            raise ValueError(f"--logger wandb: wandb.init failed: {exc}".splitlines()[0]) from exc

    def epoch(self, row: dict, step: int) -> None:
        self.run.log({f"{row['run']}/{name}": value for name, value in
                      {**_scalars(row), "epoch_in_run": float(step)}.items()})

    def prompt(self, run: str, picture: torch.Tensor, step: int) -> None:
        image = (picture.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        self.run.log({f"{run}/prompt": self.wandb.Image(image)})

    def finish(self, runs: list[dict], table: str) -> None:
        rows = [[r.get(k) for k in TABLE_KEYS] for r in runs]
        self.run.log({"results": self.wandb.Table(columns=list(TABLE_KEYS), data=rows)})

    def close(self) -> None:
        self.run.finish()


class MetricsLog:
    """The job's sinks (none on ranks other than 0), fed by the trainer; see the module docstring."""

    def __init__(self, sinks: list):
        self.sinks = sinks

    @classmethod
    def open(cls, config: TrainConfig, is_main: bool, resuming: bool) -> MetricsLog:
        """Call once the job's data has loaded (a job that fails before leaves no logger files behind)."""
        if not is_main:
            return cls([])
        sinks: list = []
        try:
            if config.out is not None:
                sinks.append(CsvSink(config.out, resuming))
            if "tensorboard" in config.logger:
                sinks.append(TensorBoardSink(config.out))
            if "wandb" in config.logger:
                sinks.append(WandbSink(config))
        except BaseException:
            cls(sinks).close()
            raise
        return cls(sinks)

    def _each(self, call: Callable) -> None:
        for sink in self.sinks:
            call(sink)

    def epoch(self, row: dict, step: int) -> None:
        """``step``: the epoch's number in its run, counting every phase (the x axis of the curves)."""
        self._each(lambda s: s.epoch(row, step))

    def prompt(self, run: str, picture: torch.Tensor, step: int) -> None:
        self._each(lambda s: s.prompt(run, picture, step))

    def finish(self, runs: list[dict], table: str) -> None:
        self._each(lambda s: s.finish(runs, table))

    def close(self) -> None:
        self._each(lambda s: s.close())

"""The two-stage trainer: every method x density of a :class:`TrainConfig`, each run walking through
its phases (:mod:`vpns_fast.training.phases`; the method itself is in docs/method.md).

A run starts from the dense weights. Every epoch ends with an evaluation (with and without the
prompt) and an atomic checkpoint of where the run stands; each epoch reseeds every RNG from
(seed, run, phase, epoch), so resuming from a checkpoint replays the same steps, bit for bit.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from dataclasses import dataclass

import torch

from vpns_fast.console import say
from vpns_fast.environment import resolve_device
from vpns_fast.models import check_file_model_record
from vpns_fast.nn.label_mapping import LabelMapping
from vpns_fast.nn.prompted_network import PromptedNetwork
from vpns_fast.nn.prompts import build_prompt
from vpns_fast.ops import IMAGENET_MEAN, IMAGENET_STD
from vpns_fast.pruning.methods import Method, get_method
from vpns_fast.training import distributed as dist_utils
from vpns_fast.training.config import PythonObject, TrainConfig
from vpns_fast.training.dense import DenseStart, build_dense_start, pretrained_model
from vpns_fast.training.evaluation import evaluate_splits
from vpns_fast.training.job import JobContext
from vpns_fast.training.loaders import Loaders, load_job_data
from vpns_fast.training.loop import (
    EpochProgress,
    TrainingDivergedError,
    distributed_model,
    train_epoch,
    training_steps,
)
from vpns_fast.training.metrics_log import JobClock, MetricsLog, check_loggers, epoch_line, epoch_row
from vpns_fast.training.phases import (
    Phase,
    fresh_model,
    init_mask,
    mask_from_density,
    phase_optimizers,
    phase_schedulers,
    plan_phases,
    set_threshold,
    set_trainable,
    start_phase,
)
from vpns_fast.training.precision import Precision
from vpns_fast.training.results import prompt_picture, result_row, results_table, selection_key, write_plots
from vpns_fast.training.run_files import (
    RunCheckpoints,
    check_same_data,
    environment,
    prepare_out_dir,
    refuse_existing_run,
    refuse_foreign_out_dir,
    run_dir,
    run_folder_lock,
    write_config,
    write_json,
)
from vpns_fast.training.seeding import derived_seed, seed_everything
from vpns_fast.training.state import RunState

__all__ = ["TrainConfig", "TwoStageTrainer", "resume"]


@dataclass
class Run:
    """One method x density under way."""
    method: Method
    density: float
    phases: list[Phase]
    network: PromptedNetwork
    checkpoints: RunCheckpoints
    state: RunState
    started: float  # time.perf_counter() at the start, earlier sessions' wall time included

    @property
    def label(self) -> str:
        return f"{self.method.name} d={self.density:g}"

    @property
    def key(self) -> str:
        """As its folder is named (runs/<key>/) and metrics.csv's ``run`` column."""
        return run_key(self.method.name, self.density)


def run_key(method: str, density: float) -> str:
    return f"{method}_d{density:g}"


class TwoStageTrainer:
    """Runs every (method, density) of a :class:`TrainConfig`; see the module docstring. ``force``
    replaces an existing output directory; ``resuming`` continues one (see :func:`resume`)."""

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
        self.results: list[dict] = []
        self.job: JobContext | None = None     # set up by run()
        self.dense: DenseStart | None = None
        self.metrics = MetricsLog([])          # opened by run(), once the data has loaded
        self.clock = JobClock()

    # ------------------------------------------------------------------ the job

    def run(self) -> list[dict]:
        check_loggers(self.config.logger)  # a missing package stops the job before it touches anything
        refuse_foreign_out_dir(self.config, self.force, self.resuming)
        with run_folder_lock(self.config.out, self.is_main):
            return self._run_all()

    def _run_all(self) -> list[dict]:
        c = self.config
        # the data first: a job refused for its data (a mistyped --data-dir, an image that cannot be decoded, a
        # val fraction that leaves nothing to train on) leaves a forced --out's earlier run as it was (an outside
        # review: `--force` had deleted it before the data was read)
        refuse_existing_run(c, self.force, self.resuming)  # at once, before the data's minutes
        data = load_job_data(c, self.resuming)
        pretrained = pretrained_model(c)  # as the data, before anything is written: its weights fetched, built once
        prepare_out_dir(c, self.force, self.resuming, self.is_main)
        fingerprint = data.fingerprint()
        if self.resuming:
            check_same_data(c, fingerprint)
        write_config(c, self.resuming, self.is_main, fingerprint)
        self.job = JobContext(c, data, Loaders(c.batch_size, c.num_workers, self.device, self.world_size),
                              Precision(c.amp, self.device.type), self.device, self.world_size, self.is_main)
        self.metrics = self.job.metrics = MetricsLog.open(c, self.is_main, self.resuming)
        try:
            self._train_all(environment(), pretrained)
        finally:
            self.metrics.close()
        return self.results

    def _train_all(self, env: dict, pretrained: tuple | None) -> None:
        c, data = self.config, self.job.data
        self.dense = build_dense_start(self.job, pretrained)
        runs = [(method, density) for method in map(get_method, c.methods) for density in self._densities(method)]
        self._plan_clock(runs)
        if self.is_main and c.progress:
            say(f"vpns_fast: {c.dataset_description()} ({data.summary()}) | {c.model_description()} on "
                f"{self.device} | {len(runs)} runs | protocol {c.protocol}")
        for method, density in runs:
            self.results.append(self.run_one(method, density))
            if c.out and self.is_main:
                write_json(c.out, "results.json", {"config": c.to_dict(), "env": env, "runs": self.results})
        if self.is_main:
            table = results_table(self.results)
            self.metrics.finish(self.results, table)
            if c.out:
                plots = write_plots(c.out, self.results)
            if c.progress:
                say("\n" + table)
                if c.out:
                    say(f"\nresults: {os.path.join(c.out, 'results.json')}  plots: {', '.join(plots)}")

    def _plan_clock(self, runs: list[tuple[Method, float]]) -> None:
        """Every run's optimizer steps per phase, for the job's ETA (each run starts as not begun)."""
        c, job = self.config, self.job
        for method, density in runs:
            phases = []
            for phase in plan_phases(c, method, density):
                steps = training_steps(job.loaders, job.data, phase.use_prompt, c.protocol, 0, 0)
                phases.append((phase.epochs, len(steps[0][0]) * len(steps)))
            self.clock.plan(run_key(method.name, density), phases)

    def _densities(self, method: Method) -> tuple[float, ...]:
        if method.mask == "dense":  # nothing to prune: one run
            return (1.0,)
        if method.mask == "fixed":  # the imposed mask has its own density
            return (mask_from_density(self.config.mask_from),)
        return self.config.densities

    # ------------------------------------------------------------------ one run

    def run_one(self, method: Method, density: float) -> dict:
        run, optimizer_states = self._start_run(method, density)
        state, network = run.state, run.network
        self.clock.start(run.key, state.phase, state.epoch, state.done)
        if state.done:
            if self.is_main:  # with --no-progress too: a resume of a finished run had printed nothing at all
                say(f"[{run.label}] already complete, skipped")
            return state.result
        for index in range(state.phase, len(run.phases)):
            self._run_phase(run, index, optimizer_states)
            optimizer_states = None
        if state.best is None:  # the final phase had no epochs (e.g. --finetune-epochs 0)
            record = {"phase": run.phases[-1].name, "epoch": 0, **self._evaluate(network, with_test=True)}
            state.history.append(record)
            self._track_best(run, record)
        result = self._result_row(run, time.perf_counter() - run.started)
        state.done, state.result = True, result
        run.checkpoints.save_last(network, state, [], method.name, density)
        if self.is_main and network.prompt is not None:
            self.metrics.prompt(run.key, prompt_picture(network.prompt)[0], len(state.history))
        if self.is_main and self.config.progress:
            say(f"[{run.label}] test acc {result['test_acc']:.2f}% "
                f"(with prompt: {_percent(result['test_acc_prompt'])}) | density {result['actual_density']:.4f} | "
                f"{result['images_per_s']:.0f} img/s")
        return result

    def _start_run(self, method: Method, density: float) -> tuple[Run, list | None]:
        """The run's network, fresh or loaded from its last checkpoint, and the saved optimizer states
        of the phase it stopped in (None when it stopped at a phase boundary or never ran)."""
        c, dense = self.config, self.dense
        phases = plan_phases(c, method, density)
        seed_everything(derived_seed(c.seed, method.name, density, "init"))  # e.g. score_init "kaiming"
        model = fresh_model(dense.model, dense.state, c, self.device)
        prompt = None
        if any(p.use_prompt for p in phases):
            prompt = build_prompt(c.prompt, c.network_input_size(), c.data_image_size(), c.pad_prompt_size(),
                                  IMAGENET_MEAN, IMAGENET_STD).to(self.device)
        mapping = LabelMapping(self.job.data.num_classes, dense.mapping_mode, dense.source_classes)
        network = PromptedNetwork(model, prompt, mapping.to(self.device), IMAGENET_MEAN, IMAGENET_STD, c.channels_last)
        checkpoints = RunCheckpoints(run_dir(c.out, method.name, density), c, dense.model_name, dense.model_kwargs,
                                     keeps_mapping=dense.mapping_mode != "none", is_main=self.is_main,
                                     # a dataset passed as objects has made-up names ("0", "1", ...): none kept
                                     class_names=self.job.data.classes if isinstance(c.dataset, str) else None)
        resumed = checkpoints.load_last(network)
        if resumed is None:
            state, optimizer_states = RunState(), None
            init_mask(model, method, density, phases[0].scope, c)
            if dense.mapping_mode == "flm":  # ILM fits at the start of every epoch, the first included
                self._refit_mapping(network, first=True)
        else:
            state, optimizer_states = resumed
        run = Run(method, density, phases, network, checkpoints, state, time.perf_counter() - state.wall_seconds)
        return run, optimizer_states

    def _run_phase(self, run: Run, index: int, optimizer_states: list | None) -> None:
        """The phase's remaining epochs; ``optimizer_states`` when resuming inside it."""
        c, job, state, network, phase = self.config, self.job, run.state, run.network, run.phases[index]
        if state.epoch == 0:
            start_phase(network.model, network.prompt, phase, self.dense.state, self.device)
        else:  # resuming inside the phase: its start already happened
            set_trainable(network.model, phase)
        state.phase = index
        optimizers = phase_optimizers(network.model, network.prompt, phase, c.optimizers)
        schedulers = phase_schedulers(optimizers, phase, c.schedule)
        scaler = job.precision.grad_scaler()
        stateful = optimizers + schedulers + ([scaler] if scaler.is_enabled() else [])
        for obj, saved in zip(stateful, optimizer_states or []):
            obj.load_state_dict(saved)
        trainable = distributed_model(network, self.device)
        refresh_threshold = None
        if phase.kind == "search":  # the threshold follows the scores after every step
            refresh_threshold = functools.partial(set_threshold, network.model, phase.density, phase.scope,
                                                  check=False)
        is_final = index == len(run.phases) - 1
        for epoch in range(state.epoch, phase.epochs):
            seed_everything(derived_seed(c.seed, run.method.name, run.density, index, epoch))
            if self.dense.mapping_mode == "ilm":
                self._refit_mapping(network, first=False)
            started = time.perf_counter()
            steps = training_steps(job.loaders, job.data, phase.use_prompt, c.protocol,
                                   derived_seed(c.seed, phase.name, epoch, "loader"), epoch)
            progress = None
            if c.progress and self.is_main:
                progress = EpochProgress(f"{run.label} {phase.name} {epoch + 1}/{phase.epochs}", len(steps[0][0]),
                                         self.world_size, self.clock.progress_eta, steps_per_batch=len(steps))
            where = f"run {run.label}, phase {phase.name}, epoch {epoch + 1}/{phase.epochs}"
            try:
                images, loss, acc = train_epoch(trainable, optimizers, steps, job.precision, scaler, self.device,
                                                refresh_threshold, progress, where=where)
            except TrainingDivergedError as error:
                kept = run.checkpoints.kept_note()
                raise TrainingDivergedError(f"{error}{kept}") from None
            train_seconds = time.perf_counter() - started
            state.train_seconds += train_seconds
            state.images += images
            learning_rates = [o.param_groups[0]["lr"] for o in optimizers]  # this epoch's, before the step
            for scheduler in schedulers:
                scheduler.step()
            record = {"phase": phase.name, "epoch": epoch + 1, "train_loss": loss, "train_acc": acc,
                      **self._evaluate(network, with_test=is_final)}  # the test set: final phase only
            state.history.append(record)
            if is_final:
                self._track_best(run, record)
            row = None
            if self.is_main:  # before last.pt moves on: a kill in between reruns the epoch, which replaces the row
                row = epoch_row(run.key, run.method.name, run.density, phase.name, epoch + 1, phase.epochs, record,
                                network.model, learning_rates, images, train_seconds, time.perf_counter() - started)
                self.metrics.epoch(row, len(state.history))
            state.finish_epoch(phase.epochs)
            state.wall_seconds = time.perf_counter() - run.started
            if epoch + 1 == phase.epochs and phase.kind == "search":
                run.checkpoints.save_mask(network)  # before last.pt moves on
            # at a phase boundary the next phase builds fresh optimizers: save none
            run.checkpoints.save_last(network, state, stateful if state.epoch else [], run.method.name, run.density,
                                      epoch_name=f"{phase.name}-epoch{epoch + 1:03d}")
            self.clock.epoch_done(run.key, index, time.perf_counter() - started)
            if row is not None and not c.progress:  # --no-progress: one plain line per epoch
                say(epoch_line(run.label, row, self.clock.eta()))
        if phase.epochs == 0 and phase.kind == "search":
            run.checkpoints.save_mask(network)
        state.epoch = 0

    # ------------------------------------------------------------------ within a run

    def _refit_mapping(self, network: PromptedNetwork, first: bool) -> None:
        """FLM fits once, before training; ILM refits at the start of every epoch."""
        use_prompt = network.prompt is not None

        def network_input(images):
            return network.network_input(images, use_prompt)

        fit = network.mapping.fit if first else network.mapping.on_epoch_start
        fit(network.model, self.job.loaders.ordered(self.job.data.train), network_input, self.device,
            dist_utils.all_reduce_sum if dist_utils.active() else None)

    def _evaluate(self, network: PromptedNetwork, with_test: bool) -> dict:
        data = self.job.data
        splits = [("val", data.val)] + ([("test", data.test)] if with_test else [])
        return evaluate_splits(network, splits, self.job.loaders, self.device, self.job.precision.autocast)

    def _track_best(self, run: Run, record: dict) -> None:
        key = selection_key(run.network, self.config.protocol)
        best = run.state.best
        # no val split: the last epoch is selected (never select on the test set)
        if key not in record or best is None or record[key] > best[key]:
            run.state.best = dict(record)
            run.checkpoints.save_best(run.network, record)

    def _result_row(self, run: Run, wall: float) -> dict:
        epochs = {p.name: p.epochs for p in run.phases}
        return result_row(self.config, run.method.name, run.density, run.network, run.state, epochs, wall)


def _percent(value) -> str:
    return "n/a" if value is None else f"{value:.2f}%"


def _check_same_model(recorded: PythonObject, config: TrainConfig, out_dir: str) -> None:
    """ValueError unless the module ``config`` now holds has the weights (parameters and buffers) the run in
    ``out_dir`` started from, by the hash the config took when it was made; its class may have moved
    (``__main__.Net`` then, ``mypkg.Net`` now). Runs recorded before weights were fingerprinted are not checked."""
    if recorded.weights_sha256 and config.starting_weights_sha256 != recorded.weights_sha256:
        raise ValueError(f"model: its weights differ from those the run in {out_dir} started from (sha256 "
                         f"{recorded.weights_sha256[:12]}...); pass the same module, with the weights it had then")


def resume(out_dir: str, progress: bool | None = None, *, model=None, dataset=None) -> list[dict]:
    """Continue the run stored in ``out_dir`` from its last checkpoints.

    ``progress``: progress bars (True) or one plain line an epoch (False); None, as the run recorded it (a run started
    with ``--no-progress`` goes on without bars).

    A run given its model or dataset as a Python object (config.json records only its type) is resumed by
    passing the same object again as ``model=`` / ``dataset=``; without it the run refuses to start.
    """
    path = os.path.join(out_dir, "config.json")
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"{out_dir}: " + ("is a file; expected the folder a `vpns prune` run wrote"
                                                  if os.path.exists(out_dir) else "no such folder"))
    if not os.path.exists(path):
        raise FileNotFoundError(f"{out_dir} has no config.json; it is not a `vpns prune` output directory")
    try:
        with open(path) as f:
            recorded = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable run configuration ({exc})") from exc
    if not isinstance(recorded, dict):
        raise ValueError(f"{path}: expected a JSON object (the config a run writes), got {type(recorded).__name__}")
    try:
        config = TrainConfig.from_dict(recorded)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from exc
    if isinstance(config.model, str):
        check_file_model_record(config.model, config.model_kwargs, path)
    objects = {}
    for name, value in (("model", model), ("dataset", dataset)):
        if value is None:
            continue
        if not isinstance(getattr(config, name), PythonObject):
            raise ValueError(f"{name}: {out_dir} names its {name} ({getattr(config, name)!r}); pass {name}= only "
                             f"for a run that was given it as a Python object")
        objects[name] = value
    recorded_model = config.model
    config = dataclasses.replace(config, out=out_dir, progress=config.progress if progress is None else progress,
                                 **objects)  # validated again
    if "model" in objects:
        _check_same_model(recorded_model, config, out_dir)
    return TwoStageTrainer(config, resuming=True).run()

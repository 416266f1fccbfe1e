"""The dense model every run starts from: given weights, or trained from scratch first."""
from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass

import torch
from torch import nn

from vpns_fast.console import say
from vpns_fast.environment import is_out_of_memory
from vpns_fast.errors import exception_reason
from vpns_fast.models import build_model_spec, load_weights, load_weights_only, model_kind, source_num_classes
from vpns_fast.nn.label_mapping import LabelMapping
from vpns_fast.nn.prompted_network import PromptedNetwork
from vpns_fast.ops import IMAGENET_MEAN, IMAGENET_STD
from vpns_fast.pruning.checkpoint import atomic_save
from vpns_fast.training.config import PythonObject, TrainConfig
from vpns_fast.training.job import JobContext
from vpns_fast.training.loaders import object_not_stored
from vpns_fast.training.loop import EpochProgress, distributed_model, train_epoch, training_steps
from vpns_fast.training.metrics_log import epoch_line
from vpns_fast.training.phases import make_optimizer
from vpns_fast.training.seeding import derived_seed, seed_everything


@dataclass
class DenseStart:
    model: nn.Module    # on the CPU
    state: dict         # its state_dict, reloaded at the start of every run and at every IMP rewind
    mapping_mode: str   # "none", "flm" or "ilm" ("auto" resolved against the model's head)
    model_kwargs: dict  # what rebuilds the model from a checkpoint
    source_classes: int  # the model's outputs (the source label space)
    model_name: str | None = None  # None: a module passed as an object, which a checkpoint cannot rebuild


def pretrained_model(config: TrainConfig) -> tuple[nn.Module, dict] | None:
    """``(model, spec)`` (as :func:`vpns_fast.models.build_model_spec` gives them) of a model name with weights
    'pretrained', its published weights read from the hub cache or downloaded there, with build_model's errors
    (FileNotFoundError offline, naming where it looked); None for any other start. A job builds it before it writes
    anything, so that a failed download leaves nothing that blocks the corrected command, and hands it to
    :func:`build_dense_start` (a timm model had been built twice: once to fetch its weights, once to train)."""
    if config.weights != "pretrained" or not isinstance(config.model, str):
        return None
    seed_everything(derived_seed(config.seed, "dense-init"))  # as build_dense_start seeds every dense model
    return build_model_spec(config.model, pretrained=True, **config.model_kwargs)


def build_dense_start(job: JobContext, pretrained: tuple[nn.Module, dict] | None = None) -> DenseStart:
    """The dense start of ``job``; ``pretrained``: what :func:`pretrained_model` built for it (else built here)."""
    c, data = job.config, job.data
    # a from-scratch model (and anything random in building it) must not depend on what ran
    # before in this process: `vpns resume` rebuilds it in a fresh one
    seed_everything(derived_seed(c.seed, "dense-init"))
    if isinstance(c.model, PythonObject):
        raise ValueError(object_not_stored(c.model))
    if isinstance(c.model, nn.Module):
        model, name, model_kwargs = copy.deepcopy(c.model).cpu(), None, {}
        if c.weights is not None:
            load_weights(model, c.weights)
    elif c.weights is not None:
        model, spec = ((pretrained or pretrained_model(c)) if c.weights == "pretrained"
                       else build_model_spec(c.model, weights=c.weights, **c.model_kwargs))
        name, model_kwargs = c.model, spec["kwargs"]
    else:
        model, spec = build_model_spec(c.model, num_classes=data.num_classes, **c.model_kwargs)
        name, model_kwargs = c.model, spec["kwargs"]
    # a dry forward at the run's input size counts the outputs of any classifier
    try:
        source_classes = source_num_classes(model, c.network_input_size())
    except RuntimeError as exc:  # a traceback otherwise (an outside review: a factory whose head is not its last
        # registered Linear had the wrong layer replaced)
        if is_out_of_memory(exc):
            raise
        size = c.network_input_size()
        replaced = name is not None and model_kind(name)[0] == "factory"
        hint = ("; a factory without a num_classes argument gets its last registered Linear layer replaced by one "
                "with the dataset's classes: give it num_classes" if replaced and "shapes cannot be multiplied" in
                str(exc) else "")
        raise ValueError(f"model {c.model_description()}: its forward on one {size}x{size} image failed "
                         f"({exception_reason(exc, with_type=False)}){hint}") from None
    if c.weights is None and c.pretrain_epochs > 0:
        pretrain(model, job)
    mode = c.label_mapping
    if mode == "auto":
        mode = "none" if source_classes == data.num_classes else "flm"
    if mode == "none" and source_classes != data.num_classes:
        raise ValueError(f"label_mapping 'none' needs a head of {data.num_classes} classes; the model has "
                         f"{source_classes} (use flm or ilm)")
    return DenseStart(model, copy.deepcopy(model.state_dict()), mode, model_kwargs, source_classes, name)


def pretrain(model: nn.Module, job: JobContext) -> None:
    """Dense training from scratch (the embedded default has no published weights), kept in
    ``dense.pt`` of the output directory so that a resumed job does not train it again. Every epoch
    ends with ``dense-pretrain.pt`` (the model, optimizer, scheduler and scaler states): a job killed
    during pretraining resumes at its next epoch, bit for bit (each epoch reseeds from the seed)."""
    c = job.config
    path = os.path.join(c.out, "dense.pt") if c.out else None
    if path and os.path.exists(path):
        model.load_state_dict(load_weights_only(path))
        return
    progress_path = os.path.join(c.out, "dense-pretrain.pt") if c.out else None
    saved = None
    if progress_path and os.path.exists(progress_path):
        saved = load_weights_only(progress_path)
        model.load_state_dict(saved["model"])
    model.to(job.device)
    network = PromptedNetwork(model, None, LabelMapping(job.data.num_classes, "none"), IMAGENET_MEAN, IMAGENET_STD,
                              c.channels_last).to(job.device)
    optimizer = make_optimizer(list(model.parameters()), c.optimizers["pretrain"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, c.pretrain_epochs))
    scaler = job.precision.grad_scaler()
    stateful = [optimizer, scheduler] + ([scaler] if scaler.is_enabled() else [])
    first_epoch = 0
    if saved is not None:
        for obj, state in zip(stateful, saved["stateful"]):
            obj.load_state_dict(state)
        first_epoch = saved["epoch"]
    trainable = distributed_model(network, job.device)
    for epoch in range(first_epoch, c.pretrain_epochs):
        seed_everything(derived_seed(c.seed, "pretrain", epoch))
        steps = training_steps(job.loaders, job.data, False, c.protocol,
                               derived_seed(c.seed, "pretrain", epoch, "loader"), epoch)
        progress = (EpochProgress(f"dense pretrain {epoch + 1}", len(steps[0][0]), job.world_size)
                    if c.progress and job.is_main else None)
        start = time.perf_counter()
        images, loss, accuracy = train_epoch(trainable, [optimizer], steps, job.precision, scaler, job.device,
                                             progress=progress,
                                             where=f"dense pretraining, epoch {epoch + 1}/{c.pretrain_epochs}")
        _log_pretrain_epoch(job, epoch, loss, accuracy, optimizer.param_groups[0]["lr"], images,
                            time.perf_counter() - start)
        scheduler.step()
        if progress_path and job.is_main and epoch + 1 < c.pretrain_epochs:
            atomic_save({"epoch": epoch + 1, "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                         "stateful": [obj.state_dict() for obj in stateful]}, progress_path, overwrite=True)
    model.cpu()
    if path and job.is_main:
        atomic_save(model.state_dict(), path, overwrite=True)
        if progress_path and os.path.exists(progress_path):
            os.remove(progress_path)


def _log_pretrain_epoch(job: JobContext, epoch: int, loss: float, accuracy: float, lr: float, images: int,
                        seconds: float) -> None:
    """A pretraining epoch as a metrics.csv row (run ``dense``, phase ``pretrain``; no evaluation, so no
    val / test accuracy) and, with ``--no-progress``, its one plain line."""
    if not job.is_main:
        return
    c = job.config
    row = {"run": "dense", "method": "dense", "density": 1.0, "phase": "pretrain", "epoch": epoch + 1,
           "epochs": c.pretrain_epochs, "train_loss": loss, "train_acc": accuracy, "val_acc": None,
           "val_acc_prompt": None, "test_acc": None, "test_acc_prompt": None, "threshold": None,
           "actual_density": 1.0, "lr": lr, "lr_prompt": None, "images_per_s": images / max(seconds, 1e-9),
           "seconds": seconds}
    if job.metrics is not None:
        job.metrics.epoch(row, epoch + 1)
    if not c.progress:
        say(epoch_line("dense", row, None))

"""One training epoch, and the batches it draws from (see docs/method.md for the protocols)."""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from vpns_fast.data import DataSplits
from vpns_fast.nn.prompted_network import PromptedNetwork
from vpns_fast.training import distributed as dist_utils
from vpns_fast.training.loaders import Loaders
from vpns_fast.training.precision import Precision

# (loader, whether its batches go through the prompt); an epoch takes one step per entry per batch
TrainingSteps = list[tuple[DataLoader, bool]]


def training_steps(loaders: Loaders, data: DataSplits, use_prompt: bool, protocol: str, seed: int,
                   epoch: int) -> TrainingSteps:
    """Release protocol: a prompted step on a test-style batch (A), then an unprompted step on an
    augmented batch (B). Without a prompt, or with protocol "prompted", one step per batch."""
    if use_prompt and protocol == "release":
        return [(loaders.shuffled(data.train, seed, epoch), True),
                (loaders.shuffled(data.train_augmented, seed + 1, epoch), False)]
    if use_prompt:
        return [(loaders.shuffled(data.train, seed, epoch), True)]
    return [(loaders.shuffled(data.train_augmented, seed, epoch), False)]


def distributed_model(network: PromptedNetwork, device: torch.device) -> nn.Module:
    """The network as the training steps call it: wrapped for DDP when several ranks run, else itself.
    Wrap once per phase, after the phase has set which parameters learn (DDP registers those)."""
    if not dist_utils.active():
        return network
    # a release-protocol step B leaves the prompt without a gradient
    return nn.parallel.DistributedDataParallel(network, device_ids=[device.index] if device.type == "cuda" else None,
                                               find_unused_parameters=network.prompt is not None)


class EpochProgress:
    """The epoch's progress bar. Loss and accuracy accumulate on the device, where reading them
    every step would stall a GPU twice per step: the bar reads them every 10 steps only.

    ``job_eta(optimizer steps taken this epoch, seconds into it)`` gives the whole job's remaining time as
    text (:meth:`vpns_fast.training.metrics_log.JobClock.progress_eta`); tqdm's own ETA is the epoch's.
    ``steps_per_batch``: optimizer steps per bar step (the release protocol takes two)."""

    def __init__(self, label: str, steps: int, world_size: int,
                 job_eta: Callable[[int, float], str] | None = None, steps_per_batch: int = 1):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=steps, desc=label, leave=False, dynamic_ncols=True, file=sys.stderr)
        self.world_size = world_size
        self.job_eta = job_eta
        self.steps_per_batch = steps_per_batch
        self.started = time.perf_counter()

    def update(self, running: torch.Tensor, seen: int) -> None:
        self.bar.update(1)
        if self.bar.n % 10 == 0 or self.bar.n == self.bar.total:
            total_loss, correct = running.tolist()
            elapsed = time.perf_counter() - self.started
            postfix = {"loss": f"{total_loss / max(seen, 1):.3f}", "acc": f"{100 * correct / max(seen, 1):.1f}",
                       "img_s": f"{seen * self.world_size / max(elapsed, 1e-9):.0f}"}
            if self.job_eta is not None:
                postfix["job_eta"] = self.job_eta(self.bar.n * self.steps_per_batch, elapsed)
            self.bar.set_postfix(postfix)

    def close(self) -> None:
        self.bar.close()


class TrainingDivergedError(ValueError):
    """A training loss that is NaN or infinite: the epoch's weights are not saved, the job stops."""


def _has_gradients(optimizer: torch.optim.Optimizer) -> bool:
    return any(p.grad is not None for group in optimizer.param_groups for p in group["params"])


def train_epoch(model: nn.Module, optimizers: list[torch.optim.Optimizer], steps: TrainingSteps,
                precision: Precision, scaler: torch.amp.GradScaler, device: torch.device,
                refresh_threshold: Callable[[], None] | None = None,
                progress: EpochProgress | None = None, where: str = "training") -> tuple[int, float, float]:
    """One epoch over ``steps``; returns (images seen over all ranks, mean loss, accuracy %).

    A NaN or infinite loss raises :class:`TrainingDivergedError` naming ``where`` and the first such
    step, at the end of the epoch (the step is tracked on the device: reading the loss every step
    would stall a GPU), before the caller evaluates or saves anything of it.

    ``model`` is a :class:`PromptedNetwork` or its DDP wrapper (:func:`distributed_model`).
    ``refresh_threshold`` runs after every optimizer step: during mask search the threshold
    follows the scores, so the mask always keeps the phase's density."""
    model.train()
    running = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, correct predictions
    first_non_finite = torch.full((), -1, dtype=torch.int64, device=device)  # step number, -1: none yet
    seen = step = 0
    for batches in zip(*(loader for loader, _ in steps)):
        for (images, labels), (_, use_prompt) in zip(batches, steps):
            step += 1
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            with precision.autocast():
                logits = model(images, use_prompt)
                loss = F.cross_entropy(logits.float(), labels)
            scaler.scale(loss).backward()
            # an unprompted step leaves the prompt's optimizer without gradients: the fp16 scaler
            # refuses to step an optimizer it recorded no gradient check for (without fp16 the scan
            # is skipped: a step without gradients changes nothing)
            for optimizer in optimizers:
                if not scaler.is_enabled() or _has_gradients(optimizer):
                    scaler.step(optimizer)
            scaler.update()
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            if refresh_threshold is not None:
                refresh_threshold()
            non_finite = ~torch.isfinite(loss.detach()) & (first_non_finite < 0)
            first_non_finite.masked_fill_(non_finite, step)
            running[0] += loss.detach().double() * labels.numel()
            running[1] += (logits.detach().argmax(1) == labels).sum()
            seen += labels.numel()
        if progress is not None:
            progress.update(running, seen)
    if progress is not None:
        progress.close()
    if dist_utils.active():  # BN running statistics diverge per rank: all evaluate rank 0's (the saved) model
        for buffer in model.buffers():
            dist_utils.broadcast_(buffer)
    totals = torch.cat([running.cpu(), torch.tensor([seen], dtype=torch.float64)])
    total_loss, correct, seen = dist_utils.all_reduce_sum(totals).tolist()
    if not math.isfinite(total_loss):  # the sum is reduced over ranks: every rank stops together
        local_step = int(first_non_finite)
        at = f"step {local_step} of {step}" if local_step > 0 else f"a step of another rank ({step} steps each)"
        raise TrainingDivergedError(f"training diverged: the loss became {_non_finite_name(total_loss)} at {where}, "
                                    f"{at}; lower the learning rate (--lr) and start over")
    return int(seen), total_loss / max(seen, 1), 100 * correct / max(seen, 1)


def _non_finite_name(value: float) -> str:
    return "NaN" if math.isnan(value) else "infinite"

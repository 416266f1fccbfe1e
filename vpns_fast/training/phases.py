"""A run's phases and what they do to the model (docs/method.md).

For each method x density a *run* starts from the dense weights and walks through phases:
``search`` (stage 1: scores [+ prompt] learn, weights and norm affine frozen, the threshold
recomputed after every optimizer step) and ``finetune`` (stage 2: the mask is fixed; weights, norm
affine [+ prompt] learn). IMP is a chain of finetune phases with magnitude pruning and rewinding
between them. The :class:`~vpns_fast.pruning.methods.Method` table decides which phases a method
has, which optimizers they use, the threshold scope, and how its mask starts.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from vpns_fast.nn.prompts import VisualPrompt
from vpns_fast.pruning.checkpoint import load_checkpoint, model_from_checkpoint
from vpns_fast.pruning.masking import (
    actual_density,
    load_masks,
    masked_layers,
    parameter_groups,
    prepare_finetune,
    prepare_mask_search,
    set_density,
    sparsify,
)
from vpns_fast.pruning.methods import Method, apply_imp_round, imp_densities, magnitude_scores, random_scores
from vpns_fast.training import distributed as dist_utils
from vpns_fast.training.config import TrainConfig
from vpns_fast.training.seeding import derived_seed

PROMPT_OPTIMIZERS = {"search": "search_prompt", "finetune": "finetune_prompt"}


@dataclass(frozen=True)
class Phase:
    name: str
    kind: str           # "search" or "finetune"
    epochs: int
    use_prompt: bool
    density: float      # the density this phase's mask has (recomputed each step when searching)
    scope: str          # the threshold's scope: "global" or "layer"
    optimizer: str      # the optimizer group (TrainConfig.optimizers) of the scores or weights it trains
    rewinds: bool = False  # IMP: first prune to `density` among the survivors and rewind to the dense start


def plan_phases(config: TrainConfig, method: Method, density: float) -> list[Phase]:
    c = config
    if method.mask == "search":
        scope = getattr(c, method.scope_setting)
        search, finetune = c.search_epochs, c.finetune_epochs
        own_epochs = getattr(c, method.epochs_setting) if method.epochs_setting else None
        if own_epochs is not None:
            search = finetune = own_epochs
        return [Phase("search", "search", search, method.prompt_in_search, density, scope, method.scores_optimizer),
                Phase("finetune", "finetune", finetune, method.prompt_in_finetune, density, scope, "finetune_weights")]
    if method.mask == "imp":
        return [Phase(f"imp-round-{r}", "finetune", c.finetune_epochs, method.prompt_in_finetune, d, "global",
                      "finetune_weights", rewinds=r > 0)
                for r, d in enumerate(imp_densities(density, c.imp_rate))]
    return [Phase("finetune", "finetune", c.finetune_epochs, method.prompt_in_finetune, density, "global",
                  "finetune_weights")]


def mask_from_density(path: str) -> float:
    """The density of the mask a transfer method imposes: that of the checkpoint it comes from."""
    return round(actual_density(model_from_checkpoint(load_checkpoint(path))), 6)


def fresh_model(dense_model: nn.Module, dense_state: dict, config: TrainConfig, device: torch.device) -> nn.Module:
    """A masked copy of the dense model, on ``device``, as every run starts."""
    model = copy.deepcopy(dense_model)
    model.load_state_dict(dense_state)
    sparsify(model, config.granularity, config.score_init, structured=config.structured)
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
        for _, layer in masked_layers(model):  # scores feed the threshold/mask kernels, not cuDNN
            layer.scores.data = layer.scores.data.contiguous()
    return model


def set_threshold(model: nn.Module, density: float, scope: str, check: bool = True) -> None:
    """``check``: set_density's checks (NaN scores, ties), which read the scores back to the host: once when a run
    starts, not on the search's every step."""
    # structured mode: set_density dedupes shared group scores and applies the early-layer cap
    set_density(model, density, scope, check=check)
    broadcast_thresholds(model)


def broadcast_thresholds(model: nn.Module) -> None:
    """Rank 0's thresholds everywhere, so masks are identical by construction (the scores
    already are, after the gradient all-reduce): one broadcast for all layers, every step."""
    if not dist_utils.active():
        return
    layers = [layer for _, layer in masked_layers(model)]
    values = dist_utils.broadcast_(torch.stack([layer.threshold for layer in layers]))
    for layer, value in zip(layers, values):
        layer.threshold.copy_(value)


def init_mask(model: nn.Module, method: Method, density: float, scope: str, config: TrainConfig) -> None:
    """The mask a run starts from; IMP's first round and dense keep every weight (thresholds at -inf)."""
    if method.mask == "search":
        set_threshold(model, density, scope)
    elif method.mask == "magnitude":
        magnitude_scores(model)
        set_threshold(model, density, "global")
    elif method.mask == "random":
        generator = torch.Generator().manual_seed(derived_seed(config.seed, method.name, density, "random-mask"))
        random_scores(model, generator)
        set_threshold(model, density, "global")
    elif method.mask == "fixed":
        impose_checkpoint_masks(model, config)


def impose_checkpoint_masks(model: nn.Module, config: TrainConfig) -> None:
    state = load_checkpoint(config.mask_from)["state_dict"]
    masks = {}
    for name, _ in masked_layers(model):
        if f"{name}.scores" not in state:
            raise ValueError(f"{config.mask_from} has no mask for layer {name!r}; was it made for "
                             f"model {config.model!r} with granularity {config.granularity!r}?")
        masks[name] = state[f"{name}.scores"].abs() > state[f"{name}.threshold"]
    load_masks(model, masks)


def start_phase(model: nn.Module, prompt: VisualPrompt | None, phase: Phase, dense_state: dict,
                device: torch.device) -> None:
    """What happens once when a phase begins (not again when a run resumes inside it)."""
    if phase.rewinds:
        apply_imp_round(model, phase.density)
        broadcast_thresholds(model)
        # rewind every non-score tensor (weights, BN affine and statistics) to the dense start
        model.load_state_dict({k: v.to(device) for k, v in dense_state.items()}, strict=False)
        if prompt is not None:
            with torch.no_grad():
                prompt.program.zero_()
    set_trainable(model, phase)


def set_trainable(model: nn.Module, phase: Phase) -> None:
    (prepare_mask_search if phase.kind == "search" else prepare_finetune)(model)


def make_optimizer(params: list[nn.Parameter], spec: dict) -> torch.optim.Optimizer:
    if spec["name"] == "sgd":
        return torch.optim.SGD(params, lr=spec["lr"], momentum=spec["momentum"], weight_decay=spec["weight_decay"])
    cls = torch.optim.Adam if spec["name"] == "adam" else torch.optim.AdamW
    return cls(params, lr=spec["lr"], weight_decay=spec["weight_decay"])


def phase_optimizers(model: nn.Module, prompt: VisualPrompt | None, phase: Phase,
                     specs: dict[str, dict]) -> list[torch.optim.Optimizer]:
    groups = parameter_groups(model)
    trained = groups["scores"] if phase.kind == "search" else groups["weights"] + groups["norm"]
    optimizers = [make_optimizer(trained, specs[phase.optimizer])]
    if phase.use_prompt:
        optimizers.append(make_optimizer([prompt.program], specs[PROMPT_OPTIMIZERS[phase.kind]]))
    return optimizers


def phase_schedulers(optimizers: list[torch.optim.Optimizer], phase: Phase, schedule: str) -> list:
    """Per-epoch learning-rate schedules over the phase."""
    if schedule == "constant":
        return [torch.optim.lr_scheduler.LambdaLR(o, lambda epoch: 1.0) for o in optimizers]
    return [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=max(1, phase.epochs)) for o in optimizers]

"""How each method's mask starts (docs/method.md §8): scores for search, magnitude (OMP), random, and the
IMP round schedule. The trainer drives them; everything here only sets scores and thresholds."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from vpns_fast.pruning.masking import masked_layers, set_density


@dataclass(frozen=True)
class Method:
    name: str
    mask: str               # "search" (learned scores), "magnitude", "random", "imp", "dense"
    prompt_in_search: bool  # stage 1 trains the prompt with the scores
    prompt_in_finetune: bool
    # The TrainConfig settings a search method reads: HYDRA keeps its own scope, score optimizer
    # and (optional) epoch budget, so it can follow its paper next to VPNs on the same trainer.
    scope_setting: str = "scope"
    scores_optimizer: str = "search_scores"
    epochs_setting: str | None = None  # overrides both stages' epochs when that setting is not None


METHODS = {m.name: m for m in (
    Method("vpns", "search", True, True),
    Method("hydra", "search", False, False, scope_setting="hydra_scope", scores_optimizer="hydra_scores",
           epochs_setting="hydra_epochs"),
    Method("omp", "magnitude", False, False),
    Method("random", "random", False, False),
    Method("imp", "imp", False, False),
    Method("dense", "dense", False, False),
    Method("omp+vp", "magnitude", False, True),
    Method("random+vp", "random", False, True),
    Method("imp+vp", "imp", False, True),
    # masks fixed from another run's checkpoint (the transferability study): `vpns transfer`
    Method("transfer", "fixed", False, False),
    Method("transfer+vp", "fixed", False, True),
)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {name!r}")
    return METHODS[name]


@torch.no_grad()
def magnitude_scores(model: nn.Module, keep_only_current_mask: bool = False) -> None:
    """Scores = weight magnitude (group mean for structured scores), so a global threshold is
    global magnitude pruning. With ``keep_only_current_mask`` already-pruned weights score 0
    (IMP prunes only among the survivors). A score tensor shared by several layers (structured
    mode's residual groups) gets the mean of its members' magnitudes."""
    totals: dict[int, tuple[nn.Parameter, torch.Tensor, int]] = {}
    for _, layer in masked_layers(model):
        magnitude = layer.dense_weight.detach().abs().float()
        if keep_only_current_mask:
            magnitude = magnitude * layer.weight_mask()
        dims = [d for d in range(magnitude.dim()) if layer.scores.shape[d] == 1 and magnitude.shape[d] != 1]
        if dims:
            magnitude = magnitude.mean(dim=dims, keepdim=True)
        scores, total, count = totals.get(id(layer.scores), (layer.scores, 0.0, 0))
        totals[id(layer.scores)] = (scores, total + magnitude, count + 1)
    for scores, total, count in totals.values():
        scores.copy_((total / count).to(scores.dtype))


@torch.no_grad()
def random_scores(model: nn.Module, generator: torch.Generator) -> None:
    for _, layer in masked_layers(model):
        values = torch.rand(layer.scores.shape, generator=generator)
        layer.scores.copy_(values.to(layer.scores.device, layer.scores.dtype))


def imp_densities(density: float, rate: float = 0.2) -> list[float]:
    """Densities of the IMP rounds: 1 (dense training), then ``(1 - rate)^r`` until the
    target, whose round prunes exactly to ``density``."""
    if not 0 < rate < 1:
        raise ValueError(f"imp rate must be in (0, 1), got {rate}")
    rounds = 0 if density >= 1 else math.ceil(math.log(density) / math.log(1 - rate) - 1e-9)
    return [1.0] + [max(density, (1 - rate) ** r) for r in range(1, rounds + 1)]


def apply_imp_round(model: nn.Module, density: float) -> None:
    """Prune the trained weights by global magnitude among the survivors down to ``density``."""
    magnitude_scores(model, keep_only_current_mask=True)
    set_density(model, density, "global")

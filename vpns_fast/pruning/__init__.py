"""Pruning state of a model: sparsify, thresholds and masks, density reports, structured channel
mode, the method table with its baselines, checkpoints of a pruned model, and dispatch tuning."""
from vpns_fast.pruning.masking import (
    actual_density,
    density_report,
    fold,
    load_masks,
    masked_layers,
    masks,
    parameter_groups,
    prepare_finetune,
    prepare_mask_search,
    set_density,
    set_trainable,
    sparsify,
)

__all__ = [
    "actual_density", "density_report", "fold", "load_masks", "masked_layers", "masks", "parameter_groups",
    "prepare_finetune", "prepare_mask_search", "set_density", "set_trainable", "sparsify",
]

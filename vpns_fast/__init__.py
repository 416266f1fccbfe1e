"""vpns_fast: kernel-accelerated VPNs (visual prompts + weight masks for sparsification).

Layers, each a folder, importing only downward: ``training`` / ``deploy`` -> ``pruning`` -> ``nn``
-> ``ops`` -> ``kernels`` (docs/ARCHITECTURE.md).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from vpns_fast import _source_tree  # noqa: F401 - first: makes vpns_fast.kernels importable from a checkout
from vpns_fast._version import __version__
from vpns_fast.deploy.runtime import deploy
from vpns_fast.nn.masked_layers import MaskedConv2d, MaskedLinear, initial_scores, score_shape
from vpns_fast.nn.prompts import (
    ExpansivePrompt,
    FixPrompt,
    PadPrompt,
    RandomPrompt,
    VisualPrompt,
    build_prompt,
)
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

if TYPE_CHECKING:  # for type checkers; at run time __getattr__ imports them
    from vpns_fast.deploy.export import export as export
    from vpns_fast.training.trainer import TrainConfig as TrainConfig
    from vpns_fast.training.trainer import TwoStageTrainer as TwoStageTrainer

# The trainer and the exporter pull in datasets, plotting and file formats (importing the trainer took
# 2.6-5.4 s on top of `import vpns_fast`'s 3.6-4.8 s, three runs each on a loaded 2-core machine,
# 2026-12-02). They are imported on first use, so they are not in __all__ (a star import would load
# them); the API reference documents them in vpns_fast.training and vpns_fast.deploy.export.
_LAZY = {"TwoStageTrainer": "vpns_fast.training.trainer", "TrainConfig": "vpns_fast.training.trainer",
         "export": "vpns_fast.deploy.export"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vpns_fast' has no attribute {name!r}")


__all__ = [
    "ExpansivePrompt", "FixPrompt", "MaskedConv2d", "MaskedLinear", "PadPrompt", "RandomPrompt", "VisualPrompt",
    "__version__", "actual_density", "build_prompt", "deploy", "density_report", "fold", "initial_scores",
    "load_masks", "masked_layers", "masks", "parameter_groups", "prepare_finetune", "prepare_mask_search",
    "score_shape", "set_density", "set_trainable", "sparsify",
]

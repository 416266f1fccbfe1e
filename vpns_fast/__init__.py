"""vpns_fast: kernel-accelerated VPNs (visual prompts + weight masks for sparsification).

Layers, each a folder, importing only downward: ``training`` / ``deploy`` -> ``pruning`` -> ``nn``
-> ``ops`` -> ``kernels`` (docs/ARCHITECTURE.md).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import TYPE_CHECKING

from vpns_fast import _source_tree  # noqa: F401 - first: makes vpns_fast.kernels importable from a checkout
from vpns_fast._version import __version__

if TYPE_CHECKING:  # for type checkers; at run time __getattr__ imports them
    from vpns_fast.deploy.export import export as export
    from vpns_fast.deploy.runtime import deploy
    from vpns_fast.nn.masked_layers import MaskedConv2d, MaskedLinear, initial_scores, score_shape
    from vpns_fast.nn.prompts import ExpansivePrompt, FixPrompt, PadPrompt, RandomPrompt, VisualPrompt, build_prompt
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
    from vpns_fast.training.trainer import TrainConfig as TrainConfig
    from vpns_fast.training.trainer import TwoStageTrainer as TwoStageTrainer

# Every public name is imported on first use, so `import vpns_fast` (and with it `vpns --help`, whose
# modules live in this package) does not import torch: eagerly, `import vpns_fast` took 3.6-4.8 s and the
# trainer another 2.6-5.4 s (three runs each on a loaded 2-core machine, 2026-12-02). `vpns --help` took
# min 4.4 / median 5.6 s eagerly and takes 0.05 / 0.05 s lazily (`vpns prune --help` 4.6 / 5.2 s, now
# 0.05 / 0.07 s; 5 and 7 runs, loaded 2-core machine, 2026-12-03). Nothing depends on import side effects:
# each kernel module defines the torch.library ops it calls, so an op exists once the layer using it loads.
_SOURCES = {
    "vpns_fast.nn.masked_layers": ("MaskedConv2d", "MaskedLinear", "initial_scores", "score_shape"),
    "vpns_fast.nn.prompts": ("ExpansivePrompt", "FixPrompt", "PadPrompt", "RandomPrompt", "VisualPrompt",
                             "build_prompt"),
    "vpns_fast.pruning.masking": ("actual_density", "density_report", "fold", "load_masks", "masked_layers",
                                  "masks", "parameter_groups", "prepare_finetune", "prepare_mask_search",
                                  "set_density", "set_trainable", "sparsify"),
    "vpns_fast.deploy.runtime": ("deploy",),
    # the trainer and the exporter pull in datasets, plotting and file formats: not in __all__ either, so a
    # star import does not load them; the API reference documents them in their own modules
    "vpns_fast.training.trainer": ("TrainConfig", "TwoStageTrainer"),
    "vpns_fast.deploy.export": ("export",),
}
_LAZY = {name: module for module, names in _SOURCES.items() for name in names}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f"{__name__}.{name}")  # a submodule: `vpns_fast.ops` after `import vpns_fast`
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups find it without __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """The package module. The function ``vpns_fast.deploy`` shares its name with the subpackage
    ``vpns_fast.deploy``, and importing a submodule sets it as an attribute of its parent: the first import of
    ``vpns_fast.deploy.*`` would replace the function with the subpackage. The function wins, as it did when
    this module imported it eagerly (after the subpackage)."""

    def __setattr__(self, name: str, value) -> None:
        if name == "deploy" and isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.deploy":
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = [
    "ExpansivePrompt", "FixPrompt", "MaskedConv2d", "MaskedLinear", "PadPrompt", "RandomPrompt", "VisualPrompt",
    "__version__", "actual_density", "build_prompt", "deploy", "density_report", "fold", "initial_scores",
    "load_masks", "masked_layers", "masks", "parameter_groups", "prepare_finetune", "prepare_mask_search",
    "score_shape", "set_density", "set_trainable", "sparsify",
]

"""vpns_fast: kernel-accelerated VPNs (visual prompts + weight masks for sparsification)."""
from __future__ import annotations

import importlib.util as _ilu
import os as _os

__version__ = "0.1.0"

# Installed (regular or editable), `kernels/` is the subpackage `vpns_fast.kernels`. Run from a
# source tree with PYTHONPATH=. it is a sibling folder: let this package's path reach it.
if _ilu.find_spec("vpns_fast.kernels") is None:  # pragma: no cover - depends on how it is run
    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    if _os.path.isfile(_os.path.join(_root, "kernels", "__init__.py")):
        __path__.append(_root)  # noqa: F821 - the package's own __path__

from vpns_fast.masked_layers import MaskedConv2d, MaskedLinear, initial_scores, score_shape  # noqa: E402
from vpns_fast.prompts import (  # noqa: E402
    ExpansivePrompt, FixPrompt, PadPrompt, RandomPrompt, VisualPrompt, build_prompt,
)
from vpns_fast.pruning import (  # noqa: E402
    actual_density, density_report, fold, load_masks, masked_layers, masks, parameter_groups,
    prepare_finetune, prepare_mask_search, set_density, set_trainable, sparsify,
)
from vpns_fast.deploy import deploy  # noqa: E402,F401 - inference module for export/checkpoint files

__all__ = [
    "ExpansivePrompt", "FixPrompt", "MaskedConv2d", "MaskedLinear", "PadPrompt", "RandomPrompt", "VisualPrompt",
    "actual_density", "build_prompt", "density_report", "fold", "initial_scores", "load_masks", "masked_layers",
    "masks", "parameter_groups", "prepare_finetune", "prepare_mask_search", "score_shape", "set_density",
    "set_trainable", "sparsify",
]

"""Modules: masked layers (a thin shell over ``vpns_fast.ops``), visual prompts, label mapping and
the prompted network that chains them. Imports ``ops`` only, never ``pruning`` or above."""
from vpns_fast.nn.label_mapping import LabelMapping
from vpns_fast.nn.masked_layers import (
    MaskedConv1d,
    MaskedConv2d,
    MaskedConv3d,
    MaskedLinear,
    MaskedMultiheadAttention,
    initial_scores,
    masked_layers,
    score_shape,
)
from vpns_fast.nn.prompted_network import PromptedNetwork
from vpns_fast.nn.prompts import ExpansivePrompt, FixPrompt, PadPrompt, RandomPrompt, VisualPrompt, build_prompt

__all__ = [
    "ExpansivePrompt", "FixPrompt", "LabelMapping", "MaskedConv1d", "MaskedConv2d", "MaskedConv3d", "MaskedLinear",
    "MaskedMultiheadAttention", "PadPrompt", "PromptedNetwork",
    "RandomPrompt", "VisualPrompt", "build_prompt", "initial_scores", "masked_layers", "score_shape",
]

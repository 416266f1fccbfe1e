"""The prompted network: prompt (or plain normalization), then the network, then the label mapping."""
from __future__ import annotations

import torch
from torch import nn

from vpns_fast.nn.label_mapping import LabelMapping
from vpns_fast.nn.prompts import VisualPrompt, normalize


class PromptedNetwork(nn.Module):
    """prompt (or plain normalization) -> network -> label mapping, in one module (one DDP unit)."""

    def __init__(self, model: nn.Module, prompt: VisualPrompt | None, mapping: LabelMapping, mean, std,
                 channels_last: bool = False):
        super().__init__()
        self.model, self.prompt, self.mapping = model, prompt, mapping
        self.mean, self.std, self.channels_last = tuple(mean), tuple(std), channels_last

    def network_input(self, images: torch.Tensor, use_prompt: bool) -> torch.Tensor:
        x = self.prompt(images) if use_prompt else normalize(images, self.mean, self.std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def forward(self, images: torch.Tensor, use_prompt: bool = True) -> torch.Tensor:
        return self.mapping(self.model(self.network_input(images, use_prompt and self.prompt is not None)))

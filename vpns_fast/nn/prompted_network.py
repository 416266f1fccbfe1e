"""The prompted network: prompt (or plain normalization), then the network, then the label mapping."""
from __future__ import annotations

import torch
from torch import nn

from vpns_fast import ops
from vpns_fast.nn.label_mapping import LabelMapping
from vpns_fast.nn.prompts import PROMPTS, VisualPrompt, normalize


def _compiled(model: nn.Module) -> bool:
    """Whether torch.compile may wrap the model or a submodule (torch.compile(m), m.compile(), or a forward
    set on the instance, as m.forward = torch.compile(m.forward)): a tensor subclass input fails inside
    AOTAutograd (torch 2.14: "Multiple dispatch failed for aten.convolution"). Checked on every forward (0.1 ms
    for ResNet-50's 151 modules on a 2-core CPU), so a module compiled after the first forward is seen too."""
    return any("_orig_mod" in m._modules or m.__dict__.get("_compiled_call_impl") is not None
               or "forward" in m.__dict__ for m in model.modules())


def _hooked(module: nn.Module) -> bool:
    """Hooks that may change what the prompt computes (its input or output) or see its output."""
    from torch.nn.modules import module as torch_module

    return bool(module._forward_hooks or module._forward_pre_hooks
                or getattr(torch_module, "_global_forward_hooks", None)
                or getattr(torch_module, "_global_forward_pre_hooks", None))


class PromptedNetwork(nn.Module):
    """prompt (or plain normalization) -> network -> label mapping, in one module (one DDP unit).

    With ``narrow_input_grad`` (the default), a prompted forward that trains the program hands the
    model its input through :func:`vpns_fast.ops.narrow_input_grad`: the ``conv2d`` calls on that
    input compute their input gradient inside the prompt's region only. The program's gradient, the
    only reader of that gradient, reads nothing else, so every gradient is what the whole input
    gradient gives. Only for the four prompt classes of :mod:`vpns_fast.nn.prompts` themselves
    (a subclass may add the program elsewhere) without hooks, and never when the images require grad or
    under ``torch.compile`` (of the network or of a module in the model; a compiled function the model calls
    with its input raises a TypeError that says to build the network with ``narrow_input_grad=False``).
    A hook of the user's that keeps the input's gradient (``retain_grad``) sees zeros outside the region.
    ``narrowed_convs`` counts the convolutions the last forward narrowed.
    """

    def __init__(self, model: nn.Module, prompt: VisualPrompt | None, mapping: LabelMapping, mean, std,
                 channels_last: bool = False, narrow_input_grad: bool = True):
        super().__init__()
        self.model, self.prompt, self.mapping = model, prompt, mapping
        self.mean, self.std, self.channels_last = tuple(mean), tuple(std), channels_last
        self.narrow_input_grad = narrow_input_grad
        self.narrowed_convs = 0

    def network_input(self, images: torch.Tensor, use_prompt: bool) -> torch.Tensor:
        x = self.prompt(images) if use_prompt else normalize(images, self.mean, self.std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def forward(self, images: torch.Tensor, use_prompt: bool = True) -> torch.Tensor:
        prompted = use_prompt and self.prompt is not None
        x = self.network_input(images, prompted)
        boxes = self.prompt.last_region_boxes() if prompted and self._narrows(images, x) else None
        if boxes is None:
            self.narrowed_convs = 0
            return self.mapping(self.model(x))
        x = ops.narrow_input_grad(x, boxes)
        try:
            out = self.model(x)
        except TypeError as error:
            if "Multiple dispatch failed" not in str(error):
                raise
            raise TypeError("PromptedNetwork: the model's input is a tensor subclass (narrow_input_grad) and a "
                            "torch.compile'd function it reached failed on it; build the network with "
                            "narrow_input_grad=False") from error
        self.narrowed_convs = x.narrowed_convs
        return self.mapping(out)

    def _narrows(self, images: torch.Tensor, x: torch.Tensor) -> bool:
        return (self.narrow_input_grad and type(self.prompt) in PROMPTS.values() and x.requires_grad
                and not images.requires_grad and x.dim() == 4 and not torch.compiler.is_compiling()
                and not _hooked(self.prompt) and not _compiled(self.model))

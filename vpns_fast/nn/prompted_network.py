"""The prompted network: prompt (or plain normalization), then the network, then the label mapping."""
from __future__ import annotations

import torch
from torch import nn

from vpns_fast import ops
from vpns_fast.nn.label_mapping import LabelMapping
from vpns_fast.nn.prompts import VisualPrompt, normalize


def _narrowable_conv(module: nn.Module) -> bool:
    """A 2-D convolution whose geometry the box gradient reproduces (zero padding given as numbers)."""
    return isinstance(module, nn.Conv2d) and module.padding_mode == "zeros" and not isinstance(module.padding, str)


class PromptedNetwork(nn.Module):
    """prompt (or plain normalization) -> network -> label mapping, in one module (one DDP unit).

    With ``narrow_input_grad`` (the default), in a prompted forward that needs the program's
    gradient, the convolutions that read the prompted input directly compute their input gradient
    only inside the prompt's region (:func:`vpns_fast.ops.narrow_input_grad`): the only reader of
    that gradient, the program's, reads nothing else, so every gradient is what the whole input
    gradient gives. Not done when the images themselves require grad (their gradient would read
    the rest). ``narrowed_layers`` names the layers the last forward narrowed.
    """

    def __init__(self, model: nn.Module, prompt: VisualPrompt | None, mapping: LabelMapping, mean, std,
                 channels_last: bool = False, narrow_input_grad: bool = True):
        super().__init__()
        self.model, self.prompt, self.mapping = model, prompt, mapping
        self.mean, self.std, self.channels_last = tuple(mean), tuple(std), channels_last
        self.narrow_input_grad = narrow_input_grad
        self.narrowed_layers: tuple[str, ...] = ()
        # (id of the model, names of its convolutions that read the input), found by the first narrowed forward
        self._input_convs: tuple[int, tuple[str, ...]] | None = None

    def network_input(self, images: torch.Tensor, use_prompt: bool) -> torch.Tensor:
        x = self.prompt(images) if use_prompt else normalize(images, self.mean, self.std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def forward(self, images: torch.Tensor, use_prompt: bool = True) -> torch.Tensor:
        prompted = use_prompt and self.prompt is not None
        x = self.network_input(images, prompted)
        if (prompted and self.narrow_input_grad and x.requires_grad and not images.requires_grad
                and not torch.compiler.is_compiling()):
            return self.mapping(self._model_with_narrowed_input_grad(x))
        self.narrowed_layers = ()
        return self.mapping(self.model(x))

    def _model_with_narrowed_input_grad(self, x: torch.Tensor) -> torch.Tensor:
        """model(x), each convolution called on ``x`` itself running on ``x.detach()`` (no whole
        input gradient) and handing ``x`` the gradient inside the prompt's region instead."""
        known = self._input_convs
        modules = None
        if known is not None and known[0] == id(self.model):
            names = known[1]
        else:  # first forward of this model: watch every convolution
            modules = dict(self.model.named_modules())
            names = tuple(name for name, module in modules.items() if _narrowable_conv(module))
        boxes = self.prompt.region_boxes()
        narrowing, narrowed, handles = set(), [], []

        def before(module, args):
            if args and args[0] is x:
                narrowing.add(id(module))
                return (x.detach(), *args[1:])
            return None

        def after(name):
            def hook(module, args, output):
                if id(module) not in narrowing:
                    return None
                narrowing.discard(id(module))
                narrowed.append(name)
                with torch.no_grad():
                    weight = module.weight  # a masked layer's masked weight, as its forward used
                return ops.narrow_input_grad(output, x, weight, boxes, module.stride, module.padding,
                                             module.dilation, module.groups)
            return hook

        try:
            for name in names:
                module = modules[name] if modules is not None else self._submodule(name)
                if module is not None and _narrowable_conv(module):
                    handles.append(module.register_forward_pre_hook(before))
                    handles.append(module.register_forward_hook(after(name)))
            out = self.model(x)
        finally:
            for handle in handles:
                handle.remove()
        self.narrowed_layers = tuple(narrowed)
        # From now on watch only the readers found (none: watch nothing); if the readers watched
        # stop reading x (the model changed), look at every convolution again.
        found = tuple(dict.fromkeys(narrowed))
        self._input_convs = (id(self.model), found) if modules is not None or found or not names else None
        return out

    def _submodule(self, name: str) -> nn.Module | None:
        try:
            return self.model.get_submodule(name)
        except AttributeError:
            return None

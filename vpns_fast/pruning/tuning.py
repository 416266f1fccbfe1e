"""Dispatch tuning of a model: measure each distinct masked conv call of one forward and record the
faster candidate in the conv dispatch table (:mod:`vpns_fast.ops.conv_dispatch`). It walks a model,
so it lives here, above the tensor-level ops it times."""
from __future__ import annotations

from collections.abc import Callable

import torch

from vpns_fast.nn.masked_layers import MaskedConv2d
from vpns_fast.ops import conv_dispatch


def tune(model: torch.nn.Module, example: torch.Tensor, stage: str = "search",
         path: str | None = None, timer: Callable | None = None) -> list[dict]:
    """Measure every distinct masked conv call of ``model(example)`` and record it in the table.

    ``stage``: which gradients the timed calls compute, as in training (:data:`vpns_fast.ops.conv_dispatch.GRADS`):
    ``search`` (x and scores, stage 1), ``finetune`` (x and weights, stage 2) or ``infer``.
    Runs one forward (in eval mode, without grad; the model is left as it was) to see each
    ``MaskedConv2d``'s input, then times both candidates on each distinct call shape, under the
    caller's autocast state. Layers with a ``padding_mode`` other than zeros pad their input
    themselves and are skipped. Returns one row per shape: ``{"layer", "key", "ms", "choice"}``;
    the table is saved once at the end.
    """
    if stage not in conv_dispatch.GRADS:
        raise ValueError(f"stage must be one of {sorted(conv_dispatch.GRADS)}, got {stage!r}")
    dispatch_table = conv_dispatch.table(path)
    if dispatch_table.load_error is not None:  # before any measuring: save() would refuse
        raise conv_dispatch.DispatchTableError(f"not tuning into {dispatch_table.path}: {dispatch_table.load_error}")
    grads = conv_dispatch.GRADS[stage]
    seen: dict[str, tuple] = {}

    def capture(layer, inputs, name):
        x = inputs[0]
        key = conv_dispatch.call_key(x, layer.dense_weight, layer.scores, layer.bias, layer.stride, layer.padding,
                                     layer.dilation, layer.groups, grads)
        if key not in seen:
            seen[key] = (name, layer, tuple(x.shape), x.stride(), x.dtype)

    handles = [m.register_forward_pre_hook(lambda m, inputs, name=name: capture(m, inputs, name))
               for name, m in model.named_modules() if isinstance(m, MaskedConv2d) and m.padding_mode == "zeros"]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()  # same shapes, and BatchNorm statistics stay as they are
            model(example)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    if not seen:
        raise ValueError("model has no MaskedConv2d layer to tune (sparsify it first)")
    rows = []
    for key, (name, layer, shape, strides, dtype) in seen.items():
        # Inputs are made per shape, not kept from the forward (GBs at ResNet-50, batch 256).
        x = torch.empty_strided(shape, strides, dtype=dtype, device=example.device).normal_()
        times = conv_dispatch.measure(x, layer.input_masked_weight().detach(), layer.scores, layer.threshold,
                        layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups, grads, timer)
        choice = dispatch_table.record(conv_dispatch.device_section(x.device), key, times)
        rows.append({"layer": name, "key": key, "ms": times, "choice": choice})
    dispatch_table.save()
    return rows

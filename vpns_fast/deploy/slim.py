"""Slimming: physically remove pruned channels of a (folded) ResNet or VGG and fold BatchNorm into
the convolutions, giving a smaller dense network with the same outputs (eval mode).

What is removed from a ResNet, and why only that:

* Channels *inside* a residual block: the outputs of ``conv1`` (BasicBlock) and of
  ``conv1``/``conv2`` (Bottleneck), with the matching input channels of the next conv.
* Block outputs (``conv2``/``conv3``, the downsample conv, the stem) feed the residual sum
  ``branch + shortcut``: every branch and every later block reads the same channel index, so a
  channel of such a *residual group* (all convs adding into one stream, see
  :func:`vpns_fast.pruning.structured.residual_groups`) goes only when it is pruned in **every** producer
  of the group and **every** conv reading the stream has zero weights on it — what structured
  mode (input-channel masking) produces. The stream then carries a constant on that channel that
  no conv reads; after the last stage it reaches the classifier through the average pool, and
  ``fc.weight[:, c] * constant`` is folded into ``fc.bias``. Otherwise block outputs are kept.
  This is done for models folded from structured ones (or with ``residual_groups=True``).
* A pruned output channel (all its weights zero) is not zero after BatchNorm: it is the constant
  ``k = beta - gamma * mean / sqrt(var + eps)``, and ``relu(k)`` after the ReLU. Dropping it is
  exact when ``relu(k) == 0``; or when the consumer's weights on it are all zero (then any channel,
  pruned or not, is unused); or when the consumer is a 1x1 convolution without padding, where the
  constant's contribution ``W[:, c] * relu(k)`` is the same at every position and is folded into
  the consumer's bias. Before a padded 3x3 convolution the constant's contribution differs at the
  borders (zero padding), so such a channel is kept: the slim model stays exact.

A torchvision VGG (``vgg16``, with or without BatchNorm: ``features`` of Conv2d, BatchNorm2d,
ReLU and MaxPool2d, ``avgpool`` an ``AdaptiveAvgPool2d`` of fixed size, a classifier of Linear,
ReLU and Dropout) is one chain of layers, and the same rule is applied to every edge of it:

* Conv output channels, with the next conv's input channels. Max-pooling keeps a constant channel
  the same constant, so only the consumer matters; it is a padded 3x3 conv in VGG, so a pruned
  channel goes when ``relu(k) == 0`` or the next conv ignores it, and is kept otherwise.
* The last conv's output channels: after ``AdaptiveAvgPool2d((h, w))`` and ``flatten``, channel
  ``c`` owns the ``h * w`` consecutive inputs ``c*h*w ... c*h*w + h*w - 1`` of the first Linear,
  which all carry a pruned channel's constant, so every pruned channel goes: the sum of its columns
  times ``relu(k)`` is folded into that Linear's bias and the columns are removed.
* Hidden units of the classifier: a Linear output unit with all-zero weights outputs its bias,
  ``relu(b)`` after the ReLU (Dropout is the identity in eval mode), folded into the next Linear's
  bias the same way. The last Linear's outputs (the logits) are all kept.

BatchNorm is folded in float64 (``W' = W * gamma / sqrt(var + eps)``, ``b' = beta - gamma * mean /
sqrt(var + eps)``) and the result cast back to the weights' dtype; BN modules become
``nn.Identity`` so torchvision's ``forward`` runs unchanged. A slim model is for eval mode only.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.models.vgg import VGG

__all__ = ["SlimError", "slim_model", "slim_resnet", "slim_vgg", "build_slim", "conv_bn_pairs"]


class SlimError(ValueError):
    """The model cannot be slimmed (not a torchvision-style ResNet or VGG of supported layers, masked layers)."""


def _require_plain(model: nn.Module) -> None:
    if any(type(m).__name__.startswith("Masked") for m in model.modules()):
        raise SlimError("slim a folded model (vpns_fast.fold), not one with masked layers")


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv name, BatchNorm name) of every conv followed by a BatchNorm in a torchvision ResNet."""
    if not isinstance(model, ResNet):
        raise SlimError(f"slimming supports torchvision-style ResNets (resnet18/50, cifar_resnet18, "
                        f"small_resnet), got {type(model).__name__}")
    _require_plain(model)
    pairs = [("conv1", "bn1")]
    for name, block in model.named_modules():
        if isinstance(block, (BasicBlock, Bottleneck)):
            count = 3 if isinstance(block, Bottleneck) else 2
            pairs += [(f"{name}.conv{i}", f"{name}.bn{i}") for i in range(1, count + 1)]
            if block.downsample is not None:
                pairs.append((f"{name}.downsample.0", f"{name}.downsample.1"))
    return pairs


def _conv_like(conv: nn.Conv2d, in_channels: int, out_channels: int, weight, bias) -> nn.Conv2d:
    new = nn.Conv2d(in_channels, out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups, True, conv.padding_mode, device="meta")
    new.weight = nn.Parameter(weight.to(conv.weight.dtype).contiguous(), requires_grad=False)
    new.bias = nn.Parameter(bias.to(conv.weight.dtype).contiguous(), requires_grad=False)
    return new


def _folded_conv(model: nn.Module, conv_name: str, bn_name: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (weight, bias) of a conv with its BatchNorm (if any) folded in."""
    conv = model.get_submodule(conv_name)
    bn = model.get_submodule(bn_name) if bn_name is not None else None
    if bn is None:
        if type(conv) is not nn.Conv2d:
            raise SlimError(f"{conv_name} must be a plain Conv2d (got {type(conv).__name__}); fold masked models first")
        bias = conv.bias.double() if conv.bias is not None else torch.zeros(conv.out_channels, dtype=torch.float64)
        return conv.weight.double(), bias
    if type(conv) is not nn.Conv2d or not isinstance(bn, nn.BatchNorm2d):
        raise SlimError(f"{conv_name} / {bn_name} must be a plain Conv2d and a BatchNorm2d "
                        f"(got {type(conv).__name__} / {type(bn).__name__}); fold masked models first")
    if bn.running_mean is None:
        raise SlimError(f"{bn_name} tracks no running statistics; cannot fold it")
    scale = (bn.weight.double() if bn.affine else torch.ones_like(bn.running_var, dtype=torch.float64))
    scale = scale / torch.sqrt(bn.running_var.double() + bn.eps)
    shift = bn.bias.double() if bn.affine else torch.zeros_like(scale)
    conv_bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    return conv.weight.double() * scale[:, None, None, None], shift + (conv_bias - bn.running_mean.double()) * scale


def _channel_state(weights: dict) -> tuple[dict, dict, dict, dict]:
    """(pruned, keep_out, keep_in, report) for float64 layer weights: pruned output channels are
    those whose weights are all zero; everything is kept until an edge drops it."""
    pruned = {name: (w.flatten(1) == 0).all(1) for name, w in weights.items()}
    keep_out = {name: torch.ones(w.shape[0], dtype=torch.bool) for name, w in weights.items()}
    keep_in = {name: torch.ones(w.shape[1], dtype=torch.bool) for name, w in weights.items()}
    report = {name: {"channels": int(w.shape[0]), "pruned": int(pruned[name].sum()), "dropped": 0, "folded": 0,
                     "kept_pruned": int(pruned[name].sum()), "role": ""}
              for name, w in weights.items()}
    return pruned, keep_out, keep_in, report


def _assemble(slim: nn.Module, pairs, weights, biases, keep_out, keep_in, linears: dict) -> dict:
    """Put the slim layers into ``slim`` (convs of ``pairs`` with their BN folded, ``linears``:
    ``{name: (weight, bias)}``) and return the architecture description :func:`build_slim` reads."""
    architecture = {"convs": {}, "folded_bn": [bn for _, bn in pairs if bn is not None]}
    if linears:
        architecture["linears"] = {}
        for name, (weight, bias) in linears.items():
            old = slim.get_submodule(name)
            new = nn.Linear(weight.shape[1], weight.shape[0], True, device="meta")
            new.weight = nn.Parameter(weight.to(old.weight.dtype).contiguous(), requires_grad=False)
            new.bias = nn.Parameter(bias.to(old.weight.dtype).contiguous(), requires_grad=False)
            slim.set_submodule(name, new)
            architecture["linears"][name] = [int(weight.shape[1]), int(weight.shape[0])]
    for conv_name, bn_name in pairs:
        conv = slim.get_submodule(conv_name)
        w = weights[conv_name][keep_out[conv_name]][:, keep_in[conv_name]]
        b = biases[conv_name][keep_out[conv_name]]
        slim.set_submodule(conv_name, _conv_like(conv, w.shape[1], w.shape[0], w, b))
        if bn_name is not None:
            slim.set_submodule(bn_name, nn.Identity())
        architecture["convs"][conv_name] = [int(w.shape[1]), int(w.shape[0])]
    for p in slim.parameters():
        p.requires_grad_(False)
    return architecture


def slim_model(model: nn.Module, residual_groups: bool | None = None) -> tuple[nn.Module, dict, dict]:
    """:func:`slim_resnet` or :func:`slim_vgg`, by model type; ``residual_groups`` is for ResNets."""
    if isinstance(model, VGG):
        return slim_vgg(model)
    if isinstance(model, ResNet):
        return slim_resnet(model, residual_groups)
    raise SlimError(f"slimming supports torchvision-style ResNets (resnet18/50, cifar_resnet18, small_resnet) "
                    f"and VGGs (vgg16, with or without BatchNorm), got {type(model).__name__}")


@torch.no_grad()
def slim_resnet(model: nn.Module, residual_groups: bool | None = None) -> tuple[nn.Module, dict, dict]:
    """Slim a plain (folded) ResNet.

    ``residual_groups``: also drop residual-group (block output) channels where that is exact;
    default: only for a model folded from a structured one (``sparsify(..., structured=True)``),
    so the slim layout of other models is unchanged.

    ``(slim_model, architecture, report)``:

    ``architecture``: ``{"convs": {name: [in_channels, out_channels]}, "folded_bn": [names]}``, what
    :func:`build_slim` needs to rebuild the module from the stock model; ``report``: per conv,
    ``{"channels", "pruned", "dropped", "folded", "kept_pruned", "role"}`` where ``pruned`` counts
    output channels whose weights are all zero, ``dropped`` the channels removed, ``folded`` the
    dropped ones whose constant went into the consumer's bias, and ``kept_pruned`` pruned channels
    kept (block outputs, or a nonzero constant before a padded conv).
    """
    pairs = conv_bn_pairs(model)
    slim = copy.deepcopy(model).eval()
    # float64 weights and biases of each conv with its BN folded in
    weights: dict[str, torch.Tensor] = {}
    biases: dict[str, torch.Tensor] = {}
    for conv_name, bn_name in pairs:
        weights[conv_name], biases[conv_name] = _folded_conv(slim, conv_name, bn_name)
    pruned, keep_out, keep_in, report = _channel_state(weights)
    for row in report.values():
        row["role"] = "block output (residual sum)"
    report["conv1"]["role"] = "stem (residual stream)"

    for block_name, block in slim.named_modules():
        if not isinstance(block, (BasicBlock, Bottleneck)):
            continue
        count = 3 if isinstance(block, Bottleneck) else 2
        convs = [f"{block_name}.conv{i}" for i in range(1, count + 1)]
        # Last edge first: a consumer's dropped output channels no longer count when asking
        # whether it reads a producer channel.
        for producer, consumer in reversed(list(zip(convs[:-1], convs[1:]))):
            _slim_edge(producer, consumer, weights, biases, pruned, keep_out, keep_in, slim, report,
                       role=f"inside block (feeds {consumer})")

    if residual_groups is None:
        from vpns_fast.pruning.structured import structured_config

        residual_groups = structured_config(model) is not None
    linears = (_slim_residual_groups(slim, weights, biases, pruned, keep_out, keep_in, report)
               if residual_groups else {})
    architecture = _assemble(slim, pairs, weights, biases, keep_out, keep_in, linears)
    return slim, architecture, report


def _vgg_layout(model: nn.Module) -> tuple[list[tuple[str, str | None]], list[str], list[bool], int]:
    """``(pairs, linears, relu_after, positions)`` of a torchvision VGG: (conv, BatchNorm or None)
    of ``features`` and the classifier's Linears, in order; for each of these layers, whether a
    ReLU acts on its output before the next layer reads it; and how many classifier inputs each
    channel of the last conv owns (``h * w`` of the average pool)."""
    _require_plain(model)
    features, classifier = getattr(model, "features", None), getattr(model, "classifier", None)
    if not isinstance(features, nn.Sequential) or not isinstance(classifier, nn.Sequential):
        raise SlimError("slimming a VGG needs nn.Sequential features and classifier")
    pairs: list[tuple[str, str | None]] = []
    linears: list[str] = []
    relu_after: list[bool] = []
    previous = None
    for prefix, stack in (("features", features), ("classifier", classifier)):
        for index, module in enumerate(stack):
            name = f"{prefix}.{index}"
            if prefix == "features" and type(module) is nn.Conv2d:
                if module.groups != 1:
                    raise SlimError(f"{name}: grouped convolutions are not supported")
                pairs.append((name, None))
                relu_after.append(False)
            elif prefix == "features" and isinstance(module, nn.BatchNorm2d) and previous is nn.Conv2d:
                pairs[-1] = (pairs[-1][0], name)
            elif prefix == "classifier" and type(module) is nn.Linear:
                linears.append(name)
                relu_after.append(False)
            elif isinstance(module, nn.ReLU):
                if relu_after:  # (a ReLU on the input image changes no layer's constants)
                    relu_after[-1] = True
            elif not isinstance(module, nn.MaxPool2d if prefix == "features" else nn.Dropout):
                # max-pooling (its padding is -inf) and Dropout (eval) pass a constant channel unchanged
                allowed = ("Conv2d, BatchNorm2d after a conv, ReLU, MaxPool2d" if prefix == "features"
                           else "Linear, ReLU, Dropout")
                raise SlimError(f"{name}: {type(module).__name__} is not supported in a VGG's {prefix} ({allowed})")
            previous = type(module)
    if not pairs or not linears:
        raise SlimError("slimming a VGG needs at least one conv in features and one Linear in classifier")
    pool = getattr(model, "avgpool", None)
    size = pool.output_size if type(pool) is nn.AdaptiveAvgPool2d else None
    size = (size, size) if isinstance(size, int) else size
    if size is None or None in size:  # average-pooling keeps a constant channel constant
        raise SlimError(f"slimming a VGG needs avgpool = nn.AdaptiveAvgPool2d of a fixed size, got {pool!r}")
    positions = math.prod(size)
    channels = model.get_submodule(pairs[-1][0]).out_channels
    in_features = model.get_submodule(linears[0]).in_features
    if in_features != channels * positions:
        raise SlimError(f"{linears[0]} reads {in_features} features, but {pairs[-1][0]} gives {channels} channels "
                        f"of {size[0]}x{size[1]} = {channels * positions}")
    return pairs, linears, relu_after, positions


@torch.no_grad()
def slim_vgg(model: nn.Module) -> tuple[nn.Module, dict, dict]:
    """Slim a plain (folded) torchvision VGG, with or without BatchNorm (see the module doc).

    ``(slim_model, architecture, report)`` as :func:`slim_resnet`; ``architecture`` also has
    ``"linears": {name: [in_features, out_features]}`` for the classifier, and ``report`` a row per
    Linear too (``channels``: its output units).
    """
    if not isinstance(model, VGG):
        raise SlimError(f"slim_vgg needs a torchvision VGG, got {type(model).__name__}")
    pairs, linears, relu_after, positions = _vgg_layout(model)
    slim = copy.deepcopy(model).eval()
    weights: dict[str, torch.Tensor] = {}
    biases: dict[str, torch.Tensor] = {}
    for conv_name, bn_name in pairs:
        weights[conv_name], biases[conv_name] = _folded_conv(slim, conv_name, bn_name)
    for name in linears:
        linear = slim.get_submodule(name)
        weights[name] = linear.weight.double()
        biases[name] = (linear.bias.double() if linear.bias is not None
                        else torch.zeros(linear.out_features, dtype=torch.float64))
    pruned, keep_out, keep_in, report = _channel_state(weights)
    keep_in[linears[0]] = torch.ones(weights[pairs[-1][0]].shape[0], dtype=torch.bool)  # per channel, not column
    layers = [conv for conv, _ in pairs] + linears
    report[layers[-1]]["role"] = "output (logits)"
    # last edge first, as in slim_resnet
    for index in reversed(range(len(layers) - 1)):
        producer, consumer = layers[index], layers[index + 1]
        _slim_edge(producer, consumer, weights, biases, pruned, keep_out, keep_in, slim, report,
                   role=f"feeds {consumer}", relu=relu_after[index])
    slim_linears = {}
    for name in linears:
        columns = keep_in[name].repeat_interleave(positions) if name == linears[0] else keep_in[name]
        slim_linears[name] = (weights[name][keep_out[name]][:, columns], biases[name][keep_out[name]])
    architecture = _assemble(slim, pairs, weights, biases, keep_out, keep_in, slim_linears)
    return slim, architecture, report


def _slim_edge(producer, consumer, weights, biases, pruned, keep_out, keep_in, model, report, *, role: str,
               relu: bool = True) -> None:
    """Drop the producer's output channels that the consumer can do without, exactly (module doc):
    constant zero, unread, or constant folded into the consumer's bias. ``relu``: a ReLU acts
    between them (the constant of a pruned channel is ``relu(b)``, else ``b``)."""
    layer = model.get_submodule(consumer)
    b_p = biases[producer]
    channels = b_p.numel()
    # the consumer's weights as [out, producer channel, inputs that channel feeds]: a conv's kernel
    # positions, or the Linear columns the channel owns after pooling and flatten
    w = weights[consumer]
    w_q = w.flatten(2) if w.dim() == 4 else w.reshape(w.shape[0], channels, -1)
    if w_q.shape[1] != channels:
        raise SlimError(f"{consumer} reads {w_q.shape[1]} channels, {producer} gives {channels}")
    constant = torch.relu(b_p) if relu else b_p  # what a pruned channel outputs after BN (and ReLU)
    unused = (w_q[keep_out[consumer]].transpose(0, 1).flatten(1) == 0).all(1)
    # the constant adds the same to every output position: a Linear, or a 1x1 conv without padding
    uniform = isinstance(layer, nn.Linear) or (all(k == 1 for k in layer.kernel_size)
                                               and all(p == 0 for p in _padding(layer)) and layer.groups == 1)
    dead = pruned[producer] & (constant == 0)
    foldable = pruned[producer] & ~dead & ~unused & uniform
    drop = unused | dead | foldable
    if bool(drop.all()):
        # a layer needs >= 1 channel: keep one whose removal needed no folding (exact either way)
        candidates = torch.nonzero(drop & ~foldable).flatten()
        first = int(candidates[0]) if candidates.numel() else int(torch.nonzero(drop).flatten()[0])
        drop[first] = False
        foldable[first] = False
    if bool(foldable.any()):
        biases[consumer] = _fold_constants(biases[consumer], w_q, foldable, constant)
    keep_out[producer] = ~drop
    keep_in[consumer] = ~drop
    rep = report[producer]
    rep.update(role=role, dropped=int(drop.sum()), folded=int(foldable.sum()),
               kept_pruned=int((pruned[producer] & ~drop).sum()))


def _fold_constants(bias: torch.Tensor, w_q: torch.Tensor, channels: torch.Tensor, constant: torch.Tensor):
    """``bias`` plus what the input channels in the mask ``channels`` add when each carries its
    ``constant``: ``w_q`` is the consumer's weight as ``[out, channel, inputs of that channel]`` (1 for
    an unpadded 1x1 conv or a Linear after a Linear, the ``h * w`` flattened positions for VGG's
    first Linear). Exact only where that sum is the same at every output position."""
    return bias + (w_q[:, channels].sum(2) * constant[channels]).sum(1)


def _slim_residual_groups(model, weights, biases, pruned, keep_out, keep_in, report) -> dict:
    """Drop residual-group channels pruned in every producer and unread by every conv consumer
    (exact, see the module doc). Returns ``{"fc": (weight, bias)}`` when the classifier changed."""
    from vpns_fast.pruning.structured import residual_groups

    groups, producer = residual_groups(model)
    fc = getattr(model, "fc", None)
    linears = {}
    for index, members in enumerate(groups):
        last = index == len(groups) - 1
        if last and type(fc) is not nn.Linear:
            continue  # unknown head: keep the final stream whole
        consumers = [name for name, src in producer.items() if src == members[0]]
        drop = torch.stack([pruned[m] for m in members]).all(0)
        for q in consumers:
            w_q = weights[q][keep_out[q]]
            drop &= (w_q.transpose(0, 1).flatten(1) == 0).all(1)
        if bool(drop.all()):  # nn.Conv2d needs >= 1 channel: keep one (still exact)
            drop[int(torch.nonzero(drop).flatten()[0])] = False
        if not bool(drop.any()):
            continue
        if last:
            # the constant the stream carries on a dropped channel: the stem / first sum, then
            # relu(branch constant + stream) through the identity blocks
            b = {m: biases[m] for m in members}
            if members[0] == "conv1":
                stream, rest = torch.relu(b["conv1"]), members[1:]
            else:  # downsample (no ReLU on the shortcut) + the first block's branch
                stream, rest = torch.relu(b[members[0]] + b[members[1]]), members[2:]
            for m in rest:
                stream = torch.relu(b[m] + stream)
            w_fc = fc.weight.detach().double()
            b_fc = fc.bias.detach().double() if fc.bias is not None else torch.zeros(w_fc.shape[0], dtype=torch.float64)
            b_fc = _fold_constants(b_fc, w_fc[:, :, None], drop, stream)
            linears["fc"] = (w_fc[:, ~drop], b_fc)
        for m in members:
            keep_out[m] = keep_out[m] & ~drop
            report[m].update(dropped=int(drop.sum()), kept_pruned=int((pruned[m] & ~drop).sum()),
                             folded=int(drop.sum()) if last else 0)
        for q in consumers:
            keep_in[q] = keep_in[q] & ~drop
    return linears


def _padding(conv: nn.Conv2d) -> tuple[int, ...]:
    if isinstance(conv.padding, str):  # "same" pads (k - 1) // 2 for odd kernels; "valid" none
        return (0,) * len(conv.kernel_size) if conv.padding == "valid" else tuple(k - 1 for k in conv.kernel_size)
    return tuple(conv.padding)


def build_slim(base: nn.Module, architecture: dict) -> nn.Module:
    """Turn a stock model (from ``build_model``) into the slim architecture, ready for
    ``load_state_dict``: convs get the stored channel counts and a bias, BatchNorms become Identity."""
    convs = architecture.get("convs")
    folded = architecture.get("folded_bn")
    if not isinstance(convs, dict) or not isinstance(folded, list):
        raise SlimError("slim architecture description needs 'convs' (dict) and 'folded_bn' (list)")
    for name, counts in convs.items():
        conv = _named_submodule(base, name, "conv")
        if not isinstance(conv, nn.Conv2d) or len(counts) != 2:
            raise SlimError(f"slim architecture entry {name!r}: {counts!r} does not describe a Conv2d")
        in_channels, out_channels = int(counts[0]), int(counts[1])
        # the replaced layer's dtype, not torch's default: under a float64 default the rebuilt layer was float64,
        # the loaded weights were cast to it, and the CPU engine ran that layer dense
        new = nn.Conv2d(in_channels, out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                        conv.groups, True, conv.padding_mode, dtype=conv.weight.dtype, device=conv.weight.device)
        base.set_submodule(name, new)
    for name, counts in architecture.get("linears", {}).items():  # classifier inputs (dropped stream channels)
        linear = _named_submodule(base, name, "linear")
        if not isinstance(linear, nn.Linear) or len(counts) != 2:
            raise SlimError(f"slim architecture entry {name!r}: {counts!r} does not describe a Linear")
        base.set_submodule(name, nn.Linear(int(counts[0]), int(counts[1]), True, dtype=linear.weight.dtype,
                                           device=linear.weight.device))
    for name in folded:
        _named_submodule(base, name, "BatchNorm")
        base.set_submodule(name, nn.Identity())
    return base


def _named_submodule(model: nn.Module, name: str, kind: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        raise SlimError(f"slim architecture names {kind} {name!r}, which the model does not have") from exc

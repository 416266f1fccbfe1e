"""Slimming: physically remove pruned channels of a (folded) ResNet and fold BatchNorm into the
convolutions, giving a smaller dense network with the same outputs (eval mode).

What is removed, and why only that:

* Channels *inside* a residual block: the outputs of ``conv1`` (BasicBlock) and of
  ``conv1``/``conv2`` (Bottleneck), with the matching input channels of the next conv.
* Block outputs (``conv2``/``conv3``, the downsample conv, the stem) feed the residual sum
  ``branch + shortcut``: every branch and every later block reads the same channel index, so a
  channel of such a *residual group* (all convs adding into one stream, see
  :func:`vpns_fast.structured.residual_groups`) goes only when it is pruned in **every** producer
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

BatchNorm is folded in float64 (``W' = W * gamma / sqrt(var + eps)``, ``b' = beta - gamma * mean /
sqrt(var + eps)``) and the result cast back to the weights' dtype; BN modules become
``nn.Identity`` so torchvision's block ``forward`` runs unchanged.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

__all__ = ["SlimError", "slim_resnet", "build_slim", "conv_bn_pairs"]


class SlimError(ValueError):
    """The model cannot be slimmed (not a ResNet of BasicBlock / Bottleneck blocks, masked layers)."""


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv name, BatchNorm name) of every conv followed by a BatchNorm in a torchvision ResNet."""
    if not isinstance(model, ResNet):
        raise SlimError(f"slimming supports torchvision-style ResNets (resnet18/50, cifar_resnet18, "
                        f"small_resnet), got {type(model).__name__}")
    pairs = [("conv1", "bn1")]
    for name, block in model.named_modules():
        if isinstance(block, (BasicBlock, Bottleneck)):
            count = 3 if isinstance(block, Bottleneck) else 2
            pairs += [(f"{name}.conv{i}", f"{name}.bn{i}") for i in range(1, count + 1)]
            if block.downsample is not None:
                pairs.append((f"{name}.downsample.0", f"{name}.downsample.1"))
        elif isinstance(block, nn.Module) and type(block).__name__.startswith("Masked"):
            raise SlimError("slim a folded model (vpns_fast.fold), not one with masked layers")
    return pairs


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _conv_like(conv: nn.Conv2d, in_channels: int, out_channels: int, weight, bias) -> nn.Conv2d:
    new = nn.Conv2d(in_channels, out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups, True, conv.padding_mode, device="meta")
    new.weight = nn.Parameter(weight.to(conv.weight.dtype).contiguous(), requires_grad=False)
    new.bias = nn.Parameter(bias.to(conv.weight.dtype).contiguous(), requires_grad=False)
    return new


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
        conv, bn = slim.get_submodule(conv_name), slim.get_submodule(bn_name)
        if type(conv) is not nn.Conv2d or not isinstance(bn, nn.BatchNorm2d):
            raise SlimError(f"{conv_name} / {bn_name} must be a plain Conv2d and a BatchNorm2d "
                            f"(got {type(conv).__name__} / {type(bn).__name__}); fold masked models first")
        if bn.running_mean is None:
            raise SlimError(f"{bn_name} tracks no running statistics; cannot fold it")
        scale = (bn.weight.double() if bn.affine else torch.ones_like(bn.running_var, dtype=torch.float64))
        scale = scale / torch.sqrt(bn.running_var.double() + bn.eps)
        shift = bn.bias.double() if bn.affine else torch.zeros_like(scale)
        conv_bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
        weights[conv_name] = conv.weight.double() * scale[:, None, None, None]
        biases[conv_name] = shift + (conv_bias - bn.running_mean.double()) * scale
    pruned = {name: (w.flatten(1) == 0).all(1) for name, w in weights.items()}
    keep_out = {name: torch.ones(w.shape[0], dtype=torch.bool) for name, w in weights.items()}
    keep_in = {name: torch.ones(w.shape[1], dtype=torch.bool) for name, w in weights.items()}
    report = {name: {"channels": int(w.shape[0]), "pruned": int(pruned[name].sum()), "dropped": 0, "folded": 0,
                     "kept_pruned": int(pruned[name].sum()), "role": "block output (residual sum)"}
              for name, w in weights.items()}
    report["conv1"]["role"] = "stem (residual stream)"

    for block_name, block in slim.named_modules():
        if not isinstance(block, (BasicBlock, Bottleneck)):
            continue
        count = 3 if isinstance(block, Bottleneck) else 2
        convs = [f"{block_name}.conv{i}" for i in range(1, count + 1)]
        # Last edge first: a consumer's dropped output channels no longer count when asking
        # whether it reads a producer channel.
        for producer, consumer in reversed(list(zip(convs[:-1], convs[1:]))):
            _slim_edge(producer, consumer, weights, biases, pruned, keep_out, keep_in, slim, report)

    if residual_groups is None:
        from vpns_fast.structured import structured_config

        residual_groups = structured_config(model) is not None
    linears = (_slim_residual_groups(slim, weights, biases, pruned, keep_out, keep_in, report)
               if residual_groups else {})

    architecture = {"convs": {}, "folded_bn": [bn for _, bn in pairs]}
    if linears:
        architecture["linears"] = {}
        for name, (weight, bias) in linears.items():
            old = slim.get_submodule(name)
            new = nn.Linear(weight.shape[1], weight.shape[0], True, device="meta")
            new.weight = nn.Parameter(weight.to(old.weight.dtype).contiguous(), requires_grad=False)
            new.bias = nn.Parameter(bias.to(old.weight.dtype).contiguous(), requires_grad=False)
            _set(slim, name, new)
            architecture["linears"][name] = [int(weight.shape[1]), int(weight.shape[0])]
    for conv_name, bn_name in pairs:
        conv = slim.get_submodule(conv_name)
        w = weights[conv_name][keep_out[conv_name]][:, keep_in[conv_name]]
        b = biases[conv_name][keep_out[conv_name]]
        _set(slim, conv_name, _conv_like(conv, w.shape[1], w.shape[0], w, b))
        _set(slim, bn_name, nn.Identity())
        architecture["convs"][conv_name] = [int(w.shape[1]), int(w.shape[0])]
    for p in slim.parameters():
        p.requires_grad_(False)
    return slim, architecture, report


def _slim_edge(producer, consumer, weights, biases, pruned, keep_out, keep_in, model, report) -> None:
    conv = model.get_submodule(consumer)
    b_p, w_q = biases[producer], weights[consumer]
    constant = torch.relu(b_p)  # what a pruned channel outputs after BN and ReLU
    unused = (w_q[keep_out[consumer]].transpose(0, 1).flatten(1) == 0).all(1)
    pointwise = (all(k == 1 for k in conv.kernel_size) and all(p == 0 for p in _padding(conv))
                 and conv.groups == 1)
    dead = pruned[producer] & (constant == 0)
    foldable = pruned[producer] & ~dead & ~unused & pointwise
    drop = unused | dead | foldable
    if bool(drop.all()):
        # nn.Conv2d needs >= 1 channel: keep one whose removal needed no folding (exact either way)
        candidates = torch.nonzero(drop & ~foldable).flatten()
        first = int(candidates[0]) if candidates.numel() else int(torch.nonzero(drop).flatten()[0])
        drop[first] = False
        foldable[first] = False
    if bool(foldable.any()):
        # pointwise, unpadded consumer: the constant adds W[:, c] * k at every output position
        biases[consumer] = biases[consumer] + (w_q[:, foldable, 0, 0] * constant[foldable]).sum(1)
    keep_out[producer] = ~drop
    keep_in[consumer] = ~drop
    rep = report[producer]
    rep.update(role=f"inside block (feeds {consumer})", dropped=int(drop.sum()), folded=int(foldable.sum()),
               kept_pruned=int((pruned[producer] & ~drop).sum()))


def _slim_residual_groups(model, weights, biases, pruned, keep_out, keep_in, report) -> dict:
    """Drop residual-group channels pruned in every producer and unread by every conv consumer
    (exact, see the module doc). Returns ``{"fc": (weight, bias)}`` when the classifier changed."""
    from vpns_fast.structured import residual_groups

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
            b_fc = b_fc + (w_fc[:, drop] * stream[drop]).sum(1)
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
        new = nn.Conv2d(in_channels, out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                        conv.groups, True, conv.padding_mode)
        _set(base, name, new)
    for name, counts in architecture.get("linears", {}).items():  # classifier inputs (dropped stream channels)
        linear = _named_submodule(base, name, "linear")
        if not isinstance(linear, nn.Linear) or len(counts) != 2:
            raise SlimError(f"slim architecture entry {name!r}: {counts!r} does not describe a Linear")
        _set(base, name, nn.Linear(int(counts[0]), int(counts[1]), True))
    for name in folded:
        _named_submodule(base, name, "BatchNorm")
        _set(base, name, nn.Identity())
    return base


def _named_submodule(model: nn.Module, name: str, kind: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        raise SlimError(f"slim architecture names {kind} {name!r}, which the model does not have") from exc

"""Structured channel mode (docs/method.md §9): shared residual-group scores, input-channel masking, the
global channel threshold counted once per group, the early-layer cap, exact slim export, trainer."""
import math
import os

import pytest
import torch
from helpers import randomize_batchnorm
from tolerance import assert_close
from torch import nn

import vpns_fast as V
from vpns_fast import cli
from vpns_fast.deploy.export import export, load_slim
from vpns_fast.deploy.slim import slim_resnet
from vpns_fast.models import build_model
from vpns_fast.pruning.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from vpns_fast.pruning.masking import parameter_groups
from vpns_fast.pruning.structured import channel_density
from vpns_fast.training.trainer import TrainConfig, TwoStageTrainer

# small_resnet: conv1 -> layer1.0 (identity shortcut) -> layer2.0 (downsample) -> layer3.0 (downsample)
SMALL_GROUPS = [["conv1", "layer1.0.conv2"], ["layer2.0.conv2", "layer2.0.downsample.0"],
                ["layer3.0.conv2", "layer3.0.downsample.0"]]
SMALL_PRODUCER = {"conv1": None, "layer1.0.conv1": "conv1", "layer1.0.conv2": "layer1.0.conv1",
                  "layer2.0.conv1": "layer1.0.conv2", "layer2.0.conv2": "layer2.0.conv1",
                  "layer2.0.downsample.0": "layer1.0.conv2", "layer3.0.conv1": "layer2.0.conv2",
                  "layer3.0.conv2": "layer3.0.conv1", "layer3.0.downsample.0": "layer2.0.conv2"}


def structured(name="small_resnet", density=None, seed=0, **kwargs):
    model = build_model(name, num_classes=10)
    randomize_batchnorm(model)
    V.sparsify(model, "channel", structured=True, **kwargs)
    with torch.no_grad():  # distinct score magnitudes: no ties at the threshold
        g = torch.Generator().manual_seed(seed)
        for scores in {id(layer.scores): layer.scores for _, layer in V.masked_layers(model)}.values():
            scores.copy_(torch.rand(scores.shape, generator=g) + 0.01)
    if density is not None:
        V.set_density(model, density)
    return model


def layers(model):
    return dict(V.masked_layers(model))


def test_residual_groups_share_one_parameter_and_the_classifier_stays_dense():
    model = structured()
    by_name = layers(model)
    assert isinstance(model.fc, nn.Linear) and "fc" not in by_name
    for group in SMALL_GROUPS:
        assert all(by_name[n].scores is by_name[group[0]].scores for n in group), group
    assert by_name["layer1.0.conv1"].scores is not by_name["conv1"].scores
    assert all(tuple(layer.scores.shape) == (layer.out_channels, 1, 1, 1) for layer in by_name.values())
    unique = {id(layer.scores) for layer in by_name.values()}
    assert len(parameter_groups(model)["scores"]) == len(unique) == 6  # listed once for the optimizer
    assert sum(1 for _ in model.parameters()) == len(list(dict.fromkeys(model.parameters())))
    model18 = structured("cifar_resnet18")
    by18 = layers(model18)
    assert by18["conv1"].scores is by18["layer1.0.conv2"].scores is by18["layer1.1.conv2"].scores
    assert by18["layer4.0.downsample.0"].scores is by18["layer4.1.conv2"].scores


@pytest.mark.parametrize("density", [0.3, 0.5, 0.8])
def test_set_density_counts_each_group_once(density):
    model = structured("cifar_resnet18", cap_layers=0)
    unique = list({id(layer.scores): layer.scores for layer in layers(model).values()}.values())
    total = sum(s.numel() for s in unique)
    threshold = V.set_density(model, density)
    expected = torch.kthvalue(torch.cat([s.detach().abs().flatten() for s in unique]),
                              int((1 - density) * total)).values
    assert threshold == expected
    assert all(layer.threshold == expected for layer in layers(model).values())
    assert abs(channel_density(model) - density) <= 1 / total
    # "layer" scope: one threshold per shared vector, the same on every member
    thresholds = V.set_density(model, density, "layer")
    assert thresholds.numel() == len(unique)
    for group in (["conv1", "layer1.0.conv2", "layer1.1.conv2"], ["layer3.0.conv2", "layer3.0.downsample.0"]):
        assert len({float(layers(model)[n].threshold) for n in group}) == 1


def test_input_channel_masking_gives_out_times_in():
    model = structured(density=0.5, cap_layers=0)
    by_name = layers(model)
    for name, layer in by_name.items():
        out = (layer.scores.abs() > layer.threshold).reshape(-1, 1, 1, 1)
        src = SMALL_PRODUCER[name]
        inn = (torch.ones(1, layer.in_channels, 1, 1, dtype=torch.bool) if src is None else
               (by_name[src].scores.abs() > by_name[src].threshold).reshape(1, -1, 1, 1))
        assert torch.equal(layer.weight_mask(), (out & inn).expand_as(layer.weight)), name
        assert torch.equal(V.masks(model)[name], layer.weight_mask())
    # a pruned channel of the layer1 residual group: zero weights on that input of its consumers
    group = by_name["conv1"]
    pruned = torch.nonzero(~group.score_mask().flatten()).flatten()
    assert pruned.numel() > 0
    for consumer in ("layer1.0.conv1", "layer2.0.conv1", "layer2.0.downsample.0"):
        assert not by_name[consumer].masked_weight()[:, pruned].any(), consumer
    kept = sum(int(layer.weight_mask().sum()) for layer in by_name.values())
    # every weight matrix counts: the classifier stays dense in structured mode
    classifier = model.fc.weight.numel()
    assert V.actual_density(model) == ((kept + classifier)
                                       / (sum(layer.weight.numel() for layer in by_name.values()) + classifier))
    # plain (non-structured) masked layers are unaffected
    plain = build_model("small_resnet", num_classes=10)
    V.sparsify(plain, "channel")
    assert all(layer.input_mask() is None for _, layer in V.masked_layers(plain))


def test_early_layers_are_capped():
    density = 0.2
    model = structured("cifar_resnet18", density=density)
    convs = [layer for _, layer in V.masked_layers(model)]
    for layer in convs[:5]:
        c = layer.out_channels
        assert int(layer.score_mask().sum()) >= math.ceil(0.75 * c)
    uncapped = structured("cifar_resnet18", density=density, cap_layers=0)
    assert any(int(layer.score_mask().sum()) < math.ceil(0.75 * layer.out_channels)
               for _, layer in list(V.masked_layers(uncapped))[:5])
    assert channel_density(model) >= density  # the cap only keeps more
    # a capped layer's whole group follows its threshold (conv1's group contains layer1.*.conv2)
    by_name = layers(model)
    assert by_name["conv1"].threshold == by_name["layer1.1.conv2"].threshold
    # configurable: a 10% cap on the first 2 convs
    tight = structured("cifar_resnet18", density=density, cap_layers=2, cap_sparsity=0.1)
    for _, layer in list(V.masked_layers(tight))[:2]:
        assert int(layer.score_mask().sum()) >= math.ceil(0.9 * layer.out_channels)


@torch.no_grad()
def test_masked_output_equals_explicitly_zeroed_channels():
    model = structured(density=0.4).eval()
    by_name = layers(model)
    reference = build_model("small_resnet", num_classes=10)
    reference.load_state_dict({k: v for k, v in model.state_dict().items()
                               if not k.endswith((".scores", ".threshold"))})
    for name, layer in by_name.items():
        w = layer.dense_weight.clone()
        w[~layer.score_mask().flatten()] = 0
        if SMALL_PRODUCER[name] is not None:
            w[:, ~by_name[SMALL_PRODUCER[name]].score_mask().flatten()] = 0
        reference.get_submodule(name).weight.copy_(w)
    reference.eval()
    x = torch.randn(3, 3, 32, 32)
    assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)


def test_ste_gradient_reaches_shared_scores_from_every_member():
    model = structured(density=0.5).train()
    x = torch.randn(4, 3, 32, 32)

    def grad_of(shared, live):
        by_name = layers(model)
        saved = {n: by_name[n].scores for n in SMALL_GROUPS[1]}
        for n in SMALL_GROUPS[1]:  # members other than `live` read a frozen copy
            if n not in live:
                by_name[n].scores = nn.Parameter(shared.detach().clone(), requires_grad=False)
        shared.grad = None
        model(x).square().sum().backward()
        for n, p in saved.items():
            by_name[n].scores = p
        return shared.grad.clone()

    shared = layers(model)[SMALL_GROUPS[1][0]].scores
    total = grad_of(shared, SMALL_GROUPS[1])
    parts = [grad_of(shared, [n]) for n in SMALL_GROUPS[1]]
    assert all(p.abs().sum() > 0 for p in parts)
    assert_close(total, sum(parts), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["small_resnet", "cifar_resnet18"])
def test_fold_and_slim_export_match_the_masked_model(tmp_path, name):
    model = structured(name, density=0.4).eval()
    slim, _, report = slim_resnet(V.fold(model))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        assert_close(V.fold(model)(x), ref, rtol=1e-4, atol=1e-4)
        assert (slim(x) - ref).abs().max() <= 1e-4 * ref.abs().max().clamp_min(1)
    dropped = sum(r["dropped"] for r in report.values())
    assert dropped > 0 and sum(r["kept_pruned"] for r in report.values()) == 0  # every pruned channel gone
    assert any(r["dropped"] > 0 for r in report.values() if not r["role"].startswith("inside"))  # block outputs
    # through a checkpoint (structured config restored) and the slim export format
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, model_name=name, model_kwargs={"num_classes": 10}, input_size=(3, 32, 32))
    restored = model_from_checkpoint(load_checkpoint(path)).eval()
    assert layers(restored)["conv1"].scores is layers(restored)["layer1.0.conv2"].scores
    meta = export(path, "slim", tmp_path / "m.slim")
    loaded = load_slim(tmp_path / "m.slim")
    with torch.no_grad():
        assert (loaded(x) - ref).abs().max() <= 1e-4 * ref.abs().max().clamp_min(1)
    assert meta["channels_dropped"] == dropped
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in V.fold(model).parameters())
    print(f"{name}: {dropped} conv output channels removed")


def test_trainer_structured_run_reaches_its_density(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = TrainConfig(dataset="synthetic", limit=32, batch_size=32, model="small_resnet", search_epochs=1,
                             finetune_epochs=1, methods=("vpns",), densities=(0.5,), progress=False,
                             deterministic=True, device="cpu", granularity="channel", structured=True,
                             out=str(tmp_path / "run"))
        TwoStageTrainer(config).run()
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)
    payload = load_checkpoint(os.path.join(str(tmp_path / "run"), "runs", "vpns_d0.5", "last.pt"))
    assert payload["structured"] == {"cap_layers": 5, "cap_sparsity": 0.25}
    model = model_from_checkpoint(payload)
    saved = {n: layer.threshold.clone() for n, layer in V.masked_layers(model)}
    V.set_density(model, 0.5)  # the saved mask is the structured set_density of the final scores
    assert all(torch.equal(saved[n], layer.threshold) for n, layer in V.masked_layers(model))
    assert channel_density(model) >= 0.5
    for _, layer in list(V.masked_layers(model))[:5]:
        assert int(layer.score_mask().sum()) >= math.ceil(0.75 * layer.out_channels)


def test_errors():
    with pytest.raises(ValueError, match="granularity='channel'"):
        V.sparsify(build_model("small_resnet"), "unstructured", structured=True)
    with pytest.raises(ValueError, match="ResNets .* and VGGs"):
        V.sparsify(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), "channel", structured=True)
    with pytest.raises(ValueError, match="every conv masked"):
        V.sparsify(build_model("small_resnet"), "channel", exclude="layer2.*", structured=True)
    with pytest.raises(ValueError, match="granularity='channel'"):
        TrainConfig(dataset="synthetic", structured=True)
    assert cli.main(["prune", "--dataset", "synthetic", "--structured", "--no-progress"]) == 2


def test_magnitude_scores_average_a_shared_group():
    """OMP/IMP on structured models: a residual group's shared score is its members' mean magnitude."""
    from vpns_fast.pruning.methods import magnitude_scores

    model = V.sparsify(build_model("small_resnet", num_classes=10), granularity="channel", structured=True)
    magnitude_scores(model)
    members: dict[int, list] = {}
    for _, layer in V.masked_layers(model):
        members.setdefault(id(layer.scores), []).append(layer)
    shared = next(group for group in members.values() if len(group) > 1)
    expected = torch.stack([layer.dense_weight.detach().abs().mean(dim=(1, 2, 3), keepdim=True)
                            for layer in shared]).mean(0)
    assert_close(shared[0].scores.detach(), expected)

"""Slimming torchvision VGGs (with and without BatchNorm): exact against the folded model, channel
counts shrink, which pruned channels must stay (constant before a padded 3x3 conv), the slim export
round trip and deploy, and clear errors for what cannot be slimmed."""
import pytest
import tolerance
import torch
from helpers import randomize_batchnorm
from test_export import assert_close
from torch import nn
from torchvision.models import VGG
from torchvision.models.vgg import make_layers

import vpns_fast as V
from vpns_fast import models
from vpns_fast.deploy.export import export, load_slim
from vpns_fast.deploy.runtime import deploy
from vpns_fast.deploy.slim import SlimError, build_slim, slim_model, slim_vgg
from vpns_fast.nn.prompts import normalize
from vpns_fast.ops import IMAGENET_MEAN, IMAGENET_STD
from vpns_fast.pruning.checkpoint import save_checkpoint

CFG = [8, "M", 16, "M", 16, "M"]  # 32x32 inputs -> 16 channels of 4x4 -> AdaptiveAvgPool2d(7)
# float64: slim and folded differ only by the rounding of BN folding and of the folded bias terms
# (measured <= 3e-16 of the largest logit)
EXACT_RTOL = 1e-12


def tiny_vgg(batch_norm: bool, num_classes: int = 10) -> VGG:
    """torchvision's VGG at test size: ``make_layers(CFG)`` and a 784-32-24-classes classifier,
    with biases of both signs so that pruned channels output nonzero constants."""
    with torch.device("meta"):  # torchvision's 4096-wide head (120M weights), replaced below
        model = VGG(nn.Sequential(), num_classes=num_classes, init_weights=False)
    model.features = make_layers(CFG, batch_norm=batch_norm)
    model.classifier = nn.Sequential(nn.Linear(16 * 49, 32), nn.ReLU(True), nn.Dropout(), nn.Linear(32, 24),
                                     nn.ReLU(True), nn.Dropout(), nn.Linear(24, num_classes))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.bias.normal_(0, 0.5)
    randomize_batchnorm(model)
    return model.eval()


def convs_and_linears(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def assert_exact(slim: nn.Module, folded: nn.Module, batch: int = 3) -> None:
    """float64 models (slimmed from a float64 model, so no weight was rounded to float32)."""
    assert all(p.dtype == torch.float64 for p in (*slim.parameters(), *folded.parameters()))
    x = torch.rand(batch, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        ref, out = folded(x), slim(x)
    tolerance.assert_close(out, ref, relative_to_max=True, rtol=EXACT_RTOL)


# --------------------------------------------------------------------------- pruned by sparsify

@pytest.mark.parametrize("batch_norm", [False, True], ids=["vgg", "vgg_bn"])
@pytest.mark.parametrize("granularity,density", [("channel", 0.5), ("channel", 0.25), ("kernel", 0.3)])
def test_slim_matches_the_folded_model_and_shrinks(batch_norm, granularity, density):
    model = tiny_vgg(batch_norm)
    V.sparsify(model, granularity)
    V.set_density(model, density, scope="layer")
    folded = V.fold(model.eval()).eval()
    slim, architecture, report = slim_model(folded)
    assert type(slim) is VGG and not any(isinstance(m, nn.BatchNorm2d) for m in slim.modules())
    assert len(architecture["folded_bn"]) == (3 if batch_norm else 0)
    x = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        assert_close(slim(x), model(x))  # float32, against the masked model
    folded = folded.double()
    assert_exact(slim_model(folded)[0], folded)

    layers = convs_and_linears(folded)
    assert list(report) == layers
    sizes = {**architecture["convs"], **architecture.get("linears", {})}
    for name, row in report.items():
        assert sizes[name][1] == row["channels"] - row["dropped"], name  # out channels / units
        assert row["dropped"] + row["kept_pruned"] >= row["pruned"], name
    assert report[layers[-1]]["dropped"] == 0 and report[layers[-1]]["role"] == "output (logits)"
    # the last conv and the hidden Linears feed a Linear: every pruned channel or unit goes,
    # folded unless its constant is zero (one stays only if all were pruned)
    for name in (layers[2], layers[3], layers[4]):
        row = report[name]
        assert row["kept_pruned"] == 0 or row["dropped"] == row["channels"] - 1, name
    assert architecture["linears"][layers[3]][0] == 49 * architecture["convs"][layers[2]][1]
    if granularity == "channel":
        assert sum(r["dropped"] for r in report.values()) > 0
        assert sum(r["folded"] for r in report.values()) > 0
        assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in folded.parameters())


# --------------------------------------------------------------------------- chosen channels

def _prune(layer: nn.Module, channel: int, bias: float) -> None:
    with torch.no_grad():
        layer.weight[channel] = 0
        layer.bias[channel] = bias


@torch.no_grad()
def test_padded_consumer_keeps_a_live_constant_and_drops_the_rest():
    model = tiny_vgg(batch_norm=False)
    conv0, conv1, conv2 = model.features[0], model.features[3], model.features[6]
    fc0, fc1 = model.classifier[0], model.classifier[3]
    _prune(conv0, 0, 0.7)  # relu(0.7) reaches the padded 3x3 conv1: its borders differ -> kept
    _prune(conv0, 1, -0.3)  # relu(-0.3) = 0 -> dropped
    conv1.weight[:, 2] = 0  # conv0 channel 2 is live but unread -> dropped
    _prune(conv2, 5, 0.4)  # constant over all 49 inputs of classifier.0 -> folded into its bias
    _prune(conv2, 6, 0.0)  # constant zero -> dropped without folding
    _prune(fc0, 3, 0.5)  # hidden unit: relu(0.5) folded into classifier.3's bias
    _prune(fc0, 4, -0.5)  # relu(-0.5) = 0 -> dropped
    fc1.weight[:, 7] = 0  # unit 7 of classifier.0 is unread -> dropped
    slim, architecture, report = slim_vgg(model.double())
    assert_exact(slim, model)
    assert (report["features.0"]["dropped"], report["features.0"]["folded"], report["features.0"]["kept_pruned"]) \
        == (2, 0, 1)
    assert architecture["convs"]["features.0"] == [3, 6] and architecture["convs"]["features.3"] == [6, 16]
    assert (report["features.6"]["dropped"], report["features.6"]["folded"]) == (2, 1)
    assert architecture["linears"]["classifier.0"] == [14 * 49, 29]
    assert (report["classifier.0"]["dropped"], report["classifier.0"]["folded"]) == (3, 1)
    assert architecture["linears"]["classifier.3"] == [29, 24]


@torch.no_grad()
def test_pointwise_consumer_takes_the_constant_into_its_bias():
    model = tiny_vgg(batch_norm=True)
    # a 1x1 unpadded conv after the first one: a pruned channel's constant is the same at every
    # position, so it is folded into the 1x1 conv's bias and dropped
    model.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(True),
                                   nn.Conv2d(8, 16, 1), nn.ReLU(True), nn.MaxPool2d(2), nn.MaxPool2d(2),
                                   nn.MaxPool2d(2))
    randomize_batchnorm(model, seed=3)
    model.features[1].bias.fill_(1.0)  # positive constants: nothing is dead
    model.features[1].running_mean.zero_()
    model.features[0].weight[:3] = 0
    slim, architecture, report = slim_vgg(model.eval().double())
    assert (report["features.0"]["dropped"], report["features.0"]["folded"]) == (3, 3)
    assert architecture["convs"]["features.3"] == [5, 16] and architecture["folded_bn"] == ["features.1"]
    assert_exact(slim, model)


@torch.no_grad()
def test_a_fully_pruned_layer_keeps_one_channel():
    model = tiny_vgg(batch_norm=True)
    # the last conv and the second Linear pruned whole: their constants are folded into the next
    # Linear, and nothing reads the layer before them; every layer keeps one channel / unit
    model.features[8].weight.zero_()
    model.classifier[3].weight.zero_()
    slim, architecture, report = slim_vgg(model.double())
    assert [architecture["convs"][name][1] for name in ("features.0", "features.4", "features.8")] == [8, 1, 1]
    assert [architecture["linears"][name] for name in ("classifier.0", "classifier.3")] == [[49, 1], [1, 1]]
    assert report["features.8"]["dropped"] == 15 and report["classifier.3"]["dropped"] == 23
    assert_exact(slim, model)


# --------------------------------------------------------------------------- export, deploy

@pytest.fixture
def tiny_vgg16(monkeypatch):
    """``build_model("vgg16")`` builds the tiny VGG with BatchNorm, so checkpoints and exports go
    through the real model-name path at test size."""
    weights = models._TORCHVISION["vgg16"][1]
    monkeypatch.setitem(models._TORCHVISION, "vgg16",
                        (lambda weights=None, num_classes=10: tiny_vgg(True, num_classes), weights))


def test_slim_export_round_trip_and_deploy(tmp_path, tiny_vgg16):
    model = models.build_model("vgg16", num_classes=10)
    V.sparsify(model, "channel")
    V.set_density(model, 0.5, scope="layer")
    model.eval()
    save_checkpoint(tmp_path / "m.pt", model, model_name="vgg16", model_kwargs={"num_classes": 10},
                    input_size=(3, 32, 32))
    meta = export(tmp_path / "m.pt", "slim", tmp_path / "m.slim")
    assert meta["channels_dropped"] > 0 and "linears" in meta["architecture"]
    loaded = load_slim(tmp_path / "m.slim")
    slim, architecture, report = slim_model(V.fold(model))
    assert architecture == meta["architecture"]
    convs = {name for name, m in slim.named_modules() if isinstance(m, nn.Conv2d)}
    assert meta["channels_dropped"] == sum(report[name]["dropped"] for name in convs)  # channels, not units
    assert meta["units_dropped"] == sum(r["dropped"] for name, r in report.items() if name not in convs) > 0
    rebuilt = build_slim(tiny_vgg(True), architecture)
    rebuilt.load_state_dict(slim.state_dict())
    images = torch.rand(4, 3, 32, 32)
    x = normalize(images, IMAGENET_MEAN, IMAGENET_STD)
    with torch.no_grad():
        ref = model(x)
        assert torch.equal(loaded(x), slim(x)) and torch.equal(rebuilt.eval()(x), slim(x))
        assert_close(loaded(x), ref)
        assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in V.fold(model).parameters())
        for source in (tmp_path / "m.slim", tmp_path / "m.pt"):
            module = deploy(source, policy="dense")
            assert module.info["network"] == "slim", source
            assert_close(module(images), ref)


# --------------------------------------------------------------------------- structured mode

@pytest.mark.parametrize("batch_norm", [False, True], ids=["vgg", "vgg_bn"])
def test_structured_vgg_masks_inputs_and_slims_every_pruned_channel(batch_norm):
    """Structured mode on a VGG: each conv is input-masked by the previous one, the classifier stays
    dense, the early-layer cap holds, and the slim network drops every pruned channel exactly
    (plain channel masks must keep those with a live constant before a padded 3x3)."""
    model = tiny_vgg(batch_norm)
    V.sparsify(model, "channel", structured=True, cap_layers=1, cap_sparsity=0.25)
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    layers = dict(V.masked_layers(model))
    assert list(layers) == convs  # the classifier's Linears stay plain
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for layer in layers.values():
            layer.scores.copy_(torch.rand(layer.scores.shape, generator=g) + 0.01)
    V.set_density(model, 0.4)
    first = layers[convs[0]]
    assert first.input_mask() is None and int(first.score_mask().sum()) >= 6  # capped: >= 75% of 8
    for producer, consumer in zip(convs, convs[1:]):
        out = layers[consumer].score_mask().reshape(-1, 1, 1, 1)
        inn = layers[producer].score_mask().reshape(1, -1, 1, 1)
        assert torch.equal(layers[consumer].weight_mask(), (out & inn).expand_as(layers[consumer].weight))
    assert any(not bool(layers[c].score_mask().all()) for c in convs[:-1])  # some inner channel is pruned
    model.eval()
    folded = V.fold(model).eval()
    slim, _, report = slim_model(folded)
    assert all(report[name]["kept_pruned"] == 0 for name in convs), report
    x = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        assert_close(slim(x), model(x))
    folded = folded.double()
    assert_exact(slim_model(folded)[0], folded)
    # plain channel masks at the same scores keep some of those channels (the reason for the mode)
    plain = tiny_vgg(batch_norm)
    V.sparsify(plain, "channel")
    with torch.no_grad():
        for name, layer in V.masked_layers(plain):
            if name in layers:
                layer.scores.copy_(layers[name].scores)
        for layer in (m for n, m in V.masked_layers(plain) if n not in layers):
            layer.scores.fill_(1.0)  # the classifier keeps everything, as in structured mode
        for name, layer in V.masked_layers(plain):
            layer.set_threshold(layers[name].threshold if name in layers else -1.0)
    _, _, plain_report = slim_model(V.fold(plain.eval()).eval())
    assert sum(plain_report[name]["kept_pruned"] for name in convs) > 0


def test_structured_vgg_checkpoint_and_slim_export(tmp_path, tiny_vgg16):
    model = models.build_model("vgg16", num_classes=10)
    V.sparsify(model, "channel", structured=True)
    V.set_density(model, 0.5)
    model.eval()
    save_checkpoint(tmp_path / "m.pt", model, model_name="vgg16", model_kwargs={"num_classes": 10},
                    input_size=(3, 32, 32))
    from vpns_fast.pruning.checkpoint import load_checkpoint, model_from_checkpoint

    restored = model_from_checkpoint(load_checkpoint(tmp_path / "m.pt")).eval()
    restored_layers = dict(V.masked_layers(restored))
    assert restored_layers["features.4"].in_mask_source is restored_layers["features.0"]
    meta = export(tmp_path / "m.pt", "slim", tmp_path / "m.slim")
    assert meta["channels_dropped"] > 0
    assert all(row["kept_pruned"] == 0 for name, row in meta["channels"].items() if name.startswith("features"))
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert_close(load_slim(tmp_path / "m.slim")(x), model(x))
        assert_close(restored(x), model(x))


# --------------------------------------------------------------------------- errors

def test_errors_are_clear():
    with pytest.raises(SlimError, match="ResNets .* and VGGs"):
        slim_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    masked = tiny_vgg(False)
    V.sparsify(masked, "channel")
    with pytest.raises(SlimError, match="fold"):
        slim_model(masked)
    model = tiny_vgg(False)
    model.features[2] = nn.AvgPool2d(2)
    with pytest.raises(SlimError, match="features.2: AvgPool2d is not supported"):
        slim_vgg(model)
    model = tiny_vgg(False)
    model.avgpool = nn.AdaptiveAvgPool2d((None, 7))
    with pytest.raises(SlimError, match="AdaptiveAvgPool2d of a fixed size"):
        slim_vgg(model)
    model = tiny_vgg(False)
    model.avgpool = nn.AdaptiveAvgPool2d(6)
    with pytest.raises(SlimError, match="classifier.0 reads 784 features"):
        slim_vgg(model)
    model = tiny_vgg(False)
    model.features[3] = nn.Conv2d(8, 16, 3, padding=1, groups=2)
    with pytest.raises(SlimError, match="grouped"):
        slim_vgg(model)
    model = tiny_vgg(True)
    model.features[1] = nn.BatchNorm2d(8, track_running_stats=False)
    with pytest.raises(SlimError, match="running statistics"):
        slim_vgg(model)
    with pytest.raises(SlimError, match="does not have"):
        build_slim(tiny_vgg(False), {"convs": {"features.99": [3, 4]}, "folded_bn": []})
    with pytest.raises(SlimError, match="does not describe a Linear"):
        build_slim(tiny_vgg(False), {"convs": {}, "folded_bn": [], "linears": {"features.0": [3, 4]}})

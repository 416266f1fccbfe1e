"""Pruning state: sparsify, thresholds and masks (exact), score gradients, fold, stages, report."""
import math
import warnings

import pytest
import torch
import torchvision
from tolerance import assert_close
from torch import nn

import vpns_fast as V
from vpns_fast.pruning.masking import TiedScoresWarning


def tiny_net(num_classes=5):
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 7, 3, stride=2, padding=1), nn.BatchNorm2d(7), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(7, num_classes))


def test_sparsify_replaces_every_conv_and_linear_and_shares_parameters():
    model = tiny_net()
    weights = [m.weight for m in model if isinstance(m, (nn.Conv2d, nn.Linear))]
    V.sparsify(model)
    layers = V.masked_layers(model)
    assert [n for n, _ in layers] == ["0", "3", "8"]
    assert [layer.dense_weight for _, layer in layers] == weights  # same Parameter objects
    for _, layer in layers:
        assert layer.scores.shape == layer.weight.shape and layer.threshold.item() == -math.inf
        assert not isinstance(layer.weight, nn.Parameter)  # reading .weight gives the masked weight
    assert isinstance(model[0], nn.Conv2d)


def test_sparsify_exclude_and_errors():
    model = V.sparsify(tiny_net(), exclude=["8"])
    assert [n for n, _ in V.masked_layers(model)] == ["0", "3"]
    with pytest.raises(ValueError, match="already has masked layers"):
        V.sparsify(model)
    with pytest.raises(ValueError, match="granularity"):
        V.sparsify(tiny_net(), granularity="row")
    with pytest.raises(ValueError, match="score_init"):
        V.sparsify(tiny_net(), score_init="zeros")
    with pytest.raises(ValueError, match="sparsify"):
        V.set_density(tiny_net(), 0.5)


def test_scaled_init_formula():
    model = V.sparsify(tiny_net())
    conv = model[3]
    w = conv.weight.detach()
    expected = math.sqrt(6 / w[0].numel()) * w / w.abs().max()
    assert_close(conv.scores.detach(), expected, rtol=0, atol=0)


@pytest.mark.parametrize("granularity,shape", [("unstructured", (7, 8, 3, 3)), ("kernel", (7, 8, 1, 1)),
                                               ("channel", (7, 1, 1, 1))])
def test_score_shapes(granularity, shape):
    model = V.sparsify(tiny_net(), granularity=granularity)
    assert tuple(model[3].scores.shape) == shape
    assert V.masks(model)["3"].shape == model[3].weight.shape


@pytest.mark.parametrize("density", [1.0, 0.9, 0.5, 0.1, 0.01])
def test_global_threshold_and_masks_match_kthvalue(density):
    model = V.sparsify(tiny_net())
    # duplicated magnitudes so that ties sit at the threshold
    for _, layer in V.masked_layers(model):
        layer.scores.data = torch.randint(-4, 5, layer.scores.shape).float()
    t = V.set_density(model, density)
    scores = [layer.scores.detach() for _, layer in V.masked_layers(model)]
    flat = torch.cat([s.abs().flatten() for s in scores])
    k = int((1 - density) * flat.numel())
    if k >= 1:
        assert torch.equal(t, torch.kthvalue(flat, k).values)
    for (name, layer), s in zip(V.masked_layers(model), scores):
        expected = s.abs() > (torch.kthvalue(flat, k).values if k >= 1 else -1)
        assert torch.equal(V.masks(model)[name], expected)
        assert layer.threshold.dtype == torch.float32


def test_layer_scope_gives_each_layer_its_density():
    model = V.sparsify(tiny_net())
    ts = V.set_density(model, 0.25, scope="layer")
    for t, (_, layer) in zip(ts, V.masked_layers(model)):
        flat = layer.scores.detach().abs().flatten()
        assert torch.equal(t, torch.kthvalue(flat, int(0.75 * flat.numel())).values)
        assert layer.threshold == t


def test_score_gradient_goes_through_abs():
    """dL/ds = dL/dW_eff * W * sign(s); dL/dW = dL/dW_eff * m (docs/method.md §3)."""
    model = V.sparsify(tiny_net())
    V.set_density(model, 0.5)
    conv = model[3]
    x = torch.rand(2, 3, 8, 8)
    weff = (conv.dense_weight.detach() * V.masks(model)["3"]).requires_grad_()
    captured = {}
    handle = conv.register_forward_hook(lambda m, i, o: captured.update(x=i[0].detach()))  # returns None
    model(x).sum().backward()
    handle.remove()
    out = torch.nn.functional.conv2d(captured["x"], weff, conv.bias, conv.stride, conv.padding)
    # replay the rest of the network from this conv's output to get dL/dW_eff
    rest = nn.Sequential(*list(model)[4:])
    rest(out).sum().backward()
    g = weff.grad
    assert_close(conv.scores.grad, g * conv.dense_weight.detach() * conv.scores.detach().sign())
    assert_close(conv.dense_weight.grad, g * V.masks(model)["3"])


def test_fold_gives_torchvision_state_dict_and_same_outputs():
    model = torchvision.models.resnet18(num_classes=10)
    keys = set(model.state_dict())
    V.sparsify(model, granularity="kernel")
    V.set_density(model, 0.3)
    folded = V.fold(model)
    assert set(folded.state_dict()) == keys
    assert not any(isinstance(m, (V.MaskedConv2d, V.MaskedLinear)) for m in folded.modules())
    model.eval(), folded.eval()
    x = torch.rand(2, 3, 32, 32)
    assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    stock = torchvision.models.resnet18(num_classes=10)
    stock.load_state_dict(folded.state_dict())  # loads into the unmodified torchvision model


def test_stage_helpers_freeze_the_right_groups():
    model = V.sparsify(tiny_net())
    V.prepare_mask_search(model)
    groups = V.parameter_groups(model)
    assert all(p.requires_grad for p in groups["scores"])
    assert not any(p.requires_grad for p in groups["weights"] + groups["norm"])
    V.prepare_finetune(model)
    assert not any(p.requires_grad for p in groups["scores"])
    assert all(p.requires_grad for p in groups["weights"] + groups["norm"])


def test_mask_search_step_changes_only_scores_and_prompt():
    model = V.sparsify(tiny_net())
    prompt = V.PadPrompt(16, 16, pad=2)
    V.set_density(model, 0.5)
    V.prepare_mask_search(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam([*V.parameter_groups(model)["scores"], prompt.program], lr=1e-2)
    model.train()
    loss = nn.functional.cross_entropy(model(prompt(torch.rand(4, 3, 16, 16))), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    opt.step()
    after = model.state_dict()
    for key, value in before.items():
        if key.endswith("scores"):
            assert not torch.equal(value, after[key]), key
        elif "running" in key or "num_batches" in key:
            continue  # BN statistics follow train mode by design
        else:
            assert torch.equal(value, after[key]), key
    assert prompt.program.abs().sum() > 0


def test_density_report_counts_and_flops():
    model = V.sparsify(tiny_net())
    V.set_density(model, 0.5)
    report = V.density_report(model, (3, 8, 8))
    first = report.rows[0]
    assert first.params == 8 * 3 * 9 and first.kept == int(V.masks(model)["0"].sum())
    assert first.dense_flops == 2 * first.params * 64  # 8x8 output positions
    assert report.rows[1].dense_flops == 2 * 7 * 8 * 9 * 16  # stride 2 -> 4x4
    assert report.rows[2].dense_flops == 2 * 7 * 5
    assert report.kept == sum(int(m.sum()) for m in V.masks(model).values())
    text = str(report)
    assert "total" in text and "FLOPs kept" in text
    assert report.to_dict()["density"] == pytest.approx(report.density)
    assert "FLOPs" not in str(V.density_report(model))
    # an input the model cannot take: one line naming input_size, not torch's error from inside the count
    with pytest.raises(ValueError, match=r"input_size \(3, 2, 2\): the model's forward failed on an input of "
                                         r"that shape: .*Kernel size"):
        V.density_report(V.sparsify(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())), (3, 2, 2))


def test_density_report_refuses_a_flop_count_over_the_memory(monkeypatch):
    """The count's forward holds every layer's output (autograd on): an image size whose estimate (a forward at
    about 224 x 224, scaled by the pixels) is over the available memory is refused before it runs, in the library
    and not only in `vpns report` (a ResNet counted at 8192 x 8192 was killed by the kernel without a word)."""
    from vpns_fast import environment

    model = V.sparsify(tiny_net()).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    estimated = []
    real_layer_bytes = environment.layer_bytes
    monkeypatch.setattr(environment, "layer_bytes", lambda *a: estimated.append(1) or real_layer_bytes(*a))
    monkeypatch.setattr(environment, "available_memory_bytes", lambda: 1 << 20)  # 1 MiB
    # tiny_net at 448 x 448: its convolutions', BNs' and ReLUs' outputs (448 and 224 px) are about 22 MiB
    with pytest.raises(MemoryError, match=r"input_size \(3, 448, 448\): counting FLOPs at that size holds every "
                                          r"layer's output, about 2[0-9] MiB; 1 MiB are available"):
        V.density_report(model, (3, 448, 448))
    assert estimated and model.training  # its mode and BN statistics untouched by the estimate
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    estimated.clear()
    assert V.density_report(model, (3, 224, 224)).rows[0].dense_flops > 0 and not estimated  # small: not estimated
    monkeypatch.setattr(environment, "available_memory_bytes", lambda: 1 << 30)
    assert V.density_report(model, (3, 448, 448)).rows[0].dense_flops == 2 * 8 * 3 * 9 * 448 * 448


def test_load_masks_imposes_fixed_masks():
    model = V.sparsify(tiny_net())
    wanted = {name: torch.rand(layer.scores.shape) > 0.5 for name, layer in V.masked_layers(model)}
    V.load_masks(model, wanted)
    for name, mask in V.masks(model).items():
        assert torch.equal(mask, wanted[name])
    with pytest.raises(ValueError, match="shape"):
        V.load_masks(model, {**wanted, "0": torch.ones(2, 2, dtype=torch.bool)})
    # numpy masks load; layers= names layers, not substrings, and a misspelt one is refused (an outside review)
    V.load_masks(model, {name: mask.numpy() for name, mask in wanted.items()})
    assert all(torch.equal(mask, wanted[name]) for name, mask in V.masks(model).items())
    first = next(iter(wanted))
    with pytest.raises(ValueError, match=r"layers: 'nope' name\(s\) no masked layer"):
        V.load_masks(model, wanted, layers=["nope"])
    V.load_masks(model, {first: ~wanted[first]}, layers=first)  # one name as a string
    assert torch.equal(V.masks(model)[first], ~wanted[first])


def test_set_density_after_load_masks_warns_of_ties_and_refuses_nan_scores():
    """Outside review cases: after load_masks (scores 0 and 1) set_density(0.3) put the threshold at 1 and pruned
    every weight without a word; NaN scores were never kept, so the density came out under the one asked for."""
    model = V.sparsify(nn.Sequential(nn.Linear(6, 6)))
    V.load_masks(model, {"0": torch.arange(36).reshape(6, 6) % 2 == 0})
    with pytest.warns(TiedScoresWarning, match=r"0 of 36 scores kept where density 0.3 asks for 11: 11 more tie"):
        V.set_density(model, 0.3)
    assert V.actual_density(model) == 0.0  # the documented rule stands: ties at t are pruned
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        V.set_density(model, 0.3, check=False)  # the trainer's per-step call: no host reads, no warning
    model = V.sparsify(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(36, 2)))
    with torch.no_grad():
        model[0].scores[0].fill_(float("nan"))
    with pytest.raises(ValueError, match=r"set_density: the scores of '0' hold NaN"):
        V.set_density(model, 0.5)


def test_a_float64_models_threshold_is_float64():
    """A float32 threshold buffer rounded a float64 model's threshold: 99 of 100 weights kept for 0.5."""
    model = V.sparsify(nn.Sequential(nn.Linear(10, 10)).double())
    with torch.no_grad():
        model[0].scores.copy_(1 + 1e-12 * torch.arange(100, dtype=torch.float64).reshape(10, 10))
    threshold = V.set_density(model, 0.5)
    assert model[0].threshold.dtype == torch.float64 and model[0].threshold == threshold
    assert int(V.masks(model)["0"].sum()) == 50


class _TiedLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.dec = nn.Linear(16, 16, bias=False), nn.Linear(16, 16, bias=False)
        self.dec.weight = self.enc.weight  # tied
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.dec(torch.relu(self.enc(x))))


class _AliasedWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)
        self.w = self.fc.weight  # the same parameter under a second name

    def forward(self, x):
        return torch.nn.functional.linear(x, self.w, self.fc.bias)


@pytest.mark.parametrize("model, exclude, names", [
    (_TiedLayers, None, "enc.weight is also dec.weight"),
    (_TiedLayers, "dec", "enc.weight is also dec.weight"),  # dec left dense would still read enc's whole weight
    (_AliasedWeight, None, "w is also fc.weight"),
])
def test_sparsify_refuses_a_weight_shared_under_two_names(model, exclude, names):
    """A tied decoder kept reading the whole weight after its encoder was masked, yet the density counted the
    weight as pruned; an alias (`self.w = self.fc.weight`) bypassed the mask the same way (an outside review)."""
    with pytest.raises(ValueError, match=f"sparsify: the weight {names} \\(tied or aliased\\)"):
        V.sparsify(model(), exclude=exclude)


def test_sparsify_keeps_a_tied_weight_dense_when_every_holder_is_excluded():
    model = V.sparsify(_TiedLayers(), exclude=["enc", "dec"])
    V.set_density(model, 0.5)
    assert [name for name, _ in V.masked_layers(model)] == ["head"]
    assert model.dec.weight is model.enc.weight
    twice = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    twice.again = twice[0]  # one module under two names: both may be named in exclude (a review found one refused)
    assert [name for name, _ in V.masked_layers(V.sparsify(twice, exclude=["0", "again"]))] == ["2"]


def test_api_mistakes_are_named():
    """What an outside review found passing silently or failing unclearly: a model name given as the model, an
    exclude pattern that names nothing (the layer stayed masked), masks for unknown layers (ignored) or of
    fractions (0.3s pruned the whole layer), an input_size that is not a shape."""
    with pytest.raises(TypeError, match="model: expected an nn.Module, got str"):
        V.sparsify("resnet18")
    with pytest.raises(ValueError, match=r"exclude: 'fc9' match\(es\) no layer of the model"):
        V.sparsify(tiny_net(), exclude=["0", "fc9"])
    assert [n for n, _ in V.masked_layers(V.sparsify(tiny_net(), exclude="8"))] == ["0", "3"]
    model = V.sparsify(tiny_net())
    wanted = {name: torch.ones(layer.scores.shape, dtype=torch.bool) for name, layer in V.masked_layers(model)}
    with pytest.raises(ValueError, match=r"masks given for 1 name\(s\) the model has no masked layer of: 'fc9'"):
        V.load_masks(model, {**wanted, "fc9": torch.ones(1, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"mask for '0': expected booleans or 0 / 1 values, got others \(e.g. 0.3\)"):
        V.load_masks(model, {**wanted, "0": torch.full(wanted["0"].shape, 0.3)})
    V.load_masks(model, {name: mask.float() for name, mask in wanted.items()})  # 0 / 1 floats are masks too
    assert all(bool(mask.all()) for mask in V.masks(model).values())
    for bad in (8, (True, 8, 8), "3x8x8"):
        with pytest.raises(ValueError, match="input_size must be one example's shape"):
            V.density_report(model, bad)


def test_density_report_of_a_fixed_size_model_above_the_estimate_size(monkeypatch):
    """A ViT built for 256 px refuses the scaled-down estimate with AssertionError: the estimate is skipped, the
    count runs at the size asked (a review: it had escaped, and ended every training run of such a model)."""
    import torchvision

    from vpns_fast import environment

    monkeypatch.setattr(environment, "available_memory_bytes", lambda: 1 << 34)
    model = V.sparsify(torchvision.models.VisionTransformer(image_size=256, patch_size=32, num_layers=1, num_heads=2,
                                                            hidden_dim=64, mlp_dim=64, num_classes=10))
    report = V.density_report(model, (3, 256, 256))
    assert report.dense_flops > 0 and not report.unused_layers

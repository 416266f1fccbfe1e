"""Every weight matrix of any model: torchvision architectures built small with random weights, and each
layer kind (Conv1d/2d/3d, grouped and depthwise convs, Linear subclasses, nn.MultiheadAttention) against
plain torch. Masking cannot be bypassed: code that reads a masked layer's ``weight`` sees the masked weight
with its STE gradient (docs/method.md §3)."""
from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
import torchvision
from tolerance import assert_close
from torch import nn
from torchvision.models import convnext, densenet, efficientnet, mobilenetv3, regnet, swin_transformer

import vpns_fast as V
from vpns_fast.kernels.masked import masked_weight_ref
from vpns_fast.models import build_model
from vpns_fast.nn.masked_layers import MaskedMultiheadAttention
from vpns_fast.nn.prompts import normalize
from vpns_fast.pruning.masking import UnmaskedWeightsWarning, maskable_names
from vpns_fast.pruning.matrices import weight_matrices

DENSITY = 0.3
SIZE = 32


def _mobilenet_v3():
    conf = mobilenetv3.InvertedResidualConfig
    setting = [conf(16, 3, 16, 16, True, "RE", 2, 1, 1.0), conf(16, 3, 48, 24, False, "HS", 2, 1, 1.0),
               conf(24, 5, 64, 24, True, "HS", 1, 1, 1.0)]
    return mobilenetv3.MobileNetV3(setting, last_channel=64, num_classes=10)


def _efficientnet():
    setting = [efficientnet.MBConvConfig(1, 3, 1, 16, 16, 1), efficientnet.MBConvConfig(4, 3, 2, 16, 24, 2)]
    return efficientnet.EfficientNet(setting, dropout=0.0, stochastic_depth_prob=0.0, num_classes=10, last_channel=64)


def _regnet():
    params = regnet.BlockParams.from_init_params(depth=3, w_0=16, w_a=8.0, w_m=2.0, group_width=8)
    return regnet.RegNet(params, num_classes=10, stem_width=16)


def _convnext():
    return convnext.ConvNeXt([convnext.CNBlockConfig(16, 32, 1), convnext.CNBlockConfig(32, None, 1)],
                             num_classes=10)


def _densenet():
    return densenet.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, bn_size=2, num_classes=10)


def _vit():
    model = torchvision.models.VisionTransformer(image_size=SIZE, patch_size=16, num_layers=2, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64, num_classes=10)
    nn.init.normal_(model.heads.head.weight, std=0.1)  # zero-initialised: all its scores would tie
    return model


def _swin():
    return swin_transformer.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                                            window_size=[2, 2], num_classes=10)


MODELS = {"resnet": lambda: build_model("small_resnet", num_classes=10), "mobilenet_v3": _mobilenet_v3,
          "efficientnet": _efficientnet, "regnet": _regnet, "convnext": _convnext, "densenet": _densenet,
          "vit": _vit, "swin": _swin}
NOT_MATRICES = ("class_token", "pos_embedding", "relative_position_bias_table", "layer_scale")


def _independent_count(dense: nn.Module, model: nn.Module) -> tuple[int, int]:
    """(kept, total) over every >= 2-D weight parameter of the dense model, from scores and thresholds."""
    total = sum(p.numel() for name, p in dense.named_parameters()
                if p.dim() >= 2 and not name.rsplit(".", 1)[-1].startswith(NOT_MATRICES))
    kept = sum(int((layer.scores.abs() > layer.threshold).expand_as(layer.dense_weight).sum())
               for _, layer in V.masked_layers(model))
    return kept, total


@pytest.mark.parametrize("name", list(MODELS))
def test_torchvision_models_are_masked_everywhere(name):
    torch.manual_seed(0)
    dense = MODELS[name]().eval()
    model = copy.deepcopy(dense)
    V.sparsify(model)
    matrices = weight_matrices(model)
    assert all(m.layer is not None for m in matrices), [m.name for m in matrices if m.layer is None]
    V.set_density(model, DENSITY)
    scores = sum(layer.scores.numel() for _, layer in V.masked_layers(model))
    kept, total = _independent_count(dense, model)
    assert scores == total  # unstructured: one score per weight of every weight matrix
    assert kept == total - int((1 - DENSITY) * total)  # the kept fraction is the density (no ties here)
    assert V.actual_density(model) == kept / total == V.density_report(model).density

    images = torch.rand(2, 3, SIZE, SIZE)
    x = normalize(images, V.ops.IMAGENET_MEAN, V.ops.IMAGENET_STD)
    with torch.no_grad():
        expected = model(x)
        folded = V.fold(model)
        stock = MODELS[name]().eval()
        stock.load_state_dict(folded.state_dict())  # strict: the stock model's keys, nothing else
        deployed = V.deploy(model, "cpu", image_size=SIZE, policy="sparse")
        assert_close(folded(x), expected, relative_to_max=True, rtol=1e-5)
        assert_close(stock(x), expected, relative_to_max=True, rtol=1e-5)
        assert_close(deployed(images), expected, relative_to_max=True, rtol=1e-4)
    # a dense forward of the same weights differs: the masks are applied everywhere
    with torch.no_grad():
        assert (dense(x) - expected).abs().max() > 0.01 * expected.abs().max()

    model.zero_grad(set_to_none=True)
    V.prepare_mask_search(model)
    model(x).square().sum().backward()
    no_gradient = [n for n, layer in V.masked_layers(model) if layer.scores.grad is None or
                   not layer.scores.grad.abs().sum() > 0]
    assert not no_gradient


def test_swin_reads_qkv_through_the_mask_with_its_ste_gradient():
    """torchvision's Swin attention passes ``self.qkv.weight`` to F.linear instead of calling the layer."""
    torch.manual_seed(0)
    model = V.sparsify(_swin().eval())
    V.set_density(model, DENSITY)
    attention = model.features[1][0].attn
    captured = []
    attention.qkv.register_forward_hook(lambda *args: captured.append(1))
    x = torch.randn(2, 3, SIZE, SIZE)
    model(x).sum().backward()
    assert not captured  # never called as a module...
    grad = attention.qkv.scores.grad
    assert grad is not None and grad.abs().sum() > 0  # ...yet its scores learn
    # and the weight F.linear saw was masked: zeroing the pruned weights by hand changes nothing
    with torch.no_grad():
        reference = copy.deepcopy(model)
        out = model(x)
        for _, layer in V.masked_layers(reference):
            layer.dense_weight.mul_(layer.weight_mask())
            layer.set_threshold(float("-inf"))
        assert_close(reference(x), out, relative_to_max=True, rtol=1e-6)


def test_density_report_counts_attention_flops():
    torch.manual_seed(0)
    model = V.sparsify(_vit().eval())
    V.set_density(model, DENSITY)
    report = V.density_report(model, (3, SIZE, SIZE))
    rows = {row.name: row for row in report.rows}
    other = rows.pop("(other ops)")
    tokens, dim, heads = 5, 32, 2  # 4 patches + the class token
    # two encoder layers: q @ k^T and attention @ v, 2 FLOPs per multiply-add
    assert other.dense_flops == other.kept_flops == 2 * 2 * (2 * tokens * tokens * dim)
    in_proj = rows["encoder.layers.encoder_layer_0.self_attention.in_proj"]
    assert in_proj.kind == "masked MultiheadAttention" and in_proj.shape == (3 * dim, dim)
    assert in_proj.dense_flops == 2 * 3 * dim * dim * tokens
    assert in_proj.kept_flops == 2 * in_proj.kept * tokens
    assert rows["conv_proj"].dense_flops == 2 * rows["conv_proj"].params * 4
    assert report.dense_flops == sum(r.dense_flops for r in report.rows)
    assert report.params == sum(m.weight.numel() for m in weight_matrices(model))
    assert "(other ops)" in str(report) and heads


# ----------------------------------------------------------------------------- layer kinds against plain torch

def _masked_reference(layer: nn.Module, x: torch.Tensor, functional) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The layer's output and gradients, and the same computed by ``functional`` on masked_weight_ref."""
    out = layer(x)
    g = torch.randn_like(out)
    out.backward(g)
    weight = layer.dense_weight.detach().clone().requires_grad_()
    scores = layer.scores.detach().clone().requires_grad_()
    expected = functional(x, masked_weight_ref(weight, scores, layer.threshold))
    expected.backward(g)
    return out, expected, {"dense_weight": (layer.dense_weight.grad, weight.grad), "scores": (layer.scores.grad,
                                                                                             scores.grad)}


@pytest.mark.parametrize("make,functional", [
    (lambda: nn.Conv1d(4, 6, 3, padding=1), lambda c: lambda x, w: nn.functional.conv1d(x, w, c.bias, padding=1)),
    (lambda: nn.Conv3d(4, 6, 3, stride=2), lambda c: lambda x, w: nn.functional.conv3d(x, w, c.bias, stride=2)),
    (lambda: nn.Conv2d(4, 6, 3, groups=2), lambda c: lambda x, w: nn.functional.conv2d(x, w, c.bias, groups=2)),
    (lambda: nn.Conv2d(4, 4, 3, groups=4, padding=1),
     lambda c: lambda x, w: nn.functional.conv2d(x, w, c.bias, padding=1, groups=4)),
    (lambda: nn.modules.linear.NonDynamicallyQuantizableLinear(5, 3),
     lambda c: lambda x, w: nn.functional.linear(x, w, c.bias)),
], ids=["conv1d", "conv3d", "grouped", "depthwise", "non_dynamically_quantizable_linear"])
@pytest.mark.parametrize("granularity", ["unstructured", "channel"])
def test_layer_kinds_match_plain_torch(make, functional, granularity):
    torch.manual_seed(0)
    layer = make()
    shape = {1: (2, 4, 9), 2: (2, 4, 7, 7), 3: (2, 4, 5, 5, 5)}.get(layer.weight.dim() - 2, (2, 5))
    model = V.sparsify(nn.Sequential(layer), granularity)
    V.set_density(model, 0.5)
    assert type(model[0]).__mro__[1:].count(type(make())) == 1  # a masked subclass of its own class
    out, expected, grads = _masked_reference(model[0], torch.randn(shape), functional(model[0]))
    assert_close(out, expected, rtol=0, atol=0)
    for name, (got, want) in grads.items():
        assert_close(got, want, msg=name)
    folded = V.fold(model)
    assert type(folded[0]) is type(make())
    assert_close(folded[0].weight, model[0].masked_weight(), rtol=0, atol=0)


class ScaledLinear(nn.Linear):
    """A user's Linear subclass with its own forward that reads ``self.weight``."""

    def forward(self, x):
        return 2 * nn.functional.linear(x, self.weight, self.bias)


def test_a_linear_subclass_keeps_its_forward_and_pickles():
    torch.manual_seed(0)
    model = V.sparsify(nn.Sequential(ScaledLinear(6, 4)))
    V.set_density(model, 0.5)
    layer = model[0]
    assert isinstance(layer, ScaledLinear) and type(layer).__name__ == "MaskedScaledLinear"
    x = torch.randn(3, 6)
    assert_close(layer(x), 2 * nn.functional.linear(x, layer.masked_weight(), layer.bias), rtol=0, atol=0)
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(copied[0]) is type(layer)
        assert_close(copied(x), model(x), rtol=0, atol=0)
    assert type(V.fold(model)[0]) is ScaledLinear


@pytest.mark.parametrize("separate", [False, True], ids=["packed", "separate_qkv"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_multihead_attention_matches_plain_torch(separate, batch_first):
    torch.manual_seed(0)
    kdim = 6 if separate else None
    attention = nn.MultiheadAttention(8, 2, kdim=kdim, vdim=kdim, batch_first=batch_first)
    dense = copy.deepcopy(attention)
    model = V.sparsify(nn.Sequential(attention))
    V.set_density(model, 0.4)
    assert isinstance(attention, MaskedMultiheadAttention)
    units = ["q_proj", "k_proj", "v_proj"] if separate else ["in_proj"]
    assert [n for n, _ in V.masked_layers(model)] == [f"0.{u}" for u in units] + ["0.out_proj"]
    assert maskable_names(model) == [n for n, _ in V.masked_layers(model)]
    q = torch.randn(4, 3, 8)
    kv = torch.randn(4, 3, kdim or 8)
    if batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    # the same module with every masked weight written into it by hand
    with torch.no_grad():
        for unit, (_, layer) in zip(units + ["out_proj"], V.masked_layers(model)):
            target = dense.out_proj.weight if unit == "out_proj" else getattr(dense, f"{unit}_weight")
            target.copy_(layer.masked_weight())
    for training in (False, True):  # eval without grad: the fused fast path; train: F.multi_head_attention_forward
        attention.train(training), dense.train(training)
        with torch.set_grad_enabled(training):
            out, weights = attention(q, kv, kv)
            want, want_weights = dense(q, kv, kv)
        assert_close(out, want, rtol=1e-5, atol=1e-6)
        assert_close(weights, want_weights, rtol=1e-5, atol=1e-6)
    out.sum().backward()
    for name, layer in V.masked_layers(model):
        assert layer.scores.grad is not None and layer.scores.grad.abs().sum() > 0, name
    # checkpoints: the state_dict is the stock one plus scores and thresholds, and loads back
    state = model.state_dict()
    stock_keys = set(nn.Sequential(dense).state_dict())
    assert stock_keys <= set(state) and all(k.endswith((".scores", ".threshold")) for k in set(state) - stock_keys)
    fresh = V.sparsify(nn.Sequential(nn.MultiheadAttention(8, 2, kdim=kdim, vdim=kdim, batch_first=batch_first)))
    fresh.load_state_dict(state)
    fresh.eval(), attention.eval()
    with torch.no_grad():
        assert_close(fresh[0](q, kv, kv)[0], attention(q, kv, kv)[0], rtol=0, atol=0)
        folded = V.fold(model)
        assert type(folded[0]) is nn.MultiheadAttention
        assert type(folded[0].out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
        assert set(folded.state_dict()) == stock_keys
        assert_close(folded[0](q, kv, kv)[0], attention(q, kv, kv)[0], rtol=1e-5, atol=1e-6)
    copied = pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        assert_close(copied[0](q, kv, kv)[0], attention(q, kv, kv)[0], rtol=0, atol=0)


def test_unmaskable_matrices_are_listed_and_exclude_keeps_layers_dense():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ConvTranspose2d(4, 4, 2), nn.Flatten(), nn.LazyLinear(3))
    with pytest.warns(UnmaskedWeightsWarning, match=r"1 weight matrices hold .*% of the weights .*1 \(ConvTranspose2d"):
        V.sparsify(copy.deepcopy(model[:2]))
    with pytest.warns(UnmaskedWeightsWarning):  # an uninitialised lazy layer cannot be masked either
        V.sparsify(copy.deepcopy(model))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparse = V.sparsify(copy.deepcopy(model[:2]), exclude=["1"])  # on purpose: no warning
    V.set_density(sparse, 0.5)
    report = V.density_report(sparse)
    assert [(r.name, r.masked) for r in report.rows] == [("0", True), ("1", False)]
    assert "ConvTranspose2d (not maskable)" in str(report)
    assert V.actual_density(sparse) == report.density == (report.rows[0].kept + 4 * 4 * 4) / (4 * 3 * 9 + 64)
    with pytest.raises(ValueError, match="no maskable weight matrix"):
        V.sparsify(nn.Sequential(nn.ConvTranspose2d(3, 3, 2), nn.ReLU()))


class _FunctionalConv(nn.Module):
    """A conv kernel held as a bare parameter and read by F.conv2d, beside parameters that are no weights."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.w = nn.Parameter(torch.randn(64, 16, 3, 3))
        self.lead = nn.Parameter(torch.randn(1, 64, 4))  # first dimension 1: no weight
        self.relative_position_bias_table = nn.Parameter(torch.randn(49, 4))  # by its name: no weight
        self.gain = nn.Parameter(torch.ones(64, 1, 1))  # one dimension larger than 1: no weight
        self.transposed = nn.Parameter(torch.randn(10, 64))  # "pos" inside a word names no position table
        self.prompt = V.PadPrompt(8, 8, 2)  # its program is no weight
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = nn.functional.conv2d(torch.relu(self.conv(x)), self.w, padding=1) * self.gain
        return self.fc(x.mean((2, 3))) + nn.functional.linear(x.mean((2, 3)), self.transposed)


def test_a_bare_parameter_read_by_a_functional_is_a_dense_weight_matrix_and_said():
    """An outside review's case: ``self.w`` read by F.conv2d was neither masked, nor warned about, nor counted,
    so actual_density read 0.10 where 90.6% of the weights were nonzero."""
    torch.manual_seed(0)
    model = _FunctionalConv()
    with pytest.warns(UnmaskedWeightsWarning, match=r"w \(parameter of a _FunctionalConv\).*F\.conv2d\(x, self\.w\)"):
        V.sparsify(model)
    V.set_density(model, 0.1, scope="layer")
    matrices = weight_matrices(model)
    assert [(m.name, m.maskable) for m in matrices] == [("conv", True), ("fc", True), ("w", False),
                                                         ("transposed", False)]
    report = V.density_report(model, input_size=(3, 8, 8))
    rows = {row.name: row for row in report.rows}
    assert rows["w"].kind == "parameter of a _FunctionalConv (not maskable)" and rows["w"].kept == 64 * 16 * 9
    assert rows["w"].dense_flops == 2 * 64 * 16 * 9 * 8 * 8  # the F.conv2d's FLOPs are the parameter's
    folded = dict(V.fold(model).named_parameters())
    nonzero = sum(int(folded[name].count_nonzero()) for name in ("conv.weight", "fc.weight", "w", "transposed"))
    assert V.actual_density(model) == report.density == nonzero / (16 * 27 + 640 + 64 * 16 * 9 + 640)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        V.sparsify(_FunctionalConv(), exclude=["w", "transposed"])  # on purpose: no warning


class _LinearWithAdapter(nn.Linear):
    """A Linear subclass holding two more weight matrices (a low-rank adapter) beside its own weight."""

    def __init__(self):
        super().__init__(64, 64)
        self.lora_a = nn.Parameter(torch.randn(4, 64))
        self.lora_b = nn.Parameter(torch.randn(64, 4))

    def forward(self, x):
        return super().forward(x) + x @ self.lora_a.T @ self.lora_b.T


def test_weight_matrices_a_masked_layer_holds_beside_its_weight_still_count():
    """A diff review's case: once masked, the subclass's adapter matrices had dropped out of the count (the
    density read 0.50 where 0.55 of the weights were kept)."""
    model = nn.Sequential(_LinearWithAdapter())
    with pytest.warns(UnmaskedWeightsWarning, match="0.lora_a"):
        V.sparsify(model)
    V.set_density(model, 0.5)
    names = [m.name for m in weight_matrices(model)]
    assert names == ["0", "0.lora_a", "0.lora_b"]
    assert V.actual_density(model) == (2048 + 512) / (4096 + 512)


def test_reading_weight_never_falls_back_to_the_dense_parameter():
    """An AttributeError inside the property would make nn.Module.__getattr__ return the dense weight."""
    model = V.sparsify(nn.Sequential(nn.Linear(4, 4)))
    del model[0]._buffers["threshold"]
    assert model[0].weight is model[0].dense_weight  # a layer whose masking is not set up reads as torch's
    layer = V.sparsify(nn.Sequential(nn.Linear(4, 4)))[0]
    object.__setattr__(layer, "in_mask_source", object())  # broken structured wiring
    with pytest.raises(RuntimeError, match="masked weight"):
        layer.weight  # noqa: B018


def test_compile_aot_eager_matches_eager():
    torch.manual_seed(0)
    model = V.sparsify(_swin().eval())
    V.set_density(model, DENSITY)
    x = torch.randn(2, 3, SIZE, SIZE)
    compiled = torch.compile(model, backend="aot_eager")
    out = compiled(x)
    assert_close(out, model(x), relative_to_max=True, rtol=1e-6)
    out.sum().backward()
    assert model.features[1][0].attn.qkv.scores.grad.abs().sum() > 0


class _ConvAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 3)
        self.attention = nn.MultiheadAttention(7, 1, batch_first=True)

    def forward(self, x):
        h = self.conv(x)
        return self.attention(h, h, h)[0]


def test_mask_launch_batching_covers_attention_and_conv1d(monkeypatch):
    """On the triton backend the batching hook masks every layer kind in one call, and the layers
    (Conv1d's torch forward, the attention's projections) use those weights: same outputs and
    gradients as the per-layer torch path."""
    pytest.importorskip("triton")
    torch.manual_seed(0)
    model = V.sparsify(_ConvAttention()).train()
    V.set_density(model, 0.5)
    reference = copy.deepcopy(model)
    calls = []
    original = V.ops.masked_weights
    monkeypatch.setattr(V.ops, "masked_weights", lambda weights, *args: calls.append(len(weights)) or
                        original(weights, *args))
    x = torch.randn(2, 4, 9)
    with V.ops.use_backend("triton"):
        out = model(x)
        out.square().sum().backward()
    assert calls == [3]  # conv, attention.in_proj, attention.out_proj: one call, nothing per layer
    with V.ops.use_backend("torch"):
        want = reference(x)
        want.square().sum().backward()
    assert_close(out, want, rtol=0, atol=0)
    for (name, layer), (_, expected) in zip(V.masked_layers(model), V.masked_layers(reference)):
        assert_close(layer.scores.grad, expected.scores.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_cpu_engine_keeps_conv1d_conv3d_dense_and_says_why_and_runs_a_depthwise_conv_sparse():
    from vpns_fast.deploy import sparse_cpu

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1d, self.conv3d = nn.Conv1d(2, 4, 3), nn.Conv3d(1, 2, 3)
            self.depthwise, self.head = nn.Conv2d(4, 4, 3, groups=4), nn.Linear(4, 3)

        def forward(self, x):
            signal = self.conv1d(x.flatten(2))
            volume = self.conv3d(x[:, :1].unsqueeze(2).expand(-1, -1, 5, -1, -1))
            image = self.depthwise(x.repeat(1, 2, 1, 1))
            return self.head(image.mean((2, 3))) + signal.mean() + volume.mean()

    model = V.sparsify(Mixed())
    V.set_density(model, 0.5)
    folded = V.fold(model).eval()
    x = torch.randn(2, 2, 8, 8)
    converted, table = sparse_cpu.convert_for_cpu(folded, x, policy="sparse")
    rows = {row["name"]: row for row in table}
    for name in ("conv1d", "conv3d"):
        assert rows[name]["chosen"] == "dense" and rows[name]["reason"], name
    assert "2-D" in rows["conv1d"]["reason"]
    # a grouped conv runs sparse as its block-diagonal weight (policy "sparse": no measurement decides)
    assert rows["depthwise"]["chosen"] == "sparse" and converted.depthwise.groups == 4
    with torch.no_grad():
        assert_close(converted(x), model(x), relative_to_max=True, rtol=1e-5)


def test_structured_mode_and_slim_refuse_other_models_clearly():
    from vpns_fast.deploy.slim import SlimError, slim_model

    with pytest.raises(ValueError, match="structured=True supports torchvision-style ResNets .* got VisionTransformer"):
        V.sparsify(_vit(), "channel", structured=True)
    model = V.sparsify(_mobilenet_v3(), "channel")
    with pytest.raises(SlimError, match="got MobileNetV3"):
        slim_model(V.fold(model))


class _Conv2dThenAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.conv(x).flatten(2).transpose(1, 2)
        x, _ = self.attn(x, x, x)
        return self.fc(x.mean(1))


@pytest.mark.parametrize("exclude", [None, ["attn.in_proj"], ["attn.out_proj"], ["fc"]])
def test_checkpoint_rebuilds_the_layers_that_stayed_dense(tmp_path, exclude):
    from vpns_fast.pruning.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint

    model = V.sparsify(_Conv2dThenAttention(), exclude=exclude)
    V.set_density(model, 0.5)
    save_checkpoint(tmp_path / "m.pt", model, model_name=None)
    rebuilt = model_from_checkpoint(load_checkpoint(tmp_path / "m.pt"), model=_Conv2dThenAttention())
    x = torch.rand(2, 3, 6, 6)
    assert_close(rebuilt(x), model(x), rtol=0, atol=0)


class _WithTransposedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)  # cannot be masked: warned when sparsified

    def forward(self, x):
        return self.up(self.conv(x)).mean((2, 3))


def test_a_checkpoint_does_not_repeat_the_unmasked_weights_warning(tmp_path):
    """The warning belongs to the pruning, once: rebuilding the checkpoint (export, deploy, eval) repeated it on
    every load (an outside review)."""
    import warnings

    from vpns_fast.pruning.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint

    with pytest.warns(UnmaskedWeightsWarning, match="up"):
        model = V.sparsify(_WithTransposedConv())
    save_checkpoint(tmp_path / "m.pt", model, model_name=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rebuilt = model_from_checkpoint(load_checkpoint(tmp_path / "m.pt"), model=_WithTransposedConv())
    x = torch.rand(2, 3, 6, 6)
    assert_close(rebuilt(x), model(x), rtol=0, atol=0)

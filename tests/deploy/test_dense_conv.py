"""``DenseConv2d`` (the engine's dense convolution: oneDNN with a weight reordered once, channels_last)
against nn.Conv2d, and how ``convert_for_cpu`` uses it: for the convs it keeps dense, and for the whole
network when every conv dense runs faster than the mixed one.

Float rule: |out - ref| <= 2 * |out_torch_fp32 - ref| + atol, ref in float64 (both are oneDNN sums in
another order)."""
from __future__ import annotations

import copy
import pickle
import time

import pytest
import torch
from helpers import outputs_from_two_threads
from tolerance import assert_close
from torch import nn

from vpns_fast.deploy import sparse_cpu

_OK, _REASON = sparse_cpu.dense_conv_available()
pytestmark = pytest.mark.skipif(not _OK, reason=_REASON)

# (C_in, C_out, H, W, kernel, stride, padding, dilation, groups): 1x1, 3x3, the ResNet stem, stride 2,
# dilation, non-square and odd sizes, grouped and depthwise.
SHAPES = [
    (3, 5, 17, 23, 3, 1, 1, 1, 1),
    (7, 3, 13, 19, 1, 1, 0, 1, 1),
    (3, 8, 38, 30, 7, 2, 3, 1, 1),
    (6, 4, 9, 7, 3, 2, 1, 1, 2),
    (8, 8, 12, 11, 3, 1, 2, 2, 8),
    (4, 6, 9, 9, (3, 5), (2, 1), (0, 2), (1, 2), 2),
    # 1x1 stride 1 with output channels a multiple of 16: the engine's own dense kernel (pointwise_conv), at odd
    # sizes, a 1x1 input and one input channel
    (24, 32, 13, 19, 1, 1, 0, 1, 1),
    (5, 16, 1, 1, 1, 1, 0, 1, 1),
    (1, 48, 7, 3, 1, 1, 0, 1, 1),
]


def _ids(shape):
    return "x".join(map(str, shape[:4])) + f"_k{shape[4]}s{shape[5]}p{shape[6]}d{shape[7]}g{shape[8]}"


def _reference(conv, x, residual=None, relu=False):
    with torch.no_grad():
        torch_out = conv(x)
        ref = nn.functional.conv2d(x.double(), conv.weight.double(),
                                   None if conv.bias is None else conv.bias.double(), conv.stride, conv.padding,
                                   conv.dilation, conv.groups)
        if residual is not None:
            torch_out, ref = torch_out + residual, ref + residual.double()
        if relu:
            torch_out, ref = torch_out.relu(), ref.relu()
    return torch_out, ref


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("batch", [1, 3, 33])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("epilogue", ["none", "relu", "add", "add+relu"])
def test_dense_conv2d_matches_conv2d(shape, batch, layout, epilogue):
    in_channels, out_channels, height, width, kernel, stride, padding, dilation, groups = shape
    generator = torch.Generator().manual_seed(hash((shape, batch, layout, epilogue)) % 2**31)
    conv = nn.Conv2d(in_channels, out_channels, kernel, stride, padding, dilation, groups, bias=batch != 3)
    x = torch.randn(batch, in_channels, height, width, generator=generator)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    layer = sparse_cpu.DenseConv2d.from_dense(conv)
    layer.relu = "relu" in epilogue
    with torch.no_grad():
        out_shape = conv(x).shape
    residual = torch.randn(out_shape, generator=generator) if "add" in epilogue else None
    torch_out, ref = _reference(conv, x, residual, layer.relu)
    with torch.no_grad():
        out = layer(x, residual) if residual is not None else layer(x)
    assert out.shape == out_shape
    reduction = conv.weight[0].numel()
    assert_close(out, ref, baseline=torch_out, atol=1e-6 * reduction)


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_string_padding_and_refusals(padding):
    conv = nn.Conv2d(4, 5, 3, padding=padding, dilation=2)
    x = torch.randn(2, 4, 11, 10)
    layer = sparse_cpu.DenseConv2d.from_dense(conv)
    torch_out, ref = _reference(conv, x)
    with torch.no_grad():
        assert_close(layer(x), ref, baseline=torch_out, atol=1e-5)
    with pytest.raises(ValueError, match="not symmetric"):
        sparse_cpu.DenseConv2d.from_dense(nn.Conv2d(4, 4, 2, padding="same"))
    with pytest.raises(ValueError, match="padding_mode"):
        sparse_cpu.DenseConv2d.from_dense(nn.Conv2d(4, 4, 3, padding_mode="reflect"))
    with pytest.raises(ValueError, match="float32"):
        sparse_cpu.DenseConv2d.from_dense(nn.Conv2d(4, 4, 3).double())
    with pytest.raises(ValueError, match="groups"):
        sparse_cpu.DenseConv2d(torch.randn(6, 2, 3, 3), groups=4)
    with pytest.raises(ValueError, match="expects 4"):
        layer(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="smaller than"):
        sparse_cpu.DenseConv2d(torch.randn(4, 4, 5, 5))(torch.randn(1, 4, 3, 3))
    with pytest.raises(ValueError, match="residual of shape .* does not broadcast"):
        layer(x, torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match="float32 CPU"):
        layer(x.double())


def test_the_reordered_weight_follows_the_weight_and_the_input_shape():
    conv = nn.Conv2d(8, 16, 3, padding=1)
    layer = sparse_cpu.DenseConv2d.from_dense(conv)
    x = torch.randn(2, 8, 10, 10)
    with torch.no_grad():
        before = layer(x)
        layer.weight.mul_(2)  # in place: the version counter moves
        doubled = layer(x)
        assert_close(doubled - layer.bias.view(1, -1, 1, 1), 2 * (before - layer.bias.view(1, -1, 1, 1)),
                     rtol=1e-5, atol=1e-4)
        other = nn.Conv2d(8, 16, 3, padding=1)
        layer.load_state_dict(other.state_dict())
        torch_out, ref = _reference(other, x)
        assert_close(layer(x), ref, baseline=torch_out, atol=1e-5)
        for shape in [(1, 8, 10, 10), (5, 8, 7, 13), (2, 8, 10, 10)]:  # a copy per input shape, few kept
            xs = torch.randn(shape)
            torch_out, ref = _reference(other, xs)
            assert_close(layer(xs), ref, baseline=torch_out, atol=1e-5)
    assert 1 <= len(layer._packed) <= 8


def test_pickle_deepcopy_and_inference_mode():
    conv = nn.Conv2d(6, 7, 3, stride=2, padding=1)
    x = torch.randn(3, 6, 15, 14)
    torch_out, ref = _reference(conv, x)
    with torch.inference_mode():
        built_inside = sparse_cpu.DenseConv2d.from_dense(conv)
        inside = built_inside(x)
    layer = sparse_cpu.DenseConv2d.from_dense(conv)
    with torch.no_grad():
        layer(x)  # holds a reordered copy now, which neither pickle nor deepcopy can take
        copies = [pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer), built_inside]
        outs = [c(x) for c in copies]
    assert_close(inside, ref, baseline=torch_out, atol=1e-5)
    for out in outs:
        assert torch.equal(out, inside)
    with torch.inference_mode():
        assert torch.equal(layer(x), inside)


@pytest.mark.parametrize("in_channels, out_channels, kernel", [(8, 8, 3), (24, 32, 1)], ids=["onednn", "pointwise"])
def test_two_threads_calling_one_layer_at_different_shapes(in_channels, out_channels, kernel):
    """oneDNN's 3x3 and the pointwise kernel's 1x1 (its packed weight made by whichever thread comes first)."""
    conv = nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2)
    layer = sparse_cpu.DenseConv2d.from_dense(conv)
    inputs = [torch.randn(batch, in_channels, size, size) for batch, size in [(1, 9), (3, 12), (2, 9), (1, 15)]]
    with torch.no_grad():
        expected = [conv(x) for x in inputs]
    for index, got in outputs_from_two_threads(layer, inputs, rounds=10):
        assert_close(got, expected[index], rtol=1e-4, atol=1e-4)


def _chosen_modules_agree_with_the_table(converted, table):
    modules = dict(converted.named_modules())
    for row in table:
        if row["type"] != "Conv2d" or row["name"] not in modules:
            continue
        kind = type(modules[row["name"]])
        assert (kind is sparse_cpu.SparseConv2d) == (row["chosen"] == "sparse"), row


def test_convert_for_cpu_runs_the_dense_convs_through_oneDNN():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                          nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))
    x = torch.randn(2, 3, 8, 8)
    summary = {}
    # min_speedup too high for any sparse layer: every conv stays dense, through DenseConv2d (the first one not by
    # Winograd, which test_winograd.py covers)
    converted, table = sparse_cpu.convert_for_cpu(model, x, min_speedup=1e9, repeats=2, summary=summary,
                                                  winograd=False)
    kinds = {name: type(m) for name, m in converted.named_modules()}
    assert kinds["0"] is kinds["2"] is kinds["3"] is sparse_cpu.DenseConv2d
    # the Linear kept dense runs the engine's small-batch kernel (torch's where the CPU lacks AVX2 and FMA)
    assert kinds["5"] is (sparse_cpu.DenseLinear if sparse_cpu.pointwise_conv_supported() else nn.Linear)
    assert converted.get_submodule("0").relu  # the ReLU went into its epilogue
    depthwise = table[1]  # measured as the others are (it can run sparse, as its block-diagonal weight)
    assert depthwise["chosen"] == "dense" and depthwise["sparse_ms"] > 0 and "than oneDNN" in depthwise["reason"]
    # the network is weighed against its every-supported-conv-sparse variant, which would have to be 1e9x faster;
    # the dense Linear (all weights kept) is not tried sparse
    assert "than oneDNN" in table[0]["reason"]
    assert summary["network"].startswith("kept every conv dense: the network ran in ")
    assert "ms with every supported conv sparse" in summary["network"] and "Linear" not in summary["network"]
    with torch.no_grad():
        expected = model(x)
        assert_close(converted(x), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    _chosen_modules_agree_with_the_table(converted, table)


def _network_with_delay(when_sparse: bool) -> tuple[nn.Module, torch.Tensor]:
    """A network whose forward sleeps 20 ms when its conv is sparse (``when_sparse``) or when it is not:
    the cost of the layout switches that the whole-network timing is there to catch."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 6, 3, padding=1)
            with torch.no_grad():
                self.conv.weight.mul_(torch.rand_like(self.conv.weight) < 0.3)
            self.head = nn.Conv2d(6, 2, 1)

        def forward(self, x):
            sparse = isinstance(self.conv, sparse_cpu.SparseConv2d)
            if sparse == when_sparse:
                time.sleep(0.02)
            return self.head(self.conv(x))

    return Net().eval(), torch.randn(1, 4, 9, 9)


@pytest.mark.parametrize("slow", ["mixed", "dense"])
def test_the_faster_whole_network_is_kept(slow):
    model, x = _network_with_delay(when_sparse=slow == "mixed")
    with torch.no_grad():
        expected = model(x)
    summary = {}
    # min_speedup tiny: every conv measures as sparse; then the whole networks are timed
    converted, table = sparse_cpu.convert_for_cpu(model, x, min_speedup=1e-9, repeats=2, fuse=False,
                                                  summary=summary)
    if slow == "mixed":
        assert summary["network"].startswith("every conv dense")
        assert all(row["chosen"] == "dense" for row in table)
        assert all("network ran faster with every conv dense" in row["reason"] for row in table)
        assert isinstance(converted.conv, sparse_cpu.DenseConv2d)
    else:
        assert summary["network"].startswith("kept 2 sparse convs")
        assert all(row["chosen"] == "sparse" for row in table)
    _chosen_modules_agree_with_the_table(converted, table)
    with torch.no_grad():
        assert_close(converted(x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("min_speedup", [1.05, 1e9])
def test_the_every_supported_conv_sparse_variant_is_kept_when_min_speedup_times_faster(monkeypatch, min_speedup):
    """Convs that time faster dense alone but make the network slower (layout switches around a dense island)
    run sparse when the whole network is ``min_speedup`` times faster that way: simulated by per-layer timings
    that always favour dense and a forward that sleeps while its conv is dense."""
    model, x = _network_with_delay(when_sparse=False)
    with torch.no_grad():
        expected = model(x)
    monkeypatch.setattr(sparse_cpu, "compare_layer_times", lambda dense, sparse, repeats, rounds=3: (1.0, 2.0))
    summary = {}
    converted, table = sparse_cpu.convert_for_cpu(model, x, min_speedup=min_speedup, repeats=2, fuse=False,
                                                  summary=summary)
    assert all(row["sparse_ms"] == 2.0 and "sparse not" in row["reason"] for row in table)
    if min_speedup == 1.05:  # 20 ms against well under 1 ms
        assert summary["network"].startswith("every supported conv sparse (2 more): the network ran in ")
        assert all(row["chosen"] == "sparse" for row in table)
        assert all(row["reason"].endswith("; the network ran faster with every supported conv sparse")
                   for row in table)
        assert isinstance(converted.conv, sparse_cpu.SparseConv2d)
    else:  # not 1e9x faster: the per-layer choices stay
        assert summary["network"].startswith("kept every conv dense: the network ran in ")
        assert all(row["chosen"] == "dense" for row in table)
        assert isinstance(converted.conv, sparse_cpu.DenseConv2d)
    _chosen_modules_agree_with_the_table(converted, table)
    with torch.no_grad():
        assert_close(converted(x), expected, rtol=1e-4, atol=1e-5)


def test_resnet_kept_dense_fuses_batchnorm_residual_and_relu_into_dense_convs():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):  # statistics that make folding change the weights
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 48, 48)
    summary = {}
    converted, table = sparse_cpu.convert_for_cpu(model, x, min_speedup=1e9, repeats=2, summary=summary)
    convs = [m for m in converted.modules() if isinstance(m, sparse_cpu.DenseConv2d)]
    assert len(convs) == 20 and not any(isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) for m in converted.modules())
    fused = {row["name"]: row["fused"] for row in table}
    assert fused["layer1.0.conv2"] == ["batchnorm", "add", "relu"] and fused["conv1"] == ["batchnorm", "relu"]
    assert summary["epilogues_fused"] == 17  # conv1, the first conv of each block (relu), the second (add+relu)
    with torch.no_grad():
        expected = model(x)
        got = converted(x)
        with torch.inference_mode():
            inside = converted(x)
    assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    assert torch.equal(inside, got)


def test_relu_keeps_nan_like_torch_and_the_sparse_layer():
    conv = nn.Conv2d(4, 6, 3, padding=1)
    x = torch.randn(1, 4, 7, 7)
    x[0, 1, 3, 3] = float("nan")
    residual = torch.randn(1, 6, 7, 7)
    dense, sparse = sparse_cpu.DenseConv2d.from_dense(conv), sparse_cpu.SparseConv2d.from_dense(conv)
    dense.relu = sparse.relu = True
    with torch.no_grad():
        expected = torch.relu(conv(x))
        for got in (dense(x), sparse(x)):
            assert torch.equal(torch.isnan(got), torch.isnan(expected)) and int(torch.isnan(got).sum()) == 6 * 9
        assert torch.equal(torch.isnan(dense(x, residual)), torch.isnan(torch.relu(conv(x) + residual)))


@pytest.mark.skipif(not sparse_cpu.available()[0], reason="the C++ extension (its buffer cache) is not built")
@pytest.mark.parametrize("epilogue", ["none", "add+relu"])
@pytest.mark.parametrize("groups", [1, 64], ids=["dense", "depthwise"])
def test_outputs_over_32_mib_come_from_the_buffer_cache(epilogue, groups):
    """An output above malloc's largest mmap threshold is written into a recycled buffer (oneDNN adding the
    convolution into zeros or into a copy of the residual): the same values as the allocating call, the
    residual left as it was, NaN kept by the ReLU, and the buffer back in the cache once freed."""
    generator = torch.Generator().manual_seed(8)
    in_channels = 3 if groups == 1 else 64
    conv = nn.Conv2d(in_channels, 64, 3, padding=1, groups=groups)
    x = torch.randn(2, in_channels, 256, 260, generator=generator)
    x[1, 2, 100, 100] = float("nan")  # reaches 3 x 3 outputs of every channel (dense) or of channel 2 (depthwise)
    layer = sparse_cpu.DenseConv2d.from_dense(conv)
    layer.relu = "relu" in epilogue
    residual = torch.randn(2, 64, 256, 260, generator=generator) if "add" in epilogue else None
    assert 2 * 64 * 256 * 260 * 4 > sparse_cpu.FRESH_PAGES_BYTES
    kept = None if residual is None else residual.clone()
    torch_out, ref = _reference(conv, x, residual, layer.relu)
    with torch.no_grad():
        out = layer(x, residual) if residual is not None else layer(x)
    assert out.shape == torch_out.shape and out.is_contiguous(memory_format=torch.channels_last)
    assert out._base is None  # a tensor of its own, not a view: in-place use with autograd later stays allowed
    assert torch.equal(out.isnan(), torch_out.isnan()) and int(out.isnan().sum()) == 9 * (64 if groups == 1 else 1)
    finite = ~torch_out.isnan()
    assert_close(out[finite], ref[finite], baseline=torch_out[finite], atol=1e-6 * conv.weight[0].numel())
    if residual is not None:
        assert torch.equal(residual, kept)
    before = sparse_cpu.cached_activation_bytes()
    del out
    assert sparse_cpu.cached_activation_bytes() >= before + 2 * 64 * 256 * 260 * 4


def test_an_input_that_needs_a_gradient_gets_the_right_gradient():
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
    layer = sparse_cpu.DenseConv2d.from_dense(conv)
    layer.relu = True
    x = torch.randn(2, 4, 9, 9, requires_grad=True)
    residual = torch.randn(2, 6, 5, 5, requires_grad=True)
    layer(x, residual).square().sum().backward()
    x_ref, residual_ref = x.detach().clone().requires_grad_(), residual.detach().clone().requires_grad_()
    torch.relu(conv(x_ref) + residual_ref).square().sum().backward()
    assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    assert_close(residual.grad, residual_ref.grad, rtol=1e-5, atol=1e-5)


def test_a_new_weight_tensor_is_seen_and_refresh_covers_writes_the_version_misses():
    conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
    layer = sparse_cpu.DenseConv2d.from_dense(conv)
    x = torch.randn(1, 8, 9, 9)
    with torch.no_grad():
        layer(x)
        for _ in range(5):  # new tensors, possibly at a freed one's address, all at version 0
            layer.weight = torch.randn(8, 8, 3, 3)
            layer.weight = torch.zeros(8, 8, 3, 3)
            assert torch.count_nonzero(layer(x)) == 0
        layer.weight = torch.randn(8, 8, 3, 3)
        layer(x)
        layer.weight.data.zero_()  # not seen by the version counter
        layer.refresh()
        assert torch.count_nonzero(layer(x)) == 0


def test_a_model_that_views_a_dense_conv_output_still_converts_and_runs():
    class ViewsAfterConvs(nn.Module):  # LeNet-style: .view after the convolutions
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(1, 6, 5), nn.Conv2d(6, 8, 3, padding=1, groups=2)
            self.fc = nn.Linear(8 * 12 * 12, 10)

        def forward(self, x):
            x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
            return self.fc(x.view(x.size(0), -1))

    class ReturnsAFeatureMap(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(x)

    for model, x in [(ViewsAfterConvs().eval(), torch.randn(2, 1, 16, 16)),
                     (ReturnsAFeatureMap().eval(), torch.randn(2, 3, 8, 8))]:
        with torch.no_grad():
            expected = model(x)
        for min_speedup in (1e9, 1.05, 1e-9):  # every conv dense, measured, every conv sparse
            summary = {}
            converted, table = sparse_cpu.convert_for_cpu(model, x, min_speedup=min_speedup, repeats=2,
                                                          summary=summary)
            with torch.no_grad():
                got = converted(x)
            assert_close(got, expected, rtol=1e-4, atol=1e-4 * (1 + float(expected.abs().max())))
            assert got.is_contiguous()
            _chosen_modules_agree_with_the_table(converted, table)
            # where the model needed NCHW after a dense conv, the summary says the dense convs return it (also when
            # the every-conv-dense variant, whose new layers first return channels_last, is the network kept)
            if any(m.contiguous_output for m in converted.modules() if isinstance(m, sparse_cpu.DenseConv2d)):
                assert "NCHW" in summary["layout"]


def test_the_every_conv_dense_variant_made_in_inference_mode_keeps_its_reordered_weights():
    conv = nn.Conv2d(4, 6, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(torch.rand_like(conv.weight) < 0.3)
    model = nn.Sequential(sparse_cpu.SparseConv2d.from_dense(conv), nn.ReLU())
    x = torch.randn(1, 4, 9, 9)
    with torch.inference_mode():
        variant, names = sparse_cpu._all_convs_dense(model, table=[])
        layer = variant.get_submodule("0")
        layer(x)
        layer(x)
    assert names == ["0"] and not layer.weight.is_inference() and len(layer._packed) == 1


def test_the_layout_note_is_the_chosen_networks(monkeypatch):
    """A model that views the last conv's output needs NCHW there: with its convs dense (every layer timed faster
    dense) the dense convs return NCHW and the summary says so; when the all-sparse network is kept, nothing
    returns channels_last any more and the note is gone (it described the network that was not kept)."""
    class ViewsTheOutput(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 8, 3, 1, 1), nn.Conv2d(8, 8, 3, 1, 1)
            with torch.no_grad():
                for conv in (self.c1, self.c2):
                    conv.weight.mul_(torch.rand(conv.weight.shape) < 0.2)

        def forward(self, x):
            x = self.c2(torch.relu(self.c1(x)))
            return x.view(x.size(0), -1)

    model, x = ViewsTheOutput().eval(), torch.randn(1, 3, 10, 10)
    with torch.no_grad():
        expected = model(x)
    monkeypatch.setattr(sparse_cpu, "compare_layer_times", lambda dense, sparse, repeats, rounds=3: (1.0, 2.0))
    for sparse_wins in (False, True):
        times = {"mixed": 5.0, "sparse": 1.0 if sparse_wins else 50.0}
        monkeypatch.setattr(sparse_cpu, "_median_times_ms",
                            lambda runs, rounds, times=times: {k: times[k] for k in runs})
        summary = {}
        converted, table = sparse_cpu.convert_for_cpu(model, x, repeats=2, summary=summary)
        dense = [m for m in converted.modules() if isinstance(m, sparse_cpu.DenseConv2d)]
        if sparse_wins:
            assert summary["network"].startswith("every supported conv sparse") and not dense
            assert summary["layout"] is None
        else:
            assert summary["network"].startswith("kept every conv dense") and dense
            assert any(m.contiguous_output for m in dense) and "NCHW" in summary["layout"]
        _chosen_modules_agree_with_the_table(converted, table)
        with torch.no_grad():
            assert_close(converted(x), expected, rtol=1e-4, atol=1e-5)


def test_layers_built_in_inference_mode_hold_ordinary_tensors():
    """SparseConv2d, SparseLinear and DenseConv2d built inside torch.inference_mode (as deploy() may be called)
    hold no inference tensors: their state dict loads back outside it (an inference-tensor bias made that fail)."""
    conv, linear = nn.Conv2d(4, 6, 3, padding=1), nn.Linear(8, 3)
    with torch.inference_mode():
        layers = [sparse_cpu.SparseConv2d.from_dense(conv), sparse_cpu.SparseLinear.from_dense(linear),
                  sparse_cpu.DenseConv2d.from_dense(conv)]
    for layer in layers:
        assert not any(t.is_inference() for t in layer.state_dict().values()), type(layer).__name__
        layer.load_state_dict(layer.state_dict())


_ACTIVATIONS = {None: lambda t: t, "relu": torch.relu, "silu": nn.functional.silu}


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("residual_layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("activation", [None, "relu", "silu"])
def test_reused_residuals_and_repeated_calls_match_conv2d(shape, batch, residual_layout, activation):
    """The first call at a shape checks it; later ones take the short path the engine's own calls take. With
    ``residual_reusable`` a channels_last residual receives the output in place (the same tensor comes back);
    an NCHW one is copied first and left as it was, as is every residual without the flag."""
    in_channels, out_channels, height, width, kernel, stride, padding, dilation, groups = shape
    generator = torch.Generator().manual_seed(hash((shape, batch, residual_layout, activation)) % 2**31)
    conv = nn.Conv2d(in_channels, out_channels, kernel, stride, padding, dilation, groups)
    x = torch.randn(batch, in_channels, height, width, generator=generator).contiguous(
        memory_format=torch.channels_last)
    layer = sparse_cpu.DenseConv2d.from_dense(conv)
    layer.activation = activation
    with torch.no_grad():
        residual = torch.randn(conv(x).shape, generator=generator)
    if residual_layout == "channels_last":
        residual = residual.contiguous(memory_format=torch.channels_last)
    torch_out, ref = _reference(conv, x, residual)
    torch_out, ref = _ACTIVATIONS[activation](torch_out), _ACTIVATIONS[activation](ref)
    outs = {}
    for reusable in (False, True):
        for call in range(2):
            given = residual.clone()  # preserve_format: the same layout
            with torch.no_grad():
                out = layer(x, given, residual_reusable=reusable)
            assert_close(out, ref, baseline=torch_out, atol=1e-6 * conv.weight[0].numel())
            # (a 1x1-pixel NCHW residual is channels_last too)
            in_place = reusable and residual.is_contiguous(memory_format=torch.channels_last)
            assert (out.data_ptr() == given.data_ptr()) == in_place
            if not in_place:
                assert torch.equal(given, residual)
            outs[reusable, call] = out
    assert torch.equal(outs[False, 0], outs[False, 1]) and torch.equal(outs[True, 0], outs[True, 1])


def test_a_residual_is_not_written_where_it_must_not_be():
    """Not when it is the layer's own input (or shares its memory), not an inference tensor outside inference
    mode (torch would refuse the write), and not through autograd's path."""
    conv = nn.Conv2d(4, 4, 3, padding=1)
    layer = sparse_cpu.DenseConv2d.from_dense(conv)
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = conv(x) + x
        for _ in range(2):  # the general path, then the short one
            given = x.clone()
            assert_close(layer(given, given, residual_reusable=True), expected, rtol=1e-5, atol=1e-5)
            assert torch.equal(given, x)
            whole = x.clone()
            view = whole[:, :, :, :]
            assert_close(layer(whole, view, residual_reusable=True), expected, rtol=1e-5, atol=1e-5)
            assert torch.equal(whole, x)
    with torch.inference_mode():
        frozen = x.clone()
    for _ in range(2):
        with torch.no_grad():
            out = layer(x, frozen, residual_reusable=True)
        assert torch.equal(frozen, x) and out.data_ptr() != frozen.data_ptr()
        assert_close(out, expected, rtol=1e-5, atol=1e-5)
    leaf = x.clone().requires_grad_()
    out = layer(x, leaf, residual_reusable=True)
    out.sum().backward()
    assert torch.equal(leaf.detach(), x) and torch.equal(leaf.grad, torch.ones_like(x))


def test_a_layer_pickled_before_the_short_path_still_runs():
    layer = sparse_cpu.DenseConv2d.from_dense(nn.Conv2d(3, 5, 3, padding=1))
    state = layer.__getstate__()
    del state["_small_output_shapes"]
    old = sparse_cpu.DenseConv2d.__new__(sparse_cpu.DenseConv2d)
    old.__setstate__(state)
    x = torch.randn(1, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.equal(old(x), layer(x)) and torch.equal(old(x), layer(x))


def test_the_short_path_follows_a_new_geometry_or_weight():
    """After padding, stride or the weight is set anew, a call goes through the checks again (an outside review's
    case: a residual of the old output's shape was accepted and the output was wrong)."""
    layer = sparse_cpu.DenseConv2d.from_dense(nn.Conv2d(4, 4, 3, padding=1))
    x = torch.randn(1, 4, 8, 8).contiguous(memory_format=torch.channels_last)
    old_residual = torch.randn(1, 4, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        layer(x), layer(x, old_residual)
        layer.padding = (2, 2)
        expected = nn.functional.conv2d(x, layer.weight, layer.bias, 1, 2)
        assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="does not broadcast"):
            layer(x, old_residual)
        layer.weight = torch.randn(6, 4, 3, 3)
        layer.bias = torch.randn(6)
        assert_close(layer(x), nn.functional.conv2d(x, layer.weight, layer.bias, 1, 2), rtol=1e-5, atol=1e-5)
        layer.weight = torch.randn(6, 5, 3, 3)
        with pytest.raises(ValueError, match="input has 4 channels"):
            layer(x)


def test_a_residual_sharing_memory_with_an_nchw_input_is_not_written():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    layer = sparse_cpu.DenseConv2d.from_dense(conv)
    whole = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    kept = whole.clone()
    x = whole.transpose(2, 3)  # NCHW strides over the residual's memory: copied before the call
    with torch.no_grad():
        out = layer(x, whole, residual_reusable=True)
    assert torch.equal(whole, kept)
    assert_close(out, conv(kept.transpose(2, 3)) + kept, rtol=1e-5, atol=1e-5)


def test_a_replaced_weight_is_not_kept_and_refresh_forgets_shapes():
    """An outside review's cases: the short path's shape cache kept every replaced weight alive (and pickled
    it), and after ``weight.data`` took another shape ``refresh()`` left a stale shape, so a clear ValueError
    became oneDNN's error."""
    import gc
    import weakref

    layer = sparse_cpu.DenseConv2d.from_dense(nn.Conv2d(8, 8, 3, padding=1))
    x = torch.randn(1, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        layer(x), layer(x)
        old = weakref.ref(layer.weight)
        size = len(pickle.dumps(layer))
        layer.load_state_dict(sparse_cpu.DenseConv2d.from_dense(nn.Conv2d(8, 8, 3, padding=1)).state_dict(),
                              assign=True)
        layer(x), layer(x[..., :4, :4])
        gc.collect()
        assert old() is None and len(pickle.dumps(layer)) <= size + 1024
        layer.weight.data = torch.randn(8, 4, 3, 3)
        layer.refresh()
        with pytest.raises(ValueError, match="input has 8 channels"):
            layer(x)


@pytest.mark.parametrize("dense", [True, False])
def test_geometry_given_as_lists_still_runs(dense):
    conv = nn.Conv2d(4, 4, 3, padding=1)
    layer = (sparse_cpu.DenseConv2d if dense else sparse_cpu.SparseConv2d).from_dense(conv)
    x = torch.randn(1, 4, 7, 7).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        layer(x)
        layer.padding = [2, 2]
        for _ in range(2):
            assert_close(layer(x), nn.functional.conv2d(x, conv.weight, conv.bias, 1, 2), rtol=1e-5, atol=1e-5)
        layer.padding[0] = 0  # changed in place: a cache keyed on the list's identity would not see it
        assert_close(layer(x), nn.functional.conv2d(x, conv.weight, conv.bias, 1, (0, 2)), rtol=1e-5, atol=1e-5)


_POINTWISE = pytest.mark.skipif(not sparse_cpu.pointwise_conv_supported(),
                                reason="the engine's dense 1x1 kernel needs the C++ extension and AVX2 + FMA")


def _pointwise_calls(monkeypatch) -> list:
    """The calls the C++ extension's pointwise_conv gets from now on (the op still runs)."""
    module = sparse_cpu._ops()
    calls, op = [], module.pointwise_conv
    monkeypatch.setattr(module, "pointwise_conv", lambda *args, **kwargs: calls.append(args) or op(*args, **kwargs))
    return calls


@_POINTWISE
@pytest.mark.parametrize("activation", [None, "relu", "silu"])
@pytest.mark.parametrize("out_channels", [32, 24])
def test_1x1_convs_run_through_the_pointwise_kernel_where_it_applies(monkeypatch, activation, out_channels):
    """A 1x1, stride-1, ungrouped layer of a multiple of 16 output channels with no activation or ReLU runs through
    pointwise_conv, any other through oneDNN (SiLU, 24 channels, stride 2, groups, the switch off); each equal to
    the float64 convolution within float32 rounding."""
    calls = _pointwise_calls(monkeypatch)
    generator = torch.Generator().manual_seed(out_channels)
    conv = nn.Conv2d(40, out_channels, 1)
    x = torch.randn(3, 40, 9, 11, generator=generator)
    residual = torch.randn(3, out_channels, 9, 11, generator=generator)
    layer = sparse_cpu.DenseConv2d.from_dense(conv)
    layer.activation = activation
    with torch.no_grad():
        torch_out, ref = conv(x) + residual, nn.functional.conv2d(x.double(), conv.weight.double(),
                                                                   conv.bias.double()) + residual.double()
        if activation is not None:
            torch_out, ref = _ACTIVATIONS[activation](torch_out), _ACTIVATIONS[activation](ref)
        out = layer(x, residual)
    assert_close(out, ref, baseline=torch_out, atol=1e-6 * 40)
    assert len(calls) == (1 if activation != "silu" and out_channels % 16 == 0 else 0)
    calls.clear()
    others = [sparse_cpu.DenseConv2d.from_dense(nn.Conv2d(40, 32, 1, stride=2)),
              sparse_cpu.DenseConv2d.from_dense(nn.Conv2d(40, 32, 1, groups=2))]
    with torch.no_grad():
        for other in others:
            other(x)
        previous = sparse_cpu.set_pointwise_conv(False)
        try:
            assert_close(layer(x, residual), ref, baseline=torch_out, atol=1e-6 * 40)
        finally:
            sparse_cpu.set_pointwise_conv(previous)
    assert calls == []


@_POINTWISE
def test_the_pointwise_kernel_follows_the_weight_keeps_nan_and_leaves_the_residual(monkeypatch):
    calls = _pointwise_calls(monkeypatch)
    layer = sparse_cpu.DenseConv2d(torch.randn(16, 8, 1, 1), torch.randn(16), activation="relu")
    x = torch.randn(2, 8, 5, 5)
    x[1, 3, 2, 2] = float("nan")
    residual = torch.randn(2, 16, 5, 5)
    kept = residual.clone()
    with torch.no_grad():
        out = layer(x, residual, residual_reusable=True)
        expected = torch.relu(nn.functional.conv2d(x, layer.weight, layer.bias) + residual)
        assert torch.equal(out.isnan(), expected.isnan()) and int(out.isnan().sum()) == 16
        assert torch.equal(residual, kept)
        layer.weight.mul_(0)  # in place: the version counter moves, the panels are packed again
        assert torch.equal(layer(x[:1]), torch.relu(layer.bias).view(1, 16, 1, 1).expand(1, 16, 5, 5))
        layer.weight = torch.ones(16, 8, 1, 1)  # a new tensor
        assert_close(layer(x[:1]), torch.relu(x[:1].sum(1, keepdim=True) + layer.bias.view(1, 16, 1, 1)),
                     rtol=1e-5, atol=1e-5)
        layer.weight.data.fill_(2)  # not seen by the version counter: refresh
        layer.refresh()
        assert_close(layer(x[:1]), torch.relu(2 * x[:1].sum(1, keepdim=True) + layer.bias.view(1, 16, 1, 1)),
                     rtol=1e-5, atol=1e-5)
    assert len(calls) == 4
    with torch.no_grad():  # written into a reusable channels_last residual, as oneDNN does
        given = residual.contiguous(memory_format=torch.channels_last)
        assert layer(x, given, residual_reusable=True).data_ptr() == given.data_ptr()


@_POINTWISE
def test_the_pointwise_op_refuses_what_it_cannot_run():
    ops = sparse_cpu._ops()
    weight = torch.randn(32, 8, 1, 1)
    packed = ops.pointwise_conv_pack(weight)
    assert packed.shape == (2, 8, 16)
    x = torch.randn(1, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="C_out must be a positive multiple of 16"):
        ops.pointwise_conv_pack(torch.randn(24, 8, 1, 1))
    with pytest.raises(RuntimeError, match=r"weight must be \[C_out, C_in, 1, 1\]"):
        ops.pointwise_conv_pack(torch.randn(32, 8, 3, 3))
    with pytest.raises(RuntimeError, match="input must be a 4-d float32 CPU tensor in channels_last"):
        ops.pointwise_conv(x.contiguous(), packed)
    with pytest.raises(RuntimeError, match="input has 4 channels, the weight expects 8"):
        ops.pointwise_conv(torch.randn(1, 4, 4, 4).contiguous(memory_format=torch.channels_last), packed)
    with pytest.raises(RuntimeError, match="bias must be a contiguous float32 CPU tensor of 32 values"):
        ops.pointwise_conv(x, packed, torch.randn(16))
    with pytest.raises(RuntimeError, match="residual must have the output's shape"):
        ops.pointwise_conv(x, packed, None, torch.randn(1, 32, 4, 5))
    with pytest.raises(RuntimeError, match="into_residual needs a residual that shares no memory with the input"):
        square = ops.pointwise_conv_pack(torch.randn(32, 32, 1, 1))
        same = torch.randn(1, 32, 4, 4).contiguous(memory_format=torch.channels_last)
        ops.pointwise_conv(same, square, None, same, False, True)
    with pytest.raises(RuntimeError, match="into_residual needs a channels_last residual"):
        ops.pointwise_conv(x, packed, None, None, False, True)
    # a packed weight that does not start on 32 bytes (a view 4 bytes in), and one input channel, whose packing is a
    # copy, not a view of the weight
    shifted = torch.empty(packed.numel() + 1)[1:].view(packed.shape).copy_(packed)
    assert shifted.data_ptr() % 32 != 0
    assert_close(ops.pointwise_conv(x, shifted), nn.functional.conv2d(x, weight), rtol=1e-5, atol=1e-5)
    one_channel = torch.randn(16, 1, 1, 1)
    assert ops.pointwise_conv_pack(one_channel).data_ptr() != one_channel.data_ptr()
    # an NCHW residual is read through a copy; an empty batch gives an empty output
    residual = torch.randn(1, 32, 4, 4)
    expected = nn.functional.conv2d(x, weight) + residual
    assert_close(ops.pointwise_conv(x, packed, None, residual), expected, rtol=1e-5, atol=1e-5)
    assert ops.pointwise_conv(torch.randn(0, 8, 4, 4).contiguous(memory_format=torch.channels_last),
                              packed).shape == (0, 32, 4, 4)


@_POINTWISE
@pytest.mark.parametrize("batch", [1, 3])
def test_the_pointwise_kernel_equals_the_conv_with_each_vector_width(kernel_isa, batch):
    """Every tile the dense 1x1 kernel has (1-6 positions; AVX2 16 output channels, AVX-512 32 or an odd last 16)
    gives the float64 convolution with bias, residual and ReLU within float32 rounding: positions 1 to 61 (7x7 cut
    in tiles of 6, 6, 6, 6, 5, ...), 16 to 80 output channels (odd and even panel counts, panel groups of one), and
    with one thread and two."""
    ops = sparse_cpu._ops()
    generator = torch.Generator().manual_seed(batch)
    for in_channels, out_channels, height, width in [(3, 16, 1, 1), (40, 48, 7, 7), (64, 80, 5, 11), (17, 32, 1, 5),
                                                     (256, 64, 6, 6), (8, 96, 61, 1)]:
        weight = torch.randn(out_channels, in_channels, 1, 1, generator=generator) / in_channels ** 0.5
        bias = torch.randn(out_channels, generator=generator)
        x = torch.randn(batch, in_channels, height, width, generator=generator)
        residual = torch.randn(batch, out_channels, height, width, generator=generator)
        x, residual = (t.contiguous(memory_format=torch.channels_last) for t in (x, residual))
        packed = ops.pointwise_conv_pack(weight)
        exact = nn.functional.conv2d(x.double(), weight.double(), bias.double())
        for threads in (1, 2):
            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                plain = ops.pointwise_conv(x, packed, bias)
                fused = ops.pointwise_conv(x, packed, bias, residual, True)
            finally:
                torch.set_num_threads(previous)
            what = (kernel_isa, in_channels, out_channels, height, width, threads)
            assert_close(plain, exact.float(), rtol=1e-5, atol=1e-6 * in_channels, msg=f"{what}")
            assert_close(fused, torch.relu(exact + residual.double()).float(), rtol=1e-5, atol=1e-6 * in_channels,
                         msg=f"{what}")


@_POINTWISE
def test_the_decision_table_says_which_dense_layers_run_through_the_pointwise_kernel():
    """A 1x1 layer kept dense whose fused activation the kernel applies (ReLU) is "pointwise" in its row's "dense
    by"; one whose fused activation it does not (SiLU) is "oneDNN", as it runs; the converted network computes what
    the model does."""
    model = nn.Sequential(nn.Conv2d(8, 32, 1), nn.ReLU(), nn.Conv2d(32, 16, 1), nn.SiLU(), nn.Conv2d(16, 16, 3),
                          nn.Flatten(), nn.Linear(16 * 4 * 4, 3)).eval()
    x = torch.randn(2, 8, 6, 6)
    converted, table = sparse_cpu.convert_for_cpu(model, x, policy="measure", min_speedup=1e9, repeats=2)
    rows = {row["name"]: row for row in table}
    modules = dict(converted.named_modules())
    assert rows["0"]["chosen"] == rows["2"]["chosen"] == "dense"
    assert (rows["0"]["dense_algorithm"], rows["2"]["dense_algorithm"]) == ("pointwise", "oneDNN")
    assert modules["0"].dense_algorithm == "pointwise" and modules["2"].activation == "silu"
    assert rows["4"]["dense_algorithm"] in ("oneDNN", "Winograd")
    assert "pointwise" in sparse_cpu.format_decisions(table)
    with torch.no_grad():
        assert_close(converted(x), model(x), rtol=1e-4, atol=1e-5)

"""Winograd's F(4x4, 3x3) for the engine's dense 3x3 convolutions: the C++ kernel ``winograd_conv2d`` against its
plain-PyTorch reference (same tiles and transforms) and against the exact convolution (float64), the
``WinogradConv2d`` layer, and how ``convert_for_cpu`` chooses it.

Float rules: kernel against reference, both float32 with the same transforms in another order of operations, within
1e-5 of the largest output; against the float64 convolution within 2e-5 of the largest output (measured 1-8e-6 on
these shapes; a direct float32 convolution: 3e-7)."""
from __future__ import annotations

import copy
import pickle
import re
import zlib

import pytest
import torch
import torch.nn.functional as F
from helpers import outputs_from_two_threads
from tolerance import assert_close
from torch import nn

from vpns_fast.deploy import fusion, sparse_cpu
from vpns_fast.deploy.winograd import winograd_conv2d_reference, winograd_panels, winograd_weight

_OK, _REASON = sparse_cpu.available()
pytestmark = pytest.mark.skipif(not (_OK and sparse_cpu.dense_conv_available()[0]),
                                reason=_REASON if not _OK else sparse_cpu.dense_conv_available()[1])

EXACT_RTOL = 2e-5  # of the largest |output|, against the float64 convolution
REFERENCE_RTOL = 1e-5  # of the largest |output|, against the same algorithm in torch (each within ~5e-6 of exact)

# (batch, C_in, C_out, H, W, padding): ResNet-like, odd sizes whose tiles overhang the output, more channels than
# one block of the transforms (64), no padding and more padding than the kernel needs, a 1x1 output.
SHAPES = [
    (1, 64, 64, 56, 56, 1),
    (2, 5, 7, 9, 11, 1),
    (3, 70, 130, 13, 6, 0),
    (1, 3, 4, 6, 7, 2),
    (33, 4, 3, 5, 5, 1),
    (1, 2, 3, 3, 3, 0),
]


def _exact(x, weight, bias, padding, residual=None, relu=False):
    out = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), padding=padding)
    if residual is not None:
        out = out + residual.double()
    return out.relu() if relu else out


def _inputs(shape, seed):
    batch, c_in, c_out, height, width, padding = shape
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c_in, height, width, generator=generator)
    weight = torch.randn(c_out, c_in, 3, 3, generator=generator) * (2 / (9 * max(c_in, 1))) ** 0.5
    bias = torch.randn(c_out, generator=generator)
    residual = torch.randn(batch, c_out, height + 2 * padding - 2, width + 2 * padding - 2, generator=generator)
    return x, weight, bias, residual


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("epilogue", ["none", "relu", "add+relu"])
@pytest.mark.parametrize("chunk_tiles", [0, 1, 5])
def test_kernel_matches_its_reference_and_the_exact_convolution(shape, epilogue, chunk_tiles):
    x, weight, bias, residual = _inputs(shape, zlib.crc32(repr((shape, epilogue, chunk_tiles)).encode()))
    padding = shape[-1]
    relu = "relu" in epilogue
    residual = residual if "add" in epilogue else None
    with torch.no_grad():
        out = sparse_cpu._ops().winograd_conv2d(x.contiguous(memory_format=torch.channels_last),
                                                winograd_weight(weight), bias, [padding, padding], residual,
                                                int(relu), chunk_tiles)
    reference = winograd_conv2d_reference(x, weight, bias, (padding, padding), residual, relu)
    exact = _exact(x, weight, bias, padding, residual, relu)
    assert out.shape == exact.shape and out.is_contiguous(memory_format=torch.channels_last)
    # errors scale with the output before the ReLU (which may leave only a few small values)
    scale = float(_exact(x, weight, bias, padding, residual).abs().max())
    assert_close(out, reference, rtol=0.0, atol=REFERENCE_RTOL * scale)
    assert_close(out, exact.float(), rtol=0.0, atol=EXACT_RTOL * scale)
    assert_close(reference, exact.float(), rtol=0.0, atol=EXACT_RTOL * scale)


# (batch, C_in, C_out, H, W, padding) with C_out a multiple of 16 for the packed panels: one panel, three (the
# 16-lane tile takes two, then one), 1 input channel, 1-6 tiles' rows at a point (batch 1 at 7x7: 4 tiles), more
# tiles than a block of 48 rows
PANEL_SHAPES = [
    (1, 64, 64, 56, 56, 1),
    (2, 5, 48, 9, 11, 1),
    (1, 1, 16, 7, 7, 1),
    (3, 70, 32, 13, 6, 0),
    (1, 512, 16, 7, 7, 1),
    (33, 4, 48, 5, 5, 1),
]


@pytest.mark.parametrize("shape", PANEL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("chunk_tiles", [0, 5])
@pytest.mark.parametrize("threads", [1, 2])
def test_packed_panels_give_the_batched_products_with_each_vector_width(kernel_isa, shape, chunk_tiles, threads):
    """The products through the engine's 1x1 tile (weight from winograd_panels) equal the reference and the exact
    convolution, with the AVX2 and the 16-lane tile, whole chunks and short ones, one thread and two."""
    x, weight, bias, residual = _inputs(shape, zlib.crc32(repr((shape, chunk_tiles, kernel_isa)).encode()))
    padding = shape[-1]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            out = sparse_cpu._ops().winograd_conv2d(x.contiguous(memory_format=torch.channels_last),
                                                    winograd_panels(weight), bias, [padding, padding], residual, 1,
                                                    chunk_tiles)
    finally:
        torch.set_num_threads(previous)
    scale = float(_exact(x, weight, bias, padding, residual).abs().max())
    assert_close(out, winograd_conv2d_reference(x, weight, bias, (padding, padding), residual, True), rtol=0.0,
                 atol=REFERENCE_RTOL * scale)
    assert_close(out, _exact(x, weight, bias, padding, residual, True).float(), rtol=0.0, atol=EXACT_RTOL * scale)


def test_packed_panels_over_a_chunk_of_2401_tiles():
    """2401 tiles in one chunk: blocks of 49 rows, the last one full (cut as 2401 / 48 = 50 blocks of 49, the last
    would start past the chunk's end)."""
    x, weight, bias, _ = _inputs((1, 1, 16, 196, 196, 1), 8)
    with torch.no_grad():
        out = sparse_cpu._ops().winograd_conv2d(x, winograd_panels(weight), bias, [1, 1], None, 0, 2401)
    assert_close(out, _exact(x, weight, bias, 1).float(), rtol=EXACT_RTOL, relative_to_max=True)


def test_the_layer_keeps_the_batched_layout_where_the_tile_cannot_run(monkeypatch):
    monkeypatch.setattr(sparse_cpu, "pointwise_conv_supported", lambda: False)
    conv = nn.Conv2d(6, 32, 3, padding=1)
    layer, x = sparse_cpu.WinogradConv2d.from_dense(conv), torch.randn(2, 6, 9, 10)
    with torch.no_grad():
        assert layer._packed_weight(x.shape).shape == (36, 6, 32)
        assert_close(layer(x), conv(x), rtol=EXACT_RTOL, relative_to_max=True)


def test_winograd_panels_are_the_transformed_weight_cut_in_16_channels():
    weight = torch.randn(48, 5, 3, 3)
    panels, transformed = winograd_panels(weight), winograd_weight(weight)
    assert panels.shape == (36, 3, 5, 16) and panels.is_contiguous()
    for panel in range(3):
        assert torch.equal(panels[:, panel], transformed[:, :, 16 * panel:16 * (panel + 1)])
    with pytest.raises(ValueError, match="C_out a multiple of 16"):
        winograd_panels(torch.randn(40, 5, 3, 3))


def test_nchw_input_no_bias_and_a_nan_kept_by_relu_within_its_tiles():
    x, weight, _, _ = _inputs((2, 6, 5, 10, 9, 1), 1)
    x[0, 2, 4, 4] = float("nan")
    out = sparse_cpu._ops().winograd_conv2d(x, winograd_weight(weight), None, [1, 1], None, 1)
    exact = _exact(x, weight, None, 1, relu=True)
    # torch: NaN at the 3x3 outputs whose window reads the pixel (rows and columns 3-5), kept by ReLU. Winograd: at
    # outputs of the two tiles each way whose 6x6 input reads it (output rows and columns 0-7), those its transform
    # reaches (the transforms' zero entries spare the others): rows and columns 3-7. ReLU keeps it there too: the
    # fault stays visible, over a wider patch
    patch = torch.zeros_like(out, dtype=torch.bool)
    patch[0, :, 3:8, 3:8] = True
    assert torch.equal(out.isnan(), patch)
    assert torch.equal(exact.isnan(), exact.isnan() & patch) and bool(exact.isnan()[0, :, 3:6, 3:6].all())
    assert_close(out[~patch], exact[~patch], rtol=EXACT_RTOL, relative_to_max=True)


@pytest.mark.parametrize("call, message", [
    (lambda ops, x, u: ops.winograd_conv2d(x, u[:, :3].contiguous(), None, [1, 1]), "input has 4 channels"),
    (lambda ops, x, u: ops.winograd_conv2d(x, u.reshape(6, 6, 4, 5), None, [1, 1]), "[36, C_in, C_out]"),
    (lambda ops, x, u: ops.winograd_conv2d(x[:, :, :2, :2], u, None, [0, 0]), "smaller than the 3x3 kernel"),
    (lambda ops, x, u: ops.winograd_conv2d(x, u, None, [1, 1], None, 2), "activation must be 0 (none) or 1"),
    (lambda ops, x, u: ops.winograd_conv2d(x.double(), u, None, [1, 1]), "float32 CPU"),
    (lambda ops, x, u: ops.winograd_conv2d(x, u, None, [1, 1], torch.zeros(1, 5, 3, 3)), "residual must be"),
])
def test_kernel_refuses_what_it_cannot_compute(call, message):
    x, weight, _, _ = _inputs((1, 4, 5, 6, 6, 1), 2)
    with pytest.raises(RuntimeError, match=re.escape(message)):
        call(sparse_cpu._ops(), x, winograd_weight(weight))


@pytest.mark.parametrize("call, message", [
    (lambda ops, x, p: ops.winograd_conv2d(x[:, :3].contiguous(), p, None, [1, 1]), "input has 3 channels"),
    (lambda ops, x, p: ops.winograd_conv2d(x, p.reshape(36, 2, 2, 32), None, [1, 1]), "[36, C_out / 16, C_in, 16]"),
    (lambda ops, x, p: ops.winograd_conv2d(x, p.transpose(1, 2), None, [1, 1]), "contiguous"),
    (lambda ops, x, p: ops.winograd_conv2d(x, torch.zeros(()), None, [1, 1]), "weight must be the contiguous"),
])
def test_kernel_refuses_panels_it_cannot_use(call, message):
    x, weight, _, _ = _inputs((1, 4, 32, 6, 6, 1), 6)
    with pytest.raises(RuntimeError, match=re.escape(message)):
        call(sparse_cpu._ops(), x, winograd_panels(weight))


def test_kernel_refuses_an_input_that_needs_a_gradient():
    x, weight, _, _ = _inputs((1, 4, 5, 6, 6, 1), 3)
    with pytest.raises(RuntimeError, match="no gradient"):
        sparse_cpu._ops().winograd_conv2d(x.requires_grad_(), winograd_weight(weight), None, [1, 1])


def test_kernel_refuses_a_residual_that_needs_a_gradient_and_takes_empty_shapes():
    x, weight, _, residual = _inputs((1, 4, 5, 6, 6, 1), 4)
    with pytest.raises(RuntimeError, match="no gradient"):
        sparse_cpu._ops().winograd_conv2d(x, winograd_weight(weight), None, [1, 1], residual.requires_grad_())
    with torch.no_grad():
        for shape in [(0, 4, 5, 6, 6, 1), (1, 0, 0, 6, 6, 1), (2, 0, 3, 5, 5, 0)]:  # no image, no channels
            x, weight, bias, _ = _inputs(shape, 5)
            out = sparse_cpu._ops().winograd_conv2d(x, winograd_weight(weight), bias, [shape[-1]] * 2)
            size = shape[3] + 2 * shape[-1] - 2
            assert out.shape == (shape[0], shape[2], size, size)  # (F.conv2d refuses 0 output channels)
            assert winograd_conv2d_reference(x, weight, bias, (shape[-1],) * 2).shape == out.shape
            if shape[1] == 0 and shape[2]:  # no input channel: the bias alone (torch's conv2d returns no channels)
                assert torch.equal(out, bias.view(1, -1, 1, 1).expand_as(out))


def test_the_chunk_buffers_come_from_the_cache_whatever_their_size():
    """The transformed chunk and its products (36 x 10 tiles x 4 and x 16 channels: 5.8 and 23 KB, under the 64 KiB
    from which outputs use the cache) go back to the engine's buffer cache after the call, not to malloc: from malloc
    they made glibc trim and fault in its heap again on every call in some processes."""
    x, weight, bias, _ = _inputs((1, 4, 16, 20, 8, 1), 7)
    previous = sparse_cpu.set_activation_cache_limit(1 << 30)
    try:
        sparse_cpu.set_activation_cache_limit(0)  # empties the cache
        sparse_cpu.set_activation_cache_limit(1 << 30)
        with torch.no_grad():
            out = sparse_cpu._ops().winograd_conv2d(x, winograd_weight(weight), bias, [1, 1])
        assert sparse_cpu.cached_activation_bytes() == 36 * 10 * (4 + 16) * 4
        assert_close(out, _exact(x, weight, bias, 1).float(), rtol=EXACT_RTOL, relative_to_max=True)
    finally:
        sparse_cpu.set_activation_cache_limit(previous)


def test_winograd_weight_refuses_other_kernels():
    with pytest.raises(ValueError, match=r"\[C_out, C_in, 3, 3\]"):
        winograd_weight(torch.randn(4, 3, 5, 5))


@pytest.mark.parametrize("conv, reason", [
    (nn.Conv2d(4, 4, 3, stride=2, padding=1), "not stride 1, dilation 1, groups 1"),
    (nn.Conv2d(4, 4, 3, padding=2, dilation=2), "not stride 1, dilation 1, groups 1"),
    (nn.Conv2d(4, 4, 3, padding=1, groups=2), "not stride 1, dilation 1, groups 1"),
    (nn.Conv2d(4, 4, 5, padding=2), "not a 3x3 kernel"),
    (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), "padding other than zeros"),
])
def test_the_layer_takes_only_what_the_kernel_computes(conv, reason):
    assert sparse_cpu.winograd_unsupported_reason(conv) == reason
    with pytest.raises(ValueError, match=reason if conv.padding_mode == "zeros" else "padding_mode='zeros' only"):
        sparse_cpu.WinogradConv2d.from_dense(conv)


@pytest.mark.parametrize("activation", [None, "relu", "silu"])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("out_channels", [9, 32])
def test_the_layer_matches_conv2d_with_its_epilogue(activation, with_residual, layout, out_channels):
    """Its products in packed panels where C_out is a multiple of 16 (and the CPU has AVX2), else batched."""
    conv = nn.Conv2d(6, out_channels, 3, padding=1)
    x, residual = torch.randn(3, 6, 11, 13), torch.randn(3, out_channels, 11, 13)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    layer = sparse_cpu.WinogradConv2d.from_dense(conv)
    layer.activation = activation
    with torch.no_grad():
        out = layer(x, residual) if with_residual else layer(x)
        expected = conv(x) + (residual if with_residual else 0)
        expected = {None: expected, "relu": F.relu(expected), "silu": F.silu(expected)}[activation]
    assert "winograd" in repr(layer)
    panels = out_channels % 16 == 0 and sparse_cpu.pointwise_conv_supported()
    assert layer._packed_weight(x.shape).shape == ((36, 2, 6, 16) if panels else (36, 6, out_channels))
    assert_close(out, expected, rtol=EXACT_RTOL, relative_to_max=True)


def test_a_geometry_set_after_construction_goes_to_onednn():
    conv = nn.Conv2d(5, 4, 3, padding=1)
    layer = sparse_cpu.WinogradConv2d.from_dense(conv)
    x = torch.randn(2, 5, 9, 9)
    with torch.no_grad():
        layer(x)  # holds its transformed weight
        for stride, dilation in [((2, 2), (1, 1)), ((1, 1), (2, 2)), ([1, 1], [1, 1])]:
            layer.stride, layer.dilation = stride, dilation
            layer.padding = tuple(dilation)
            expected = F.conv2d(x, conv.weight, conv.bias, tuple(stride), tuple(dilation), tuple(dilation))
            assert_close(layer(x), expected, rtol=EXACT_RTOL, relative_to_max=True)


def test_winograd_must_be_a_bool():
    with pytest.raises(TypeError, match="winograd must be a bool, got 'false'"):
        sparse_cpu.convert_for_cpu(_net(), torch.randn(1, 3, 10, 10), winograd="false")


def test_the_layer_gives_conv2d_gradients_and_follows_its_weight():
    conv = nn.Conv2d(5, 4, 3, padding=1)
    layer = sparse_cpu.WinogradConv2d.from_dense(conv)
    layer.relu = True
    x = torch.randn(2, 5, 8, 8, requires_grad=True)
    layer(x).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    F.relu(conv(x_ref)).sum().backward()
    assert_close(x.grad, x_ref.grad)
    with torch.no_grad():
        before = layer(x)
        layer.weight.mul_(2)  # in place: the version counter tells the layer to transform it again
        after = layer(x)
        expected = F.relu(F.conv2d(x, 2 * conv.weight, conv.bias, padding=1))
    assert not torch.equal(before, after)
    assert_close(after, expected, rtol=EXACT_RTOL, relative_to_max=True)


def test_pickle_deepcopy_inference_mode_and_two_threads():
    conv = nn.Conv2d(6, 7, 3, padding=1)
    x = torch.randn(2, 6, 15, 14)
    with torch.inference_mode():
        built_inside = sparse_cpu.WinogradConv2d.from_dense(conv)
        inside = built_inside(x)
    layer = sparse_cpu.WinogradConv2d.from_dense(conv)
    with torch.no_grad():
        layer(x)  # holds its transformed weight now
        outs = [c(x) for c in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer), built_inside)]
        expected = conv(x)
    assert_close(inside, expected, rtol=EXACT_RTOL, relative_to_max=True)
    for out in outs:
        assert torch.equal(out, inside)
    inputs = [torch.randn(batch, 6, size, size) for batch, size in [(1, 9), (3, 12), (2, 9), (1, 15)]]
    with torch.no_grad():
        references = [conv(x) for x in inputs]
    for index, got in outputs_from_two_threads(layer, inputs, rounds=10):
        assert_close(got, references[index], rtol=EXACT_RTOL, relative_to_max=True)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(8 * 5 * 5, 3)).eval()


def _winograd_always_faster(monkeypatch):
    """Every layer timing says the second call is twice as fast (Winograd beats oneDNN, and a sparse layer its
    dense stand-in, which min_speedup=1e9 then refuses); whole networks time alike, except that one with
    Winograd layers by oneDNN again is slower."""
    monkeypatch.setattr(sparse_cpu, "compare_layer_times", lambda first, second, repeats, rounds=3: (2.0, 1.0))
    monkeypatch.setattr(sparse_cpu, "_median_times_ms",
                        lambda runs, rounds: {label: 3.0 if label == "onednn" else 2.0 for label in runs})


def test_convert_for_cpu_runs_eligible_dense_convs_by_winograd_where_faster(monkeypatch):
    _winograd_always_faster(monkeypatch)
    model, x = _net(), torch.randn(2, 3, 10, 10)
    converted, table = sparse_cpu.convert_for_cpu(model, x, min_speedup=1e9, repeats=1)
    kinds = {name: type(module) for name, module in converted.named_modules()}
    assert kinds["0"] is kinds["2"] is sparse_cpu.WinogradConv2d and kinds["4"] is sparse_cpu.DenseConv2d
    rows = {row["name"]: row for row in table}
    assert rows["0"]["dense_algorithm"] == "Winograd" and "than Winograd" in rows["0"]["reason"]
    assert rows["0"]["onednn_ms"] == 2.0 and rows["0"]["winograd_ms"] == 1.0
    assert rows["4"]["dense_algorithm"] == "oneDNN"
    assert rows["4"]["winograd_note"] == "not stride 1, dilation 1, groups 1"
    assert converted.get_submodule("0").relu  # the fused ReLU, applied in the kernel's output loop
    with torch.no_grad():
        assert_close(converted(x), model(x), rtol=1e-4, relative_to_max=True)
    # the every-conv-dense variant keeps the algorithm each row measured faster
    sparse_everywhere, _ = sparse_cpu.convert_for_cpu(model, x, policy="sparse")
    variant, names = sparse_cpu._all_convs_dense(sparse_everywhere, table)
    assert isinstance(variant.get_submodule("0"), sparse_cpu.WinogradConv2d)
    assert type(variant.get_submodule("4")) is sparse_cpu.DenseConv2d and "4" in names


def test_winograd_false_and_a_result_outside_the_bound_keep_onednn(monkeypatch):
    _winograd_always_faster(monkeypatch)
    model, x = _net(), torch.randn(1, 3, 10, 10)
    converted, table = sparse_cpu.convert_for_cpu(model, x, min_speedup=1e9, repeats=1, winograd=False)
    assert not any(isinstance(m, sparse_cpu.WinogradConv2d) for m in converted.modules())
    assert table[0]["winograd_note"] == "winograd=False" and table[0]["dense_algorithm"] == "oneDNN"
    original = sparse_cpu.WinogradConv2d._run
    monkeypatch.setattr(sparse_cpu.WinogradConv2d, "_run", lambda *args: original(*args) + 1.0)
    converted, table = sparse_cpu.convert_for_cpu(model, x, min_speedup=1e9, repeats=1)
    assert not any(isinstance(m, sparse_cpu.WinogradConv2d) for m in converted.modules())
    assert table[0]["winograd_note"].startswith("Winograd differs by") and table[0]["winograd_note"].endswith(
        "not used")


class _TwoBranches(nn.Module):
    """A 1x1 conv whose residual a 3x3 conv made, and a 3x3 conv that takes a residual: the first may add into its
    residual in place (a Winograd output is a fresh tensor), the second always writes a new tensor."""

    def __init__(self):
        super().__init__()
        self.a, self.d = nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(4, 6, 3, padding=1)
        self.b, self.c = nn.Conv2d(6, 6, 1), nn.Conv2d(6, 6, 3, padding=1)

    def forward(self, x):
        y1 = self.a(x)
        t = self.b(y1)  # traced before d: the add goes into b (the first conv whose only use it is)
        z = torch.relu(t + self.d(x))
        return torch.relu(self.c(z) + y1)


def test_winograd_layers_make_fresh_residuals_and_are_not_marked_to_write_into_theirs(monkeypatch):
    _winograd_always_faster(monkeypatch)
    torch.manual_seed(0)
    model, x = _TwoBranches().eval(), torch.randn(2, 4, 9, 9)
    summary = {}
    converted, _ = sparse_cpu.convert_for_cpu(model, x, min_speedup=1e9, repeats=1, summary=summary)
    kinds = {name: type(module) for name, module in converted.named_modules()}
    assert kinds["a"] is kinds["c"] is kinds["d"] is sparse_cpu.WinogradConv2d and kinds["b"] is sparse_cpu.DenseConv2d
    marked = [node.target for node in converted.graph.nodes if "residual_reusable" in node.kwargs]
    assert marked == ["b"] and summary["residuals_reusable"] == 1
    # and the run-time check lets b write into d's output: a Winograd layer counts as one making fresh tensors
    assert fusion.residual_reuse_allowed(torch.zeros(3), converted.d, converted.b)
    with torch.no_grad():
        for _ in range(2):  # the in-place add must not change what a second call computes
            assert_close(converted(x), model(x), rtol=1e-4, relative_to_max=True)


@pytest.mark.parametrize("fastest, kept", [(0, ["0", "2"]), (1, ["0"]), (2, [])])
def test_the_whole_network_keeps_winograd_where_the_variants_measure_it_faster(monkeypatch, fastest, kept):
    """Layer by layer Winograd wins (the timings are faked); the whole network is then timed with the layers of the
    largest transformed weights by oneDNN again (layer "2": 8 -> 8 channels, then also "0": 3 -> 8), the variants
    together: the variant ``fastest`` (0: as chosen) is kept."""
    def layer_times(first, second, repeats, rounds=3):  # oneDNN 3 ms, Winograd 2 ms, sparse 1 ms
        return (3.0, 2.0) if isinstance(second.func, sparse_cpu.WinogradConv2d) else (2.0, 1.0)

    monkeypatch.setattr(sparse_cpu, "compare_layer_times", layer_times)
    seen = []

    def fake_times(runs, rounds):
        labels = list(runs)
        if labels[0] != "as chosen":
            return {label: 2.0 for label in runs}  # the variants of _prefer_faster_network tie: the mixed one stays
        seen.append((labels, rounds))
        return {label: 1.0 if index == fastest else 2.0 for index, label in enumerate(labels)}

    monkeypatch.setattr(sparse_cpu, "_median_times_ms", fake_times)
    model, x = _net(), torch.randn(1, 3, 10, 10)
    summary = {}
    converted, table = sparse_cpu.convert_for_cpu(model, x, min_speedup=1e9, repeats=1, summary=summary)
    winograd_layers = [name for name, m in converted.named_modules() if isinstance(m, sparse_cpu.WinogradConv2d)]
    assert winograd_layers == kept
    (labels, rounds), = seen
    assert labels == ["as chosen", "1 by oneDNN (transformed weights of 0.0088 MiB and more)",
                      "2 by oneDNN (transformed weights of 0.0033 MiB and more)"]
    assert 3 <= rounds <= 25  # a round of this tiny network is short: more of them, within the cap
    rows = {row["name"]: row for row in table}
    for name in ("0", "2"):
        assert (rows[name]["dense_algorithm"] == "Winograd") == (name in kept)
        # the row's dense time and speedup are the algorithm's that runs: oneDNN's where the network went back
        assert (rows[name]["dense_ms"], rows[name]["speedup"]) == ((2.0, 2.0) if name in kept else (3.0, 3.0))
        assert ("sparse measured faster than oneDNN alone" in rows[name]["reason"]) == (name not in kept)
        assert ("network ran faster without Winograd" in rows[name]["reason"]) == (name not in kept)
        assert isinstance(converted.get_submodule(name), sparse_cpu.DenseConv2d)  # oneDNN or Winograd, fused
        assert converted.get_submodule(name).relu
    assert summary["winograd"].startswith(f"{len(kept)} of 2 Winograd layers kept: 2 ms as chosen" if fastest
                                          else "2 of 2 Winograd layers kept: 1 ms as chosen")
    with torch.no_grad():
        assert_close(converted(x), model(x), rtol=1e-4, relative_to_max=True)

"""What a user's own model may do, and the CPU engine must honour (found by trying it as an outside user):
outputs in dataclasses, in-place writes into views and into the input, residuals that broadcast at another
batch size, infinite logits, gradients, unbatched inputs, torch.nn.utils.prune masks, and deploy() leaving
the caller's module as it was. Each converted model equals the model, or the conversion is refused."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from vpns_fast.deploy import runtime, sparse_cpu

pytestmark = pytest.mark.skipif(not sparse_cpu.available()[0], reason="the C++ extension is not built")


def pruned(model: nn.Module, density: float = 0.3, seed: int = 0) -> nn.Module:
    """``model`` in eval mode with each Conv2d / Linear weight kept at ``density`` by magnitude."""
    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            with torch.no_grad():
                module.weight.normal_()
                cut = module.weight.abs().flatten().kthvalue(int(module.weight.numel() * (1 - density))).values
                module.weight[module.weight.abs() <= cut] = 0
    return model.eval()


@dataclasses.dataclass
class Features:
    maps: torch.Tensor
    logits: torch.Tensor


class WritesIntoAView(nn.Module):
    """``head = y[:, :8]; head += conv(x)`` changes ``y``; torch.fx traces it as a new tensor and loses the write."""

    def __init__(self, wrap: bool):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
        self.wrap = wrap

    def forward(self, x):
        y = self.a(x)
        head = y[:, :8]
        head += self.b(x)
        return Features(y, y.mean((2, 3))) if self.wrap else y


@pytest.mark.parametrize("wrap", [False, True], ids=["tensor", "dataclass"])
def test_an_in_place_write_into_a_view_is_kept(wrap):
    model = pruned(WritesIntoAView(wrap))
    summary = {}
    converted, _ = sparse_cpu.convert_for_cpu(model, torch.randn(1, 3, 16, 16), policy="sparse", summary=summary)
    assert "dropped an in-place update" in summary["fusion"]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected, got = model(x), converted(x)
    if wrap:
        assert isinstance(got, Features)
        torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
        expected, got = expected.maps, got.maps
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


class Opaque:
    def __init__(self, value):
        self.value = value


class ReturnsAnObject(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return Opaque(self.conv(x))


def test_an_output_the_check_cannot_read_is_refused():
    with pytest.raises(RuntimeError, match="returns a Opaque, whose values the check cannot compare"):
        sparse_cpu.convert_for_cpu(pruned(ReturnsAnObject()), torch.randn(1, 3, 8, 8), policy="sparse")


class PositionalResidual(nn.Module):
    """``relu(conv(x) + pos)`` with a learned map of batch 1: fused on a batch-1 example, it broadcasts later."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pos = nn.Parameter(torch.randn(1, 8, 16, 16))

    def forward(self, x):
        return torch.relu(self.conv(x) + self.pos)


@pytest.mark.parametrize("policy", ["sparse", "dense-conv"])
def test_a_residual_fused_at_batch_one_broadcasts_at_other_batch_sizes(policy):
    model = pruned(PositionalResidual())
    summary = {}
    converted, table = sparse_cpu.convert_for_cpu(model, torch.randn(1, 3, 16, 16), policy="sparse",
                                                  summary=summary)
    if policy == "dense-conv":  # the same fused layer, run by oneDNN
        sparse = converted.conv
        converted.conv = sparse_cpu.DenseConv2d(sparse.to_dense_weight(), sparse.bias, 1, 1, relu=sparse.relu)
    assert summary["epilogues_fused"] == 1 and table[0]["fused"] == ["add", "relu"]
    for batch in (1, 3):
        x = torch.randn(batch, 3, 16, 16)
        with torch.no_grad():
            torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-5)


class MaskedClasses(nn.Module):
    """Logits of excluded classes set to -inf: infinities are part of the right answer."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 5)
        self.register_buffer("mask", torch.tensor([0.0, float("-inf"), 0.0, float("-inf"), 0.0]))

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3))) + self.mask


def test_infinite_outputs_in_the_same_places_are_no_error():
    model = pruned(MaskedClasses())
    converted, _ = sparse_cpu.convert_for_cpu(model, torch.randn(2, 3, 8, 8), policy="sparse")
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        got, expected = converted(x), model(x)
    assert torch.equal(got.isinf(), expected.isinf())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_the_output_check_compares_nan_and_infinities_by_place():
    b = torch.tensor([1.0, float("inf"), float("nan"), float("-inf")])
    assert sparse_cpu._tensor_difference(b.clone(), b) is None
    for wrong in ([1.0, float("-inf"), float("nan"), float("-inf")], [1.0, float("inf"), 0.0, float("-inf")],
                  [1.0, 3.0, float("nan"), float("-inf")]):
        assert "NaN or infinities" in sparse_cpu._tensor_difference(torch.tensor(wrong), b)
    assert "differs by" in sparse_cpu._tensor_difference(torch.tensor([2.0, float("inf"), float("nan"),
                                                                       float("-inf")]), b)


class NormalizesInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        x.sub_(0.5).div_(0.25)
        return self.conv(x)


def test_a_model_that_writes_into_its_input_converts_and_the_example_is_untouched():
    model = pruned(NormalizesInPlace())
    example = torch.rand(1, 3, 8, 8)
    kept = example.clone()
    converted, _ = sparse_cpu.convert_for_cpu(model, example, policy="measure", repeats=2)
    assert torch.equal(example, kept)
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(converted(x.clone()), model(x.clone()), rtol=1e-5, atol=1e-5)


class SkipAround(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(4, 4, 3, padding=1), nn.Linear(4, 3)

    def forward(self, x):
        y = torch.relu(self.conv(x) + x.mean(1, keepdim=True))
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize("dense_conv", [False, True])
def test_input_gradients_through_the_converted_model_are_the_models(dense_conv):
    """The kernels have no backward: an input that needs a gradient runs through torch's op of the same weight."""
    model = pruned(SkipAround())
    converted, _ = sparse_cpu.convert_for_cpu(model, torch.randn(1, 4, 8, 8), policy="sparse")
    if dense_conv:
        sparse = converted.conv
        converted.conv = sparse_cpu.DenseConv2d(sparse.to_dense_weight(), sparse.bias, 1, 1, relu=sparse.relu)
    kinds = {type(m).__name__ for m in converted.modules()}
    assert {"SparseLinear", "DenseConv2d" if dense_conv else "SparseConv2d"} <= kinds
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    expected_out = model(x)
    (expected,) = torch.autograd.grad(expected_out.square().sum(), x)
    got_out = converted(x)
    (got,) = torch.autograd.grad(got_out.square().sum(), x)
    torch.testing.assert_close(got_out, expected_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_unbatched_inputs_as_nn_conv2d_takes_them(kind):
    conv = pruned(nn.Conv2d(5, 6, 3, stride=2, padding=1))
    layer = (sparse_cpu.SparseConv2d if kind == "sparse" else sparse_cpu.DenseConv2d).from_dense(conv)
    layer.relu = True
    x, residual = torch.randn(5, 9, 9), torch.randn(6, 5, 5)
    with torch.no_grad():
        expected = torch.relu(conv(x) + residual)
        got = layer(x, residual)
    assert got.shape == (6, 5, 5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\] or unbatched \[C, H, W\]"):
        layer(torch.randn(9, 9))


def test_torch_prune_masks_are_refused_by_name():
    model = pruned(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)))
    prune.l1_unstructured(model[2], "weight", amount=0.5)
    with pytest.raises(ValueError, match=r"model: 2\.weight still carries a torch\.nn\.utils\.prune mask.*"
                                         r"prune\.remove"):
        sparse_cpu.convert_for_cpu(model, torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"model_or_path: 2\.weight still carries"):
        runtime.deploy(model, example_input_size=(1, 3, 8, 8))
    prune.remove(model[2], "weight")
    converted, _ = sparse_cpu.convert_for_cpu(model, torch.randn(1, 3, 8, 8), policy="sparse")
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy", ["dense", "sparse"])
def test_deploy_leaves_the_callers_module_as_it_was(policy):
    model = pruned(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))).train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    deployed = runtime.deploy(model, example_input_size=(1, 3, 8, 8), policy=policy)
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert deployed.network is not model and not any(m is model for m in deployed.modules())
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    images = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        expected = model.eval()(runtime.normalize(images, deployed.mean, deployed.std))
    torch.testing.assert_close(deployed(images), expected, rtol=1e-5, atol=1e-5)


def test_a_conversion_that_recovers_prints_no_traceback(capfd):
    """A model that views a conv output: the first check fails inside torch.fx's generated code (which prints
    the traceback) and the conversion recovers with NCHW outputs; nothing reaches stderr."""

    class ViewsItsFeatures(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8 * 6 * 6, 2)

        def forward(self, x):
            y = self.conv(x)
            return self.fc(y.view(y.shape[0], -1))

    model = pruned(ViewsItsFeatures(), density=0.9)
    converted, _ = sparse_cpu.convert_for_cpu(model, torch.randn(1, 3, 8, 8), policy="measure", repeats=2,
                                              min_speedup=1e9)
    assert any(isinstance(m, sparse_cpu.DenseConv2d) for m in converted.modules())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-5)
    assert "Traceback" not in capfd.readouterr().err


def test_the_dense_reference_path_matches_f_conv2d():
    """The gradient path's dense weight is the packed one (a sanity check of to_dense_weight with a residual)."""
    conv = pruned(nn.Conv2d(4, 6, 3, padding=2, dilation=2))
    layer = sparse_cpu.SparseConv2d.from_dense(conv)
    x = torch.randn(1, 4, 7, 7, requires_grad=True)
    residual = torch.randn(1, 6, 7, 7)
    torch.testing.assert_close(layer(x, residual), F.conv2d(x, conv.weight, conv.bias, 1, 2, 2) + residual,
                               rtol=1e-5, atol=1e-5)

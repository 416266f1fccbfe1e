"""Model-level mask batching (``MaskLaunchBatching``): on the triton backend, one
``ops.masked_weights`` call per forward computes every masked layer's effective weight, with the
same outputs and gradients as each layer masking its own weight.

The triton backend is forced on CPU tensors (interpreter without a GPU, tests/conftest.py).
"""
from __future__ import annotations

import copy

import pytest
import torch
from helpers import randomize_batchnorm
from tolerance import assert_close
from torch import nn

from vpns_fast import ops
from vpns_fast.kernels import masked as kernels_masked
from vpns_fast.kernels._triton import HAS_TRITON
from vpns_fast.models import build_model
from vpns_fast.nn.masked_layers import MASKED_TYPES, MaskedMixin
from vpns_fast.pruning.masking import fold, set_density, sparsify

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tiny_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 5, 3, stride=2, bias=False), nn.ReLU(), nn.Flatten(),
                         nn.Linear(5 * 3 * 3, 7))


class CallCounter:
    """Wraps ``module.name`` and counts its calls."""

    def __init__(self, monkeypatch, name, module=ops):
        self.calls = 0
        original = getattr(module, name)

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)


def run(model, x, backend):
    """Output and the gradients of every parameter after one forward + backward on ``backend``."""
    model.zero_grad(set_to_none=True)
    with ops.use_backend(backend):
        out = model(x)
    out.square().sum().backward()
    return out.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("granularity", ["unstructured", "kernel", "channel"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_batched_equals_per_layer(monkeypatch, granularity, scope):
    torch.manual_seed(0)
    model = sparsify(tiny_net(), granularity).to(DEVICE).train()
    randomize_batchnorm(model)
    set_density(model, 0.4, scope)
    per_layer = copy.deepcopy(model)
    x = torch.randn(4, 3, 8, 8, device=DEVICE)
    batched_calls = CallCounter(monkeypatch, "masked_weights")
    layer_mask_calls = CallCounter(monkeypatch, "masked_weight_triton", kernels_masked)

    out, grads = run(model, x, "triton")
    assert (batched_calls.calls, layer_mask_calls.calls) == (1, 0)  # one call for the three layers
    expected_out, expected_grads = run(per_layer, x, "torch")
    assert batched_calls.calls == 1  # the torch backend masks per layer

    assert_close(out, expected_out, rtol=0, atol=0)  # same effective weights
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        # Score gradients of grouped scores are sums, each backend in its own order.
        assert_close(grad, expected_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    assert all(m.batched_weight is None for m in model.modules() if isinstance(m, MASKED_TYPES))


def test_structured_resnet_batched_equals_per_layer(monkeypatch):
    torch.manual_seed(0)
    model = sparsify(build_model("small_resnet", num_classes=10), "channel", structured=True).to(DEVICE).eval()
    randomize_batchnorm(model)
    set_density(model, 0.5)
    x = torch.randn(2, 3, 16, 16, device=DEVICE)
    calls = CallCounter(monkeypatch, "masked_weights")
    with torch.no_grad(), ops.use_backend("triton"):
        out = model(x)
    with torch.no_grad(), ops.use_backend("torch"):
        expected = model(x)
    assert calls.calls == 1
    assert_close(out, expected, rtol=0, atol=0)


def test_structured_input_masked_weight_built_once_per_forward(monkeypatch):
    """Batching keeps each layer's input-masked weight for its forward, so structured mode builds
    the producer's channel mask once per layer and forward (twice before), with unchanged results."""
    torch.manual_seed(0)
    model = sparsify(build_model("small_resnet", num_classes=10), "channel", structured=True).to(DEVICE).train()
    set_density(model, 0.5)
    reference = copy.deepcopy(model)
    consumers = [m for m in model.modules() if getattr(m, "in_mask_source", None) is not None]
    assert consumers
    x = torch.randn(2, 3, 16, 16, device=DEVICE)
    input_masks = CallCounter(monkeypatch, "input_mask", MaskedMixin)
    out, grads = run(model, x, "triton")
    # once per masked layer in the batching hook (None where no producer), none in the layers' forwards
    assert input_masks.calls == sum(isinstance(m, MASKED_TYPES) for m in model.modules())
    expected_out, expected_grads = run(reference, x, "torch")
    assert_close(out, expected_out, rtol=0, atol=0)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert_close(grad, expected_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    assert all(m.batched_input_weight is None for m in model.modules() if isinstance(m, MASKED_TYPES))


def test_not_batched_on_the_torch_backend_or_mixed_dtypes(monkeypatch):
    model = sparsify(tiny_net()).to(DEVICE)
    set_density(model, 0.5)
    x = torch.randn(2, 3, 8, 8, device=DEVICE)
    calls = CallCounter(monkeypatch, "masked_weights")
    with ops.use_backend("torch"):
        model(x)
    assert calls.calls == 0
    model[0].scores.data = model[0].scores.data.double()  # layers no longer share a score dtype
    with ops.use_backend("triton"):
        expected = torch.cat([model[0](x).flatten()])  # the layer alone masks its own weight
        out = model(x)
    assert calls.calls == 0 and out.shape == (2, 7)
    assert_close(model[0](x).flatten(), expected, rtol=0, atol=0)


def test_weights_are_released_when_the_forward_raises():
    model = sparsify(tiny_net()).to(DEVICE)
    with ops.use_backend("triton"), pytest.raises(RuntimeError):
        model(torch.randn(2, 3, 9, 9, device=DEVICE))  # the Linear gets the wrong feature count
    assert all(m.batched_weight is None for m in model.modules() if isinstance(m, MASKED_TYPES))


def test_fold_drops_the_hooks():
    model = sparsify(tiny_net())
    assert len(model._forward_pre_hooks) == 1 and len(model._forward_hooks) == 1
    folded = fold(model)
    assert len(folded._forward_pre_hooks) == 0 and len(folded._forward_hooks) == 0
    assert len(model._forward_pre_hooks) == 1  # the original keeps its own


def test_masked_weights_op_checks_its_arguments():
    w, s = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match="one entry per layer"):
        ops.masked_weights([w, w], [s, s], torch.zeros(3))
    with pytest.raises(ValueError, match="one score tensor per weight"):
        ops.masked_weights([w, w], [s], torch.zeros(2))
    with pytest.raises(ValueError, match="do not broadcast"):
        ops.masked_weights([w], [torch.randn(3, 4)], torch.zeros(1))


def test_a_forward_interrupted_by_a_base_exception_leaves_nothing_stale():
    """Ctrl-C skips the clearing hook (it runs on Exception only): the stale weight must not be
    used once the layer changed, and copies must not carry it."""
    model = sparsify(tiny_net()).to(DEVICE)
    set_density(model, 0.5)
    x = torch.randn(2, 3, 8, 8, device=DEVICE)

    def interrupt(module, args):
        raise KeyboardInterrupt

    handle = model[6].register_forward_pre_hook(interrupt)
    with ops.use_backend("triton"), pytest.raises(KeyboardInterrupt):
        model(x)
    handle.remove()
    assert model[0].batched_weight is not None  # the hook that clears it did not run
    with torch.no_grad():
        model[0].dense_weight.mul_(2)
    with ops.use_backend("torch"):
        expected = ops.masked_conv2d(x, model[0].dense_weight, model[0].scores, model[0].threshold, model[0].bias,
                                     1, 1)
        assert_close(model[0](x), expected, rtol=0, atol=0)
    folded = fold(model)  # deepcopy: no non-leaf tensor carried along
    assert all(getattr(m, "batched_weight", None) is None for m in copy.deepcopy(model).modules())
    assert folded is not None


def test_not_batched_under_torch_distributed(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    model = sparsify(tiny_net()).to(DEVICE)
    calls = CallCounter(monkeypatch, "masked_weights")
    with ops.use_backend("triton"):
        model(torch.randn(2, 3, 8, 8, device=DEVICE))
    assert calls.calls == 0


def test_fold_drops_nested_hooks():
    outer = nn.Sequential(sparsify(tiny_net()))
    folded = fold(outer)
    assert all(len(m._forward_pre_hooks) == 0 and len(m._forward_hooks) == 0 for m in folded.modules())

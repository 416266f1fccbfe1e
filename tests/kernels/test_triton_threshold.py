"""Triton multi-tensor radix select (``kernels/threshold.py``) against kthvalue on the
concatenated magnitudes: exact equality (``torch.equal``), ties and signed zeros included.

On a machine without CUDA the kernels run under the Triton interpreter (tests/conftest.py), so
sizes stay small; the ResNet-18-sized check runs only on a GPU.
"""
from __future__ import annotations

import math

import pytest
import torch

from vpns_fast.kernels._triton import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

from vpns_fast.kernels.threshold import (  # noqa: E402
    topk_threshold_fwd,
    topk_threshold_triton,
    topk_thresholds_per_tensor,
)
from vpns_fast.ops import topk_threshold, use_backend  # noqa: E402
from vpns_fast.ops.warm_start import WarmStartThreshold  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Odd sizes: a single element, a prime, a size that is not a multiple of anything, a 2-D one.
ODD_SHAPES = [(1,), (7,), (1000,), (3, 37)]


def kth_magnitude(tensors, k):
    """Independent reference: the k-th smallest (1-based) of the concatenated magnitudes."""
    return torch.kthvalue(torch.cat([s.detach().abs().flatten().cpu() for s in tensors]), k).values


def assert_same(t, expected):
    assert t.dim() == 0 and t.dtype == expected.dtype
    assert torch.equal(t.cpu(), expected), f"{t.item()!r} != {expected.item()!r}"


def _ranks(n):
    return [1, n // 3, n // 2 + 1, n - 1, n]


@pytest.fixture(params=[False, True], ids=["bin0_histogram", "masked_histogram"])
def histogram_kind(request, monkeypatch):
    """Both ways the passes leave keys out of a histogram: tl.histogram's mask where Triton has it,
    else counting them into bin 0 and subtracting (the older Triton the GPU machine may have)."""
    import vpns_fast.kernels.threshold as threshold_module

    if request.param and not threshold_module._MASKED_HISTOGRAM:
        pytest.skip("this Triton's tl.histogram has no mask")
    monkeypatch.setattr(threshold_module, "_MASKED_HISTOGRAM", request.param)
    return request.param


# --------------------------------------------------------------------------- cold start

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_odd_sizes_exact(dtype, histogram_kind):
    tensors = [torch.randn(s, device=DEVICE).to(dtype) for s in ODD_SHAPES]
    n = sum(s.numel() for s in tensors)
    for k in ([1, n // 2, n] if dtype == torch.float64 else _ranks(n)):
        assert_same(topk_threshold_triton(tensors, k), kth_magnitude(tensors, k))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_integer_valued_ties(dtype):
    tensors = [torch.randint(-4, 5, s, device=DEVICE).to(dtype) for s in [(13,), (5, 7), (64,)]]
    n = sum(s.numel() for s in tensors)
    for k in _ranks(n):
        assert_same(topk_threshold_triton(tensors, k), kth_magnitude(tensors, k))


def test_signed_zeros_and_specials():
    a = torch.tensor([-0.0, 0.0, -0.0, 1.5, -1.5, 0.0], device=DEVICE)
    b = torch.tensor([-math.inf, 2.0, -0.0, 3.0e-45], device=DEVICE)  # -inf and a denormal
    for k in (1, 4, 6, 7, 8, 9, 10):
        t = topk_threshold_triton([a, b], k)
        expected = kth_magnitude([a, b], k)
        assert_same(t, expected)
    # Zeros come back as +0.0 (the magnitude), and |s| > t keeps every non-zero.
    t = topk_threshold_triton([a, b], 5)
    assert t.item() == 0.0 and math.copysign(1.0, t.item()) == 1.0


def test_single_tensor_and_non_contiguous():
    base = torch.randn(24, 17, device=DEVICE)
    views = [base.t(), base[:, ::3]]
    n = sum(v.numel() for v in views)
    assert_same(topk_threshold_triton(views, n // 2), kth_magnitude(views, n // 2))
    assert_same(topk_threshold_triton(base, 100), kth_magnitude([base], 100))


def test_rejects_bad_input():
    s = torch.randn(10, device=DEVICE)
    with pytest.raises(ValueError, match="k must be"):
        topk_threshold_fwd([s], 0)
    with pytest.raises(ValueError, match="k must be"):
        topk_threshold_fwd([s], 11)
    with pytest.raises(ValueError, match="dtype and device"):
        topk_threshold_fwd([s, s.half()], 3)
    with pytest.raises(TypeError, match="float32"):
        topk_threshold_fwd([s.long()], 3)
    with pytest.raises(ValueError, match="at least one"):
        topk_threshold_fwd([], 1)


# --------------------------------------------------------------------------- public API

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_public_api_global_and_layer(dtype):
    scores = [torch.randn(s, device=DEVICE).to(dtype) for s in [(8, 3, 3, 3), (10, 8), (5,)]]
    for density in (0.5, 0.1):
        with use_backend("triton"):
            t_global = topk_threshold(scores, density)
            t_layer = topk_threshold(scores, density, scope="layer")
        n = sum(s.numel() for s in scores)
        assert_same(t_global, kth_magnitude(scores, int((1 - density) * n)))
        for t_i, s in zip(t_layer, scores):
            k = int((1 - density) * s.numel())
            if k >= 1:
                assert_same(t_i, kth_magnitude([s], k))
            else:
                assert t_i.item() == -math.inf


# --------------------------------------------------------------------------- one select per tensor

@pytest.fixture
def hist_launches(monkeypatch):
    """The grids of the pass kernel's launches, recorded as they happen."""
    import vpns_fast.kernels.threshold as threshold_module

    hist_kernel = threshold_module._topk_threshold_hist_kernel
    launches = []

    class Counter:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(grid)
                return hist_kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(threshold_module, "_topk_threshold_hist_kernel", Counter())
    return launches


# Tensors of several 4096-score blocks first and in the middle: a segment indexed by block rather
# than by tensor gives wrong thresholds here (one-block tensors cannot tell the two apart).
SEGMENT_SHAPES = [(9000,), (7,), (5000,), (1,), (3, 37), (4097,)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_per_tensor_selects_equal_each_tensor_alone(dtype, histogram_kind):
    tensors = [torch.randn(s, device=DEVICE).to(dtype) for s in SEGMENT_SHAPES]
    tensors.append(torch.randint(-3, 4, (200,), device=DEVICE).to(dtype))  # runs of ties
    for pick in (lambda n: 1, lambda n: n // 2 + 1, lambda n: max(1, n - 1), lambda n: n):
        ks = [pick(s.numel()) for s in tensors]
        got = topk_thresholds_per_tensor(tensors, ks)
        assert got.shape == (len(tensors),) and got.dtype == dtype
        for t, s, k in zip(got, tensors, ks):
            assert_same(t, kth_magnitude([s], k))


def test_per_tensor_selects_with_specials():
    specials = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1e-42, -3.0, 2.0], device=DEVICE)
    tensors = [torch.randn(5000, device=DEVICE), specials, torch.zeros(9, device=DEVICE)]
    tensors[0][[0, 4500, 4999]] = torch.tensor([math.nan, -math.inf, -0.0], device=DEVICE)
    for ks in ([1, 1, 1], [2500, 4, 5], [5000, 8, 9], [4998, 6, 9]):
        for t, s, k in zip(topk_thresholds_per_tensor(tensors, ks), tensors, ks):
            expected = kth_magnitude([s], k)
            assert torch.equal(t.cpu(), expected) or (t.isnan().item() and expected.isnan().item())


def test_per_tensor_select_is_one_launch_per_pass(hist_launches):
    """The point of the segmented select: one histogram launch per pass for all tensors, where a
    select per tensor launches a pass per tensor (launch-bound on a GPU)."""
    import vpns_fast.kernels.threshold as threshold_module

    tensors = [torch.randn(s, device=DEVICE) for s in SEGMENT_SHAPES if math.prod(s) > 1]
    with use_backend("triton"):
        thresholds = topk_threshold(tensors, 0.3, scope="layer")
    assert len(hist_launches) == len(threshold_module._RADIX_PASSES[torch.float32])
    for t, s in zip(thresholds, tensors):
        assert_same(t, kth_magnitude([s], int(0.7 * s.numel())))


def test_per_tensor_select_rejects_bad_ks():
    s = torch.randn(10, device=DEVICE)
    with pytest.raises(ValueError, match="one k per tensor"):
        topk_thresholds_per_tensor([s, s], [3])
    with pytest.raises(ValueError, match=r"ks\[1\] must be an integer in \[1, 4\]"):
        topk_thresholds_per_tensor([s, s[:4]], [3, 5])
    with pytest.raises(ValueError, match="dtype and device"):
        topk_thresholds_per_tensor([s, s.half()], [3, 3])


def test_layer_scope_with_a_layer_that_keeps_everything(hist_launches):
    """k < 1 for a one-element layer at density 0.5: that layer keeps all (-inf), the others are
    selected exactly, still in one segmented select."""
    tensors = [torch.randn(31, device=DEVICE), torch.randn(1, device=DEVICE), torch.randn(6000, device=DEVICE)]
    with use_backend("triton"):
        thresholds = topk_threshold(tensors, 0.5, scope="layer")
    assert thresholds[1].item() == -math.inf
    for t, s in zip(thresholds[::2], tensors[::2]):
        assert_same(t, kth_magnitude([s], int(0.5 * s.numel())))
    assert len(hist_launches) == 4  # float32: 4 passes for both selected layers together


def test_custom_op_and_fake():
    scores = [torch.randn(40, device=DEVICE), torch.randn(3, 5, device=DEVICE)]
    t = torch.ops.vpns_fast.topk_threshold(scores, 20, None)
    assert_same(t, kth_magnitude(scores, 20))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = torch.ops.vpns_fast.topk_threshold([mode.from_tensor(s) for s in scores], 20, None)
    assert fake.shape == () and fake.dtype == torch.float32


# --------------------------------------------------------------------------- warm start

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_warm_start_exact_for_any_hint(dtype, histogram_kind):
    tensors = [torch.randn(s, device=DEVICE).to(dtype) for s in [(300,), (7, 11)]]
    n = sum(s.numel() for s in tensors)
    for k in (1, n // 2, n):
        expected = kth_magnitude(tensors, k)
        hints = [
            expected,                        # exact
            expected.double() * 1.001,       # close: band hit
            expected.double() * 0.5,         # off: the band misses, the cold passes run
            1e30, math.inf, -math.inf, -0.7, 0.0, -0.0, math.nan, 1e-40,
        ]
        for hint in hints:
            t = topk_threshold_triton(tensors, k, hint=hint)
            assert_same(t, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_close_hint_takes_the_band_path(dtype, monkeypatch):
    """A close hint must resolve the high bits in the band pass (skip flag set), a far one must
    not; both stay exact. Catches a warm start that silently always falls back."""
    import vpns_fast.kernels.threshold as threshold_module

    select_kernel = threshold_module._topk_threshold_select_kernel
    band_flags = []

    class Recorder:
        def __getitem__(self, grid):
            def launch(hist, state, *args, **kwargs):
                select_kernel[grid](hist, state, *args, **kwargs)
                if kwargs["BAND"]:
                    band_flags.append(int(state[3]))
            return launch

    monkeypatch.setattr(threshold_module, "_topk_threshold_select_kernel", Recorder())
    tensors = [torch.randn(500, device=DEVICE).to(dtype)]
    expected = kth_magnitude(tensors, 250)
    assert_same(topk_threshold_triton(tensors, 250, hint=expected.double() * 1.001), expected)
    assert_same(topk_threshold_triton(tensors, 250, hint=expected.double() * 0.1), expected)
    assert band_flags == [1, 0]


def test_warm_start_with_ties_at_band_edges():
    # Integer-valued scores put whole runs of ties on one key; hints on, just below and just
    # above the k-th value move the band edges across the tie run.
    tensors = [torch.randint(-3, 4, (200,), device=DEVICE).float() * 0.25]
    for k in (1, 57, 100, 143, 200):
        expected = kth_magnitude(tensors, k)
        for hint in (expected, torch.nextafter(expected, torch.tensor(0.0)),
                     torch.nextafter(expected, torch.tensor(1.0)), expected + 0.25):
            assert_same(topk_threshold_triton(tensors, k, hint=hint.to(DEVICE)), expected)


def test_warm_start_tracks_slowly_changing_scores():
    scores = [torch.randn(s, device=DEVICE) for s in [(16, 3, 3, 3), (257,)]]
    n = sum(s.numel() for s in scores)
    selector = WarmStartThreshold(topk_threshold_triton)
    k = int(0.8 * n)
    for step in range(6):
        t = selector(scores, k)
        assert_same(t, kth_magnitude(scores, k))
        with torch.no_grad():  # an optimizer step: every score moves a little, in place
            for s in scores:
                s.add_(1e-3 * torch.randn_like(s))
        if step == 3:  # a big jump: the remembered hint is now far off, still exact
            with torch.no_grad():
                scores[0].mul_(10.0)
    selector.reset()
    assert_same(selector(scores, 1), kth_magnitude(scores, 1))


# --------------------------------------------------------------------------- GPU scale

def test_resnet18_sized_scores_on_gpu(cuda_or_skip):
    # The 21 conv/linear weight shapes of torchvision's ResNet-18: 11.68M scores.
    shapes = [(64, 3, 7, 7)] + [(64, 64, 3, 3)] * 4 + [(128, 64, 3, 3), (128, 128, 3, 3), (128, 64, 1, 1)] + \
        [(128, 128, 3, 3)] * 2 + [(256, 128, 3, 3), (256, 256, 3, 3), (256, 128, 1, 1)] + \
        [(256, 256, 3, 3)] * 2 + [(512, 256, 3, 3), (512, 512, 3, 3), (512, 256, 1, 1)] + \
        [(512, 512, 3, 3)] * 2 + [(1000, 512)]
    for dtype in (torch.float32, torch.bfloat16):
        scores = [torch.randn(s, device="cuda").to(dtype) for s in shapes]
        n = sum(s.numel() for s in scores)
        assert 11_000_000 < n < 12_000_000
        selector = WarmStartThreshold(topk_threshold_triton)
        for density in (0.5, 0.1, 0.01):
            k = int((1 - density) * n)
            expected = kth_magnitude(scores, k)
            assert_same(topk_threshold_triton(scores, k), expected)
            assert_same(selector(scores, k), expected)
            assert_same(selector(scores, k), expected)  # warm: hint is the exact answer
            ks = [int((1 - density) * s.numel()) for s in scores]
            per_layer = topk_thresholds_per_tensor(scores, ks)
            for t, s, layer_k in zip(per_layer, scores, ks):
                assert_same(t, kth_magnitude([s], layer_k))


def test_custom_op_is_defined_once():
    """A kernel file imported a second time (another module name) leaves its op as it is."""
    from vpns_fast.kernels._library import custom_op, is_defined

    assert is_defined("vpns_fast::topk_threshold")
    op_before = torch.ops.vpns_fast.topk_threshold.default

    def impl(scores, k, hint=None):
        raise AssertionError("must not replace the registered implementation")

    assert custom_op("vpns_fast::topk_threshold", schema="(Tensor[] scores, SymInt k, Tensor? hint=None) -> Tensor",
                     fake=impl)(impl) is impl
    s = torch.randn(10, device=DEVICE)
    assert_same(torch.ops.vpns_fast.topk_threshold([s], 3), kth_magnitude([s], 3))
    assert torch.ops.vpns_fast.topk_threshold.default is op_before

"""The ``cpp`` backend's top-k threshold (``csrc/threshold.cpp``) against torch.kthvalue.

Every value is compared exactly (``torch.equal``: same dtype, same value, rtol = atol = 0).
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vpns_fast import _extension

_C = _extension.load()
pytestmark = pytest.mark.skipif(
    _C is None, reason=f"the C++ extension vpns_fast._C is not built: {_extension.status()[1]}")

from vpns_fast.ops import cpp_backend, topk_threshold, use_backend  # noqa: E402

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Small ResNet-like layer shapes: stem conv, 3x3 convs, 1x1 downsample, classifier.
RESNET_LIKE = [(16, 3, 7, 7), (16, 16, 3, 3), (32, 16, 3, 3), (32, 16, 1, 1), (64, 32, 3, 3), (10, 64)]


def reference(tensors, k):
    """Independent of the library: kthvalue on the concatenated magnitudes."""
    return torch.kthvalue(torch.cat([t.detach().abs().reshape(-1) for t in tensors]), k).values


def numel(tensors):
    return sum(t.numel() for t in tensors)


def assert_same(got, expected):
    assert got.dim() == 0 and got.dtype == expected.dtype and got.device.type == "cpu"
    if torch.isnan(expected):
        assert torch.isnan(got)
    else:
        assert torch.equal(got, expected), f"got {got.item()!r}, expected {expected.item()!r}"


def check_all_k(tensors, ks=None, hints=(None,)):
    n = numel(tensors)
    ks = ks if ks is not None else sorted({1, 2, n // 3, n // 2 + 1, n - 1, n} - {0})
    for k in ks:
        expected = reference(tensors, k)
        for hint in hints:
            assert_same(_C.topk_threshold(tensors, k, hint), expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_resnet_like_normal_scores(dtype):
    tensors = [torch.randn(s).to(dtype) for s in RESNET_LIKE]
    n = numel(tensors)
    check_all_k(tensors, ks=[1, int(0.1 * n), int(0.5 * n), int(0.9 * n), int(0.99 * n), n])


@pytest.mark.parametrize("dtype", DTYPES)
def test_many_ties_at_the_threshold(dtype):
    tensors = [torch.randint(-5, 6, s).to(dtype) for s in RESNET_LIKE]  # integers 0..5 in magnitude
    n = numel(tensors)
    flat = torch.cat([t.abs().flatten() for t in tensors])
    boundaries = torch.cumsum(torch.bincount(flat.long()), 0).tolist()  # last k of each tie group
    ks = sorted({1, n} | set(boundaries) | {b + 1 for b in boundaries if b < n} | {b - 1 for b in boundaries if b > 1})
    check_all_k(tensors, ks)


@pytest.mark.parametrize("dtype", DTYPES)
def test_signed_zeros_are_one_value(dtype):
    t = torch.tensor([-0.0, 0.0, -0.0, 1.0, -2.0, 0.0, -1.0], dtype=dtype)
    for k in range(1, 8):
        got = _C.topk_threshold([t], k)
        assert_same(got, reference([t], k))
        if k <= 4:  # four zeros: the result is +0.0, never -0.0
            assert math.copysign(1.0, got.item()) == 1.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_single_element(dtype):
    for value in (-3.5, 0.0, -0.0, 2.25):
        t = torch.tensor([value], dtype=dtype)
        assert_same(_C.topk_threshold([t], 1), reference([t], 1))
        assert_same(_C.topk_threshold([t.reshape(())], 1), reference([t], 1))  # 0-dim input


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_big_tensor_and_many_tiny_ones(dtype):
    # More than one 65536-element grain, so the work is split over threads across tensors.
    tensors = [torch.randn(1)] * 3 + [torch.randn(300, 500)] + [torch.randn(s) for s in ((1,), (2, 3), (5,))]
    tensors = [t.to(dtype) for t in tensors] + [torch.randn(7, dtype=torch.float64).to(dtype) for _ in range(40)]
    check_all_k(tensors)


@pytest.mark.parametrize("dtype", DTYPES)
def test_list_of_one(dtype):
    check_all_k([torch.randn(1000).to(dtype)])


def test_empty_tensors_in_the_list_are_skipped():
    tensors = [torch.empty(0), torch.randn(50), torch.empty(3, 0)]
    check_all_k(tensors)


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_views(dtype):
    base = torch.randn(64, 32, 3, 3).to(dtype)
    views = [base.transpose(0, 1), base[:, ::2], base[..., 1], torch.randn(40, 30).to(dtype).t(),
             torch.randn(10).to(dtype).expand(4, 10)]  # expand: repeated elements via stride 0
    assert not any(v.is_contiguous() for v in views)
    check_all_k(views)


def test_requires_grad_inputs_are_read_without_a_graph():
    s = torch.randn(8, 9).t().requires_grad_()  # non-contiguous leaf: the copy must not track grad
    got = _C.topk_threshold([s], 20)
    assert not got.requires_grad
    assert_same(got, reference([s], 20))


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_orders_above_inf_like_kthvalue(dtype):
    t = torch.tensor([1.0, math.nan, -math.inf, 0.5, -math.nan, 2.0], dtype=dtype)
    check_all_k([t], ks=range(1, 7))


def test_subnormals_and_extremes():
    t = torch.tensor([1e-45, -1e-45, 1e-40, 3e38, -3.4e38, 1e-38, -0.0, math.inf], dtype=torch.float32)
    check_all_k([t], ks=range(1, 9))
    d = torch.tensor([5e-324, -1e-310, 1e308, -1.7e308, 0.0, 1.0], dtype=torch.float64)
    check_all_k([d], ks=range(1, 7))


# --------------------------------------------------------------------------- warm start

def _hints_around(value: float):
    return [value, value * (1 + 1e-3), value * (1 - 1e-3), math.nextafter(value, math.inf),  # good
            value * 2 + 1, 1e30, value / 8, 1e-30, 0.0,  # too high / too low
            -value, -1.0, math.inf, -math.inf, math.nan]  # negative, inf, nan


@pytest.mark.parametrize("dtype", DTYPES)
def test_warm_start_is_exact_for_any_hint(dtype):
    tensors = [torch.randn(s).to(dtype) for s in RESNET_LIKE]
    n = numel(tensors)
    for k in (1, int(0.3 * n), int(0.9 * n), n):
        expected = reference(tensors, k)
        for hint in _hints_around(expected.item()):
            assert_same(_C.topk_threshold(tensors, k, hint), expected)


def test_warm_start_after_a_small_step_with_ties_in_the_band():
    tensors = [torch.randn(s) for s in RESNET_LIKE]
    k = int(0.8 * numel(tensors))
    previous = reference(tensors, k).item()
    stepped = [t + 1e-4 * torch.randn_like(t) for t in tensors]
    stepped[0].view(-1)[:100] = previous  # a block of ties exactly at the old threshold
    check_all_k(stepped, ks=[k, k - 50, k + 50], hints=(previous, None))


def test_warm_start_large_enough_for_threads():
    tensors = [torch.randn(400, 400), torch.randn(3, 3)]  # > 65536 elements: a parallel pass
    check_all_k(tensors, hints=(None, 0.5, 0.67, 10.0))


def test_hint_accepts_a_zero_dim_tensor_through_the_backend_function():
    tensors = [torch.randn(100)]
    expected = reference(tensors, 40)
    assert_same(cpp_backend.topk_threshold(tensors, 40, hint=expected), expected)
    assert_same(cpp_backend.topk_threshold(tensors, 40), expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_registered_op_remembers_the_last_threshold_and_stays_exact(dtype, monkeypatch):
    cpp_backend.warm_start.reset()
    scores = [torch.randn(s).to(dtype) for s in RESNET_LIKE]
    k = int(0.7 * numel(scores))
    steps = [1e-4] * 4 + [3.0, 1e-4, 1e-4, -1.0, 0.0]  # small steps, a jump, steps, a sign flip
    for step in steps:
        with torch.no_grad():
            for s in scores:  # in place, like an optimizer step: same storage, same cache entry
                s.add_(step * torch.randn_like(s)) if step > 0 else s.mul_(-1)
        assert_same(cpp_backend.topk_threshold(scores, k), reference(scores, k))
    if dtype in (torch.float32, torch.float64):
        assert len(cpp_backend.warm_start) == 1
    monkeypatch.setattr(cpp_backend.warm_start, "enabled", False)
    assert_same(cpp_backend.topk_threshold(scores, k), reference(scores, k))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dtype=st.sampled_from(DTYPES),
       sizes=st.lists(st.integers(1, 300), min_size=1, max_size=6),
       levels=st.sampled_from([3, 50, 0]),  # 0: continuous values, else integer ties
       k_frac=st.floats(0.0, 1.0),
       hint=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
       seed=st.integers(0, 2**31 - 1))
def test_property_matches_kthvalue(dtype, sizes, levels, k_frac, hint, seed):
    gen = torch.Generator().manual_seed(seed)
    tensors = []
    for size in sizes:
        t = torch.randn(size, generator=gen, dtype=torch.float64)
        if levels:
            t = torch.randint(-levels, levels + 1, (size,), generator=gen).double()
        tensors.append(t.to(dtype))
    n = numel(tensors)
    k = min(n, max(1, round(k_frac * n)))
    assert_same(_C.topk_threshold(tensors, k, hint), reference(tensors, k))


# --------------------------------------------------------------------------- public API

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("density", [0.05, 0.3, 0.5, 0.9, 0.999])
def test_public_api_global_scope(dtype, density):
    tensors = [torch.randn(s).to(dtype) for s in RESNET_LIKE]
    with use_backend("cpp"):
        got = topk_threshold(tensors, density, scope="global")
    assert_same(got, reference(tensors, int((1 - density) * numel(tensors))))


@pytest.mark.parametrize("dtype", DTYPES)
def test_public_api_layer_scope(dtype):
    tensors = [torch.randn(s).to(dtype) for s in RESNET_LIKE] + [torch.randn(1).to(dtype)]
    with use_backend("cpp"):
        got = topk_threshold(tensors, 0.4, scope="layer")
    assert got.shape == (len(tensors),) and got.dtype == dtype
    for t, g in zip(tensors, got):
        k = int(0.6 * t.numel())
        if k < 1:
            assert g.item() == -math.inf
        else:
            assert_same(g, reference([t], k))


def test_public_api_keep_all_does_not_call_the_kernel():
    with use_backend("cpp"):
        assert topk_threshold([torch.randn(10)], 1.0).item() == -math.inf


# --------------------------------------------------------------------------- errors

@pytest.mark.parametrize("tensors,k,match", [
    ([], 1, "at least one tensor"),
    ([torch.randn(4), torch.randn(3).to(torch.float64)], 1, r"share one dtype.*tensors\[1\]"),
    ([torch.arange(5)], 1, r"tensors\[0\] must be float32, float64, float16 or bfloat16"),
    ([torch.randn(3), torch.ones(3, dtype=torch.bool)], 1, r"tensors\[1\] must be float32"),
    ([torch.randn(3, dtype=torch.complex64)], 1, r"tensors\[0\] must be float32"),
    ([torch.randn(4)], 0, r"k must be in \[1, N\] = \[1, 4\]"),
    ([torch.randn(4), torch.randn(2)], 7, r"k must be in \[1, N\] = \[1, 6\]"),
    ([torch.randn(4)], -1, r"k must be in \[1, N\]"),
    ([torch.empty(0)], 1, r"k must be in \[1, N\] = \[1, 0\]"),
])
def test_errors_name_the_argument(tensors, k, match):
    with pytest.raises(RuntimeError, match=match):
        _C.topk_threshold(tensors, k)


def test_error_for_a_non_cpu_tensor():
    meta = torch.empty(4, device="meta")
    with pytest.raises(RuntimeError, match=r"tensors\[1\] must be a CPU tensor.*meta"):
        _C.topk_threshold([torch.randn(4), meta], 1)


def test_error_for_a_bad_hint_type():
    with pytest.raises(TypeError):
        _C.topk_threshold([torch.randn(4)], 1, "0.5")

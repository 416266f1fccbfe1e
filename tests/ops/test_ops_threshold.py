"""topk_threshold / kth_index / score_mask against ``torch.kthvalue(torch.cat(|s|), k)`` and
an independent sort-based construction. Thresholds and masks are compared exactly
(rtol = atol = 0), ties included."""
from __future__ import annotations

import math

import pytest
import torch
from helpers import INTERPRETED, backends_for, cases_on_backends
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tolerance import assert_close

from vpns_fast.ops import kth_index, score_mask, topk_threshold, use_backend

BACKENDS = backends_for("topk_threshold")


def with_backends(full, reduced=None):
    return cases_on_backends(BACKENDS, full, reduced)
FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


# --------------------------------------------------------------------------- references

def release_k(density: float, n: int) -> int:
    return int((1 - density) * n)


def release_threshold(tensors, density):
    """The release code: clone, abs, cat, kthvalue; k < 1 keeps everything (t = -inf)."""
    flat = torch.cat([t.detach().clone().abs().flatten() for t in tensors])
    k = release_k(density, flat.numel())
    if k < 1:
        return None
    return torch.kthvalue(flat, k).values


def sort_threshold(tensors, density):
    """Independent of kthvalue: the k-th smallest magnitude by a full sort."""
    flat = torch.cat([t.detach().abs().flatten() for t in tensors])
    k = release_k(density, flat.numel())
    return None if k < 1 else torch.sort(flat).values[k - 1]


def assert_exact(t, expected):
    if expected is None:  # keep all
        assert t.item() == -math.inf
    else:
        assert t.dtype == expected.dtype
        assert_close(t, expected, rtol=0, atol=0)


def integer_scores(*shapes, high=5, dtype=torch.float32):
    """Integer-valued floats of both signs: many ties, and exact zeros."""
    return [torch.randint(-high, high + 1, s).to(dtype) for s in shapes]


# --------------------------------------------------------------------------- kth_index

@pytest.mark.parametrize("density,n,k", [
    (0.7, 10, 3),     # (1 - 0.7) * 10 = 3.0000000000000004 -> 3
    (0.9, 10, 0),     # (1 - 0.9) * 10 = 0.9999999999999998 -> 0: keep all
    (0.3, 10, 7),
    (0.1, 10, 9),     # 9.000000000000002 -> 9
    (0.2, 10, 8),
    (0.4, 100, 60),
    (1.0, 1000, 0),
    (1, 7, 0),
    (1e-9, 100, 99),
    (1e-20, 100, 100),  # 1 - 1e-20 == 1.0: k = N, prunes everything
    (0.5, 1, 0),
    (0.5, 0, 0),
])
def test_kth_index_is_release_formula(density, n, k):
    assert kth_index(density, n) == k == int((1 - density) * n)


@pytest.mark.parametrize("density", [0.0, -0.1, 1.0000001, 2, math.nan, math.inf, -math.inf, True, False, "0.5", None])
def test_kth_index_rejects_bad_density(density):
    with pytest.raises(ValueError, match="density"):
        kth_index(density, 10)


# --------------------------------------------------------------------------- topk_threshold

SHAPE_SETS = [
    [(97,)],
    [(16, 3, 3, 3)],
    [(4, 3, 3, 3), (8, 4, 1, 1), (10, 8), (5, 1, 1, 1)],
    [(1,)],
    [(1,), (2, 1)],
]
DENSITIES = [1.0, 0.9, 0.7, 0.5, 0.3, 0.1, 0.01, 1e-6, 1e-20]


@pytest.mark.parametrize("density,shapes,dtype,backend", with_backends(
    [(d, sh, torch.float32) for d in DENSITIES for sh in SHAPE_SETS]
    + [(d, sh, dt) for d in (1.0, 0.7, 0.3, 1e-6) for sh in SHAPE_SETS for dt in FLOAT_DTYPES[1:]],
    [(d, sh, dt) for d, sh in [(0.7, SHAPE_SETS[2]), (0.1, SHAPE_SETS[0]), (1e-20, SHAPE_SETS[1]),
                               (0.5, SHAPE_SETS[4]), (1.0, SHAPE_SETS[3])] for dt in FLOAT_DTYPES]))
def test_global_threshold_exact(density, shapes, dtype, backend):
    tensors = [torch.randn(s).to(dtype) for s in shapes]
    with use_backend(backend):
        t = topk_threshold(tensors, density)
        t_single = topk_threshold(tensors[0], density) if len(tensors) == 1 else None
    assert t.dim() == 0 and t.dtype == dtype
    assert_exact(t, release_threshold(tensors, density))
    assert_exact(t, sort_threshold(tensors, density))
    if t_single is not None:  # a bare tensor is the same as a one-element list
        assert torch.equal(t_single, t)


@pytest.mark.parametrize("density,dtype,backend", with_backends(
    [(d, dt) for d in (1.0, 0.9, 0.7, 0.5, 0.25, 0.05) for dt in FLOAT_DTYPES],
    [(0.7, dt) for dt in FLOAT_DTYPES]))
def test_layer_threshold_exact(density, dtype, backend):
    # (3,): k = int((1 - 0.7) * 3) = 0 -> keep all, while bigger tensors get a finite threshold.
    tensors = [torch.randn(s).to(dtype) for s in [(6, 3, 3, 3), (3,), (10, 7), (4, 1, 1, 1)]]
    with use_backend(backend):
        t = topk_threshold(tensors, density, scope="layer")
    assert t.shape == (len(tensors),) and t.dtype == dtype
    for t_i, s in zip(t, tensors):
        assert_exact(t_i, release_threshold([s], density))


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_scope_single_tensor(backend):
    s = torch.randn(5, 4)
    with use_backend(backend):
        t = topk_threshold(s, 0.5, scope="layer")
    assert t.shape == (1,)
    assert_exact(t[0], release_threshold([s], 0.5))


@pytest.mark.parametrize("density,scope,dtype,backend", with_backends(
    [(d, sc, dt) for d in (0.9, 0.7, 0.5, 0.3, 0.11) for sc in ("global", "layer") for dt in FLOAT_DTYPES],
    [(d, sc, dt) for d, sc in [(0.5, "global"), (0.3, "layer")] for dt in FLOAT_DTYPES]))
def test_ties_and_kept_count(density, scope, dtype, backend):
    tensors = integer_scores((7, 5), (3, 2, 2, 2), (13,), dtype=dtype)
    with use_backend(backend):
        t = topk_threshold(tensors, density, scope=scope)
    groups = [tensors] if scope == "global" else [[s] for s in tensors]
    ts = [t] if scope == "global" else list(t)
    for t_g, group in zip(ts, groups):
        assert_exact(t_g, release_threshold(group, density))
        assert_exact(t_g, sort_threshold(group, density))
        flat = torch.cat([s.abs().flatten() for s in group])
        n, k = flat.numel(), release_k(density, flat.numel())
        masks = [score_mask(s, t_g) for s in group]
        kept = sum(int(m.sum()) for m in masks)
        assert kept == n - int((flat <= t_g).sum())
        assert kept <= n - k  # ties at t are pruned, so never more than N - k survive
        # Masks from an independent construction: rank by sort, keep what is strictly above
        # the k-th smallest value.
        if k >= 1:
            kth = torch.sort(flat).values[k - 1]
            for s, m in zip(group, masks):
                assert torch.equal(m, s.abs() > kth)
        else:
            assert all(m.all() for m in masks)


@pytest.mark.parametrize("dtype,backend", with_backends([(dt,) for dt in FLOAT_DTYPES]))
def test_density_one_keeps_everything_including_zeros(dtype, backend):
    tensors = integer_scores((6, 6), (5,), dtype=dtype)
    tensors[0][0, 0] = 0
    tensors[1].zero_()
    with use_backend(backend):
        t = topk_threshold(tensors, 1.0)
        t_layer = topk_threshold(tensors, 1.0, scope="layer")
    assert t.item() == -math.inf and (t_layer == -math.inf).all()
    for s in tensors:
        assert score_mask(s, t).all()
        assert (s.abs() > t).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_equal_scores_prune_everything_below_density_one(backend):
    s = torch.full((10, 10), 0.5)
    with use_backend(backend):
        t = topk_threshold(s, 0.5)
    assert t.item() == 0.5
    assert not score_mask(s, t).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_density(backend):
    s = torch.randn(1000)
    with use_backend(backend):
        t = topk_threshold(s, 1e-3)   # k = int(0.999 * 1000) = 999: exactly the largest survives
        t_none = topk_threshold(s, 1e-20)  # k = N: nothing survives
    assert int(score_mask(s, t).sum()) == 1 and score_mask(s, t)[s.abs().argmax()]
    assert_exact(t_none, s.abs().max())
    assert not score_mask(s, t_none).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_density_float_edge_uses_release_k(backend):
    s = torch.arange(1, 11, dtype=torch.float32) * torch.tensor([1, -1] * 5)  # |s| = 1..10
    with use_backend(backend):
        assert topk_threshold(s, 0.7).item() == 3.0   # k = 3: keeps 4..10, 7 elements
        assert topk_threshold(s, 0.9).item() == -math.inf  # k = 0: keeps all 10, not 9
        assert topk_threshold(s, 0.1).item() == 9.0   # k = 9: keeps only 10


@pytest.mark.parametrize("backend", BACKENDS)
def test_threshold_ignores_autograd_and_layout(backend):
    base = torch.randn(6, 8, requires_grad=True)
    transposed = base.t()  # non-contiguous
    with use_backend(backend):
        t = topk_threshold([transposed, base[:, ::2]], 0.4)
    assert not t.requires_grad
    assert_exact(t, release_threshold([transposed, base[:, ::2]], 0.4))


@settings(max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=4),
    density=st.floats(min_value=1e-6, max_value=1.0, allow_nan=False, exclude_min=False),
    high=st.integers(0, 6),
    seed=st.integers(0, 2**16),
    scope=st.sampled_from(["global", "layer"]),
    backend=st.sampled_from([b for b in BACKENDS if b not in INTERPRETED] or ["torch"]),
)
def test_property_matches_kthvalue(sizes, density, high, seed, scope, backend):
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randint(-high, high + 1, (n,), generator=g).float() * 0.5 for n in sizes]
    with use_backend(backend):
        t = topk_threshold(tensors, density, scope=scope)
    groups = [tensors] if scope == "global" else [[s] for s in tensors]
    ts = [t] if scope == "global" else list(t)
    for t_g, group in zip(ts, groups):
        assert_exact(t_g, release_threshold(group, density))
        flat = torch.cat([s.abs() for s in group])
        kept = int((flat > t_g).sum())
        assert kept == flat.numel() - int((flat <= t_g).sum())
        assert kept <= flat.numel() - release_k(density, flat.numel())


# --------------------------------------------------------------------------- score_mask

@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_score_mask_is_strict(dtype):
    s = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0], dtype=dtype)
    expected = torch.tensor([True, False, False, False, False, False, True])
    assert torch.equal(score_mask(s, 1.0), expected)
    assert torch.equal(score_mask(s, torch.tensor(1.0, dtype=dtype)), expected)
    assert score_mask(s, torch.tensor(-math.inf)).all()
    assert score_mask(s, 1.0).dtype == torch.bool and score_mask(s, 1.0).shape == s.shape


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_score_mask_python_threshold_matches_torch_comparison(dtype):
    # Values straddling 0.1 at the resolution of each dtype (float64 exposes float32 rounding).
    base = torch.tensor(0.1, dtype=dtype)
    s = torch.stack([torch.nextafter(base, torch.tensor(1.0, dtype=dtype)), base,
                     torch.nextafter(base, torch.tensor(0.0, dtype=dtype))])
    s = torch.cat([s, -s])
    assert torch.equal(score_mask(s, 0.1), s.abs() > 0.1)


# --------------------------------------------------------------------------- bad input

BAD_CALLS = [
    ("density 0", lambda s: topk_threshold(s, 0.0), ValueError, "density"),
    ("density negative", lambda s: topk_threshold(s, -0.5), ValueError, "density"),
    ("density > 1", lambda s: topk_threshold(s, 1.5), ValueError, "density"),
    ("density NaN", lambda s: topk_threshold(s, math.nan), ValueError, "density"),
    ("density bool", lambda s: topk_threshold(s, True), ValueError, "density"),
    ("density string", lambda s: topk_threshold(s, "0.5"), ValueError, "density"),
    ("density None", lambda s: topk_threshold(s, None), ValueError, "density"),
    ("layer scope, bad density", lambda s: topk_threshold(s, 0.0, scope="layer"), ValueError, "density"),
    ("empty list", lambda s: topk_threshold([], 0.5), ValueError, "at least one"),
    ("empty tuple", lambda s: topk_threshold((), 0.5), ValueError, "at least one"),
    ("empty tensor", lambda s: topk_threshold([s, torch.empty(0)], 0.5), ValueError, "empty"),
    ("mixed dtypes", lambda s: topk_threshold([s, s.double()], 0.5), ValueError, "dtype"),
    ("mixed dtypes, layer", lambda s: topk_threshold([s, s.half()], 0.5, scope="layer"), ValueError, "dtype"),
    ("int scores", lambda s: topk_threshold(s.long(), 0.5), TypeError, "floating"),
    ("bool scores", lambda s: topk_threshold([s > 0], 0.5), TypeError, "floating"),
    ("non-tensor in list", lambda s: topk_threshold([s, [1.0, 2.0]], 0.5), TypeError, "floating"),
    ("scores a string", lambda s: topk_threshold("scores", 0.5), TypeError, "sequence"),
    ("scores a number", lambda s: topk_threshold(3.0, 0.5), TypeError, "sequence"),
    ("bad scope", lambda s: topk_threshold(s, 0.5, scope="model"), ValueError, "scope"),
    ("scope None", lambda s: topk_threshold(s, 0.5, scope=None), ValueError, "scope"),
]


@pytest.mark.parametrize("call,error,match", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(4, 5))

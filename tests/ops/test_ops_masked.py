"""masked_conv2d / masked_linear against F.conv2d / F.linear with an explicitly masked weight,
and the straight-through gradients against the hand-derived formulas

    dL/dW = g * m,   dL/ds = sum_over_broadcast_dims(g * W * sign(s)),

where g = dL/dW_eff comes from autograd of F.conv2d / F.linear w.r.t. a leaf effective weight.

What gradcheck can and cannot check: the mask is a step function of s, so the true derivative
w.r.t. s is 0 almost everywhere, while the STE deliberately returns g * W * sign(s). gradcheck
therefore runs with scores *not* requiring grad (x, weight and bias are genuinely
differentiable, and |s| is kept away from t so finite differences never flip the mask); the
score gradient is checked against the formula instead.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import INTERPRETED, backends_for, case_id, cases_on_backends
from tolerance import assert_close

from vpns_fast.ops import masked_conv2d, masked_linear, use_backend

CONV_BACKENDS = backends_for("masked_conv2d")
LINEAR_BACKENDS = backends_for("masked_linear")


def with_backends(backends, full, reduced):
    return cases_on_backends(backends, full, reduced,
                             ids=lambda v: conv_case_id(v) if isinstance(v, tuple) and len(v) == 11 else case_id(v))
THRESHOLD = 0.5
GRANULARITIES = ("unstructured", "kernel", "channel")


def score_shape(weight_shape, granularity):
    if granularity == "unstructured":
        return tuple(weight_shape)
    if granularity == "kernel":  # [C_out, C_in, 1, 1]; for linear: one score per output row
        return tuple(weight_shape[:2]) + (1,) * (len(weight_shape) - 2) if len(weight_shape) > 2 \
            else (weight_shape[0], 1)
    if granularity == "channel":  # [C_out, 1, 1, 1]
        return (weight_shape[0],) + (1,) * (len(weight_shape) - 1)
    raise AssertionError(granularity)


def make_scores(shape, dtype, margin=0.1):
    """Scores of both signs whose magnitudes are at least ``margin`` away from THRESHOLD, with
    both kept and pruned entries (for shapes with at least 2 entries)."""
    mag = torch.rand(shape, dtype=torch.float64) * 0.4
    keep = torch.rand(shape) < 0.5
    flat = keep.flatten()
    if flat.numel() >= 2:
        flat[0], flat[1] = True, False
    keep = flat.view(shape)
    mag = torch.where(keep, THRESHOLD + margin + mag, (THRESHOLD - margin - mag).clamp_min(0))
    sign = torch.where(torch.rand(shape) < 0.5, -1.0, 1.0).to(torch.float64)
    return (mag * sign).to(dtype)


def expected_grads(weight, scores, threshold, g_weff):
    """The STE formulas, written out: dW = g*m; ds = sum over broadcast dims of g*W*sign(s)."""
    m = (scores.abs() > threshold).to(weight.dtype)
    grad_w = g_weff * m
    full = g_weff * weight * torch.sign(scores)
    dims = [d for d in range(weight.dim()) if scores.shape[d] == 1 and weight.shape[d] != 1]
    grad_s = full.sum(dim=dims, keepdim=True) if dims else full
    return grad_w, grad_s


# (C_in, C_out, kH, kW, H, W, stride, padding, dilation, groups, bias)
CONV_CASES = [
    (3, 5, 3, 3, 8, 8, 1, 0, 1, 1, True),
    (3, 7, 3, 3, 9, 11, 2, 1, 1, 1, False),      # prime channels, stride 2, padding, non-square
    (4, 6, 3, 3, 10, 9, 1, 2, 2, 2, True),       # dilation 2, groups 2
    (5, 11, 1, 1, 7, 5, 1, 0, 1, 1, True),       # 1x1 conv, prime channels
    (6, 4, 2, 3, 7, 8, (2, 1), (1, 0), 1, 2, False),  # non-square kernel, tuple stride / padding
    (1, 1, 1, 1, 1, 1, 1, 0, 1, 1, True),        # everything 1
]


def conv_case_id(c):
    return "ci{}-co{}-k{}x{}-in{}x{}-s{}-p{}-d{}-g{}-{}".format(*c[:10], "bias" if c[10] else "nobias")


def make_conv(case, granularity, dtype):
    c_in, c_out, kh, kw, h, w, stride, padding, dilation, groups, has_bias = case
    x = torch.randn(2, c_in, h, w, dtype=dtype)
    weight = torch.randn(c_out, c_in // groups, kh, kw, dtype=dtype)
    scores = make_scores(score_shape(weight.shape, granularity), dtype)
    bias = torch.randn(c_out, dtype=dtype) if has_bias else None
    return x, weight, scores, bias, dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


def _leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


# --------------------------------------------------------------------------- conv

@pytest.mark.parametrize("case,granularity,dtype,backend", with_backends(
    CONV_BACKENDS,
    [(c, g, d) for c in CONV_CASES for g in GRANULARITIES for d in (torch.float32, torch.float64)],
    [(c, g, torch.float32) for c in CONV_CASES[1:4] for g in GRANULARITIES]))
def test_conv_forward_and_gradients(case, granularity, dtype, backend):
    x, weight, scores, bias, conv_kw = make_conv(case, granularity, dtype)
    x1, w1, s1, b1 = _leaves(x, weight, scores, bias)
    with use_backend(backend):
        out = masked_conv2d(x1, w1, s1, THRESHOLD, b1, **conv_kw)

    mask = (scores.abs() > THRESHOLD).to(dtype)
    x2, b2 = _leaves(x, bias)
    w_eff = (weight * mask).requires_grad_()
    ref = F.conv2d(x2, w_eff, b2, **conv_kw)
    tol = dict(rtol=0, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    assert out.shape == ref.shape and out.dtype == dtype
    assert_close(out, ref, **tol)

    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    grad_w, grad_s = expected_grads(weight, scores, THRESHOLD, w_eff.grad)
    assert s1.grad.shape == scores.shape
    assert_close(x1.grad, x2.grad, **tol)
    assert_close(w1.grad, grad_w, **tol)
    assert_close(s1.grad, grad_s, **tol)
    if bias is not None:
        assert_close(b1.grad, b2.grad, **tol)


@pytest.mark.parametrize("backend", CONV_BACKENDS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_conv_bf16_forward(granularity, backend):
    x, weight, scores, bias, conv_kw = make_conv(CONV_CASES[1], granularity, torch.float32)
    x, weight, scores = x.bfloat16(), weight.bfloat16(), scores.bfloat16()
    with use_backend(backend):
        out = masked_conv2d(x, weight, scores, THRESHOLD, None, **conv_kw)
    w_eff = weight * (scores.abs() > THRESHOLD).to(weight.dtype)
    ref = F.conv2d(x.double(), w_eff.double(), None, **conv_kw)
    torch_lowprec = F.conv2d(x, w_eff, None, **conv_kw).double()
    assert out.dtype == torch.bfloat16
    assert_close(out, ref, baseline=torch_lowprec, reduction=weight[0].numel())


@pytest.mark.parametrize("backend", CONV_BACKENDS)
@pytest.mark.parametrize("threshold", [-math.inf, 10.0, "tensor"])
def test_conv_threshold_extremes_and_tensor(threshold, backend):
    """t = -inf keeps every weight (zero scores too); t above every |s| prunes all, yet the STE
    still sends g*W*sign(s) to the scores; a 0-dim tensor threshold works like a float."""
    x, weight, scores, bias, conv_kw = make_conv(CONV_CASES[0], "unstructured", torch.float64)
    scores[0, 0, 0, 0] = 0.0
    t = torch.tensor(THRESHOLD, dtype=torch.float64, requires_grad=True) if threshold == "tensor" else threshold
    t_value = THRESHOLD if threshold == "tensor" else threshold
    x1, w1, s1, b1 = _leaves(x, weight, scores, bias)
    with use_backend(backend):
        out = masked_conv2d(x1, w1, s1, t, b1, **conv_kw)
    w_eff = (weight * (scores.abs() > t_value).to(weight.dtype)).requires_grad_()
    ref = F.conv2d(x, w_eff, bias, **conv_kw)
    assert_close(out, ref, rtol=0, atol=1e-12)
    if threshold == 10.0:
        assert_close(out, bias.view(1, -1, 1, 1).expand_as(out), rtol=0, atol=0)
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    grad_w, grad_s = expected_grads(weight, scores, t_value, w_eff.grad)
    assert_close(w1.grad, grad_w, rtol=0, atol=1e-12)
    assert_close(s1.grad, grad_s, rtol=0, atol=1e-12)
    assert s1.grad[0, 0, 0, 0] == 0  # sign(0) = 0
    if threshold == "tensor":
        assert t.grad is None  # the threshold gets no gradient


@pytest.mark.parametrize("backend", [b for b in CONV_BACKENDS if b not in INTERPRETED])
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("case", [(2, 2, 2, 2, 3, 4, 2, 1, 1, 1, True), (2, 2, 3, 2, 3, 3, 1, 2, 2, 2, True)],
                         ids=conv_case_id)
def test_conv_gradcheck(case, granularity, backend):
    x, weight, scores, bias, conv_kw = make_conv(case, granularity, torch.float64)
    x, weight, bias = _leaves(x[:1], weight, bias)

    def f(x, weight, bias):
        with use_backend(backend):
            return masked_conv2d(x, weight, scores, THRESHOLD, bias, **conv_kw)

    assert torch.autograd.gradcheck(f, (x, weight, bias))


@pytest.mark.parametrize("backend", CONV_BACKENDS)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_conv_gradcheck_of_straight_through_surrogate(granularity, backend):
    """The STE score gradient is exactly the gradient of the surrogate W * (|s| - sg(|s|) + m)
    (sg = stop-gradient), whose value equals W * m. gradcheck that surrogate's *analytical*
    gradient against the op's, over x, weight and scores together."""
    x, weight, scores, bias, conv_kw = make_conv(CONV_CASES[1], granularity, torch.float64)
    x, weight, scores = _leaves(x[:1, :, :5, :5], weight, scores)

    def op(x, weight, scores):
        with use_backend(backend):
            return masked_conv2d(x, weight, scores, THRESHOLD, None, **conv_kw)

    def surrogate(x, weight, scores):
        m = (scores.abs() > THRESHOLD).to(weight.dtype)
        return F.conv2d(x, weight * (scores.abs() - scores.abs().detach() + m), None, **conv_kw)

    out, ref = op(x, weight, scores), surrogate(x, weight, scores)
    assert_close(out, ref, rtol=0, atol=1e-12)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, weight, scores), grad)
    # d/dW of the surrogate is g*(|s| - |s| + m) = g*m: identical formulas, different code.
    want = torch.autograd.grad(ref, (x, weight, scores), grad)
    for a, b in zip(got, want):
        assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", CONV_BACKENDS)
@pytest.mark.parametrize("trainable", ["scores", "weight"])
def test_conv_stage_specific_gradients(trainable, backend):
    """Stage 1 trains scores with frozen weights; stage 2 the reverse. Only the trainable one
    may receive a gradient, and it must still follow the formula."""
    x, weight, scores, bias, conv_kw = make_conv(CONV_CASES[0], "kernel", torch.float64)
    w1 = weight.clone().requires_grad_(trainable == "weight")
    s1 = scores.clone().requires_grad_(trainable == "scores")
    with use_backend(backend):
        out = masked_conv2d(x, w1, s1, THRESHOLD, bias, **conv_kw)
    w_eff = (weight * (scores.abs() > THRESHOLD).to(weight.dtype)).requires_grad_()
    grad = torch.randn_like(out)
    F.conv2d(x, w_eff, bias, **conv_kw).backward(grad)
    out.backward(grad)
    grad_w, grad_s = expected_grads(weight, scores, THRESHOLD, w_eff.grad)
    if trainable == "weight":
        assert s1.grad is None
        assert_close(w1.grad, grad_w, rtol=0, atol=1e-12)
    else:
        assert w1.grad is None
        assert_close(s1.grad, grad_s, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_python_float_threshold_compares_in_the_scores_dtype(dtype):
    """A Python-number threshold must give the mask of ``scores.abs() > t`` in the scores' own
    dtype; rounding t to float32 first would keep or prune the wrong float64 weights."""
    just_above = torch.nextafter(torch.tensor(0.1, dtype=dtype), torch.tensor(1.0, dtype=dtype))
    scores = torch.stack([just_above, torch.tensor(0.1, dtype=dtype)]).view(2, 1)
    weight = torch.ones(2, 1, dtype=dtype)
    expected = (scores.abs() > 0.1).to(dtype).view(1, 2)
    assert expected[0, 0] == 1 and expected[0, 1] == 0
    out = masked_linear(torch.ones(1, 1, dtype=dtype), weight, scores, 0.1)
    assert_close(out, expected, rtol=0, atol=0)
    w4, s4 = weight.view(2, 1, 1, 1), scores.view(2, 1, 1, 1)
    out = masked_conv2d(torch.ones(1, 1, 1, 1, dtype=dtype), w4, s4, 0.1)
    assert_close(out.view(1, 2), expected, rtol=0, atol=0)


# --------------------------------------------------------------------------- linear

# (in_features, out_features, leading batch shape, bias)
LINEAR_CASES = [
    (5, 7, (3,), True),
    (8, 13, (2, 4), False),   # 3-D input
    (1, 1, (1,), True),
    (16, 3, (5,), False),
]


@pytest.mark.parametrize("case,granularity,dtype,backend", with_backends(
    LINEAR_BACKENDS,
    [(c, g, d) for c in LINEAR_CASES for g in GRANULARITIES for d in (torch.float32, torch.float64)],
    [(c, g, torch.float32) for c in LINEAR_CASES[:2] for g in GRANULARITIES]))
def test_linear_forward_and_gradients(case, granularity, dtype, backend):
    n_in, n_out, batch, has_bias = case
    x = torch.randn(*batch, n_in, dtype=dtype)
    weight = torch.randn(n_out, n_in, dtype=dtype)
    scores = make_scores(score_shape(weight.shape, granularity), dtype)
    bias = torch.randn(n_out, dtype=dtype) if has_bias else None
    x1, w1, s1, b1 = _leaves(x, weight, scores, bias)
    with use_backend(backend):
        out = masked_linear(x1, w1, s1, THRESHOLD, b1)

    x2, b2 = _leaves(x, bias)
    w_eff = (weight * (scores.abs() > THRESHOLD).to(dtype)).requires_grad_()
    ref = F.linear(x2, w_eff, b2)
    tol = dict(rtol=0, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    assert out.shape == ref.shape
    assert_close(out, ref, **tol)
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    grad_w, grad_s = expected_grads(weight, scores, THRESHOLD, w_eff.grad)
    assert_close(x1.grad, x2.grad, **tol)
    assert_close(w1.grad, grad_w, **tol)
    assert_close(s1.grad, grad_s, **tol)
    if bias is not None:
        assert_close(b1.grad, b2.grad, **tol)


@pytest.mark.parametrize("backend", [b for b in LINEAR_BACKENDS if b not in INTERPRETED])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_linear_gradcheck(granularity, backend):
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    scores = make_scores(score_shape(weight.shape, granularity), torch.float64)

    def f(x, weight, bias):
        with use_backend(backend):
            return masked_linear(x, weight, scores, THRESHOLD, bias)

    assert torch.autograd.gradcheck(f, (x, weight, bias))


# --------------------------------------------------------------------------- bad input

def _conv_args():
    return torch.randn(1, 3, 6, 6), torch.randn(4, 3, 3, 3)


BAD_CONV = [
    ("scores not broadcastable", lambda x, w: masked_conv2d(x, w, torch.randn(4, 2, 1, 1), 0.5),
     r"\(4, 2, 1, 1\).*\(4, 3, 3, 3\)"),
    ("scores wrong C_out", lambda x, w: masked_conv2d(x, w, torch.randn(5, 1, 1, 1), 0.5),
     r"\(5, 1, 1, 1\).*\(4, 3, 3, 3\)"),
    ("scores with fewer dims", lambda x, w: masked_conv2d(x, w, torch.randn(4), 0.5), r"\(4, 3, 3, 3\)"),
    ("scores not a tensor", lambda x, w: masked_conv2d(x, w, 0.7, 0.5), "scores"),
    ("threshold 1-D", lambda x, w: masked_conv2d(x, w, torch.randn_like(w), torch.tensor([0.5])), "scalar"),
    ("threshold per layer", lambda x, w: masked_conv2d(x, w, torch.randn_like(w), torch.rand(2)), "scalar"),
    ("weight 3-D", lambda x, w: masked_conv2d(x, w[0], torch.randn_like(w[0]), 0.5), "weight"),
    ("weight 5-D", lambda x, w: masked_conv2d(x, w[None], torch.randn_like(w[None]), 0.5), "weight"),
]


@pytest.mark.parametrize("call,match", [c[1:] for c in BAD_CONV], ids=[c[0] for c in BAD_CONV])
def test_conv_bad_input(call, match):
    x, w = _conv_args()
    with pytest.raises(ValueError, match=match):
        call(x, w)


BAD_LINEAR = [
    ("scores not broadcastable", lambda x, w: masked_linear(x, w, torch.randn(7, 2), 0.5), r"\(7, 2\).*\(7, 5\)"),
    ("scores transposed", lambda x, w: masked_linear(x, w, torch.randn(5, 7), 0.5), r"\(5, 7\).*\(7, 5\)"),
    ("threshold 2-D", lambda x, w: masked_linear(x, w, torch.randn_like(w), torch.zeros(1, 1)), "scalar"),
    ("weight 1-D", lambda x, w: masked_linear(x, w[0], torch.randn(5), 0.5), "weight"),
    ("weight 3-D", lambda x, w: masked_linear(x, w[None], torch.randn(1, 7, 5), 0.5), "weight"),
]


@pytest.mark.parametrize("call,match", [c[1:] for c in BAD_LINEAR], ids=[c[0] for c in BAD_LINEAR])
def test_linear_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.randn(2, 5), torch.randn(7, 5))

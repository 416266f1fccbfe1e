"""The Triton fused mask + STE kernels (kernels/masked.py) against the references beside them.

On a machine without CUDA the kernels run on CPU tensors through the Triton interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported).

Exactness: the effective weight and dL/dw are multiplications by 0/1, so they must equal the
reference bit for bit (rtol = atol = 0); dL/ds of structured scores is a reduction whose order
differs from torch's, so it gets a small tolerance (the twice-torch's-error rule of tests/tolerance.py).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import requires_triton
from tolerance import assert_close

from vpns_fast import ops
from vpns_fast.kernels import masked as M
from vpns_fast.nn.masked_layers import score_shape

pytestmark = requires_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GRANULARITIES = ("unstructured", "kernel", "channel")
EXACT = dict(rtol=0, atol=0)


class MaskedWeightsTritonFunction(torch.autograd.Function):
    """Every layer's ``w * (|s| > t)`` in one launch, and the fused STE backward in one launch,
    without the custom op: the launchers and the op's backward formula checked directly.

    ``MaskedWeightsTritonFunction.apply(thresholds, *weights, *scores)`` returns a tuple of
    effective weights (an autograd.Function takes tensors, not lists, as arguments)."""

    @staticmethod
    def forward(ctx, thresholds, *tensors):
        n = len(tensors) // 2
        weights, scores = list(tensors[:n]), list(tensors[n:])
        thresholds = M._as_threshold_tensor(thresholds, weights[0].device)
        ctx.save_for_backward(thresholds, *weights, *scores)
        return tuple(M.masked_weights_fwd(weights, scores, thresholds))

    @staticmethod
    def backward(ctx, *grads):
        n = len(grads)
        need = ctx.needs_input_grad[1:]
        grad_weights, grad_scores = M._masked_weights_backward(ctx, list(grads), need[:n], need[n:])
        return (None, *grad_weights, *grad_scores)


def random_scores(shape, dtype, zeros=True):
    s = torch.randn(shape, dtype=torch.float64, device=DEVICE)
    if zeros and s.numel() > 2:
        s.view(-1)[1] = 0.0  # sign(0) = 0 and |0| > t only for t = -inf
    return s.to(dtype)


def ste_formula_float64(g, weight, scores, threshold):
    """dL/dw and dL/ds written out in float64 from the same g (the definition, docs/method.md)."""
    t = torch.as_tensor(threshold).to(scores.dtype).double()
    m = (scores.double().abs() > t).double()
    g64, w64 = g.double(), weight.double()
    grad_s = (g64 * w64 * torch.sign(scores.double())).sum_to_size(scores.shape)
    return g64 * m, grad_s


def reference_grads(weight, scores, threshold, g):
    w, s = weight.detach().clone().requires_grad_(), scores.detach().clone().requires_grad_()
    out = M.masked_weight_ref(w, s, threshold)
    out.backward(g)
    return out.detach(), w.grad, s.grad


# --------------------------------------------------------------------------- fused weight op

DTYPE_PAIRS = [  # (weight dtype, scores dtype)
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.float64, torch.float64),
    (torch.bfloat16, torch.float32),
    (torch.float32, torch.bfloat16),
]
WEIGHT_SHAPES = [(7, 5, 3, 3), (3, 5, 1, 1), (5, 3, 2, 7), (11, 7), (4, 130, 3, 3)]  # last: channel group > 1024


FUSED_CASES = [(dtypes, granularity, shape) for dtypes in DTYPE_PAIRS for granularity in GRANULARITIES
               for shape in WEIGHT_SHAPES
               if not (granularity == "kernel" and len(shape) == 2)  # a linear layer has no kernel
               and (shape[1] != 130 or dtypes == DTYPE_PAIRS[0])]  # the big shape in float32 only


@pytest.mark.parametrize("dtypes,granularity,shape", FUSED_CASES,
                         ids=[f"w{str(d[0])[6:]}-s{str(d[1])[6:]}-{g}-{'x'.join(map(str, s))}"
                              for d, g, s in FUSED_CASES])
def test_fused_weight_op_against_reference(dtypes, granularity, shape):
    w_dtype, s_dtype = dtypes
    weight = torch.randn(shape, device=DEVICE).to(w_dtype)
    scores = random_scores(score_shape(shape, granularity), s_dtype)
    threshold = torch.tensor(0.6, device=DEVICE)
    g = torch.randn(shape, device=DEVICE).to(w_dtype)

    w, s = weight.clone().requires_grad_(), scores.clone().requires_grad_()
    out = M.masked_weight_triton(w, s, threshold)
    out.backward(g)
    ref_out, ref_gw, ref_gs = reference_grads(weight, scores, threshold, g)

    assert out.dtype == w_dtype and w.grad.dtype == w_dtype and s.grad.dtype == s_dtype
    assert s.grad.shape == scores.shape
    assert_close(out, ref_out, **EXACT)
    assert_close(w.grad, ref_gw, **EXACT)
    gw64, gs64 = ste_formula_float64(g, weight, scores, threshold)
    assert_close(w.grad.double(), gw64, **EXACT)
    if granularity == "unstructured":  # no reduction: the same roundings as the reference
        assert_close(s.grad, ref_gs, **EXACT)
    elif torch.float64 in dtypes:
        assert_close(s.grad, ref_gs, rtol=1e-12, atol=1e-12)
    elif s_dtype == torch.float32 and w_dtype == torch.float32:
        group = weight.numel() // scores.numel()
        assert_close(s.grad, ref_gs, rtol=1e-5, atol=1e-6 * math.sqrt(group))
    else:
        assert_close(s.grad, gs64, baseline=ref_gs, atol=1e-3)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("need", ["both", "weight", "scores"])
def test_launchers_and_function(granularity, need):
    """The launchers and MaskedWeightTritonFunction directly (no custom op), one side at a time."""
    weight = torch.randn(5, 7, 3, 3, device=DEVICE)
    scores = random_scores(score_shape(weight.shape, granularity), torch.float32)
    threshold = torch.tensor(0.5, device=DEVICE)
    g = torch.randn_like(weight)
    need_w, need_s = need in ("both", "weight"), need in ("both", "scores")
    gw, gs = M.masked_weight_bwd(g, weight, scores, threshold, need_w, need_s)
    _, ref_gw, ref_gs = reference_grads(weight, scores, threshold, g)
    assert (gw.numel() == 0) != need_w and (gs.numel() == 0) != need_s
    if need_w:
        assert_close(gw, ref_gw, **EXACT)
    if need_s:
        assert_close(gs, ref_gs, rtol=1e-5, atol=1e-5)
    assert_close(M.masked_weight_fwd(weight, scores, threshold),
                               M.masked_weight_ref(weight, scores, threshold), **EXACT)

    w, s = weight.clone().requires_grad_(need_w), scores.clone().requires_grad_(need_s)
    M.MaskedWeightTritonFunction.apply(w, s, 0.5).backward(g)  # a Python-float threshold too
    assert (w.grad is None) != need_w and (s.grad is None) != need_s
    if need_w:
        assert_close(w.grad, ref_gw, **EXACT)
    if need_s:
        assert_close(s.grad, ref_gs, rtol=1e-5, atol=1e-5)


def test_bf16_mask_rounds_the_threshold_like_the_reference():
    """A float32 threshold is compared in the scores' dtype: 0.3 rounds to 0.30078125 in bf16, so
    a bf16 score of exactly 0.30078125 is a tie and is pruned, although it exceeds 0.3."""
    t = torch.tensor(0.3, dtype=torch.float32, device=DEVICE)
    assert t.to(torch.bfloat16).item() == 0.30078125
    values = [0.30078125, -0.30078125, 0.298828125, 0.302734375, 0.296875, 0.0, -1.0, 2.0]
    scores = torch.tensor(values, dtype=torch.bfloat16, device=DEVICE).view(8, 1)
    weight = torch.ones(8, 3, dtype=torch.bfloat16, device=DEVICE)
    expected = M.score_mask_ref(scores, t)
    assert not expected[0, 0] and (scores.float().abs() > t)[0, 0]  # the case is real
    out = M.masked_weight_triton(weight, scores, t)
    assert_close(out, M.masked_weight_ref(weight, scores, t), **EXACT)
    assert_close(out != 0, expected.expand(8, 3), **EXACT)
    with ops.use_backend("triton"):  # and through the public op, with a Python-float threshold
        lin = ops.masked_linear(torch.eye(3, dtype=torch.bfloat16, device=DEVICE), weight, scores, 0.3)
    assert_close(lin.t() != 0, expected.expand(8, 3), **EXACT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_ties_are_pruned_and_minus_inf_keeps_all(granularity, dtype):
    weight = torch.randn(6, 4, 3, 3, device=DEVICE).to(dtype)
    shape = score_shape(weight.shape, granularity)
    scores = (torch.randint(-4, 5, shape, device=DEVICE)).to(dtype)  # integers: many ties, zeros
    g = torch.randn_like(weight)
    for threshold in (torch.tensor(2.0, device=DEVICE), torch.tensor(-math.inf, device=DEVICE),
                      torch.tensor(0.0, device=DEVICE)):
        w, s = weight.clone().requires_grad_(), scores.clone().requires_grad_()
        out = M.masked_weight_triton(w, s, threshold)
        out.backward(g)
        ref_out, ref_gw, ref_gs = reference_grads(weight, scores, threshold, g)
        assert_close(out, ref_out, **EXACT)
        assert_close(w.grad, ref_gw, **EXACT)
        keep = (out != 0) | (weight == 0)
        if threshold.item() == 2.0:
            assert not keep[(scores.abs() == 2).expand_as(weight)].any()  # |s| == t is pruned
        if threshold.item() == -math.inf:
            assert_close(out, weight, **EXACT)  # every weight kept, zero scores too
        gs64 = ste_formula_float64(g, weight, scores, threshold)[1]
        if dtype == torch.float32:
            assert_close(s.grad.double(), gs64, rtol=1e-5, atol=1e-5)
        else:
            assert_close(s.grad, gs64, baseline=ref_gs, atol=1e-3)
        assert (s.grad[scores == 0] == 0).all()  # sign(0) = 0


def test_non_trailing_broadcast_and_channels_last():
    """Scores [1, C_in, 1, 1] are expanded (autograd sums them back); a channels_last weight is
    read through a contiguous copy and its gradient keeps the weight's shape."""
    weight = torch.randn(5, 3, 3, 3, device=DEVICE)
    g = torch.randn_like(weight)
    threshold = torch.tensor(0.4, device=DEVICE)
    for scores, w0 in ((random_scores((1, 3, 1, 1), torch.float32, zeros=False), weight),
                       (random_scores((5, 3, 3, 3), torch.float32), weight.to(memory_format=torch.channels_last))):
        w, s = w0.clone().requires_grad_(), scores.clone().requires_grad_()
        out = M.masked_weight_triton(w, s, threshold)
        out.backward(g)
        ref_out, ref_gw, ref_gs = reference_grads(w0, scores, threshold, g)
        assert_close(out, ref_out, **EXACT)
        assert_close(w.grad, ref_gw, **EXACT)
        assert_close(s.grad, ref_gs, rtol=1e-5, atol=1e-5)


def test_fused_weight_op_gradcheck_float64():
    """Weight only: the mask is a step in s, so s is fixed away from t (see test_ops_masked.py)."""
    scores = torch.tensor([0.9, -0.1, -0.8], dtype=torch.float64, device=DEVICE).view(3, 1, 1, 1)
    threshold = torch.tensor(0.5, device=DEVICE)
    weight = torch.randn(3, 2, 2, 2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w: M.masked_weight_triton(w, scores, threshold), (weight,))
    assert torch.autograd.gradcheck(lambda w: M.MaskedWeightTritonFunction.apply(w, scores, threshold), (weight,))


def test_bad_input():
    w = torch.randn(4, 3, 3, 3, device=DEVICE)
    t = torch.tensor(0.5, device=DEVICE)
    with pytest.raises(TypeError, match="int32"):
        M.masked_weight_fwd(w, torch.ones_like(w, dtype=torch.int32), t)
    with pytest.raises(ValueError, match="leading dims"):
        M.masked_weight_fwd(w, torch.randn(1, 3, 1, 1, device=DEVICE), t)
    with pytest.raises(ValueError, match="0-dim"):
        M.masked_weight_fwd(w, torch.randn_like(w), torch.tensor([0.5], device=DEVICE))
    with pytest.raises(ValueError, match="grad has shape"):
        M.masked_weight_bwd(torch.randn(4, 3, 3, device=DEVICE), w, torch.randn_like(w), t)
    with pytest.raises(ValueError, match="share one dtype"):
        M.masked_weights_fwd([w, w.double()], [w, w.double()], t)
    with pytest.raises(ValueError, match="one entry per layer"):
        M.masked_weights_fwd([w, w], [w, w], torch.rand(3, device=DEVICE))
    with pytest.raises(ValueError, match="2 weights but 1"):
        M.masked_weights_fwd([w, w], [w], t)


# --------------------------------------------------------------------------- public ops, backend "triton"

# (C_in, C_out, kH, kW, H, W, stride, padding, groups, bias)
CONV_CASES = [
    (3, 5, 3, 3, 7, 9, 1, 1, 1, True),     # prime channels, non-square input
    (5, 7, 3, 3, 8, 6, 2, 1, 1, False),    # stride 2
    (7, 3, 1, 1, 5, 5, 1, 0, 1, True),     # 1x1
    (4, 6, 2, 3, 6, 7, (2, 1), (1, 0), 2, True),  # non-square kernel, groups 2
]


def _run(backend, fn, tensors, grad):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
    with ops.use_backend(backend):
        out = fn(*leaves)
    out.backward(grad)
    return out.detach(), [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "ci{}-co{}-k{}x{}-in{}x{}-s{}-p{}-g{}-{}".format(*c))
def test_masked_conv2d_fused_mask_cudnn_matches_torch_backend(case, granularity, dtype):
    c_in, c_out, kh, kw, h, w, stride, padding, groups, has_bias = case
    x = torch.randn(2, c_in, h, w, device=DEVICE).to(dtype)
    weight = torch.randn(c_out, c_in // groups, kh, kw, device=DEVICE).to(dtype)
    scores = random_scores(score_shape(weight.shape, granularity), dtype)
    bias = torch.randn(c_out, device=DEVICE).to(dtype) if has_bias else None
    threshold = torch.tensor(0.5, device=DEVICE)

    def fn(x, weight, scores, bias):
        return ops.masked_conv2d(x, weight, scores, threshold, bias, stride, padding, 1, groups)

    probe = F.conv2d(x, weight, bias, stride, padding, 1, groups)
    grad = torch.randn(probe.shape, device=DEVICE).to(dtype)
    out, grads = _run("triton", fn, (x, weight, scores, bias), grad)
    ref, ref_grads = _run("torch", fn, (x, weight, scores, bias), grad)
    assert out.dtype == dtype and grads[2].shape == scores.shape
    # Same effective weight, same conv: identical up to the conv's own run-to-run behaviour.
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    assert_close(out, ref, **tol)
    for name, a, b in zip(("x", "weight", "scores", "bias"), grads, ref_grads):
        if a is None:
            assert b is None
            continue
        if name == "weight":
            assert_close(a, b, **tol)
        elif name == "scores" and dtype == torch.bfloat16:
            # the same g = dL/dw_eff as both backends saw: compare with the formula in float64
            w_eff = M.masked_weight_ref(weight, scores, threshold).requires_grad_()
            g_weff, = torch.autograd.grad(F.conv2d(x, w_eff, bias, stride, padding, 1, groups), w_eff, grad)
            assert_close(a, ste_formula_float64(g_weff, weight, scores, threshold)[1], baseline=b, atol=1e-2)
        else:
            assert_close(a, b, **tol, msg=f"grad {name}")


@pytest.mark.parametrize("granularity", ("unstructured", "channel"))
@pytest.mark.parametrize("batch", [(3,), (2, 4)], ids=str)
def test_masked_linear_triton_matches_torch_backend(granularity, batch):
    x = torch.randn(*batch, 7, device=DEVICE)
    weight = torch.randn(5, 7, device=DEVICE)
    scores = random_scores(score_shape(weight.shape, granularity), torch.float32)
    bias = torch.randn(5, device=DEVICE)
    threshold = torch.tensor(0.5, device=DEVICE)

    def fn(x, weight, scores, bias):
        return ops.masked_linear(x, weight, scores, threshold, bias)

    grad = torch.randn(*batch, 5, device=DEVICE)
    out, grads = _run("triton", fn, (x, weight, scores, bias), grad)
    ref, ref_grads = _run("torch", fn, (x, weight, scores, bias), grad)
    assert_close(out, ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        assert_close(a, b, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- multi-tensor op

# Mixed layers of one model: granularities, a 1x1, a linear head, multi-block tensors, a channel
# group larger than one block (4 x 130*3*3).
MULTI_LAYERS = [
    ((6, 3, 7, 7), "unstructured"), ((8, 6, 3, 3), "kernel"), ((8, 6, 1, 1), "kernel"),
    ((40, 30, 3, 3), "unstructured"), ((4, 130, 3, 3), "channel"), ((5, 8, 3, 3), "channel"),
    ((10, 5), "unstructured"), ((10, 5), "channel"), ((3, 5, 3, 3), "kernel"),
]


def _multi_inputs(w_dtype, s_dtype):
    weights = [torch.randn(shape, device=DEVICE).to(w_dtype) for shape, _ in MULTI_LAYERS]
    scores = [random_scores(score_shape(shape, gran), s_dtype) for shape, gran in MULTI_LAYERS]
    grads = [torch.randn(shape, device=DEVICE).to(w_dtype) for shape, _ in MULTI_LAYERS]
    return weights, scores, grads


class _LaunchCounter:
    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.mark.parametrize("thresholds", ["global", "per-layer"])
@pytest.mark.parametrize("dtypes", [DTYPE_PAIRS[0], DTYPE_PAIRS[1]], ids=["float32", "bfloat16"])
def test_multi_tensor_op_one_launch_each_way(dtypes, thresholds, monkeypatch):
    weights, scores, grads = _multi_inputs(*dtypes)
    if thresholds == "global":
        t = torch.tensor(0.5, device=DEVICE)
        per_layer = [t] * len(weights)
    else:
        t = torch.linspace(-0.2, 1.5, len(weights), device=DEVICE)
        per_layer = list(t)
    fwd = _LaunchCounter(M._masked_weights_fwd_kernel)
    bwd = _LaunchCounter(M._masked_weights_bwd_kernel)
    monkeypatch.setattr(M, "_masked_weights_fwd_kernel", fwd)
    monkeypatch.setattr(M, "_masked_weights_bwd_kernel", bwd)

    ws = [w.clone().requires_grad_() for w in weights]
    ss = [s.clone().requires_grad_() for s in scores]
    outs = M.masked_weights_triton(ws, ss, t)
    torch.autograd.backward(outs, grads)
    assert (fwd.launches, bwd.launches) == (1, 1)
    for i, (w, s, ti, g) in enumerate(zip(weights, scores, per_layer, grads)):
        ref_out, ref_gw, ref_gs = reference_grads(w, s, ti, g)
        assert_close(outs[i], ref_out, **EXACT, msg=f"layer {i}")
        assert_close(ws[i].grad, ref_gw, **EXACT, msg=f"layer {i}")
        if dtypes[0] == torch.float32:
            assert_close(ss[i].grad, ref_gs, rtol=1e-5, atol=1e-5)
        else:
            assert_close(ss[i].grad, ste_formula_float64(g, w, s, ti)[1], baseline=ref_gs, atol=1e-3)


@pytest.mark.parametrize("trainable", ["scores", "weight"])
def test_multi_tensor_stage_specific_gradients(trainable):
    weights, scores, grads = _multi_inputs(torch.float32, torch.float32)
    t = torch.tensor(0.5, device=DEVICE)
    ws = [w.clone().requires_grad_(trainable == "weight") for w in weights]
    ss = [s.clone().requires_grad_(trainable == "scores") for s in scores]
    outs = MaskedWeightsTritonFunction.apply(t, *ws, *ss)
    torch.autograd.backward(outs, grads)
    for w, s, w0, s0, g in zip(ws, ss, weights, scores, grads):
        _, ref_gw, ref_gs = reference_grads(w0, s0, t, g)
        if trainable == "weight":
            assert s.grad is None
            assert_close(w.grad, ref_gw, **EXACT)
        else:
            assert w.grad is None
            assert_close(s.grad, ref_gs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", ["single", "multi"])
@pytest.mark.parametrize("thresholds", ["global", "per-layer"])
def test_double_backward_matches_the_reference(op, thresholds):
    """create_graph=True through the fused ops (a penalty on the score gradient, differentiated again): every
    second-order gradient is the reference's (the kernels' backward ops have no derivative; before, torch raised "no
    autograd formula")."""
    weights, scores, _ = _multi_inputs(torch.float64, torch.float64)
    t = torch.tensor(0.5, device=DEVICE) if thresholds == "global" else torch.linspace(0.1, 0.9, len(weights))
    per_layer = [t] * len(weights) if thresholds == "global" else list(t)
    results = []
    for way in ("triton", "reference"):
        ws = [w.clone().requires_grad_() for w in weights]
        ss = [s.clone().requires_grad_() for s in scores]
        xs = [torch.randn(w.shape[1:], dtype=w.dtype, generator=torch.Generator().manual_seed(i))
              for i, w in enumerate(weights)]
        if way == "reference":
            outs = M.masked_weights_ref(ws, ss, per_layer)
        elif op == "multi":
            outs = M.masked_weights_triton(ws, ss, t)
        else:
            outs = [M.masked_weight_triton(w, s, ti) for w, s, ti in zip(ws, ss, per_layer)]
        loss = sum((o * x).sum().pow(2) for o, x in zip(outs, xs))
        first = torch.autograd.grad(loss, ss, create_graph=True)
        sum(g.pow(2).sum() for g in first).backward()
        results.append([w.grad for w in ws] + [s.grad for s in ss])
    for i, (got, want) in enumerate(zip(*results)):
        assert_close(got, want, rtol=1e-10, atol=1e-10, msg=f"tensor {i}")
    assert any(g.abs().sum() > 0 for g in results[0])


def test_deterministic():
    weights, scores, grads = _multi_inputs(torch.float32, torch.float32)
    t = torch.tensor(0.3, device=DEVICE)

    def run():
        single = [M.masked_weight_bwd(g, w, s, t) for g, w, s in zip(grads, weights, scores)]
        multi = M.masked_weights_bwd(grads, weights, scores, t)
        return [x for pair in single for x in pair] + multi[0] + multi[1] + \
            M.masked_weights_fwd(weights, scores, t)

    for a, b in zip(run(), run()):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))  # bit-identical, -0.0 included


def test_torch_compile_and_opcheck():
    weight = torch.randn(5, 3, 3, 3, device=DEVICE, requires_grad=True)
    scores = random_scores((5, 3, 1, 1), torch.float32).requires_grad_()
    t = torch.tensor(0.5, device=DEVICE)
    torch.library.opcheck(torch.ops.vpns_fast.masked_weight.default, (weight, scores, t))
    x = torch.randn(2, 3, 6, 6, device=DEVICE)

    def step(x, weight, scores, t):
        return F.conv2d(x, M.masked_weight_triton(weight, scores, t)).square().sum()

    def step_multi(weights, scores, t):
        return sum(o.square().sum() for o in M.masked_weights_triton(weights, scores, t))

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss = compiled(x, weight, scores, t)
    grads = torch.autograd.grad(loss, (weight, scores))
    ref_loss = step(x, weight, scores, t)
    ref_grads = torch.autograd.grad(ref_loss, (weight, scores))
    assert_close(loss, ref_loss, **EXACT)
    for a, b in zip(grads, ref_grads):
        assert_close(a, b, **EXACT)

    compiled_multi = torch.compile(step_multi, backend="aot_eager", fullgraph=True)
    loss = compiled_multi([weight, weight[:2]], [scores, scores[:2]], t)
    grads = torch.autograd.grad(loss, (weight, scores))
    ref_grads = torch.autograd.grad(step_multi([weight, weight[:2]], [scores, scores[:2]], t), (weight, scores))
    for a, b in zip(grads, ref_grads):
        assert_close(a, b, **EXACT)


# --------------------------------------------------------------------------- CUDA only

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_resnet18_layer_shapes_cuda(granularity, dtype, cuda_or_skip):
    from bench.registry import masked_weight_shapes

    shapes = [s for s in masked_weight_shapes("resnet18") if granularity != "kernel" or len(s) == 4]
    weights = [torch.randn(s, device="cuda").to(dtype) for s in shapes]
    scores = [torch.randn(score_shape(s, granularity), device="cuda").to(dtype) for s in shapes]
    grads = [torch.randn(s, device="cuda").to(dtype) for s in shapes]
    t = torch.tensor(0.7, device="cuda")
    ws = [w.clone().requires_grad_() for w in weights]
    ss = [s.clone().requires_grad_() for s in scores]
    outs = M.masked_weights_triton(ws, ss, t)
    torch.autograd.backward(outs, grads)
    for i, (w, s, g) in enumerate(zip(weights, scores, grads)):
        ref_out, ref_gw, ref_gs = reference_grads(w, s, t, g)
        w1, s1 = w.clone().requires_grad_(), s.clone().requires_grad_()
        single = M.masked_weight_triton(w1, s1, t)
        single.backward(g)
        for out, gw, gs in ((outs[i], ws[i].grad, ss[i].grad), (single, w1.grad, s1.grad)):
            assert_close(out, ref_out, **EXACT)
            assert_close(gw, ref_gw, **EXACT)
            if dtype == torch.float32:
                group = w.numel() // s.numel()
                assert_close(gs, ref_gs, rtol=1e-5, atol=1e-5 * math.sqrt(group))
            else:
                assert_close(gs, ste_formula_float64(g, w, s, t)[1], baseline=ref_gs, atol=1e-2)
    x = torch.randn(8, 64, 56, 56, device="cuda").to(dtype)
    w, s = weights[1], scores[1]  # layer1.0.conv1
    with ops.use_backend("triton"):
        out = ops.masked_conv2d(x, w, s, t, None, 1, 1)
    with ops.use_backend("torch"):
        ref = ops.masked_conv2d(x, w, s, t, None, 1, 1)
    assert_close(out, ref, rtol=1e-3 if dtype == torch.float32 else 2e-2,
                               atol=1e-3 if dtype == torch.float32 else 2e-2)


def test_half_weights_with_float64_scores_are_refused():
    weight = torch.randn(4, 3, 3, 3, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="float64 scores"):
        M.masked_weight_triton(weight, torch.randn(4, 3, 3, 3, dtype=torch.float64), torch.tensor(0.5))

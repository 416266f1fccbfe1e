"""The implicit-GEMM masked conv (kernels/masked_conv.py) against ``masked_conv2d_ref``.

On a machine without CUDA the kernels run on CPU tensors through the Triton interpreter (tiny
shapes: every program is interpreted op by op); with CUDA they run natively.

Tolerances:
* float32: against the float64 reference, rtol 1e-5 and atol 1e-6 * max|ref| (float32
  accumulation of at most a few hundred products; the order differs from torch's). On CUDA the
  float32 tests switch TF32 off (the kernel follows the cuDNN conv TF32 flag, on by default);
  one CUDA test covers TF32 with TF32-sized tolerances.
* bfloat16 / float16: the low-precision rule |out - ref64| <= 2 |torch_lowprec - ref64| + atol with
  atol = 1 ulp(dtype) * max|ref64| (ulp = 2**-7 bf16, 2**-10 fp16): both implementations
  accumulate in fp32 in different orders and round once to 16 bits, so where torch happens to
  round well the kernel may still be a rounding step off; the atol grows with the reduction
  length through max|ref64|. Score gradients of kernel / channel groups sum 16-bit-rounded
  products, which the 2x term covers. (Interpreted, the largest error is <= 0.46 of the bound.)
* masks are exact: a threshold tie is pruned, -inf keeps everything, +inf prunes everything
  (output = bias exactly, dL/dx = dL/dw = 0 exactly).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import requires_triton
from tolerance import assert_close

from vpns_fast.kernels import masked_conv as C
from vpns_fast.kernels._triton import triton
from vpns_fast.kernels.masked import masked_conv2d_ref
from vpns_fast.nn.masked_layers import score_shape

# float32 tests compare at float32 precision (conftest's ieee_fp32: no TF32)
pytestmark = [requires_triton, pytest.mark.usefixtures("ieee_fp32")]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GRANULARITIES = ("unstructured", "kernel", "channel")
EXACT = dict(rtol=0, atol=0)
ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def random_scores(shape, dtype):
    s = torch.randn(shape, dtype=torch.float64)
    if s.numel() > 2:
        s.view(-1)[1] = 0.0  # sign(0) = 0: no score gradient
    return s.to(dtype).to(DEVICE)


# (name, C_in, C_out, (KH, KW), (H, W), stride, padding, dilation, bias, channels_last)
CASES = [
    ("prime-nonsquare", 3, 5, (3, 3), (7, 9), 1, 1, 1, True, False),
    ("stride2", 5, 7, (3, 3), (8, 6), 2, 1, 1, False, False),
    ("1x1", 7, 3, (1, 1), (5, 5), 1, 0, 1, True, False),
    ("kernel2x3-dil", 5, 4, (2, 3), (7, 6), (2, 1), (1, 0), (1, 2), True, False),
    ("dil2-channels_last", 3, 5, (3, 3), (9, 7), 1, 0, 2, False, True),
    # C_in, C_out multiples of BLOCK_K: K tiles are channel runs (CHANNEL_TILES) in all kernels
    ("channel-tiles", 32, 32, (2, 1), (5, 4), 2, 1, (2, 1), True, True),
]
CASE = {c[0]: c for c in CASES}


def make_inputs(case, granularity, dtype):
    _, c_in, c_out, (kh, kw), (h, w), stride, padding, dilation, has_bias, channels_last = case
    x = torch.randn(2, c_in, h, w, dtype=torch.float64).to(dtype).to(DEVICE)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight = torch.randn(c_out, c_in, kh, kw, dtype=torch.float64).to(dtype).to(DEVICE)
    scores = random_scores(score_shape(weight.shape, granularity), dtype)
    bias = torch.randn(c_out, dtype=torch.float64).to(dtype).to(DEVICE) if has_bias else None
    return x, weight, scores, bias, dict(stride=stride, padding=padding, dilation=dilation)


def run(fn, tensors, grad, threshold, conv):
    """Output and gradients of x, weight, scores, bias (None where a tensor is None)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves[:3], threshold, leaves[3], **conv)
    out.backward(grad)
    return out.detach(), [None if t is None else t.grad for t in leaves]


def reference(tensors, grad, threshold, conv, dtype=torch.float64):
    """masked_conv2d_ref in ``dtype`` (None: the tensors' own dtypes); the threshold is rounded
    to the scores' dtype first, as the comparison in the scores' own dtype does."""
    scores = tensors[2]
    t = torch.as_tensor(threshold).to(scores.dtype).to(dtype or scores.dtype)
    cast = [None if v is None else v.to(dtype) for v in tensors] if dtype else list(tensors)
    return run(masked_conv2d_ref, cast, grad.to(dtype or grad.dtype), t, conv)


def assert_fp32_close(got, ref64, what=""):
    atol = 1e-6 * max(1.0, ref64.abs().max().item()) if ref64.numel() else 0.0
    assert_close(got.double(), ref64, rtol=1e-5, atol=atol, msg=what)


def assert_lowprec_close(got, ref64, ref_lowprec, dtype, what=""):
    """The twice-torch's-error rule with atol = 1 ulp of the largest reference value."""
    assert_close(got, ref64, baseline=ref_lowprec, atol=ULP[dtype] * ref64.abs().max().item(), msg=what)


def check_against_reference(case, granularity, dtype, threshold=0.5, scores_dtype=None):
    x, weight, scores, bias, conv = make_inputs(case, granularity, dtype)
    scores = scores if scores_dtype is None else scores.to(scores_dtype)
    tensors = (x, weight, scores, bias)
    probe = F.conv2d(x.double(), weight.double(), None, **conv)
    grad = torch.randn(probe.shape, dtype=torch.float64).to(dtype).to(DEVICE)
    out, grads = run(C.masked_conv2d_igemm, tensors, grad, threshold, conv)
    ref, ref_grads = reference(tensors, grad, threshold, conv)
    assert out.dtype == dtype and out.shape == ref.shape
    assert out.is_contiguous(memory_format=torch.channels_last if case[-1] else torch.contiguous_format)
    assert grads[2].shape == scores.shape and grads[2].dtype == scores.dtype
    names = ("out", "x", "weight", "scores", "bias")
    if dtype in (torch.float32, torch.float64):
        for name, a, b in zip(names, (out, *grads), (ref, *ref_grads)):
            if b is not None:
                if dtype == torch.float64:
                    assert_close(a, b, rtol=1e-10, atol=1e-10)
                else:
                    assert_fp32_close(a, b, name)
    else:
        low, low_grads = reference(tensors, grad, threshold, conv, dtype=None)
        for name, a, b, c in zip(names, (out, *grads), (ref, *ref_grads), (low, *low_grads)):
            if b is not None:
                assert_lowprec_close(a, b, c, dtype, name)
    return out, grads


# --------------------------------------------------------------------------- forward and gradients

@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_float32_forward_and_gradients(case, granularity):
    check_against_reference(case, granularity, torch.float32)


LOWPREC = [(d, c, g) for d in (torch.bfloat16, torch.float16)
           for c in ("prime-nonsquare", "dil2-channels_last", "channel-tiles") for g in ("unstructured", "channel")]


@pytest.mark.parametrize("dtype,case,granularity", LOWPREC,
                         ids=[f"{str(d)[6:]}-{c}-{g}" for d, c, g in LOWPREC])
def test_16bit_forward_and_gradients(dtype, case, granularity):
    check_against_reference(CASE[case], granularity, dtype)


@pytest.mark.parametrize("granularity", ("unstructured", "kernel"))
def test_bf16_data_with_float32_scores(granularity):
    """Mixed dtypes: the mask compares in float32, dL/ds comes back in float32."""
    check_against_reference(CASE["stride2"], granularity, torch.bfloat16, scores_dtype=torch.float32)


def test_float64_and_gradcheck():
    """float64 end to end (mma.f64 on GPUs), and gradcheck of x, weight, bias (scores are a
    step function: kept away from t, checked against the STE formula above)."""
    check_against_reference(CASE["kernel2x3-dil"], "kernel", torch.float64)
    x = torch.randn(1, 2, 4, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    weight = torch.randn(3, 2, 2, 2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    scores = torch.tensor([0.9, -0.1, -0.8], dtype=torch.float64, device=DEVICE).view(3, 1, 1, 1)
    scores = scores * torch.tensor([1.0, -1.0], dtype=torch.float64, device=DEVICE).view(1, 2, 1, 1)

    def f(x, weight, bias):
        return C.masked_conv2d_igemm(x, weight, scores, 0.5, bias, stride=(2, 1), padding=1)

    assert torch.autograd.gradcheck(f, (x, weight, bias), fast_mode=True)


@pytest.mark.parametrize("penalized", ["input", "weight", "scores"])
def test_double_backward_matches_the_reference(penalized):
    """create_graph=True: a penalty on one first-order gradient, differentiated again, gives every second-order
    gradient the reference gives (the kernels' own backward op has no derivative; before, torch raised "no autograd
    formula")."""
    torch.manual_seed(3)
    x0 = torch.randn(2, 3, 6, 5, dtype=torch.float64, device=DEVICE)
    w0 = torch.randn(4, 3, 3, 3, dtype=torch.float64, device=DEVICE)
    s0 = torch.randn(4, 3, 3, 3, dtype=torch.float64, device=DEVICE)
    b0 = torch.randn(4, dtype=torch.float64, device=DEVICE)
    results = []
    for conv in (C.masked_conv2d_igemm, masked_conv2d_ref):
        x, w, s, b = (t.clone().requires_grad_() for t in (x0, w0, s0, b0))
        loss = conv(x, w, s, 0.6, b, stride=(2, 1), padding=1, dilation=(1, 2)).pow(2).sum()
        first = dict(zip(("input", "weight", "scores"), torch.autograd.grad(loss, (x, w, s), create_graph=True)))
        first[penalized].pow(2).sum().backward()
        results.append([t.grad for t in (x, w, s, b)])
    for name, got, want in zip(("x", "weight", "scores", "bias"), *results):
        assert (got is None) == (want is None), name
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=name)
    assert any(g is not None and g.abs().sum() > 0 for g in results[0])


@pytest.mark.parametrize("granularity", ("unstructured", "channel"))
def test_thresholds_minus_and_plus_inf(granularity):
    x, weight, scores, bias, conv = make_inputs(CASE["prime-nonsquare"], granularity, torch.float32)
    grad = torch.randn(2, 5, 7, 9, device=DEVICE)
    tensors = (x, weight, scores, bias)
    # -inf keeps every weight, zero scores included: the plain convolution
    out, grads = run(C.masked_conv2d_igemm, tensors, grad, -math.inf, conv)
    assert_fp32_close(out, F.conv2d(x.double(), weight.double(), bias.double(), **conv), "keep all")
    ref, ref_grads = reference(tensors, grad, -math.inf, conv)
    for name, a, b in zip(("x", "weight", "scores", "bias"), grads, ref_grads):
        assert_fp32_close(a, b, name)
    # +inf prunes everything: bias only, and no gradient reaches x or w (the STE still feeds s)
    out, grads = run(C.masked_conv2d_igemm, tensors, grad, math.inf, conv)
    assert_close(out, bias.view(1, -1, 1, 1).expand_as(out), **EXACT)
    assert not grads[0].any() and not grads[1].any()
    ref, ref_grads = reference(tensors, grad, math.inf, conv)
    assert_fp32_close(grads[2], ref_grads[2], "scores")


def test_bf16_threshold_tie_is_rounded_like_the_reference():
    """t = 0.3 compares as bf16 0.30078125 against bf16 scores: a score of exactly 0.30078125 is
    a tie and is pruned although it exceeds 0.3. A 1x1 conv of ones reads the mask back."""
    values = [0.30078125, -0.30078125, 0.298828125, 0.302734375, 0.0, -1.0, 2.0, 0.3]
    scores = torch.tensor(values, dtype=torch.bfloat16, device=DEVICE).view(8, 1, 1, 1)
    weight = torch.ones(8, 1, 1, 1, dtype=torch.bfloat16, device=DEVICE)
    x = torch.ones(1, 1, 2, 2, dtype=torch.bfloat16, device=DEVICE)
    t = torch.tensor(0.3, device=DEVICE)
    out = C.masked_conv2d_igemm(x, weight, scores, t)
    expected = (scores.abs() > t).to(torch.bfloat16).view(1, 8, 1, 1).expand(1, 8, 2, 2)
    assert_close(out, expected, **EXACT)
    assert_close(out, masked_conv2d_ref(x, weight, scores, t), **EXACT)


def test_bf16_rounding_identity():
    """One input pixel and channel: every output and dL/dw_eff entry is a single product of bf16
    values, exact in fp32, so the kernels must round it to bf16 exactly as torch does (round to
    nearest even), and dL/ds = round(g * w) * sign(s) then matches bit for bit."""
    x = torch.randn(1, 1, 1, 1, device=DEVICE).to(torch.bfloat16) * 1.337
    weight = torch.randn(64, 1, 1, 1, device=DEVICE).to(torch.bfloat16)
    scores = random_scores((64, 1, 1, 1), torch.bfloat16)
    grad = (torch.randn(1, 64, 1, 1, device=DEVICE) * 3.1).to(torch.bfloat16)
    conv = dict(stride=1, padding=0, dilation=1)
    out, grads = run(C.masked_conv2d_igemm, (x, weight, scores, None), grad, 0.5, conv)
    ref, ref_grads = run(masked_conv2d_ref, (x, weight, scores, None), grad, torch.tensor(0.5), conv)
    assert_close(out, ref, **EXACT)
    assert_close(grads[1], ref_grads[1], **EXACT)
    assert_close(grads[2], ref_grads[2], **EXACT)


def test_pruned_nan_weight_poisons_like_the_reference():
    x, weight, scores, _, conv = make_inputs(CASE["1x1"], "channel", torch.float32)
    scores[0] = 0.0  # channel 0 pruned...
    weight[0, 0] = float("nan")  # ...with a NaN weight: NaN * 0 = NaN in w * m
    out = C.masked_conv2d_igemm(x, weight, scores, 0.5, **conv)
    ref = masked_conv2d_ref(x, weight, scores, torch.tensor(0.5), **conv)
    assert out[:, 0].isnan().all() and ref[:, 0].isnan().all()
    assert_close(out, ref, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("trainable", ["scores", "weight"])
def test_stage_specific_gradients_and_function(trainable):
    """Stage 1 trains scores (x still needs its gradient, e.g. for a prompt), stage 2 weights;
    through MaskedConv2dIgemmFunction.apply with a Python-float threshold (no custom op)."""
    x, weight, scores, bias, conv = make_inputs(CASE["stride2"], "kernel", torch.float32)
    grad = torch.randn(2, 7, 4, 3, device=DEVICE)
    xs = x.clone().requires_grad_()
    w = weight.clone().requires_grad_(trainable == "weight")
    s = scores.clone().requires_grad_(trainable == "scores")
    out = C.MaskedConv2dIgemmFunction.apply(xs, w, s, 0.5, None, 2, 1, 1)
    out.backward(grad)
    _, ref_grads = reference((x, weight, scores, None), grad, 0.5, conv)
    assert (w.grad is None) == (trainable != "weight") and (s.grad is None) == (trainable != "scores")
    assert_fp32_close(xs.grad, ref_grads[0], "x")
    trained = w if trainable == "weight" else s
    assert_fp32_close(trained.grad, ref_grads[1 if trainable == "weight" else 2], trainable)


@pytest.mark.parametrize("granularity", ("unstructured", "kernel"))
def test_split_weight_gradient_and_determinism(granularity):
    """The weight-side reduction split in 3 (float32 partial sums, then masked_weight_bwd) equals
    the single pass; each is bit-identical when repeated."""
    x, weight, scores, _, conv = make_inputs(CASE["prime-nonsquare"], granularity, torch.float32)
    grad = torch.randn(2, 5, 7, 9, device=DEVICE)
    whole = C.masked_conv2d_bwd(grad, x, weight, scores, 0.5, **conv, weight_split=1)
    again = C.masked_conv2d_bwd(grad, x, weight, scores, 0.5, **conv, weight_split=1)
    split = C.masked_conv2d_bwd(grad, x, weight, scores, 0.5, **conv, need_input=False, weight_split=3)
    for a, b in zip(whole, again):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))
    assert split[0].numel() == 0
    for a, b in zip(whole[1:], split[1:]):
        assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_scores_broadcast_over_input_channels():
    """Scores [1, C_in, 1, 1] (not a trailing broadcast) are addressed with stride 0; autograd's
    expand backward sums their gradient."""
    x, weight, _, bias, conv = make_inputs(CASE["1x1"], "unstructured", torch.float32)
    scores = random_scores((1, 7, 1, 1), torch.float32)
    grad = torch.randn(2, 3, 5, 5, device=DEVICE)
    out, grads = run(C.masked_conv2d_igemm, (x, weight, scores, bias), grad, 0.5, conv)
    ref, ref_grads = reference((x, weight, scores, bias), grad, 0.5, conv)
    assert_fp32_close(out, ref)
    for name, a, b in zip(("x", "weight", "scores", "bias"), grads, ref_grads):
        assert_fp32_close(a, b, name)


# --------------------------------------------------------------------------- inference: skipped tiles

SPARSE = dict(BLOCK_M=64, GROUP_M=2)


@pytest.mark.parametrize("granularity", ["channel", "kernel", "unstructured"])
def test_sparse_tiles_skip_empty_tiles_exactly(granularity):
    """Block 16 x 16 tiles over C_out = 40 (3 column tiles) and K = 9 * C_in. Channel mask: C_out
    tile 0 and the tail 32..39 pruned; kernel mask: channels 0..15 of C_out tile 1 pruned, so
    its K tiles over those channels are empty; unstructured: two single weights kept, inside
    tiles, not at their first element. The result is bit-identical to the dense kernel with the
    same tiles, and matches the reference."""
    c_in = 5 if granularity == "channel" else 32
    x = torch.randn(2, c_in, 5, 4, device=DEVICE).to(memory_format=torch.channels_last)
    weight = torch.randn(40, c_in, 3, 3, device=DEVICE)
    scores = random_scores(score_shape(weight.shape, granularity), torch.float32).abs() + 1.0
    expected_kept = torch.ones(3, 9 * c_in // 16 + (9 * c_in % 16 > 0), dtype=torch.bool)  # [C_out tiles, K tiles]
    if granularity == "channel":
        scores[:16] = 0.0
        scores[32:] = 0.0
        expected_kept[0] = expected_kept[2] = False
    elif granularity == "kernel":
        scores[16:32, :16] = 0.0
        expected_kept[1, 0::2] = False  # K order (kh, kw, c_in): even tiles hold channels 0..15
    else:
        scores.zero_()
        expected_kept[:] = False
        scores[20, 3, 1, 2] = 1.0  # k = (1 * 3 + 2) * 32 + 3 = 163: K tile 10, C_out tile 1
        scores[39, 31, 2, 2] = -1.0  # k = 287: the last element of K tile 17, C_out tile 2
        expected_kept[1, 10] = expected_kept[2, 17] = True
    bias = torch.randn(40, device=DEVICE)
    tiles = C.prepare_sparse_tiles(weight, scores, 0.5, block_n=16, block_k=16)
    assert_close(tiles.flags.cpu(), expected_kept.t(), **EXACT)
    assert_close(tiles.tile_count.cpu(), expected_kept.sum(1, dtype=torch.int32), **EXACT)
    out = C.masked_conv2d_sparse(x, tiles, bias, padding=1, config=triton.Config(SPARSE))
    dense = C.masked_conv2d_fwd(x, weight, scores, 0.5, bias, padding=1,
                                config=triton.Config(dict(SPARSE, BLOCK_N=16, BLOCK_K=16)))
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, dense, **EXACT)
    assert_fp32_close(out, masked_conv2d_ref(x.double(), weight.double(), scores.double(),
                                             torch.tensor(0.5, dtype=torch.float64), bias.double(), padding=1))


def test_sparse_tiles_prune_all_and_guard():
    weight = torch.randn(20, 3, 3, 3, device=DEVICE)
    scores = random_scores((20, 1, 1, 1), torch.float32)
    x = torch.randn(1, 3, 6, 5, device=DEVICE)
    bias = torch.randn(20, device=DEVICE)
    tiles = C.prepare_sparse_tiles(weight, scores, math.inf)
    assert not tiles.flags.any() and tiles.kept_tile_fraction == 0.0
    out = C.masked_conv2d_sparse(x, tiles, bias, stride=2)
    assert_close(out, bias.view(1, -1, 1, 1).expand_as(out), **EXACT)
    # a pruned NaN weight keeps its tile: NaN * 0 = NaN, as in the reference
    weight[3, 0, 0, 0] = float("nan")
    assert C.prepare_sparse_tiles(weight, scores, math.inf).flags.any()
    with pytest.raises(ValueError, match="prepare the tiles again"):
        C.masked_conv2d_sparse(x, tiles, bias)  # weight changed in place since the tiles were made
    with pytest.raises(ValueError, match="block_k"):
        C.prepare_sparse_tiles(weight, scores, 0.5, block_k=24)


# --------------------------------------------------------------------------- errors

def test_bad_input_gives_clear_errors():
    x = torch.randn(2, 4, 6, 6, device=DEVICE)
    w = torch.randn(6, 4, 3, 3, device=DEVICE)
    s = torch.randn_like(w)
    with pytest.raises(ValueError, match="groups=2"):
        C.masked_conv2d_igemm(x, torch.randn(6, 2, 3, 3, device=DEVICE), torch.randn(6, 2, 3, 3, device=DEVICE),
                              0.5, groups=2)
    with pytest.raises(ValueError, match="groups=2"):
        C.masked_conv2d_sparse(x, C.prepare_sparse_tiles(w, s, 0.5), groups=2)
    with pytest.raises(ValueError, match="3 channels but the weight expects 4"):
        C.masked_conv2d_igemm(x[:, :3], w, s, 0.5)
    with pytest.raises(ValueError, match=r"x must be \[N, C_in, H, W\]"):
        C.masked_conv2d_igemm(x[0], w, s, 0.5)
    with pytest.raises(TypeError, match="share one of"):
        C.masked_conv2d_igemm(x.double(), w, s, 0.5)
    with pytest.raises(ValueError, match="padding='same'"):
        C.masked_conv2d_igemm(x, w, s, 0.5, padding="same")
    with pytest.raises(ValueError, match="stride and dilation"):
        C.masked_conv2d_igemm(x, w, s, 0.5, stride=0)
    with pytest.raises(ValueError, match="does not fit"):
        C.masked_conv2d_igemm(x, w, s, 0.5, dilation=4)
    with pytest.raises(ValueError, match="bias must be a"):
        C.masked_conv2d_igemm(x, w, s, 0.5, torch.randn(5, device=DEVICE))
    with pytest.raises(ValueError, match="leading dims"):
        C.masked_conv2d_fwd(x, w, torch.randn(6, 4, 3, device=DEVICE), 0.5)
    with pytest.raises(ValueError, match="grad must be"):
        C.masked_conv2d_bwd(torch.randn(2, 6, 5, 5, device=DEVICE), x, w, s, 0.5)


# --------------------------------------------------------------------------- torch.compile

def test_torch_compile_fullgraph_and_opcheck():
    """Traced as one opaque custom op (aot_eager: no inductor codegen, quick on CPU)."""
    x, weight, scores, bias, conv = make_inputs(CASE["1x1"], "channel", torch.float32)
    t = torch.tensor(0.5, device=DEVICE)
    torch.library.opcheck(torch.ops.vpns_fast.masked_conv2d_igemm.default,
                          (x, weight, scores, t, bias, [1, 1], [0, 0], [1, 1]),
                          test_utils=("test_schema", "test_faketensor"))

    def step(x, weight, scores, bias):
        return C.masked_conv2d_igemm(x, weight, scores, t, bias, **conv).square().sum()

    leaves = [v.clone().requires_grad_() for v in (x, weight, scores, bias)]
    loss = torch.compile(step, backend="aot_eager", fullgraph=True)(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    ref_loss = step(*leaves)
    ref_grads = torch.autograd.grad(ref_loss, leaves)
    assert_close(loss, ref_loss, **EXACT)
    for a, b in zip(grads, ref_grads):
        assert_close(a, b, **EXACT)


# --------------------------------------------------------------------------- CUDA only

def test_tf32_follows_the_cudnn_flag(cuda_or_skip):
    x, weight, scores, bias, conv = make_inputs(CASE["channel-tiles"], "unstructured", torch.float32)
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    assert C.conv_allows_tf32()
    out = C.masked_conv2d_igemm(x, weight, scores, 0.5, bias, **conv)
    ref = masked_conv2d_ref(x.double(), weight.double(), scores.double(), torch.tensor(0.5).double(), bias.double(),
                            **conv)
    assert_close(out.double(), ref, rtol=5e-3, atol=5e-3 * ref.abs().max().item())  # 10-bit mantissa
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    assert not C.conv_allows_tf32()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_resnet_layer_shape_cuda(dtype, cuda_or_skip):
    """layer1.0.conv1 of ResNet-18 (64 -> 64, 3x3, 56x56), channels_last, through the autotuner."""
    x = torch.randn(8, 64, 56, 56, device="cuda").to(dtype).to(memory_format=torch.channels_last)
    weight = torch.randn(64, 64, 3, 3, device="cuda").to(dtype)
    scores = torch.randn(64, 64, 3, 3, device="cuda").to(dtype)
    check = (x, weight, scores, None)
    grad = torch.randn(8, 64, 56, 56, device="cuda").to(dtype)
    out, grads = run(C.masked_conv2d_igemm, check, grad, 0.7, dict(stride=1, padding=1, dilation=1))
    ref, ref_grads = reference(check, grad, 0.7, dict(stride=1, padding=1, dilation=1))
    tol = (lambda r: dict(rtol=1e-4, atol=1e-5 * r.abs().max().item())) if dtype == torch.float32 else \
        (lambda r: dict(rtol=2e-2, atol=4 * ULP[dtype] * r.abs().max().item()))
    for a, b in zip((out, *grads[:3]), (ref, *ref_grads[:3])):
        assert_close(a.double(), b, **tol(b))


def test_int32_offsets_are_checked_on_the_reach_of_strided_views():
    """A small view of a huge tensor can reach offsets beyond 2**31: the geometry check (run
    before every launch) refuses it. Meta tensors: no memory behind the 2**31 elements."""
    huge = torch.empty(2**31 + 16, device="meta")
    x = huge.as_strided((2, 1, 3, 3), (2**31, 9, 3, 1))  # 18 elements, the last at offset 2**31 + 8
    w = torch.empty(1, 1, 1, 1, device="meta")
    with pytest.raises(ValueError, match="x reaches offset"):
        C._conv_geometry(x, w, w, None, 1, 0, 1)
    C._conv_geometry(huge.as_strided((2, 1, 3, 3), (9, 9, 3, 1)), w, w, None, 1, 0, 1)  # a small reach is fine


def test_int_pair_takes_what_conv2d_takes():
    """Conv geometry arguments as F.conv2d takes them (also numpy and 0-d tensor integers), and the rest refused."""
    import numpy as np

    from vpns_fast.kernels._common import int_pair

    for value, pair in ((2, (2, 2)), ([3], (3, 3)), ((1, 2), (1, 2)), (np.int64(2), (2, 2)),
                        (torch.tensor(4), (4, 4)), ([np.int32(1), 5], (1, 5))):
        assert int_pair(value, "stride") == pair
    for bad in (2.0, (1, 2, 3), (1.5, 1)):
        with pytest.raises(ValueError, match="stride must be an int or a pair of ints"):
            int_pair(bad, "stride")
    with pytest.raises(ValueError, match="string stride"):
        int_pair("same", "stride")

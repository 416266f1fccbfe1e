"""Masked convolution as a Triton implicit GEMM that never materialises ``w * m``.

``y = conv2d(x, w * m) + b`` with ``m = |s| > t``, the straight-through estimator (STE) backward
of :class:`vpns_fast.kernels.masked.MaskedWeightFunction`, groups = 1. The reference is
:func:`vpns_fast.kernels.masked.masked_conv2d_ref` (``F.conv2d`` of the masked weight); the tests
compare against it.

Three kernels, each an implicit GEMM with fp32 accumulation (fp64 for fp64 data) by ``tl.dot``:

* forward ``_masked_conv2d_fwd_kernel``: rows are output pixels (M = N*OH*OW), columns output
  channels (C_out), reduction K = C_in*KH*KW. The im2col tile is gathered from x on the fly and
  the weight tile is masked with ``|s| > t`` as it is loaded; bias is added in the epilogue.
  With ``SKIP_TILES`` (inference, fixed mask) the K loop walks a per-column-tile list of the
  K tiles that keep at least one weight (:func:`prepare_sparse_tiles`).
* input gradient ``_masked_conv2d_bwd_input_kernel``: rows are input pixels (N*H*W), columns
  C_in, reduction C_out*KH*KW over the masked weight. For stride > 1 an output position
  contributes to an input pixel only where ``ih + pad - kh*dil`` is a multiple of the stride;
  the other lanes are masked out (for stride 2 three quarters of the reduction lanes are
  masked: correct, not optimal; a per-phase decomposition would skip them).
* weight-side gradient ``_masked_conv2d_bwd_weight_kernel``: ``dL/dw_eff[C_out, K] =
  grad_out^T @ im2col(x)``, reduction over N*OH*OW, optionally split over that reduction into
  fp32 partial sums (summed by torch: deterministic, no float atomics). For unstructured scores
  and no split the STE runs in the epilogue (``dL/dw = g*m``, ``dL/ds = g*w*sign(s)``); otherwise
  ``dL/dw_eff`` goes to :func:`~vpns_fast.kernels.masked.masked_weight_bwd`, which reduces the
  score gradient of each kernel / channel group deterministically.

Design decisions:

* K order is (kh, kw, c), channels innermost: a channels_last input is then contiguous along K,
  an NCHW input along M (consecutive ow). Every tensor is addressed through its strides, so
  NCHW and channels_last inputs, any weight layout and broadcast scores (stride 0) need no copy.
  The output (and dL/dx) takes the input's memory format, as ``F.conv2d`` does.
* Channel-run tiles (``CHANNEL_TILES``, when the channel count of the gathered operand is a
  multiple of BLOCK_K; BLOCK_K is therefore one value per kernel's config list): a K tile then
  lies in one (kh, kw), the bounds checks are per row and the channels a contiguous, aligned
  run. Compile-only check (triton 3.8, sm_90 / sm_80 PTX): with channels_last x and weight
  (as ``model.to(memory_format=torch.channels_last)`` leaves them) the 16-bit gathers become
  16-byte ``cp.async``; without channel-run tiles, or for NCHW, 16-bit gathers are scalar 2-byte
  loads. An OIHW weight is gathered along K with stride KH*KW. Speed of either: not yet measured.
* Mask identity: the same rules as kernels/masked.py (``_threshold_values``): t is rounded to
  the scores' dtype, then ``|s|`` and t are compared exactly in float32 (float64 when weight or
  scores are float64). A pruned weight is replaced by ``w * 0`` (not 0), so a pruned NaN / inf
  weight still poisons the output exactly as ``F.conv2d(x, w * m)`` does.
* TF32 rule for float32 data: tensor cores in TF32 iff cuDNN convolutions may use TF32
  (``torch.backends.cudnn.conv.fp32_precision`` / legacy ``torch.backends.cudnn.allow_tf32``,
  default on), because this kernel stands in for the cuDNN conv of the reference and must not
  change numerics when dispatch switches between them. Otherwise IEEE fp32.
* 16-bit data: native bf16 / fp16 ``tl.dot`` with fp32 accumulation. Under the Triton
  interpreter bf16 operands are widened to fp32 first (the interpreter multiplies bf16 bit
  patterns as integers); products of two bf16 values are exact in fp32, so this is the same
  math. Outputs are rounded to bf16 with round-to-nearest-even on the fp32 bits
  (``masked._round_to``), as the interpreter's own cast truncates.
* Gradient rounding identity: dL/dw_eff is rounded to the weight's dtype before the STE (the
  reference's conv backward returns it in that dtype), then the STE rounds like masked.py.
* Tile configs are autotuned over a short list keyed on the GEMM sizes: starting points in the
  range public Triton GEMM / conv kernels use, not yet re-chosen from GPU measurements. Whether
  this kernel or fused mask + cuDNN runs is decided per shape by measurement
  (vpns_fast/ops/conv_dispatch.py). Under the interpreter one small config is used. The split of
  the weight-gradient reduction (when there are fewer output tiles than SMs) is a heuristic,
  also not yet measured.
* Offsets are int32: every tensor must have fewer than 2**31 elements.
"""
from __future__ import annotations

import dataclasses
import os

import torch

from vpns_fast.kernels._common import (
    MAX_INT32_OFFSET,
    TRITON_INTERPRETED,
    int_pair,
    memory_format_of,
)
from vpns_fast.kernels._library import custom_op
from vpns_fast.kernels._triton import HAS_TRITON, tl, triton
from vpns_fast.kernels.masked import (
    _ROUND_BF16,
    _ROUND_NONE,
    _as_threshold_tensor,
    _check_pair,
    _compute_dtype,
    _round_code,
    _round_to,
    _threshold_values,
    _times_sign,
    _tl_dtype,
    expand_ungrouped_scores,
    masked_conv2d_ref,
    masked_weight_bwd,
    masked_weight_ref,
    score_mask_ref,
)

__all__ = ["masked_conv2d_ref", "masked_conv2d_fwd", "masked_conv2d_bwd", "masked_conv2d_igemm",
           "MaskedConv2dIgemmFunction", "prepare_sparse_tiles", "MaskedConvTiles", "masked_conv2d_sparse"]

# --------------------------------------------------------------------------- tile configs
# Starting points in the range public Triton GEMM / conv kernels use, to be re-chosen from
# measurements on the target GPU.


def _configs(options):
    return [triton.Config(kwargs, num_warps=warps, num_stages=stages) for kwargs, warps, stages in options]


if TRITON_INTERPRETED:  # one small config: interpreted programs cost per op, not per element
    _FWD_OPTIONS = [(dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=32, GROUP_M=2), 4, 1)]
    _SPARSE_OPTIONS = [(dict(BLOCK_M=64, GROUP_M=2), 4, 1)]
    _BWD_INPUT_OPTIONS = [(dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=32, GROUP_M=2), 4, 1)]
    _BWD_WEIGHT_OPTIONS = [(dict(BLOCK_CO=16, BLOCK_K=32, BLOCK_P=64), 4, 1)]
    _SPARSE_BLOCK_N, _SPARSE_BLOCK_K = 16, 16
else:
    _FWD_OPTIONS = [
        (dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8), 8, 3),
        (dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8), 4, 4),
        (dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8), 4, 4),
        (dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8), 4, 3),
        (dict(BLOCK_M=128, BLOCK_N=32, BLOCK_K=32, GROUP_M=8), 4, 4),  # narrow layers (C_out <= 32)
    ]
    _SPARSE_OPTIONS = [(dict(BLOCK_M=128, GROUP_M=8), 8, 3), (dict(BLOCK_M=128, GROUP_M=8), 4, 4),
                       (dict(BLOCK_M=64, GROUP_M=8), 4, 4)]
    _BWD_INPUT_OPTIONS = _FWD_OPTIONS[:4]
    _BWD_WEIGHT_OPTIONS = [
        (dict(BLOCK_CO=128, BLOCK_K=64, BLOCK_P=32), 8, 3),
        (dict(BLOCK_CO=128, BLOCK_K=64, BLOCK_P=64), 8, 3),
        (dict(BLOCK_CO=64, BLOCK_K=64, BLOCK_P=32), 4, 4),
        (dict(BLOCK_CO=64, BLOCK_K=64, BLOCK_P=64), 4, 3),
    ]
    _SPARSE_BLOCK_N, _SPARSE_BLOCK_K = 64, 32
    if os.environ.get("VPNS_FAST_IGEMM_AUTOTUNE", "1") == "0":
        # The first config of each list, no autotuning: for native test runs, where autotuning
        # would compile and time every config for every new shape (bench/gpu_session.sh sets it).
        _FWD_OPTIONS, _SPARSE_OPTIONS = _FWD_OPTIONS[:1], _SPARSE_OPTIONS[:1]
        _BWD_INPUT_OPTIONS, _BWD_WEIGHT_OPTIONS = _BWD_INPUT_OPTIONS[:1], _BWD_WEIGHT_OPTIONS[:1]

FWD_CONFIGS = _configs(_FWD_OPTIONS)
SPARSE_FWD_CONFIGS = _configs(_SPARSE_OPTIONS)
BWD_INPUT_CONFIGS = _configs(_BWD_INPUT_OPTIONS)
BWD_WEIGHT_CONFIGS = _configs(_BWD_WEIGHT_OPTIONS)


def _shared_block_k(options) -> int:
    """BLOCK_K of a config list: one value per list, so the host can decide CHANNEL_TILES
    (C % BLOCK_K == 0) before the autotuner picks a config."""
    values = {kwargs["BLOCK_K"] for kwargs, _, _ in options}
    assert len(values) == 1, f"configs of one kernel must share BLOCK_K, got {values}"
    return values.pop()


_FWD_BLOCK_K = _shared_block_k(_FWD_OPTIONS)
_BWD_INPUT_BLOCK_K = _shared_block_k(_BWD_INPUT_OPTIONS)
_BWD_WEIGHT_BLOCK_K = _shared_block_k(_BWD_WEIGHT_OPTIONS)


# --------------------------------------------------------------------------- Triton kernels

@triton.jit
def _tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped ordering of output tiles (GROUP_M row tiles share column tiles while in L2)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_m, (pid % per_group) // group_m


@triton.jit
def _pixels(offs, OH, OW):
    """(n, row, col) of flattened pixel indices."""
    n = offs // (OH * OW)
    r = offs % (OH * OW)
    return n, r // OW, r % OW


@triton.jit
def _k_tile(k0, K, C, KW, BLOCK_K: tl.constexpr, CHANNEL_TILES: tl.constexpr):
    """(c, kh, kw, k_ok) of reduction indices k0 .. k0 + BLOCK_K in (kh, kw, c) order, channels
    innermost. CHANNEL_TILES (C % BLOCK_K == 0): the tile lies in one (kh, kw), so kh and kw are
    scalars and c a contiguous run, which lets loads along c vectorise."""
    if CHANNEL_TILES:
        r = k0 // C
        c = tl.multiple_of(k0 % C, BLOCK_K) + tl.arange(0, BLOCK_K)  # k0 and C are multiples of BLOCK_K
        kh = r // KW
        kw = r % KW
        k_ok = tl.full([BLOCK_K], 1, tl.int1)
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        r = offs_k // C
        c = offs_k % C
        kh = r // KW
        kw = r % KW
        k_ok = offs_k < K
    return c, kh, kw, k_ok


@triton.jit
def _im2col_tile(x_ptr, n, oh, ow, row_ok, ci, kh, kw, k_ok, H, W,
                 stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, sx_n, sx_c, sx_h, sx_w,
                 CHANNEL_TILES: tl.constexpr):
    """[rows, BLOCK_K] tile of im2col(x), zero outside the image (the padding)."""
    if CHANNEL_TILES:  # one (kh, kw): the bounds check is per row
        ih = oh * stride_h - pad_h + kh * dil_h
        iw = ow * stride_w - pad_w + kw * dil_w
        ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        offs = (n * sx_n + ih * sx_h + iw * sx_w)[:, None] + ci[None, :] * sx_c
        tile = tl.load(x_ptr + offs, mask=ok[:, None], other=0.0)
    else:
        ih = oh[:, None] * stride_h - pad_h + kh[None, :] * dil_h
        iw = ow[:, None] * stride_w - pad_w + kw[None, :] * dil_w
        ok = row_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        offs = n[:, None] * sx_n + ci[None, :] * sx_c + ih * sx_h + iw * sx_w
        tile = tl.load(x_ptr + offs, mask=ok, other=0.0)
    return tile


@triton.jit
def _grad_out_tile(go_ptr, n, ih, iw, row_ok, co, kh, kw, k_ok, OH, OW,
                   stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, sg_n, sg_c, sg_h, sg_w,
                   CHANNEL_TILES: tl.constexpr):
    """[rows, BLOCK_K] tile of grad_out[n, co, oh, ow] for input pixels (ih, iw): the output
    position with ``oh * stride = ih + pad - kh * dil`` (zero where there is none, e.g. between
    strided positions). Operands of // and % are made non-negative first: the interpreter
    (numpy) floors, the GPU truncates."""
    if CHANNEL_TILES:
        oh_num = ih + pad_h - kh * dil_h
        ow_num = iw + pad_w - kw * dil_w
        oh = tl.maximum(oh_num, 0) // stride_h
        ow = tl.maximum(ow_num, 0) // stride_w
        ok = (row_ok & (oh_num >= 0) & (ow_num >= 0) & (oh * stride_h == oh_num) & (ow * stride_w == ow_num)
              & (oh < OH) & (ow < OW))
        offs = (n * sg_n + oh * sg_h + ow * sg_w)[:, None] + co[None, :] * sg_c
        tile = tl.load(go_ptr + offs, mask=ok[:, None], other=0.0)
    else:
        oh_num = ih[:, None] + pad_h - kh[None, :] * dil_h
        ow_num = iw[:, None] + pad_w - kw[None, :] * dil_w
        oh = tl.maximum(oh_num, 0) // stride_h
        ow = tl.maximum(ow_num, 0) // stride_w
        ok = (row_ok[:, None] & k_ok[None, :] & (oh_num >= 0) & (ow_num >= 0) & (oh * stride_h == oh_num)
              & (ow * stride_w == ow_num) & (oh < OH) & (ow < OW))
        offs = n[:, None] * sg_n + co[None, :] * sg_c + oh * sg_h + ow * sg_w
        tile = tl.load(go_ptr + offs, mask=ok, other=0.0)
    return tile


@triton.jit
def _masked_weight_tile(w_ptr, s_ptr, t, w_offs, s_offs, ok, COMPUTE: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """Weight tile with the mask applied on load: ``w`` where ``|s| > t``, else ``w * 0``."""
    w = tl.load(w_ptr + w_offs, mask=ok, other=0.0)
    if DOT_UPCAST:
        w = w.to(tl.float32)
    s = tl.load(s_ptr + s_offs, mask=ok, other=0.0).to(COMPUTE)
    return tl.where(tl.abs(s) > t, w, w * 0.0)


@triton.jit
def _masked_conv2d_fwd_kernel(
        x_ptr, w_ptr, s_ptr, t_ptr, bias_ptr, out_ptr, tile_list_ptr, tile_count_ptr,
        M, C_out, K, C_in, H, W, OH, OW, KW,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        sx_n, sx_c, sx_h, sx_w, sw_o, sw_i, sw_h, sw_w, ss_o, ss_i, ss_h, ss_w, so_n, so_c, so_h, so_w,
        HAS_BIAS: tl.constexpr, SKIP_TILES: tl.constexpr, CHANNEL_SCORES: tl.constexpr, CHANNEL_TILES: tl.constexpr,
        COMPUTE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
        OUT_ROUND: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, C_out, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    co_ok = co < C_out
    n, oh, ow = _pixels(offs_m, OH, OW)
    t = tl.load(t_ptr)
    if CHANNEL_SCORES:  # one score per output channel: the keep flags are loaded once
        keep_co = tl.abs(tl.load(s_ptr + co * ss_o, mask=co_ok, other=0.0).to(COMPUTE)) > t
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    if SKIP_TILES:
        num_k_tiles = tl.cdiv(K, BLOCK_K)
        count = tl.load(tile_count_ptr + pid_n)
    else:
        count = tl.cdiv(K, BLOCK_K)
    for i in range(0, count):
        if SKIP_TILES:
            k_tile = tl.load(tile_list_ptr + pid_n * num_k_tiles + i)
        else:
            k_tile = i
        ci, kh, kw, k_ok = _k_tile(k_tile * BLOCK_K, K, C_in, KW, BLOCK_K, CHANNEL_TILES)
        a = _im2col_tile(x_ptr, n, oh, ow, m_ok, ci, kh, kw, k_ok, H, W,
                         stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, sx_n, sx_c, sx_h, sx_w, CHANNEL_TILES)
        w_offs = (ci * sw_i + kh * sw_h + kw * sw_w)[:, None] + co[None, :] * sw_o
        b_ok = k_ok[:, None] & co_ok[None, :]
        if CHANNEL_SCORES:
            b = tl.load(w_ptr + w_offs, mask=b_ok, other=0.0)
            if DOT_UPCAST:
                b = b.to(tl.float32)
            b = tl.where(keep_co[None, :], b, b * 0.0)
        else:
            s_offs = (ci * ss_i + kh * ss_h + kw * ss_w)[:, None] + co[None, :] * ss_o
            b = _masked_weight_tile(w_ptr, s_ptr, t, w_offs, s_offs, b_ok, COMPUTE, DOT_UPCAST)
        if DOT_UPCAST:
            a = a.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + co, mask=co_ok, other=0.0).to(ACC)[None, :]
    out_offs = (n * so_n + oh * so_h + ow * so_w)[:, None] + co[None, :] * so_c
    tl.store(out_ptr + out_offs, _round_to(acc, OUT_ROUND), mask=m_ok[:, None] & co_ok[None, :])


@triton.jit
def _masked_conv2d_bwd_input_kernel(
        go_ptr, w_ptr, s_ptr, t_ptr, gx_ptr,
        M, C_in, K, C_out, H, W, OH, OW, KW,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        sg_n, sg_c, sg_h, sg_w, sw_o, sw_i, sw_h, sw_w, ss_o, ss_i, ss_h, ss_w, sx_n, sx_c, sx_h, sx_w,
        CHANNEL_TILES: tl.constexpr, COMPUTE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
        DOT_UPCAST: tl.constexpr, OUT_ROUND: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """dL/dx[n, ci, ih, iw] = sum over (kh, kw, co) of grad_out[n, co, oh, ow] * w_eff[co, ci, kh, kw]
    where ``oh * stride = ih + pad - kh * dil`` (and likewise for w)."""
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, C_in, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ci = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    ci_ok = ci < C_in
    n, ih, iw = _pixels(offs_m, H, W)
    t = tl.load(t_ptr)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        co, kh, kw, k_ok = _k_tile(k0, K, C_out, KW, BLOCK_K, CHANNEL_TILES)
        a = _grad_out_tile(go_ptr, n, ih, iw, m_ok, co, kh, kw, k_ok, OH, OW,
                           stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, sg_n, sg_c, sg_h, sg_w, CHANNEL_TILES)
        w_offs = (co * sw_o + kh * sw_h + kw * sw_w)[:, None] + ci[None, :] * sw_i
        s_offs = (co * ss_o + kh * ss_h + kw * ss_w)[:, None] + ci[None, :] * ss_i
        b = _masked_weight_tile(w_ptr, s_ptr, t, w_offs, s_offs, k_ok[:, None] & ci_ok[None, :], COMPUTE, DOT_UPCAST)
        if DOT_UPCAST:
            a = a.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)
    gx_offs = (n * sx_n + ih * sx_h + iw * sx_w)[:, None] + ci[None, :] * sx_c
    tl.store(gx_ptr + gx_offs, _round_to(acc, OUT_ROUND), mask=m_ok[:, None] & ci_ok[None, :])


@triton.jit
def _masked_conv2d_bwd_weight_kernel(
        go_ptr, x_ptr, w_ptr, s_ptr, t_ptr, g_ptr, gw_ptr, gs_ptr,
        P, C_out, K, C_in, H, W, OH, OW, KH, KW, p_per_split, split_stride,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        sg_n, sg_c, sg_h, sg_w, sx_n, sx_c, sx_h, sx_w, sw_o, sw_i, sw_h, sw_w, ss_o, ss_i, ss_h, ss_w,
        STE_EPILOGUE: tl.constexpr, NEED_W: tl.constexpr, NEED_S: tl.constexpr, CHANNEL_TILES: tl.constexpr,
        COMPUTE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
        G_ROUND: tl.constexpr, W_ROUND: tl.constexpr, S_ROUND: tl.constexpr,
        BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr):
    """dL/dw_eff[co, (kh, kw, ci)] = sum over pixels p of grad_out[p, co] * im2col(x)[p, k], over
    pixels ``[split * p_per_split, (split + 1) * p_per_split)`` (program axis 1).

    STE_EPILOGUE (unstructured scores, one split): write dL/dw = g * m and dL/ds = g * w * sign(s)
    with g rounded to the weight's dtype. Otherwise write g (rounded with G_ROUND) at
    ``g_ptr + split * split_stride``, contiguous [C_out, C_in, KH, KW]."""
    num_k = tl.cdiv(K, BLOCK_K)
    pid_co = tl.program_id(0) // num_k
    pid_k = tl.program_id(0) % num_k
    split = tl.program_id(1)
    co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_ok = co < C_out
    ci, kh, kw, k_ok = _k_tile(pid_k * BLOCK_K, K, C_in, KW, BLOCK_K, CHANNEL_TILES)
    acc = tl.zeros([BLOCK_CO, BLOCK_K], dtype=ACC)
    p_start = split * p_per_split
    p_end = tl.minimum(p_start + p_per_split, P)
    for p0 in range(p_start, p_end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        p_ok = offs_p < p_end
        n, oh, ow = _pixels(offs_p, OH, OW)
        g_offs = co[:, None] * sg_c + (n * sg_n + oh * sg_h + ow * sg_w)[None, :]
        a = tl.load(go_ptr + g_offs, mask=co_ok[:, None] & p_ok[None, :], other=0.0)
        b = _im2col_tile(x_ptr, n, oh, ow, p_ok, ci, kh, kw, k_ok, H, W,
                         stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, sx_n, sx_c, sx_h, sx_w, CHANNEL_TILES)
        if DOT_UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)
    ok = co_ok[:, None] & k_ok[None, :]
    # weight-shaped (contiguous [C_out, C_in, KH, KW]) offsets of the tile
    offs = co[:, None] * K + (ci * (KH * KW) + kh * KW + kw)[None, :]
    if STE_EPILOGUE:
        t = tl.load(t_ptr)
        g = _round_to(acc.to(COMPUTE), W_ROUND)
        s_offs = co[:, None] * ss_o + (ci * ss_i + kh * ss_h + kw * ss_w)[None, :]
        s = tl.load(s_ptr + s_offs, mask=ok, other=0.0).to(COMPUTE)
        if NEED_W:
            tl.store(gw_ptr + offs, tl.where(tl.abs(s) > t, g, g * 0.0), mask=ok)
        if NEED_S:
            w_offs = co[:, None] * sw_o + (ci * sw_i + kh * sw_h + kw * sw_w)[None, :]
            w = tl.load(w_ptr + w_offs, mask=ok, other=0.0).to(COMPUTE)
            tl.store(gs_ptr + offs, _round_to(_times_sign(_round_to(g * w, W_ROUND), s), S_ROUND), mask=ok)
    else:
        tl.store(g_ptr + split * split_stride + offs, _round_to(acc, G_ROUND), mask=ok)


if HAS_TRITON:
    # Keys: the GEMM sizes, plus what changes the best tile without changing them: the layout of
    # the gathered operands (a channel stride of 1 is channels_last), channel-run tiles and the
    # dot precision (IEEE vs TF32); dtypes are part of triton's own key.
    _LAYOUT_KEY = ["CHANNEL_TILES", "PRECISION"]
    _fwd_autotuned = triton.autotune(FWD_CONFIGS, key=["M", "C_out", "K", "sx_c", "sw_i", *_LAYOUT_KEY])(
        _masked_conv2d_fwd_kernel)
    _sparse_fwd_autotuned = triton.autotune(SPARSE_FWD_CONFIGS, key=["M", "C_out", "K", "sx_c", "sw_i",
                                                                     *_LAYOUT_KEY])(_masked_conv2d_fwd_kernel)
    _bwd_input_autotuned = triton.autotune(BWD_INPUT_CONFIGS, key=["M", "C_in", "K", "sg_c", "sw_o",
                                                                   *_LAYOUT_KEY])(_masked_conv2d_bwd_input_kernel)
    _bwd_weight_autotuned = triton.autotune(BWD_WEIGHT_CONFIGS, key=["P", "C_out", "K", "sg_c", "sx_c",
                                                                     *_LAYOUT_KEY])(_masked_conv2d_bwd_weight_kernel)


def _launch(autotuned, grid, args, meta, config):
    """``autotuned[grid](...)``, or the plain kernel with one given ``triton.Config`` (compile
    checks and benchmarks pin configs; see tests/triton_aot.py)."""
    if config is None:
        autotuned[grid](*args, **meta)
    else:
        autotuned.fn[grid](*args, **meta, **config.all_kwargs())


# --------------------------------------------------------------------------- launchers

_CONV_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def conv_allows_tf32() -> bool:
    """Whether cuDNN convolutions may use TF32: the rule this kernel follows for float32 data."""
    getter = getattr(torch._C, "_get_fp32_precision_getter", None)
    if getter is None:  # torch without the fp32_precision API
        return bool(torch.backends.cudnn.allow_tf32)
    for backend, op in (("cuda", "conv"), ("cuda", "all"), ("generic", "all")):  # "none" inherits
        precision = getter(backend, op)
        if precision != "none":
            return precision == "tf32"
    return False


@dataclasses.dataclass(frozen=True)
class _Geometry:
    n: int
    c_in: int
    h: int
    w: int
    c_out: int
    kh: int
    kw: int
    oh: int
    ow: int
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    group: int  # weight elements per score


def _max_offset(t: torch.Tensor) -> int:
    """The largest element offset a tensor's strides reach (its numel - 1 when contiguous)."""
    return sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()) if size > 0)


def _conv_geometry(x, weight, scores, bias, stride, padding, dilation, groups=1) -> _Geometry:
    """Validate the arguments (shapes only: also runs on fake tensors) and size the output."""
    if groups != 1:
        raise ValueError(f"groups={groups} is not supported by the implicit-GEMM masked conv (groups=1 only); "
                         f"use the fused mask kernel + F.conv2d path for grouped convolutions")
    for name, t in (("x", x), ("weight", weight), ("scores", scores)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"masked_conv2d_igemm: {name} must be a tensor, got {type(t).__name__}")
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"masked_conv2d_igemm: x must be [N, C_in, H, W] and weight [C_out, C_in, KH, KW], "
                         f"got x {tuple(x.shape)} and weight {tuple(weight.shape)}")
    if x.dtype not in _CONV_DTYPES or x.dtype != weight.dtype:
        raise TypeError(f"masked_conv2d_igemm: x and weight must share one of float16, bfloat16, float32, "
                        f"float64, got x {x.dtype} and weight {weight.dtype}")
    if x.device != weight.device:
        raise ValueError(f"masked_conv2d_igemm: x is on {x.device} but the weight is on {weight.device}")
    group = _check_pair(weight, scores, "masked_conv2d_igemm")
    n, c_in, h, w = x.shape
    c_out, w_in, kh, kw = weight.shape
    if w_in != c_in:
        raise ValueError(f"masked_conv2d_igemm: x has {c_in} channels but the weight expects {w_in} "
                         f"(x {tuple(x.shape)}, weight {tuple(weight.shape)})")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (c_out,) or bias.dtype != x.dtype \
                or bias.device != x.device:
            raise ValueError(f"masked_conv2d_igemm: bias must be a [{c_out}] {x.dtype} tensor on {x.device}, got "
                             f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
    stride, padding, dilation = (int_pair(v, name) for v, name in
                                 ((stride, "stride"), (padding, "padding"), (dilation, "dilation")))
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"masked_conv2d_igemm: stride and dilation must be >= 1 and padding >= 0, got "
                         f"stride={stride}, padding={padding}, dilation={dilation}")
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"masked_conv2d_igemm: the {kh}x{kw} kernel (dilation {dilation}) does not fit the "
                         f"padded {h}x{w} input (padding {padding}): output would be {oh}x{ow}")
    # Offsets are computed from strides in int32: what must fit is the largest offset reached
    # (a strided view of a huge tensor can be small yet reach far), and the output's size.
    for name, extent in (("x", _max_offset(x)), ("weight", _max_offset(weight)), ("scores", _max_offset(scores)),
                         ("output", n * c_out * oh * ow)):
        if extent > MAX_INT32_OFFSET:
            raise ValueError(f"masked_conv2d_igemm: {name} reaches offset {extent}; offsets are int32 (< 2**31)")
    return _Geometry(n, c_in, h, w, c_out, kh, kw, oh, ow, stride, padding, dilation, group)


def _new_like_input(x, shape):
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=memory_format_of(x))


def _kernel_options(x, weight, scores):
    """(COMPUTE, ACC, PRECISION, DOT_UPCAST) constexprs for the data dtypes."""
    compute = _tl_dtype(_compute_dtype(weight.dtype, scores.dtype))
    if x.dtype == torch.float64:
        return compute, tl.float64, "ieee", False
    if x.dtype == torch.float32:
        return compute, tl.float32, "tf32" if conv_allows_tf32() else "ieee", False
    upcast = TRITON_INTERPRETED and x.dtype == torch.bfloat16
    return compute, tl.float32, "ieee", upcast


def _expanded_scores(weight, scores):
    """Scores with the weight's shape (stride 0 on broadcast dims): addressed like the weight."""
    return scores.expand(weight.shape)


def _fwd_launch(x, weight, scores, threshold, bias, geo: _Geometry, tiles=None, config=None):
    compute, acc, precision, upcast = _kernel_options(x, weight, scores)
    t = _threshold_values(threshold, scores.dtype, _compute_dtype(weight.dtype, scores.dtype), weight.device)
    out = _new_like_input(x, (geo.n, geo.c_out, geo.oh, geo.ow))
    if out.numel() == 0:
        return out
    m, k = geo.n * geo.oh * geo.ow, geo.c_in * geo.kh * geo.kw
    channel_scores = geo.group == geo.c_in * geo.kh * geo.kw and geo.group > 1
    s_full = _expanded_scores(weight, scores)
    args = (x, weight, s_full, t, x if bias is None else bias, out,
            t if tiles is None else tiles.tile_list, t if tiles is None else tiles.tile_count,
            m, geo.c_out, k, geo.c_in, geo.h, geo.w, geo.oh, geo.ow, geo.kw,
            *geo.stride, *geo.padding, *geo.dilation,
            *x.stride(), *weight.stride(), *s_full.stride(), *out.stride())
    block_k = tiles.block_k if tiles is not None else config.kwargs["BLOCK_K"] if config is not None \
        else _FWD_BLOCK_K
    meta = dict(HAS_BIAS=bias is not None, SKIP_TILES=tiles is not None, CHANNEL_SCORES=channel_scores,
                CHANNEL_TILES=geo.c_in % block_k == 0, COMPUTE=compute, ACC=acc, PRECISION=precision,
                DOT_UPCAST=upcast, OUT_ROUND=_ROUND_BF16 if x.dtype == torch.bfloat16 else _ROUND_NONE)
    if tiles is None:
        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(geo.c_out, meta["BLOCK_N"]),)
        _launch(_fwd_autotuned, grid, args, meta, config)
    else:
        meta.update(BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k)

        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(geo.c_out, tiles.block_n),)
        _launch(_sparse_fwd_autotuned, grid, args, meta, config)
    return out


def masked_conv2d_fwd(x, weight, scores, threshold, bias=None, stride=1, padding=0, dilation=1, *, config=None):
    """``F.conv2d(x, weight * (|scores| > threshold), bias, stride, padding, dilation)`` in one
    implicit-GEMM launch, without materialising the masked weight. groups=1.

    ``config``: one ``triton.Config`` (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M) instead of autotuning."""
    geo = _conv_geometry(x, weight, scores, bias, stride, padding, dilation)
    return _fwd_launch(x, weight, scores, threshold, bias, geo, config=config)


def _weight_split(geo: _Geometry, device: torch.device) -> int:
    """Split of the weight-gradient reduction over pixels (a heuristic, not yet measured): only when a
    nominal 64x64 tiling gives fewer programs than SMs; each part keeps >= 2048 pixels."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    tiles = triton.cdiv(geo.c_out, 64) * triton.cdiv(geo.c_in * geo.kh * geo.kw, 64)
    if tiles >= sms:
        return 1
    pixels = geo.n * geo.oh * geo.ow
    return max(1, min(triton.cdiv(2 * sms, tiles), pixels // 2048, 64))


def masked_conv2d_bwd(grad, x, weight, scores, threshold, stride=1, padding=0, dilation=1,
                      need_input=True, need_weight=True, need_scores=True, *,
                      weight_split=None, input_config=None, weight_config=None):
    """Gradients of :func:`masked_conv2d_fwd` with the STE: ``(dL/dx, dL/dw, dL/ds)``; a side that
    is not needed comes back as an empty tensor and is not computed (the bias gradient is
    ``grad.sum((0, 2, 3))``, left to the caller).

    ``weight_split``: parts of the weight-gradient reduction over pixels (None: heuristic).
    ``input_config`` / ``weight_config``: pin one ``triton.Config`` instead of autotuning."""
    geo = _conv_geometry(x, weight, scores, None, stride, padding, dilation)
    out_shape = (geo.n, geo.c_out, geo.oh, geo.ow)
    if not isinstance(grad, torch.Tensor) or tuple(grad.shape) != out_shape or grad.device != x.device:
        raise ValueError(f"masked_conv2d_bwd: grad must be a {list(out_shape)} tensor on {x.device}, got "
                         f"{tuple(grad.shape) if isinstance(grad, torch.Tensor) else type(grad).__name__}")
    grad = grad.to(x.dtype)
    compute, acc, precision, upcast = _kernel_options(x, weight, scores)
    compute_dtype = _compute_dtype(weight.dtype, scores.dtype)
    t = _threshold_values(threshold, scores.dtype, compute_dtype, weight.device)
    s_full = _expanded_scores(weight, scores)
    k = geo.c_in * geo.kh * geo.kw
    geometry_args = (*geo.stride, *geo.padding, *geo.dilation)

    grad_x = x.new_empty(0)
    if need_input:
        grad_x = _new_like_input(x, x.shape)
        if grad_x.numel():
            m, k_in = geo.n * geo.h * geo.w, geo.c_out * geo.kh * geo.kw
            args = (grad, weight, s_full, t, grad_x,
                    m, geo.c_in, k_in, geo.c_out, geo.h, geo.w, geo.oh, geo.ow, geo.kw, *geometry_args,
                    *grad.stride(), *weight.stride(), *s_full.stride(), *grad_x.stride())
            block_k = _BWD_INPUT_BLOCK_K if input_config is None else input_config.kwargs["BLOCK_K"]
            meta = dict(CHANNEL_TILES=geo.c_out % block_k == 0, COMPUTE=compute, ACC=acc, PRECISION=precision,
                        DOT_UPCAST=upcast, OUT_ROUND=_ROUND_BF16 if x.dtype == torch.bfloat16 else _ROUND_NONE)

            def grid(meta):
                return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(geo.c_in, meta["BLOCK_N"]),)
            _launch(_bwd_input_autotuned, grid, args, meta, input_config)

    grad_w, grad_s = weight.new_empty(0), scores.new_empty(0)
    if not (need_weight or need_scores) or weight.numel() == 0:
        if need_weight:
            grad_w = torch.zeros_like(weight, memory_format=torch.contiguous_format)
        if need_scores:
            grad_s = torch.zeros_like(scores, memory_format=torch.contiguous_format)
        return grad_x, grad_w, grad_s
    pixels = geo.n * geo.oh * geo.ow
    split = _weight_split(geo, x.device) if weight_split is None else int(weight_split)
    split = max(1, min(split, pixels)) if pixels else 1
    p_per_split = triton.cdiv(pixels, split) if pixels else 0
    ste_epilogue = geo.group == 1 and split == 1
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if ste_epilogue:
        g_buf = None
        if need_weight:
            grad_w = torch.empty_like(weight, memory_format=torch.contiguous_format)
        if need_scores:
            grad_s = torch.empty(weight.shape, dtype=scores.dtype, device=scores.device)
    elif split == 1:  # dL/dw_eff in the weight's dtype, as the reference's conv backward gives it
        g_buf = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    else:
        g_buf = torch.empty((split, *weight.shape), dtype=acc_dtype, device=weight.device)
    dummy = t
    args = (grad, x, weight, s_full, t, dummy if g_buf is None else g_buf,
            grad_w if grad_w.numel() else dummy, grad_s if grad_s.numel() else dummy,
            pixels, geo.c_out, k, geo.c_in, geo.h, geo.w, geo.oh, geo.ow, geo.kh, geo.kw, p_per_split,
            weight.numel(), *geometry_args,
            *grad.stride(), *x.stride(), *weight.stride(), *s_full.stride())
    block_k = _BWD_WEIGHT_BLOCK_K if weight_config is None else weight_config.kwargs["BLOCK_K"]
    meta = dict(STE_EPILOGUE=ste_epilogue, NEED_W=bool(need_weight), NEED_S=bool(need_scores),
                CHANNEL_TILES=geo.c_in % block_k == 0, COMPUTE=compute, ACC=acc, PRECISION=precision, DOT_UPCAST=upcast,
                G_ROUND=_round_code(weight.dtype, acc_dtype) if split == 1 else _ROUND_NONE,
                W_ROUND=_round_code(weight.dtype, compute_dtype), S_ROUND=_round_code(scores.dtype, compute_dtype))

    def grid(meta):
        return (triton.cdiv(geo.c_out, meta["BLOCK_CO"]) * triton.cdiv(k, meta["BLOCK_K"]), split)
    _launch(_bwd_weight_autotuned, grid, args, meta, weight_config)
    if ste_epilogue:  # group 1: the scores have the weight's shape
        return grad_x, grad_w, grad_s
    grad_weff = g_buf if split == 1 else g_buf.sum(0).to(weight.dtype)
    grad_w, grad_s = masked_weight_bwd(grad_weff, weight, scores, threshold, need_weight, need_scores)
    return grad_x, grad_w, grad_s


# --------------------------------------------------------------------------- autograd + custom op

class MaskedConv2dIgemmFunction(torch.autograd.Function):
    """``conv2d(x, w * (|s| > t), b)`` by the implicit-GEMM kernels, with the STE backward. Also
    the autograd formula of the custom op ``vpns_fast::masked_conv2d_igemm`` (forward without
    ctx + ``setup_context``). ``.apply(x, w, s, t, bias, stride, padding, dilation)``."""

    @staticmethod
    def forward(x, weight, scores, threshold, bias, stride, padding, dilation):
        return masked_conv2d_fwd(x, weight, scores, threshold, bias, stride, padding, dilation)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, scores, threshold, bias, stride, padding, dilation = inputs
        if not isinstance(threshold, torch.Tensor):  # .apply(..., 0.5, ...); the custom op passes a tensor
            threshold = torch.as_tensor(threshold, device=weight.device)
        ctx.save_for_backward(x, weight, scores, threshold)
        ctx.geometry = (stride, padding, dilation)

    @staticmethod
    def backward(ctx, grad):
        x, weight, scores, threshold = ctx.saved_tensors
        need_x, need_w, need_s, _, need_b = (bool(n) for n in ctx.needs_input_grad[:5])
        stride, padding, dilation = (list(int_pair(v, name)) for v, name in
                                     zip(ctx.geometry, ("stride", "padding", "dilation")))
        if grad is None:
            geo = _conv_geometry(x, weight, scores, None, stride, padding, dilation)
            grad = x.new_zeros(geo.n, geo.c_out, geo.oh, geo.ow)
        if torch.is_grad_enabled():  # create_graph=True: gradients that can be differentiated again
            return _differentiable_backward(grad, x, weight, scores, threshold, stride, padding, dilation,
                                            (need_x, need_w, need_s, need_b))
        grad_x = grad_w = grad_s = None
        if need_x or need_w or need_s:
            grad_x, grad_w, grad_s = torch.ops.vpns_fast.masked_conv2d_igemm_backward(
                grad, x, weight, scores, threshold, stride, padding, dilation, need_x, need_w, need_s)
        grad_bias = grad.sum((0, 2, 3)) if need_b else None
        return (grad_x if need_x else None, grad_w if need_w else None, grad_s if need_s else None,
                None, grad_bias, None, None, None)


def _differentiable_backward(grad, x, weight, scores, threshold, stride, padding, dilation, needs):
    """The implicit-GEMM conv's backward (x, weight, scores, bias gradients) by torch's differentiable convolution
    gradients and the STE formula of ``masked_weight_ref``, for a backward that builds a graph (double backward,
    gradient penalties): the kernels' own backward op has no derivative. The values are the reference's, and so is
    every derivative of them."""
    need_x, need_w, need_s, need_b = needs
    mask = score_mask_ref(scores, threshold).to(weight.dtype)
    # the effective weight with the STE's own backward, so that a penalty on grad_x reaches the scores
    grad_x = (torch.nn.grad.conv2d_input(x.shape, masked_weight_ref(weight, scores, threshold), grad, stride, padding,
                                         dilation) if need_x else None)
    grad_w = grad_s = None
    if need_w or need_s:
        grad_weff = torch.nn.grad.conv2d_weight(x, weight.shape, grad, stride, padding, dilation)
        grad_w = grad_weff * mask if need_w else None
        if need_s:
            grad_s = (grad_weff * weight * torch.sign(scores)).sum_to_size(scores.shape).to(scores.dtype)
    grad_bias = grad.sum((0, 2, 3)) if need_b else None
    return grad_x, grad_w, grad_s, None, grad_bias, None, None, None


def _masked_conv2d_igemm_fake(x, weight, scores, threshold, bias, stride, padding, dilation):
    geo = _conv_geometry(x, weight, scores, bias, stride, padding, dilation)
    return _new_like_input(x, (geo.n, geo.c_out, geo.oh, geo.ow))


def _masked_conv2d_igemm_backward_fake(grad, x, weight, scores, threshold, stride, padding, dilation,
                                       need_input, need_weight, need_scores):
    _conv_geometry(x, weight, scores, None, stride, padding, dilation)
    return (_new_like_input(x, x.shape) if need_input else x.new_empty(0),
            torch.empty_like(weight, memory_format=torch.contiguous_format) if need_weight else weight.new_empty(0),
            torch.empty_like(scores, memory_format=torch.contiguous_format) if need_scores else scores.new_empty(0))


# The ops take the geometry only (the launchers' keyword-only config pins are not part of them).
@custom_op("vpns_fast::masked_conv2d_igemm",
           schema="(Tensor x, Tensor weight, Tensor scores, Tensor threshold, Tensor? bias, int[] stride, "
                  "int[] padding, int[] dilation) -> Tensor",
           fake=_masked_conv2d_igemm_fake, backward=MaskedConv2dIgemmFunction.backward,
           setup_context=MaskedConv2dIgemmFunction.setup_context)
def _masked_conv2d_op(x, weight, scores, threshold, bias, stride, padding, dilation):
    return masked_conv2d_fwd(x, weight, scores, threshold, bias, stride, padding, dilation)


@custom_op("vpns_fast::masked_conv2d_igemm_backward",
           schema="(Tensor grad, Tensor x, Tensor weight, Tensor scores, Tensor threshold, int[] stride, "
                  "int[] padding, int[] dilation, bool need_input, bool need_weight, bool need_scores) "
                  "-> (Tensor, Tensor, Tensor)",
           fake=_masked_conv2d_igemm_backward_fake)
def _masked_conv2d_backward_op(grad, x, weight, scores, threshold, stride, padding, dilation,
                               need_input, need_weight, need_scores):
    return masked_conv2d_bwd(grad, x, weight, scores, threshold, stride, padding, dilation,
                             need_input, need_weight, need_scores)


def masked_conv2d_igemm(x, weight, scores, threshold, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """``conv2d(x, weight * (|scores| > threshold), bias, ...)`` with the STE backward, by the
    implicit-GEMM kernels through the custom op. groups=1 only (ValueError otherwise: the caller
    falls back to the fused mask kernel + F.conv2d)."""
    if groups != 1:
        raise ValueError(f"groups={groups} is not supported by the implicit-GEMM masked conv (groups=1 only); "
                         f"use the fused mask kernel + F.conv2d path for grouped convolutions")
    if not isinstance(weight, torch.Tensor) or not isinstance(scores, torch.Tensor):
        raise TypeError("masked_conv2d_igemm: weight and scores must be tensors")
    scores = expand_ungrouped_scores(weight, scores)  # addressed with stride 0
    stride, padding, dilation = (list(int_pair(v, n)) for v, n in ((stride, "stride"), (padding, "padding"),
                                                                    (dilation, "dilation")))
    return torch.ops.vpns_fast.masked_conv2d_igemm(x, weight, scores, _as_threshold_tensor(threshold, weight.device),
                                                   bias, stride, padding, dilation)


# --------------------------------------------------------------------------- inference: skip empty tiles

@dataclasses.dataclass(frozen=True)
class MaskedConvTiles:
    """A masked conv layer prepared for inference with a fixed mask: which (K tile, C_out tile)
    weight tiles keep anything. Built by :func:`prepare_sparse_tiles`."""
    weight: torch.Tensor
    scores: torch.Tensor
    threshold: torch.Tensor
    block_n: int
    block_k: int
    flags: torch.Tensor        # bool [K tiles, C_out tiles]: the tile keeps at least one weight
    tile_list: torch.Tensor    # int32 [C_out tiles, K tiles]: kept K tiles first, ascending
    tile_count: torch.Tensor   # int32 [C_out tiles]: how many K tiles each C_out tile visits
    versions: tuple            # (data_ptr, _version) of weight, scores, threshold when built

    @property
    def kept_tile_fraction(self) -> float:
        return float(self.flags.float().mean()) if self.flags.numel() else 0.0


def _identity(t: torch.Tensor) -> tuple[int, int]:
    return t.data_ptr(), t._version


def prepare_sparse_tiles(weight, scores, threshold, block_n: int | None = None,
                         block_k: int | None = None) -> MaskedConvTiles:
    """Per-(K tile, C_out tile) "keeps anything" flags of ``weight * (|scores| > threshold)``, once,
    on the weight's device (no host sync), for :func:`masked_conv2d_sparse`.

    K runs in the kernel's (kh, kw, c_in) order. A tile that keeps nothing contributes exactly
    zero, unless a pruned weight in it is NaN / inf (``inf * 0 = NaN`` in the reference): such
    tiles are flagged too, so the result equals the dense masked conv in every case."""
    _check_pair(weight, scores, "prepare_sparse_tiles")
    if weight.dim() != 4:
        raise ValueError(f"prepare_sparse_tiles: weight must be [C_out, C_in, KH, KW], got {tuple(weight.shape)}")
    block_n = _SPARSE_BLOCK_N if block_n is None else int(block_n)
    block_k = _SPARSE_BLOCK_K if block_k is None else int(block_k)
    for name, b in (("block_n", block_n), ("block_k", block_k)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"prepare_sparse_tiles: {name} must be a power of two >= 16 (tl.dot), got {b}")
    threshold = _as_threshold_tensor(threshold, weight.device)
    compute = _compute_dtype(weight.dtype, scores.dtype)
    t = _threshold_values(threshold, scores.dtype, compute, weight.device)
    keep = scores.to(compute).abs() > t  # the kernel's comparison, exactly
    nonzero = (keep | ~torch.isfinite(weight)).expand(weight.shape)
    c_out = weight.shape[0]
    k = weight.shape[1] * weight.shape[2] * weight.shape[3]
    n_tiles, k_tiles = triton.cdiv(c_out, block_n), triton.cdiv(k, block_k)
    nonzero = nonzero.permute(0, 2, 3, 1).reshape(c_out, k)  # (kh, kw, c_in) order
    padded = torch.zeros(n_tiles * block_n, k_tiles * block_k, dtype=torch.bool, device=weight.device)
    padded[:c_out, :k] = nonzero
    flags_nk = padded.view(n_tiles, block_n, k_tiles, block_k).any(dim=3).any(dim=1)
    # stable sort of (not kept) puts the kept K tiles first, in ascending order
    tile_list = torch.sort((~flags_nk).to(torch.int8), dim=1, stable=True).indices.to(torch.int32).contiguous()
    tile_count = flags_nk.sum(dim=1, dtype=torch.int32)
    return MaskedConvTiles(weight, scores, threshold, block_n, block_k, flags_nk.t().contiguous(), tile_list,
                           tile_count, (_identity(weight), _identity(scores), _identity(threshold)))


def masked_conv2d_sparse(x, tiles: MaskedConvTiles, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
                         config=None):
    """Inference forward of a prepared layer: the same result as :func:`masked_conv2d_fwd` with the
    layer's weight, scores and threshold, but the K loop visits only tiles that keep a weight.
    No autograd (the output has no gradient). ``config``: one ``triton.Config`` (BLOCK_M, GROUP_M)."""
    if not isinstance(tiles, MaskedConvTiles):
        raise TypeError(f"masked_conv2d_sparse: tiles must come from prepare_sparse_tiles, got {type(tiles).__name__}")
    now = (_identity(tiles.weight), _identity(tiles.scores), _identity(tiles.threshold))
    if now != tiles.versions:
        raise ValueError("masked_conv2d_sparse: the weight, scores or threshold changed since prepare_sparse_tiles "
                         "(in-place update); prepare the tiles again")
    geo = _conv_geometry(x, tiles.weight, tiles.scores, bias, stride, padding, dilation, groups)
    with torch.no_grad():
        return _fwd_launch(x, tiles.weight, tiles.scores, tiles.threshold, bias, geo, tiles=tiles, config=config)

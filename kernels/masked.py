"""Masked weights with the straight-through estimator (STE), and the layers built on them.

Forward ``w_eff = w * m`` with ``m = |s| > t``. ``s`` has the weight's shape (unstructured),
``[C_out, C_in, 1, 1]`` (kernel) or ``[C_out, 1, 1, 1]`` (channel), broadcast over the weight.
Backward, as in the VPNs / HYDRA release code where ``abs`` sits outside the STE:
``dL/dw = g * m`` and ``dL/ds = sum_broadcast(g * w * sign(s))``; ``t`` gets no gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def score_mask_ref(scores: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Boolean keep-mask in the scores' shape: ``|s| > t``."""
    return scores.abs() > threshold


class MaskedWeightFunction(torch.autograd.Function):
    """Reference autograd Function for ``w * (|s| > t)`` with the STE backward."""

    @staticmethod
    def forward(ctx, weight, scores, threshold):
        mask = score_mask_ref(scores, threshold)
        ctx.save_for_backward(weight, scores, mask)
        return weight * mask.to(weight.dtype)

    @staticmethod
    def backward(ctx, grad_weff):
        weight, scores, mask = ctx.saved_tensors
        return (*ste_gradients_ref(grad_weff, weight, scores, mask, ctx.needs_input_grad[0], ctx.needs_input_grad[1]),
                None)


def ste_gradients_ref(grad_weff, weight, scores, mask, need_weight, need_scores):
    """(dL/dweight, dL/dscores) of ``weight * mask`` given dL/d(that product), by the STE (None where not needed):
    the reference's backward, also what the Triton ops' backward computes when it must be differentiated again."""
    grad_weight = grad_weff * mask.to(grad_weff.dtype) if need_weight else None
    grad_scores = ((grad_weff * weight * torch.sign(scores)).sum_to_size(scores.shape).to(scores.dtype)
                   if need_scores else None)
    return grad_weight, grad_scores


def masked_weight_ref(weight, scores, threshold):
    return MaskedWeightFunction.apply(weight, scores, threshold)


def masked_weights_ref(weights, scores, thresholds):
    """:func:`masked_weight_ref` of each layer; ``thresholds`` holds one entry per layer."""
    return [masked_weight_ref(w, s, t) for w, s, t in zip(weights, scores, thresholds)]


def masked_conv2d_ref(x, weight, scores, threshold, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return F.conv2d(x, masked_weight_ref(weight, scores, threshold), bias, stride, padding, dilation, groups)


def masked_linear_ref(x, weight, scores, threshold, bias=None):
    return F.linear(x, masked_weight_ref(weight, scores, threshold), bias)


# =========================================================================== Triton kernels
#
# Design:
#
# * Forward: one launch computes ``w_eff = where(|s| > t, w, w * 0)`` for a whole weight; the
#   conv / linear itself stays on cuDNN / cuBLAS (``F.conv2d`` / ``F.linear``) unless the
#   measured conv dispatch (vpns_fast/ops/conv_dispatch.py) picks the implicit-GEMM conv.
# * Backward: one launch reads g = dL/dw_eff, w and s once and writes dL/dw = g * m and
#   dL/ds = sum_broadcast(g * w * sign(s)) together; each side is compiled out when autograd does
#   not need it (stage 1 trains scores only, stage 2 weights only). The mask is recomputed from
#   (s, t) instead of being saved: no mask tensor is ever stored.
# * Structured scores must broadcast over *trailing* weight dims (unstructured, ``[C_out, C_in,
#   1, 1]`` kernel, ``[C_out, 1, 1, 1]`` channel, ``[out, 1]`` linear rows), so the weight is a
#   contiguous sequence of groups of ``group`` elements, one per score. The score gradient of a
#   group is reduced inside one program (a ``[ROWS, COLS]`` tile of ROWS groups when the group is
#   small, e.g. 3x3 kernels; a loop of BLOCK-chunks when it is large, e.g. a whole output
#   channel): deterministic, no float atomics. Other broadcast patterns (e.g. ``[1, C_in, 1, 1]``)
#   are expanded to the weight's shape first and autograd's ``expand`` backward sums them.
# * Mask identity: t is rounded to the scores' dtype on the host with torch (as the reference's
#   ``scores.abs() > threshold`` promotes a 0-dim float32 threshold to, e.g., bfloat16), then
#   |s| and t are compared exactly in float32 (float64 when any input is float64).
# * Rounding identity: the reference rounds ``g * w`` to the weight's dtype before multiplying by
#   sign(s); the kernels do the same, then accumulate in float32 / float64. Rounding to bfloat16
#   is done by integer arithmetic on the float32 bits (round to nearest even), because the
#   Triton interpreter's float32 -> bfloat16 cast does not round correctly (and its bfloat16
#   arithmetic is wrong); values that are already representable are stored with a plain cast.
#   (A bfloat16 value computed in float64, i.e. bf16 mixed with float64, is rounded via float32.)
# * Multi-tensor: ``masked_weights_*`` does every layer of a model in ONE launch per direction.
#   A per-program table of (tensor index, start) and a per-tensor int64 table of data pointers,
#   element counts and group sizes are built on the host (one small host-to-device copy per
#   call); the kernel turns table entries into typed pointers with
#   ``tl.load(table + i).to(tl.pointer_type(...))`` (works natively and under the interpreter,
#   where pointers are host addresses). All weights must share one dtype, all scores another.
# * Open on the GPU: bandwidth (the design goal is the launch count), and vectorisation of loads
#   through table pointers (Triton has no alignment hint for them).
import math

from vpns_fast.kernels._common import MAX_INT32_OFFSET
from vpns_fast.kernels._library import custom_op
from vpns_fast.kernels._triton import tl, triton

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Element-wise programs cover BLOCK elements; small groups (<= SMALL_GROUP_COLS, e.g. 3x3
# kernels) are reduced ROWS at a time in a [ROWS, COLS] tile; larger groups one per program.
_BLOCK = 1024
_SMALL_GROUP_COLS = 16
_SMALL_GROUP_ROWS = _BLOCK // _SMALL_GROUP_COLS
_SINGLE_SMALL_GROUP_MAX = 64  # single-tensor launches size the tile to the group up to this
# Rounding codes for _round_to (the dtype a value is rounded to before further use).
_ROUND_NONE, _ROUND_BF16, _ROUND_FP16, _ROUND_FP32 = 0, 1, 2, 3
# Per-tensor table columns (int64) of the multi-tensor kernels.
_FWD_META = 5   # w, s, out pointers; numel; group
_BWD_META = 8   # g, w, s, grad_w, grad_s pointers; numel; score count; group


@triton.jit
def _round_to(x, ROUND: tl.constexpr):
    """``x`` rounded to a narrower dtype and widened back (round to nearest even)."""
    if ROUND == 1:  # bfloat16, from the float32 bits: add 0x7FFF + lsb, clear the low half
        xf = x.to(tl.float32)
        bits = xf.to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        x = tl.where(xf != xf, xf, rounded).to(x.dtype)
    elif ROUND == 2:
        x = x.to(tl.float16).to(x.dtype)
    elif ROUND == 3:
        x = x.to(tl.float32).to(x.dtype)
    return x


@triton.jit
def _times_sign(x, s):
    """``x * sign(s)`` with sign(0) = 0, exactly (negation or multiplication by zero)."""
    return tl.where(s > 0, x, tl.where(s < 0, -x, x * 0.0))


@triton.jit
def _mask_apply_block(w_ptr, s_ptr, out_ptr, t, start, numel, group,
                      BLOCK: tl.constexpr, COMPUTE: tl.constexpr, UNSTRUCTURED: tl.constexpr):
    offs = start + tl.arange(0, BLOCK)
    inb = offs < numel
    w = tl.load(w_ptr + offs, mask=inb, other=0.0).to(COMPUTE)
    if UNSTRUCTURED:
        s = tl.load(s_ptr + offs, mask=inb, other=0.0).to(COMPUTE)
    else:
        s = tl.load(s_ptr + offs // group, mask=inb, other=0.0).to(COMPUTE)
    # w * 0 rather than 0 keeps the reference's -0.0 / NaN for pruned negative / non-finite w.
    tl.store(out_ptr + offs, tl.where(tl.abs(s) > t, w, w * 0.0), mask=inb)


@triton.jit
def _ste_elementwise(g_ptr, w_ptr, s_ptr, gw_ptr, gs_ptr, t, start, numel,
                     BLOCK: tl.constexpr, COMPUTE: tl.constexpr, W_ROUND: tl.constexpr,
                     S_ROUND: tl.constexpr, WRITE_GW: tl.constexpr, WRITE_GS: tl.constexpr):
    offs = start + tl.arange(0, BLOCK)
    inb = offs < numel
    g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(COMPUTE)
    s = tl.load(s_ptr + offs, mask=inb, other=0.0).to(COMPUTE)
    if WRITE_GW:
        tl.store(gw_ptr + offs, tl.where(tl.abs(s) > t, g, g * 0.0), mask=inb)
    if WRITE_GS:
        w = tl.load(w_ptr + offs, mask=inb, other=0.0).to(COMPUTE)
        grad_s = _times_sign(_round_to(g * w, W_ROUND), s)
        tl.store(gs_ptr + offs, _round_to(grad_s, S_ROUND), mask=inb)


@triton.jit
def _ste_small_groups(g_ptr, w_ptr, s_ptr, gw_ptr, gs_ptr, t, first_group, n_groups, group,
                      ROWS: tl.constexpr, COLS: tl.constexpr, COMPUTE: tl.constexpr,
                      W_ROUND: tl.constexpr, S_ROUND: tl.constexpr,
                      WRITE_GW: tl.constexpr, WRITE_GS: tl.constexpr):
    """ROWS whole groups of ``group <= COLS`` elements, one tile row each."""
    rows = first_group + tl.arange(0, ROWS)
    cols = tl.arange(0, COLS)
    row_ok = rows < n_groups
    inb = row_ok[:, None] & (cols[None, :] < group)
    offs = rows[:, None] * group + cols[None, :]
    s = tl.load(s_ptr + rows, mask=row_ok, other=0.0).to(COMPUTE)
    g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(COMPUTE)
    if WRITE_GW:
        keep = tl.abs(s) > t
        tl.store(gw_ptr + offs, tl.where(keep[:, None], g, g * 0.0), mask=inb)
    if WRITE_GS:
        w = tl.load(w_ptr + offs, mask=inb, other=0.0).to(COMPUTE)
        total = tl.sum(_round_to(g * w, W_ROUND), axis=1)
        tl.store(gs_ptr + rows, _round_to(_times_sign(total, s), S_ROUND), mask=row_ok)


@triton.jit
def _ste_large_group(g_ptr, w_ptr, s_ptr, gw_ptr, gs_ptr, t, index, group,
                     BLOCK: tl.constexpr, COMPUTE: tl.constexpr, W_ROUND: tl.constexpr,
                     S_ROUND: tl.constexpr, WRITE_GW: tl.constexpr, WRITE_GS: tl.constexpr):
    """One group (e.g. a whole output channel), BLOCK elements at a time."""
    s = tl.load(s_ptr + index).to(COMPUTE)
    keep = tl.abs(s) > t
    base = index * group
    acc = tl.zeros([BLOCK], dtype=COMPUTE)
    for k in range(0, group, BLOCK):
        idx = k + tl.arange(0, BLOCK)
        inb = idx < group
        g = tl.load(g_ptr + base + idx, mask=inb, other=0.0).to(COMPUTE)
        if WRITE_GW:
            tl.store(gw_ptr + base + idx, tl.where(keep, g, g * 0.0), mask=inb)
        if WRITE_GS:
            w = tl.load(w_ptr + base + idx, mask=inb, other=0.0).to(COMPUTE)
            acc += _round_to(g * w, W_ROUND)
    if WRITE_GS:
        total = tl.sum(acc, axis=0)
        tl.store(gs_ptr + index, _round_to(_times_sign(total, s), S_ROUND))


@triton.jit
def _masked_weight_fwd_kernel(w_ptr, s_ptr, out_ptr, t_ptr, numel, group,
                              BLOCK: tl.constexpr, COMPUTE: tl.constexpr, UNSTRUCTURED: tl.constexpr):
    t = tl.load(t_ptr)
    _mask_apply_block(w_ptr, s_ptr, out_ptr, t, tl.program_id(0) * BLOCK, numel, group,
                      BLOCK, COMPUTE, UNSTRUCTURED)


@triton.jit
def _masked_weight_bwd_kernel(g_ptr, w_ptr, s_ptr, gw_ptr, gs_ptr, t_ptr, numel, n_groups, group,
                              PATH: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
                              COLS: tl.constexpr, COMPUTE: tl.constexpr, W_ROUND: tl.constexpr,
                              S_ROUND: tl.constexpr, WRITE_GW: tl.constexpr, WRITE_GS: tl.constexpr):
    """PATH 0: element-wise (unstructured); 1: ROWS small groups per program; 2: one group."""
    pid = tl.program_id(0)
    t = tl.load(t_ptr)
    if PATH == 0:
        _ste_elementwise(g_ptr, w_ptr, s_ptr, gw_ptr, gs_ptr, t, pid * BLOCK, numel,
                         BLOCK, COMPUTE, W_ROUND, S_ROUND, WRITE_GW, WRITE_GS)
    elif PATH == 1:
        _ste_small_groups(g_ptr, w_ptr, s_ptr, gw_ptr, gs_ptr, t, pid * ROWS, n_groups, group,
                          ROWS, COLS, COMPUTE, W_ROUND, S_ROUND, WRITE_GW, WRITE_GS)
    else:
        _ste_large_group(g_ptr, w_ptr, s_ptr, gw_ptr, gs_ptr, t, pid, group,
                         BLOCK, COMPUTE, W_ROUND, S_ROUND, WRITE_GW, WRITE_GS)


@triton.jit
def _masked_weights_fwd_kernel(items_ptr, meta_ptr, t_ptr, W_LIKE, S_LIKE,
                               BLOCK: tl.constexpr, COMPUTE: tl.constexpr, META: tl.constexpr):
    """Every layer in one launch: program ``pid`` masks BLOCK elements of layer ``items[pid]``."""
    pid = tl.program_id(0)
    layer = tl.load(items_ptr + 2 * pid)
    start = tl.load(items_ptr + 2 * pid + 1)
    row = meta_ptr + layer.to(tl.int64) * META
    w_ptr = tl.load(row).to(tl.pointer_type(W_LIKE.dtype.element_ty))
    s_ptr = tl.load(row + 1).to(tl.pointer_type(S_LIKE.dtype.element_ty))
    out_ptr = tl.load(row + 2).to(tl.pointer_type(W_LIKE.dtype.element_ty))
    numel = tl.load(row + 3).to(tl.int32)
    group = tl.load(row + 4).to(tl.int32)
    t = tl.load(t_ptr + layer)
    if group == 1:  # no per-element integer division for unstructured layers
        _mask_apply_block(w_ptr, s_ptr, out_ptr, t, start, numel, group, BLOCK, COMPUTE, True)
    else:
        _mask_apply_block(w_ptr, s_ptr, out_ptr, t, start, numel, group, BLOCK, COMPUTE, False)


@triton.jit
def _masked_weights_bwd_kernel(items_ptr, meta_ptr, t_ptr, W_LIKE, S_LIKE,
                               BLOCK: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
                               COMPUTE: tl.constexpr, W_ROUND: tl.constexpr, S_ROUND: tl.constexpr,
                               WRITE_GW: tl.constexpr, WRITE_GS: tl.constexpr, META: tl.constexpr):
    """Every layer in one launch; the work item's meaning follows the tensor's group size:
    an element offset (group 1), a first group (group <= COLS) or one group (larger)."""
    pid = tl.program_id(0)
    layer = tl.load(items_ptr + 2 * pid)
    start = tl.load(items_ptr + 2 * pid + 1)
    row = meta_ptr + layer.to(tl.int64) * META
    g_ptr = tl.load(row).to(tl.pointer_type(W_LIKE.dtype.element_ty))
    w_ptr = tl.load(row + 1).to(tl.pointer_type(W_LIKE.dtype.element_ty))
    s_ptr = tl.load(row + 2).to(tl.pointer_type(S_LIKE.dtype.element_ty))
    gw_ptr = tl.load(row + 3).to(tl.pointer_type(W_LIKE.dtype.element_ty))
    gs_ptr = tl.load(row + 4).to(tl.pointer_type(S_LIKE.dtype.element_ty))
    numel = tl.load(row + 5).to(tl.int32)
    n_groups = tl.load(row + 6).to(tl.int32)
    group = tl.load(row + 7).to(tl.int32)
    t = tl.load(t_ptr + layer)
    if group == 1:
        _ste_elementwise(g_ptr, w_ptr, s_ptr, gw_ptr, gs_ptr, t, start, numel,
                         BLOCK, COMPUTE, W_ROUND, S_ROUND, WRITE_GW, WRITE_GS)
    elif group <= COLS:
        _ste_small_groups(g_ptr, w_ptr, s_ptr, gw_ptr, gs_ptr, t, start, n_groups, group,
                          ROWS, COLS, COMPUTE, W_ROUND, S_ROUND, WRITE_GW, WRITE_GS)
    else:
        _ste_large_group(g_ptr, w_ptr, s_ptr, gw_ptr, gs_ptr, t, start, group,
                         BLOCK, COMPUTE, W_ROUND, S_ROUND, WRITE_GW, WRITE_GS)


# --------------------------------------------------------------------------- launchers

def _compute_dtype(*dtypes) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _round_code(dtype: torch.dtype, compute: torch.dtype) -> int:
    """How a ``compute``-dtype value is rounded to ``dtype`` (none when they are the same)."""
    if dtype == compute:
        return _ROUND_NONE
    return {torch.bfloat16: _ROUND_BF16, torch.float16: _ROUND_FP16, torch.float32: _ROUND_FP32}[dtype]


def broadcast_group_size(weight_shape, scores_shape) -> int | None:
    """Elements of the weight per score when the scores broadcast over trailing dims only (the
    weight is then a sequence of contiguous groups, one per score), else None."""
    weight_shape, scores_shape = tuple(weight_shape), tuple(scores_shape)
    if len(weight_shape) != len(scores_shape):
        return None
    lead = 0
    while lead < len(weight_shape) and scores_shape[lead] == weight_shape[lead]:
        lead += 1
    if any(d != 1 for d in scores_shape[lead:]):
        return None
    return math.prod(weight_shape[lead:])


def _check_pair(weight, scores, where: str) -> int:
    """Validate one (weight, scores) pair; returns the group size."""
    for name, t in (("weight", weight), ("scores", scores)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a tensor, got {type(t).__name__}")
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"{where}: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if weight.device != scores.device:
        raise ValueError(f"{where}: weight is on {weight.device} but scores are on {scores.device}")
    if weight.element_size() == 2 and scores.dtype == torch.float64:
        # the fp64 compute path would store into a 16-bit weight through an implicit fp64 -> 16-bit
        # conversion, which the interpreter gets wrong (garbage values, checked); no model mixes these
        raise TypeError(f"{where}: {weight.dtype} weights with float64 scores are not supported; give the "
                        f"scores the weight's dtype or float32")
    group = broadcast_group_size(weight.shape, scores.shape)
    if group is None:
        raise ValueError(f"{where}: scores of shape {tuple(scores.shape)} must equal the weight's shape "
                         f"{tuple(weight.shape)} on leading dims and be 1 on the trailing ones "
                         f"(unstructured, [C_out, C_in, 1, 1], [C_out, 1, 1, 1], [out, 1])")
    if weight.numel() > MAX_INT32_OFFSET:
        raise ValueError(f"{where}: weights with more than 2**31 - 1 elements are not supported, "
                         f"got {weight.numel()}")
    return group


def _threshold_values(threshold, scores_dtype, compute, device, count=None) -> torch.Tensor:
    """The threshold(s) as the reference compares them: rounded to the scores' dtype (type
    promotion of a 0-dim tensor against the scores), then widened exactly to ``compute``.
    Returns a 1-D tensor of ``count`` entries (one per layer) or of 1 entry."""
    if not isinstance(threshold, torch.Tensor):
        threshold = torch.as_tensor(threshold)
    if threshold.is_complex() or threshold.dtype == torch.bool:
        raise TypeError(f"threshold must be a real number, got dtype {threshold.dtype}")
    threshold = threshold.detach().to(device=device)
    if count is None:
        if threshold.dim() != 0:
            raise ValueError(f"threshold must be a 0-dim tensor, got shape {tuple(threshold.shape)}")
        return threshold.to(scores_dtype).to(compute).reshape(1)
    if threshold.dim() == 0:
        threshold = threshold.expand(count)
    if threshold.shape != (count,):
        raise ValueError(f"thresholds must be a scalar or hold one entry per layer ({count}), "
                         f"got shape {tuple(threshold.shape)}")
    return threshold.to(scores_dtype).to(compute).contiguous()


# --------------------------------------------------------------------------- custom ops
# Fake implementations and autograd formulas of the ``vpns_fast::masked_weight(s)`` ops, which
# the launchers below define (``torch.compile`` traces them as opaque nodes).

def _masked_weight_fake(weight, scores, threshold):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


def _masked_weight_backward_fake(grad, weight, scores, threshold, need_weight, need_scores):
    return (torch.empty_like(weight, memory_format=torch.contiguous_format) if need_weight else weight.new_empty(0),
            torch.empty_like(scores, memory_format=torch.contiguous_format) if need_scores else scores.new_empty(0))


def _masked_weights_fake(weights, scores, thresholds):
    return [torch.empty_like(w, memory_format=torch.contiguous_format) for w in weights]


def _masked_weights_backward_fake(grads, weights, scores, thresholds, need_weight, need_scores):
    return ([torch.empty_like(w, memory_format=torch.contiguous_format) for w in weights] if need_weight else [],
            [torch.empty_like(s, memory_format=torch.contiguous_format) for s in scores] if need_scores else [])


class MaskedWeightTritonFunction(torch.autograd.Function):
    """``w * (|s| > t)`` with the fused STE backward. Also the autograd formula of the custom op
    ``vpns_fast::masked_weight`` (forward without ctx + ``setup_context``)."""

    @staticmethod
    def forward(weight, scores, threshold):
        return masked_weight_fwd(weight, scores, threshold)

    @staticmethod
    def setup_context(ctx, inputs, output):
        weight, scores, threshold = inputs
        if not isinstance(threshold, torch.Tensor):  # .apply(w, s, 0.5); the custom op passes a tensor
            threshold = torch.as_tensor(threshold, device=weight.device)
        ctx.save_for_backward(weight, scores, threshold)

    @staticmethod
    def backward(ctx, grad):
        weight, scores, threshold = ctx.saved_tensors
        need_weight, need_scores = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])
        if not (need_weight or need_scores):
            return None, None, None
        if grad is None:
            grad = torch.zeros_like(weight)
        if torch.is_grad_enabled():  # create_graph=True: the kernel's backward op has no derivative
            mask = score_mask_ref(scores, threshold)
            grad_weight, grad_scores = ste_gradients_ref(grad, weight, scores, mask, need_weight, need_scores)
            return grad_weight, grad_scores, None
        grad_weight, grad_scores = torch.ops.vpns_fast.masked_weight_backward(
            grad, weight, scores, threshold, need_weight, need_scores)
        return grad_weight if need_weight else None, grad_scores if need_scores else None, None


def _masked_weights_backward(ctx, grads, need_weights, need_scores):
    n = len(grads)
    need_weight, need_scores_any = any(need_weights), any(need_scores)
    if not (need_weight or need_scores_any):
        return [None] * n, [None] * n
    thresholds, *tensors = ctx.saved_tensors
    weights, scores = tensors[:n], tensors[n:]
    grads = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, weights)]
    if torch.is_grad_enabled():  # create_graph=True: the kernel's backward op has no derivative
        per_layer = thresholds.expand(n) if thresholds.dim() == 0 else thresholds
        pairs = [ste_gradients_ref(g, w, s, score_mask_ref(s, t), need_w, need_s)
                 for g, w, s, t, need_w, need_s in zip(grads, weights, scores, per_layer, need_weights, need_scores)]
        return [p[0] for p in pairs], [p[1] for p in pairs]
    grad_weights, grad_scores = torch.ops.vpns_fast.masked_weights_backward(
        grads, weights, scores, thresholds, need_weight, need_scores_any)
    grad_weights = [g if need else None for g, need in zip(grad_weights, need_weights)] if need_weight \
        else [None] * n
    grad_scores = [g if need else None for g, need in zip(grad_scores, need_scores)] if need_scores_any \
        else [None] * n
    return grad_weights, grad_scores


def _masked_weights_setup_context(ctx, inputs, output):
    weights, scores, thresholds = inputs
    ctx.save_for_backward(thresholds, *weights, *scores)


def _masked_weights_op_backward(ctx, grads):
    need_weights, need_scores, _ = ctx.needs_input_grad
    grad_weights, grad_scores = _masked_weights_backward(ctx, list(grads), need_weights, need_scores)
    return grad_weights, grad_scores, None


@custom_op("vpns_fast::masked_weight", schema="(Tensor weight, Tensor scores, Tensor threshold) -> Tensor",
           fake=_masked_weight_fake, backward=MaskedWeightTritonFunction.backward,
           setup_context=MaskedWeightTritonFunction.setup_context)
def masked_weight_fwd(weight: torch.Tensor, scores: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``weight * (|scores| > threshold)`` in one launch; contiguous, in the weight's dtype."""
    group = _check_pair(weight, scores, "masked_weight")
    compute = _compute_dtype(weight.dtype, scores.dtype)
    t = _threshold_values(threshold, scores.dtype, compute, weight.device)
    weight, scores = weight.contiguous(), scores.contiguous()
    out = torch.empty_like(weight, memory_format=torch.contiguous_format)
    numel = weight.numel()
    if numel:
        _masked_weight_fwd_kernel[(triton.cdiv(numel, _BLOCK),)](
            weight, scores, out, t, numel, group,
            BLOCK=_BLOCK, COMPUTE=_tl_dtype(compute), UNSTRUCTURED=group == 1)
    return out


def _single_bwd_config(group: int) -> tuple[int, int, int]:
    """(PATH, ROWS, COLS) of _masked_weight_bwd_kernel for a group size."""
    if group == 1:
        return 0, 1, 1
    if group <= _SINGLE_SMALL_GROUP_MAX:
        cols = triton.next_power_of_2(group)
        return 1, max(1, _BLOCK // cols), cols
    return 2, 1, 1


@custom_op("vpns_fast::masked_weight_backward",
           schema="(Tensor grad, Tensor weight, Tensor scores, Tensor threshold, bool need_weight, "
                  "bool need_scores) -> (Tensor, Tensor)",
           fake=_masked_weight_backward_fake)
def masked_weight_bwd(grad: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor, threshold: torch.Tensor,
                      need_weight: bool = True, need_scores: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused STE backward: ``(g * m, sum_broadcast(g * w * sign(s)))`` in one launch.

    A side that is not needed comes back as an empty tensor and is not computed."""
    group = _check_pair(weight, scores, "masked_weight backward")
    if grad.shape != weight.shape:
        raise ValueError(f"grad has shape {tuple(grad.shape)} but the weight has {tuple(weight.shape)}")
    if grad.device != weight.device:
        raise ValueError(f"grad is on {grad.device} but the weight is on {weight.device}")
    compute = _compute_dtype(weight.dtype, scores.dtype)
    t = _threshold_values(threshold, scores.dtype, compute, weight.device)
    # g * w is formed in the weight's dtype, as in the reference (grad of w_eff has that dtype).
    grad, weight, scores = grad.to(weight.dtype).contiguous(), weight.contiguous(), scores.contiguous()
    grad_weight = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_weight \
        else weight.new_empty(0)
    grad_scores = torch.empty_like(scores, memory_format=torch.contiguous_format) if need_scores \
        else scores.new_empty(0)
    numel = weight.numel()
    if numel and (need_weight or need_scores):
        path, rows, cols = _single_bwd_config(group)
        n_groups = scores.numel()
        grid = (triton.cdiv(numel, _BLOCK),) if path == 0 else \
            (triton.cdiv(n_groups, rows),) if path == 1 else (n_groups,)
        block = _BLOCK if path != 2 else min(_BLOCK, triton.next_power_of_2(group))
        _masked_weight_bwd_kernel[grid](
            grad, weight, scores, grad_weight if need_weight else grad, grad_scores if need_scores else grad,
            t, numel, n_groups, group,
            PATH=path, BLOCK=block, ROWS=rows, COLS=cols, COMPUTE=_tl_dtype(compute),
            W_ROUND=_round_code(weight.dtype, compute), S_ROUND=_round_code(scores.dtype, compute),
            WRITE_GW=need_weight, WRITE_GS=need_scores)
    return grad_weight, grad_scores


def _check_lists(weights, scores, where: str) -> list[int]:
    if not isinstance(weights, (list, tuple)) or not isinstance(scores, (list, tuple)):
        raise TypeError(f"{where}: weights and scores must be lists of tensors")
    if len(weights) != len(scores):
        raise ValueError(f"{where}: {len(weights)} weights but {len(scores)} score tensors")
    if not weights:
        raise ValueError(f"{where}: needs at least one layer")
    groups = [_check_pair(w, s, f"{where}, layer {i}") for i, (w, s) in enumerate(zip(weights, scores))]
    w0, s0 = weights[0], scores[0]
    for i, (w, s) in enumerate(zip(weights, scores)):
        if w.dtype != w0.dtype or s.dtype != s0.dtype or w.device != w0.device:
            raise ValueError(f"{where}: all weights must share one dtype, all scores another, and all one "
                             f"device; layer 0 is ({w0.dtype}, {s0.dtype}, {w0.device}), layer {i} is "
                             f"({w.dtype}, {s.dtype}, {w.device}). Call once per group of layers.")
    return groups


# Work-item tables depend only on the layers' shapes: cached per (shapes, direction, device).
_ITEM_TABLES: dict = {}
_ITEM_TABLES_MAX = 64


def _work_items(sizes: tuple, backward: bool, device: torch.device) -> torch.Tensor:
    """int32 pairs (tensor index, start) for each program; ``sizes`` = ((numel, group), ...)."""
    key = (sizes, backward, str(device))
    table = _ITEM_TABLES.get(key)
    if table is None:
        items = []
        for index, (numel, group) in enumerate(sizes):
            n_groups = numel // group if numel else 0
            if not backward or group == 1:
                starts = range(0, numel, _BLOCK)
            elif group <= _SMALL_GROUP_COLS:
                starts = range(0, n_groups, _SMALL_GROUP_ROWS)
            else:
                starts = range(n_groups)
            for start in starts:
                items += (index, start)
        table = torch.tensor(items, dtype=torch.int32).to(device)
        if len(_ITEM_TABLES) >= _ITEM_TABLES_MAX:
            _ITEM_TABLES.clear()
        _ITEM_TABLES[key] = table
    return table


def _device_table(values: list[int], device: torch.device) -> torch.Tensor:
    """An int64 table on ``device``, built on the host per call (it holds the outputs' pointers).

    On CUDA it is staged in pinned memory and copied with ``non_blocking=True``: torch's blocking
    host-to-device copy synchronizes the stream, which would make the host wait for every kernel
    queued before it, once per training step. The caching host allocator keeps the pinned block
    alive until the copy is done."""
    table = torch.tensor(values, dtype=torch.int64)
    if torch.device(device).type == "cuda":
        if torch.cuda.is_current_stream_capturing():  # a graph would replay a recycled host buffer
            raise RuntimeError("the multi-layer masked-weight ops cannot be captured in a CUDA graph: their "
                               "pointer table is copied from host memory on every call")
        return table.pin_memory().to(device, non_blocking=True)
    return table.to(device)


def _pointer(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


@custom_op("vpns_fast::masked_weights",
           schema="(Tensor[] weights, Tensor[] scores, Tensor thresholds) -> Tensor[]",
           fake=_masked_weights_fake, backward=_masked_weights_op_backward,
           setup_context=_masked_weights_setup_context)
def masked_weights_fwd(weights: list[torch.Tensor], scores: list[torch.Tensor], thresholds) -> list[torch.Tensor]:
    """:func:`masked_weight_fwd` for every layer in ONE launch. ``thresholds``: one for all
    (global scope) or one per layer (1-D, layer scope)."""
    groups = _check_lists(weights, scores, "masked_weights")
    w0, s0 = weights[0], scores[0]
    compute = _compute_dtype(w0.dtype, s0.dtype)
    t = _threshold_values(thresholds, s0.dtype, compute, w0.device, count=len(weights))
    weights = [w.contiguous() for w in weights]
    scores = [s.contiguous() for s in scores]
    outs = [torch.empty_like(w, memory_format=torch.contiguous_format) for w in weights]
    items = _work_items(tuple((w.numel(), g) for w, g in zip(weights, groups)), False, w0.device)
    if items.numel():
        meta = _device_table([v for w, s, o, g in zip(weights, scores, outs, groups)
                              for v in (_pointer(w), _pointer(s), _pointer(o), w.numel(), g)], w0.device)
        _masked_weights_fwd_kernel[(items.numel() // 2,)](
            items, meta, t, weights[0], scores[0],
            BLOCK=_BLOCK, COMPUTE=_tl_dtype(compute), META=_FWD_META)
    return outs


@custom_op("vpns_fast::masked_weights_backward",
           schema="(Tensor[] grads, Tensor[] weights, Tensor[] scores, Tensor thresholds, bool need_weight, "
                  "bool need_scores) -> (Tensor[], Tensor[])",
           fake=_masked_weights_backward_fake)
def masked_weights_bwd(grads: list[torch.Tensor | None], weights: list[torch.Tensor], scores: list[torch.Tensor],
                       thresholds, need_weight: bool = True, need_scores: bool = True):
    """:func:`masked_weight_bwd` for every layer in ONE launch. Returns two lists (empty when
    that side is not needed); a None grad counts as zeros."""
    groups = _check_lists(weights, scores, "masked_weights backward")
    if len(grads) != len(weights):
        raise ValueError(f"{len(grads)} grads for {len(weights)} layers")
    w0, s0 = weights[0], scores[0]
    compute = _compute_dtype(w0.dtype, s0.dtype)
    t = _threshold_values(thresholds, s0.dtype, compute, w0.device, count=len(weights))
    grads = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, weights)]
    for i, (g, w) in enumerate(zip(grads, weights)):
        if g.shape != w.shape or g.device != w.device:
            raise ValueError(f"grad {i} has shape {tuple(g.shape)} on {g.device}, the weight "
                             f"{tuple(w.shape)} on {w.device}")
    grads = [g.to(w.dtype).contiguous() for g, w in zip(grads, weights)]
    weights = [w.contiguous() for w in weights]
    scores = [s.contiguous() for s in scores]
    grad_weights = [torch.empty_like(w, memory_format=torch.contiguous_format) for w in weights] \
        if need_weight else []
    grad_scores = [torch.empty_like(s, memory_format=torch.contiguous_format) for s in scores] \
        if need_scores else []
    items = _work_items(tuple((w.numel(), g) for w, g in zip(weights, groups)), True, w0.device)
    if items.numel() and (need_weight or need_scores):
        meta = []
        for i, (g, w, s, group) in enumerate(zip(grads, weights, scores, groups)):
            meta += (_pointer(g), _pointer(w), _pointer(s),
                     _pointer(grad_weights[i] if need_weight else None),
                     _pointer(grad_scores[i] if need_scores else None), w.numel(), s.numel(), group)
        meta = _device_table(meta, w0.device)
        _masked_weights_bwd_kernel[(items.numel() // 2,)](
            items, meta, t, weights[0], scores[0],
            BLOCK=_BLOCK, ROWS=_SMALL_GROUP_ROWS, COLS=_SMALL_GROUP_COLS, COMPUTE=_tl_dtype(compute),
            W_ROUND=_round_code(w0.dtype, compute), S_ROUND=_round_code(s0.dtype, compute),
            WRITE_GW=need_weight, WRITE_GS=need_scores, META=_BWD_META)
    return grad_weights, grad_scores


# --------------------------------------------------------------------------- backend ops

def _as_threshold_tensor(threshold, device) -> torch.Tensor:
    if isinstance(threshold, torch.Tensor):
        return threshold.detach().to(device)
    if isinstance(threshold, (list, tuple)):
        return torch.stack([torch.as_tensor(t).detach().to(device) for t in threshold])
    return torch.as_tensor(threshold, device=device)


def expand_ungrouped_scores(weight, scores):
    """Scores whose shape is no group layout the kernels address (e.g. ``[1, C_in, 1, 1]``)
    expanded to the weight's shape (a view; autograd's expand backward sums the score gradient);
    others, and shapes that do not broadcast (the ops' checks name them), unchanged."""
    if isinstance(weight, torch.Tensor) and isinstance(scores, torch.Tensor) and scores.dim() == weight.dim() \
            and broadcast_group_size(weight.shape, scores.shape) is None:
        try:
            return scores.expand(weight.shape)
        except RuntimeError:
            return scores
    return scores


def masked_weight_triton(weight, scores, threshold):
    """``weight * (|scores| > threshold)`` with the STE backward, through the custom op."""
    if not isinstance(weight, torch.Tensor) or not isinstance(scores, torch.Tensor):
        raise TypeError("weight and scores must be tensors")
    scores = expand_ungrouped_scores(weight, scores)
    return torch.ops.vpns_fast.masked_weight(weight, scores, _as_threshold_tensor(threshold, weight.device))


def masked_weights_triton(weights, scores, thresholds) -> list[torch.Tensor]:
    """Every layer's effective weight in one launch (and one backward launch).

    ``thresholds``: a scalar / 0-dim tensor shared by all layers, or one per layer (1-D tensor
    or sequence). Weights must share one dtype and device, scores one dtype.

    Model-level use: ``vpns_fast.nn.masked_layers.MaskLaunchBatching`` (a forward pre-hook that
    ``sparsify`` installs) calls this once per forward for all of a model's masked layers and
    hands each layer its effective weight; autograd runs the single fused backward once every
    layer's dL/dw_eff is ready. Each launch copies a small pointer table from pinned host memory,
    so it cannot be captured in a CUDA graph as is."""
    weights, scores = list(weights), list(scores)
    if not weights:
        raise ValueError("masked_weights: needs at least one layer")
    scores = [expand_ungrouped_scores(w, s) for w, s in zip(weights, scores)]
    return torch.ops.vpns_fast.masked_weights(weights, scores, _as_threshold_tensor(thresholds, weights[0].device))


def masked_conv2d_fused_mask_cudnn(x, weight, scores, threshold, bias=None, stride=1, padding=0, dilation=1,
                                   groups=1):
    """``F.conv2d`` (cuDNN on CUDA) of the weight masked by the fused mask kernel: the ``cudnn``
    candidate of the ``triton`` backend's measured conv dispatch (vpns_fast/ops/conv_dispatch.py)."""
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but the weight is on {weight.device}")
    return F.conv2d(x, masked_weight_triton(weight, scores, threshold), bias, stride, padding, dilation, groups)


def masked_linear_triton(x, weight, scores, threshold, bias=None):
    """The ``triton`` backend of :func:`vpns_fast.ops.masked_linear`: fused mask kernel + cuBLAS."""
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but the weight is on {weight.device}")
    return F.linear(x, masked_weight_triton(weight, scores, threshold), bias)

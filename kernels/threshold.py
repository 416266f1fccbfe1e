"""Top-k threshold over the magnitudes of one or more score tensors.

``t = kthvalue(cat(|s| for s in scores), k)`` with ``k`` 1-based: the k-th smallest magnitude.
A weight is kept when ``|s| > t`` (strict), so ties at ``t`` are pruned and exactly
``N - (number of |s| <= t)`` weights survive.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def topk_threshold_ref(scores: Sequence[torch.Tensor], k: int) -> torch.Tensor:
    """The release code's path: clone, abs, cat, ``torch.kthvalue``. ``1 <= k <= N``."""
    flat = torch.cat([s.detach().abs().flatten() for s in scores])
    return torch.kthvalue(flat, k).values


# =========================================================================== Triton kernels
#
# Multi-tensor radix select. Design decisions:
#
# * Keys. The magnitude of a float is its bit pattern with the sign bit cleared; read as an
#   integer it is monotone in |s| for every non-negative float, +inf and NaN included (NaN keys
#   sort above +inf, as torch.kthvalue sorts NaN last), and -0.0 and +0.0 share key 0. Selecting
#   the k-th smallest key and bit-casting it back is therefore exactly kthvalue(cat(|s|), k),
#   ties included, with no float arithmetic anywhere. The result is +0.0 when the k-th is a zero.
# * No concatenation, no abs copy. The host builds, once per (dtype, device, data pointers,
#   sizes) and cached, an int64 table of data pointers and sizes and a per-block table
#   (tensor index, start offset); program b of a pass reads block b of its tensor through
#   ``tl.load(ptr_table + t).to(tl.pointer_type(dtype))`` (the cast Triton's grouped-GEMM
#   tutorial uses; checked to work under TRITON_INTERPRET=1 too). Blocks never straddle tensors.
# * Passes. Digits of the key from the top, (shift, width): fp32 31-bit keys in 8/8/8/7 bits
#   (4 passes), fp16/bf16 15-bit keys in 7/8 (2 passes), fp64 63-bit keys in 11/11/11/10/10/10.
#   Each pass histograms the digit of the keys whose higher bits equal the prefix resolved so
#   far: a per-program ``tl.histogram`` of the block (keys outside the prefix left out by its
#   ``mask`` where Triton has one, else counted into bin 0 and subtracted again), then one integer
#   ``atomic_add`` per non-empty bin into a global int64 histogram. Integer atomics are
#   order-independent, so the result is deterministic.
#   Why 8-bit digits for fp32: on an H200 with Triton 3.6 (bench/threshold_radix.py, CUDA events,
#   5 rounds of 20 calls, global scope, cold, masked histogram) ResNet-18's 11.7M scores took
#   0.263 ms in 4 passes of 256 bins against 0.746 ms in 3 passes of 2048/1024/1024, ResNet-50's
#   25.5M 0.440 against 1.611 ms, and 6 passes of 32-64 bins 0.413 / 0.516 ms: the histogram's
#   cost grew with its bins far more than a pass over the scores costs in bandwidth. bf16 7/8
#   (0.20-0.21 ms) beat 5/5/5 (0.27); fp16 and fp64 were not timed. Triton 3.8 (this machine's)
#   lowers ``tl.histogram`` differently, with one shared-memory atomic per key (its sm_90 PTX of the
#   pass kernel, checked here), so there the balance may differ: re-measure before changing it.
# * Between passes a one-program select kernel does cumsum over the histogram, finds the bin
#   holding rank k, and writes the new prefix and the rank left inside that bin to a small int64
#   state buffer on the device. The next pass reads the prefix from there: nothing ever comes
#   back to the host, there is no .item() and no synchronisation; the last select kernel writes
#   the threshold, bit-cast to the score dtype, into the 0-dim output. One call is one memset
#   (histograms + state in one zeroed workspace) and two launches per pass.
# * Warm start (``hint``). A band pass histograms 256 bins of width 2**S centred on the hint's
#   key (fp32: S = 7, a band of +-2**14 ulps, +-0.1-0.2% of the value; bf16: S = 0, +-128 keys,
#   +-1 binade; fp16: +-1/8 binade; fp64: 2048 bins, S = 41) and counts the keys below the band.
#   If rank k falls inside the band, the band resolves ``key >> S`` in one pass and the cold passes
#   whose digits lie at or above S see a "skip" flag in the state and return at once; otherwise
#   they run as in a cold start. Either way the remaining passes finish the select, so the result
#   is exact for any hint (inf, NaN, negative, far off). The fallback is decided on the device
#   too: a missed hint costs one extra pass, never a host round trip. fp32 warm: 2 data passes
#   instead of 4; bf16/fp16: 1 instead of 2. Measured on the H200 (ResNet-18 fp32, hint 0.1% off)
#   it did not pay with the masked histogram the kernel uses there (0.372 ms warm against 0.263
#   cold; with the bin-0 histogram 0.249 against 0.285), nor in bf16 (0.27-0.28 against 0.21, a hint
#   equal to the answer), so the ``triton`` backend selects cold; the hint stays for callers.
# * Layer scope (``topk_thresholds_per_tensor``): every tensor is its own segment, with its own
#   state slots, histograms and k; one histogram launch per pass covers all tensors' blocks and
#   one select launch has a program per tensor. A select per layer measured 5.4-7.1 ms in fp32 for
#   ResNet-18's 21 layers on the H200 (5.4 with 3 passes, 7 launches a layer; 6.3-7.1 with 4, 9
#   launches), against 1.8-1.9 ms for a per-layer sort; the segmented select makes that 9 launches
#   in all and keeps its per-layer k table on the device between calls (no host copy, no sync). It
#   has not run on a GPU yet (compiled for sm_90 / sm_80 only).
# * Open performance questions on the GPU: BLOCK / num_warps; fusing each select kernel into the
#   next pass's programs (halves the launches, which now cost about as much as the passes).

import inspect

from vpns_fast.kernels._library import custom_op
from vpns_fast.kernels._triton import HAS_TRITON, tl, triton

# tl.histogram's `mask` (newer Triton): keys outside the prefix are left out rather than counted
# into bin 0 and subtracted, which also spares bin 0 the contention of nearly every key.
_MASKED_HISTOGRAM = HAS_TRITON and "mask" in inspect.signature(tl.histogram).parameters

# (shift, width) of each digit, most significant first, per score dtype; and the band shift S.
_RADIX_PASSES = {
    torch.float32: ((23, 8), (15, 8), (7, 8), (0, 7)),
    torch.float16: ((8, 7), (0, 8)),
    torch.bfloat16: ((8, 7), (0, 8)),
    torch.float64: ((52, 11), (41, 11), (30, 11), (20, 10), (10, 10), (0, 10)),
}
_BAND_SHIFT = {torch.float32: 7, torch.float16: 0, torch.bfloat16: 0, torch.float64: 41}
_BAND_WIDTH = {torch.float32: 8, torch.float16: 8, torch.bfloat16: 8, torch.float64: 11}  # log2 band bins
_BLOCK = 4096  # scores per program of a histogram pass
# State buffer (int64): [0] resolved key prefix, [1] rank left inside it (1-based), [2] keys
# below the band (warm start), [3] band hit flag (1: cold passes at or above the band shift
# are skipped).
_STATE_SLOTS = 4


@triton.jit
def _magnitude_key(x):
    """Bit pattern of |x| as a non-negative integer, monotone in |x| (int64 for fp64, else int32)."""
    if x.dtype == tl.float64:
        key = x.to(tl.int64, bitcast=True) & 0x7FFFFFFFFFFFFFFF
    elif x.dtype == tl.float32:
        key = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    else:  # float16, bfloat16
        key = x.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
    return key


@triton.jit
def _band_base(hint_ptr, BAND_SHIFT: tl.constexpr, BAND_BINS: tl.constexpr):
    """First ``key >> BAND_SHIFT`` of the warm-start band: the hint's, less half the band, >= 0."""
    centre = (_magnitude_key(tl.load(hint_ptr)) >> BAND_SHIFT).to(tl.int64)
    return tl.maximum(centre - BAND_BINS // 2, 0)


@triton.jit
def _topk_threshold_hist_kernel(
    ptr_table, numel_table, block_table, first_scores, state, hist, hint_ptr,
    SHIFT: tl.constexpr, WIDTH: tl.constexpr, BAND: tl.constexpr, SKIPPABLE: tl.constexpr,
    FIRST: tl.constexpr, BLOCK: tl.constexpr, MASKED_HISTOGRAM: tl.constexpr, SEGMENTED: tl.constexpr,
    STATE_SLOTS: tl.constexpr,
):
    """Histogram of one digit over one block of one score tensor, added into ``hist``.

    BAND: the digit is ``(key >> SHIFT) - band base`` for the 2**WIDTH band around the hint, and
    the keys below the band are counted into ``state[2]``. Otherwise the digit is
    ``(key >> SHIFT) & (2**WIDTH - 1)`` of the keys whose ``key >> (SHIFT + WIDTH)`` equals the
    resolved prefix (all keys when FIRST). SKIPPABLE passes do nothing after a band hit.
    SEGMENTED: every tensor is its own select, with its own state slots and histogram.
    """
    tl.static_assert(not (SKIPPABLE and SEGMENTED), "a segmented select takes no hint")
    if SKIPPABLE:
        if tl.load(state + 3) != 0:  # the band resolved this digit: no work, not even the histogram
            return
    pid = tl.program_id(0)
    t = tl.load(block_table + 2 * pid)
    start = tl.load(block_table + 2 * pid + 1)
    numel = tl.load(numel_table + t)
    if SEGMENTED:
        state += t * STATE_SLOTS
        hist += t * (1 << WIDTH)
    scores = tl.load(ptr_table + t).to(tl.pointer_type(first_scores.dtype.element_ty))
    offs = start + tl.arange(0, BLOCK)
    valid = offs < numel
    x = tl.load(scores + offs, mask=valid, other=0.0)
    # _magnitude_key(x), inlined: every nested jit call costs milliseconds under the interpreter.
    if x.dtype == tl.float64:
        key = x.to(tl.int64, bitcast=True) & 0x7FFFFFFFFFFFFFFF
    elif x.dtype == tl.float32:
        key = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    else:  # float16, bfloat16
        key = x.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
    high = key >> SHIFT
    if BAND:
        base = _band_base(hint_ptr, SHIFT, 1 << WIDTH).to(key.dtype)
        digit = high - base
        counted = valid & (digit >= 0) & (digit < (1 << WIDTH))
        below = tl.sum((valid & (digit < 0)).to(tl.int64), axis=0)
        tl.atomic_add(state + 2, below, sem="relaxed")
    else:
        digit = high & ((1 << WIDTH) - 1)
        counted = valid
        if not FIRST:
            prefix = tl.load(state + 0).to(key.dtype)
            counted = counted & ((high >> WIDTH) == prefix)
    if MASKED_HISTOGRAM:
        bins = tl.histogram(tl.where(counted, digit, 0).to(tl.int32), 1 << WIDTH, mask=counted)
    else:  # Triton without histogram masks: keys outside go to bin 0 and are taken out again
        bins = tl.histogram(tl.where(counted, digit, 0).to(tl.int32), 1 << WIDTH)
        n_out = tl.sum((~counted).to(tl.int32), axis=0)
        bins = bins - tl.where(tl.arange(0, 1 << WIDTH) == 0, n_out, 0)
    # Relaxed: the counts are read only by the next launch, which kernel boundaries order; the
    # default acq_rel adds fences per atomic (sm_90 PTX: atom.global.gpu.acq_rel vs .relaxed).
    tl.atomic_add(hist + tl.arange(0, 1 << WIDTH), bins.to(tl.int64), mask=bins > 0, sem="relaxed")


@triton.jit
def _topk_threshold_select_kernel(
    hist, state, hint_ptr, out, k, k_table,
    SHIFT: tl.constexpr, WIDTH: tl.constexpr, BAND: tl.constexpr, SKIPPABLE: tl.constexpr,
    FIRST: tl.constexpr, FINAL: tl.constexpr, SEGMENTED: tl.constexpr, STATE_SLOTS: tl.constexpr,
):
    """One program: the bin of ``hist`` that holds the remaining rank; updates the state.

    FINAL: also writes the resolved key, bit-cast to the score dtype, to ``out``.
    SEGMENTED: program i selects for tensor i (its own histogram, state, ``k_table[i]``, ``out[i]``).
    """
    if SEGMENTED:
        segment = tl.program_id(0)
        hist += segment * (1 << WIDTH)
        state += segment * STATE_SLOTS
        out += segment
        k = tl.load(k_table + segment)
    counts = tl.load(hist + tl.arange(0, 1 << WIDTH))
    cum = tl.cumsum(counts, axis=0)
    prefix = tl.load(state + 0)  # 0 from the zeroed workspace when FIRST
    if FIRST:
        rank = prefix * 0 + k
    else:
        rank = tl.load(state + 1)
    if BAND:
        rank_in_band = rank - tl.load(state + 2)
        hit = (rank_in_band >= 1) & (rank_in_band <= tl.sum(counts, axis=0))
        before = cum < rank_in_band
        bin_index = tl.sum(before.to(tl.int64), axis=0)
        before_count = tl.max(tl.where(before, cum, 0), axis=0)
        # A miss leaves prefix 0 and the full rank for the cold passes that follow.
        new_prefix = tl.where(hit, _band_base(hint_ptr, SHIFT, 1 << WIDTH) + bin_index, prefix)
        new_rank = tl.where(hit, rank_in_band - before_count, rank)
        tl.store(state + 3, hit.to(tl.int64))
    else:
        before = cum < rank
        bin_index = tl.sum(before.to(tl.int64), axis=0)
        before_count = tl.max(tl.where(before, cum, 0), axis=0)
        new_prefix = (prefix << WIDTH) | bin_index
        new_rank = rank - before_count
        if SKIPPABLE:
            skip = tl.load(state + 3) != 0
            new_prefix = tl.where(skip, prefix, new_prefix)
            new_rank = tl.where(skip, rank, new_rank)
    tl.store(state + 0, new_prefix)
    tl.store(state + 1, new_rank)
    if FINAL:
        out_type = out.dtype.element_ty
        if out_type == tl.float64:
            value = new_prefix.to(tl.float64, bitcast=True)
        elif out_type == tl.float32:
            value = new_prefix.to(tl.int32).to(tl.float32, bitcast=True)
        else:
            value = new_prefix.to(tl.int16).to(out_type, bitcast=True)
        tl.store(out, value)


# =========================================================================== launchers

_TABLE_CACHE: dict = {}
_TABLE_CACHE_SIZE = 16  # score lists are the same parameters every step: a handful of entries


def _cached_table(key: tuple, make) -> object:
    """``_TABLE_CACHE[key]``, made by ``make()`` on a miss (the oldest entry dropped when full)."""
    table = _TABLE_CACHE.get(key)
    if table is None:
        table = make()
        if len(_TABLE_CACHE) >= _TABLE_CACHE_SIZE:
            _TABLE_CACHE.pop(next(iter(_TABLE_CACHE)))
        _TABLE_CACHE[key] = table
    return table


def _block_tables(tensors: Sequence[torch.Tensor], block: int):
    """(pointer table, size table, block table) on the scores' device, cached per pointer list.

    The tables depend only on the data pointers and sizes, which are the cache key, so an address
    reused by another tensor of the same size maps to the same (still correct) tables.
    """
    device = tensors[0].device

    def make():
        blocks = [(i, start) for i, s in enumerate(tensors) for start in range(0, s.numel(), block)]
        return (
            torch.tensor([s.data_ptr() for s in tensors], dtype=torch.int64).to(device),
            torch.tensor([s.numel() for s in tensors], dtype=torch.int64).to(device),
            torch.tensor(blocks, dtype=torch.int64).reshape(-1).to(device),
        )
    return _cached_table((device, tensors[0].dtype, block, tuple((s.data_ptr(), s.numel()) for s in tensors)), make)


def _k_table(ks: Sequence[int], device: torch.device) -> torch.Tensor:
    """The per-tensor ranks as an int64 tensor on ``device``, cached like the block tables: the
    density, hence every k, stays the same step after step, and a host-to-device copy of a fresh
    CPU tensor would synchronise the stream on every call."""
    return _cached_table(("k", device, tuple(ks)), lambda: torch.tensor(list(ks), dtype=torch.int64).to(device))


def _check_rank(k, n: int, name: str, upper: str, note: str = "") -> None:
    """ValueError unless ``k`` is an int (not a bool) in [1, n]; ``upper`` names n in the message."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"{name} must be an integer in [1, {upper}]{note}, got {k!r}")


def _check_schedule(dtype: torch.dtype) -> None:
    """The pass digits must tile the key from its top bit down to bit 0, and the warm band must end
    where a pass begins (the passes after it extend the prefix the band resolved)."""
    passes, band_shift = _RADIX_PASSES[dtype], _BAND_SHIFT[dtype]
    key_bits = {torch.float64: 63, torch.float32: 31}.get(dtype, 15)
    tops = [shift + width for shift, width in passes]
    if tops[0] != key_bits or passes[-1][0] != 0 or any(t != s for t, (s, _) in zip(tops[1:], passes)):
        raise ValueError(f"radix passes {passes} do not tile the {key_bits}-bit keys of {dtype}")
    if band_shift not in [shift for shift, _ in passes]:
        raise ValueError(f"warm band shift {band_shift} of {dtype} is not where a pass begins in {passes}")


for _dtype in _RADIX_PASSES:
    _check_schedule(_dtype)


def _check_scores(tensors) -> list[torch.Tensor]:
    """What the launch needs to address the scores safely: one dtype the radix passes know and one
    device for all (the pointer table is typed by the first tensor), each read as one flat range.
    The public op (:func:`vpns_fast.ops.topk_threshold`) checks the rest of its arguments."""
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    tensors = list(tensors)
    if not tensors:
        raise ValueError("topk_threshold_triton needs at least one score tensor")
    first = tensors[0]
    checked = []
    for i, s in enumerate(tensors):
        if s.dtype not in _RADIX_PASSES:
            raise TypeError(f"scores[{i}] must be float32, float16, bfloat16 or float64, got {s.dtype}")
        if s.dtype != first.dtype or s.device != first.device:
            raise ValueError(f"all score tensors must share dtype and device: scores[0] is {first.dtype} on "
                             f"{first.device}, scores[{i}] is {s.dtype} on {s.device}")
        # Non-contiguous scores are copied (the kernels read each tensor as one flat range);
        # parameters are contiguous, so the trainer never pays for this.
        checked.append(s.detach().contiguous())
    return checked


def _topk_threshold_fake(scores, k, hint=None):
    return scores[0].new_empty(())


@custom_op("vpns_fast::topk_threshold", schema="(Tensor[] scores, SymInt k, Tensor? hint=None) -> Tensor",
           fake=_topk_threshold_fake)
def topk_threshold_fwd(tensors: Sequence[torch.Tensor], k: int, hint=None) -> torch.Tensor:
    """Launch the radix select: the k-th smallest |s| (1-based) over all tensors, as a 0-dim
    tensor of the scores' dtype. ``hint``: a guess of the result (number or tensor, e.g. the
    previous step's threshold); any hint gives the exact result, a close one saves passes."""
    tensors = _check_scores(tensors)
    n = sum(s.numel() for s in tensors)
    _check_rank(k, n, "k", f"N = {n}")
    return _radix_select(tensors, k, None, hint)


def topk_thresholds_per_tensor(tensors: Sequence[torch.Tensor], ks: Sequence[int]) -> torch.Tensor:
    """The k-th smallest |s| of each tensor on its own (``ks[i]`` for ``tensors[i]``), as a 1-D
    tensor: ``torch.stack([topk_threshold_fwd([s], k) for s, k in zip(tensors, ks)])``, bit for
    bit, in one launch per pass for all tensors (a layer-scope threshold) instead of a select each."""
    tensors = _check_scores(tensors)
    ks = list(ks)
    if len(ks) != len(tensors):
        raise ValueError(f"need one k per tensor: {len(tensors)} tensors, {len(ks)} ks")
    for i, (s, k) in enumerate(zip(tensors, ks)):
        _check_rank(k, s.numel(), f"ks[{i}]", str(s.numel()), f" (scores[{i}] has {s.numel()} elements)")
    return _radix_select(tensors, 0, ks, None)


def _radix_select(tensors: list[torch.Tensor], k: int, ks: list[int] | None, hint) -> torch.Tensor:
    """One select over all ``tensors`` (``k``), or one per tensor (``ks``: segmented, no hint)."""
    dtype, device = tensors[0].dtype, tensors[0].device
    segments = 1 if ks is None else len(tensors)
    ptr_table, numel_table, block_table = _block_tables(tensors, _BLOCK)
    grid = (block_table.numel() // 2,)
    passes = _RADIX_PASSES[dtype]
    band_shift = _BAND_SHIFT[dtype]
    steps = []  # (shift, width, band, skippable)
    if hint is not None:
        hint = torch.as_tensor(hint).detach().to(device=device, dtype=dtype).reshape(1)
        steps.append((band_shift, _BAND_WIDTH[dtype], True, False))
    for shift, width in passes:
        steps.append((shift, width, False, hint is not None and shift >= band_shift))
    offsets, total = [], 0
    for _, width, _, _ in steps:
        offsets.append(total)
        total += segments << width
    # One zeroed int64 workspace: the state slots of every segment, then each step's histograms.
    state_size = segments * _STATE_SLOTS
    workspace = torch.zeros(state_size + total, dtype=torch.int64, device=device)
    state = workspace[:state_size]
    out = torch.empty(() if ks is None else (segments,), dtype=dtype, device=device)
    k_table = out if ks is None else _k_table(ks, device)
    hint_arg = hint if hint is not None else out  # never read without a band step
    segmented = ks is not None
    for i, ((shift, width, band, skippable), offset) in enumerate(zip(steps, offsets)):
        hist = workspace[state_size + offset:]
        first = i == 0
        _topk_threshold_hist_kernel[grid](
            ptr_table, numel_table, block_table, tensors[0], state, hist, hint_arg,
            SHIFT=shift, WIDTH=width, BAND=band, SKIPPABLE=skippable, FIRST=first, BLOCK=_BLOCK,
            MASKED_HISTOGRAM=_MASKED_HISTOGRAM, SEGMENTED=segmented, STATE_SLOTS=_STATE_SLOTS, num_warps=8,
        )
        _topk_threshold_select_kernel[(segments,)](
            hist, state, hint_arg, out, k, k_table,
            SHIFT=shift, WIDTH=width, BAND=band, SKIPPABLE=skippable, FIRST=first,
            FINAL=i == len(steps) - 1, SEGMENTED=segmented, STATE_SLOTS=_STATE_SLOTS, num_warps=4,
        )
    return out


# =========================================================================== public API

def topk_threshold_triton(tensors: list[torch.Tensor], k: int, hint=None) -> torch.Tensor:
    """The ``triton`` backend of ``topk_threshold``: bit-identical to
    ``topk_threshold_ref(tensors, k)``, ``1 <= k <= N``. Eager calls launch directly; under
    ``torch.compile`` the call goes through the ``vpns_fast::topk_threshold`` custom op."""
    if torch.compiler.is_compiling():
        if hint is not None and not isinstance(hint, torch.Tensor):
            hint = torch.tensor(float(hint))
        return torch.ops.vpns_fast.topk_threshold(list(tensors), k, hint)
    return topk_threshold_fwd(tensors, k, hint)


def topk_threshold_layers_triton(tensors: list[torch.Tensor], ks: list[int]) -> torch.Tensor:
    """The ``triton`` backend's layer-scope threshold: ``ks[i]``-th smallest ``|s|`` of each tensor
    (a 1-D tensor), all tensors in one launch per pass. Under ``torch.compile``, one custom-op call
    per tensor."""
    if torch.compiler.is_compiling():
        return torch.stack([torch.ops.vpns_fast.topk_threshold([s], k, None) for s, k in zip(tensors, ks)])
    return topk_thresholds_per_tensor(tensors, ks)

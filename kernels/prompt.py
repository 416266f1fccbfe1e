"""Visual prompt + clamp + normalize: ``out = (clamp(pad(x) + P * region, 0, 1) - mean) / std``.

``P`` is ``program`` for the "pad" kind and ``sigmoid(program)`` for the others (as in the
VPNs release). The image of side ``in_size`` is zero-padded to ``out_size`` with
``top = left = (out - in + 1) // 2``. The prompt region is computed from pixel indices alone,
so a fused kernel never needs a mask tensor:

=========  ==========================================================================
kind       region (row y, column x, both in [0, out_size))
=========  ==========================================================================
pad        the outer ``pad`` pixels: ``y < p or y >= out - p or x < p or x >= out - p``
fix        the ``mask_size`` square at the top-left corner
random     the ``mask_size`` square whose top-left corner is ``(row, col)``
expansive  every pixel outside the placed image
=========  ==========================================================================
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

PROMPT_KINDS = ("pad", "fix", "random", "expansive")
# torchvision's ImageNet normalization, the release code's default
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def image_offset(in_size: int, out_size: int) -> tuple[int, int]:
    """(top/left, bottom/right) zero padding that places the image inside the output."""
    return (out_size - in_size + 1) // 2, (out_size - in_size) // 2


def prompt_region_ref(kind: str, out_size: int, in_size: int, pad: int = 0, mask_size: int = 0,
                      row: int = 0, col: int = 0, device=None) -> torch.Tensor:
    """Boolean (out_size, out_size) map of the pixels the prompt is added to."""
    y = torch.arange(out_size, device=device)[:, None]
    x = torch.arange(out_size, device=device)[None, :]
    if kind == "pad":
        return (y < pad) | (y >= out_size - pad) | (x < pad) | (x >= out_size - pad)
    if kind in ("fix", "random"):
        r0, c0 = (0, 0) if kind == "fix" else (row, col)
        return (y >= r0) & (y < r0 + mask_size) & (x >= c0) & (x < c0 + mask_size)
    if kind == "expansive":
        top, _ = image_offset(in_size, out_size)
        inside = (y >= top) & (y < top + in_size) & (x >= top) & (x < top + in_size)
        return ~inside
    raise ValueError(f"kind must be one of {PROMPT_KINDS}, got {kind!r}")


class Clamp01Inclusive(torch.autograd.Function):
    """``clamp(x, 0, 1)`` whose gradient passes where ``0 <= x <= 1``, bounds included, on every
    torch version: torch.clamp's own backward gives 0 at exactly 0 and 1 in torch 2.14.1
    (checked), which would freeze a zero-initialised pad program over the zero padding. One pass
    forward: with a ``torch.where`` formulation the whole reference forward took 2.65 ms, with
    this 1.0 ms (B=8, 224, fp32, 2-core CPU; eager F.pad + clamp + normalize: 0.73 ms)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(0, 1)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * ((x >= 0) & (x <= 1)).to(grad.dtype)


def prompt_normalize_ref(images: torch.Tensor, program: torch.Tensor, kind: str, pad: int = 0,
                         mask_size: int = 0, row: int = 0, col: int = 0,
                         mean=IMAGENET_MEAN, std=IMAGENET_STD,
                         out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Reference prompt op. ``images``: (B, C, in, in) float in [0, 1] or uint8 in [0, 255];
    ``program``: (C, out, out). Differentiable in ``program`` (and in float ``images``)."""
    compute_dtype = program.dtype
    if images.dtype == torch.uint8:
        x = images.to(compute_dtype) / 255
    else:
        compute_dtype = torch.promote_types(images.dtype, program.dtype)
        x = images.to(compute_dtype)
    out_size, in_size = program.shape[-1], images.shape[-1]
    lo, hi = image_offset(in_size, out_size)
    region = prompt_region_ref(kind, out_size, in_size, pad, mask_size, row, col, device=program.device)
    prompt = program if kind == "pad" else torch.sigmoid(program)
    # where, not a product with the region: a NaN program entry outside the region stays out, as in the kernel
    # (NaN * 0 had reached the output on this path only; an outside review)
    zero = torch.zeros((), dtype=compute_dtype, device=program.device)
    x = F.pad(x, (lo, hi, lo, hi), value=0.0) + torch.where(region, prompt.to(compute_dtype), zero)
    x = Clamp01Inclusive.apply(x)
    mean_t = torch.as_tensor(mean, dtype=compute_dtype, device=x.device)[:, None, None]
    std_t = torch.as_tensor(std, dtype=compute_dtype, device=x.device)[:, None, None]
    out = (x - mean_t) / std_t
    return out if out_dtype is None else out.to(out_dtype)


# =============================================================================== Triton kernels
#
# Design decisions (checked through the Triton interpreter; no GPU timing is recorded yet):
# * One kernel family for the four kinds. The prompt region is an axis-aligned box
#   [y0, y1) x [x0, x1) of the output, taken either as the region itself (fix, random) or as
#   its complement (pad: the box inside the frame; expansive: the placed image), so membership
#   is two comparisons per axis and no mask tensor exists.
# * Forward: one program per (block of one sample's output elements, sample). The block runs in
#   the *output's* memory order (NCHW or NHWC, the input's format), so the single write is
#   contiguous; the image is read once through its strides (any layout, uint8 or float, no
#   copy) and the program only where the region is. Compute is fp32 (fp64 when the reference's
#   compute dtype is fp64), with IEEE-rounded divisions so fp32 output matches the reference
#   to the rounding of sigmoid; bf16 output is rounded to nearest even in integer arithmetic
#   (the bits of torch's cast, also under the interpreter, whose own cast truncates). When the
#   reference's compute dtype is itself 16-bit (fp16 images and program, or a bf16 program), it
#   rounds after every op while the kernel keeps fp32 until the store: they then differ by up
#   to 1 ulp of that dtype (the tests use STYLE's low-precision rule there).
# * Backward: the gradient to ``program`` only, and only over the region: region pixels are
#   enumerated by a linear index that is mapped back to (y, x) arithmetically (a frame is top
#   band, two side bands, bottom band). Nothing is saved but the inputs: the clamp condition
#   0 <= image + prompt <= 1 (bounds included, as in the reference) is recomputed from image and
#   program. The batch reduction is deterministic and atomic-free: stage 1 writes one fp32
#   (fp64) partial sum per (batch chunk, channel, region pixel), summing its samples in order;
#   stage 2 adds the chunks in order, applies sigmoid' and scatters into a zero-initialised
#   gradient. The chunking depends on the shapes only, so two runs give the same bits.
# * No gradient to ``images`` (they are data); asking for one raises. The torch backend has it.
# * Both directions are ``torch.library`` custom ops with fake implementations, so
#   ``torch.compile`` traces them as opaque calls.

import functools

from vpns_fast.kernels._common import has_nhwc_strides
from vpns_fast.kernels._library import custom_op
from vpns_fast.kernels._triton import tl, triton

_FWD_BLOCK = 1024
_GRAD_BLOCK = 256
# Stage 1 of the program gradient splits the batch until about this many programs run.
_GRAD_TARGET_PROGRAMS = 1024


@triton.jit
def _div(a, b, FP64: tl.constexpr):
    # fp32 `/` compiles to an approximate division on NVIDIA GPUs; the reference divides exactly.
    if FP64:
        return a / b
    else:
        return tl.math.div_rn(a, b)


@triton.jit
def _round_for_store(x, TO_BF16: tl.constexpr):
    # fp32 -> bf16 rounding to nearest even in integer arithmetic: the same bits as the GPU's
    # cvt.rn and as torch's .to(bfloat16); the interpreter's own cast truncates.
    if TO_BF16:
        x = x.to(tl.float32)
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        bits = tl.where(x != x, 0x7FC00000, bits)  # NaN stays NaN
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x


@triton.jit
def _image_at(sample_ptr, c, y, x, valid, in_size, top, stride_ic, stride_iy, stride_ix,
              IS_UINT8: tl.constexpr, FP64: tl.constexpr):
    """One sample's image placed at (top, top), zero outside it, in the compute dtype."""
    iy = y - top
    ix = x - top
    in_image = valid & (iy >= 0) & (iy < in_size) & (ix >= 0) & (ix < in_size)
    value = tl.load(sample_ptr + c * stride_ic + iy * stride_iy + ix * stride_ix, mask=in_image, other=0)
    value = value.to(tl.float64 if FP64 else tl.float32)
    if IS_UINT8:
        value = _div(value, 255.0, FP64)
    return value


@triton.jit
def _prompt_at(program_ptr, c, y, x, mask, stride_pc, stride_py, stride_px,
               SIGMOID: tl.constexpr, FP64: tl.constexpr):
    """The prompt added at (c, y, x): the program, or its sigmoid. The forward adds it to the
    image and the backward recomputes ``image + prompt`` from the same operands, so the clamp
    condition is bit-identical; the backward loads it once for all samples of a chunk."""
    prompt = tl.load(program_ptr + c * stride_pc + y * stride_py + x * stride_px, mask=mask, other=0)
    prompt = prompt.to(tl.float64 if FP64 else tl.float32)
    if SIGMOID:
        prompt = 1.0 / (1.0 + tl.exp(-prompt))
    return prompt


@triton.jit
def _prompt_normalize_fwd_kernel(
    images_ptr, program_ptr, mean_ptr, std_ptr, out_ptr,
    C, in_size, out_size, top, y0, y1, x0, x1,
    stride_ib, stride_ic, stride_iy, stride_ix, stride_pc, stride_py, stride_px,
    OUTSIDE: tl.constexpr, SIGMOID: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    IS_UINT8: tl.constexpr, FP64: tl.constexpr, OUT_BF16: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(1)
    plane = out_size * out_size
    per_sample = C * plane
    q = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = q < per_sample
    if CHANNELS_LAST:
        c = q % C
        pixel = q // C
    else:
        c = q // plane
        pixel = q % plane
    y = pixel // out_size
    x = pixel % out_size
    in_box = (y >= y0) & (y < y1) & (x >= x0) & (x < x1)
    in_region = (~in_box) if OUTSIDE else in_box
    value = _image_at(images_ptr + b.to(tl.int64) * stride_ib, c, y, x, valid, in_size, top,
                      stride_ic, stride_iy, stride_ix, IS_UINT8, FP64)
    prompt = _prompt_at(program_ptr, c, y, x, valid & in_region, stride_pc, stride_py, stride_px, SIGMOID, FP64)
    value = tl.where(in_region, value + prompt, value)
    # NaN must survive the clamp as in torch (tl.minimum/maximum default to dropping it), so a
    # diverged program shows up as NaN instead of a plausible clamped value
    value = tl.minimum(tl.maximum(value, 0.0, propagate_nan=tl.PropagateNan.ALL), 1.0,
                       propagate_nan=tl.PropagateNan.ALL)
    mean = tl.load(mean_ptr + c, mask=valid, other=0)
    std = tl.load(std_ptr + c, mask=valid, other=1)
    out = _div(value - mean, std, FP64)
    out = _round_for_store(out, OUT_BF16)
    tl.store(out_ptr + b.to(tl.int64) * per_sample + q, out.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _region_pixel(i, out_size, y0, y1, x0, x1, side, OUTSIDE: tl.constexpr):
    """(y, x) of the i-th region pixel. Inside a box: row-major over the box. Outside it (a
    frame): the top band, then the rows beside the box (left part, right part), then the bottom
    band; ``side = x0 + out_size - x1`` (>= 1) is the width beside the box."""
    if OUTSIDE:
        top_count = y0 * out_size
        j = i - top_count
        is_top = j < 0
        is_side = (j >= 0) & (j < (y1 - y0) * side)
        j = tl.maximum(j, 0)
        k = j % side
        m = tl.maximum(j - (y1 - y0) * side, 0)
        y = tl.where(is_top, i // out_size, tl.where(is_side, y0 + j // side, y1 + m // out_size))
        x = tl.where(is_top, i % out_size, tl.where(is_side, tl.where(k < x0, k, x1 + k - x0), m % out_size))
    else:
        width = x1 - x0
        y = y0 + i // width
        x = x0 + i % width
    return y, x


@triton.jit
def _prompt_program_grad_kernel(
    grad_ptr, images_ptr, program_ptr, std_ptr, partial_ptr,
    B, C, in_size, out_size, top, y0, y1, x0, x1, side, n_region, batch_chunk,
    stride_gb, stride_gc, stride_gy, stride_gx,
    stride_ib, stride_ic, stride_iy, stride_ix, stride_pc, stride_py, stride_px,
    OUTSIDE: tl.constexpr, SIGMOID: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    IS_UINT8: tl.constexpr, FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    """Stage 1: partial[chunk, k] = sum over the chunk's samples of
    grad_out / std * [0 <= pre-clamp <= 1] at region element k (channel and region pixel)."""
    chunk = tl.program_id(1)
    total = C * n_region
    k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = k < total
    if CHANNELS_LAST:  # neighbouring lanes take neighbouring channels, as in grad_out's memory
        c = k % C
        i = k // C
    else:
        c = k // n_region
        i = k % n_region
    y, x = _region_pixel(i, out_size, y0, y1, x0, x1, side, OUTSIDE)
    std = tl.load(std_ptr + c, mask=valid, other=1)
    grad_offset = c * stride_gc + y * stride_gy + x * stride_gx
    b_start = chunk * batch_chunk
    sample_ptr = images_ptr + b_start.to(tl.int64) * stride_ib
    grad_sample_ptr = grad_ptr + b_start.to(tl.int64) * stride_gb
    acc = tl.zeros([BLOCK], dtype=tl.float64 if FP64 else tl.float32)
    prompt = _prompt_at(program_ptr, c, y, x, valid, stride_pc, stride_py, stride_px, SIGMOID, FP64)
    # Samples in increasing order: the sum is the same on every run.
    for _ in range(b_start, tl.minimum(b_start + batch_chunk, B)):
        value = _image_at(sample_ptr, c, y, x, valid, in_size, top, stride_ic, stride_iy, stride_ix,
                          IS_UINT8, FP64) + prompt
        g = tl.load(grad_sample_ptr + grad_offset, mask=valid, other=0).to(acc.dtype)
        acc += tl.where((value >= 0.0) & (value <= 1.0), _div(g, std, FP64), 0.0)
        sample_ptr += stride_ib
        grad_sample_ptr += stride_gb
    tl.store(partial_ptr + chunk.to(tl.int64) * total + k, acc, mask=valid)


@triton.jit
def _prompt_program_grad_reduce_kernel(
    partial_ptr, program_ptr, grad_program_ptr,
    C, out_size, y0, y1, x0, x1, side, n_region, n_chunks,
    stride_pc, stride_py, stride_px,
    OUTSIDE: tl.constexpr, SIGMOID: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    FP64: tl.constexpr, OUT_BF16: tl.constexpr, BLOCK: tl.constexpr,
):
    """Stage 2: sum the chunks in order, times sigmoid'(program), into grad_program (C, out, out)."""
    total = C * n_region
    k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = k < total
    acc = tl.zeros([BLOCK], dtype=tl.float64 if FP64 else tl.float32)
    for chunk in range(0, n_chunks):
        acc += tl.load(partial_ptr + chunk * total + k, mask=valid, other=0)
    if CHANNELS_LAST:
        c = k % C
        i = k // C
    else:
        c = k // n_region
        i = k % n_region
    y, x = _region_pixel(i, out_size, y0, y1, x0, x1, side, OUTSIDE)
    if SIGMOID:
        p = tl.load(program_ptr + c * stride_pc + y * stride_py + x * stride_px, mask=valid, other=0).to(acc.dtype)
        s = 1.0 / (1.0 + tl.exp(-p))
        acc = acc * (1.0 - s) * s  # the order of torch's sigmoid backward
    acc = _round_for_store(acc, OUT_BF16)
    tl.store(grad_program_ptr + (c * out_size + y) * out_size + x,
             acc.to(grad_program_ptr.dtype.element_ty), mask=valid)


# ------------------------------------------------------------------------------ launchers

def _region_box(kind: str, out_size: int, in_size: int, pad: int, mask_size: int, row: int, col: int):
    """(y0, y1, x0, x1, outside): the region is the box [y0, y1) x [x0, x1), or its complement."""
    if kind == "pad":
        return pad, out_size - pad, pad, out_size - pad, True
    if kind in ("fix", "random"):
        r0, c0 = (0, 0) if kind == "fix" else (row, col)
        return r0, r0 + mask_size, c0, c0 + mask_size, False
    if kind == "expansive":
        top, _ = image_offset(in_size, out_size)
        return top, top + in_size, top, top + in_size, True
    raise ValueError(f"kind must be one of {PROMPT_KINDS}, got {kind!r}")


def prompt_region_boxes(kind: str, out_size: int, in_size: int, pad: int = 0, mask_size: int = 0, row: int = 0,
                        col: int = 0) -> list[tuple[int, int, int, int]]:
    """The region as disjoint boxes (y0, y1, x0, x1), rows [y0, y1) x columns [x0, x1): the box
    itself, or for a frame its top band, the parts left and right of the box, its bottom band."""
    y0, y1, x0, x1, outside = _region_box(kind, out_size, in_size, pad, mask_size, row, col)
    if not outside:
        return [(y0, y1, x0, x1)]
    boxes = [(0, y0, 0, out_size), (y0, y1, 0, x0), (y0, y1, x1, out_size), (y1, out_size, 0, out_size)]
    return [box for box in boxes if box[0] < box[1] and box[2] < box[3]]


def check_prompt_region(kind: str, out_size: int, pad: int, mask_size: int, row: int, col: int) -> None:
    """The prompt region lies inside the output (the program gradient writes only there); the
    public op :func:`vpns_fast.ops.prompt_normalize` runs this same check for every backend."""
    if kind == "pad" and not 0 < pad < out_size / 2:
        raise ValueError(f"pad must be in [1, out_size/2) = [1, {out_size / 2:g}), got {pad}")
    if kind in ("fix", "random"):
        if not 0 < mask_size <= out_size:
            raise ValueError(f"mask_size must be in [1, out_size={out_size}], got {mask_size}")
        if kind == "random" and not (0 <= row <= out_size - mask_size and 0 <= col <= out_size - mask_size):
            raise ValueError(f"random prompt offset (row={row}, col={col}) puts the {mask_size}-pixel square "
                             f"outside the {out_size}-pixel output")


def _compute_dtype(images: torch.Tensor, program: torch.Tensor) -> torch.dtype:
    """The reference's compute dtype (also its output dtype when out_dtype is None)."""
    if images.dtype == torch.uint8:
        return program.dtype
    return torch.promote_types(images.dtype, program.dtype)


@functools.lru_cache(maxsize=64)
def _channel_stats(mean: tuple, std: tuple, dtype: torch.dtype, device: torch.device):
    # Cached so a training step does not pay a host-to-device copy per call; never mutated.
    return (torch.tensor(mean, dtype=dtype, device=device), torch.tensor(std, dtype=dtype, device=device))


def _check_prompt_inputs(images, program, kind, pad, mask_size, row, col, mean, std):
    if kind not in PROMPT_KINDS:
        raise ValueError(f"kind must be one of {PROMPT_KINDS}, got {kind!r}")
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError("images must be a (B, C, in_size, in_size) tensor")
    if images.dtype != torch.uint8 and images.dtype not in (torch.float32, torch.float64, torch.float16,
                                                            torch.bfloat16):
        raise TypeError(f"images must be float in [0, 1] or uint8 in [0, 255], got dtype {images.dtype}")
    if not isinstance(program, torch.Tensor) or program.dim() != 3 or program.shape[1] != program.shape[2]:
        raise ValueError("program must be a (C, out_size, out_size) tensor")
    if not program.is_floating_point():
        raise TypeError(f"program must be floating point, got dtype {program.dtype}")
    b, c, h, w = images.shape
    out_size = program.shape[-1]
    if c != program.shape[0] or h != w or h > out_size:
        raise ValueError(f"images {tuple(images.shape)} do not fit program {tuple(program.shape)}: need the same "
                         "channel count and square images no larger than the program")
    if images.device != program.device:
        raise ValueError(f"images are on {images.device} but program is on {program.device}")
    if len(mean) != c or len(std) != c:
        raise ValueError(f"mean and std must have one entry per channel ({c}), got {len(mean)} and {len(std)}")
    if c * out_size * out_size >= 2**31:
        raise ValueError("one sample's output must have fewer than 2**31 elements")
    check_prompt_region(kind, out_size, pad, mask_size, row, col)


# ------------------------------------------------------------------------------ custom ops
# Fake implementations and the autograd formula of ``vpns_fast::prompt_normalize`` and its
# backward ``vpns_fast::prompt_program_grad``, which the launchers below define.

def _prompt_normalize_fake(images, program, kind, pad, mask_size, row, col, mean, std, out_dtype):
    batch, channels = images.shape[:2]
    out_size = program.shape[-1]
    fmt = torch.channels_last if has_nhwc_strides(images) else torch.contiguous_format
    return torch.empty((batch, channels, out_size, out_size), device=images.device,
                       dtype=_compute_dtype(images, program) if out_dtype is None else out_dtype,
                       memory_format=fmt)


def _prompt_program_grad_fake(grad_out, images, program, kind, pad, mask_size, row, col, std):
    return torch.empty_like(program, memory_format=torch.contiguous_format)


_NO_IMAGE_GRAD = ("the triton prompt op does not differentiate with respect to images (they are data); "
                  "detach them, or use the torch backend (vpns_fast.ops.use_backend('torch')), which does")


class PromptNormalizeFunction(torch.autograd.Function):
    """Autograd for the Triton prompt op: gradient to ``program`` only."""

    @staticmethod
    def forward(images, program, kind, pad, mask_size, row, col, mean, std, out_dtype):
        return prompt_normalize_fwd(images, program, kind, pad, mask_size, row, col, mean, std, out_dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        images, program, kind, pad, mask_size, row, col, mean, std, out_dtype = inputs
        ctx.save_for_backward(images, program)
        ctx.geometry = (kind, pad, mask_size, row, col)
        ctx.mean, ctx.std, ctx.out_dtype = [float(m) for m in mean], [float(s) for s in std], out_dtype

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.needs_input_grad[0]:
            raise RuntimeError(_NO_IMAGE_GRAD)
        grad_program = None
        if ctx.needs_input_grad[1]:
            images, program = ctx.saved_tensors
            kind, pad, mask_size, row, col = ctx.geometry
            if torch.is_grad_enabled():  # create_graph=True: the kernel's gradient op has no derivative
                out = prompt_normalize_ref(images, program, kind, pad, mask_size, row, col, ctx.mean, ctx.std,
                                           ctx.out_dtype)
                (grad_program,) = torch.autograd.grad(out, program, grad_out, create_graph=True)
            else:
                grad_program = torch.ops.vpns_fast.prompt_program_grad(grad_out, images, program, kind, pad,
                                                                       mask_size, row, col, ctx.std)
        return None, grad_program, None, None, None, None, None, None, None, None


@custom_op("vpns_fast::prompt_normalize",
           schema="(Tensor images, Tensor program, str kind, int pad, int mask_size, int row, int col, "
                  "float[] mean, float[] std, ScalarType? out_dtype) -> Tensor",
           fake=_prompt_normalize_fake, backward=PromptNormalizeFunction.backward,
           setup_context=PromptNormalizeFunction.setup_context)
def prompt_normalize_fwd(images: torch.Tensor, program: torch.Tensor, kind: str, pad: int = 0,
                         mask_size: int = 0, row: int = 0, col: int = 0, mean=IMAGENET_MEAN,
                         std=IMAGENET_STD, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Forward of :func:`prompt_normalize_ref` in one pass; no autograd (see the custom op)."""
    _check_prompt_inputs(images, program, kind, pad, mask_size, row, col, mean, std)
    batch, channels, in_size, _ = images.shape
    out_size = program.shape[-1]
    compute_dtype = _compute_dtype(images, program)
    fp64 = compute_dtype == torch.float64
    channels_last = has_nhwc_strides(images)
    out = torch.empty((batch, channels, out_size, out_size),
                      dtype=compute_dtype if out_dtype is None else out_dtype,
                      device=images.device,
                      memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if out.numel() == 0:
        return out
    mean_t, std_t = _channel_stats(tuple(mean), tuple(std), torch.float64 if fp64 else torch.float32,
                                   images.device)
    y0, y1, x0, x1, outside = _region_box(kind, out_size, in_size, pad, mask_size, row, col)
    top, _ = image_offset(in_size, out_size)
    grid = (triton.cdiv(channels * out_size * out_size, _FWD_BLOCK), batch)
    _prompt_normalize_fwd_kernel[grid](
        images, program, mean_t, std_t, out,
        channels, in_size, out_size, top, y0, y1, x0, x1,
        *images.stride(), *program.stride(),
        OUTSIDE=outside, SIGMOID=kind != "pad", CHANNELS_LAST=channels_last,
        IS_UINT8=images.dtype == torch.uint8, FP64=fp64, OUT_BF16=out.dtype == torch.bfloat16, BLOCK=_FWD_BLOCK,
        num_warps=4,
    )
    return out


@custom_op("vpns_fast::prompt_program_grad",
           schema="(Tensor grad_out, Tensor images, Tensor program, str kind, int pad, int mask_size, int row, "
                  "int col, float[] std) -> Tensor",
           fake=_prompt_program_grad_fake)
def prompt_program_grad(grad_out: torch.Tensor, images: torch.Tensor, program: torch.Tensor, kind: str,
                        pad: int = 0, mask_size: int = 0, row: int = 0, col: int = 0,
                        std=IMAGENET_STD) -> torch.Tensor:
    """d loss / d program for the prompt op, given d loss / d out; exact zeros outside the region."""
    _check_prompt_inputs(images, program, kind, pad, mask_size, row, col, std, std)
    batch, channels, in_size, _ = images.shape
    out_size = program.shape[-1]
    if grad_out.shape != (batch, channels, out_size, out_size):
        raise ValueError(f"grad_out has shape {tuple(grad_out.shape)}, expected "
                         f"{(batch, channels, out_size, out_size)}")
    if grad_out.device != program.device or not grad_out.is_floating_point():
        raise ValueError(f"grad_out must be a floating tensor on {program.device}, got {grad_out.dtype} on "
                         f"{grad_out.device}")
    grad_program = torch.zeros(program.shape, dtype=program.dtype, device=program.device)
    y0, y1, x0, x1, outside = _region_box(kind, out_size, in_size, pad, mask_size, row, col)
    n_region = out_size * out_size - (y1 - y0) * (x1 - x0) if outside else (y1 - y0) * (x1 - x0)
    if batch == 0 or n_region == 0:
        return grad_program
    fp64 = _compute_dtype(images, program) == torch.float64
    acc_dtype = torch.float64 if fp64 else torch.float32
    _, std_t = _channel_stats(tuple(std), tuple(std), acc_dtype, images.device)
    total = channels * n_region
    blocks = triton.cdiv(total, _GRAD_BLOCK)
    # Split the batch into equal chunks so that stage 1 has enough programs; deterministic in
    # the shapes alone, so repeated calls sum in the same order.
    batch_chunk = triton.cdiv(batch, min(batch, max(1, _GRAD_TARGET_PROGRAMS // blocks)))
    n_chunks = triton.cdiv(batch, batch_chunk)
    partial = torch.empty((n_chunks, total), dtype=acc_dtype, device=images.device)
    channels_last = has_nhwc_strides(grad_out)
    top, _ = image_offset(in_size, out_size)
    side = max(x0 + out_size - x1, 1)
    flags = dict(OUTSIDE=outside, SIGMOID=kind != "pad", CHANNELS_LAST=channels_last, FP64=fp64,
                 BLOCK=_GRAD_BLOCK)
    _prompt_program_grad_kernel[(blocks, n_chunks)](
        grad_out, images, program, std_t, partial,
        batch, channels, in_size, out_size, top, y0, y1, x0, x1, side, n_region, batch_chunk,
        *grad_out.stride(), *images.stride(), *program.stride(),
        IS_UINT8=images.dtype == torch.uint8, num_warps=4, **flags,
    )
    _prompt_program_grad_reduce_kernel[(blocks,)](
        partial, program, grad_program,
        channels, out_size, y0, y1, x0, x1, side, n_region, n_chunks,
        *program.stride(), OUT_BF16=program.dtype == torch.bfloat16, num_warps=4, **flags,
    )
    return grad_program


def prompt_normalize_triton(images, program, kind, pad, mask_size, row, col, mean, std, out_dtype):
    """The ``triton`` backend of :func:`vpns_fast.ops.prompt_normalize` (same semantics as
    :func:`prompt_normalize_ref`); differentiable in ``program`` only."""
    if images.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(_NO_IMAGE_GRAD)
    return torch.ops.vpns_fast.prompt_normalize(images, program, kind, int(pad), int(mask_size), int(row),
                                                int(col), [float(m) for m in mean], [float(s) for s in std],
                                                out_dtype)

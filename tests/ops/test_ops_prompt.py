"""Prompt ops (pad / fix / random / expansive + clamp + normalize) against an independent,
release-style reference written here: zero-pad with F.pad, a mask built by slicing (or by
F.pad with value 1 for "expansive", as the release does), ``program * mask`` or
``sigmoid(program) * mask``, clamp, then per-channel normalization."""
from __future__ import annotations

import pytest
import torch
from helpers import backends_for, cases_on_backends, release_mask, release_prompt
from tolerance import assert_close

from vpns_fast.kernels.prompt import prompt_region_ref
from vpns_fast.ops import (
    expansive_prompt,
    fix_prompt,
    pad_prompt,
    prompt_normalize,
    random_prompt,
    use_backend,
)

KINDS = ("pad", "fix", "random", "expansive")


BACKENDS = backends_for("prompt_normalize")


def with_backends(full, reduced=None):
    return cases_on_backends(BACKENDS, full, reduced)


def call_op(kind, images, program, pad=0, mask_size=0, row=0, col=0, **kw):
    """The public per-kind entry points (not prompt_normalize), so their argument plumbing is tested."""
    if kind == "pad":
        return pad_prompt(images, program, pad, **kw)
    if kind == "fix":
        return fix_prompt(images, program, mask_size, **kw)
    if kind == "random":
        return random_prompt(images, program, mask_size, (row, col), **kw)
    return expansive_prompt(images, program, **kw)


# (out, in, pad, mask_size, row, col): even / odd sizes, in < out and in == out.
GEOMETRIES = [
    (16, 12, 3, 5, 7, 2),
    (13, 8, 3, 4, 9, 0),    # odd out, odd gap (left 3, right 2)
    (13, 13, 6, 13, 0, 0),  # in == out, the largest pad (< 6.5) and a full-size square
    (9, 4, 1, 1, 8, 8),     # 1-pixel pad / square, square in the bottom-right corner
    (7, 6, 2, 3, 0, 4),     # gap of 1: left 1, right 0
]


def _inputs(out_size, in_size, dtype, batch=2, channels=3):
    images = torch.rand(batch, channels, in_size, in_size, dtype=dtype)
    # Large enough that clamping happens in both directions.
    program = (torch.randn(channels, out_size, out_size) * 1.5).to(dtype)
    return images, program


def _kw(kind, pad, mask_size, row, col):
    return dict(pad=pad, mask_size=mask_size, row=row, col=col)


# --------------------------------------------------------------------------- forward

@pytest.mark.parametrize("kind,geometry,dtype,backend", with_backends(
    [(k, g, d) for k in KINDS for g in GEOMETRIES for d in (torch.float32, torch.float64)],
    [(k, g, torch.float32) for k in KINDS for g in GEOMETRIES[:3]]))
def test_forward_matches_release(kind, geometry, dtype, backend):
    out_size, in_size, pad, mask_size, row, col = geometry
    images, program = _inputs(out_size, in_size, dtype)
    kw = _kw(kind, pad, mask_size, row, col)
    with use_backend(backend):
        out = call_op(kind, images, program, **kw)
    ref = release_prompt(images, program, kind, **kw)
    assert out.shape == (2, 3, out_size, out_size)
    assert out.dtype == dtype
    atol = 1e-12 if dtype == torch.float64 else 2e-6
    assert_close(out.double(), ref, rtol=0, atol=atol)


@pytest.mark.parametrize("kind,backend", with_backends([(k,) for k in KINDS]))
def test_prompt_normalize_equals_per_kind_entry_points(kind, backend):
    out_size, in_size, pad, mask_size, row, col = GEOMETRIES[1]
    images, program = _inputs(out_size, in_size, torch.float32)
    kw = _kw(kind, pad, mask_size, row, col)
    with use_backend(backend):
        assert torch.equal(prompt_normalize(images, program, kind, **kw), call_op(kind, images, program, **kw))


@pytest.mark.parametrize("kind,backend", with_backends([(k,) for k in KINDS]))
def test_custom_mean_std_and_channel_count(kind, backend):
    # 2 channels and non-ImageNet statistics: nothing may assume 3 channels or the defaults.
    images = torch.rand(3, 2, 5, 5)
    program = torch.randn(2, 9, 9)
    mean, std = (0.1, 0.7), (0.5, 2.0)
    kw = _kw(kind, 2, 4, 3, 5)
    with use_backend(backend):
        out = call_op(kind, images, program, **kw, mean=mean, std=std)
    assert_close(out.double(), release_prompt(images, program, kind, **kw, mean=mean, std=std),
                               rtol=0, atol=2e-6)


@pytest.mark.parametrize("kind,backend", with_backends([(k,) for k in KINDS]))
def test_nan_in_the_program_outside_its_region_stays_out(kind, backend):
    """The reference had multiplied the program by its region, so a NaN outside the region reached the output
    there (NaN * 0) and not in the kernel (an outside review); every backend leaves it out now."""
    out_size, in_size, pad, mask_size, row, col = GEOMETRIES[1]
    images, program = _inputs(out_size, in_size, torch.float32)
    kw = _kw(kind, pad, mask_size, row, col)
    with use_backend(backend):
        clean = call_op(kind, images, program, **kw)
        region = prompt_region_ref(kind, out_size, in_size, pad, mask_size, row, col)  # where the program counts
        outside = (region.reshape(region.shape[-2:]) == 0).nonzero()[0].tolist()
        poisoned = program.clone()
        poisoned[(0, *outside)] = float("nan")
        assert torch.equal(call_op(kind, images, poisoned, **kw), clean), (kind, outside)


@pytest.mark.parametrize("kind,backend", with_backends([(k,) for k in KINDS]))
def test_uint8_images_equal_float_images_over_255(kind, backend):
    out_size, in_size, pad, mask_size, row, col = GEOMETRIES[1]
    images8 = torch.randint(0, 256, (2, 3, in_size, in_size), dtype=torch.uint8)
    images8[0, 0, 0, 0], images8[0, 0, 0, 1] = 0, 255
    _, program = _inputs(out_size, in_size, torch.float32)
    kw = _kw(kind, pad, mask_size, row, col)
    with use_backend(backend):
        out8 = call_op(kind, images8, program, **kw)
        outf = call_op(kind, images8.float() / 255, program, **kw)
    assert out8.dtype == torch.float32
    assert_close(out8, outf, rtol=0, atol=1e-6)
    assert_close(out8.double(), release_prompt(images8, program, kind, **kw), rtol=0, atol=2e-6)


@pytest.mark.parametrize("kind,backend", with_backends([(k,) for k in KINDS]))
def test_channels_last_input(kind, backend):
    out_size, in_size, pad, mask_size, row, col = GEOMETRIES[0]
    images, program = _inputs(out_size, in_size, torch.float32, batch=3)
    kw = _kw(kind, pad, mask_size, row, col)
    images_cl = images.contiguous(memory_format=torch.channels_last)
    assert not images_cl.is_contiguous()
    with use_backend(backend):
        out_cl = call_op(kind, images_cl, program, **kw)
        out = call_op(kind, images, program, **kw)
    assert_close(out_cl, out, rtol=0, atol=1e-6)
    # A non-contiguous slice of a batch as well.
    with use_backend(backend):
        out_slice = call_op(kind, images[::2], program, **kw)
    assert_close(out_slice, out[::2], rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind,out_dtype,backend",
                         with_backends([(k, d) for k in KINDS for d in (torch.bfloat16, torch.float16)]))
def test_low_precision_output(kind, out_dtype, backend):
    out_size, in_size, pad, mask_size, row, col = GEOMETRIES[1]
    images, program = _inputs(out_size, in_size, torch.float32)
    kw = _kw(kind, pad, mask_size, row, col)
    with use_backend(backend):
        out = call_op(kind, images, program, **kw, out_dtype=out_dtype)
    assert out.dtype == out_dtype
    ref = release_prompt(images, program, kind, **kw)
    # Within twice the error of plain torch rounding the exact result, plus one eps relative slack.
    eps = torch.finfo(out_dtype).eps
    assert_close(out, ref, baseline=ref.to(out_dtype), atol=eps * ref.abs() + 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_images_promote_to_program_dtype(backend):
    images, program = _inputs(9, 5, torch.float32)
    with use_backend(backend):
        out = pad_prompt(images.half(), program, 2)
    assert out.dtype == torch.float32
    assert_close(out.double(), release_prompt(images.half(), program, "pad", pad=2), rtol=0, atol=2e-6)


# --------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("kind,geometry,dtype,backend", with_backends(
    [(k, g, d) for k in KINDS for g in GEOMETRIES[:3] for d in (torch.float32, torch.float64)],
    [(k, g, torch.float32) for k in KINDS for g in GEOMETRIES[:2]]))
def test_gradients_match_release_autograd(kind, geometry, dtype, backend):
    out_size, in_size, pad, mask_size, row, col = geometry
    images, program = _inputs(out_size, in_size, dtype)
    kw = _kw(kind, pad, mask_size, row, col)
    image_grad = backend == "torch"  # the kernels are differentiable in the program only
    images_a, program_a = images.clone().requires_grad_(image_grad), program.clone().requires_grad_()
    images_b, program_b = images.clone().requires_grad_(image_grad), program.clone().requires_grad_()
    with use_backend(backend):
        out = call_op(kind, images_a, program_a, **kw)
    ref = release_prompt(images_b, program_b, kind, **kw, dtype=dtype)
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    atol = 1e-12 if dtype == torch.float64 else 1e-5
    assert_close(program_a.grad, program_b.grad, rtol=0, atol=atol)
    if image_grad:
        assert_close(images_a.grad, images_b.grad, rtol=0, atol=atol)
    # Nothing outside the prompt region may receive gradient.
    outside = release_mask(kind, out_size, in_size, 3, pad, mask_size, row, col) == 0
    assert (program_a.grad[outside] == 0).all()


# Tiny shapes, (out, in, pad, mask_size, row, col): gap 2 and in == out.
GRADCHECK_GEOMETRIES = [(5, 3, 1, 2, 1, 2), (4, 4, 1, 3, 1, 0)]


@pytest.mark.parametrize("kind,geometry,backend", with_backends(
    [(k, g) for k in KINDS for g in GRADCHECK_GEOMETRIES],
    []))  # interpreted: ~150 calls per gradcheck is too slow; the autograd comparison above covers it
def test_gradcheck(kind, geometry, backend):
    out_size, in_size, pad, mask_size, row, col = geometry
    kw = _kw(kind, pad, mask_size, row, col)
    # Keep every prompted pixel strictly inside (0, 1) so clamp is differentiable everywhere
    # the program can reach: images in [0.05, 0.3]; pad programs in [0.1, 0.4] (added raw);
    # sigmoid programs in [-2, -1] so sigmoid(program) is in [0.12, 0.27].
    images = (0.05 + 0.25 * torch.rand(1, 3, in_size, in_size, dtype=torch.float64))
    images.requires_grad_(backend == "torch")  # the kernels are differentiable in the program only
    if kind == "pad":
        program = 0.1 + 0.3 * torch.rand(3, out_size, out_size, dtype=torch.float64)
    else:
        program = -2 + torch.rand(3, out_size, out_size, dtype=torch.float64)
    program.requires_grad_()

    def f(images, program):
        with use_backend(backend):
            return call_op(kind, images, program, **kw)

    assert torch.autograd.gradcheck(f, (images, program))


# --------------------------------------------------------------------------- bad input

def _good():
    return torch.rand(2, 3, 8, 8), torch.zeros(3, 12, 12)


BAD_CALLS = [
    ("image larger than output", lambda i, p: pad_prompt(torch.rand(2, 3, 13, 13), p, 2), ValueError, "exceeds"),
    ("wrong channels", lambda i, p: pad_prompt(torch.rand(2, 1, 8, 8), p, 2), ValueError, "channels"),
    ("non-square image", lambda i, p: pad_prompt(torch.rand(2, 3, 8, 7), p, 2), ValueError, "square"),
    ("non-square program", lambda i, p: pad_prompt(i, torch.zeros(3, 12, 11), 2), ValueError, "program"),
    ("3-D images", lambda i, p: pad_prompt(i[0], p, 2), ValueError, "images"),
    ("2-D program", lambda i, p: pad_prompt(i, p[0], 2), ValueError, "program"),
    ("images not a tensor", lambda i, p: pad_prompt(i.tolist(), p, 2), ValueError, "images"),
    ("pad = half the output", lambda i, p: pad_prompt(i, p, 6), ValueError, "pad"),
    ("pad > half the output", lambda i, p: pad_prompt(i, p, 7), ValueError, "pad"),
    ("pad 0", lambda i, p: pad_prompt(i, p, 0), ValueError, "pad"),
    ("pad negative", lambda i, p: pad_prompt(i, p, -1), ValueError, "pad"),
    ("fix mask_size 0", lambda i, p: fix_prompt(i, p, 0), ValueError, "mask_size"),
    ("fix mask_size > out", lambda i, p: fix_prompt(i, p, 13), ValueError, "mask_size"),
    ("random mask_size 0", lambda i, p: random_prompt(i, p, 0, (0, 0)), ValueError, "mask_size"),
    ("random mask_size > out", lambda i, p: random_prompt(i, p, 13, (0, 0)), ValueError, "mask_size"),
    ("random row too large", lambda i, p: random_prompt(i, p, 4, (9, 0)), ValueError, "offset"),
    ("random col too large", lambda i, p: random_prompt(i, p, 4, (0, 9)), ValueError, "offset"),
    ("random row negative", lambda i, p: random_prompt(i, p, 4, (-1, 0)), ValueError, "offset"),
    ("random col negative", lambda i, p: random_prompt(i, p, 4, (0, -1)), ValueError, "offset"),
    ("mean too short", lambda i, p: pad_prompt(i, p, 2, mean=(0.5, 0.5)), ValueError, "mean"),
    ("std too long", lambda i, p: pad_prompt(i, p, 2, std=(1.0,) * 4), ValueError, "std"),
    ("std zero", lambda i, p: pad_prompt(i, p, 2, std=(1.0, 0.0, 1.0)), ValueError, "std"),
    ("int32 images", lambda i, p: pad_prompt((i * 255).int(), p, 2), TypeError, "dtype"),
    ("int64 images", lambda i, p: pad_prompt((i * 255).long(), p, 2), TypeError, "dtype"),
    ("bool images", lambda i, p: pad_prompt(i > 0.5, p, 2), TypeError, "dtype"),
    ("unknown kind", lambda i, p: prompt_normalize(i, p, "frame", pad=2), ValueError, "kind"),
]


@pytest.mark.parametrize("call,error,match", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_input(call, error, match):
    images, program = _good()
    with pytest.raises(error, match=match):
        call(images, program)


def test_limits_accepted():
    """The edges of every valid range work (and agree with the reference)."""
    images, program = _good()
    program = torch.randn_like(program)
    cases = [("pad", dict(pad=5)), ("fix", dict(mask_size=12)), ("random", dict(mask_size=4, row=8, col=8)),
             ("random", dict(mask_size=12, row=0, col=0))]
    for kind, kw in cases:
        out = prompt_normalize(images, program, kind, **kw)
        assert_close(out.double(), release_prompt(images, program, kind, **kw), rtol=0, atol=2e-6)

"""The Triton prompt + clamp + normalize kernels (kernels/prompt.py) against the reference
``prompt_normalize_ref`` next to them: forward, the gradient to ``program``, determinism.

Without CUDA these run through the Triton interpreter (tests/conftest.py), so shapes are tiny;
the tests marked for CUDA run the same checks natively at ResNet scale."""
from __future__ import annotations

import pytest
import torch
from tolerance import assert_close

from vpns_fast import ops
from vpns_fast.kernels import prompt as prompt_kernels
from vpns_fast.kernels.prompt import PROMPT_KINDS, prompt_normalize_ref, prompt_region_ref
from vpns_fast.ops import IMAGENET_MEAN, IMAGENET_STD

pytestmark = pytest.mark.skipif(
    "triton" not in ops.backend_report() or not ops.backend_report()["triton"]["ops"],
    reason="triton is not installed",
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# (out, in, pad, mask_size, row, col): in < out with an even gap, odd sizes with an odd gap
# (left 3, right 2), and in == out (the release default: the frame overlays the image).
GEOMETRIES = [
    (16, 12, 3, 5, 7, 2),
    (13, 8, 3, 4, 9, 0),
    (13, 13, 4, 6, 3, 5),
]
GEOMETRY_IDS = ["out{}-in{}".format(*g[:2]) for g in GEOMETRIES]


def _kw(geometry):
    _, _, pad, mask_size, row, col = geometry
    return dict(pad=pad, mask_size=mask_size, row=row, col=col)


def _region(kind, geometry, channels=3):
    out_size, in_size, pad, mask_size, row, col = geometry
    region = prompt_region_ref(kind, out_size, in_size, pad, mask_size, row, col, device=DEVICE)
    return region.expand(channels, out_size, out_size)


def _images(batch, channels, in_size, dtype, channels_last=False):
    if dtype == torch.uint8:
        images = torch.randint(0, 256, (batch, channels, in_size, in_size), dtype=torch.uint8, device=DEVICE)
        images[0, 0, 0, :2] = torch.tensor([0, 255], dtype=torch.uint8)
    else:
        images = torch.rand(batch, channels, in_size, in_size, device=DEVICE).to(dtype)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def _program(channels, out_size, scale=2.0):
    # randn * 2 reaches past +-3, so the clamp cuts at both ends for every kind.
    return torch.randn(channels, out_size, out_size, device=DEVICE) * scale


def _triton(images, program, kind, out_dtype=None, **kw):
    """Forward through the public op on the triton backend, with a fresh leaf program."""
    program = program.detach().clone().requires_grad_()
    with ops.use_backend("triton"):
        out = ops.prompt_normalize(images, program, kind, out_dtype=out_dtype, **kw)
    return out, program


def _reference(images, program, kind, out_dtype=None, **kw):
    program = program.detach().clone().requires_grad_()
    return prompt_normalize_ref(images, program, kind, out_dtype=out_dtype, **kw), program


def _forward_atol(kind):
    # "pad" adds the program as is and matches bit for bit; the sigmoid kinds differ by the
    # rounding of sigmoid between implementations (an ulp or two), divided by std (~0.22).
    return 1e-6 if kind == "pad" else 2e-6


# --------------------------------------------------------------------------- forward + gradient

@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8], ids=["fp32", "uint8"])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=GEOMETRY_IDS)
@pytest.mark.parametrize("kind", PROMPT_KINDS)
def test_forward_and_program_grad_match_reference(kind, geometry, dtype, channels_last):
    out_size, in_size = geometry[:2]
    images = _images(2, 3, in_size, dtype, channels_last)
    program = _program(3, out_size)
    out, program_t = _triton(images, program, kind, **_kw(geometry))
    ref, program_r = _reference(images, program, kind, **_kw(geometry))

    assert out.shape == ref.shape and out.dtype == ref.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert_close(out, ref, rtol=0, atol=_forward_atol(kind))

    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    assert_close(program_t.grad, program_r.grad, rtol=0, atol=1e-5)
    outside = ~_region(kind, geometry)
    assert (program_t.grad[outside] == 0).all()
    if kind != "expansive" or in_size < out_size:  # in == out leaves expansive no region
        assert (program_t.grad[~outside] != 0).any()


@pytest.mark.parametrize("kind", PROMPT_KINDS)
def test_clamp_saturates_and_passes_gradient_at_the_bounds(kind):
    """Large program entries saturate the clamp (zero gradient there): at both ends for the raw
    pad prompt, at the top for sigmoid prompts over the image (the expansive ring holds no image,
    so sigmoid alone never reaches 1 there). Values exactly on 0 or 1 still pass gradient, as in
    the reference."""
    geometry = (12, 8, 3, 6, 0, 0) if kind != "random" else (12, 8, 3, 6, 5, 1)
    out_size, in_size = geometry[:2]
    images = _images(2, 3, in_size, torch.uint8)
    program = torch.full((3, out_size, out_size), 8.0, device=DEVICE)
    program[:, ::2] = -3.0 if kind == "pad" else 0.0
    if kind == "pad":
        # Where the image is absent (zeros) the pre-clamp value is the program itself: 0 and 1 exactly.
        program[:, 0, :4] = torch.tensor([0.0, 1.0, 0.0, 1.0])
    out, program_t = _triton(images, program, kind, **_kw(geometry))
    ref, program_r = _reference(images, program, kind, **_kw(geometry))
    assert_close(out, ref, rtol=0, atol=_forward_atol(kind))
    mean = torch.tensor(IMAGENET_MEAN, device=DEVICE)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=DEVICE)[:, None, None]
    clamped = (out * std + mean).detach()
    region = _region(kind, geometry).expand_as(out)
    if kind != "expansive":
        assert (clamped[region] > 1 - 1e-6).any()
    if kind == "pad":
        assert (clamped[region] < 1e-6).any()

    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    assert_close(program_t.grad, program_r.grad, rtol=0, atol=1e-5)
    if kind == "pad":
        # The program is raw: -3 and 8 saturate everywhere, except at the four exact-bound entries.
        nonzero = program_t.grad != 0
        assert nonzero[:, 0, :4].all()
        nonzero[:, 0, :4] = False
        assert not nonzero.any()


@pytest.mark.parametrize("kind", PROMPT_KINDS)
def test_uint8_equals_float_over_255(kind):
    geometry = GEOMETRIES[1]
    images8 = _images(2, 3, geometry[1], torch.uint8)
    program = _program(3, geometry[0])
    out8, _ = _triton(images8, program, kind, **_kw(geometry))
    # Elementwise division: CUDA divides by a Python scalar as a product with fl(1/255), one ulp
    # off the kernel's correctly rounded x / 255 for some x.
    outf, _ = _triton(images8.float() / torch.full_like(images8, 255, dtype=torch.float32), program, kind,
                      **_kw(geometry))
    assert torch.equal(out8, outf)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=["bf16-out", "fp16-out"])
@pytest.mark.parametrize("images_dtype", [torch.float32, torch.bfloat16], ids=["fp32-in", "bf16-in"])
@pytest.mark.parametrize("kind", PROMPT_KINDS)
def test_low_precision(kind, images_dtype, out_dtype):
    geometry = GEOMETRIES[0]
    images = _images(2, 3, geometry[1], images_dtype)
    program = _program(3, geometry[0])
    out, program_t = _triton(images, program, kind, out_dtype=out_dtype, **_kw(geometry))
    assert out.dtype == out_dtype
    exact, program_r = _reference(images, program, kind, **_kw(geometry))  # fp32, the bf16 images exactly
    # STYLE float rule: within twice torch's own rounding error of the exact result, plus atol.
    torch_lowprec = exact.to(out_dtype).float()
    assert ((out.float() - exact).abs() <= 2 * (torch_lowprec - exact).abs() + 1e-5).all()

    grad = torch.randn_like(exact).to(out_dtype)
    out.backward(grad)
    exact.backward(grad.float())  # the reference with out_dtype casts the gradient back the same way
    assert_close(program_t.grad, program_r.grad, rtol=0, atol=1e-5)


def test_bf16_images_without_out_dtype_give_fp32():
    geometry = GEOMETRIES[0]
    images = _images(2, 3, geometry[1], torch.bfloat16)
    program = _program(3, geometry[0])
    out, _ = _triton(images, program, "pad", **_kw(geometry))
    ref, _ = _reference(images, program, "pad", **_kw(geometry))
    assert out.dtype == ref.dtype == torch.float32
    assert_close(out, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", PROMPT_KINDS)
def test_float64_matches_reference(kind):
    geometry = GEOMETRIES[1]
    images = _images(2, 3, geometry[1], torch.float64)
    program = _program(3, geometry[0]).double()
    out, program_t = _triton(images, program, kind, **_kw(geometry))
    ref, program_r = _reference(images, program, kind, **_kw(geometry))
    assert out.dtype == torch.float64
    assert_close(out, ref, rtol=0, atol=1e-12)
    out.sum().backward()  # an expanded (stride 0) gradient: the kernel reads it through its strides
    ref.sum().backward()
    assert_close(program_t.grad, program_r.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", PROMPT_KINDS)
def test_gradcheck_float64(kind):
    geometry = (5, 3, 1, 2, 1, 2)
    kw = _kw(geometry)
    images = 0.05 + 0.25 * torch.rand(2, 3, 3, 3, dtype=torch.float64, device=DEVICE)
    # Prompted values stay strictly inside (0, 1): the op is smooth in the program there.
    if kind == "pad":
        program = 0.1 + 0.3 * torch.rand(3, 5, 5, dtype=torch.float64, device=DEVICE)
    else:
        program = -2 + torch.rand(3, 5, 5, dtype=torch.float64, device=DEVICE)
    program.requires_grad_()

    def f(program):
        with ops.use_backend("triton"):
            return ops.prompt_normalize(images, program, kind, **kw)

    assert torch.autograd.gradcheck(f, (program,), fast_mode=True)


@pytest.mark.parametrize("kind", PROMPT_KINDS)
def test_double_backward_matches_the_reference(kind):
    """create_graph=True (a penalty on the program's gradient, differentiated again): the second-order gradient is
    the reference's (the kernel's gradient op has no derivative; before, torch raised "no autograd formula")."""
    geometry = GEOMETRIES[1]
    images = _images(2, 3, geometry[1], torch.float64)
    program0 = _program(3, geometry[0], scale=0.5).double()
    results = []
    for backend in ("triton", "torch"):
        program = program0.clone().requires_grad_()
        with ops.use_backend(backend):
            out = ops.prompt_normalize(images, program, kind, **_kw(geometry))
        (grad,) = torch.autograd.grad(out.pow(2).sum(), program, create_graph=True)
        grad.pow(2).sum().backward()
        results.append(program.grad)
    assert_close(results[0], results[1], rtol=1e-10, atol=1e-10)
    assert results[0].abs().sum() > 0


# --------------------------------------------------------------------------- reduction

@pytest.mark.parametrize("target_programs", [1, 4, 1024], ids=["one-chunk", "uneven-chunks", "chunk-per-sample"])
@pytest.mark.parametrize("kind", ["pad", "random"])
def test_batch_chunking_and_determinism(kind, target_programs, monkeypatch):
    """However stage 1 splits the batch, the gradient matches; two runs are bit-identical."""
    monkeypatch.setattr(prompt_kernels, "_GRAD_TARGET_PROGRAMS", target_programs)
    geometry = GEOMETRIES[0]
    images = _images(3, 3, geometry[1], torch.float32)
    program = _program(3, geometry[0])
    grad = torch.randn(3, 3, geometry[0], geometry[0], device=DEVICE)
    grads = []
    for _ in range(2):
        out, program_t = _triton(images, program, kind, **_kw(geometry))
        out.backward(grad)
        grads.append(program_t.grad)
    assert torch.equal(grads[0], grads[1])
    ref, program_r = _reference(images, program, kind, **_kw(geometry))
    ref.backward(grad)
    assert_close(grads[0], program_r.grad, rtol=0, atol=1e-5)


def test_non_contiguous_channels_last_grad_and_batch_slice():
    geometry = GEOMETRIES[0]
    images = _images(4, 3, geometry[1], torch.float32, channels_last=True)[::2]  # neither layout contiguous
    program = _program(3, geometry[0])
    out, program_t = _triton(images, program, "expansive", **_kw(geometry))
    ref, program_r = _reference(images, program, "expansive", **_kw(geometry))
    assert_close(out, ref, rtol=0, atol=2e-6)
    grad = torch.randn_like(ref).contiguous(memory_format=torch.channels_last)
    out.backward(grad)
    ref.backward(grad)
    assert_close(program_t.grad, program_r.grad, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- errors and plumbing

def test_images_requiring_grad_raise():
    images = torch.rand(2, 3, 8, 8, device=DEVICE, requires_grad=True)
    program = torch.zeros(3, 12, 12, device=DEVICE, requires_grad=True)
    with ops.use_backend("triton"), pytest.raises(RuntimeError, match="does not differentiate with respect to images"):
        ops.pad_prompt(images, program, 2)
    with ops.use_backend("triton"), torch.no_grad():  # nothing to differentiate: fine
        ops.pad_prompt(images, program, 2)


def test_launcher_checks():
    images = torch.rand(2, 3, 8, 8, device=DEVICE)
    program = torch.zeros(3, 12, 12, device=DEVICE)
    with pytest.raises(ValueError, match="do not fit"):
        prompt_kernels.prompt_normalize_fwd(torch.rand(2, 3, 13, 13, device=DEVICE), program, "pad", pad=2)
    with pytest.raises(ValueError, match="pad"):
        prompt_kernels.prompt_normalize_fwd(images, program, "pad", pad=6)
    with pytest.raises(TypeError, match="dtype"):
        prompt_kernels.prompt_normalize_fwd(images.int(), program, "pad", pad=2)
    with pytest.raises(ValueError, match="grad_out"):
        prompt_kernels.prompt_program_grad(torch.zeros(2, 3, 11, 11, device=DEVICE), images, program, "pad", pad=2)


def test_per_kind_entry_points_dispatch_to_triton():
    images = _images(2, 3, 8, torch.float32)
    program = _program(3, 12)
    with ops.use_backend("triton"):
        outs = [ops.pad_prompt(images, program, 2), ops.fix_prompt(images, program, 5),
                ops.random_prompt(images, program, 4, (8, 3)), ops.expansive_prompt(images, program)]
    refs = [prompt_normalize_ref(images, program, "pad", pad=2),
            prompt_normalize_ref(images, program, "fix", mask_size=5),
            prompt_normalize_ref(images, program, "random", mask_size=4, row=8, col=3),
            prompt_normalize_ref(images, program, "expansive")]
    for out, ref in zip(outs, refs):
        assert_close(out, ref, rtol=0, atol=2e-6)
    assert ops.resolve("prompt_normalize", DEVICE.type)[0] in ("triton", "cpp", "torch")


def test_autograd_function_equals_custom_op():
    images = _images(2, 3, 6, torch.float32)
    program = _program(3, 9)
    args = ("fix", 0, 4, 0, 0, IMAGENET_MEAN, IMAGENET_STD, None)
    program_f = program.clone().requires_grad_()
    out_f = prompt_kernels.PromptNormalizeFunction.apply(images, program_f, *args)
    out_o, program_o = _triton(images, program, "fix", mask_size=4)
    assert torch.equal(out_f, out_o)
    grad = torch.randn_like(out_f)
    out_f.backward(grad)
    out_o.backward(grad)
    assert torch.equal(program_f.grad, program_o.grad)


def test_custom_op_registration():
    """Schema, fake (meta) implementation and autograd registration agree with the real op."""
    images = _images(2, 3, 5, torch.float32)
    program = _program(3, 7).requires_grad_()
    args = (images, program, "pad", 2, 0, 0, 0, list(IMAGENET_MEAN), list(IMAGENET_STD), None)
    torch.library.opcheck(torch.ops.vpns_fast.prompt_normalize.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


# --------------------------------------------------------------------------- native (CUDA) only

@needs_cuda
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8], ids=["fp32", "uint8"])
@pytest.mark.parametrize("kind", PROMPT_KINDS)
def test_native_resnet_scale(kind, dtype, channels_last):
    # The release default in == out == 224, p = 16; expansive needs a smaller image to have a ring.
    in_size = 192 if kind == "expansive" else 224
    geometry = (224, in_size, 16, 32, 150, 7)
    images = _images(8, 3, in_size, dtype, channels_last)
    program = _program(3, 224)
    out, program_t = _triton(images, program, kind, **_kw(geometry))
    ref, program_r = _reference(images, program, kind, **_kw(geometry))
    # GPU exp is approximate (a few ulp): a little more slack for the sigmoid kinds.
    assert_close(out, ref, rtol=0, atol=1e-6 if kind == "pad" else 4e-6)
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    assert_close(program_t.grad, program_r.grad, rtol=0, atol=5e-5)
    assert (program_t.grad[~_region(kind, geometry)] == 0).all()
    out2, program_2 = _triton(images, program, kind, **_kw(geometry))
    out2.backward(grad)
    assert torch.equal(program_t.grad, program_2.grad)

    out_bf16, _ = _triton(images, program, kind, out_dtype=torch.bfloat16, **_kw(geometry))
    torch_lowprec = ref.detach().to(torch.bfloat16).float()
    assert ((out_bf16.float() - ref.detach()).abs() <= 2 * (torch_lowprec - ref.detach()).abs() + 1e-5).all()


@needs_cuda
@pytest.mark.parametrize("kind", PROMPT_KINDS)
def test_native_torch_compile(kind):
    geometry = (224, 192 if kind == "expansive" else 224, 16, 32, 150, 7)
    images = _images(4, 3, geometry[1], torch.uint8, channels_last=True)
    program = _program(3, 224)
    kw = _kw(geometry)

    def step(images, program):
        return prompt_kernels.prompt_normalize_triton(images, program, kind, kw["pad"], kw["mask_size"], kw["row"],
                                                      kw["col"], IMAGENET_MEAN, IMAGENET_STD, torch.bfloat16)

    program_c = program.clone().requires_grad_()
    out = torch.compile(step, fullgraph=True)(images, program_c)
    ref, program_r = _reference(images, program, kind, out_dtype=torch.bfloat16, **kw)
    assert_close(out.float(), ref.float(), rtol=0, atol=2e-2)
    out.float().square().sum().backward()
    ref.float().square().sum().backward()
    assert_close(program_c.grad, program_r.grad, rtol=1e-2, atol=1e-2)


def test_nan_in_the_program_propagates_like_the_reference():
    """A diverged program must show as NaN, not as a plausible clamped value."""
    images = torch.rand(1, 3, 8, 8, device=DEVICE)
    program = torch.zeros(3, 8, 8, device=DEVICE)
    program[0, 0, 0] = float("nan")
    with ops.use_backend("triton"):
        out = ops.pad_prompt(images, program, 2)
    with ops.use_backend("torch"):
        ref = ops.pad_prompt(images, program, 2)
    assert torch.equal(out.isnan(), ref.isnan()) and bool(out[0, 0, 0, 0].isnan())

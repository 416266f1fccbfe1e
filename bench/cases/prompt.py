"""Case `prompt`: ``pad_prompt(images, program, pad=16)`` + clamp + normalize, fwd and fwd+bwd.

Baselines:
* ``eager``    - ``F.pad + program * mask + clamp + normalize`` written plainly, as the release
  code does (a precomputed frame mask, ImageNet mean/std);
* ``compiled`` - ``torch.compile`` of that same function, compiled once per workload before
  timing (compile time is recorded as ``setup_seconds``, never timed); skipped with the reason
  when compilation is disabled or fails.
Outputs (and in mode ``full`` the program's gradient) are compared with ``torch.allclose``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.cases.common import (
    Candidate,
    Config,
    VerificationError,
    Workload,
    backend_candidates,
    compiled_candidate,
)
from bench.registry import PROMPT_BATCHES, PROMPT_IN_SIZES, PROMPT_OUT_SIZE, PROMPT_PAD
from bench.timing import input_copy_count
from vpns_fast import ops

NAME = "prompt"
OP_NAME = "prompt_normalize"
MODES = ("fwd", "full")
SUPPORTED_DTYPES = ("float32", "uint8")  # the images' dtype; the program and output are float32
DEFAULT_DTYPES = {"cpu": SUPPORTED_DTYPES, "cuda": SUPPORTED_DTYPES}
BASELINES = ["eager", "compiled"]
BASELINE_NAMES = tuple(BASELINES)  # every baseline of any config
CHANNELS = 3
OUTPUT_TOLERANCE = {torch.float32: {"rtol": 1e-5, "atol": 1e-5},
                    torch.bfloat16: {"rtol": 2**-7, "atol": 2**-7}}  # one bf16 rounding of the same float
# The program gradient sums over the batch; implementations may sum in another order.
GRADIENT_TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}
DESCRIPTION = (f"pad_prompt (p={PROMPT_PAD}, in {'/'.join(map(str, PROMPT_IN_SIZES))} -> out {PROMPT_OUT_SIZE}) "
               f"+ clamp + normalize, float32/uint8 images, modes fwd (no grad) and full (fwd + bwd to the "
               f"program); baselines: eager, compiled (torch.compile of eager)")


def configs(device_type: str, sizes: str, dtypes: list[str] | None = None) -> list[Config]:
    chosen = [d for d in (dtypes or DEFAULT_DTYPES[device_type]) if d in SUPPORTED_DTYPES]
    points = []
    for batch in PROMPT_BATCHES[(device_type, sizes)]:
        for in_size in PROMPT_IN_SIZES:
            for dtype in chosen:
                # uint8 images also as a bf16 training step reads them: output in bfloat16
                for output_dtype in ("float32", "bfloat16") if dtype == "uint8" else ("float32",):
                    suffix = "" if output_dtype == "float32" else " bf16-out"
                    for mode in MODES:
                        points.append(Config(
                            NAME, f"B={batch} in={in_size} out={PROMPT_OUT_SIZE} pad={PROMPT_PAD}{suffix}", dtype,
                            mode, {"batch": batch, "in_size": in_size, "out_size": PROMPT_OUT_SIZE, "pad": PROMPT_PAD,
                                   "kind": "pad", "sizes": sizes, "program_dtype": "float32",
                                   "output_dtype": output_dtype}))
    return points


def eager_pad_prompt(images, program, frame_mask, mean, std, pad_before: int, pad_after: int):
    """The release code's prompt path, plainly: to float, pad, add the masked program, clamp, normalize."""
    x = images.to(program.dtype).div(255) if images.dtype == torch.uint8 else images
    x = F.pad(x, (pad_before, pad_after, pad_before, pad_after), value=0.0) + program * frame_mask
    return (x.clamp(0, 1) - mean) / std


def eager_pad_prompt_bf16(images, program, frame_mask, mean, std, pad_before: int, pad_after: int):
    """The same, its output in bfloat16 (what a bf16 step feeds its first conv)."""
    return eager_pad_prompt(images, program, frame_mask, mean, std, pad_before, pad_after).to(torch.bfloat16)


def release_frame_mask(out_size, pad, device):
    mask = torch.ones(out_size, out_size, device=device)
    mask[pad:out_size - pad, pad:out_size - pad] = 0
    return mask


def _mode_runner(prompt_fn, program, mode):
    """Wraps ``prompt_fn(images, program)`` into one timed call of ``mode``."""
    if mode == "fwd":
        def run(inputs):
            images, _ = inputs
            with torch.no_grad():
                return prompt_fn(images, program)
        return run

    def run(inputs):
        images, grad_output = inputs
        program.grad = None
        out = prompt_fn(images, program)
        out.backward(grad_output)
        return out.detach(), program.grad
    return run


def compare_close(output, reference, impl_name):
    out_reference = reference[0] if isinstance(reference, tuple) else reference
    output_tolerance = OUTPUT_TOLERANCE[out_reference.dtype]
    pairs = [("output", output, reference, output_tolerance)]
    if isinstance(reference, tuple):
        pairs = [("output", output[0], reference[0], output_tolerance),
                 ("program gradient", output[1], reference[1], GRADIENT_TOLERANCE)]
    for what, got, expected, tolerance in pairs:
        if not isinstance(got, torch.Tensor) or got.shape != expected.shape or got.dtype != expected.dtype:
            raise VerificationError(f"prompt: {impl_name} {what} is {getattr(got, 'shape', type(got))} "
                                    f"{getattr(got, 'dtype', '')}, expected {tuple(expected.shape)} {expected.dtype}")
        if not torch.allclose(got, expected, **tolerance):
            error = (got - expected).abs().max().item()
            raise VerificationError(f"prompt: {impl_name} {what} differs from eager: max |error| {error:.3g} "
                                    f"(tolerance {tolerance})")


def bytes_moved(batch, in_size, out_size, pad, image_itemsize, mode, output_itemsize: int = 4) -> int:
    """Floor estimate of one call's memory traffic: images in, the output out, the float32 program;
    the backward needs only the frame: grad_output and images there, and the program gradient."""
    program_bytes = CHANNELS * out_size * out_size * 4
    forward = (batch * CHANNELS * (in_size * in_size * image_itemsize + out_size * out_size * output_itemsize)
               + program_bytes)
    if mode == "fwd":
        return forward
    frame_pixels = out_size * out_size - (out_size - 2 * pad) ** 2
    return forward + batch * CHANNELS * frame_pixels * (output_itemsize + image_itemsize) + program_bytes


def setup(config: Config, device_type: str, *, compile_baselines: bool = True, seed: int = 0) -> Workload:
    """The shared setup factory: image copies, program, backends and baselines for one config."""
    p = config.params
    batch, in_size, out_size, pad, mode = p["batch"], p["in_size"], p["out_size"], p["pad"], config.mode
    generator = torch.Generator(device=device_type).manual_seed(seed)
    image_dtype = getattr(torch, config.dtype)
    output_dtype = getattr(torch, p.get("output_dtype", "float32"))

    def random_images():
        shape = (batch, CHANNELS, in_size, in_size)
        if image_dtype == torch.uint8:
            return torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator, device=device_type)
        return torch.rand(shape, generator=generator, device=device_type)

    def random_grad_output():
        if mode == "fwd":
            return None
        return torch.randn(batch, CHANNELS, out_size, out_size, generator=generator,
                           device=device_type).to(output_dtype)

    # The program starts at zero in training; random values keep clamp and the frame honest.
    program = (0.2 * torch.randn(CHANNELS, out_size, out_size, generator=generator, device=device_type))
    program.requires_grad_(mode == "full")
    grad_bytes = out_size ** 2 * output_dtype.itemsize if mode == "full" else 0
    bytes_per_copy = batch * CHANNELS * (in_size ** 2 * image_dtype.itemsize + grad_bytes)
    copy_count = input_copy_count(device_type, bytes_per_copy, p["sizes"])
    copies = [(random_images(), random_grad_output()) for _ in range(copy_count)]

    frame_mask = release_frame_mask(out_size, pad, device_type)
    mean = torch.tensor(ops.IMAGENET_MEAN, device=device_type)[:, None, None]
    std = torch.tensor(ops.IMAGENET_STD, device=device_type)[:, None, None]
    pad_before, pad_after = (out_size - in_size + 1) // 2, (out_size - in_size) // 2

    def with_release_constants(prompt_fn):
        return lambda images, prog: prompt_fn(images, prog, frame_mask, mean, std, pad_before, pad_after)

    def backend_run(backend):
        def pad_prompt_on_backend(images, prog):
            with ops.use_backend(backend):
                return ops.pad_prompt(images, prog, pad, out_dtype=output_dtype)
        return _mode_runner(pad_prompt_on_backend, program, mode)

    eager = eager_pad_prompt if output_dtype == torch.float32 else eager_pad_prompt_bf16
    candidates = [Candidate("eager", "baseline", _mode_runner(with_release_constants(eager), program, mode)),
                  compiled_candidate(compile_baselines, eager,
                                     lambda compiled: _mode_runner(with_release_constants(compiled), program, mode),
                                     copies[0])]
    candidates += backend_candidates(OP_NAME, device_type, backend_run)
    return Workload(config, copies, candidates, list(BASELINES), compare_close,
                    bytes_moved=bytes_moved(batch, in_size, out_size, pad, image_dtype.itemsize, mode,
                                            output_dtype.itemsize),
                    notes={"bytes_moved": "floor: images + output + program; full adds the frame of "
                                          "grad_output and images, and the program gradient"})

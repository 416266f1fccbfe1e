"""Sparse CPU inference for pruned (mask-folded) models: direct sparse Conv2d / Linear layers from
``csrc/sparse_conv.cpp`` and ``convert_for_cpu``, which swaps a layer for its sparse version only
where that measures faster on the layer's real input.

Built for inference: the sparse layers hold packed nonzeros, not a weight Parameter, and their kernels have no
backward. An input that needs a gradient (autograd on, ``requires_grad``) runs through torch's dense op of the
same weight instead, so its gradient is right.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import io
import math
import numbers
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from vpns_fast import _extension
from vpns_fast.deploy import fusion, winograd
from vpns_fast.environment import cpu_vendor, is_out_of_memory
from vpns_fast.errors import caller_stacklevel, exception_reason
from vpns_fast.pruning.masking import checked_module

_REQUIRED_OPS = ("sparse_conv2d_pack", "sparse_conv2d_offsets", "check_offsets", "check_segments", "sparse_conv2d",
                 "sparse_linear_pack", "sparse_linear", "dense_linear", "max_pool2d", "global_avg_pool2d",
                 "activation_buffer", "cached_activation_bytes", "set_activation_cache_limit", "sparse_kernel_isa",
                 "set_sparse_kernel_isa", "sparse_kernel_isas", "sparse_kernel_isa_environment_note",
                 "set_streamed_output_bytes", "set_next_tile_prefetch", "set_output_prefetch_for_write",
                 "set_wide_tiles", "set_wide_tile_vectors", "sparse_tile_width", "sparse_conv2d_lanes_supported",
                 "sparse_conv2d_lanes_pack", "sparse_conv2d_lanes", "sparse_pointwise_generated_supported",
                 "sparse_pointwise_generate", "sparse_pointwise_generated", "set_private_planes_bytes",
                 "private_planes_held_bytes", "core_round_trip_ns", "winograd_conv2d", "pointwise_conv_supported",
                 "pointwise_conv_pack", "pointwise_conv", "aligned_channel_stride", "CallPlan", "ShapeChanged",
                 "ObjectChecks", "input_stage")
POLICIES = ("measure", "sparse", "dense")
# How convert_for_cpu's refusal of a model that fails on its example input begins (deploy words it anew where the
# example was its own).
FAILING_EXAMPLE = "example_input: the model fails on a tensor of shape"
# The sparse kernels' vector instruction sets, widest first (see kernel_isa); the extension's own list, which
# a test compares with this one, is what it accepts.
KERNEL_ISAS = ("avx512", "avx2", "scalar")
# Linear layers kept dense are tried sparse in the whole network only at this density or below (see
# _prefer_sparse_linears).
SPARSE_LINEAR_MAX_DENSITY = 0.25
# glibc's largest mmap threshold: a block above it is always mapped afresh (and faulted in) by malloc.
FRESH_PAGES_BYTES = 32 << 20
# A measured speedup within this fraction of min_speedup is timed again before the layer is decided:
# on the shared 2-core machine the same sparse layer (ResNet-18 layer1.0.conv1 at 10% kept, batch 1)
# measured 0.36, 0.44 and 0.63 ms in three conversions on one day.
CLOSE_CALL = 0.15


@functools.cache
def available() -> tuple[bool, str]:
    """Whether the sparse CPU kernels can run here, and why not when they cannot. Asked on every layer
    call, answered once: the extension is loaded (or found missing) once per process."""
    module = _extension.load()
    if module is None:
        return False, _extension.status()[1]
    missing = [name for name in _REQUIRED_OPS if not hasattr(module, name)]
    if missing:
        return False, (f"the C++ extension vpns_fast._C is out of date (missing {', '.join(missing)}); rebuild it: "
                       f"`python setup.py build_ext --inplace`")
    note = module.sparse_kernel_isa_environment_note()  # the extension reads VPNS_FAST_SPARSE_ISA, once
    if note:
        warnings.warn(note, stacklevel=2)
    return True, "sparse CPU kernels available"


def kernel_isa() -> str:
    """The vector kernel the sparse layers run with: the widest the CPU has, ``"avx512"`` (x86 CPUs with AVX-512F:
    Intel's, AMD's from Zen 4 on), ``"avx2"`` (AVX2 and FMA) or ``"scalar"`` (the portable loop), unless
    :func:`set_kernel_isa` or ``VPNS_FAST_SPARSE_ISA`` (read at the first call) chose another."""
    return str(_ops().sparse_kernel_isa())


def kernel_isas() -> tuple[str, ...]:
    """The kernels this CPU runs, widest first (a subset of :data:`KERNEL_ISAS`, ``"scalar"`` always in it)."""
    return tuple(str(name) for name in _ops().sparse_kernel_isas())


def set_kernel_isa(name: str) -> str:
    """Makes the sparse layers run with the kernel ``name`` (``"avx512"``, ``"avx2"`` or ``"scalar"``, one of
    :func:`kernel_isas`), e.g. to compare them on a machine; returns the previous one. Not while a sparse layer runs.
    The dense 1x1 kernel (:class:`DenseConv2d`'s ``"pointwise"``) follows: 16-lane vectors with ``"avx512"``, AVX2
    with the others."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str (one of {', '.join(KERNEL_ISAS)}), got {type(name).__name__}")
    previous = str(_ops().set_sparse_kernel_isa(name))
    _count_layer_edit()  # a compiled call plan may hold a step of one kernel only (the batch-in-lanes one)
    return previous


def _ops():
    ok, reason = available()
    if not ok:
        raise RuntimeError(f"sparse CPU inference is unavailable: {reason}")
    return _extension.load()


def cached_activation_bytes() -> int:
    """Bytes of idle activation buffers the CPU engine keeps for reuse.

    The engine's outputs of 64 KiB and more (ResNet's stem output at 224 px is 3.2 MB an image) come from a
    cache of buffers that were already touched, instead of pages the kernel maps and faults in afresh on
    every call: a 103 MB tensor took 43-46 ms to allocate and add 1 into that way, 5.7-7.6 ms recycled.
    Freed ones wait in the cache (up to ``set_activation_cache_limit``, 1 GiB by default) for the next call."""
    return int(_ops().cached_activation_bytes())


def set_activation_cache_limit(limit_bytes: int) -> int:
    """Caps the idle activation buffers the engine keeps (0: keep none, freeing each as it is released);
    what is held above the cap is freed now. Returns the previous cap."""
    if isinstance(limit_bytes, bool) or not isinstance(limit_bytes, int) or limit_bytes < 0:
        raise ValueError(f"limit_bytes must be an int >= 0, got {limit_bytes!r}")
    return int(_ops().set_activation_cache_limit(limit_bytes))


# The extension's default for set_streamed_output_bytes (its kStreamOutputBytes).
STREAMED_OUTPUT_BYTES = 8 << 20
# The extension's default for set_in_place_residual_bytes (its kInPlaceResidualBytes).
IN_PLACE_RESIDUAL_BYTES = 1 << 20
# The extension's default for set_private_planes_bytes (its kPrivatePlanesBytes).
PRIVATE_PLANES_BYTES = 512 << 10


def _checked_threshold_bytes(threshold_bytes: int) -> int:
    """``threshold_bytes`` when it is an int the extension's int64 thresholds take, [0, 2**63); else ValueError."""
    if (isinstance(threshold_bytes, bool) or not isinstance(threshold_bytes, int) or threshold_bytes < 0
            or threshold_bytes >= 1 << 63):
        raise ValueError(f"threshold_bytes must be an int in [0, 2**63), got {threshold_bytes!r}")
    return threshold_bytes


def set_streamed_output_bytes(threshold_bytes: int) -> int:
    """Sparse 1x1 convolutions whose output has at least ``threshold_bytes`` bytes (8 MiB by default) write it
    with non-temporal stores, whole cache lines straight to memory, with the AVX2 and AVX-512 kernels; 0 streams
    every 1x1 output (but those of 1x1 inputs at batch 8 and more, which run as a linear layer), ``2**63 - 1``
    none. The values are the same either way. Returns the previous threshold. Each call reads it once, so a
    change applies from the next call on; for comparing both ways on a machine."""
    return int(_ops().set_streamed_output_bytes(_checked_threshold_bytes(threshold_bytes)))


def set_in_place_residual_bytes(threshold_bytes: int) -> int:
    """Sparse convolutions told that nothing reads their residual afterwards (``residual_reusable=True``; the engine's
    graph passes it where that is so, see :func:`vpns_fast.deploy.fusion.mark_reusable_residuals`) write their output
    into the residual where the output has at least ``threshold_bytes`` bytes and is not streamed (1 MiB by default;
    0: every such output, ``2**63 - 1``: none). The values are the same either way. Returns the previous threshold.
    Why 1 MiB: on a 2-vCPU Intel Xeon (2 MiB of L2 a core), ResNet-50 at 5% kept and batch 1, writing in place made
    its 3.2 MB residual layers 1.37-1.44x and its 1.6 MB ones 1.08-1.20x as fast (the call 1.048x), its 0.8 MB ones
    0.84-0.90x (a new output of that size is recycled while still in the core's cache). Each call reads it once; for
    comparing both ways on a machine."""
    return int(_ops().set_in_place_residual_bytes(_checked_threshold_bytes(threshold_bytes)))


def in_place_residual_bytes() -> int:
    """The threshold :func:`set_in_place_residual_bytes` sets (read without changing it)."""
    return int(_ops().in_place_residual_bytes())


def set_private_planes_bytes(threshold_bytes: int) -> int:
    """Sparse convolutions of fewer than two images a thread that copy their input into zero-padded planes have
    every thread build them in a buffer of its own, kept between calls, when they take at most ``threshold_bytes``
    bytes with one thread, at most twice that with two threads or more (512 KiB by default; 0: never). With two
    threads or more each thread then fills only the rows of the planes that its share of output positions reads,
    whatever their size (ResNet-18 at 10% kept, batch 1, 2 threads, against every thread filling all of them:
    1.025x with the cores sharing their cache, 1.061x apart; ResNet-50 1.00x). Otherwise one copy is built, each
    thread filling a share, and every thread reads all of it. The values are the same either way.

    Why: where two cores do not share their last-level cache (on the 2-vCPU virtual machine measured, the host
    places its vCPUs that way for seconds to minutes at a time: :func:`core_round_trip_ns`), a thread reading the
    planes the other thread has just written waits for each cache line in turn. ResNet-18 at 10% kept, batch 1,
    2 threads measured 1.162x faster with private planes that way, and 1.016x while the cores shared their cache
    (``python -m bench.private_planes_ab``; the README's CPU section). Each call reads the threshold once; for
    comparing both ways on a machine."""
    return int(_ops().set_private_planes_bytes(_checked_threshold_bytes(threshold_bytes)))


def private_planes_held_bytes() -> int:
    """Bytes the calling thread holds for the planes it builds privately (:func:`set_private_planes_bytes`): 0 until
    a call ran part of its work on this thread with private planes, then the largest such planes, kept for the
    thread's life. Each of the engine's threads holds its own."""
    return int(_ops().private_planes_held_bytes())


def core_round_trip_ns(rounds: int = 20000, first_cpu: int = 0, second_cpu: int = 1) -> float:
    """Nanoseconds one cache line takes to go from one CPU to another and back: two threads pinned to CPUs
    ``first_cpu`` and ``second_cpu`` (indices into the CPUs the calling thread may run on) pass it back and forth
    ``rounds`` times; the mean. Linux only; it holds the GIL and spins both CPUs while it runs, so run nothing else
    meanwhile (and not while the engine's threads are busy).

    What it tells: whether those two CPUs share a last-level cache. On the 2-vCPU AMD EPYC virtual machine this
    project measures on, 50-110 ns when they do and 310-360 ns when they do not; the host switches between the two
    placements every few seconds to minutes, and the engine at batch 1 is much slower in the second (the README's
    CPU section). Benchmarks record it beside their times."""
    for name, value, low in (("rounds", rounds, 1), ("first_cpu", first_cpu, 0), ("second_cpu", second_cpu, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return float(_ops().core_round_trip_ns(rounds, first_cpu, second_cpu))


def tile_width(positions: int) -> int:
    """The output positions one tile of a sparse convolution computes on a plane of ``positions`` positions (its
    output rows on the stored planes' width), with the kernel (:func:`kernel_isa`) and :func:`set_wide_tiles` as they
    are now: the plane is cut into as few tiles as the widest tile allows, all of one width, a whole number of
    vectors. For checking which tiles a layer runs."""
    if isinstance(positions, bool) or not isinstance(positions, int) or positions < 1:
        raise ValueError(f"positions must be a positive int, got {positions!r}")
    return int(_ops().sparse_tile_width(positions))


def set_next_tile_prefetch(enabled: bool) -> bool:
    """Whether sparse convolutions request the cache lines of the next tile's output and residual while each
    tile's results are written (on by default): at batch 32 a tile's residual is a short run in each of hundreds
    of channels, which the hardware prefetchers do not follow (ResNet-50 at 10% kept, batch 32, ran 1.080x faster
    with the requests on a 2-core AMD EPYC, ``python -m bench.prefetch_ab``). The values are the same either way.
    Returns the previous setting; each call reads it once. For comparing both ways on a machine."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    return bool(_ops().set_next_tile_prefetch(enabled))


# Whether SparseConv2d runs its 3x3 layers with 7x7 or 14x14 outputs through the batch-in-lanes kernel at batches
# that are a multiple of 16 (set_batch_lanes).
_BATCH_LANES = [True]
# Images a vector of the batch-in-lanes kernel holds: the batches it takes are multiples of it.
BATCH_LANES = 16


def set_batch_lanes(enabled: bool) -> bool:
    """Whether sparse 3x3 layers with a 7x7 or 14x14 output (padding 1, stride 1 or 2, no residual, no activation
    or ReLU) run batches that are a multiple of 16 with the images in the AVX-512 vector lanes (on by default, where
    the AVX-512 kernel runs): every tap then loads one aligned vector and a 7x7 output wastes no lanes
    (csrc/batch_lanes.cpp has the measurements). The values are the same bit for bit. Returns the previous
    setting; read at each call (compiled call plans are made again). For comparing both ways on a machine."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    previous, _BATCH_LANES[0] = _BATCH_LANES[0], enabled
    _count_layer_edit()  # compiled call plans are made again with the new choice
    return previous


def generated_code_default(vendor: str) -> bool:
    """Whether :func:`set_generated_code` starts on for a CPU of ``vendor`` (``environment.cpu_vendor()``): not on
    Intel's. On a 2-vCPU Intel Xeon (48 KiB L1d, 2 MiB L2 a core; 2026-12-07, 2 threads, batch 32, 10% kept,
    ``python -m bench.generated_code_ab``) ResNet-50 ran 0.90x as fast with it, 0.95x once the lanes' channels lay an
    odd number of vectors apart, 0.99x with it on 7x7 planes only; inside the network its layers ran 0.59-1.11x
    (14x14 expanding 0.59-0.70x, two runs) where alone they ran 0.74-1.09x (14x14 expanding) and 1.24-1.57x (7x7
    expanding): the copy into the lanes and the separate epilogue (2.1 of 5.6 ms at 14x14) outweigh the faster sums
    there (bench/results/cpu-generated-code-ab-2026-12-07-intel-xeon.txt). On the Zen 4 host it gained (the rule's
    measurements, :func:`_generated_code_pays`). Every other vendor takes it: AMD's other CPUs (Zen 5) unmeasured,
    and so do other x86 vendors and a CPU whose vendor cannot be read (``""``); the extension itself requires
    AVX-512 and x86-64 Linux."""
    return vendor != "GenuineIntel"


# Whether SparseConv2d runs the 1x1 layers that sparse_pointwise_generated_supported takes through machine code
# written for their nonzeros at batches that are a multiple of 16 (set_generated_code).
_GENERATED_CODE = [generated_code_default(cpu_vendor())]


def _has_inference_tensor(tensors) -> bool:
    return any(t.is_inference() for t in tensors)


def _generated_code_pays(weight_shape: tuple[int, ...], height: int, width: int) -> bool:
    """Whether a sparse 1x1 layer of ``weight_shape`` at height x width runs faster through generated code: its input
    is copied into the vector lanes on every call, which a small output does not repay. Measured at batch 32, 10% kept,
    2 threads, against the per-image kernel (2-vCPU Zen 4, 2026-12-07; docs/cpu-engine-runs.md): 512 -> 2048 at 7x7
    1.84-1.88x, 256 -> 1024 at 14x14 1.36-1.41x, 2048 -> 512 at 7x7 1.24-1.34x; 1024 -> 256 at 14x14 (784 KiB of
    input an image) 0.77-0.79x, 128 -> 512 at 28x28 0.58x, 64 -> 256 at 56x56 0.37x; MobileNetV2 at 10% kept, its
    projections (C_out 24-320) taken too, 0.970x as fast. So: 1x1, at most 196 positions, at most 392 KiB of input an
    image, at least 512 output channels."""
    out_channels, in_channels = weight_shape[0], weight_shape[1]
    plane = height * width
    return (tuple(weight_shape[2:]) == (1, 1) and plane <= 196 and in_channels * plane <= 2048 * 49
            and out_channels >= 512)


def set_generated_code(enabled: bool) -> bool:
    """Whether sparse 1x1 layers (stride 1, no padding) with small planes and many output channels (ResNet-50's
    expanding layers at 7x7 and 14x14 and its reducing ones at 7x7; :func:`_generated_code_pays` says which) run
    batches that are a multiple of 16 through machine code written for their nonzeros when first called at an input
    size, the images in the AVX-512 vector lanes (on by default where the AVX-512 kernel runs, except on Intel CPUs:
    :func:`generated_code_default`; csrc/generated_conv.cpp has the design and measurements). The values are the
    same bit for bit. Returns the previous setting; read at each call (compiled call plans are made again). For
    comparing both ways on a machine."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    previous, _GENERATED_CODE[0] = _GENERATED_CODE[0], enabled
    _count_layer_edit()  # compiled call plans are made again with the new choice
    return previous


def set_wide_tiles(enabled: bool) -> bool:
    """Whether the AVX-512 sparse kernel computes up to 192-224 output positions a tile (12-14 zmm vectors,
    :func:`set_wide_tile_vectors`) rather than 96 (on by default): ResNet's 14x14 layers then take one tile of 13 or
    14 vectors rather than 3, a 56x56 1x1 conv 14 tiles of 14 rather than 33 of 6, so each nonzero's broadcast
    serves more vectors and more FMA chains run at once
    (csrc/sparse_conv.cpp, even_tile, has the measurements). The values are the same either way. Returns the
    previous setting; each call reads it once. For comparing both ways on a machine. (On AMD's Zen 4, which runs
    512-bit operations in halves, tiles of 6 zmm measured 0.97-1.00x the AVX2 kernel in an earlier version of the
    engine; with the wide tiles the AVX-512 kernel measured 0.99-1.09x there and became the default. Switched off,
    it has not been measured there again.)"""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    return bool(_ops().set_wide_tiles(enabled))


def set_wide_tile_vectors(vectors: int) -> int:
    """The most zmm vectors (12 to 14; 14 by default) a wide AVX-512 tile takes, where that cuts a plane into fewer
    tiles without more vectors in all: with 14, ResNet's 14x14 planes are one tile (13 or 14 vectors) rather than
    two of 7, and 56x56 planes 14 tiles of 14 rather than 17 of 12 (csrc/sparse_conv.cpp, even_tile, has the
    measurements; 12 was the limit before). The values are the same either way. Returns the previous value; each
    call reads it once. For comparing both ways on a machine."""
    if isinstance(vectors, bool) or not isinstance(vectors, int) or not 12 <= vectors <= 14:
        raise ValueError(f"vectors must be an int from 12 to 14, got {vectors!r}")
    return int(_ops().set_wide_tile_vectors(vectors))


def set_output_prefetch_for_write(enabled: bool) -> bool:
    """Whether those requests ask for the next tile's output lines for writing (x86 ``prefetchw``, on by default:
    the line comes exclusive, another core's copy invalidated) rather than for reading, after which each store must
    still take the line over from the core that read it last (at batch 1 both threads read every activation).
    ``python -m bench.output_prefetch_ab`` compares both. The values are the same either way. Returns the previous
    setting; each call reads it once."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    return bool(_ops().set_output_prefetch_for_write(enabled))


def _pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    value = tuple(int(v) for v in value)
    if len(value) == 1:
        return value[0], value[0]
    if len(value) != 2:
        raise ValueError(f"{name} must be an int or a pair, got {value}")
    return value


def _explicit_padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    """``conv``'s padding as two ints, or None where it is not symmetric ("same" with an even extent)."""
    padding = conv.padding
    if padding == "valid":
        return 0, 0
    if padding == "same":
        extents = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        if any(extent % 2 for extent in extents):
            return None
        return extents[0] // 2, extents[1] // 2
    return _pair(padding, "padding")


def _symmetric_padding(conv: nn.Conv2d, what: str) -> tuple[int, int]:
    """``conv``'s padding as two ints; ValueError naming ``what`` where it is not symmetric."""
    padding = _explicit_padding(conv)
    if padding is None:
        raise ValueError(f"{what}: padding={conv.padding!r} is not symmetric for kernel {conv.kernel_size} and "
                         f"dilation {conv.dilation}; pad the input (F.pad) and use padding=0")
    return padding


def _check_dense_weight(weight: torch.Tensor, what: str) -> torch.Tensor:
    if weight.device.type != "cpu":
        raise ValueError(f"{what}: the weight must be on the CPU, got {weight.device}")
    if weight.dtype != torch.float32:
        raise ValueError(f"{what}: only float32 weights are supported, got {weight.dtype}")
    return weight.detach().contiguous()


_AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)


def refuse_tracing(what: str) -> None:
    """RuntimeError under ``torch.jit.trace`` (the TorchScript ONNX exporter traces too): the engine's kernels are
    the extension's calls, which a trace does not record, so it would hold their outputs on the example as
    constants. A traced ResNet-18 returned the same logits for every input, and its ONNX file was a graph of one
    constant and no input. It costs 111 ns a call (timeit, 2026-12-07, the Intel Xeon guest of run al): even 60 such
    calls would be 0.04% of ResNet-50's 16.7 ms at batch 1, and the compiled call plan does not make them."""
    if torch._C._is_tracing():
        raise RuntimeError(f"{what}: torch.jit.trace (and torch.onnx.export with dynamo=False) cannot record the "
                           "CPU engine's kernels: the trace would return this call's output for every input. For "
                           "ONNX, export the checkpoint (`vpns export CHECKPOINT --format onnx` or "
                           "vpns_fast.export); or trace the model before deploying it")


def _checked_input(x: torch.Tensor, what: str) -> torch.Tensor:
    """``x`` as the kernels take it: a float32 CPU tensor. Under ``torch.autocast("cpu")`` the layers the engine
    keeps as torch ops return bfloat16 / float16; the engine's layers compute in float32 there (the input cast
    up), as autocast does for the ops it keeps in float32. Any other dtype or device: ValueError. Under a trace:
    :func:`refuse_tracing`."""
    refuse_tracing(what)
    if x.dtype == torch.float32 and x.is_cpu:  # is_cpu: x.device makes a new object each time (0.2 us more)
        return x
    if x.device.type == "cpu" and x.dtype in _AUTOCAST_DTYPES and torch.is_autocast_enabled("cpu"):
        return x.float()
    raise ValueError(f"{what}: the input must be a float32 CPU tensor, got {x.dtype} on {x.device}")


def _checked_conv_input(x: torch.Tensor, residual: torch.Tensor | None,
                        what: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    x = _checked_input(x, what)
    if x.dim() not in (3, 4):
        raise ValueError(f"{what}: input must be [N, C, H, W] or unbatched [C, H, W], got shape {tuple(x.shape)}")
    return x, None if residual is None else _checked_input(residual, f"{what} residual")


def _needs_gradient(x: torch.Tensor, residual: torch.Tensor | None = None) -> bool:
    """Whether autograd must see the layer: the C++ kernels and oneDNN's call have no backward formula."""
    return torch.is_grad_enabled() and (x.requires_grad or (residual is not None and residual.requires_grad))


def _hashable_geometry(layer: nn.Module) -> tuple:
    """A layer's ``(stride, padding, dilation, groups)`` for a cache key: lists (set by a caller) as tuples."""
    stride, padding, dilation = layer.stride, layer.padding, layer.dilation
    if type(stride) is tuple and type(padding) is tuple and type(dilation) is tuple:  # as the layers set them
        return stride, padding, dilation, layer.groups
    return tuple(stride), tuple(padding), tuple(dilation), layer.groups


def _known_output_shape(cache: dict, x: torch.Tensor, geometry: tuple) -> tuple[int, ...] | None:
    """The output shape ``cache`` holds for ``x``'s shape when it was computed for ``geometry`` (the layer's weight
    shape and :func:`_hashable_geometry`, compared by value: an attribute set anew, or a list changed in place,
    does not match), else None."""
    entry = cache.get(x.shape)
    return entry[1] if entry is not None and entry[0] == geometry else None


def _with_output_shape(cache: dict, x: torch.Tensor, geometry: tuple, shape: tuple[int, ...]) -> dict:
    """A new dict (another thread may be reading ``cache``): ``cache``'s 7 most recent entries of this geometry
    and ``x``'s shape -> ``shape``."""
    kept = {key: entry for key, entry in list(cache.items())[-7:] if entry[0] == geometry and key != x.shape}
    kept[x.shape] = (geometry, shape)
    return kept


def _writable(residual_reusable: bool, residual: torch.Tensor | None, x: torch.Tensor) -> bool:
    """Whether a layer may write its output into ``residual`` in place while it reads ``x``: only where the caller
    says nothing reads the residual afterwards (``residual_reusable``) and there is one; not when they share memory,
    and an inference tensor only inside ``torch.inference_mode`` (torch refuses the write elsewhere)."""
    return (residual_reusable and residual is not None
            and (not residual.is_inference() or torch.is_inference_mode_enabled())
            and residual.untyped_storage().data_ptr() != x.untyped_storage().data_ptr())


def _conv_output_shape(x: torch.Tensor, weight_shape, stride, padding, dilation) -> tuple[int, ...]:
    shape = [x.shape[0], weight_shape[0]]
    for size, kernel, step, pad, spacing in zip(x.shape[2:], weight_shape[2:], stride, padding, dilation):
        shape.append((size + 2 * pad - spacing * (kernel - 1) - 1) // step + 1)
    return tuple(shape)


def _broadcast_residual(residual: torch.Tensor | None, output_shape: tuple[int, ...], what: str) -> bool:
    """Whether ``residual`` must be added apart (by torch): it broadcasts with the output but has another shape.
    The add was fused where both had one shape on the model's example; another batch size can make them
    differ (a residual of batch 1 added to every image). ValueError naming ``what`` when they do not broadcast."""
    if residual is None or residual.shape == output_shape:
        return False
    try:
        torch.broadcast_shapes(residual.shape, output_shape)
    except RuntimeError:
        raise ValueError(f"{what}: residual of shape {tuple(residual.shape)} does not broadcast with the output's "
                         f"shape {tuple(output_shape)}") from None
    return True


# The activations a layer's fused epilogue can apply last (after the bias and the residual), with the number the
# C++ kernel knows each by; each is computed as torch computes it (silu: x / (1 + exp(-x)), the exp within
# float32 rounding; hardswish: x * clamp(x + 3, 0, 6) / 6; sigmoid: 1 / (1 + exp(-x))), NaN kept.
EPILOGUE_ACTIVATIONS = {"relu": 1, "silu": 2, "relu6": 3, "hardswish": 4, "sigmoid": 5, "hardsigmoid": 6}


def _sigmoid(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    return x.sigmoid_() if inplace else torch.sigmoid(x)


_TORCH_ACTIVATIONS = {"relu": F.relu, "silu": F.silu, "relu6": F.relu6, "hardswish": F.hardswish,
                      "sigmoid": _sigmoid, "hardsigmoid": F.hardsigmoid}


def _checked_activation(activation, relu: bool, owner: str) -> str | None:
    if activation is not None and (not isinstance(activation, str) or activation not in EPILOGUE_ACTIVATIONS):
        raise ValueError(f"{owner}: activation must be None or one of {sorted(EPILOGUE_ACTIVATIONS)}, got "
                         f"{activation!r}")
    if not isinstance(relu, bool):  # relu="silu" (or a sixth positional argument meant as groups) would read as True
        raise ValueError(f"{owner}: relu must be a bool, got {relu!r}")
    if relu and activation not in (None, "relu"):
        raise ValueError(f"{owner}: relu=True contradicts activation={activation!r}")
    return "relu" if relu else activation


def _activated(out: torch.Tensor, activation: str | None) -> torch.Tensor:
    """``activation`` applied to ``out`` by torch, in place unless autograd records ``out``."""
    if activation is None:
        return out
    if activation == "relu" and not out.requires_grad:
        return out.relu_()  # F.relu's wrapper costs 1-2 us more a call; NaN stays NaN either way
    return _TORCH_ACTIVATIONS[activation](out, inplace=not out.requires_grad)


def _unfused_epilogue(out: torch.Tensor, residual: torch.Tensor | None, activation: str | None) -> torch.Tensor:
    """A fused layer's epilogue in torch, after a call made without it: ``activation(out + residual)``, the add
    broadcasting as the model's own add did."""
    if residual is not None:
        out = out + residual
    return _TORCH_ACTIVATIONS[activation](out) if activation is not None else out


def cast_by(fn, device: torch.device | str = "cpu") -> torch.Tensor:
    """What ``nn.Module._apply``'s ``fn`` (``.half()``, ``.to(dtype or device)``, ``.cuda()``...) makes of a float32
    tensor on ``device``: its dtype and device are what the call would give a module's weights there."""
    return fn(torch.zeros(1, dtype=torch.float32, device=device))  # float32 whatever the default dtype


# Attributes the engine's layers write during their calls (caches of geometry, packed weights and output shapes): not
# edits of the layer.
_CALL_CACHES = frozenset({"_geometry_cache", "_output_shapes", "_packed", "_small_output_shapes"})
_LAYER_EDITS = [0]


def layer_edits() -> int:
    """A count that moves whenever one of the engine's layers is edited (an attribute set or deleted, a buffer
    registered, ``.to()`` and the like, ``refresh()``) or an engine switch of this module is set: what a compiled
    call plan (vpns_fast.deploy.call_plan) compares on every run, since those edits change what the layers compute
    without changing a tensor it watches."""
    return _LAYER_EDITS[0]


def _count_layer_edit() -> None:
    _LAYER_EDITS[0] += 1


class _CountedEdits:
    """Counts this layer's edits in :func:`layer_edits` (its own call caches excepted)."""

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name not in _CALL_CACHES:
            _count_layer_edit()

    def __delattr__(self, name):
        super().__delattr__(name)
        _count_layer_edit()

    def register_buffer(self, name, tensor, persistent=True):
        super().register_buffer(name, tensor, persistent)
        _count_layer_edit()

    def _apply(self, fn, recurse=True):
        _count_layer_edit()
        return super()._apply(fn, recurse)


class _Float32CpuLayer(_CountedEdits):
    """The engine's layers run float32 on the CPU only. ``.half()``, ``.double()``, ``.to(dtype)`` or a move to
    another device is refused (TypeError naming the layer) before any tensor changes: it used to succeed and leave
    the next call to fail inside the kernel's argument checks. Inputs of other dtypes are the deployed module's to
    convert; for another device, deploy again. (A network holding these layers beside torch ones may have cast
    those before the refusal: cast-check the deployed module, which refuses first.)"""

    def _apply(self, fn, recurse=True):
        probe = cast_by(fn)
        if probe.dtype != torch.float32 or probe.device.type != "cpu":
            raise TypeError(f"{type(self).__name__}: the CPU engine's layers run float32 on the CPU only; this call "
                            f"would make them {probe.dtype} on {probe.device} (deploy again for another device; "
                            "inputs of other float dtypes are converted by the deployed module)")
        return super()._apply(fn, recurse)


class _FusedActivation:
    """``activation`` (None or a name in EPILOGUE_ACTIVATIONS): what a layer's fused epilogue applies last,
    checked when set. ``relu`` reads and sets it as the flag it was before the epilogue had other activations."""

    _activation: str | None = None  # the class's value: read by layers pickled before the attribute existed

    @property
    def activation(self) -> str | None:
        return self._activation

    @activation.setter
    def activation(self, value: str | None) -> None:
        self._activation = _checked_activation(value, False, type(self).__name__)

    @property
    def relu(self) -> bool:
        return self._activation == "relu"

    @relu.setter
    def relu(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise ValueError(f"{type(self).__name__}: relu must be a bool, got {value!r}")
        if value:
            self._activation = "relu"
        elif self._activation == "relu":
            self._activation = None

    def _activation_repr(self) -> str:
        return f", activation={self._activation!r}" if self._activation is not None else ""

    @staticmethod
    def _state_with_activation(state: dict) -> dict:
        """A pickled layer's state with its ``relu`` flag (pickled before activations other than ReLU existed) as
        its activation: the flag is a property now, which an instance attribute of that name would not reach."""
        relu = state.pop("relu", False)
        state.setdefault("_activation", "relu" if relu else None)
        return state


def aligned_channel_stride(height: int, width: int) -> int:
    """Floats from one channel to the next in an aligned output of a sparse conv (SparseConv2d's ``aligned_output``):
    the plane ``height * width`` rounded up to whole 64-byte cache lines (16 floats) when it is above 8, else the
    plane. A 1x1 conv reads its input in place; with channels 196 floats apart (14x14) every other channel starts 16
    bytes off a 32-byte boundary, and a vector load across two cache lines costs two (csrc/sparse_conv.cpp,
    aligned_plane_stride, has the measurements). The rule is the C++ extension's, read from it (once per size)."""
    return _aligned_plane_stride(height * width)


@functools.lru_cache(maxsize=256)
def _aligned_plane_stride(plane: int) -> int:
    return int(_ops().aligned_channel_stride(plane))


def _padded_channel_stride(x: torch.Tensor) -> int:
    """S when the 4-d ``x`` is laid out as an aligned output, channels S = :func:`aligned_channel_stride` > H * W
    floats apart (strides ``(C * S, S, W, 1)``), which the kernel then reads as it is; else 0 (read as a contiguous
    tensor: any other strides, a channel slice for one, are copied as before, so that no stride a user makes reaches
    the offsets). A contiguous input, the common case, is answered without reading its strides."""
    if x.is_contiguous():
        return 0
    _, channels, height, width = x.shape
    stride = aligned_channel_stride(height, width)
    if stride > height * width and x.stride() == (channels * stride, stride, width, 1):
        return stride
    return 0


class SparseConv2d(_Float32CpuLayer, _FusedActivation, nn.Module):
    """A Conv2d (zero padding) whose nonzero weights are packed per output channel and
    run by the direct sparse convolution: ``forward(x) == F.conv2d(x, weight, bias, ...)`` within
    float32 rounding. Exact zeros of the weight are skipped. A grouped convolution (``groups`` > 1, ``weight``
    ``[C_out, C_in / groups, KH, KW]`` as nn.Conv2d's) runs as the ungrouped one of its block-diagonal weight:
    output channel ``o``'s nonzeros are packed with the input channels of its own group, so the same kernel
    runs it, and only the grouped weight's nonzeros are stored (the block-diagonal weight is never built).

    Fused epilogue: ``forward(x, residual)`` adds ``residual`` (the output's shape) and ``activation``
    (a name in ``EPILOGUE_ACTIVATIONS``: ``"relu"``, ``"silu"``, ``"relu6"``, ``"hardswish"``, ``"sigmoid"``,
    ``"hardsigmoid"``; ``relu=True`` is ``activation="relu"``) is applied, in the kernel's output loop:
    ``activation(conv(x) + bias + residual)``.

    ``forward(..., aligned_output=True)`` (the engine's graph passes it where only sparse convolutions read the
    output, one of them a 1x1 reading it in place: :func:`vpns_fast.deploy.fusion.mark_aligned_outputs`): the
    output's channels start a whole number of 64-byte cache lines apart, strides ``(C * P, P, W, 1)`` with ``P`` the
    plane ``H * W`` rounded up to a multiple of 16 floats (when above 8), zeros in between. The values are the same;
    a 1x1 conv reading such an input in place loads aligned vectors (see :func:`aligned_channel_stride`), and every
    sparse conv reads it, as input or residual, without a copy."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0, dilation=1,
                 relu: bool = False, groups: int = 1, activation: str | None = None):
        super().__init__()
        self._activation = _checked_activation(activation, relu, "SparseConv2d")
        ops = _ops()
        weight = _check_dense_weight(weight, "SparseConv2d")
        if weight.dim() != 4:
            raise ValueError(f"SparseConv2d: weight must be 4-d [C_out, C_in / groups, KH, KW], got shape "
                             f"{tuple(weight.shape)}")
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or weight.shape[0] % groups:
            raise ValueError(f"SparseConv2d: groups must be an int >= 1 dividing C_out={weight.shape[0]}, "
                             f"got {groups!r}")
        self.groups = groups
        # the shape the kernel runs: the ungrouped (block-diagonal) weight's
        self.weight_shape = (weight.shape[0], weight.shape[1] * groups, *weight.shape[2:])
        self.stride = _pair(stride, "stride")
        self.padding = _pair(padding, "padding")
        self.dilation = _pair(dilation, "dilation")
        # packed outside inference mode even when built inside it: inference tensors have no version
        # counter, which the geometry cache below keys on
        # (the bias too: an inference tensor among the buffers made a later load_state_dict outside
        # inference mode fail)
        with torch.inference_mode(False):
            row_ptr, channel_index, tap_index, values = ops.sparse_conv2d_pack(weight)
            if groups > 1:  # each nonzero's input channel within its group -> among all input channels
                channel_index = channel_index + self._group_channel_offsets(row_ptr).to(channel_index.dtype)
            bias = None if bias is None else _check_dense_weight(bias, "SparseConv2d bias").clone()
        self.register_buffer("row_ptr", row_ptr)
        self.register_buffer("channel_index", channel_index)
        self.register_buffer("tap_index", tap_index)
        self.register_buffer("values", values)
        self.register_buffer("bias", bias)
        # {key: (the kernel's arguments, the packed tensors they were made from)}: see _geometry
        self._geometry_cache: dict[tuple, tuple[tuple, tuple[torch.Tensor, ...]]] = {}
        self._output_shapes: dict[torch.Size, tuple] = {}  # see _output_shape

    @classmethod
    def from_dense(cls, conv: nn.Conv2d) -> SparseConv2d:
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"SparseConv2d.from_dense expects an nn.Conv2d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"SparseConv2d supports padding_mode='zeros' only, got {conv.padding_mode!r}")
        return cls(conv.weight, conv.bias, conv.stride, _symmetric_padding(conv, "SparseConv2d"), conv.dilation,
                   groups=conv.groups)

    # what code written for the nn.Conv2d it replaces may read (``x.to(self.conv.weight.dtype)``,
    # ``self.conv.out_channels``); without them such a model was refused or failed at its first other input size
    groups = 1  # the class's value: layers pickled before grouped convolutions ran sparse
    padding_mode = "zeros"

    def _group_channel_offsets(self, row_ptr: torch.Tensor) -> torch.Tensor:
        """Per nonzero, the first input channel of its output channel's group."""
        out_channels, in_channels = self.weight_shape[:2]
        rows = torch.repeat_interleave(torch.arange(out_channels), row_ptr.diff())
        return rows // (out_channels // self.groups) * (in_channels // self.groups)

    @property
    def in_channels(self) -> int:
        return self.weight_shape[1]

    @property
    def out_channels(self) -> int:
        return self.weight_shape[0]

    @property
    def kernel_size(self) -> tuple[int, int]:
        return self.weight_shape[2], self.weight_shape[3]

    @property
    def weight(self) -> torch.Tensor:
        """A dense copy of the weight as nn.Conv2d holds it (``[C_out, C_in / groups, KH, KW]``), made on every
        read (``grouped_weight``): writing into it does not change the layer, and reading it on every call costs
        a pass over the dense weight."""
        return self.grouped_weight()

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def density(self) -> float:
        """Kept fraction of the weight as nn.Conv2d holds it (a grouped layer's, not the block-diagonal one's)."""
        total = math.prod(self.weight_shape) // self.groups
        return self.nnz / total if total else 0.0

    def to_dense_weight(self) -> torch.Tensor:
        """The dense weight of the ungrouped convolution the kernel runs (zeros where nothing is stored; for a
        grouped layer the block-diagonal weight, ``groups`` times the grouped one's size)."""
        return self._scattered(self.channel_index.long(), self.weight_shape[1])

    def grouped_weight(self) -> torch.Tensor:
        """The dense weight as nn.Conv2d holds it: ``[C_out, C_in / groups, KH, KW]`` (``to_dense_weight``'s
        when ``groups`` is 1)."""
        if self.groups == 1:
            return self.to_dense_weight()
        local = self.channel_index.long() - self._group_channel_offsets(self.row_ptr)
        return self._scattered(local, self.weight_shape[1] // self.groups)

    def _scattered(self, channels: torch.Tensor, in_channels: int) -> torch.Tensor:
        """A zero ``[C_out, in_channels, KH, KW]`` weight holding each nonzero at its row, ``channels`` and tap."""
        out_channels, _, kernel_h, kernel_w = self.weight_shape
        rows = torch.repeat_interleave(torch.arange(out_channels), self.row_ptr.diff())
        weight = self.values.new_zeros(out_channels, in_channels, kernel_h * kernel_w)
        weight[rows, channels, self.tap_index.long()] = self.values
        return weight.view(out_channels, in_channels, kernel_h, kernel_w)

    @property
    def reads_input_in_place(self) -> bool:
        """Whether the kernel reads the input itself rather than a padded copy (a 1x1, stride-1, unpadded conv),
        so that its offsets depend on the input's channel stride."""
        return self.weight_shape[2:] == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)

    def _geometry(self, height: int, width: int, channel_stride: int = 0, packing: str = "per-image") -> tuple | None:
        """The weights packed for one kernel at inputs of height x width, kept per input size. ``packing``:
        ``"per-image"``: (offsets as the kernel's ``CheckedOffsets``, segments as its ``CheckedSegments``, values in
        the kernel's block-major order) for inputs whose channels are ``channel_stride`` floats apart (0: height *
        width; see :func:`aligned_channel_stride`); the ordered values are a copy (4 bytes a nonzero each): the block
        size, and so the order, depends on the input size (csrc/sparse_conv.cpp, SegmentLayout). ``"lanes"``: (segments,
        offsets, values) of the batch-in-lanes kernel (:func:`set_batch_lanes`), for a geometry it takes.
        ``"generated"``: (code, its weights) of a 1x1 layer's machine code (:func:`set_generated_code`), or None
        where the packed buffers are inference tensors (the code would be written again at every call)."""
        # the buffers straight from their dict, the offsets computed in a method rather than a closure made
        # anew: a call on a tiny input took 19.2 us, 7.9 us now (this lookup 7.0 -> 0.7 us; ResNet-50 makes 53
        # such calls an image; measured 2026-12-03)
        buffers = self._buffers
        packed = (buffers["row_ptr"], buffers["channel_index"], buffers["tap_index"], buffers["values"])
        if _has_inference_tensor(packed):
            # buffers replaced inside torch.inference_mode (.to() or load_state_dict there) have no version
            # counter to reveal an in-place change: recompute rather than risk stale offsets or values; but not
            # the generated code, whose writing (3.8-4.6 ms for a 7x7 layer of ResNet-50) would then come with
            # every call
            return None if packing == "generated" else self._compute_geometry(height, width, channel_stride, packing)
        # keyed on the packed tensors' identity and version too: load_state_dict can swap in a
        # different mask with the same number of nonzeros, whose offsets differ, or other values. The entry holds
        # the tensors it was made from, so that no new tensor can take their address while it is kept (an outside
        # review: a buffer reassigned twice came back at the first one's address, version 0, and read stale code)
        key = (height, width, channel_stride, packing, *((t.data_ptr(), t._version) for t in packed),
               *_hashable_geometry(self))  # an attribute set anew: new offsets
        cache = self._geometry_cache  # one read: another thread may replace it meanwhile
        entry = cache.get(key)
        if entry is None:
            entry = (self._compute_geometry(height, width, channel_stride, packing), packed)
        elif next(reversed(cache)) == key:  # the size used last: nothing to reorder
            return entry[0]
        # a new dict, never one changed in place, so a thread reading the old one is not disturbed; the size just
        # used goes last and the least recently used first (a 9th input size used to drop all 8)
        kept = {k: v for k, v in cache.items() if k != key}
        while len(kept) >= 8:
            del kept[next(iter(kept))]
        kept[key] = entry
        self._geometry_cache = kept
        return entry[0]

    def _compute_geometry(self, height: int, width: int, channel_stride: int, packing: str = "per-image") -> tuple:
        ops = _ops()
        if packing == "generated":
            return tuple(ops.sparse_pointwise_generate(self.row_ptr, self.channel_index, self.values,
                                                       list(self.weight_shape), [height, width]))
        if packing == "lanes":
            arguments = ([height, width], list(self.stride), list(self.padding), list(self.dilation))
            offsets, segments, values = ops.sparse_conv2d_lanes_pack(
                self.row_ptr, self.channel_index, self.tap_index, self.values, list(self.weight_shape), *arguments)
            return segments, ops.check_offsets(offsets), values
        offsets, segments, values = ops.sparse_conv2d_offsets(
            self.row_ptr, self.channel_index, self.tap_index, self.values, list(self.weight_shape),
            [height, width], list(self.stride), list(self.padding), list(self.dilation),
            input_channel_stride=channel_stride)
        # the offsets and segments as the kernel's own checked copies: each call then checks the offsets' range
        # against the input rather than reading every offset (that pass cost ResNet-50 2.8% of its time at 10%
        # kept, batch 1), and only the segments' ends against the values rather than their order (csrc/vpns_ops.h,
        # CheckedSegments); a call plan's step shares both
        return ops.check_offsets(offsets), ops.check_segments(segments), values

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None, *, residual_reusable: bool = False,
                aligned_output: bool = False) -> torch.Tensor:
        """``activation(conv(input) + bias (+ residual))``, a new tensor unless written into the residual (below;
        ``aligned_output``: laid out as the class says; a path that does not run the kernel returns it contiguous).
        ``residual_reusable=True`` tells the layer
        that nothing reads ``residual`` after this call (the engine's graph rewrite sets it where that is so): the
        kernel may then write its output into the residual and return it, where the output is large enough for that
        to pay (:func:`set_in_place_residual_bytes`), the residual is laid out as the output would be and shares no
        memory with the input; the batch-in-lanes and generated-code paths (batches of 16) always write a new
        tensor."""
        x, residual = _checked_conv_input(input, residual, "SparseConv2d")
        if _needs_gradient(x, residual):
            # the kernel has no backward: torch's convolution of the same weight keeps the input's gradient right
            out = F.conv2d(x, self.grouped_weight(), self._buffers["bias"], self.stride, self.padding, self.dilation,
                           self.groups)
            return _unfused_epilogue(out, residual, self.activation)
        if x.dim() == 3:  # unbatched, as nn.Conv2d takes it
            return _unfused_epilogue(self._run(x.unsqueeze(0), None, None).squeeze(0), residual, self.activation)
        if residual is not None and _broadcast_residual(residual, self._output_shape(x), "SparseConv2d"):
            return _unfused_epilogue(self._run(x, None, None), residual, self.activation)
        return self._run(x, residual, self.activation, aligned_output,
                         _writable(residual_reusable, residual, x))

    def _output_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        """The output's shape for a 4-d ``x``, kept per input shape with the geometry it was computed for
        (:func:`_known_output_shape`). A call with a residual on a tiny input (64 -> 64 1x1, 2x2 px,
        medians of 5000, 2026-12-04) took 11.1 us, 8.7-9.6 us with this cache and ``_checked_input`` reading ``is_cpu``
        rather than ``device``; the kernel's call alone 4.5-5.0 us. ResNet-50 makes 16 such calls an
        image."""
        geometry = (self.weight_shape, *_hashable_geometry(self))
        shape = _known_output_shape(self._output_shapes, x, geometry)
        if shape is None:
            shape = _conv_output_shape(x, self.weight_shape, self.stride, self.padding, self.dilation)
            self._output_shapes = _with_output_shape(self._output_shapes, x, geometry, shape)
        return shape

    def _run(self, x: torch.Tensor, residual: torch.Tensor | None, activation: str | None,
             aligned_output: bool = False, residual_reusable: bool = False) -> torch.Tensor:
        generated = self._generated_arguments(x, residual, activation)
        if generated is not None:
            return _ops().sparse_pointwise_generated(x, *generated, self._buffers["bias"], residual,
                                                     EPILOGUE_ACTIVATIONS.get(activation, 0), aligned_output)
        lanes = self._lanes_arguments(x, residual, activation)
        if lanes is not None:
            return _ops().sparse_conv2d_lanes(x, *lanes, self.weight_shape, self._buffers["bias"], self.stride,
                                              self.padding, self.dilation, EPILOGUE_ACTIVATIONS.get(activation, 0),
                                              aligned_output)
        segments, offsets, values, channel_stride = self._kernel_arguments(x)
        return _ops().sparse_conv2d(x, segments, offsets, values, self.weight_shape, self._buffers["bias"],
                                    self.stride, self.padding, self.dilation, residual,
                                    EPILOGUE_ACTIVATIONS.get(activation, 0), input_channel_stride=channel_stride,
                                    aligned_output=aligned_output, residual_reusable=residual_reusable)

    def _lanes_arguments(self, x: torch.Tensor, residual: torch.Tensor | None, activation: str | None) -> tuple | None:
        """(segments, offsets, values) of the batch-in-lanes kernel for the 4-d ``x`` (:func:`set_batch_lanes`), or
        None where it does not run this call."""
        if (not _BATCH_LANES[0] or residual is not None or activation not in (None, "relu") or self.groups != 1
                or not x.shape[0] or x.shape[0] % BATCH_LANES or not self._lanes_geometry(x.shape[2], x.shape[3])
                or _ops().sparse_kernel_isa() != "avx512"):
            return None
        segments, offsets, values = self._geometry(x.shape[2], x.shape[3], packing="lanes")
        return segments, offsets, values

    def _generated_arguments(self, x: torch.Tensor, residual: torch.Tensor | None,
                             activation: str | None) -> tuple | None:
        """(code, weights) of this layer's machine code for the 4-d ``x`` (:func:`set_generated_code`), or None where
        it does not run this call. A system that refuses executable memory turns it off with a warning."""
        if (not _GENERATED_CODE[0] or activation not in (None, "relu") or self.groups != 1 or not x.shape[0]
                or x.shape[0] % BATCH_LANES
                or not _generated_code_pays(self.weight_shape, x.shape[2], x.shape[3])
                or not _ops().sparse_pointwise_generated_supported(list(self.weight_shape), [x.shape[2], x.shape[3]],
                                                                   list(self.stride), list(self.padding),
                                                                   list(self.dilation))
                or _ops().sparse_kernel_isa() != "avx512"):
            return None
        try:
            return self._geometry(x.shape[2], x.shape[3], packing="generated")  # None for inference-tensor buffers
        except RuntimeError as exc:
            if "executable memory" not in str(exc):
                raise
            _GENERATED_CODE[0] = False
            warnings.warn(f"sparse 1x1 layers run without generated code: {exception_reason(exc)}", RuntimeWarning,
                          stacklevel=caller_stacklevel())
            return None

    def _lanes_geometry(self, height: int, width: int) -> bool:
        """Whether the batch-in-lanes kernel takes this layer at height x width, asked before any cache is touched
        (a lookup for a layer it does not take had reordered the offsets' cache on every call)."""
        return bool(_ops().sparse_conv2d_lanes_supported(list(self.weight_shape), [height, width], list(self.stride),
                                                         list(self.padding), list(self.dilation)))

    def _kernel_arguments(self, x: torch.Tensor) -> tuple:
        """(segments, offsets, values, input channel stride): the kernel's arguments for the 4-d ``x``, as ``_run``
        and a compiled call plan pass them."""
        channel_stride = _padded_channel_stride(x)
        # only an in-place read's offsets depend on it: the others share one set
        offsets, segments, values = self._geometry(
            x.shape[2], x.shape[3], channel_stride if channel_stride and self.reads_input_in_place else 0)
        return segments, offsets, values, channel_stride

    def add_to_plan(self, plan, slots: tuple[int, int, int], x: torch.Tensor, residual: torch.Tensor | None = None,
                    *, residual_reusable: bool = False, aligned_output: bool = False) -> bool:
        """Adds to ``plan`` (a ``CallPlan`` of the extension) the call ``self(x, residual, ...)`` makes, reading
        and writing ``slots`` (input, residual or -1, output), and returns True; False (nothing added) where that
        call is not the kernel's (``x`` needs a gradient, is unbatched, or the residual broadcasts). The plan is
        made for ``x``'s shape and layout only."""
        if _needs_gradient(x, residual) or x.dim() != 4 or (
                residual is not None and _broadcast_residual(residual, self._output_shape(x), "SparseConv2d")):
            return False
        generated = self._generated_arguments(x, residual, self._activation)
        if generated is not None:
            plan.add_sparse_pointwise_generated(*slots, *generated, self._buffers["bias"],
                                                EPILOGUE_ACTIVATIONS.get(self._activation, 0), aligned_output)
            return True
        lanes = self._lanes_arguments(x, residual, self._activation)
        if lanes is not None:
            plan.add_sparse_conv_lanes(slots[0], slots[2], *lanes, list(self.weight_shape), self._buffers["bias"],
                                       list(self.stride), list(self.padding), list(self.dilation),
                                       EPILOGUE_ACTIVATIONS.get(self._activation, 0), aligned_output)
            return True
        segments, offsets, values, channel_stride = self._kernel_arguments(x)
        plan.add_sparse_conv(*slots, segments, offsets, values, list(self.weight_shape), self._buffers["bias"],
                             list(self.stride), list(self.padding), list(self.dilation),
                             EPILOGUE_ACTIVATIONS.get(self._activation, 0), channel_stride, aligned_output,
                             _writable(residual_reusable, residual, x))
        return True

    def extra_repr(self) -> str:
        out_channels, in_channels, kernel_h, kernel_w = self.weight_shape
        return (f"{in_channels}, {out_channels}, kernel_size=({kernel_h}, {kernel_w}), stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, " + (f"groups={self.groups}, " if self.groups > 1
                                                                           else "")
                + f"bias={self.bias is not None}, density={self.density:.4f}" + self._activation_repr())

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_geometry_cache"] = {}  # recomputed on first use; not worth saving
        state["_output_shapes"] = {}
        return state

    def __setstate__(self, state):
        state = self._state_with_activation(state)
        state.setdefault("_output_shapes", {})  # pickled before it existed
        super().__setstate__(state)


def _channels_last_activation(x: torch.Tensor) -> torch.Tensor:
    """``x`` in channels_last memory: itself when it is, else a copy in a buffer from the engine's cache (an NCHW
    output of a sparse layer going into a dense one; a fresh 103 MB copy would fault in every page again on
    each call at batch 32), or from torch when the C++ extension is missing."""
    if x.is_contiguous(memory_format=torch.channels_last) or not available()[0]:
        return x.contiguous(memory_format=torch.channels_last)
    return _ops().activation_buffer(list(x.shape), channels_last=True).copy_(x)


_POINTWISE = {"enabled": True}


def set_pointwise_conv(enabled: bool) -> bool:
    """Whether DenseConv2d runs its 1x1, stride-1 convolutions through the engine's own dense kernel (on by default,
    where the CPU has AVX2 and FMA; else oneDNN, as with it off); returns the previous setting. For A/B
    measurements."""
    previous = _POINTWISE["enabled"]
    _POINTWISE["enabled"] = bool(enabled)
    _count_layer_edit()
    return previous


@functools.cache
def pointwise_conv_supported() -> bool:
    """Whether the engine's dense 1x1 kernel can run here: the C++ extension is built and the CPU has AVX2 and
    FMA."""
    return available()[0] and bool(_ops().pointwise_conv_supported())


@functools.cache
def dense_conv_available() -> tuple[bool, str]:
    """Whether :class:`DenseConv2d` can run here (torch built with oneDNN), and why not when it cannot."""
    if not torch.backends.mkldnn.is_available():
        return False, "torch was built without oneDNN (mkldnn)"
    if not hasattr(torch.ops.mkldnn, "_convolution_pointwise"):
        return False, "this torch has no mkldnn::_convolution_pointwise"
    return True, "oneDNN convolution with a prepacked weight"


class DenseConv2d(_Float32CpuLayer, _FusedActivation, nn.Module):
    """A dense Conv2d (any groups, zero padding) run by oneDNN on channels_last activations, its weight
    reordered once into oneDNN's blocked layout: ``forward(x) == F.conv2d(x, weight, bias, ...)`` within
    float32 rounding, with SparseConv2d's fused epilogue (``forward(x, residual)``: ``+ residual`` inside
    oneDNN's call; ``activation`` (as SparseConv2d's; ``relu=True`` is ``"relu"``) applied to the result).

    Why: ``nn.Conv2d`` reorders the weight (and an NCHW input) on every call. The engine runs the layers it
    keeps dense through this module instead. Measured 2026-12-03 (2-core AMD EPYC, AVX-512, 2 threads,
    torch 2.14.1 / oneDNN 3.12, best of 15 calls): against ``F.conv2d`` on NCHW it took 0.14-0.98x the time
    on 11 ResNet-50 layer shapes and two depthwise ones, at batch 1 and 32 (the 7x7 stem 0.34x, 3x3 at
    14x14 0.93-0.96x, at 7x7 0.54x at batch 1 and 0.98x at batch 32, depthwise 0.14-0.47x); the dense
    ResNet-50 at batch 1 with every conv through this call (a prototype without the epilogue) went from
    82.0 to 45.5 ms (best of 9 interleaved rounds), ONNX Runtime 45.0 ms. The weight is reordered for each
    input shape met (the 8 most recently used kept): oneDNN picks the layout by the input's size, and a weight
    reordered without it ran a 256 -> 1024 1x1 conv at 14x14 in 7.3 ms instead of 0.49 ms, reordering it again
    on every call.

    A 1x1, stride-1, unpadded, ungrouped layer of a multiple of 16 output channels, with no activation or ReLU, runs
    through the engine's own dense kernel instead (the C++ extension's ``pointwise_conv``: a GEMM over positions
    with the epilogue fused; where the CPU has AVX2 and FMA, see :func:`set_pointwise_conv`): ResNet-50's ten 1x1
    shapes at batch 1 ran 1.08-1.38x as fast as through oneDNN (2 threads, 2-core AMD EPYC, AVX2, 2026-12-05;
    csrc/pointwise_conv.cpp has the numbers).

    The activation is applied by torch after the call, not as oneDNN's fused post-op: its ReLU turns NaN into 0
    (``nn.ReLU`` and the sparse layers keep NaN: a fault must stay visible). Outputs over 32 MiB (ResNet's
    early layers at batch 32) come from the engine's cache of touched buffers, as the sparse layers' do
    (:func:`cached_activation_bytes`), when the C++ extension is built.

    Outputs are channels_last tensors (same values and shape), unless ``contiguous_output`` is set
    (``convert_for_cpu`` sets it where the next operation needs NCHW, e.g. a ``.view``). An input that
    needs a gradient (in grad mode) runs through ``F.conv2d`` instead, so autograd stays right. The
    reordered weight is not saved (pickling and ``copy.deepcopy`` rebuild it on first use); it follows
    ``weight`` when the tensor is replaced (``load_state_dict``, assignment) or changed in place through
    autograd's version counter. Writes the counter does not see (through ``.data``, a numpy view, or
    inside ``torch.inference_mode``) need :meth:`refresh`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0, dilation=1,
                 groups: int = 1, relu: bool = False, contiguous_output: bool = False, activation: str | None = None):
        super().__init__()
        ok, reason = dense_conv_available()
        if not ok:
            raise RuntimeError(f"DenseConv2d is unavailable: {reason}")
        weight = _check_dense_weight(weight, "DenseConv2d")
        if weight.dim() != 4:
            raise ValueError(f"DenseConv2d: weight must be 4-d [C_out, C_in/groups, KH, KW], got shape "
                             f"{tuple(weight.shape)}")
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or weight.shape[0] % groups:
            raise ValueError(f"DenseConv2d: groups must be an int >= 1 dividing C_out={weight.shape[0]}, "
                             f"got {groups!r}")
        self._activation = _checked_activation(activation, relu, "DenseConv2d")
        self.contiguous_output = bool(contiguous_output)
        self.stride = _pair(stride, "stride")
        self.padding = _pair(padding, "padding")
        self.dilation = _pair(dilation, "dilation")
        self.groups = groups
        # buffers made outside inference mode even when built inside it: the reordered copy below is
        # keyed on the weight's version counter, which inference tensors lack
        with torch.inference_mode(False):
            self.register_buffer("weight", weight.clone())
            bias = None if bias is None else _check_dense_weight(bias, "DenseConv2d bias").clone()
            self.register_buffer("bias", bias)
        self._packed: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        # input shape -> (geometry, output shape) for outputs under FRESH_PAGES_BYTES: see _output_shape
        self._small_output_shapes: dict[torch.Size, tuple] = {}

    @classmethod
    def from_dense(cls, conv: nn.Conv2d) -> DenseConv2d:
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"DenseConv2d.from_dense expects an nn.Conv2d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"DenseConv2d supports padding_mode='zeros' only, got {conv.padding_mode!r}")
        return cls(conv.weight, conv.bias, conv.stride, _symmetric_padding(conv, "DenseConv2d"), conv.dilation,
                   conv.groups)

    padding_mode = "zeros"  # read by code written for the nn.Conv2d it replaces, as the properties below

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def kernel_size(self) -> tuple[int, int]:
        return self.weight.shape[2], self.weight.shape[3]

    def refresh(self) -> None:
        """Forgets the reordered copies of the weight (they are made again on the next call): needed after
        writes to ``weight`` that autograd's version counter does not see (its shape too: ``weight.data = ...``)."""
        self._packed = {}
        self._small_output_shapes = {}
        _count_layer_edit()  # a compiled call plan holding the old copies is made again

    def _runs_pointwise(self, activation: str | None) -> bool:
        """Whether a call with ``activation`` runs through the engine's dense 1x1 kernel (see the class)."""
        weight = self._buffers["weight"]
        return (activation in (None, "relu") and _POINTWISE["enabled"] and self.groups == 1
                and weight.shape[2:] == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)
                and weight.shape[0] % 16 == 0 and pointwise_conv_supported())

    @property
    def dense_algorithm(self) -> str:
        """What runs this layer as the engine calls it (with its fused activation): ``"pointwise"`` (the engine's
        dense 1x1 kernel) or ``"oneDNN"`` (WinogradConv2d: ``"Winograd"``); the decision table's "dense by"."""
        return "pointwise" if self._runs_pointwise(self._activation) else "oneDNN"

    def _weight_copy(self, key: str, make) -> torch.Tensor:
        """``make(weight)`` for the current weight, kept in ``_packed`` under ``key`` and made again when the weight
        is replaced or changed in place (its identity and version counter, as ``_packed_weight``'s); copies made from
        an earlier weight are dropped. The pointwise kernel's panels and WinogradConv2d's transformed weight."""
        weight = self._buffers["weight"]
        version = -1 if weight.is_inference() else weight._version
        cache = self._packed  # one read: another thread may replace it meanwhile
        entry = cache.get(key)
        if entry is None or entry[0] is not weight or entry[2] != version:
            with torch.no_grad():
                entry = (weight, make(weight), version)
            self._packed = {**{k: v for k, v in cache.items() if k != key and v[0] is weight and v[2] == version},
                            key: entry}
        return entry[1]

    def _pointwise(self, x: torch.Tensor, residual: torch.Tensor | None, activation: str | None,
                   into_residual: bool) -> torch.Tensor:
        """``activation(conv(x) + bias (+ residual))`` through the engine's dense 1x1 kernel for a channels_last
        ``x`` that needs no gradient, where ``_runs_pointwise(activation)``; written into ``residual`` when
        ``into_residual`` and that is channels_last (as oneDNN's "sum" post-op)."""
        into_residual = (into_residual and residual is not None
                         and residual.is_contiguous(memory_format=torch.channels_last))
        ops = _ops()
        return ops.pointwise_conv(x, self._weight_copy("pointwise", ops.pointwise_conv_pack), self._buffers["bias"],
                                  residual, activation == "relu", into_residual)

    def _packed_weight(self, input_shape: torch.Size) -> torch.Tensor:
        weight = self._buffers["weight"]
        # an entry holds the weight tensor it was made from, so the identity test below cannot be fooled by
        # a new tensor at a freed one's address; the version catches in-place edits (inference tensors have
        # none: only their identity is checked); the input's shape, since oneDNN's layout depends on it
        version = -1 if weight.is_inference() else weight._version
        # (and the geometry: the reordered layout depends on it too, and an attribute set anew must not meet a stale
        # weight)
        key = (tuple(input_shape), *_hashable_geometry(self))
        cache = self._packed  # one read: another thread may replace it meanwhile
        entry = cache.get(key)
        if entry is not None and entry[0] is weight and entry[2] == version:
            if next(reversed(cache)) == key:  # the shape used last: nothing to reorder
                return entry[1]
            packed = entry[1]
        else:
            with torch.no_grad():
                packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                    weight.to_mkldnn(), list(self.padding), list(self.stride), list(self.dilation), self.groups,
                    list(input_shape))
        kept = {k: v for k, v in cache.items() if v[0] is weight and v[2] == version and k != key}
        while len(kept) >= 8:  # the least recently used goes first
            del kept[next(iter(kept))]
        kept[key] = (weight, packed, version)
        self._packed = kept
        return packed

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None, *, residual_reusable: bool = False,
                aligned_output: bool = False) -> torch.Tensor:
        """``activation(conv(input) + bias (+ residual))``. ``residual_reusable=True`` tells the layer that nothing
        reads ``residual`` after this call (the engine's graph rewrite sets it where that is so): the layer may
        then add the convolution into it in place and return it, rather than write a new tensor. ``aligned_output``
        is accepted as SparseConv2d takes it (this layer swapped into a graph the engine marked) and not used: the
        output has this layer's own layout."""
        out = self._engine_call(input, residual, residual_reusable)
        if out is not None:
            return out
        x, residual = _checked_conv_input(input, residual, "DenseConv2d")
        if x.shape[-3] != self.weight.shape[1] * self.groups:
            raise ValueError(f"DenseConv2d: input has {x.shape[-3]} channels, the layer expects "
                             f"{self.weight.shape[1] * self.groups}")
        if x.dim() == 3:  # unbatched, as nn.Conv2d takes it
            x = x.unsqueeze(0)
            out = self._convolution(x, None, self._output_shape(x), False).squeeze(0)
            out = _unfused_epilogue(out, residual, self.activation)
            return out.contiguous() if self.contiguous_output else out
        output_shape = self._output_shape(x)
        if _broadcast_residual(residual, output_shape, "DenseConv2d"):
            out = _unfused_epilogue(self._convolution(x, None, output_shape, False), residual, self.activation)
            return out.contiguous() if self.contiguous_output else out
        out = self._convolution(x, residual, output_shape, residual_reusable, self.activation)
        return out.contiguous() if self.contiguous_output else out

    def _engine_call(self, x: torch.Tensor, residual: torch.Tensor | None,
                     residual_reusable: bool) -> torch.Tensor | None:
        """The call as the engine makes it between its own layers, with as little Python as it needs, or None
        for any other (then ``forward`` checks and handles it): a 4-d float32 channels_last CPU input of a
        shape met before whose output is under FRESH_PAGES_BYTES, no residual or a channels_last one of the
        output's shape, no gradient needed. oneDNN through ``_onednn``, as ``_convolution``. Why: oneDNN's call costs
        about 29 us even on a 2x2 input, and the general path added 10 us of Python to it, 4-6 us this one
        (64 -> 64 1x1 on a 2x2 input with a residual, medians of 3000 calls: 39.1 and 33.6 us, oneDNN's call
        alone 28.8 us; 4.1 and 5.5 us without and with a residual after the checks added since). On whole
        networks at 50% kept, every conv dense, batch 1 (2 threads, Intel Xeon with
        AVX-512, 2026-12-04, 60 interleaved calls each): ResNet-50 31.25 -> 29.77 ms (per-call ratio 1.050,
        p20-p80 1.041-1.065), ResNet-18 12.25 -> 11.99 ms."""
        into_residual = self._engine_route(x, residual, residual_reusable)
        if into_residual is None:
            return None
        if self._runs_pointwise(self._activation):
            out = self._pointwise(x, residual, self._activation, into_residual)
        else:
            out = self._run(x, self._packed_weight(x.shape), residual, into_residual, self._activation)
        return out.contiguous() if self.contiguous_output else out

    def _engine_route(self, x: torch.Tensor, residual: torch.Tensor | None, residual_reusable: bool) -> bool | None:
        """None where ``_engine_call`` does not take the call, else whether it adds into ``residual`` in place."""
        if x.dtype != torch.float32 or not x.is_cpu or not x.is_contiguous(
                memory_format=torch.channels_last) or x.dim() != 4:
            return None
        output_shape = _known_output_shape(self._small_output_shapes, x, self._geometry())
        if output_shape is None:  # not checked for this shape, weight shape and geometry yet
            return None
        if torch.is_grad_enabled() and (x.requires_grad or (residual is not None and residual.requires_grad)):
            return None
        if residual is not None and (residual.dtype != torch.float32 or not residual.is_cpu
                                     or residual.shape != output_shape
                                     or not residual.is_contiguous(memory_format=torch.channels_last)):
            return None
        return _writable(residual_reusable, residual, x)

    def add_to_plan(self, plan, slots: tuple[int, int, int], x: torch.Tensor, residual: torch.Tensor | None = None,
                    *, residual_reusable: bool = False, aligned_output: bool = False) -> bool:
        """As SparseConv2d's: True only where the call takes ``_engine_call``'s path with an activation the plan
        applies (none or ReLU), or, for an input not channels_last and no residual (a network's first layer), the
        general path: a channels_last copy, then the same call."""
        copied = (residual is None and x.dim() == 4 and x.dtype == torch.float32 and x.is_cpu
                  and not x.is_contiguous(memory_format=torch.channels_last))
        x = x.contiguous(memory_format=torch.channels_last) if copied else x  # _convolution's copy
        into_residual, activation = self._engine_route(x, residual, residual_reusable), self._activation
        pointwise = self._runs_pointwise(activation)
        if into_residual is None or not (pointwise or activation in (None, "relu")):
            return False
        if copied:
            plan.add_channels_last_copy(slots[0], slots[2])
            slots = (slots[2], -1, slots[2])
        if pointwise:  # as _pointwise
            plan.add_pointwise_conv(*slots, self._weight_copy("pointwise", _ops().pointwise_conv_pack),
                                    self._buffers["bias"], activation == "relu", into_residual)
        else:
            self._add_run_to_plan(plan, slots, self._packed_weight(x.shape), into_residual, activation)
        if self.contiguous_output:
            plan.add_contiguous(slots[2], slots[2])
        return True

    def _add_run_to_plan(self, plan, slots: tuple[int, int, int], packed: torch.Tensor, into_residual: bool,
                         activation: str | None) -> None:
        """``_run``'s call added to a plan (activation none or ReLU); what a subclass replaces with ``_run``."""
        plan.add_onednn_conv(*slots, packed, self._buffers["bias"], list(self.padding), list(self.stride),
                             list(self.dilation), self.groups, into_residual, EPILOGUE_ACTIVATIONS.get(activation, 0))

    def _output_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        shape = _conv_output_shape(x, self.weight.shape, self.stride, self.padding, self.dilation)
        if min(shape[2:]) < 1:
            raise ValueError(f"DenseConv2d: input of size {tuple(x.shape[2:])} is smaller than the "
                             f"(dilated) kernel with padding {self.padding}")
        if x.dim() == 4 and math.prod(shape) * 4 <= FRESH_PAGES_BYTES:
            # the shapes the short path may take, checked here (channels, size) for this geometry
            geometry = self._geometry()
            if _known_output_shape(self._small_output_shapes, x, geometry) != shape:
                self._small_output_shapes = _with_output_shape(self._small_output_shapes, x, geometry, shape)
        return shape

    def _geometry(self) -> tuple:
        """What the checked output shapes depend on: the weight's shape and :func:`_hashable_geometry`."""
        return (self._buffers["weight"].shape, *_hashable_geometry(self))

    def _onednn(self, x: torch.Tensor, packed: torch.Tensor, residual: torch.Tensor | None,
                into_residual: bool) -> torch.Tensor:
        """oneDNN's ``conv(x) + bias (+ residual)`` on channels_last ``x``: added into ``residual`` in place and
        returned (its "sum" post-op) when ``into_residual``, else a new tensor."""
        bias = self._buffers["bias"]
        args = (list(self.padding), list(self.stride), list(self.dilation), self.groups)
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(x, packed, bias, *args, "none", [], "")
        if into_residual:
            return torch.ops.mkldnn._convolution_pointwise_.binary(residual, x, packed, bias, *args, "add", 1.0, None,
                                                                   [], None)
        return torch.ops.mkldnn._convolution_pointwise.binary(x, residual, packed, bias, *args, "add", None, None, [],
                                                              "")

    def _run(self, x: torch.Tensor, packed: torch.Tensor, residual: torch.Tensor | None, into_residual: bool,
             activation: str | None) -> torch.Tensor:
        """``activation(conv(x) + bias (+ residual))`` for a channels_last float32 ``x`` that needs no gradient,
        ``packed`` from ``_packed_weight``: what a subclass with another algorithm replaces."""
        return _activated(self._onednn(x, packed, residual, into_residual), activation)

    def _convolution(self, x: torch.Tensor, residual: torch.Tensor | None, output_shape: tuple[int, ...],
                     residual_reusable: bool, activation: str | None = None) -> torch.Tensor:
        """``activation(conv(x) + bias (+ residual))`` for a 4-d ``x``; ``residual`` has the output's shape."""
        bias = self._buffers["bias"]
        if _needs_gradient(x, residual):
            # oneDNN's call has no autograd formula: torch's convolution keeps gradients right
            out = F.conv2d(x, self.weight, bias, self.stride, self.padding, self.dilation, self.groups)
            return _activated(out if residual is None else out + residual, activation)
        given = x
        x = _channels_last_activation(x)
        if self._runs_pointwise(activation):
            return self._pointwise(x, residual, activation,
                                   _writable(residual_reusable, residual, given))
        packed = self._packed_weight(x.shape)
        if residual is not None:
            accumulator = _channels_last_activation(residual)
            if accumulator is not residual or _writable(residual_reusable, residual, given):
                # oneDNN adds the convolution into the residual in place (its "sum" post-op) where nothing reads
                # the residual later, or into the channels_last copy just made of it: no output to allocate,
                # and one tensor read where the out-of-place call reads two. ResNet-50 at 50% kept, batch 1,
                # every conv dense (16 of its 53 calls add into their residual), 2 threads, Intel Xeon
                # (AVX-512), 2026-12-04, per-call ratios out of place / in place (p20-p80; the networks and
                # ONNX Runtime taking turns in rotating order): batch 1 1.029x (1.013-1.037x, 60 calls each),
                # 29.85 -> 28.95 ms; batch 32 1.075x (1.058-1.092x, 12 calls), 829 -> 765 ms (the large
                # residuals are no longer copied into a buffer first). A 64 -> 256 1x1 conv at 56x56, batch 1,
                # alone: 0.37 -> 0.34 ms.
                return self._run(x, packed, accumulator, True, activation)
        if math.prod(output_shape) * 4 > FRESH_PAGES_BYTES and available()[0]:
            # An output this large would be mapped afresh by malloc and faulted in page by page on every
            # call: it comes from the engine's cache of touched buffers instead, holding the residual
            # (or zeros), and oneDNN adds the convolution into it in place. 2 threads, batch 32,
            # 2026-12-03, medians of 9 interleaved rounds: 64->256 1x1 at 56x56 (103 MB out) 41.9 ->
            # 26.8 ms, with a residual 48.2 -> 30.5 ms; 256->512 at 28x28 (51 MB) 42.4 -> 36.0 ms.
            # Below 32 MiB malloc reuses its heap and the extra zeroing pass loses (25.7 MB: 19.3 ->
            # 22.4 ms), so those keep the call that allocates.
            out = _ops().activation_buffer(list(output_shape), channels_last=True)
            if residual is None:
                out.zero_()
            else:
                out.copy_(residual)
            return self._run(x, packed, out, True, activation)
        return self._run(x, packed, residual, False, activation)

    def extra_repr(self) -> str:
        out_channels, in_per_group, kernel_h, kernel_w = self.weight.shape
        return (f"{in_per_group * self.groups}, {out_channels}, kernel_size=({kernel_h}, {kernel_w}), "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"bias={self.bias is not None}" + self._activation_repr()
                + (", contiguous_output=True" if self.contiguous_output else ""))

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_packed"] = {}  # oneDNN's opaque tensor can be neither pickled nor copied: rebuilt on first use
        state["_small_output_shapes"] = {}  # refilled on the first calls
        return state

    def __setstate__(self, state):
        state = self._state_with_activation(state)
        state.setdefault("_small_output_shapes", {})  # pickled before the fast path existed
        super().__setstate__(state)


def _winograd_geometry(conv: nn.Module) -> bool:
    """Whether ``conv``'s stride, dilation and groups are those Winograd computes (1, 1, 1)."""
    return tuple(conv.stride) == (1, 1) and tuple(conv.dilation) == (1, 1) and conv.groups == 1


def winograd_unsupported_reason(conv: nn.Module) -> str | None:
    """Why :class:`WinogradConv2d` cannot compute ``conv`` (an ``nn.Conv2d`` or one of the engine's dense
    convolutions), or None: it computes 3x3 kernels at stride 1, dilation 1, groups 1, with zero padding, in
    float32, and needs the C++ extension."""
    ok, reason = available()
    if not ok:
        return reason
    weight = getattr(conv, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        return "not a 3x3 kernel"
    if weight.dtype != torch.float32:
        return f"weight is {weight.dtype}, not float32"
    if not _winograd_geometry(conv):
        return "not stride 1, dilation 1, groups 1"
    if getattr(conv, "padding_mode", "zeros") != "zeros":
        return "padding other than zeros"
    return None


def _winograd_layout(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` in the transform domain as WinogradConv2d runs it: in the 1x1 tile's packed panels where that
    kernel runs (AVX2 and C_out a multiple of 16), else [36, C_in, C_out] for torch's batched product."""
    if weight.shape[0] % winograd.PANEL == 0 and pointwise_conv_supported():
        return winograd.winograd_panels(weight)
    return winograd.winograd_weight(weight)


class WinogradConv2d(DenseConv2d):
    """A dense 3x3 convolution (stride 1, dilation 1, groups 1, zero padding) computed by Winograd's F(4x4, 3x3)
    (the C++ kernel ``winograd_conv2d``, csrc/winograd.cpp; plain-PyTorch reference
    :func:`vpns_fast.deploy.winograd.winograd_conv2d_reference`): 36 multiplies per 16 outputs and input channel
    instead of 144. Everything else is :class:`DenseConv2d`'s (fused residual and activation, channels_last
    outputs, the gradient path through ``F.conv2d``); a ReLU is applied inside the kernel's output loop
    (NaN kept), other activations by torch after it.

    Its float32 result differs from the exact convolution by about 5e-6 of the output's largest magnitude (a
    direct convolution: 3e-7). The transforms add and subtract neighbouring pixels, so a NaN or an infinity in
    the input gives NaN over more of the tiles reading it (an infinity: NaN where a direct convolution gives
    an infinity), and finite inputs near the float32 limit (1e37) can overflow where a direct convolution
    stays finite. A stride, dilation or groups set after construction that Winograd cannot compute goes to
    oneDNN, as DenseConv2d. ``convert_for_cpu`` times it against :class:`DenseConv2d` on each eligible
    layer's real input and keeps the faster (``winograd=False`` never uses it). Measured 2026-12-04 (2-core AMD
    EPYC, 2 threads, medians of 30), against DenseConv2d: batch 1, 64 channels at 56x56 1.77x, 128 at 28x28
    2.67x, 256 at 14x14 1.79x, 512 at 7x7 0.43x (the transformed weight, 4x the weight, is read for 4 tiles);
    batch 32 1.78x, 2.33x, 1.76x and, with the whole layer in one chunk, 1.4x (19.3 against 27.5 ms). Its products
    run through the engine's 1x1 tile (the transformed weight in that kernel's packed panels) where that kernel
    runs, else through torch's batched sgemm: on a Zen 5 host, 2026-12-05, batch 1, the tile made the layer
    2.72x / 3.01x / 1.74x / 0.95x as fast as DenseConv2d at the four sizes above."""

    # its output is always a new tensor (the kernel reads the residual while it writes): calls are not marked
    # residual_reusable (fusion.mark_reusable_residuals)
    adds_into_residual = False

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0, dilation=1,
                 groups: int = 1, relu: bool = False, contiguous_output: bool = False, activation: str | None = None):
        super().__init__(weight, bias, stride, padding, dilation, groups, relu, contiguous_output, activation)
        reason = winograd_unsupported_reason(self)
        if reason is not None:
            raise ValueError(f"WinogradConv2d: {reason}")

    @property
    def dense_algorithm(self) -> str:
        return "Winograd"

    def _packed_weight(self, input_shape: torch.Size) -> torch.Tensor:
        """The weight in the transform domain, made again when the weight is replaced or changed in place (as
        DenseConv2d's reordered copy), whatever the input's shape: in the packed panels of the engine's 1x1 tile
        ([36, C_out / 16, C_in, 16]) where that runs (AVX2 and C_out a multiple of 16), else [36, C_in, C_out] for
        torch's batched product."""
        if not _winograd_geometry(self):
            return DenseConv2d._packed_weight(self, input_shape)  # oneDNN's: _run hands it to oneDNN
        # one cache entry for either layout: a weight whose output channels change under ``.data`` (without
        # refresh()) then meets its old copy and fails the kernel's shape checks rather than finding an older
        # copy of the other layout that fits
        return self._weight_copy("winograd", _winograd_layout)

    def _run(self, x: torch.Tensor, packed: torch.Tensor, residual: torch.Tensor | None, into_residual: bool,
             activation: str | None) -> torch.Tensor:
        if packed.is_mkldnn:
            # geometry set anew since the layer was built: what Winograd cannot compute, oneDNN does
            # (_packed_weight gave oneDNN's reordered weight)
            return super()._run(x, packed, residual, into_residual, activation)
        # a fresh output (from the buffer cache when large) whatever into_residual says: the kernel reads the
        # residual while it writes its output
        fused = activation == "relu"
        out = _ops().winograd_conv2d(x, packed, self._buffers["bias"], list(self.padding), residual,
                                     EPILOGUE_ACTIVATIONS["relu"] if fused else 0)
        return out if fused else _activated(out, activation)

    def _add_run_to_plan(self, plan, slots: tuple[int, int, int], packed: torch.Tensor, into_residual: bool,
                         activation: str | None) -> None:
        if packed.is_mkldnn:  # as _run
            super()._add_run_to_plan(plan, slots, packed, into_residual, activation)
        else:
            plan.add_winograd_conv(*slots, packed, self._buffers["bias"], list(self.padding),
                                   EPILOGUE_ACTIVATIONS.get(activation, 0))

    def _convolution(self, x: torch.Tensor, residual: torch.Tensor | None, output_shape: tuple[int, ...],
                     residual_reusable: bool, activation: str | None = None) -> torch.Tensor:
        if _needs_gradient(x, residual):
            return super()._convolution(x, residual, output_shape, residual_reusable, activation)
        x = _channels_last_activation(x)
        residual = None if residual is None else _channels_last_activation(residual)
        return self._run(x, self._packed_weight(x.shape), residual, False, activation)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", algorithm='winograd F(4x4, 3x3)'"


def _checked_linear_weight(weight: torch.Tensor, what: str) -> torch.Tensor:
    """A Linear layer's weight as the engine's layers take it: float32, 2-d [out_features, in_features]."""
    weight = _check_dense_weight(weight, what)
    if weight.dim() != 2:
        raise ValueError(f"{what}: weight must be 2-d [out_features, in_features], got {tuple(weight.shape)}")
    return weight


class _FromLinear:
    """``from_dense(linear)``: the layer made from an nn.Linear's weight and bias."""

    @classmethod
    def from_dense(cls, linear: nn.Linear):
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{cls.__name__}.from_dense expects an nn.Linear, got {type(linear).__name__}")
        return cls(linear.weight, linear.bias)


class SparseLinear(_Float32CpuLayer, _FromLinear, nn.Module):
    """A Linear layer with its nonzero weights in CSR: ``forward(x) == F.linear(x, weight, bias)``
    within float32 rounding, for inputs [..., in_features]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        ops = _ops()
        weight = _checked_linear_weight(weight, "SparseLinear")
        self.out_features, self.in_features = weight.shape
        with torch.inference_mode(False):  # ordinary buffers even when built in inference mode, as SparseConv2d's
            row_ptr, column_index, values = ops.sparse_linear_pack(weight)
            bias = None if bias is None else _check_dense_weight(bias, "SparseLinear bias").clone()
        self.register_buffer("row_ptr", row_ptr)
        self.register_buffer("column_index", column_index)
        self.register_buffer("values", values)
        self.register_buffer("bias", bias)

    @property
    def weight(self) -> torch.Tensor:
        """A dense copy of the weight, made on every read (``to_dense_weight``): writing into it does not change
        the layer, and reading it on every call costs a pass over the dense weight."""
        return self.to_dense_weight()

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def density(self) -> float:
        total = self.out_features * self.in_features
        return self.nnz / total if total else 0.0

    def to_dense_weight(self) -> torch.Tensor:
        rows = torch.repeat_interleave(torch.arange(self.out_features), self.row_ptr.diff())
        weight = self.values.new_zeros(self.out_features, self.in_features)
        weight[rows, self.column_index.long()] = self.values
        return weight

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = _checked_input(input, "SparseLinear")
        if _needs_gradient(x):  # the kernel has no backward: torch's linear of the same weight keeps it right
            return F.linear(x, self.to_dense_weight(), self._buffers["bias"])
        return _ops().sparse_linear(x, self.row_ptr, self.column_index, self.values, self.in_features, self.bias)

    def add_to_plan(self, plan, slots: tuple[int, int], x: torch.Tensor) -> bool:
        """Adds ``self(x)``'s kernel call to ``plan`` (slots: input, output); False where ``x`` needs a gradient."""
        if _needs_gradient(x):
            return False
        buffers = self._buffers
        plan.add_sparse_linear(*slots, buffers["row_ptr"], buffers["column_index"], buffers["values"],
                               self.in_features, buffers["bias"])
        return True

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"density={self.density:.4f}")


# Input rows (the product of the leading dimensions) up to which DenseLinear runs the engine's kernel: on ResNet-50's
# 2048 -> 1000 classifier, 2 threads, a 2-vCPU Zen 5 EPYC, 1 to 8 rows took 0.048-0.227 ms against torch's linear's
# 0.103-0.358 ms warm, 0.166-0.295 against 0.376-0.617 ms with the caches flushed (512 -> 1000 and 768 -> 10 alike;
# bench/results/cpu-dense-linear-ab-2026-12-06-amd.txt); beyond 8 rows not measured, so torch's.
DENSE_LINEAR_MAX_ROWS = 8


class DenseLinear(_Float32CpuLayer, _FromLinear, nn.Module):
    """A Linear layer the engine keeps dense: ``forward(x) == F.linear(x, weight, bias)`` within float32 rounding.
    Inputs of up to DENSE_LINEAR_MAX_ROWS rows that need no gradient run the engine's kernel (``dense_linear`` in
    csrc/pointwise_conv.cpp: each thread reads its share of the weight's rows once), the rest ``F.linear``. Why: at
    batch 1 torch's linear ran ResNet-50's classifier (an 8 MB weight) no faster on 2 threads than on 1 (0.356-0.368
    against 0.368-0.372 ms, caches flushed); inside the network, after the convolutions' weights, that weight is cold
    (0.376 ms against the kernel's 0.166 ms, caches flushed; bench/results/cpu-dense-linear-ab-2026-12-06-amd.txt)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        if not pointwise_conv_supported():
            raise RuntimeError("DenseLinear is unavailable: it needs the C++ extension on a CPU with AVX2 and FMA")
        weight = _checked_linear_weight(weight, "DenseLinear")
        self.out_features, self.in_features = weight.shape
        with torch.inference_mode(False):  # ordinary buffers even when built in inference mode, as the others'
            self.register_buffer("weight", weight.clone())
            bias = None if bias is None else _check_dense_weight(bias, "DenseLinear bias").clone()
            self.register_buffer("bias", bias)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = _checked_input(input, "DenseLinear")
        weight, bias = self._buffers["weight"], self._buffers["bias"]
        rows = self._kernel_rows(x)
        if not rows:
            return F.linear(x, weight, bias)
        out = _ops().dense_linear(x.reshape(rows, self.in_features), weight, bias)
        return out.reshape(*x.shape[:-1], self.out_features)

    def add_to_plan(self, plan, slots: tuple[int, int], x: torch.Tensor) -> bool:
        """Adds ``self(x)``'s kernel call to ``plan`` (slots: input, output) for a 2-d ``x`` the kernel takes."""
        if x.dim() != 2 or not self._kernel_rows(x):
            return False
        plan.add_dense_linear(*slots, self._buffers["weight"], self._buffers["bias"])
        return True

    def _kernel_rows(self, x: torch.Tensor) -> int:
        """The rows ``self(x)`` gives the engine's kernel, or 0 where ``F.linear`` runs it."""
        if _needs_gradient(x) or x.dim() == 0 or x.shape[-1] != self.in_features:
            return 0
        rows = math.prod(x.shape[:-1])
        return rows if 1 <= rows <= DENSE_LINEAR_MAX_ROWS else 0

    def algorithm_for(self, x: torch.Tensor) -> str:
        """What runs ``self(x)``: ``"dense_linear"`` (the engine's kernel) or ``"torch"`` (``F.linear``); the
        decision table's "dense by" for the example's input (DenseConv2d's ``dense_algorithm`` depends on the layer
        alone, this one on the input's rows)."""
        return "dense_linear" if self._kernel_rows(x) else "torch"

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def attention_unsupported_reason(attention: nn.MultiheadAttention) -> str | None:
    """Why :class:`SparseMultiheadAttention` cannot stand in for ``attention``, or None."""
    if not attention._qkv_same_embed_dim:
        return "MultiheadAttention with kdim/vdim other than embed_dim (separate q, k, v weights)"
    if attention.bias_k is not None or attention.add_zero_attn:
        return "MultiheadAttention with add_bias_kv or add_zero_attn"
    if attention.in_proj_weight.dtype != torch.float32 or attention.in_proj_weight.device.type != "cpu":
        return f"weight is {attention.in_proj_weight.dtype} on {attention.in_proj_weight.device}; float32 CPU only"
    return None


class SparseMultiheadAttention(_Float32CpuLayer, nn.Module):
    """An nn.MultiheadAttention whose input and output projections are :class:`SparseLinear` layers, for
    self-attention (``query is key is value``, batched) without masks or attention weights, in eval mode:
    ``(out_proj(scaled_dot_product_attention(q, k, v)), None)`` with ``q, k, v`` from the packed input
    projection, what ``F.multi_head_attention_forward`` computes within float32 rounding. Every other call
    (masks, ``need_weights=True``, cross-attention, an unbatched input, training mode, a gradient) runs the
    original module, kept as ``dense`` (so its dense weights stay in memory too)."""

    def __init__(self, attention: nn.MultiheadAttention):
        super().__init__()
        reason = attention_unsupported_reason(attention)
        if reason is not None:
            raise ValueError(f"SparseMultiheadAttention: {reason}")
        self.dense = attention
        self.embed_dim, self.num_heads, self.batch_first = attention.embed_dim, attention.num_heads, \
            attention.batch_first
        self.in_proj = SparseLinear(attention.in_proj_weight.detach(),
                                    None if attention.in_proj_bias is None else attention.in_proj_bias.detach())
        self.out_proj = SparseLinear.from_dense(attention.out_proj)
        self.train(attention.training)  # as the module it replaces: in training mode every call runs the dense one

    @staticmethod
    def runs_sparse(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                    average_attn_weights=True, is_causal=False) -> bool:
        """Whether a call with these arguments (nn.MultiheadAttention.forward's) takes the sparse path."""
        return (query is key and key is value and isinstance(query, torch.Tensor) and query.dim() == 3
                and query.numel() > 0 and key_padding_mask is None and attn_mask is None and not need_weights
                and not is_causal and not _needs_gradient(query))

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        refuse_tracing("SparseMultiheadAttention")
        if self.training or not self.runs_sparse(query, key, value, key_padding_mask, need_weights, attn_mask,
                                                 average_attn_weights, is_causal):
            return self.dense(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                              attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        x = query if self.batch_first else query.transpose(0, 1)  # [N, L, E]
        batch, length, _ = x.shape
        heads = self.num_heads
        q, k, v = (part.unflatten(-1, (heads, -1)).transpose(1, 2)  # [N, heads, L, E / heads]
                   for part in self.in_proj(x).chunk(3, dim=-1))
        out = self.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, length, -1))
        # contiguous (L, N, E) as the dense module returns it: a caller may .view() it
        return (out if self.batch_first else out.transpose(0, 1).contiguous()), None

    @property
    def nnz(self) -> int:
        return self.in_proj.nnz + self.out_proj.nnz

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}, "
                f"in_proj density={self.in_proj.density:.4f}, out_proj density={self.out_proj.density:.4f}")


def _subclass_reason(pool: nn.Module, base: str) -> str:
    """The reason a pooling subclass stays as it is: its forward may differ from the plain class's (one returning
    ``super().forward(x).flatten(1)`` made the conversion's check refuse the whole model)."""
    return (f"{type(pool).__name__} subclasses {base}; the engine replaces the plain class only (a subclass's forward "
            "may differ)")


def _plain_image_batch(x: torch.Tensor) -> bool:
    """A 4-d float32 CPU input that needs no gradient."""
    return (x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 4
            and not (x.requires_grad and torch.is_grad_enabled()))


def _pooling_kernel_takes(x: torch.Tensor) -> bool:
    """Whether the extension's pooling kernels (max and average) take ``x``: a plain image batch
    (:func:`_plain_image_batch`), contiguous or channels_last, and the extension there."""
    return (_plain_image_batch(x) and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
            and available()[0])


def _pooled(pool: Callable[[torch.Tensor], torch.Tensor], input: torch.Tensor) -> torch.Tensor:
    """``pool(input)``, the engine's poolings' batch path; an unbatched (C, H, W) image, as torch's poolings take it,
    through that path as the batch of one it is (called from ``forward``, not through the module again: hooks run
    once and a subclass's forward applies once), its result contiguous as torch's is for a 3-d input."""
    if input.dim() == 3:
        return pool(input.unsqueeze(0)).squeeze(0).contiguous()
    return pool(input)


def _pooling_unsupported_reason(pool: nn.MaxPool2d) -> str | None:
    """Why :class:`SeparableMaxPool2d` cannot stand in for ``pool``, naming its settings, or None when it can."""
    if type(pool) is not nn.MaxPool2d:
        return _subclass_reason(pool, "nn.MaxPool2d")
    settings = [f"{name}=True" for name in ("ceil_mode", "return_indices") if getattr(pool, name)]
    if _pair(pool.dilation, "dilation") != (1, 1):
        settings.append(f"dilation={pool.dilation}")
    if not settings:
        return None
    return (f"MaxPool2d with {', '.join(settings)}: SeparableMaxPool2d pools in floor mode at dilation 1 and returns "
            "the values only")


class SeparableMaxPool2d(_CountedEdits, nn.Module):
    """Max pooling (dilation 1, floor mode) as a max over rows then over columns: the same values as
    nn.MaxPool2d (max is exact; NaN propagates in both). Contiguous float32 inputs that need no gradient
    run the C++ kernel (``csrc/max_pool.cpp``, one pass, no padded copy), an unbatched (C, H, W) image as a batch
    of one; ``reference`` is the same computation in torch, for every other input (other dtypes, autograd). On the NCHW
    ResNet stem (64x112x112, k3 s2 p1, batch 1, 2 threads): the kernel 0.17 ms, the torch expression
    0.87 ms, torch 2.14's max_pool2d_with_indices (which eval-mode ResNet-18 calls) 3.4 ms; with its 3x3
    stride-2 windows taken straight from the rows (2026-12-06, a 2-vCPU Zen 5 EPYC) 0.052-0.054 ms against
    0.137-0.167 ms before.
    A channels_last input (the output of a DenseConv2d) gives a channels_last output, from the kernel's own
    channels_last loop (all channels of a pixel at once): on that stem, 2 threads, a 2-vCPU Intel Xeon,
    0.119 ms at batch 1 and 6.9 ms at batch 32 against 0.184 / 17.4 ms for torch's channels_last pooling
    (medians of 31 / 11 alternating calls, 2026-12-03); without the extension, torch's pooling."""

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride if stride is not None else kernel_size, "stride")
        self.padding = _pair(padding, "padding")

    @classmethod
    def from_module(cls, pool: nn.MaxPool2d) -> SeparableMaxPool2d:
        reason = _pooling_unsupported_reason(pool)
        if reason is not None:
            raise ValueError(f"SeparableMaxPool2d.from_module: {reason}")
        return cls(pool.kernel_size, pool.stride, pool.padding)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # the kernel writes a plain NCHW result without autograd: other layouts and inputs that need a
        # gradient keep torch's semantics through the reference
        refuse_tracing("SeparableMaxPool2d")
        return _pooled(self._pool, input)

    def _pool(self, input: torch.Tensor) -> torch.Tensor:
        """The pooling of a batch (or of what ``reference`` takes)."""
        if self._runs_kernel(input):
            return _ops().max_pool2d(input, list(self.kernel_size), list(self.stride), list(self.padding))
        if _plain_image_batch(input) and input.is_contiguous(memory_format=torch.channels_last):
            return F.max_pool2d(input, self.kernel_size, self.stride, self.padding)
        return self.reference(input)

    @staticmethod
    def _runs_kernel(x: torch.Tensor) -> bool:
        """Whether ``self(x)`` runs the C++ kernel on ``x`` as it is (:func:`_pooling_kernel_takes`; a 3-d image runs
        it as a batch of one, but not in a call plan)."""
        return _pooling_kernel_takes(x)

    def add_to_plan(self, plan, slots: tuple[int, int], x: torch.Tensor) -> bool:
        """Adds ``self(x)``'s kernel call to ``plan`` (slots: input, output) where ``forward`` runs the kernel."""
        if not self._runs_kernel(x):
            return False
        plan.add_max_pool(*slots, list(self.kernel_size), list(self.stride), list(self.padding))
        return True

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The pooling in plain torch: -inf padding, strided maxima over columns, then over rows."""
        (kernel_h, kernel_w), (stride_h, stride_w), (pad_h, pad_w) = self.kernel_size, self.stride, self.padding
        if pad_h or pad_w:
            x = F.pad(x, (pad_w, pad_w, pad_h, pad_h), value=float("-inf"))
        out_h = (x.shape[-2] - kernel_h) // stride_h + 1
        out_w = (x.shape[-1] - kernel_w) // stride_w + 1
        cols = x[..., 0:(out_w - 1) * stride_w + 1:stride_w]
        for k in range(1, kernel_w):
            cols = torch.maximum(cols, x[..., k:k + (out_w - 1) * stride_w + 1:stride_w])
        out = cols[..., 0:(out_h - 1) * stride_h + 1:stride_h, :]
        for k in range(1, kernel_h):
            out = torch.maximum(out, cols[..., k:k + (out_h - 1) * stride_h + 1:stride_h, :])
        return out

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


def _average_pooling_unsupported_reason(pool: nn.AdaptiveAvgPool2d) -> str | None:
    """Why :class:`GlobalAvgPool2d` cannot stand in for ``pool``, or None when it can (it pools to 1x1 only)."""
    if type(pool) is not nn.AdaptiveAvgPool2d:
        return _subclass_reason(pool, "nn.AdaptiveAvgPool2d")
    size = pool.output_size
    if size == 1 or (isinstance(size, (tuple, list)) and tuple(size) == (1, 1)):
        return None
    return f"AdaptiveAvgPool2d(output_size={size!r}): GlobalAvgPool2d pools each channel to 1x1 only"


class GlobalAvgPool2d(_CountedEdits, nn.Module):
    """Each channel's mean over its whole plane (``nn.AdaptiveAvgPool2d(1)``, the pooling before the classifier of
    ResNets, RegNets, MobileNets and EfficientNets). 4-d float32 CPU inputs that need no gradient, contiguous or
    channels_last, run the C++ kernel (``csrc/mean_pool.cpp``: each plane summed in a fixed order, the same bits on
    any thread count, within float32 rounding of torch's mean), an unbatched (C, H, W) image as a batch of one;
    ``reference`` is the mean in torch, for every other input (other dtypes, autograd).
    Why: inside ResNet-50 at batch 1 (10% kept, 2 threads, a 2-vCPU Intel Xeon, 2026-12-07) torch's
    adaptive_avg_pool2d took 0.15-0.30 ms on the last block's output (2048 x 7 x 7, written just before by both
    cores) and 0.026 ms on the same tensor read a second time; the kernel, which requests the lines it reads
    next, 0.034 ms in the first place: the whole call 1.004x as fast (ResNet-18 1.028x; ``bench.global_avg_pool_ab``,
    csrc/mean_pool.cpp has the figures)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        refuse_tracing("GlobalAvgPool2d")
        return _pooled(self._pool, input)

    def _pool(self, input: torch.Tensor) -> torch.Tensor:
        """The pooling of a batch (or of what ``reference`` takes)."""
        if self._runs_kernel(input):
            return _ops().global_avg_pool2d(input)
        return self.reference(input)

    @staticmethod
    def _runs_kernel(x: torch.Tensor) -> bool:
        """Whether ``self(x)`` runs the C++ kernel on ``x`` as it is: one the pooling kernels take
        (:func:`_pooling_kernel_takes`) with a nonempty plane (a 3-d image runs it as a batch of one, but not in a call
        plan)."""
        return _pooling_kernel_takes(x) and x.shape[-1] * x.shape[-2] > 0

    def add_to_plan(self, plan, slots: tuple[int, int], x: torch.Tensor) -> bool:
        """Adds ``self(x)``'s kernel call to ``plan`` (slots: input, output) where ``forward`` runs the kernel."""
        if not self._runs_kernel(x):
            return False
        plan.add_global_avg_pool(*slots)
        return True

    @staticmethod
    def reference(x: torch.Tensor) -> torch.Tensor:
        """The pooling in plain torch: the mean over the last two dimensions, kept as 1x1."""
        return F.adaptive_avg_pool2d(x, 1)


# The largest plane (H * W) whose average pooling the conversion swaps for GlobalAvgPool2d without timing it.
RULE_AVERAGE_PLANE = 14 * 14


def _pooling_rule(pool: nn.Module, x: torch.Tensor) -> str | None:
    """Why the conversion swaps ``pool`` (an nn.MaxPool2d or nn.AdaptiveAvgPool2d it can replace) for the engine's
    pooling on input ``x`` without the layer's own timing deciding, or None (the timing decides, as for any layer).

    Why a rule: a pooling's own timing is short (an average pooling of at most 14x14 at batch 1: 5-25 us either way
    in the run below) and on a busy machine it is noise; and alone, warm, it does not see what the network does.
    ``python -m bench.pooling_shapes`` (2 threads, a 2-vCPU Intel Xeon, 2026-12-07; bench/results/
    cpu-pooling-shapes-2026-12-07-intel-xeon.txt), each layer alone and warm, batch 1 and 8, NCHW and channels_last,
    8-1024 channels at 14x14-112x112: max pooling (3x3 stride 2 padding 1, 2x2 stride 2, 3x3 stride 1 padding 1, 5x5
    stride 1 padding 2) 1.19-37x torch's on all 112 shapes. Average pooling to 1x1 on planes of at most 14x14 (96-2048
    channels) 0.91-1.53x alone (below 1.0 on 2 of 16 shapes, both channels_last), but inside ResNet-50 at batch 1,
    where its input was just written by both cores, the step took 0.166 -> 0.040 ms on channels_last input (50% kept;
    bench/results/cpu-global-avg-pool-ab-resnet50-d0.5-2026-12-07-intel-xeon.txt) and 0.174 -> 0.034 ms on NCHW input
    (10% kept; ...-global-avg-pool-ab-2026-12-07-intel-xeon.txt). On larger planes (8-512 channels at 28x28-112x112)
    0.43-1.63x alone, torch faster on 13 of 24: those keep their timing."""
    if isinstance(pool, nn.MaxPool2d) and SeparableMaxPool2d._runs_kernel(x):
        return "max pooling: the kernel ran 1.19-37x torch's on every shape measured"
    if (isinstance(pool, nn.AdaptiveAvgPool2d) and GlobalAvgPool2d._runs_kernel(x)
            and x.shape[-1] * x.shape[-2] <= RULE_AVERAGE_PLANE):
        return (f"average pooling of a plane of at most {RULE_AVERAGE_PLANE} positions: inside ResNet-50 the kernel "
                "ran 4-5x torch's")
    return None


# Layers whose output is a new tensor, never a view of their input or of a tensor they keep (the convolutions may
# return their residual, written over, only where the graph marked that residual dead): a value one of them made may
# be overwritten once nothing reads it (fusion.mark_reusable_residuals). Each class is listed,
# subclasses too: the check run on every call (fusion.residual_reuse_allowed) compares exact types, so a subclass a
# user derives (with a forward that may return a view) is not trusted for being one of these.
_FRESH_OUTPUT_LAYERS = (SparseConv2d, DenseConv2d, WinogradConv2d, SeparableMaxPool2d, nn.MaxPool2d,
                        GlobalAvgPool2d)

# The layers the engine puts into a network. Each names its arguments as the torch layer it replaces does (``input``;
# a SparseMultiheadAttention ``query``, ``key``, ...): a model that calls ``self.conv(input=x)`` calls the replacement
# so. They are not torch.nn classes, so torch.fx traces into them unless told not to: to trace a converted network
# again (torchvision's create_feature_extractor), pass them as leaf modules
# (``tracer_kwargs={"leaf_modules": list(ENGINE_LAYERS)}``).
ENGINE_LAYERS = (SparseConv2d, DenseConv2d, WinogradConv2d, SparseLinear, DenseLinear, SparseMultiheadAttention,
                 SeparableMaxPool2d, GlobalAvgPool2d)


def _unsupported_reason(module: nn.Module) -> str | None:
    """Why a Conv2d/Linear cannot be converted, or None when it can."""
    hooks = fusion.module_hooks(module)
    if hooks:
        return f"has hooks ({', '.join(hooks[:3])}); kept as the torch layer so that they run"
    if isinstance(module, nn.MaxPool2d):
        return _pooling_unsupported_reason(module)
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return _average_pooling_unsupported_reason(module)
    if isinstance(module, (nn.Conv1d, nn.Conv3d)):
        return f"{type(module).__name__}: the sparse kernel is for 2-D convolutions only"
    return _not_plain_reason(module)


def _not_plain_reason(module: nn.Module) -> str | None:
    """Why a layer is not one the engine's layers (sparse or :class:`DenseConv2d`) can stand in for: not a
    plain float32 CPU nn.Conv2d / nn.Linear, or a Conv2d padding they cannot express; None when it is."""
    if type(module) not in (nn.Conv2d, nn.Linear):
        name = type(module).__name__
        if torch.nn.utils.parametrize.is_parametrized(module):
            return (f"{name}: its weight is computed by a parametrization on every call (remove it with "
                    "torch.nn.utils.parametrize.remove_parametrizations to run the layer sparse)")
        if hasattr(module, "scores"):  # a vpns_fast masked layer (MaskedConv2d, MaskedLinear, ...)
            return f"{name} is a masked layer: fold its masks into the weights first (vpns_fast.fold)"
        base = "nn.Conv2d" if isinstance(module, nn.Conv2d) else "nn.Linear"
        return f"{name} subclasses {base}; the engine replaces the plain class only (a subclass's forward may differ)"
    if module.weight.dtype != torch.float32 or module.weight.device.type != "cpu":
        return f"weight is {module.weight.dtype} on {module.weight.device}; float32 CPU only"
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r}"
        if _explicit_padding(module) is None:
            return f"padding={module.padding!r} with an even kernel extent (asymmetric)"
    return None


def _times_ms(run: Callable[[], object], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def compare_layer_times(dense: Callable[[], object], sparse: Callable[[], object], repeats: int,
                        rounds: int = 3) -> tuple[float, float]:
    """Fastest milliseconds of two calls (``repeats`` calls each, at least two per round), timed in
    interleaved rounds so that a burst of load on a shared machine hits both alike.

    The minimum, not the median: a call's time also depends on whether the allocator hands it a
    recycled buffer or freshly mapped pages that fault on first touch, and that state drifts with
    the call sequence. Measured (2-core EPYC, ResNet-50 layer3.0.conv1 at batch 32, a 25.7 MB
    output): the dense conv took 39.5 ms or 75 ms depending on it, for hundreds of calls in a row;
    a median-of-3 decision found the sparse kernel 1.35x faster, where the benchmark then timed
    dense at 40 ms and sparse at 60 ms. The
    minimum compares both in the recycled state: the state of every call once glibc's mmap
    threshold is raised (``MALLOC_MMAP_THRESHOLD_``, see the README); without that, which state a
    layer meets inside a network is not under control."""
    dense(), sparse()  # warm-up: first calls allocate and fault in pages
    dense_times, sparse_times = [], []
    per_round = max(2, -(-repeats // rounds))
    for _ in range(rounds):
        dense_times += _times_ms(dense, per_round)
        sparse_times += _times_ms(sparse, per_round)
    return min(dense_times), min(sparse_times)


def _capture_layer_io(model: nn.Module, layers: list[tuple[str, nn.Module]], example_input: torch.Tensor,
                      whole_calls: dict[str, nn.Module]):
    """Runs ``example_input`` through ``model`` once: each layer's first input (a copy), the order the
    layers were first called in, each layer's output shape (where it returns one tensor), and
    ``{name: (args, kwargs)}`` of the first call of each of ``whole_calls`` (tensors copied, one copy of a tensor
    passed twice: self-attention gets ``x, x, x``)."""
    captured: dict[str, torch.Tensor] = {}
    order: list[str] = []
    output_shapes: dict[str, tuple[int, ...]] = {}
    calls: dict[str, tuple] = {}

    def capture(name):
        def hook(module, args, kwargs):
            # torch's Conv2d, Linear and MaxPool2d name their one argument ``input``: ``self.conv(input=x)``
            # passes it by keyword, leaving ``args`` empty
            if name not in captured:
                captured[name] = (args[0] if args else kwargs["input"]).detach().clone()
                order.append(name)
        return hook

    def capture_call(name):
        def hook(module, args, kwargs):
            if name in calls:
                return
            copies: dict[int, torch.Tensor] = {}

            def copied(value):
                if torch.is_tensor(value) and id(value) not in copies:
                    copies[id(value)] = value.detach().clone()
                return copies[id(value)] if torch.is_tensor(value) else value

            calls[name] = (tuple(map(copied, args)), {key: copied(value) for key, value in kwargs.items()})
        return hook

    def output_shape(name):
        def hook(module, inputs, output):
            if torch.is_tensor(output):  # MaxPool2d(return_indices=True) returns (values, indices): left in torch
                output_shapes.setdefault(name, tuple(output.shape))
        return hook

    handles = [module.register_forward_pre_hook(capture(name), with_kwargs=True) for name, module in layers]
    handles += [module.register_forward_hook(output_shape(name)) for name, module in layers]
    handles += [module.register_forward_pre_hook(capture_call(name), with_kwargs=True)
                for name, module in whole_calls.items()]
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for handle in handles:
            handle.remove()
    return captured, order, output_shapes, calls


def _decision_row(name: str, kind: str, weight_shape: list, nnz: int, numel: int, **fields) -> dict:
    """A decision table row, chosen "dense" and nothing measured until ``fields`` (or the decision) say otherwise."""
    return {"name": name, "type": kind, "weight_shape": weight_shape, "input_shape": None,
            "density": (nnz / numel if numel else 0.0) if weight_shape else 1.0, "nnz": nnz, "dense_ms": None,
            "sparse_ms": None, "speedup": None, "chosen": "dense", "reason": "", "fused": [], "flops": None,
            "dense_flops": None, "dense_algorithm": None, "onednn_ms": None, "winograd_ms": None,
            "winograd_note": None, **fields}


def _layer_row(name: str, module: nn.Module, captured: dict, output_shapes: dict, folded: list[str]) -> dict:
    """The decision table's row of one layer, before any decision."""
    weight = getattr(module, "weight", None)
    nnz = int(torch.count_nonzero(weight)) if weight is not None else 0
    row = _decision_row(name, type(module).__name__, list(weight.shape) if weight is not None else [], nnz,
                        weight.numel() if weight is not None else 0,
                        input_shape=list(captured[name].shape) if name in captured else None,
                        fused=["batchnorm"] if name in folded else [])
    if weight is not None and name in output_shapes:
        # multiply-adds: every output position of every output channel reads each of its weights
        shape = output_shapes[name]
        # counted from the end, as a layer may be called unbatched: Linear [..., out], ConvNd [N, C, *spatial] or
        # [C, *spatial] (the weight has 2 dimensions more than the spatial ones)
        channels = shape[1 - weight.dim()]
        positions = math.prod(shape) // max(1, channels)
        per_channel = weight.numel() // max(1, weight.shape[0])
        row.update(flops=2 * nnz * positions, dense_flops=2 * per_channel * weight.shape[0] * positions)
    return row


def _dense_replacement(name: str, module: nn.Module, x: torch.Tensor, expected: torch.Tensor | None, *,
                       winograd: bool, repeats: int, row: dict) -> nn.Module | None:
    """The faster dense stand-in for a Conv2d (:class:`DenseConv2d`, or :class:`WinogradConv2d` where ``winograd``,
    the layer is one it computes and it measured faster on ``x``) or a Linear (:class:`DenseLinear`), checked
    against the layer's output on its captured input ``x`` (``expected``, computed here when not given); or None:
    the kernel missing (oneDNN; AVX2 and FMA for DenseLinear), not a plain float32 CPU Conv2d / Linear without
    hooks, or padding it cannot express. Records the choice in ``row`` (``dense_algorithm``, ``onednn_ms``,
    ``winograd_ms``, and ``winograd_note`` when Winograd was not tried or refused)."""
    if type(module) not in (nn.Conv2d, nn.Linear) or fusion.module_hooks(module) or _not_plain_reason(module):
        return None
    if not (dense_conv_available()[0] if type(module) is nn.Conv2d else pointwise_conv_supported()):
        return None
    stand_in = (DenseConv2d if type(module) is nn.Conv2d else DenseLinear).from_dense(module)
    if expected is None:
        with torch.no_grad():
            expected = module(x)
    _check_replacement(name, "dense stand-in", module, stand_in, x, expected)
    if isinstance(stand_in, DenseLinear):
        row["dense_algorithm"] = stand_in.algorithm_for(x)
        return stand_in
    row["dense_algorithm"] = stand_in.dense_algorithm
    reason = "winograd=False" if not winograd else winograd_unsupported_reason(module)
    if reason is not None:
        row["winograd_note"] = reason
        return stand_in
    return _faster_of(stand_in, WinogradConv2d.from_dense(module), x, expected, repeats, row)


def _faster_of(onednn: DenseConv2d, fast: WinogradConv2d, x: torch.Tensor, expected: torch.Tensor, repeats: int,
               row: dict) -> DenseConv2d:
    """``fast`` when it reproduces ``expected`` (within the 1e-4 every layer meets) and ran faster than
    ``onednn`` on ``x`` (channels_last, as the engine keeps it between dense layers; interleaved rounds), else
    ``onednn``: a Winograd result outside the bound is not used, never a reason to refuse the conversion."""
    with torch.no_grad():
        problem = tensor_difference(fast(x), expected, 1e-4, "the Conv2d's output")
    if problem is not None:
        row["winograd_note"] = f"Winograd {problem}: not used"
        return onednn
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        onednn_ms, winograd_ms = compare_layer_times(functools.partial(onednn, x), functools.partial(fast, x),
                                                     repeats)
    row.update(onednn_ms=onednn_ms, winograd_ms=winograd_ms)
    if winograd_ms < onednn_ms:
        row["dense_algorithm"] = "Winograd"
        return fast
    return onednn


def _check_replacement(name: str, kind: str, module: nn.Module, replacement: nn.Module, x: torch.Tensor,
                       expected: torch.Tensor) -> None:
    """Refuses (RuntimeError) a replacement whose output on ``x`` is not the layer's: NaN and infinities in the
    same places (a ``-inf`` bias masking a class), the rest within float32 rounding for a layer that sums (a
    weighted one, an average pooling), exactly for a max pooling."""
    with torch.no_grad():
        got = replacement(x)
    exact = isinstance(module, nn.MaxPool2d)
    problem = tensor_difference(got, expected, 0.0 if exact else 1e-4, f"the {type(module).__name__}'s output")
    if problem is not None:
        # still refused where the layer's NaN comes from the input (an infinity times a zero weight, which the
        # sparse layer skips): the converted model would not compute the model's values; the caller is told why
        hint = "" if bool(torch.isfinite(x).all()) else " (its input in the example holds NaN or infinities)"
        raise RuntimeError(f"convert_for_cpu: {kind} {name} {problem}, against the {type(module).__name__}"
                           f"{hint}; refusing to convert")


def _decide(name: str, module: nn.Module, x: torch.Tensor, row: dict, policy: str, min_speedup: float,
            repeats: int, winograd: bool) -> nn.Module | None:
    """The replacement of one supported layer, checked against it on its captured input ``x``: the sparse
    layer, or (``policy="measure"`` finding it not ``min_speedup`` times faster than the dense one) the
    dense stand-in of a Conv2d (:class:`DenseConv2d` or :class:`WinogradConv2d`), or None (keep the layer).
    Fills ``row``'s times, choice and reason."""
    if isinstance(module, nn.MaxPool2d):
        sparse = SeparableMaxPool2d.from_module(module)
    elif isinstance(module, nn.AdaptiveAvgPool2d):
        sparse = GlobalAvgPool2d()
    elif isinstance(module, nn.Conv2d):
        sparse = SparseConv2d.from_dense(module)
    else:
        sparse = SparseLinear.from_dense(module)
    with torch.no_grad():
        expected = module(x)
    _check_replacement(name, "sparse", module, sparse, x, expected)
    if policy != "measure":
        row.update(chosen="sparse", reason="policy=sparse")
        return sparse
    rule = _pooling_rule(module, x)
    if rule is not None:  # timed once, for the table only
        with torch.no_grad():
            times = compare_layer_times(functools.partial(module, x), functools.partial(sparse, x), repeats)
        _record_times(row, *times)
        alone = f"; this layer alone {row['speedup']:.2f}x" if row["speedup"] else ""
        row.update(chosen="sparse", reason=f"swapped by rule ({rule}){alone}")
        return sparse
    dense, dense_input, dense_label = module, x, ""
    stand_in = _dense_replacement(name, module, x, expected, winograd=winograd, repeats=repeats, row=row)
    if stand_in is not None:
        # a conv's stand-in measured on channels_last input, the layout it keeps between dense layers
        dense, dense_input = stand_in, (x if isinstance(stand_in, DenseLinear)
                                        else x.contiguous(memory_format=torch.channels_last))
        dense_label = f" than {row['dense_algorithm']}"
    if not _measured_choice(functools.partial(dense, dense_input), functools.partial(sparse, x), repeats, min_speedup,
                            row, dense_label):
        return stand_in
    row["chosen"] = "sparse"
    return sparse


def _record_times(row: dict, dense_ms: float, sparse_ms: float) -> None:
    """A decision row's dense_ms, sparse_ms and speedup (None where the sparse time is 0)."""
    row.update(dense_ms=dense_ms, sparse_ms=sparse_ms, speedup=dense_ms / sparse_ms if sparse_ms > 0 else None)


def _measured_choice(dense_call: Callable[[], object], sparse_call: Callable[[], object], repeats: int,
                     min_speedup: float, row: dict, dense_label: str = "") -> bool:
    """Whether ``sparse_call`` runs at least ``min_speedup`` times faster than ``dense_call``, timed in interleaved
    rounds (:func:`compare_layer_times`; twice as many where the ratio lands within CLOSE_CALL of ``min_speedup``,
    rather than deciding on one noisy reading). Fills ``row``'s dense_ms, sparse_ms, speedup and reason."""
    with torch.no_grad():
        dense_ms, sparse_ms = compare_layer_times(dense_call, sparse_call, repeats)
        close_call = abs(dense_ms / max(sparse_ms, 1e-9) / min_speedup - 1) < CLOSE_CALL
        if close_call:
            dense_again, sparse_again = compare_layer_times(dense_call, sparse_call, repeats, rounds=6)
            dense_ms, sparse_ms = min(dense_ms, dense_again), min(sparse_ms, sparse_again)
    _record_times(row, dense_ms, sparse_ms)
    faster = dense_ms >= min_speedup * sparse_ms
    again = ", measured twice" if close_call else ""
    row["reason"] = f"sparse {'>=' if faster else 'not'} {min_speedup:g}x faster{dense_label}{again}"
    return faster


# The reason of a layer the example input never reaches (an auxiliary head, a branch other inputs take).
NOT_CALLED = "not called by the example input (an input that reaches it runs it dense)"


def _layer_replacement(name: str, module: nn.Module, x: torch.Tensor | None, row: dict, policy: str,
                       min_speedup: float, repeats: int, winograd: bool, refused: dict[str, str]) -> nn.Module | None:
    """What replaces one layer of the table (None: it stays as it is), ``x`` its captured input (None: never
    called as a module); fills ``row``'s reason and, for the layers it times, its times. ``refused``: why each
    attention module the engine leaves is left (its out_proj is never called: the attention reads its weight)."""
    if policy == "dense":
        row["reason"] = "policy=dense"
        return None
    if x is None:
        owner = name.rpartition(".")[0]
        row["reason"] = f"in an attention the engine leaves: {refused[owner]}" if owner in refused else NOT_CALLED
        return None
    if x.dim() == 3 and isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d)):
        # an unbatched (C, H, W) image, which the engine's layers run as the batch of one it is: checked, timed and
        # ruled so, as a dense conv's channels_last input must be 4-d
        x = x.unsqueeze(0)
    reason = _unsupported_reason(module)
    if reason is None:
        return _decide(name, module, x, row, policy, min_speedup, repeats, winograd)
    replacement = _dense_replacement(name, module, x, None, winograd=winograd, repeats=repeats, row=row)
    row["reason"] = reason + (f"; dense through {row['dense_algorithm']}" if replacement is not None else "")
    return replacement


def _with_layers_replaced(converted: nn.Module, layers: list[tuple[str, nn.Module]], order: list[str],
                          capture: tuple[dict, dict], folded: list[str], refused: dict[str, str], policy: str,
                          min_speedup: float, repeats: int, winograd: bool) -> tuple[nn.Module, list[dict]]:
    """``(network, table)``: ``converted`` with each of ``layers`` replaced as :func:`_layer_replacement` decides (in
    the order the example called them, ``order``, then those it never called), and the table's rows of those layers.
    ``capture``: each layer's captured input and output shape (:func:`_capture_layer_io`)."""
    captured, output_shapes = capture
    modules = dict(layers)
    table = []
    for name in order + [name for name, _ in layers if name not in captured]:
        module = modules[name]
        row = _layer_row(name, module, captured, output_shapes, folded)
        table.append(row)
        replacement = _layer_replacement(name, module, captured.get(name), row, policy, min_speedup, repeats,
                                         winograd, refused)
        if replacement is None:
            continue
        if name:
            converted.set_submodule(name, replacement)
        else:  # ``model`` is itself one layer
            converted = replacement
    return converted, table


def check_min_speedup(min_speedup) -> None:
    """TypeError unless ``min_speedup`` is a real number (not a bool), ValueError unless it is > 0 (NaN neither):
    convert_for_cpu's check, which deploy() makes too (under policy="dense" it never reaches convert_for_cpu). A
    string had raised "'>' not supported between 'str' and 'int'" (an outside trial)."""
    if isinstance(min_speedup, bool) or not isinstance(min_speedup, numbers.Real):
        raise TypeError(f"min_speedup must be a number, got {min_speedup!r}")
    if not min_speedup > 0:  # NaN too
        raise ValueError(f"min_speedup must be > 0, got {min_speedup}")


def _check_conversion_arguments(example_input, policy: str, min_speedup: float, repeats: int, winograd) -> None:
    """convert_for_cpu's argument checks (ValueError / TypeError naming the argument), and the extension's
    when a layer may be replaced."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    check_min_speedup(min_speedup)
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if not isinstance(winograd, bool):
        raise TypeError(f"winograd must be a bool, got {winograd!r}")
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a tensor, got {type(example_input).__name__}")
    if policy != "dense":
        _ops()


def _record_fused(table: list[dict], network: nn.Module, epilogues: dict[str, list[str]]) -> None:
    """Adds to each row what its layer absorbed (``epilogues``, by layer name) and, for a DenseConv2d, what runs it
    now: its fused activation may have moved it off the pointwise kernel (DenseConv2d.dense_algorithm)."""
    modules = dict(network.named_modules())
    for row in table:
        row["fused"] += epilogues.get(row["name"], [])
        if type(modules.get(row["name"])) is DenseConv2d:
            row["dense_algorithm"] = modules[row["name"]].dense_algorithm


def convert_for_cpu(model: nn.Module, example_input: torch.Tensor, policy: str = "measure",
                    min_speedup: float = 1.05, repeats: int = 15,
                    replace_pooling: bool = True, fuse: bool = True,
                    summary: dict | None = None, winograd: bool = True) -> tuple[nn.Module, list[dict]]:
    """A copy of ``model`` (plain layers, masks already folded into the weights) in eval mode where
    each nn.Conv2d / nn.Linear is replaced by SparseConv2d / SparseLinear

    * ``policy="measure"``: only where the sparse layer runs at least ``min_speedup`` times faster
      than the dense layer on that layer's real input (captured by running ``example_input``
      through the model), with the current torch thread count;
    * ``policy="sparse"``: wherever the layer is supported; ``policy="dense"``: nowhere (a table only).

    A Conv2d that stays dense (the sparse layer measured too slow, or it cannot run the layer: groups)
    becomes a :class:`DenseConv2d` (oneDNN, weight reordered once, channels_last), the faster dense
    convolution here, or, for a 3x3 kernel at stride 1 (groups 1, dilation 1), a :class:`WinogradConv2d` where
    that measured faster still (``winograd=False``: never; see its accuracy there); the measured dense time is
    the chosen one's, on a channels_last copy of the input. Without oneDNN, or for padding neither can express
    ("same" with an even kernel extent pads one side more), the nn.Conv2d stays. Under ``policy="dense"`` every
    layer stays as it is.

    Conv1d / Conv3d stay as they are, with the reason in their rows.

    Returns ``(model_copy, table)``; the table has one dict per Conv1d/2d/3d and Linear, in forward order (those
    never called after), then one per nn.MultiheadAttention the engine can run:
    name, type, weight_shape, input_shape, density, nnz, dense_ms, sparse_ms, speedup (dense_ms /
    sparse_ms; times are None unless measured), chosen ("sparse" / "dense") and reason; for a Conv2d with a
    dense stand-in also dense_algorithm ("oneDNN" / "pointwise" / "Winograd"), onednn_ms and winograd_ms (when both were
    timed) and winograd_note (why Winograd was not tried or not used). After them, a row (chosen "dense", times
    None) for each other pruned weight the engine leaves in its torch module (:data:`PRUNED_DENSITY`: a
    ConvTranspose2d's, the ``in_proj_weight`` of an attention it leaves), named ``<module>.<parameter>``; unless
    ``policy="dense"``, a :class:`PrunedWeightsLeftDenseWarning` names the pruned weights that stay dense without
    having been measured.
    Every sparse layer is checked against the dense one on the captured input before use.
    ``replace_pooling``: also swap each nn.MaxPool2d for SeparableMaxPool2d (same values) and each
    nn.AdaptiveAvgPool2d to 1x1 for GlobalAvgPool2d (within float32 rounding), under the same policy, except that
    ``policy="measure"`` swaps every max pooling, and every average pooling of a plane of at most 14x14, whatever
    their own timing says (:func:`_pooling_rule` has the measurements); their rows have type "MaxPool2d" /
    "AdaptiveAvgPool2d", density 1.0 and nnz 0, the times still measured.

    ``fuse`` (default): on a ``torch.fx`` trace of the model, fold each eval BatchNorm2d into the
    convolution that feeds it, and let each sparse or DenseConv2d convolution add its residual and apply the
    activation after it (see :mod:`vpns_fast.deploy.fusion`); each row's ``fused`` lists what its layer
    absorbed ("batchnorm", "add", and the activation by its name in EPILOGUE_ACTIVATIONS). The converted model is
    checked end to end against the model on ``example_input`` (max |error| <= 1e-3 (1 + max |output|), plus 4
    times the model's own :func:`float32_rounding` with a :class:`RoundingAmplifiedWarning` where it needs that).
    ``summary``: a dict to receive ``fusion`` (what was done, or why not), ``batchnorm_folded``,
    ``epilogues_fused`` and ``residuals_reusable`` (the fused calls that are their residual's last reader and
    get ``residual_reusable``: a DenseConv2d adds into that residual in place, a SparseConv2d may write its output
    there; see
    :func:`vpns_fast.deploy.fusion.mark_reusable_residuals`), ``aligned_outputs`` (sparse convolutions writing
    ``aligned_output=True`` for sparse readers: :func:`vpns_fast.deploy.fusion.mark_aligned_outputs`) and
    ``winograd`` (None without WinogradConv2d layers, else which were kept after the whole network was timed with
    the largest of them by oneDNN again, :func:`_prefer_winograd_where_it_pays`).
    """
    _check_conversion_arguments(example_input, policy, min_speedup, repeats, winograd)
    if torch.is_inference_mode_enabled():
        # the copy made inside inference mode would hold inference tensors: its torch layers' parameters (a
        # LayerNorm's weight, still requiring a gradient) would then fail a later call in grad mode that records
        # them for backward; outside it the conversion is the same as a caller's outside it
        with torch.inference_mode(False):
            return convert_for_cpu(model, example_input, policy, min_speedup, repeats, replace_pooling, fuse,
                                   summary, winograd)
    model = checked_module(model)
    # the caller's tensor is never passed to the model (which may write into its input), and every check runs
    # on a fresh copy of the same values
    example_input = example_input.detach().clone()
    converted = fusion.copy_sharing_hooks(model).eval()
    untraced = converted  # its modules' classes, which a torch.fx trace may replace by plain holders of their weights
    reference = _Reference(model, converted, example_input)
    graph_module, folded, fusion_note = None, [], "fuse=False"
    if fuse:
        graph_module, fusion_note = _checked_trace(converted, example_input, reference)
        if graph_module is not None:
            converted = graph_module
            folded = fusion.fold_batchnorm(graph_module)
    layers, attentions, refused = _tabled_modules(converted, replace_pooling)
    captured, order, output_shapes, calls = _capture_layer_io(converted, layers, example_input.clone(), attentions)
    other_rows = _other_pruned_weights(converted, {**dict(layers), **attentions}, untraced, refused)
    converted, table = _with_layers_replaced(converted, layers, order, (captured, output_shapes), folded, refused,
                                             policy, min_speedup, repeats, winograd)
    attention_rows, swapped = _attention_decisions(converted, attentions, calls, policy, min_speedup, repeats)
    table += attention_rows + other_rows
    epilogues = {}
    problem, layout_note = _runnable_or_attention_undone(converted, swapped, attention_rows, example_input, reference)
    if problem is not None and graph_module is None:
        raise RuntimeError(f"convert_for_cpu: the converted model does not compute what the model does ({problem}); "
                           "refusing to convert")
    if graph_module is not None and problem is None:
        epilogues, problem = _fused_epilogues(graph_module, example_input)
        _record_fused(table, graph_module, epilogues)
        fusion_note = (f"torch.fx: {len(folded)} batch norms folded into convolutions, {len(epilogues)} residual "
                       "add / activation epilogues fused into convolutions")
        if problem is None:  # the epilogue rewrite changed the graph since _runnable's check
            problem = _end_to_end_problem(converted, example_input, reference)
    if problem is not None:
        # the rewrite changed what the model computes (or could not be made): every layer again, without it
        converted, table = convert_for_cpu(model, example_input, policy, min_speedup, repeats, replace_pooling,
                                           fuse=False, summary=summary, winograd=winograd)
        if summary is not None:
            summary["fusion"] = f"graph rewrite refused ({problem}); converted without it"
        return converted, table
    network_note = winograd_note = None
    if policy == "measure":
        converted, network_note, layout_note = _prefer_faster_network(converted, table, example_input, reference,
                                                                      repeats, min_speedup, layout_note)
        converted, winograd_note = _prefer_winograd_where_it_pays(converted, table, example_input, reference,
                                                                  _network_rounds(repeats))
    reused = aligned = 0
    if graph_module is not None:
        fusion_note, reused, aligned = _marked_last(converted, example_input, reference, fusion_note)
    if summary is not None:
        summary.update(fusion=fusion_note, batchnorm_folded=len(folded), epilogues_fused=len(epilogues),
                       residuals_reusable=reused, aligned_outputs=aligned, network=network_note,
                       layout=layout_note, winograd=winograd_note)
    if policy != "dense":
        _warn_pruned_left_dense(table)
    reference.warn_if_widened(converted)
    if isinstance(converted, fx.GraphModule):
        fusion.mark_inlined_blocks(converted)
    return converted, table


def _checked_trace(model: nn.Module, example_input: torch.Tensor, reference) -> tuple[fx.GraphModule | None, str]:
    """:func:`fusion.trace` of ``model``, run on the example and compared with the model before anything is rewritten
    on it: a trace records one path of the model's Python (an ``if w is not None`` on a value torch.fx stands in for
    is always taken; the traced graph then raised where the model runs). ``(None, why)`` where it does not compute
    what the model does."""
    graph_module, note = fusion.trace(model)
    problem = None if graph_module is None else _end_to_end_problem(graph_module, example_input, reference)
    if problem is not None:
        return None, f"the torch.fx trace does not compute what the model does ({problem})"
    return graph_module, note


# A weight with at most this share of its entries nonzero is taken as pruned: trained weights and the usual random
# initializations hold no exact zeros. An all-zero weight is a placeholder, not pruned. Structured initializations
# (dirac, eye, a bilinear upsampling kernel) are counted too: a warning about them is a false alarm, said once.
PRUNED_DENSITY = 0.8


class PrunedWeightsLeftDenseWarning(UserWarning):
    """``convert_for_cpu`` (so ``deploy()``) found pruned weights that run dense because the engine cannot run
    them (not chosen by measurement): a layer it does not replace (ConvTranspose2d, Conv1d, a subclass, hooks), a
    weight its module uses itself (nn.MultiheadAttention's ``in_proj_weight``), one never called as a module. The
    decision table lists each with its reason."""


def _other_pruned_weights(model: nn.Module, layers: dict[str, nn.Module], untraced: nn.Module,
                          refused: dict[str, str]) -> list[dict]:
    """Decision rows (chosen "dense") for the pruned weights (:data:`PRUNED_DENSITY`, two or more dimensions) of
    ``model`` that are not the ``weight`` of one of ``layers``: the engine leaves them in their torch modules, which
    are named by their class in ``untraced`` (the model before a torch.fx trace, which turns a module it traces
    into, such as a user's subclass of nn.Linear, into a plain holder of its weights); ``refused``: why each
    attention module the engine leaves is left."""
    types = {name: type(module) for name, module in untraced.named_modules()}
    classes = {name: cls.__name__ for name, cls in types.items()}
    runnable = {name for name, module in untraced.named_modules() if type(module) in (nn.Conv2d, nn.Linear)}
    rows = []
    for owner_name, owner in model.named_modules():
        if owner_name in layers or _held_by(owner_name, layers):
            continue  # a layer in the table, or held by one (a parametrization's original weight)
        for parameter_name, parameter in owner.named_parameters(recurse=False):
            if parameter.dim() < 2:
                continue
            nnz = int(torch.count_nonzero(parameter))
            if not 0 < nnz <= PRUNED_DENSITY * parameter.numel():
                continue
            kind = classes.get(owner_name, type(owner).__name__)
            if owner_name in refused:
                reason = f"{parameter_name} of an attention the engine leaves: {refused[owner_name]}"
            elif owner_name in runnable:  # traced into a plain holder: the code reads the weight, never calls it
                reason = (f"{parameter_name} of a {kind} whose weight the model's code reads itself (as in "
                          f"F.{'linear' if kind == 'Linear' else 'conv2d'}(x, layer.weight, ...)) instead of "
                          "calling the layer; the engine replaces the layers a model calls")
            elif issubclass(types.get(owner_name, type(owner)), (nn.Conv2d, nn.Linear)):
                # named in full: timm's timm.layers.linear.Linear had read "a Linear, which the engine leaves"
                cls = types.get(owner_name, type(owner))
                base = "nn.Conv2d" if issubclass(cls, nn.Conv2d) else "nn.Linear"
                reason = (f"{parameter_name} of a {cls.__module__}.{cls.__qualname__}, which subclasses {base}: the "
                          "engine replaces the plain class only")
            else:
                reason = (f"{parameter_name} of a {kind}, which the engine leaves as it is (it runs nn.Conv2d and "
                          "nn.Linear layers)")
            rows.append(_decision_row(f"{owner_name}.{parameter_name}" if owner_name else parameter_name, kind,
                                      list(parameter.shape), nnz, parameter.numel(), reason=reason))
    return rows


def _tabled_modules(network: nn.Module, replace_pooling: bool) -> tuple[list[tuple[str, nn.Module]], dict, dict]:
    """``(layers, attentions, refused)``: the (name, module) of each Conv1d/2d/3d, Linear (and MaxPool2d and
    AdaptiveAvgPool2d with ``replace_pooling``) in ``network``; ``{name: module}`` of each nn.MultiheadAttention that
    :class:`SparseMultiheadAttention` can stand in for (its out_proj is in its row, not among the layers); and
    ``{name: why}`` of the other attention modules."""
    kinds = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear) + ((nn.MaxPool2d, nn.AdaptiveAvgPool2d) if replace_pooling
                                                             else ())
    modules = dict(network.named_modules())
    reasons = {name: _attention_reason(name, module, modules) for name, module in modules.items()
               if isinstance(module, nn.MultiheadAttention)}
    attentions = {name: modules[name] for name, reason in reasons.items() if reason is None}
    refused = {name: reason for name, reason in reasons.items() if reason is not None}
    layers = [(name, module) for name, module in modules.items()
              if isinstance(module, kinds) and not _held_by(name, attentions)]
    return layers, attentions, refused


def _attention_reason(name: str, module: nn.MultiheadAttention, modules: dict[str, nn.Module]) -> str | None:
    """Why the engine leaves the attention module ``name`` as it is, or None."""
    parent = modules.get(name.rpartition(".")[0]) if name else None
    hooks = fusion.module_hooks(module)
    if type(module) is not nn.MultiheadAttention:
        return f"{type(module).__name__} subclasses nn.MultiheadAttention; the engine replaces the plain class only"
    if hooks:
        return f"has hooks ({', '.join(hooks[:3])}); kept as the torch module so that they run"
    if isinstance(parent, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        # they read the attention's weights themselves (and have a fused fast path of their own)
        return f"inside an nn.{type(parent).__name__}, which reads its attention's weights itself"
    if not name:
        return "the model itself"
    return attention_unsupported_reason(module)


def _held_by(name: str, modules: dict[str, nn.Module]) -> bool:
    """Whether the module called ``name`` lies inside one of ``modules`` (by qualified name)."""
    parts = name.split(".")
    return any(".".join(parts[:end]) in modules for end in range(1, len(parts)))


def _attention_decisions(network: nn.Module, attentions: dict[str, nn.MultiheadAttention], calls: dict,
                         policy: str, min_speedup: float,
                         repeats: int) -> tuple[list[dict], dict[str, nn.MultiheadAttention]]:
    """Decision rows for ``network``'s supported nn.MultiheadAttention modules, each replaced in place by a
    :class:`SparseMultiheadAttention` where ``policy`` says so (``measure``: at least ``min_speedup`` times faster
    on its captured call, ``calls[name]`` as ``(args, kwargs)``) and its calls take the sparse path; the
    replacement is checked against the module. Returns the rows and ``{name: the module replaced}``."""
    swapped: dict[str, nn.MultiheadAttention] = {}
    rows = []
    for name, module in attentions.items():
        weights = (module.in_proj_weight, module.out_proj.weight)
        row = _decision_row(name, "MultiheadAttention", list(module.in_proj_weight.shape),
                            sum(int(torch.count_nonzero(w)) for w in weights), sum(w.numel() for w in weights),
                            reason="policy=dense")
        rows.append(row)
        if policy == "dense":
            continue
        if name not in calls:
            row["reason"] = NOT_CALLED
            continue
        args, kwargs = calls[name]
        row["input_shape"] = list(args[0].shape) if args and torch.is_tensor(args[0]) else None
        if not SparseMultiheadAttention.runs_sparse(*args, **kwargs):  # its signature is forward's
            row["reason"] = ("called with what only the dense module computes (masks, need_weights=True, "
                             "cross-attention or an unbatched input)")
            continue
        sparse = SparseMultiheadAttention(module)
        with torch.no_grad():
            expected, got = module(*args, **kwargs)[0], sparse(*args, **kwargs)[0]
        problem = tensor_difference(got, expected, 1e-4, "the MultiheadAttention's output")
        if problem is not None:
            raise RuntimeError(f"convert_for_cpu: the sparse replacement of {name} does not compute what it does "
                               f"({problem}); refusing to convert")
        if policy == "measure":
            if not _measured_choice(functools.partial(module, *args, **kwargs),
                                    functools.partial(sparse, *args, **kwargs), repeats, min_speedup, row):
                continue
        else:
            row["reason"] = "policy=sparse"
        row["chosen"] = "sparse"
        network.set_submodule(name, sparse)
        swapped[name] = module
    return rows, swapped


def _runnable_or_attention_undone(network: nn.Module, swapped: dict[str, nn.MultiheadAttention], rows: list[dict],
                                  example_input: torch.Tensor, reference) -> tuple[str | None, str | None]:
    """:func:`_runnable` of ``network``; where it finds a problem and attention modules were swapped (``swapped``),
    they are put back (their ``rows`` say why) and the network checked again: code around an attention module may
    read its attributes (an ``nn.TransformerEncoderLayer`` reads its weights), which the sparse one lacks."""
    outputs = {module: module.contiguous_output for module in network.modules() if isinstance(module, DenseConv2d)}
    problem, layout_note = _runnable(network, example_input, reference)
    if problem is None or not swapped:
        return problem, layout_note
    for module, contiguous in outputs.items():  # _runnable's search for a layout that works, undone too
        module.contiguous_output = contiguous
    for name, module in swapped.items():
        network.set_submodule(name, module)
    for row in rows:
        if row["name"] in swapped:
            row.update(chosen="dense", dense_ms=None, sparse_ms=None, speedup=None,
                       reason=f"the network did not run with it sparse ({problem})")
    return _runnable(network, example_input, reference)


def _warn_pruned_left_dense(table: list[dict]) -> None:
    """One :class:`PrunedWeightsLeftDenseWarning` naming the pruned weights in ``table`` that stay dense without
    having been measured against the sparse kernel."""
    left = [row for row in table if row["chosen"] == "dense" and row["sparse_ms"] is None
            and row["weight_shape"] and 0 < row["density"] <= PRUNED_DENSITY]
    if not left:
        return
    named = "; ".join(f"{row['name'] or '(model)'} ({row['density']:.0%} kept: {row['reason']})" for row in left[:3])
    more = f"; and {len(left) - 3} more" if len(left) > 3 else ""
    several = len(left) > 1
    warnings.warn(f"{len(left)} pruned weight{'s run' if several else ' runs'} dense, the engine cannot run "
                  f"{'them' if several else 'it'} sparse: {named}{more} (the decision table lists each)",
                  PrunedWeightsLeftDenseWarning, stacklevel=caller_stacklevel())


def _fused_epilogues(graph_module: fx.GraphModule, example_input: torch.Tensor) -> tuple[dict, str | None]:
    """``(epilogues fused, None)`` after the epilogue rewrites of ``graph_module`` (in place), or ``({}, why)``
    when shape propagation or a rewrite failed."""
    try:
        return fusion.fuse_epilogues(graph_module, (SparseConv2d, DenseConv2d), example_input.clone()), None
    except Exception as exc:  # shape propagation or the rewrite failed: convert without the rewrite
        return {}, exception_reason(exc, 160)


def _with_reused_residuals(network: nn.Module, example_input: torch.Tensor, reference) -> list[str]:
    """Marks the chosen network's DenseConv2d calls that may add into their residual in place, and its SparseConv2d
    calls that may write into theirs (:func:`fusion.mark_reusable_residuals`), and returns their names; unmarks
    them again (returning []) if the network then no longer reproduces ``reference``. Done last, on the network
    kept. A SparseConv2d call is marked only where its output on ``example_input`` is large enough for the kernel
    to write in place (:func:`set_in_place_residual_bytes`): outside a compiled call plan a mark costs a check on
    every run (5.8 us a marked call in ResNet-50's graph with the layers' own work taken out; every sparse call
    marked when none wrote in place: ResNet-50 at 10% kept, batch 1, 1.017x slower, 2026-12-04)."""
    if not isinstance(network, fx.GraphModule):
        return []
    threshold = in_place_residual_bytes()
    output_bytes: list[dict[fx.Node, int]] = []  # the sizes, found once, for the first sparse call asked about

    def wanted(node: fx.Node, layer: nn.Module) -> bool:
        if type(layer) is not SparseConv2d:
            return True
        if not output_bytes:
            output_bytes.append(_example_output_bytes(network, example_input))
        return output_bytes[0].get(node, 0) >= threshold

    reused = fusion.mark_reusable_residuals(network, (DenseConv2d, SparseConv2d), _FRESH_OUTPUT_LAYERS, wanted=wanted)
    if reused and _end_to_end_problem(network, example_input, reference) is not None:
        fusion.unmark_reusable_residuals(network)
        return []
    return reused


def _example_output_bytes(network: fx.GraphModule, example_input: torch.Tensor) -> dict[fx.Node, int]:
    """{node: bytes of its tensor output} for ``network`` run on ``example_input`` (torch.fx's shape propagation);
    {} where that run fails."""
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        with torch.no_grad():
            ShapeProp(network).propagate(example_input.clone())
    except Exception:  # no sizes: no sparse layer marked
        return {}
    sizes = {}
    for node in network.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape"):
            sizes[node] = math.prod(meta.shape) * meta.dtype.itemsize
    return sizes


def _marked_last(network: nn.Module, example_input: torch.Tensor, reference, note: str) -> tuple[str, int, int]:
    """The marks made on the network kept, each checked end to end (:func:`_with_reused_residuals`,
    :func:`_with_aligned_outputs`): ``note`` with what was marked, and how many calls of each kind."""
    reused = _with_reused_residuals(network, example_input, reference)
    dense = [name for name in reused if not isinstance(network.get_submodule(name), SparseConv2d)]
    if dense:
        note += f", {len(dense)} of them dense convolutions that may add into their residual in place"
    if len(reused) > len(dense):
        note += f", {len(reused) - len(dense)} sparse convolutions that may write their output into their residual"
    aligned = _with_aligned_outputs(network, example_input, reference)
    if aligned:
        note += (f"; {len(aligned)} sparse convolutions write channel-aligned outputs for sparse readers (a new "
                 "layout where a plane is not whole vectors)")
    return note, len(reused), len(aligned)


def _with_aligned_outputs(network: nn.Module, example_input: torch.Tensor, reference) -> list[str]:
    """Marks the chosen network's SparseConv2d layers whose outputs only sparse convolutions read
    (:func:`fusion.mark_aligned_outputs`) and returns their names; unmarks them again (returning []) if the network
    then no longer reproduces ``reference``. Done last, on the network kept: a layer swapped for a dense one
    afterwards would read such an output through a copy."""
    if not isinstance(network, fx.GraphModule):
        return []
    aligned = fusion.mark_aligned_outputs(network, SparseConv2d)
    if aligned and _end_to_end_problem(network, example_input, reference) is not None:
        fusion.unmark_aligned_outputs(network)
        return []
    return aligned


# A converted model's output may lie this far from the model's, times 1 + its largest magnitude (tensor_difference).
END_TO_END_TOLERANCE = 1e-3

# How far a converted model's output may lie from the model's when the model itself amplifies float32 rounding:
# this many times the distance between the model's own float32 output and the same model run in float64. Two
# float32 computations in different orders (the engine's kernels against oneDNN's) each lie about that far from the
# exact result, so up to about twice it from each other; 4 leaves room for the spread between examples. A wrong layer
# is still caught by the per-layer checks (1e-4 on its captured input), which this does not widen.
ROUNDING_AMPLIFIED_FACTOR = 4.0


class RoundingAmplifiedWarning(UserWarning):
    """``convert_for_cpu`` (so ``deploy()``) accepted a converted model whose output differs from the model's by
    more than the usual end-to-end bound, because the model itself is that sensitive to float32 rounding: its own
    float32 output lies that far from the same model run in float64 (a deep network at random initialization, or
    one whose activations grow large). Any float32 engine's outputs carry that much rounding on such a model."""


class _Reference:
    """The model's output on the example, which every converted version must reproduce, and (computed on the
    first check that needs it) how far float32 rounding alone moves it: per output value, max |the model's float32
    output - the same model run in float64|. ``model``: the caller's module (copied for the float64 run, never
    changed); ``converted``: the copy whose float32 output is the reference."""

    def __init__(self, model: nn.Module, converted: nn.Module, example_input: torch.Tensor):
        self.model, self.example_input = model, example_input
        self.output = _reference_output(converted, example_input)
        self._rounding: list[float | None] | None = None
        self.widened: tuple[int, float, float, float] | None = None  # (output, error, bound, rounding) accepted

    def rounding(self, index: int) -> float | None:
        """Output value ``index``'s float32 rounding on the example (None when unknown: the model does not run in
        float64, or the value is no floating tensor)."""
        if self._rounding is None:
            self._rounding = float32_rounding(self.model, self.example_input, self.output)
        return self._rounding[index] if index < len(self._rounding) else None

    def accepts(self, index: int, got: torch.Tensor, expected: torch.Tensor) -> bool:
        """Whether ``got`` lies from ``expected`` (output value ``index``, finite values in the same places) within
        the usual bound widened by :data:`ROUNDING_AMPLIFIED_FACTOR` times the model's own float32 rounding."""
        if not expected.is_floating_point() or got.shape != expected.shape:
            return False
        finite = _finite_difference(got, expected)
        if finite is None:  # NaN or infinities: their places must match exactly, no rounding moves them
            return False
        rounding = self.rounding(index)
        if not rounding:
            return False
        error, largest = finite
        bound = END_TO_END_TOLERANCE * (1.0 + largest)
        if error > bound + ROUNDING_AMPLIFIED_FACTOR * rounding:
            return False
        if self.widened is None or error > self.widened[1]:
            self.widened = (index, error, bound, rounding)
        return True

    def warn_if_widened(self, converted: nn.Module) -> None:
        """One :class:`RoundingAmplifiedWarning` when ``converted`` (the model kept) meets only the widened bound
        (checked again: the widening may have been for a variant not kept)."""
        if self.widened is None:
            return
        self.widened = None
        if _end_to_end_problem(converted, self.example_input, self) is not None or self.widened is None:
            return  # the model kept was checked already; a problem here would be the model's own nondeterminism
        index, error, bound, rounding = self.widened
        warnings.warn(f"the model amplifies float32 rounding: on the example its own float32 output {index} lies "
                      f"{rounding:.3g} from the same model run in float64, and the converted model's {error:.3g} from "
                      f"the model's (the usual bound, 1e-3 (1 + max |output|), is {bound:.3g}); accepted as within "
                      f"{ROUNDING_AMPLIFIED_FACTOR:g} times that rounding. Every per-layer check passed at 1e-4",
                      RoundingAmplifiedWarning, stacklevel=caller_stacklevel())


def float32_rounding(model: nn.Module, example_input: torch.Tensor, output) -> list[float | None]:
    """How far float32 rounding alone moves ``model``'s output on ``example_input``: per value of ``output`` (its
    float32 output there, in eval mode), the larger of max |it - a float64 copy's output| and max |the model run
    channels_last - that float64 output| (two float32 computation orders: on EfficientNet-B2, scaled as in
    bench.zoo_sweep, they lay 1.6e-3 and 4.2e-3 of the largest output from float64); None where the value is no
    floating tensor; [] when the model does not run in float64."""
    if not example_input.is_floating_point():
        return []
    try:
        with torch.inference_mode(False), torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            exact = _output_values(copy.deepcopy(model).double().eval()(example_input.clone().double()))
    except Exception:  # a model that does not run in float64 (or cannot be copied): no widening
        return []
    others = [_output_values(output) or []]
    if example_input.dim() == 4:
        try:
            with torch.inference_mode(False), torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
                variant = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)
                others.append(_output_values(variant(example_input.clone(memory_format=torch.channels_last))) or [])
        except Exception:  # the model's own order alone then
            pass
    rounding = []
    for index, precise in enumerate(exact or []):
        distances = []
        for values in others:
            value = values[index] if index < len(values) else None
            same = (isinstance(value, torch.Tensor) and isinstance(precise, torch.Tensor)
                    and value.is_floating_point() and value.shape == precise.shape)
            finite = _finite_difference(value.double(), precise) if same else None
            distances.append(finite[0] if finite is not None else None)
        rounding.append(None if distances[0] is None else max(d for d in distances if d is not None))
    return rounding


def _reference_output(model: nn.Module, example_input: torch.Tensor):
    """The model's output on a copy of the example, which every converted version must reproduce; ValueError
    naming the example when the model fails on it (a one-channel model given images)."""
    try:
        with torch.no_grad():
            return model(example_input.clone())
    except Exception as exc:
        if is_out_of_memory(exc):
            raise  # the machine's limit, not the example's shape
        raise ValueError(f"{FAILING_EXAMPLE} {tuple(example_input.shape)} "
                         f"({exception_reason(exc)})") from exc


def _with_nchw_outputs(model: nn.Module) -> bool:
    """Makes every DenseConv2d of ``model`` return NCHW; whether any returned channels_last before."""
    changed = False
    for module in model.modules():
        if isinstance(module, DenseConv2d) and not module.contiguous_output:
            module.contiguous_output, changed = True, True
    return changed


def _runnable(converted: nn.Module, example_input: torch.Tensor, reference) -> tuple[str | None, str | None]:
    """``(problem, note)``: why ``converted`` does not reproduce ``reference`` on the example, or None.
    A DenseConv2d returns channels_last, which breaks code that needs NCHW after it (``.view``, or a model
    output its caller views) although every layer is right alone: then every DenseConv2d returns NCHW
    instead (slower, never wrong), and ``note`` says so."""
    problem = _end_to_end_problem(converted, example_input, reference)
    if problem is None or not _with_nchw_outputs(converted):
        return problem, None
    again = _end_to_end_problem(converted, example_input, reference)
    if again is not None:
        return again, None
    return None, f"dense convolutions return NCHW: with channels_last outputs the model failed ({problem})"


def _variant_with(converted: nn.Module, names: list[str],
                  replacement: Callable[[str, nn.Module], nn.Module]) -> nn.Module:
    """A copy of ``converted`` whose layers ``names`` are each replaced by ``replacement(name, layer)``."""
    with torch.inference_mode(False):  # a copy made inside inference mode would hold inference tensors
        variant = fusion.copy_sharing_hooks(converted)
    for name in names:
        layer = replacement(name, variant.get_submodule(name))
        if name:
            variant.set_submodule(name, layer)
        else:  # the model is this one layer
            variant = layer
    return variant


def _all_convs_dense(converted: nn.Module, table: list[dict]) -> tuple[nn.Module, list[str]] | None:
    """A copy of ``converted`` with each SparseConv2d replaced by the dense convolution of the same weight and
    epilogue (a WinogradConv2d where the layer's row measured it faster than oneDNN, else a DenseConv2d), and
    those layers' names; None when there is none or oneDNN is missing."""
    names = [name for name, module in converted.named_modules() if isinstance(module, SparseConv2d)]
    if not names or not dense_conv_available()[0]:
        return None
    winograd_layers = {row["name"] for row in table if row.get("dense_algorithm") == "Winograd"}

    def dense(name: str, sparse: SparseConv2d) -> DenseConv2d:
        layer = WinogradConv2d if name in winograd_layers else DenseConv2d
        return layer(sparse.grouped_weight(), sparse.bias, sparse.stride, sparse.padding, sparse.dilation,
                     sparse.groups, activation=sparse.activation)

    return _variant_with(converted, names, dense), names


def _measured_dense_convs_sparse(converted: nn.Module, table: list[dict]) -> tuple[nn.Module, list[str]] | None:
    """A copy of ``converted`` with each DenseConv2d that its own timing kept dense (its sparse layer was built,
    checked and timed: the row has ``sparse_ms``) replaced by the SparseConv2d of the same weight and epilogue,
    and those layers' names; None when there is none. Layers dense for another reason stay dense."""
    measured = {row["name"] for row in table if row["type"] == "Conv2d" and row["sparse_ms"] is not None}
    names = [name for name, module in converted.named_modules()
             if isinstance(module, DenseConv2d) and name in measured]
    if not names:
        return None
    return _variant_with(converted, names, lambda _name, dense: SparseConv2d(
        dense.weight, dense.bias, dense.stride, dense.padding, dense.dilation, groups=dense.groups,
        activation=dense.activation)), names


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


# how the whole-network notes say they timed (_median_times_ms)
_ROUNDS_NOTE = "{} rounds, rotating order; the first's median, the others' by their per-round ratio to it"


def _median_times_ms(runs: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Milliseconds of each run over ``rounds`` rounds in which the runs take turns, the order rotating from
    round to round: the first run's median time, and each other's the first's median times the median of its
    per-round ratio to the first (a run slower or faster as a whole is judged on its own round's partner, so a
    burst of load that spans a few rounds moves both sides of a ratio).

    Why the rotation and the ratios: the order was fixed, and the medians taken run by run. On this kind of
    shared machine ResNet-50 at batch 1 swings 10-20% within minutes, and the whole-network stages compare
    variants 1-8% apart (ResNet-50 at 50% kept, batch 1: its Winograd variants measured 45.9-47.6 ms and 46.1-48.6
    ms in two conversions, 2026-12-04); the per-round ratio is what the benchmarks report for the same reason."""
    labels = list(runs)
    times: dict[str, list[float]] = {label: [] for label in labels}
    with torch.no_grad():
        for index in range(rounds):
            shift = index % len(labels)
            for label in labels[shift:] + labels[:shift]:
                times[label] += _times_ms(runs[label], 1)
    first = labels[0]
    base = _median(times[first])
    return {label: base if label == first else
            base * _median([mine / max(theirs, 1e-9) for mine, theirs in zip(times[label], times[first])])
            for label in labels}


def _record_network_choice(table: list[dict], names: list[str], chosen: str, why: str) -> None:
    """The table's rows of the layers a whole-network timing switched: their new choice, and why appended."""
    switched = set(names)
    for row in table:
        if row["name"] in switched:
            row.update(chosen=chosen, reason=f"{row['reason']}; {why}")


def _network_rounds(repeats: int) -> int:
    """Interleaved rounds of a whole-network timing, for ``repeats`` timed calls a layer."""
    return max(3, min(7, repeats // 2))


def _transformed_weight_bytes(layer: WinogradConv2d) -> int:
    out_channels, in_channels = layer.weight.shape[:2]
    return winograd.POINTS * in_channels * out_channels * 4


def _prefer_winograd_where_it_pays(network: nn.Module, table: list[dict], example_input: torch.Tensor, reference,
                                   rounds: int) -> tuple[nn.Module, str | None]:
    """``(network, note)``: of ``network`` and its variants with the WinogradConv2d layers of the largest
    transformed weights run by oneDNN again (DenseConv2d: the largest size class, then the two largest, ...,
    then none by Winograd), the one that runs the example fastest end to end (:func:`_median_times_ms` over
    ``rounds`` rounds, or more where a round is short, up to about 3 s of timing); ``note`` says what was measured
    (None without Winograd layers). Ties keep the layers as they are.

    Why: a layer timed alone finds its weight in cache from the call before, but in the network it comes from
    memory, and Winograd's transformed weight is 4x the weight (36 points for 9 taps). ResNet-50 at 50% kept,
    batch 1, 2 threads (the 2-core AMD EPYC, 2026-12-04, 30 interleaved rounds in one process): with Winograd in
    its 11 eligible layers (each 1.4-2.5x faster than oneDNN alone) the network took 49.6 ms, with none 50.0 ms,
    with Winograd only where the transformed weight is 2.4 MB or less (layer1-2; layer3's are 9.4 MB) 48.5 ms;
    in a quieter moment earlier the same three took 41.0, 44.4 and 41.9 ms. The variants are timed together, not
    one after the other: a first version that dropped one size class at a time while that measured faster, on 7
    rounds each, dropped all 11 layers of that network on one noisy reading (46.2 against 51.5 ms)."""
    sizes = {name: _transformed_weight_bytes(layer) for name, layer in network.named_modules()
             if isinstance(layer, WinogradConv2d)}
    if not sizes:
        return network, None
    candidates = {"as chosen": (network, [])}
    names_by_size: list[str] = []
    refused = []
    for size in sorted(set(sizes.values()), reverse=True):
        names_by_size += [name for name, layer_size in sizes.items() if layer_size == size]
        variant = _variant_with(network, names_by_size, lambda _name, layer: DenseConv2d(
            layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups,
            contiguous_output=layer.contiguous_output, activation=layer.activation))
        label = f"{len(names_by_size)} by oneDNN (transformed weights of {size / 2**20:.2g} MiB and more)"
        problem = _end_to_end_problem(variant, example_input, reference)
        if problem is not None:
            refused.append(f"{label} refused: {problem}")
            break
        candidates[label] = (variant, list(names_by_size))
    scratch = example_input.clone()  # timed calls may write into it; the checks keep the example's values
    runs = {label: functools.partial(candidate, scratch) for label, (candidate, _) in candidates.items()}
    with torch.no_grad():  # seconds a round takes (each variant ran once already, in its check)
        one_round = sum(_times_ms(run, 1)[0] for run in runs.values()) / 1e3
    rounds = max(rounds, min(25, int(3.0 / max(one_round, 1e-9))))
    times = _median_times_ms(runs, rounds)
    best = min(times, key=times.get)  # the first of equal times: "as chosen"
    network, names = candidates[best]
    for row in table:
        if row["name"] in names:
            # the row's dense time becomes oneDNN's; a sparse layer that measured faster than oneDNN but not
            # than Winograd stays dense (the whole network was timed with it dense), and its reason says so
            sparse_ms, onednn_ms = row["sparse_ms"], row["onednn_ms"]
            faster_sparse = sparse_ms is not None and onednn_ms is not None and onednn_ms > sparse_ms
            row.update(dense_algorithm="oneDNN", dense_ms=onednn_ms,
                       speedup=onednn_ms / sparse_ms if sparse_ms and onednn_ms is not None else row["speedup"],
                       reason=f"{row['reason']}; oneDNN: the network ran faster without Winograd there"
                              + (" (sparse measured faster than oneDNN alone)" if faster_sparse else ""))
    kept = len(sizes) - len(names)
    measured = ", ".join(f"{times[label]:.3g} ms {label}" for label in times)
    return network, "; ".join([f"{kept} of {len(sizes)} Winograd layers kept: {measured} "
                               f"({_ROUNDS_NOTE.format(rounds)})"] + refused)


def _prefer_faster_network(converted: nn.Module, table: list[dict], example_input: torch.Tensor, reference,
                           repeats: int, min_speedup: float,
                           layout_note: str | None) -> tuple[nn.Module, str | None, str | None]:
    """``(network, note, layout note)``: of ``converted`` (each layer as its own timing chose), its
    every-conv-dense variant and its every-supported-conv-sparse variant, the one that runs the example fastest
    end to end (the sparse variant only when ``min_speedup`` times faster than the others, as a sparse layer
    must be); then the same with the Linear layers kept dense made sparse (:func:`_prefer_sparse_linears`).
    The layout note is the chosen network's: ``layout_note`` (``converted``'s) for ``converted``; for a variant,
    its own when its dense convolutions had to return NCHW (see :func:`_runnable`), else ``layout_note`` when
    the dense convolutions it kept from ``converted`` still return NCHW, else None.

    Per layer, each choice is measured on the layer's own input, a DenseConv2d on channels_last, the layout
    it keeps between dense layers. But a sparse conv reads and writes NCHW, so a network mixing them converts
    the activation at every switch, which no single layer's timing sees:
    - ResNet-50, 50% kept, batch 1, 2 threads, two conversions on a noisy machine, 2026-12-03: 13 of 53 convs
      measured faster sparse alone, and the network with them took 59.8 and 92.5 ms against 56.2 and 77.9 ms
      with every conv dense;
    - the other way round, 10% kept, batch 1, 2 threads, 2026-12-04 (Intel Xeon, AVX-512): the convs that
      measured faster dense alone (in MobileNetV3-small the stem and 4 depthwise ones) made the networks
      slower than ``policy="sparse"`` (every supported layer sparse): per-round ratios (medians of 40
      interleaved rounds) 1.19x MobileNetV3-small, 1.25x EfficientNet-B0, 1.30x RegNetX-400MF, 1.13x
      MobileNetV2. A depthwise 3x3 conv on 72 channels at 56x56 took 50 us on channels_last input and 121 us
      on the NCHW one its sparse neighbour gives it.
    The variants are timed in interleaved rounds (:func:`_median_times_ms`); the table's rows of the layers a
    variant switched say so."""
    rounds = _network_rounds(repeats)
    sparse_count = sum(isinstance(module, SparseConv2d) for module in converted.modules())
    candidates = {"mixed": (converted, [], layout_note)}  # label -> (network, layers it switched, layout note)
    refused = []
    for label, alternative in (("dense", _all_convs_dense(converted, table)),
                               ("sparse", _measured_dense_convs_sparse(converted, table))):
        if alternative is None:
            continue
        variant, names = alternative
        problem, variant_layout = _runnable(variant, example_input, reference)
        if problem is not None:
            refused.append(f"every-conv-{label} variant refused: {problem}")
        else:
            kept_nchw = any(isinstance(layer, DenseConv2d) and layer.contiguous_output for layer in variant.modules())
            candidates[label] = (variant, names, variant_layout or (layout_note if kept_nchw else None))
    if len(candidates) == 1:
        return *_prefer_sparse_linears(converted, "; ".join(refused) or None, table, example_input, reference,
                                       rounds), layout_note
    scratch = example_input.clone()  # timed calls may write into it; the checks keep the example's values
    times = _median_times_ms({label: functools.partial(network, scratch)
                              for label, (network, _, _) in candidates.items()}, rounds)
    best = min((label for label in times if label != "sparse"), key=times.get)  # ties keep the per-layer choices
    if "sparse" in times and min_speedup * times["sparse"] <= times[best]:
        best = "sparse"
    switched = len(candidates["sparse"][1]) if "sparse" in candidates else 0
    mixed = f"{sparse_count} sparse convs" if sparse_count else "every conv dense"
    headline = {"mixed": f"kept {mixed}", "dense": "every conv dense",
                "sparse": f"every supported conv sparse ({switched} more)"}
    alongside = {"mixed": f"with {mixed}", "dense": "with every conv dense",
                 "sparse": "with every supported conv sparse"}
    note = "; ".join([f"{headline[best]}: the network ran in {times[best]:.3g} ms, "
                      + ", ".join(f"{times[label]:.3g} ms {alongside[label]}" for label in times if label != best)
                      + f" ({_ROUNDS_NOTE.format(rounds)})"] + refused)
    network, names, chosen_layout = candidates[best]
    if best == "dense":
        _record_network_choice(table, names, "dense", "the network ran faster with every conv dense")
    elif best == "sparse":
        _record_network_choice(table, names, "sparse", "the network ran faster with every supported conv sparse")
    return *_prefer_sparse_linears(network, note, table, example_input, reference, rounds), chosen_layout


def _prefer_sparse_linears(network: nn.Module, note: str | None, table: list[dict], example_input: torch.Tensor,
                           reference, rounds: int) -> tuple[nn.Module, str | None]:
    """``(network, note)``: ``network`` with its Linear layers that measured faster dense made sparse, when it
    then runs the example faster end to end (the layers are swapped in place, not copied with the network),
    else as it was; ``note`` with what was measured added. A Linear's output has the same layout either way,
    so the swap cannot change what the dense convolutions must return.

    Why: a Linear layer timed alone reads its weight from cache, but in the network (a classifier head after
    the convolutions) the weight comes from memory, 4 bytes per weight dense against 8 per nonzero sparse.
    Measured 2026-12-03 (ResNet-50, 10% kept, batch 1, 2 threads): its fc timed alone 0.141 ms dense, 0.182
    sparse, so kept dense; in the network the sparse fc made it 1.031x faster (p20-p80 of the per-round ratio
    0.996-1.095x, 30 interleaved rounds; 18.44 against 19.10 ms). That was against torch's linear; against
    DenseLinear, the dense side since, the two run the network equally fast at 5-10% kept (ResNet-18 and ResNet-50,
    batch 1, 2026-12-06: SparseLinear at 1.000-1.014x of DenseLinear's speed, p20-p80 within 0.959-1.057;
    bench/results/cpu-linear-choice-ab-2026-12-06-amd.txt),
    so this check is a tie-break that costs at most the noise."""
    modules = dict(network.named_modules())
    # only where the sparse layer moves at most half the dense layer's bytes (8 per nonzero against 4 per
    # weight: 25% kept or less); at 50% kept the choice would be a coin toss on noise (ResNet-50: 63.4 against
    # 63.5 ms in one conversion)
    names = [row["name"] for row in table
             if row["type"] == "Linear" and row["chosen"] == "dense" and row["sparse_ms"] is not None
             and row["density"] <= SPARSE_LINEAR_MAX_DENSITY
             and type(modules.get(row["name"])) in (nn.Linear, DenseLinear)]
    if not names:
        return network, note
    dense_layers = {name: modules[name] for name in names}
    sparse_layers = {name: SparseLinear(layer.weight, layer.bias) for name, layer in dense_layers.items()}

    def with_layers(layers: dict[str, nn.Module]) -> nn.Module:
        if "" in layers:  # the model is this one Linear
            return layers[""]
        for name, layer in layers.items():
            network.set_submodule(name, layer)
        return network

    joined = f"{note}; " if note else ""
    problem = _end_to_end_problem(with_layers(sparse_layers), example_input, reference)
    if problem is not None:
        return with_layers(dense_layers), f"{joined}sparse-Linear variant refused: {problem}"
    scratch = example_input.clone()
    times = _median_times_ms({"dense": lambda: with_layers(dense_layers)(scratch),
                              "sparse": lambda: with_layers(sparse_layers)(scratch)}, rounds)
    if times["dense"] <= times["sparse"]:
        return with_layers(dense_layers), (f"{joined}kept {len(names)} Linear layers dense: the network ran in "
                                           f"{times['dense']:.3g} ms, {times['sparse']:.3g} ms with them sparse")
    _record_network_choice(table, names, "sparse", "the network ran faster with it sparse")
    note = (f"{joined}{len(names)} Linear layers made sparse: the network ran in {times['sparse']:.3g} ms, "
            f"{times['dense']:.3g} ms with them dense ({_ROUNDS_NOTE.format(rounds)})")
    return with_layers(sparse_layers), note


_PLAIN_VALUES = (bool, int, float, complex, str, bytes, type(None))


def _output_values(value) -> list | None:
    """The tensors and plain values (numbers, strings, None) of a model output, in order, through tuples,
    lists, dicts and dataclasses; None when it holds anything else (which the check cannot compare)."""
    if isinstance(value, (torch.Tensor,) + _PLAIN_VALUES):
        return [value]
    if isinstance(value, dict):
        items = list(value.values())
    elif isinstance(value, (list, tuple)):
        items = list(value)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = [getattr(value, field.name) for field in dataclasses.fields(value)]
    else:
        return None
    values = []
    for item in items:
        found = _output_values(item)
        if found is None:
            return None
        values += found
    return values


def _finite_difference(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float] | None:
    """``(max |a - b|, max |b|)`` of two floating tensors of one shape when neither holds NaN or an infinity, else
    None; taken in slices along the first dimension of about 2^20 elements, each pass over a slice still in cache.

    Why: the whole-tensor way (masks of NaN and infinities, the finite values gathered, then the difference) took
    1.15 s on a 103 MB batch-32 activation and 0.24 s on a 25.7 MB one (2 threads, 2-core AMD EPYC, 2026-12-04);
    convert_for_cpu checks every replacement that way, 108 checks in ResNet-50 at batch 32."""
    rows = a.shape[0] if a.dim() else 1
    step = max(1, rows * (1 << 20) // max(1, a.numel()))
    error = largest = 0.0
    for start in range(0, rows, step):
        x, y = (a[start:start + step], b[start:start + step]) if a.dim() else (a, b)
        if not (bool(torch.isfinite(x).all()) and bool(torch.isfinite(y).all())):
            return None
        error = max(error, float((x - y).abs().max()))
        largest = max(largest, float(y.abs().max()))
    return error, largest


def tensor_difference(a: torch.Tensor, b: torch.Tensor, tolerance: float = END_TO_END_TOLERANCE,
                      reference: str = "the model's output") -> str | None:
    """Why ``a`` is not ``b`` within float32 rounding, or None: NaN and infinities must sit in the same
    places (an infinite logit of a masked class is no error), the finite values within
    ``tolerance`` (1 + max |b|). ``reference`` names ``b`` in the reason."""
    if a.shape != b.shape:
        return f"has shape {tuple(a.shape)}, not {tuple(b.shape)}"
    if not b.numel() or not b.is_floating_point():
        return None if torch.equal(a, b) else "differs"
    finite = _finite_difference(a, b)
    if finite is not None:  # the usual case: no NaN or infinity on either side
        error, largest = finite
        bound = tolerance * (1.0 + largest)
        return None if error <= bound else f"differs by {error:.3g} (bound {bound:.3g})"
    nan, infinite = b.isnan(), b.isinf()
    finite = ~(nan | infinite)
    # the side with the NaN or infinities named: where the model's own layer makes them (an infinite input times a
    # zero weight, which the sparse layer skips) the refusal must not blame the replacement
    a_finite = torch.isfinite(a)
    if not torch.equal(a_finite, finite):
        places = [f"NaN or infinities where {reference} has finite values" if (finite & ~a_finite).any() else "",
                  f"finite values where {reference} has NaN or infinities" if (a_finite & ~finite).any() else ""]
        return "has " + ", and ".join(place for place in places if place)
    if not torch.equal(a.isnan(), nan) or not torch.equal(a[infinite], b[infinite]):
        return f"has other NaN or infinities than {reference} in the same places (NaN for an infinity, or another sign)"
    if not finite.any():
        return None
    a, b = a[finite], b[finite]
    bound, error = tolerance * (1.0 + float(b.abs().max())), float((a - b).abs().max())
    return None if error <= bound else f"differs by {error:.3g} (bound {bound:.3g})"


def _end_to_end_problem(converted: nn.Module, example_input: torch.Tensor, reference) -> str | None:
    """Why the rewritten model's output is not the original's (float rounding aside), or None: it
    raised, returned other tensors or shapes, other values, or a non-contiguous tensor where the model
    returned a contiguous one (a caller's ``.view`` would fail). An output the check cannot read (an
    object other than tensors, numbers and strings in tuples, lists, dicts and dataclasses) is a problem
    too: nothing would be checked."""
    expected = _output_values(reference.output)
    if expected is None:
        return f"the model returns a {type(reference.output).__name__}, whose values the check cannot compare"
    try:
        # torch.fx prints the generated code of a GraphModule that raises: the failure is reported here instead
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            output = converted(example_input.clone())  # a copy: a model may write into its input
    except Exception as exc:  # any failure of the converted model is a reason to refuse it
        return f"it raised {exception_reason(exc, 160)}"
    got = _output_values(output)
    if got is None or len(got) != len(expected):
        return f"{'other' if got is None else len(got)} output values instead of {len(expected)}"
    for index, (a, b) in enumerate(zip(got, expected)):
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            if type(a) is not type(b) or (a != b and not (a != a and b != b)):  # NaN equals NaN here
                return f"output {index} is {a!r} instead of {b!r}"
            continue
        if a.shape != b.shape:
            return f"output {index} has shape {tuple(a.shape)} instead of {tuple(b.shape)}"
        if b.is_contiguous() and not a.is_contiguous():
            return f"output {index} is not contiguous (channels_last)"
        difference = tensor_difference(a, b)
        if difference is not None and not reference.accepts(index, a, b):
            return f"output {index} {difference}"
    return None


def table_flops(table: list[dict]) -> tuple[int, int]:
    """FLOPs of one call over the decision table's Conv2d / Linear rows (2 per multiply-add):
    ``(on the nonzero weights, on the dense weights)``; their ratio is the FLOP-ratio limit of a speedup."""
    return (sum(row.get("flops") or 0 for row in table), sum(row.get("dense_flops") or 0 for row in table))


def chosen_layers_ms(table: list[dict]) -> tuple[float, int]:
    """``(sum of the chosen implementation's time over the rows timed, rows not timed)``: each layer as it runs
    in the converted network (sparse or dense), timed alone on its real input during the conversion."""
    total, untimed = 0.0, 0
    for row in table:
        ms = row.get("sparse_ms") if row.get("chosen") == "sparse" else row.get("dense_ms")
        if ms is None:
            untimed += 1
        else:
            total += ms
    return total, untimed


def format_decisions(table: list[dict], peak_gflops: float | None = None,
                     in_call_ms: dict[str, float] | None = None) -> str:
    """The decision table as aligned text, one layer a line: times, speedup, the achieved GFLOP/s of
    the dense layer and of the sparse one (counting only the nonzeros' multiply-adds), what the layer
    absorbed, the choice and why. With ``peak_gflops`` (the machine's dense peak measured in the same
    run) the sparse rate is also shown as a percentage of it; with ``in_call_ms`` ({layer: ms}, the layer's
    steps timed inside whole calls of the deployed module), a column of those times."""
    def ms(value):
        return f"{value:9.3f}" if value is not None else f"{'-':>9}"

    def rate(flops, milliseconds):
        return f"{flops / milliseconds / 1e6:7.1f}" if flops and milliseconds else f"{'-':>7}"

    lines = [f"{'layer':<24} {'weight shape':<20} {'input':<18} {'density':>7} {'dense ms':>9} {'dense by':<9} "
             f"{'sparse ms':>9} {'speedup':>7} {'dGF/s':>7} {'nzGF/s':>7}{' %peak' if peak_gflops else ''}"
             f"{' in call' if in_call_ms is not None else ''}  {'fused':<18} chosen  why"]
    for row in table:
        speedup = f"{row['speedup']:7.2f}" if row["speedup"] is not None else f"{'-':>7}"
        sparse_rate = rate(row.get("flops"), row["sparse_ms"])
        share = ""
        if peak_gflops:
            share = (f" {100 * row['flops'] / row['sparse_ms'] / 1e6 / peak_gflops:5.0f}"
                     if row.get("flops") and row["sparse_ms"] else f" {'-':>5}")
        if in_call_ms is not None:
            share += f" {in_call_ms[row['name']]:7.3f}" if row["name"] in in_call_ms else f" {'-':>7}"
        lines.append(f"{row['name'] or '(model)':<24} {str(tuple(row['weight_shape'])):<20} "
                     f"{str(tuple(row['input_shape'] or ())):<18} {row['density']:7.3f} {ms(row['dense_ms'])} "
                     f"{row.get('dense_algorithm') or '-':<9} "
                     f"{ms(row['sparse_ms'])} {speedup} {rate(row.get('dense_flops'), row['dense_ms'])} "
                     f"{sparse_rate}{share}  {'+'.join(row.get('fused', [])) or '-':<18} {row['chosen']:<6}  "
                     f"{row['reason']}")
    if any(row.get("dense_algorithm") == "Winograd" for row in table):
        lines.append("dGF/s counts a direct convolution's multiply-adds; Winograd does 36 where it does 144, so a "
                     "Winograd layer's rate may exceed the peak")
    return "\n".join(lines)


def measure_peak_gflops(size: int = 1024, repeats: int = 5) -> float:
    """The machine's dense float32 rate with the current torch thread count, in GFLOP/s: the best of a
    ``size``-cubed matrix product (torch's BLAS) and a 3x3 convolution of 256 channels at 28x28, batch 4,
    through oneDNN (as ``F.conv2d`` and, where available, as :class:`DenseConv2d`), each the best of
    ``repeats`` calls: what the GFLOP/s of the layers compare to. All of them, since on the AMD EPYC
    measured the convolution ran faster than the sgemm (102-110 against 93-94 GFLOP/s, 2 threads, two
    runs on a busy machine), so the sgemm alone understated the peak."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)  # warm-up
    best_mm = min(_times_ms(lambda: torch.mm(a, b), repeats))
    x, weight = torch.randn(4, 256, 28, 28), torch.randn(256, 256, 3, 3)
    convolutions = [functools.partial(F.conv2d, x, weight, padding=1)]
    if dense_conv_available()[0]:
        packed = DenseConv2d(weight, padding=1)
        convolutions.append(functools.partial(packed, x.contiguous(memory_format=torch.channels_last)))
    best_conv = math.inf
    with torch.no_grad():
        for convolution in convolutions:
            convolution()  # warm-up
            best_conv = min(best_conv, min(_times_ms(convolution, repeats)))
    conv_flops = 2 * 4 * 256 * 28 * 28 * 256 * 9
    return max(2 * size**3 / best_mm, conv_flops / best_conv) / 1e6

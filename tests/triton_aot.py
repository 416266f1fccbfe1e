"""Compile every Triton kernel of ``kernels/`` for a real NVIDIA target, on a machine without a GPU.

CI has no GPU, and the interpreter (TRITON_INTERPRET=1) checks a kernel's arithmetic but not that
it lowers: a construct the interpreter accepts can still fail in the compiler, or compile to
something slow. This script runs the real launchers on CPU tensors with triton's driver replaced
by one that names a CUDA target (sm_90 by default) and with ``kernel[grid](...)`` turned into a
compile-only warmup, so each launch goes through the whole pipeline (TTIR, TTGIR, LLVM, PTX and
ptxas to a cubin) and nothing runs. Output values are garbage and never read.

Run: ``python tests/triton_aot.py [--arch 90 80] [--ptx-dir DIR]``; it prints one JSON object:
``{"triton": version, "targets": {"90": {name: {"variants": n, "shared_bytes_max": b,
"unexpected_fp64": [...], "ptx_counts": {...}}}}}``. ``tests/test_triton_compile.py`` runs it in a
subprocess (the interpreter switch is read when triton is imported, so it cannot run in-process
under the test suite's interpreter).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import sys

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import triton
import triton.runtime.jit as triton_jit
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

# PTX instructions counted per kernel (summed over its variants): global loads, shared and
# global atomics by ordering, warp votes (an old tl.histogram lowering) and fp64 arithmetic.
PTX_PATTERNS = {
    "ld_global_vector": r"\bld\.global(?:\.\w+)*\.v[248]\.",
    "ld_global": r"\bld\.global\.",
    "atom_shared": r"\batom(?:\.\w+)*\.shared(?:::cta)?\.",
    "atom_global_relaxed": r"\batom\.global(?:\.\w+)*\.relaxed\.",
    "atom_global_acq_rel": r"\batom\.global(?:\.\w+)*\.acq_rel\.",
    "vote": r"\bvote\.",
    "fp64_ops": r"\b(?:add|sub|mul|fma|div|min|max)(?:\.\w+)*\.f64\b",
}


class _CompileOnlyDriver:
    """The few driver calls ``JITFunction.run`` makes before compiling, answered for ``target``."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_device(self):
        # JITFunction caches compiled kernels per device: one "device" per target, or a second
        # arch in the same process would silently reuse the first arch's kernels.
        return self.target.arch

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


@contextlib.contextmanager
def compile_only(arch: int):
    """Within: every ``kernel[grid](...)`` compiles for ``sm_<arch>`` and launches nothing.
    Yields the list of (kernel name, CompiledKernel) compiled so far."""
    compiled: list = []
    original = triton_jit.JITFunction.__getitem__

    def getitem(self, grid):
        def launch(*args, **kwargs):
            kernel = self.run(*args, grid=grid, warmup=True, **kwargs)
            compiled.append((self.fn.__name__, kernel))
            return kernel
        return launch

    previous = getattr(driver, "_active", None)  # None until a driver was created (none without a GPU)
    driver.set_active(_CompileOnlyDriver(GPUTarget("cuda", arch, 32)))
    triton_jit.JITFunction.__getitem__ = getitem
    try:
        yield compiled
    finally:
        triton_jit.JITFunction.__getitem__ = original
        if previous is not None:
            driver.set_active(previous)


# --------------------------------------------------------------------------- what is compiled

def exercise_threshold():
    from vpns_fast.kernels.threshold import topk_threshold_fwd, topk_thresholds_per_tensor

    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        scores = [torch.randn(1000, dtype=dtype), torch.randn(37, dtype=dtype)]
        topk_threshold_fwd(scores, 10)
        topk_threshold_fwd(scores, 10, hint=0.5)  # warm start: band pass, skippable passes
        topk_thresholds_per_tensor(scores, [10, 3])  # layer scope: segmented passes


def exercise_masked():
    from vpns_fast.kernels.masked import masked_weight_bwd, masked_weight_fwd, masked_weights_bwd, masked_weights_fwd

    t = torch.tensor(0.5)
    for w_dtype, s_dtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                             (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                             (torch.float64, torch.float64)):
        # unstructured (element-wise), kernel (small groups), channel (one large group per program)
        for w_shape, s_shape in (((16, 3, 3, 3), (16, 3, 3, 3)), ((16, 3, 3, 3), (16, 3, 1, 1)),
                                 ((16, 300, 3, 3), (16, 1, 1, 1))):
            w, s = torch.randn(w_shape, dtype=w_dtype), torch.randn(s_shape, dtype=s_dtype)
            masked_weight_fwd(w, s, t)
            masked_weight_bwd(torch.randn_like(w), w, s, t, True, True)
            masked_weight_bwd(torch.randn_like(w), w, s, t, False, True)
        weights = [torch.randn(8, 3, 3, 3, dtype=w_dtype), torch.randn(16, 8, 3, 3, dtype=w_dtype)]
        scores = [torch.randn(8, 3, 3, 3, dtype=s_dtype), torch.randn(16, 8, 1, 1, dtype=s_dtype)]
        masked_weights_fwd(weights, scores, t)
        masked_weights_bwd([torch.randn_like(w) for w in weights], weights, scores, t)


def exercise_prompt():
    from vpns_fast.kernels.prompt import prompt_normalize_fwd, prompt_program_grad

    geometry = {"pad": dict(pad=2), "fix": dict(mask_size=4), "random": dict(mask_size=4, row=8, col=4),
                "expansive": {}}
    for kind, kwargs in geometry.items():
        for image_dtype in (torch.float32, torch.uint8, torch.float64):
            for channels_last in (False, True):
                images = torch.randint(0, 255, (2, 3, 20, 20), dtype=torch.uint8) \
                    if image_dtype == torch.uint8 else torch.rand(2, 3, 20, 20, dtype=image_dtype)
                if channels_last:
                    images = images.to(memory_format=torch.channels_last)
                program = torch.zeros(3, 24, 24, dtype=torch.float64 if image_dtype == torch.float64 else
                                      torch.float32)
                for out_dtype in (None, torch.bfloat16, torch.float16):
                    out = prompt_normalize_fwd(images, program, kind, out_dtype=out_dtype, **kwargs)
                prompt_program_grad(torch.randn(out.shape), images, program, kind, **kwargs)


def exercise_masked_conv():
    """Every autotune config of each implicit-GEMM kernel once (bf16, channels_last, channel
    counts that make K tiles channel runs), then one config across dtypes (fp32 as TF32 and
    IEEE, bf16, fp16, fp64), layouts with and without channel-run tiles, score granularities,
    both weight-gradient epilogues, the split reduction and the tile-skipping forward."""
    from vpns_fast.kernels import masked_conv as C

    t = torch.tensor(0.5)

    def run(dtype, granularity="unstructured", channels_last=False, fwd=None, bwd_input=None, bwd_weight=None,
            split=1, sparse=None, scores_dtype=None, need=(True, True)):
        c_in, c_out = (64, 64) if channels_last else (24, 40)  # multiples of every BLOCK_K, or not
        x = torch.randn(2, c_in, 9, 11, dtype=dtype)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        w = torch.randn(c_out, c_in, 3, 3, dtype=dtype)
        s = torch.randn({"unstructured": w.shape, "kernel": (c_out, c_in, 1, 1),
                         "channel": (c_out, 1, 1, 1)}[granularity], dtype=scores_dtype or dtype)
        if channels_last:  # as model.to(memory_format=torch.channels_last) leaves conv weights
            w, s = w.to(memory_format=torch.channels_last), s.to(memory_format=torch.channels_last)
        if fwd is not None:
            C.masked_conv2d_fwd(x, w, s, t, torch.randn(c_out, dtype=dtype), 2, 1, config=fwd)
        if bwd_input is not None or bwd_weight is not None:
            grad = torch.randn(2, c_out, 5, 6, dtype=dtype)
            C.masked_conv2d_bwd(grad, x, w, s, t, 2, 1, 1, bwd_input is not None,
                                bwd_weight is not None and need[0], bwd_weight is not None and need[1],
                                weight_split=split, input_config=bwd_input, weight_config=bwd_weight)
        if sparse is not None:
            C.masked_conv2d_sparse(x, C.prepare_sparse_tiles(w, s, t), padding=1, config=sparse)

    for config in C.FWD_CONFIGS:
        run(torch.bfloat16, channels_last=True, fwd=config)
    for config in C.BWD_INPUT_CONFIGS:
        run(torch.bfloat16, channels_last=True, bwd_input=config)
    for config in C.BWD_WEIGHT_CONFIGS:
        run(torch.bfloat16, channels_last=True, bwd_weight=config)
    for config in C.SPARSE_FWD_CONFIGS:
        run(torch.bfloat16, "channel", channels_last=True, sparse=config)
    one = dict(fwd=C.FWD_CONFIGS[3], bwd_input=C.BWD_INPUT_CONFIGS[3], bwd_weight=C.BWD_WEIGHT_CONFIGS[3])
    precision = torch.backends.cudnn.conv.fp32_precision
    try:
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        run(torch.float32, **one)
        torch.backends.cudnn.conv.fp32_precision = "tf32"
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            for channels_last in (False, True):
                run(dtype, channels_last=channels_last, **one)
            if dtype in (torch.float32, torch.bfloat16):
                for granularity in ("kernel", "channel"):  # fwd: gathered / hoisted scores; dL/dw_eff out
                    run(dtype, granularity, fwd=one["fwd"], bwd_weight=one["bwd_weight"])
                run(dtype, bwd_weight=one["bwd_weight"], split=3)  # float32 partial sums
                for need in ((True, False), (False, True)):  # stage 2 (weights) / stage 1 (scores)
                    run(dtype, bwd_weight=one["bwd_weight"], need=need)
            if dtype != torch.bfloat16:
                run(dtype, "channel", sparse=C.SPARSE_FWD_CONFIGS[0])
        run(torch.bfloat16, fwd=one["fwd"], bwd_input=one["bwd_input"], bwd_weight=one["bwd_weight"],
            scores_dtype=torch.float32)
        run(torch.float32, fwd=one["fwd"], bwd_input=one["bwd_input"], bwd_weight=one["bwd_weight"],
            scores_dtype=torch.float64)
    finally:
        torch.backends.cudnn.conv.fp32_precision = precision


EXERCISES = (exercise_threshold, exercise_masked, exercise_prompt, exercise_masked_conv)


def _expects_fp64(kernel) -> bool:
    """Whether a variant legitimately computes in float64 (fp64 data or an FP64 / COMPUTE flag)."""
    src = kernel.src
    constants = {src.fn.arg_names[key[0]]: value for key, value in src.constants.items()}
    return (any("fp64" in str(kind) for kind in src.signature.values())
            or constants.get("FP64") is True or "float64" in str(constants.get("COMPUTE")))


def report(arch: int, ptx_dir: str | None = None) -> dict:
    """Per kernel name: variants compiled for ``sm_<arch>``, shared memory, PTX instruction counts."""
    with compile_only(arch) as compiled:
        for exercise in EXERCISES:
            exercise()
    kernels: dict = {}
    for name, kernel in compiled:
        entry = kernels.setdefault(name, {"variants": 0, "shared_bytes_max": 0, "unexpected_fp64": [],
                                          "ptx_counts": collections.Counter(), "ptx_targets": set()})
        ptx = kernel.asm["ptx"]
        entry["ptx_targets"].update(re.findall(r"^\.target\s+(\w+)", ptx, re.M))
        counts = {key: len(re.findall(pattern, ptx)) for key, pattern in PTX_PATTERNS.items()}
        entry["variants"] += 1
        entry["shared_bytes_max"] = max(entry["shared_bytes_max"], kernel.metadata.shared)
        entry["ptx_counts"].update(counts)
        if counts["fp64_ops"] and not _expects_fp64(kernel):
            entry["unexpected_fp64"].append(str(kernel.src.signature))
        if ptx_dir:
            os.makedirs(ptx_dir, exist_ok=True)
            with open(os.path.join(ptx_dir, f"{name}.{entry['variants']}.ptx"), "w") as f:
                f.write(ptx)
    for entry in kernels.values():
        entry["ptx_counts"] = dict(entry["ptx_counts"])
        entry["ptx_targets"] = sorted(entry["ptx_targets"])
    return kernels


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90], help="CUDA compute capabilities, e.g. 90 80")
    parser.add_argument("--ptx-dir", help="also write each variant's PTX here (one folder per arch)")
    args = parser.parse_args(argv)
    targets = {str(arch): report(arch, args.ptx_dir and os.path.join(args.ptx_dir, f"sm_{arch}"))
               for arch in args.arch}
    print(json.dumps({"triton": triton.__version__, "targets": targets}, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()

"""Radix schedules of the Triton top-k threshold, timed on a GPU: which digit widths, histogram
kind (``tl.histogram``'s mask or bin 0 taken out again) and warm-start band to ship.

    PYTHONPATH=. python -m bench.threshold_radix --out rows.jsonl

Each schedule is checked bit for bit against ``torch.kthvalue`` before it is timed, on the score
sets of the ``threshold`` case (HYDRA-scaled scores of ResNet-18 / ResNet-50, density 0.1):
global scope cold, global scope warm (the hint is the threshold moved by 0.1%, as one training
step moves it; 4 ulps in bfloat16), and ResNet-18 per layer: a cold select per layer, and the
segmented select of all layers at once. Times are CUDA-event medians of 5 rounds of 20
calls; schedules take turns within each round. Rows are appended per measurement.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import statistics
import time

import torch
import triton

import vpns_fast.kernels.threshold as radix
from bench.cases.threshold import DENSITY, hydra_scaled_scores
from bench.environment import git_state
from bench.registry import score_shapes
from vpns_fast import ops

# name -> {dtype: (passes, band shift, band width)}; a band must end on a pass boundary.
SCHEDULES = {
    "wide": {torch.float32: (((20, 11), (10, 10), (0, 10)), 10, 11),
                torch.bfloat16: (((8, 7), (0, 8)), 0, 11)},
    "8-bit": {torch.float32: (((23, 8), (15, 8), (7, 8), (0, 7)), 7, 8),
              torch.bfloat16: (((8, 7), (0, 8)), 0, 8)},
    "5-bit": {torch.float32: (((25, 6), (20, 5), (15, 5), (10, 5), (5, 5), (0, 5)), 10, 8),
              torch.bfloat16: (((10, 5), (5, 5), (0, 5)), 0, 8)},
}


@contextlib.contextmanager
def schedules_restored():
    """The kernel's own schedules and histogram kind again on leaving, whatever :func:`_install` set."""
    saved = ({**radix._RADIX_PASSES}, {**radix._BAND_SHIFT}, {**radix._BAND_WIDTH}, radix._MASKED_HISTOGRAM)
    try:
        yield
    finally:
        radix._RADIX_PASSES.update(saved[0])
        radix._BAND_SHIFT.update(saved[1])
        radix._BAND_WIDTH.update(saved[2])
        radix._MASKED_HISTOGRAM = saved[3]


def _install(schedule: str, dtype: torch.dtype, masked: bool) -> None:
    passes, band_shift, band_width = SCHEDULES[schedule][dtype]
    radix._RADIX_PASSES[dtype] = passes
    radix._BAND_SHIFT[dtype] = band_shift
    radix._BAND_WIDTH[dtype] = band_width
    radix._MASKED_HISTOGRAM = masked
    radix._check_schedule(dtype)


def _repeat(call, times: int) -> None:
    for _ in range(times):
        call()


def _per_layer(scores, layer_ks):
    return [radix.topk_threshold_fwd([s], lk) for s, lk in zip(scores, layer_ks)]


def _topk(scores, from_top: int):
    return torch.topk(torch.cat([s.abs().flatten() for s in scores]), from_top, sorted=False).values.min()


def _elapsed_ms(run, device: str) -> float:
    if device != "cuda":  # a dry run under TRITON_INTERPRET=1
        start = time.perf_counter()
        run()
        return (time.perf_counter() - start) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def _time_rounds(calls: dict, device: str, rounds: int = 5, per_round: int = 20) -> dict:
    """Median ms per call of each named (setup, call), contenders taking turns each round."""
    times = {name: [] for name in calls}
    names = list(calls)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            install, call = calls[name]
            install()
            call()
            times[name].append(_elapsed_ms(functools.partial(_repeat, call, per_round), device) / per_round)
    return {name: (statistics.median(t), min(t), max(t)) for name, t in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", default="resnet18,resnet50")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", default="full", help="small: the first 4 score tensors (a CPU dry run)")
    args = parser.parse_args()
    device = args.device
    kinds = [False, True] if radix._MASKED_HISTOGRAM else [False]
    commit, dirty = git_state()
    fields = {"torch": torch.__version__, "triton": triton.__version__, "git_commit": commit, "git_dirty": dirty,
              "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    generator = torch.Generator(device=device).manual_seed(0)
    with open(args.out, "a") as out, schedules_restored():
        for dtype in (torch.float32, torch.bfloat16):
            for model in args.models.split(","):
                scores = [hydra_scaled_scores(s, dtype, device, generator) for s in score_shapes(model, args.sizes)]
                n = sum(s.numel() for s in scores)
                k = ops.kth_index(DENSITY, n)
                expected = torch.kthvalue(torch.cat([s.abs().flatten() for s in scores]), k).values
                # a hint a training step's move away (0.1%; 4 ulps in bf16, where 0.1% rounds to the answer)
                hint = (expected.double() * (1.001 if dtype == torch.float32 else 1 + 2**-5)).to(dtype)
                layer_ks = [ops.kth_index(DENSITY, s.numel()) for s in scores]
                layer_expected = [torch.kthvalue(s.abs().flatten(), lk).values for s, lk in zip(scores, layer_ks)]
                calls = {}
                for schedule in SCHEDULES:
                    for masked in kinds:
                        install = functools.partial(_install, schedule, dtype, masked)
                        install()
                        label = f"{schedule} {'masked' if masked else 'bin0'}"
                        cold = functools.partial(radix.topk_threshold_fwd, scores, k)
                        warm = functools.partial(radix.topk_threshold_fwd, scores, k, hint)
                        layers = functools.partial(_per_layer, scores, layer_ks)
                        segmented = radix.topk_thresholds_per_tensor(scores, layer_ks)
                        if not (torch.equal(cold(), expected) and torch.equal(warm(), expected)
                                and all(torch.equal(a, b) for a, b in zip(layers(), layer_expected))
                                and torch.equal(segmented, torch.stack(layer_expected))):
                            print(f"{model} {dtype} {label}: NOT EXACT", flush=True)
                            out.write(json.dumps({"case": "threshold_radix", "model": model, "dtype": str(dtype),
                                                  "schedule": label, "status": "error"}) + "\n")
                            continue
                        calls[f"{label} | global cold"] = (install, cold)
                        calls[f"{label} | global warm"] = (install, warm)
                        if model == "resnet18":
                            calls[f"{label} | layer cold"] = (install, layers)
                            calls[f"{label} | layer segmented"] = (install, functools.partial(
                                radix.topk_thresholds_per_tensor, scores, layer_ks))
                calls["torch.topk | global"] = (lambda: None, functools.partial(_topk, scores, n - k + 1))
                rounds = (5, 20) if device == "cuda" else (2, 1)
                for name, (median, low, high) in _time_rounds(calls, device, *rounds).items():
                    row = {"case": "threshold_radix", "model": model, "dtype": str(dtype), "score_count": n,
                           "impl": name, "median_ms": median, "min_ms": low, "max_ms": high,
                           "gb_per_s_one_read": n * scores[0].element_size() / median / 1e6,
                           "device": torch.cuda.get_device_name() if device == "cuda" else device,
                           **fields}
                    print(f"{model:9} {str(dtype):15} {name:34} {median:8.3f} ms ({low:.3f}-{high:.3f})",
                          flush=True)
                    out.write(json.dumps(row) + "\n")
                    out.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

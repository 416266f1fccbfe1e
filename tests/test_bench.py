"""Smoke test of the benchmark harness (bench/): a tiny CPU run of every case, the row schema,
and the `python -m bench list` entry point. Numbers are not checked, only their shape."""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import runpy
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # `bench` is a top-level folder of the checkout, not installed
    sys.path.insert(0, REPO_ROOT)

from bench.runner import run_cases  # noqa: E402

ROW_FIELDS = {
    "schema", "device_type", "device_name", "threads", "torch_version", "triton_version", "python_version",
    "date_utc", "git_commit", "git_dirty", "load_average_1m", "core_round_trip_ns", "case", "impl", "impl_kind",
    "status",
    "skip_reason", "error", "dtype", "shape", "mode", "params", "median_ms", "p20_ms", "p80_ms", "repeats",
    "input_copies", "bytes_moved", "gb_per_s", "ceiling_gb_per_s", "fraction_of_ceiling", "images_per_s",
    "speedup", "speedup_rounds", "speedup_p20", "speedup_p80", "speedup_round_median",
    "setup_seconds", "flops", "tflop_per_s", "peak_tflop_per_s", "fraction_of_peak", "timing_env",
}
CASE_NAMES = ["threshold", "prompt", "masked", "conv", "train_step", "slim"]


@pytest.fixture(scope="module")
def smoke_rows(tmp_path_factory):
    import torch

    out_path = tmp_path_factory.mktemp("bench") / "rows.jsonl"
    threads = torch.get_num_threads()
    returned = run_cases(CASE_NAMES, device="cpu", sizes="small", repeats=2, out_path=str(out_path),
                         compile_baselines=False, cpu_warmup_seconds=0.0, stream=None, threads=1)
    assert torch.get_num_threads() == threads  # the run's thread count is not left behind
    with open(out_path) as rows_file:
        written = [json.loads(line) for line in rows_file]
    assert written == json.loads(json.dumps(returned))
    return written


def test_rows_follow_the_schema(smoke_rows):
    assert {row["case"] for row in smoke_rows} == set(CASE_NAMES)
    for row in smoke_rows:
        assert set(row) == ROW_FIELDS, set(row) ^ ROW_FIELDS
        assert row["schema"] == "vpns_fast.bench/1" and row["device_type"] == "cpu"
        assert row["threads"] >= 1 and row["device_name"] and row["date_utc"].endswith("+00:00")
        assert row["mode"] in ("fwd", "bwd", "full")
        assert row["status"] != "error", f"{row['case']} {row['impl']} raised: {row['error']}"
        assert row["status"] in ("ok", "skipped")
        if row["status"] == "skipped":
            assert row["skip_reason"], row


def test_measured_rows_have_positive_times_and_speedups(smoke_rows):
    measured = [row for row in smoke_rows if row["status"] == "ok"]
    # The torch backend (the library path for a training step) and the reference baselines are
    # always there to be timed.
    for case, expected in (("threshold", {"torch", "release"}), ("prompt", {"torch", "eager"}),
                           ("masked", {"torch", "eager"}), ("conv", {"torch", "eager"}),
                           ("train_step", {"vpns_fast", "release", "dense"})):
        impls = {row["impl"] for row in measured if row["case"] == case}
        assert expected <= impls, (case, impls)
    for row in measured:
        assert row["repeats"] == 2
        assert 0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
        assert row["speedup"], row
        for baseline, speedup in row["speedup"].items():
            assert isinstance(speedup, float) and speedup > 0 and math.isfinite(speedup), (baseline, speedup)
        if row["impl_kind"] == "baseline" and row["impl"] in row["speedup"]:
            assert row["speedup"][row["impl"]] == pytest.approx(1.0)
        assert set(row["speedup_rounds"]) == set(row["speedup"])  # the spread comes from per-round ratios
        for baseline, ratios in row["speedup_rounds"].items():
            assert len(ratios) == 2 and row["speedup_p20"][baseline] <= row["speedup_p80"][baseline]
            assert min(ratios) <= row["speedup_p20"][baseline] and row["speedup_p80"][baseline] <= max(ratios)
            # the per-round median lies inside its own range, which the ratio of the two medians need not
            assert row["speedup_p20"][baseline] <= row["speedup_round_median"][baseline] <= row["speedup_p80"][baseline]


def test_masked_rows(smoke_rows):
    rows = [row for row in smoke_rows if row["case"] == "masked"]
    assert {row["mode"] for row in rows} == {"fwd", "full"}
    assert {row["params"]["granularity"] for row in rows} == {"unstructured", "kernel", "channel"}
    assert {row["params"]["model"] for row in rows} == {"resnet18", "resnet50"}
    assert {row["impl"] for row in rows} == {"eager", "compiled", "torch", "triton", "cpp", "triton_multi"}
    for row in rows:
        p = row["params"]
        per_weight = 2 if row["mode"] == "fwd" else 5
        per_score = 1 if row["mode"] == "fwd" else 3
        assert row["bytes_moved"] == (per_weight * p["weight_count"] + per_score * p["score_count"]) * 4
        assert row["images_per_s"] is None
        if row["status"] == "ok":
            assert row["gb_per_s"] > 0 and row["fraction_of_ceiling"] > 0


def test_conv_rows(smoke_rows):
    rows = [row for row in smoke_rows if row["case"] == "conv"]
    assert {row["mode"] for row in rows} == {"fwd", "bwd", "full"}
    assert {row["impl"] for row in rows} == {"eager", "compiled", "torch", "triton", "cpp", "cudnn", "igemm",
                                             "igemm_tiles"}
    assert {(row["params"]["granularity"], row["mode"]) for row in rows} == {
        ("unstructured", "fwd"), ("unstructured", "bwd"), ("unstructured", "full"), ("kernel", "fwd"),
        ("channel", "fwd")}
    for row in rows:
        p = row["params"]
        n, _, h, w = p["input_shape"]
        c_out, c_in, k, _ = p["weight_shape"]
        side = (h + 2 * p["padding"] - k) // p["stride"] + 1
        assert row["flops"] == {"fwd": 1, "bwd": 2, "full": 3}[row["mode"]] * 2 * n * c_out * side * side * c_in * k * k
        if row["status"] == "ok":
            assert row["tflop_per_s"] > 0 and row["peak_tflop_per_s"] > 0
            assert row["fraction_of_peak"] == pytest.approx(row["tflop_per_s"] / row["peak_tflop_per_s"])


def test_train_step_rows(smoke_rows):
    rows = [row for row in smoke_rows if row["case"] == "train_step"]
    assert rows and {row["mode"] for row in rows} == {"full"}
    for row in rows:
        assert row["bytes_moved"] is None and row["gb_per_s"] is None
        assert row["status"] == "ok", row
        expected = row["params"]["batch"] / (row["median_ms"] / 1e3)
        assert row["images_per_s"] == pytest.approx(expected)
        assert set(row["speedup"]) == {"release", "dense"}


def test_slim_rows(smoke_rows):
    rows = [row for row in smoke_rows if row["case"] == "slim"]
    assert {row["impl"] for row in rows if row["status"] == "ok"} == {"dense", "slim"}
    for row in rows:
        p = row["params"]
        assert p["channel_density"] >= p["target_channel_density"] == 0.5
        assert 0 < p["slim_parameters"] < p["dense_parameters"] and p["channels_dropped"] > 0
        assert all(slim <= dense for dense, slim in p["widths"].values())
        assert sum(slim < dense for dense, slim in p["widths"].values()) > len(p["widths"]) // 2
        if row["status"] == "ok":
            assert row["images_per_s"] == pytest.approx(p["batch"] / (row["median_ms"] / 1e3))


def test_compile_baseline_is_skipped_with_its_reason(smoke_rows):
    compiled = [row for row in smoke_rows if row["impl"] == "compiled"]
    assert compiled and all(row["status"] == "skipped" and "--no-compile" in row["skip_reason"] for row in compiled)


def test_list_entry_point(monkeypatch, capsys):
    # `python -m bench list` run in-process (runpy is what `-m` uses): a second interpreter would
    # spend seconds importing torch again.
    monkeypatch.setattr(sys, "argv", ["bench", "list", "--device", "cpu", "--sizes", "small"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("bench", run_name="__main__", alter_sys=True)
    assert exit_info.value.code == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in CASE_NAMES + ["infer", "sparse_isa"]) and "backends:" in listing


@pytest.fixture(scope="module")
def infer_rows(tmp_path_factory):
    from vpns_fast.deploy import sparse_cpu

    available, reason = sparse_cpu.available()
    if not available:
        pytest.skip(f"sparse CPU kernels unavailable: {reason}")
    out_path = tmp_path_factory.mktemp("bench_infer") / "rows.jsonl"
    returned = run_cases(["infer"], device="cpu", sizes="small", repeats=2, out_path=str(out_path),
                         cpu_warmup_seconds=0.0, stream=None, compile_baselines=False)
    with open(out_path) as rows_file:
        written = [json.loads(line) for line in rows_file]
    assert written == json.loads(json.dumps(returned))
    return written


def test_infer_rows(infer_rows):
    """Per layer and end to end, both masks, verified against dense before timing (a mismatch
    would have raised); the CSR baseline is per layer only, with its reason end to end."""
    assert {row["case"] for row in infer_rows} == {"infer"}
    assert {row["params"]["scope"] for row in infer_rows} == {"layer", "model"}
    assert {row["params"]["mask"] for row in infer_rows} == {"uniform", "global"}
    for row in infer_rows:
        assert set(row) == ROW_FIELDS, set(row) ^ ROW_FIELDS
        assert row["schema"] == "vpns_fast.bench/1" and row["device_type"] == "cpu" and row["mode"] == "fwd"
        assert f"mask={row['params']['mask']}" in row["shape"] and row["dtype"] == "float32"
        assert row["status"] != "error", f"{row['shape']} {row['impl']} raised: {row['error']}"
        p = row["params"]
        if row["impl"] == "torch_sparse_csr" and p["scope"] == "model":
            assert row["status"] == "skipped" and "per layer only" in row["skip_reason"]
            continue
        if row["impl"] == "compiled":
            assert row["status"] == "skipped" and "--no-compile" in row["skip_reason"]
            continue
        if row["impl"] == "deepsparse" and not os.environ.get("VPNS_DEEPSPARSE_PYTHON"):
            assert row["status"] == "skipped" and "VPNS_DEEPSPARSE_PYTHON" in row["skip_reason"]
            continue
        if row["impl"] == "onnxruntime" and p["onnxruntime_version"] is None:
            assert row["status"] == "skipped" and "not installed" in row["skip_reason"]
            continue
        assert row["status"] == "ok", row
        assert row["repeats"] == 2 and 0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
        assert row["images_per_s"] == pytest.approx(p["batch"] / (row["median_ms"] / 1e3))
        assert "dense" in row["speedup"]
        if p["scope"] == "layer":
            assert row["impl"] in {"dense", "torch_sparse_csr", "sparse_cpu", "deployed"}
            assert p["deployed"] in ("sparse", "dense") and p["decision_speedup"] > 0
            assert 0 < p["layer_density"] <= 1
            if p["mask"] == "uniform":
                assert p["layer_density"] == pytest.approx(p["density"], rel=0.05)
        else:
            assert row["impl"] in {"dense", "dense_separable_pool", "sparse_cpu", "onnxruntime", "deepsparse"}
            assert "onnxruntime" in row["speedup"] or p["onnxruntime_version"] is None
            assert 0 <= p["sparse_layers"] <= p["layers"] == 21
            assert p["model_density"] == pytest.approx(p["density"], rel=0.05)
            assert 0 <= p["end_to_end_error"] < float("inf")
            # timed as deploy()'s module runs it: through its compiled call plan
            assert p["call_plan"].endswith(" steps") and int(p["call_plan"].split()[0]) > 10
            # the whole-network stage always runs under policy="measure" (every-conv-dense variant at least)
            assert "the network ran in" in p["network_choice"] and "winograd_choice" in p
            assert 0 < p["nonzero_flops"] < p["dense_flops"] and row["flops"] == p["nonzero_flops"]
            assert row["tflop_per_s"] > 0 and row["fraction_of_peak"] > 0
            if row["impl"] in ("sparse_cpu", "onnxruntime"):  # the conversion's measuring, the export and session
                assert row["setup_seconds"] > 0
    impls = {(row["params"]["scope"], row["impl"]) for row in infer_rows if row["status"] == "ok"}
    assert impls - {("model", "onnxruntime"), ("model", "deepsparse")} == {
        ("layer", "dense"), ("layer", "torch_sparse_csr"), ("layer", "sparse_cpu"), ("layer", "deployed"),
        ("model", "dense"), ("model", "dense_separable_pool"), ("model", "sparse_cpu")}
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return
    assert ("model", "onnxruntime") in impls  # installed: timed, after its output was checked


def test_a_wrong_answer_is_an_error_row_and_the_rest_is_timed():
    import torch

    from bench.cases.common import Candidate, Config, VerificationError, Workload
    from bench.runner import measure_workload

    def compare(output, reference, impl_name):
        if not torch.equal(output, reference):
            raise VerificationError(f"{impl_name} differs")

    inputs = [torch.arange(4.0)]
    workload = Workload(Config("toy", "n=4", "float32", "fwd", {}), inputs,
                        [Candidate("reference", "baseline", lambda x: x * 2),
                         Candidate("wrong", "backend", lambda x: x * 3),
                         Candidate("right", "backend", lambda x: x + x)], ["reference"], compare)
    rows = {row["impl"]: row for row in measure_workload(workload, "cpu", 2, None, {}, cpu_warmup_seconds=0.0)}
    assert rows["wrong"]["status"] == "error" and "VerificationError: wrong differs" in rows["wrong"]["error"]
    assert rows["wrong"]["median_ms"] is None
    assert rows["right"]["status"] == rows["reference"]["status"] == "ok"


def test_each_compiled_baseline_starts_from_a_reset_dynamo(monkeypatch):
    """Dynamo recompiles one code object at most 8 times and then runs it eagerly without a word: every
    end-to-end point resets it before compiling, or `compiled` rows after the 8th would time eager torch."""
    import torch
    from torch import nn

    from bench.cases import infer
    from vpns_fast.deploy import baselines

    events = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: events.append("reset"))
    monkeypatch.setattr(baselines, "compiled_runner", lambda model: events.append("compile") or model)
    monkeypatch.setattr(baselines, "onnxruntime_version", lambda: None)
    monkeypatch.delenv("VPNS_DEEPSPARSE_PYTHON", raising=False)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).eval()
    for _ in range(2):
        names = [c.name for c in infer.deployer_baselines(model, [torch.randn(1, 3, 2, 2)], {}, True)]
    assert events == ["reset", "compile"] * 2 and "compiled" in names


def test_the_pruned_models_leave_the_random_stream_alone():
    import torch

    from bench.cases import infer

    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    first = infer.pruned_model.__wrapped__("resnet18", 0.1, "uniform", seed=0)
    assert torch.equal(torch.rand(2), expected)
    second = infer.pruned_model.__wrapped__("resnet18", 0.1, "uniform", seed=0)
    assert torch.equal(first.conv1.weight, second.conv1.weight)  # the seed still makes the model


def test_sparse_isa_rows(tmp_path):
    """Every kernel this CPU runs is timed on each point after its output was checked against the scalar one;
    a kernel the CPU lacks is a skipped row naming it; `default` is the kernel the engine picks, and the
    choice is put back after every call."""
    from vpns_fast.deploy import sparse_cpu

    available, reason = sparse_cpu.available()
    if not available:
        pytest.skip(f"sparse CPU kernels unavailable: {reason}")
    chosen, here = sparse_cpu.kernel_isa(), sparse_cpu.kernel_isas()
    rows = run_cases(["sparse_isa"], device="cpu", sizes="small", repeats=2, out_path=str(tmp_path / "rows.jsonl"),
                     cpu_warmup_seconds=0.0, stream=None, compile_baselines=False)
    assert sparse_cpu.kernel_isa() == chosen
    assert {row["params"]["scope"] for row in rows} == {"layer", "model"}
    assert len({row["shape"] for row in rows}) == 6  # 4 conv layers, the classifier and the network
    assert {row["params"].get("kind") for row in rows} == {None, "linear"}
    for row in rows:
        assert set(row) == ROW_FIELDS, set(row) ^ ROW_FIELDS
        assert row["case"] == "sparse_isa" and row["params"]["default_isa"] == chosen
        if row["impl"] in here or row["impl"] == "default":
            assert row["status"] == "ok", row
            assert set(row["speedup"]) == set(here) and row["tflop_per_s"] > 0 and row["flops"] > 0
        else:
            assert row["status"] == "skipped" and f"this CPU has no {row['impl']}" in row["skip_reason"]
    assert {row["impl"] for row in rows} == {"scalar", "avx2", "avx512", "default"}


def test_profile_step_dry_run_on_the_cpu(tmp_path, monkeypatch):
    """bench/profile_step.py (prepared for a GPU session) runs on a CPU: a table per implementation and
    a summary row each with the step's wall time."""
    out = tmp_path / "profile"
    monkeypatch.setattr(sys, "argv", ["profile_step", "--out", str(out), "--device", "cpu", "--sizes", "small",
                                      "--match", ".", "--steps", "1", "--warmup", "1", "--rows", "5"])
    with pytest.raises(SystemExit) as done:
        runpy.run_module("bench.profile_step", run_name="__main__")
    assert done.value.code == 0
    rows = [json.loads(line) for line in (out / "summary.jsonl").read_text().splitlines()]
    assert {row["impl"] for row in rows} == {"release", "dense", "vpns_fast", "vpns_fast_whole_input_grad"}
    assert all(row["wall_ms_per_step"] > 0 and row["device_busy_ms_per_step"] is None for row in rows)
    assert len(list(out.glob("*.txt"))) == 4


def test_threshold_radix_schedules_are_valid():
    """Every digit schedule bench/threshold_radix.py times tiles the keys and ends its band on a pass."""
    import torch

    import vpns_fast.kernels.threshold as radix
    from bench import threshold_radix

    shipped_band_shift = radix._BAND_SHIFT[torch.float32]
    with threshold_radix.schedules_restored():
        for schedule, by_dtype in threshold_radix.SCHEDULES.items():
            for dtype in by_dtype:
                threshold_radix._install(schedule, dtype, masked=False)  # raises on an invalid schedule
        radix._RADIX_PASSES[torch.float32] = ((23, 8), (15, 8), (7, 8))  # bits 0-6 never resolved
        with pytest.raises(ValueError, match="do not tile"):
            radix._check_schedule(torch.float32)
        radix._RADIX_PASSES[torch.float32] = ((23, 8), (15, 8), (7, 8), (0, 7))
        radix._BAND_SHIFT[torch.float32] = 10  # inside a pass's digit
        with pytest.raises(ValueError, match="not where a pass begins"):
            radix._check_schedule(torch.float32)
    assert radix._BAND_SHIFT[torch.float32] == shipped_band_shift


def test_winograd_ab_runs_both_conversions_and_onnx_runtime(capsys):
    """bench/winograd_ab.py converts one pruned model with and without Winograd and times both against ONNX
    Runtime: what each conversion chose, three medians and three ratios."""
    from vpns_fast.deploy import baselines, sparse_cpu

    if not sparse_cpu.available()[0] or baselines.onnxruntime_version() is None:
        pytest.skip("needs the C++ extension and onnxruntime")
    from bench import winograd_ab

    assert winograd_ab.main(["resnet18", "0.5", "--rounds", "2", "--image-size", "32"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# resnet18 at 32, 0.5 kept per layer, batch 1, 2 threads")
    assert lines[1].startswith("winograd: converted in ") and lines[2].startswith("oneDNN only: converted in ")
    assert "0 by Winograd; Winograd: None" in lines[2]  # winograd=False: none, and no whole-network note
    assert [line.split(":")[0] for line in lines[3:6]] == ["winograd", "oneDNN only", "onnxruntime"]
    assert all(" against " in line and "(p20-p80 " in line for line in lines[6:9]) and len(lines) == 9


def test_winograd_ab_layers_time_each_way_of_computing_the_products(capsys):
    """``--layers``: one line per ResNet 3x3 shape with oneDNN, the batched sgemm and the panels once per vector
    kernel (the outputs checked against oneDNN's before timing), then the networks as without it."""
    from vpns_fast.deploy import baselines, sparse_cpu

    if not sparse_cpu.pointwise_conv_supported() or baselines.onnxruntime_version() is None:
        pytest.skip("needs the C++ extension, AVX2 + FMA and onnxruntime")
    from bench import winograd_ab

    assert winograd_ab.main(["resnet18", "0.5", "--rounds", "1", "--image-size", "32", "--layers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("## 3x3 stride-1 layers, dense, bias + ReLU fused, batch 1")
    layer_lines = lines[2:6]
    assert [line.split(":")[0] for line in layer_lines] == [
        " 64 channels at 56x56", "128 channels at 28x28", "256 channels at 14x14", "512 channels at 7x7"]
    panels = [f"panels {isa}" for isa in sparse_cpu.kernel_isas() if isa != "scalar"]
    for line in layer_lines:
        assert all(f"{label} " in line for label in ["oneDNN", "batched sgemm", *panels])
        assert line.count(" / ") == 1 + len(panels)  # every other contender against the fastest panels
    assert lines[6].startswith("winograd: converted in ") and len(lines) == 6 + 8


@pytest.mark.parametrize("script", ["winograd_ab", "cpu_layers", "deepsparse_layers", "ort_layers"])
@pytest.mark.parametrize("argv, message", [(["resnet18", "1.5"], "density: expected a number in (0, 1], got 1.5"),
                                           (["resnet18", "0.1", "--batch", "0"], "--batch, --threads: expected"),
                                           (["resnet_18", "0.1"], "arch: expected a torchvision classification")])
def test_the_one_model_scripts_refuse_bad_arguments_by_name(script, argv, message, capsys):
    """bench.winograd_ab and bench.cpu_layers share their model arguments and checks: one line, exit 2, before
    any model is built (an unknown arch was a traceback in winograd_ab)."""
    import importlib

    module = importlib.import_module(f"bench.{script}")
    with pytest.raises(SystemExit) as exited:
        module.main(argv)
    assert exited.value.code == 2 and message in capsys.readouterr().err


def test_cpu_rows_record_the_cores_round_trip(monkeypatch):
    """bench.environment: the CPU rows say how far apart the first two CPUs were when their measurement began (a
    positive time, the smaller of two measurements, or None where it cannot be measured)."""
    from bench import environment
    from vpns_fast.deploy import sparse_cpu

    trip = environment.environment_fields("cpu")["core_round_trip_ns"]
    if sparse_cpu.available()[0] and hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) >= 2:
        assert isinstance(trip, float) and 0 < trip < 1e6
        measurements = iter([400.0, 300.0])
        monkeypatch.setattr(sparse_cpu, "core_round_trip_ns", lambda rounds: next(measurements))
        assert environment.core_round_trip_ns() == 300.0
    else:
        assert trip is None


@pytest.mark.parametrize("script, argv, message", [
    ("private_planes_ab", ["--threads", "1"], "--threads: expected an integer >= 2"),
    ("private_planes_ab", ["--density", "0"], "--density: expected a fraction in (0, 1]"),
    ("private_planes_ab", ["--seconds", "0"], "--seconds: expected a positive number"),
    ("output_prefetch_ab", ["--threads", "1"], "--threads: expected an integer >= 2"),
    ("output_prefetch_ab", ["--seconds", "-1"], "--seconds: expected a positive number"),
    ("output_prefetch_ab", ["--rounds", "0"], "--rounds: expected an integer >= 1"),
    ("aligned_outputs_ab", ["--threads", "0"], "--threads: expected an integer >= 1"),
    ("aligned_outputs_ab", ["--density", "1.5"], "--density: expected a fraction in (0, 1]"),
    ("aligned_outputs_ab", ["--rounds", "0"], "--rounds: expected an integer >= 1"),
    ("pointwise_ab", ["--density", "1.5"], "--density: expected a fraction in (0, 1]"),
    ("pointwise_ab", ["--rounds", "0"], "--rounds: expected an integer >= 1"),
    ("call_plan_ab", ["--densities", "0.1,x"], "--densities: expected fractions separated by commas"),
    ("call_plan_ab", ["--densities", "0"], "--densities: expected fractions in (0, 1]"),
    ("call_plan_ab", ["--batch", "0"], "--batch: expected a positive integer"),
    ("call_plan_ab", ["--seconds", "0"], "--seconds: expected a positive number"),
    ("isa_ab", ["--threads", "0"], "--threads: expected an integer >= 1"),
    ("isa_ab", ["--seconds", "0"], "--seconds: expected a positive number"),
    ("isa_ab", ["--points", "resnet50:2:1"], "--points: expected KEPT in (0, 1] and BATCH >= 1"),
    ("isa_ab", ["--points", "resnet50:0.1:1,vgg16:0.1:1"], "--points: expected ARCH:KEPT:BATCH"),
    ("isa_ab", ["--points", "resnet50:x:1"], "--points: expected a fraction and an integer"),
    ("generated_code_layers", ["--batch", "20"], "--batch: expected a positive multiple of 16"),
    ("generated_code_layers", ["--rounds", "0"], "--rounds: expected an integer >= 1")])
def test_the_switch_scripts_refuse_bad_arguments_by_name(script, argv, message, capsys):
    """The one-process A/B scripts of an engine switch: one line naming the argument, exit 2."""
    import importlib

    with pytest.raises(SystemExit) as exited:
        importlib.import_module(f"bench.{script}").main(argv)
    assert exited.value.code == 2 and message in capsys.readouterr().err


def test_generated_code_layers_times_a_layer_both_ways(capsys):
    """bench/generated_code_layers.py: one layer's line with both sides' times, the code's size and the shape rule's
    answer, after checking both outputs equal bit for bit."""
    from bench import generated_code_layers
    from vpns_fast.deploy import sparse_cpu

    if not sparse_cpu.available()[0] or sparse_cpu.kernel_isa() != "avx512":
        pytest.skip("the generated code needs the AVX-512 kernel")
    assert generated_code_layers.main(["--match", "512 -> 2048", "--rounds", "2", "--batch", "16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[1].startswith("512 -> 2048 at 7x7 (expanding):   2 rounds, per-image")
    assert "; code " in lines[1] and lines[1].endswith("the shape rule: taken")
    assert generated_code_layers.main(["--match", "2048 -> 512", "--rounds", "1", "--batch", "16", "--aligned"]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("2048 -> 512 at 7x7 (reducing), aligned:   1 rounds")


def test_private_planes_ab_groups_rounds_by_the_cores_round_trip(monkeypatch):
    """bench/private_planes_ab.py through bench/placement.py: each run goes with its own threshold set, and each
    round lands in the group its measured round trip says (bench.environment.core_round_trip_ns), or in "between"
    (also when none could be measured); the summary quotes the per-round ratio shared / private."""
    from bench import placement, private_planes_ab
    from vpns_fast.deploy import sparse_cpu

    trips = iter([60.0, 300.0, 180.0, None])
    monkeypatch.setattr(placement, "core_round_trip_ns", lambda: next(trips))
    current = {}
    monkeypatch.setattr(sparse_cpu, "set_private_planes_bytes", lambda value: current.update(value=value))
    seen = []
    runs = {name: functools.partial(lambda name: seen.append((name, current["value"])), name)
            for name in ("shared", "private")}
    groups = private_planes_ab._grouped(runs, {"shared": 0, "private": 512}, 60.0, max_rounds=4)
    assert [len(groups[name]) for name in ("shared", "apart", "between")] == [1, 1, 2]
    assert set(seen) == {("shared", 0), ("private", 512)}
    assert len(seen) == 4 * 2 * private_planes_ab.CALLS_PER_ROUND
    rounds = [{"shared": 2.0, "private": 1.0}, {"shared": 3.0, "private": 2.0}]
    line = placement.grouped_summary("net", rounds, "shared", "private")
    assert line == ("net:   2 rounds, shared    2.500 ms, private    1.500 ms; shared / private 1.750x (p20-p80 "
                    "1.600-1.900x)")
    assert placement.grouped_summary("net", [], "shared", "private") == "net: no round"
    named = [{"a x": 2.0, "a y": 1.0}]
    assert placement.grouped_summary("l", named, "a x", "a y", ("x", "y")).startswith("l:   1 rounds, x    2.000 ms")


def test_isa_ab_reads_its_points():
    from bench import isa_ab

    points = isa_ab.parse_points("resnet50:0.05:1, mobilenet_v2:1:32")
    assert points == [("resnet50", 0.05, 1), ("mobilenet_v2", 1.0, 32)]
    assert [arch for arch, _, _ in isa_ab.parse_points(isa_ab.DEFAULT_POINTS)] == [
        "resnet50", "resnet18", "resnet50", "resnet18", "mobilenet_v2", "resnet50", "resnet18", "resnet50"]


def test_output_prefetch_ab_sets_the_request_by_run_name():
    from bench import output_prefetch_ab
    from vpns_fast.deploy import sparse_cpu

    previous = sparse_cpu.set_output_prefetch_for_write(True)
    try:
        output_prefetch_ab._request_for("read")
        assert sparse_cpu.set_output_prefetch_for_write(False) is False
        output_prefetch_ab._request_for("write")
        assert sparse_cpu.set_output_prefetch_for_write(True) is True
    finally:
        sparse_cpu.set_output_prefetch_for_write(previous)


def test_aligned_outputs_ab_switches_the_marked_layers_by_run_name():
    """bench/aligned_outputs_ab.py: its aligned copy is the layout a sparse conv writes (zeros between channels,
    the same values), and each run sets the graph's layout by its name; the A/B scripts' header names what they
    compare and their arguments."""
    import torch

    from bench import aligned_outputs_ab
    from vpns_fast.deploy import sparse_cpu

    x = torch.randn(2, 3, 7, 7)
    copy = aligned_outputs_ab.aligned_copy(x)
    assert copy.stride() == (3 * 64, 64, 7, 1) and torch.equal(copy, x)  # 49 floats padded to a 64-byte line
    assert torch.equal(copy.as_strided((2, 3, 64), (192, 64, 1))[:, :, 49:], torch.zeros(2, 3, 15))
    network = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3), torch.nn.Conv2d(3, 2, 1)))
    for name in ("0", "1"):  # as the engine swaps its layers into the traced graph
        network.set_submodule(name, sparse_cpu.SparseConv2d.from_dense(network.get_submodule(name)))

    def aligned_calls():
        return [node.target for node in network.graph.nodes if node.kwargs.get("aligned_output")]

    aligned_outputs_ab._set_layout(network, "aligned")
    assert aligned_calls() == ["0"]
    aligned_outputs_ab._set_layout(network, "plain")
    assert aligned_calls() == []
    from bench.cases.infer import switch_ab_header

    header = switch_ab_header("a / b", argparse.Namespace(threads=2, density=0.1), "; more")
    assert header.startswith("# a / b; 2 threads, kernel ") and header.endswith("{'threads': 2, 'density': 0.1}; more")
    from vpns_fast.environment import cpu_model_name

    assert f", {cpu_model_name()} (" in header  # the machine named, for results read later elsewhere



def test_switched_network_times_checks_the_outputs_then_times_both_ways():
    """bench.cases.infer.switched_network_times (the network part of the switch A/B scripts): one timed call a round
    each way with the switch set for it, the switch left as the network was converted, and no timing at all when the
    two ways' outputs disagree (the switch left as converted then too)."""
    import torch

    from bench.cases.infer import switched_network_times

    state = {"way": None, "calls": []}

    class Switched(torch.nn.Module):
        def forward(self, x):
            state["calls"].append(state["way"])
            return x * (2.0 if state["way"] == "changed" else 1.0)

    def switch(name):
        state["way"] = name

    x = torch.ones(3)
    times = switched_network_times(Switched(), x, ("base", "new"), switch, 4, torch.equal)
    assert sorted(times) == ["base", "new"] and all(len(ms) == 4 and min(ms) >= 0 for ms in times.values())
    assert state["calls"] == ["new", "base"] + ["base", "new", "new", "base"] * 2 and state["way"] == "new"
    state["calls"].clear()
    with pytest.raises(AssertionError, match="base and changed gave different outputs"):
        switched_network_times(Switched(), x, ("base", "changed"), switch, 4, torch.equal)
    assert state["calls"] == ["changed", "base"] and state["way"] == "changed"

def test_converted_pruned_network_is_the_pruned_model_converted_for_its_seeded_input():
    """bench.cases.infer.converted_pruned_network (the network part of the switch A/B scripts): the same seeded input
    each time, a network that runs sparse layers, and outputs equal to the pruned torchvision model's on it."""
    import torch

    from bench.cases.infer import converted_pruned_network, pruned_model
    from vpns_fast.deploy import sparse_cpu

    if not sparse_cpu.available()[0]:
        pytest.skip(sparse_cpu.available()[1])
    network, x = converted_pruned_network("resnet18", 0.1, 2)
    _, again = converted_pruned_network("resnet18", 0.1, 2)
    assert x.shape == (2, 3, 224, 224) and torch.equal(x, again)
    assert any(isinstance(module, sparse_cpu.SparseConv2d) for module in network.modules())
    with torch.inference_mode():
        got, expected = network(x), pruned_model("resnet18", 0.1, "uniform")(x)
    scale = float(expected.abs().max())
    assert got.shape == expected.shape and float((got - expected).abs().max()) <= 1e-4 * scale


def test_engines_table_quotes_the_median_of_the_per_round_ratios(tmp_path, capsys):
    """bench/engines_table.py prints the README's table from `bench infer` rows: the per-round median (inside its
    own p20-p80, where the ratio of two medians need not be), computed from speedup_rounds for older rows,
    DeepSparse's in-process time over the engine's median, "-" for an engine missing at a point."""
    from bench import engines_table

    def row(impl, median_ms, rounds=None, round_median=None, **params):
        return {"status": "ok", "impl": impl, "median_ms": median_ms, "images_per_s": 1e3 / median_ms,
                "params": {"model": "resnet50", "density": 0.1, "batch": 1, "scope": "model", **params},
                "speedup_rounds": rounds or {}, **({"speedup_round_median": round_median} if round_median else {})}

    rows = [row("dense", 50.0), row("onnxruntime", 40.0),
            row("deepsparse", 25.0, deepsparse_engine_ms=[21.0, 22.0, 99.0]),
            # the ratio of medians would be 2.0x ORT; the rounds say 2.5x
            row("sparse_cpu", 20.0, rounds={"onnxruntime": [2.5, 2.4, 2.6, 1.0, 2.5], "deepsparse": [1.1, 1.3, 1.2]}),
            row("sparse_cpu", 10.0, rounds={"onnxruntime": [4.0, 5.0]}, round_median={"onnxruntime": 4.4})]
    rows[-1]["params"]["batch"] = 32
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert engines_table.main([str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == engines_table.HEADER.splitlines()[0] and len(lines) == 4
    assert lines[2] == ("| ResNet-50, 10% | 1 | 20.0 | 25.0 | 40.0 | 50.0 | 2.50x (2.12-2.52) | 1.20x (1.14-1.26) "
                        "| 1.10x |")
    assert lines[3] == "| ResNet-50, 10% | 32 | - | - | - | 100.0 | 4.40x (4.20-4.80) | - | - |"
    with pytest.raises(SystemExit) as exited:
        engines_table.main([str(tmp_path / "missing.jsonl")])
    assert exited.value.code == 2
    with pytest.raises(SystemExit) as exited:  # two runs' rows of the same point: refused, not mixed
        engines_table.main([str(path), str(path)])
    assert exited.value.code == 2 and "appears twice" in capsys.readouterr().err


def test_rotating_times_take_turns_in_a_rotating_order():
    from bench.timing import rotating_times_ms

    calls, prepared = [], []
    runs = {name: functools.partial(calls.append, name) for name in ("a", "b", "c")}
    times = rotating_times_ms(runs, 4, prepared.append)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert prepared == calls  # each call prepared right before it
    assert {name: len(values) for name, values in times.items()} == {"a": 4, "b": 4, "c": 4}
    assert all(value >= 0 for values in times.values() for value in values)


def test_switch_ab_report_prints_with_the_default_and_restores_the_switch(capsys):
    """bench.cases.infer.print_switch_ab_report: the header, then the lines, computed with the switch at the default,
    and the switch set back to what it was, also when computing the lines fails; the thread count is the argument's."""
    import argparse

    import pytest
    import torch

    from bench.cases.infer import print_switch_ab_report
    from vpns_fast.deploy import sparse_cpu

    threads = torch.get_num_threads()
    previous = sparse_cpu.set_next_tile_prefetch(False)
    seen = []
    try:
        def lines():
            seen.append(sparse_cpu.set_next_tile_prefetch(True))  # the value during the lines
            sparse_cpu.set_next_tile_prefetch(seen[-1])
            return ["one", "two"]

        args = argparse.Namespace(threads=1)
        assert print_switch_ab_report(args, "# header", sparse_cpu.set_next_tile_prefetch, True, lines) == 0
        assert capsys.readouterr().out == "# header\none\ntwo\n" and seen == [True] and torch.get_num_threads() == 1
        assert sparse_cpu.set_next_tile_prefetch(False) is False  # restored

        def failing():
            raise RuntimeError("measurement failed")

        with pytest.raises(RuntimeError, match="measurement failed"):
            print_switch_ab_report(args, "# header", sparse_cpu.set_next_tile_prefetch, True, failing)
        assert sparse_cpu.set_next_tile_prefetch(False) is False
    finally:
        sparse_cpu.set_next_tile_prefetch(previous)
        torch.set_num_threads(threads)


def test_deepsparse_layers_maps_onnx_names_to_modules_and_sums_what_a_subgraph_covers():
    """bench.deepsparse_layers: DeepSparse's subgraphs name the ONNX outputs they produce; each is set against the
    sum of the layers it covers, as they run (sparse or dense), by the shares of each side's time; a subgraph that
    covers none is shown without them and left out of the sums."""
    from bench import deepsparse_layers as layers

    assert layers.module_name("/layer1/layer1.0/downsample/downsample.0/Conv_output_0") == "layer1.0.downsample.0"
    assert layers.module_name("/layer3/layer3.5/conv2/Conv_output_0") == "layer3.5.conv2"
    assert layers.module_name("/maxpool/MaxPool_output_0") == "maxpool"
    assert layers.module_name("logits") is None
    analysis = {"layer_info": [
        {"name": "pyramid_2", "average_run_time_in_ms": 4.0,
         "canonical_name": "/layer1/layer1.0/conv2/Conv_output_0,/layer1/layer1.0/conv3/Conv_output_0"},
        {"name": "ks_convolution", "average_run_time_in_ms": 2.0,
         "canonical_name": "/layer2/layer2.0/conv1/Conv_output_0"},
        {"name": "ks_gevm_be", "average_run_time_in_ms": 1.0, "canonical_name": "logits"}]}
    decisions = [{"name": "layer1.0.conv2", "chosen": "sparse", "sparse_ms": 3.0, "dense_ms": 9.0},
                 {"name": "layer1.0.conv3", "chosen": "dense", "sparse_ms": 7.0, "dense_ms": 2.0},
                 {"name": "layer2.0.conv1", "chosen": "sparse", "sparse_ms": 3.0, "dense_ms": 5.0}]
    rows = layers.side_by_side(analysis, decisions)
    assert [(row["ours_ms"], row["layers"]) for row in rows] == [
        (5.0, ["layer1.0.conv2", "layer1.0.conv3"]), (3.0, ["layer2.0.conv1"]), (None, [])]
    text = layers.format_side_by_side(rows).splitlines()
    # shares of the rows both timed (6 ms DeepSparse, 8 ms ours): 4/6 against 5/8, 2/6 against 3/8
    assert text[1].split()[1:6] == ["4.000", "66.7%", "5.000", "62.5%", "0.94"]
    assert text[2].split()[1:6] == ["2.000", "33.3%", "3.000", "37.5%", "1.12"]
    assert text[3].split()[1:] == ["1.000", "-", "-", "-", "-", "-"]
    assert text[-1].split()[-4:] == ["6.000", "100%", "8.000", "100%"]


@pytest.mark.parametrize("script", ["cpu_layers", "deepsparse_layers", "ort_layers"])
def test_the_timing_scripts_refuse_no_rounds(script, capsys):
    import importlib

    with pytest.raises(SystemExit) as exited:
        importlib.import_module(f"bench.{script}").main(["resnet18", "0.1", "--iters", "0"])
    assert exited.value.code == 2 and "--iters: expected an integer >= 1, got 0" in capsys.readouterr().err


def test_deepsparse_layers_without_deepsparse_says_how_to_get_it(monkeypatch, capsys):
    from bench import deepsparse_layers
    from bench.cases.infer import DEEPSPARSE_PYTHON

    monkeypatch.delenv(DEEPSPARSE_PYTHON, raising=False)
    with pytest.raises(SystemExit) as exited:
        deepsparse_layers.main(["resnet18", "0.1"])
    assert exited.value.code == 2 and f"set {DEEPSPARSE_PYTHON} to a python with deepsparse" in capsys.readouterr().err


def test_zoo_sweep_reports_ok_refused_and_wrong_by_model(monkeypatch, capsys):
    """bench.zoo_sweep: a model the engine runs right is ``ok``, one deploy refuses is ``refused`` (right or refused),
    and an engine whose outputs differ beyond rounding is ``WRONG`` with exit status 1."""
    import vpns_fast
    from bench import zoo_sweep

    assert zoo_sweep.main(["--models", "squeezenet1_1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# deploy() on torchvision models, 0.1 kept, 1 threads")
    assert lines[2].split()[:2] == ["squeezenet1_1", "64"] and lines[2].split()[-1] == "ok"
    assert lines[2].split()[-2] == "steps"  # called through its compiled call plan the second time
    deploy = vpns_fast.deploy

    class Changed:
        def __init__(self, engine, change):
            self.engine, self.change, self.calls = engine, change, 0

        def __call__(self, images):
            self.calls += 1
            return self.change(self.engine(images), self.calls)

        def call_plans(self):
            return self.engine.call_plans()

    monkeypatch.setattr(vpns_fast, "deploy", lambda model, **kwargs: Changed(
        deploy(model, **kwargs), lambda out, calls: out * 1.01))
    assert zoo_sweep.main(["--models", "squeezenet1_1"]) == 1
    assert capsys.readouterr().out.splitlines()[2].split()[-1] == "WRONG"
    # within rounding of the model, but the planned call not equal to the first bit for bit
    monkeypatch.setattr(vpns_fast, "deploy", lambda model, **kwargs: Changed(
        deploy(model, **kwargs), lambda out, calls: out * (1 + 1e-7 * (calls % 2))))
    assert zoo_sweep.main(["--models", "squeezenet1_1"]) == 1
    assert "WRONG  the call through its plan differed" in capsys.readouterr().out

    def refusing(model, **kwargs):
        raise RuntimeError("convert_for_cpu: refusing to convert")

    monkeypatch.setattr(vpns_fast, "deploy", refusing)
    assert zoo_sweep.main(["--models", "squeezenet1_1"]) == 0
    assert "refused  RuntimeError: convert_for_cpu: refusing to convert" in capsys.readouterr().out

    def unpreparable(model, density, size):  # inception_v3's auxiliary head at 75 px, while taking BN statistics
        raise RuntimeError("Output size is too small")

    monkeypatch.setattr(zoo_sweep, "conditioned", unpreparable)
    assert zoo_sweep.main(["--models", "squeezenet1_1"]) == 0  # no verdict on the engine, and the sweep goes on
    assert "not run  preparing the model: RuntimeError: Output size is too small" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exited:
        zoo_sweep.main(["--models", "resnet_18"])
    assert exited.value.code == 2 and "--models: expected torchvision classification models, got resnet_18" in \
        capsys.readouterr().err


def test_ort_layers_times_each_layer_where_it_runs_and_reads_onnx_runtimes_profile():
    """bench.ort_layers on a small network: this engine's layers timed node by node (each module call by its path,
    the rest as "(no module)"); ONNX Runtime's own profile of the same network, each node's kernel time counted for
    the module its value comes from (a fused conv + ReLU for the conv, through the weight it reads), the warm-up
    runs left out; the rows side by side with their sums."""
    from vpns_fast.deploy import baselines

    if baselines.onnxruntime_version() is None:
        pytest.skip("needs onnxruntime")
    import torch
    from torch import fx, nn

    from bench import ort_layers

    class Small(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, padding=1)
            self.expand = nn.Conv2d(16, 32, 1)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.head = nn.Linear(32, 10)

        def forward(self, x):
            x = torch.relu(self.stem(x))
            x = torch.relu(self.expand(x) + x.repeat(1, 2, 1, 1))
            return self.head(self.pool(x).flatten(1))

    network = Small().eval()
    x = torch.randn(2, 3, 16, 16)
    traced = fx.symbolic_trace(network)
    ours, timed, plain, how = ort_layers.our_layer_ms(traced, x, iters=2)
    assert "compiled call plan's" in how
    assert {"stem", "expand", "pool", "head", ort_layers.OTHER} <= set(ours) and timed > 0 and plain > 0
    assert all(ms >= 0 for ms in ours.values())
    # where no plan can be made (an .item() the data decides), the graph is interpreted node by node instead
    placeholder = next(iter(traced.graph.nodes))
    with traced.graph.inserting_after(placeholder):
        total = traced.graph.call_method("sum", (placeholder,))
    with traced.graph.inserting_after(total):
        traced.graph.call_method("item", (total,))
    traced.recompile()
    ours, timed, plain, how = ort_layers.our_layer_ms(traced, x, iters=2)
    assert how.startswith("interpreted node by node (no compiled call plan:")
    assert {"stem", "expand", "pool", "head"} <= set(ours) and timed > 0 and plain > 0
    ort, ops, profiled, ort_plain = ort_layers.ort_layer_ms(network, x, threads=1, iters=2)
    assert {"stem", "expand", "head"} <= set(ort) and profiled > 0 and ort_plain > 0
    assert "Conv" in ops["stem"] or "FusedConv" in ops["stem"]
    assert sum(ort.values()) <= profiled * 1.01
    text = ort_layers.format_rows({"stem": 2.0, "head": 1.0}, {"stem": 1.0, "pool": 0.5}, {"stem": "FusedConv"})
    lines = text.splitlines()
    assert lines[1].split() == ["stem", "1.000", "2.000", "2.00", "FusedConv"]
    assert lines[2].split() == ["head", "-", "1.000", "-", "-"] and lines[3].split()[:4] == ["pool", "0.500", "-", "-"]
    assert lines[-1].split() == ["sum", "1.500", "3.000", "2.00"]
    # the warm-up runs' nodes are left out; a node of no module counts for "(no module)"
    events = [{"cat": "Session", "name": "model_run", "ts": 0, "dur": 10},
              {"cat": "Node", "name": "relu_nchwc_kernel_time", "ts": 1, "dur": 5000, "args": {"op_name": "Conv"}},
              {"cat": "Session", "name": "model_run", "ts": 100, "dur": 10},
              {"cat": "Node", "name": "relu_nchwc_kernel_time", "ts": 101, "dur": 3000, "args": {"op_name": "Conv"}},
              {"cat": "Node", "name": "ReorderOutput_kernel_time", "ts": 102, "dur": 1000,
               "args": {"op_name": "ReorderOutput"}}]
    layers, ops, run_ms = ort_layers.ort_profile_layers(events, {"relu": "stem"}, warmup=1)
    assert layers == {"stem": 3.0, ort_layers.OTHER: 1.0} and ops == {"stem": "Conv", ort_layers.OTHER: "ReorderOutput"}
    assert run_ms == 0.01
    with pytest.raises(ValueError, match="no timed model_run"):
        ort_layers.ort_profile_layers(events, {}, warmup=2)


def test_call_plan_ab_reports_each_network_with_its_plan(monkeypatch, capsys):
    """bench/call_plan_ab.py on a tiny network: the outputs compared, then rounds of both ways, one line a group."""
    from torch import nn

    from bench import call_plan_ab
    from vpns_fast.deploy import sparse_cpu

    if not sparse_cpu.available()[0]:
        pytest.skip("the C++ extension is not built")
    monkeypatch.setattr(call_plan_ab, "pruned_model", lambda name, density, mask: nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval())
    assert call_plan_ab.main(["--networks", "tiny", "--densities", "0.5", "--seconds", "0.2", "--calls", "2",
                              "--threads", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# call_plan.set_call_plans graph / plan; 1 threads")
    assert lines[1:] and all(line.startswith("tiny 0.5 kept batch 1 (") and " steps), cores " in line
                             for line in lines[1:])


def test_builds_ab_compares_two_trees_in_alternating_processes(capsys):
    """bench.builds_ab against this tree itself: one round, a ratio per round and the summary, the steps asked for
    timed in both processes; a base that is no source tree is refused by name."""
    from bench import builds_ab
    from vpns_fast.deploy import sparse_cpu

    available, reason = sparse_cpu.available()
    if not available:
        pytest.skip(f"sparse CPU kernels unavailable: {reason}")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert builds_ab.main([root, "resnet18", "0.1", "--rounds", "1", "--calls", "2", "--steps", "fc"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# resnet18 at 0.1 kept, batch 1")
    assert lines[1].startswith("round 1: ") and " fc " in lines[1] and "nan" not in lines[1]
    assert lines[2].startswith("the whole call:   1 rounds, base ") and "base / this tree " in lines[2]
    assert "nan" not in lines[2]
    with pytest.raises(SystemExit):
        builds_ab.main([os.path.join(root, "tests"), "resnet18", "0.1"])
    assert "base: expected a source tree" in capsys.readouterr().err


def test_pooling_shapes_times_both_poolings_and_names_the_rule(capsys):
    """bench.pooling_shapes on the first two shapes of its grid at batch 1: a line each pooling, shape and layout with
    both times, their ratio and the rule's verdict (max pooling swapped by rule; average pooling over 112x112 timed);
    bad arguments are refused with an error naming the flag (exit 2)."""
    from bench import pooling_shapes
    from vpns_fast.deploy import sparse_cpu

    available, reason = sparse_cpu.available()
    if not available:
        pytest.skip(f"sparse CPU kernels unavailable: {reason}")
    assert pooling_shapes.main(["--rounds", "1", "--batches", "1", "--shapes", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# pooling kernels against torch's, 2 threads") and lines[1].split()[0] == "pooling"
    rows = lines[2:]
    assert len(rows) == 5 * 2 * 2 and all(row.rstrip().endswith(("swap", "timed")) for row in rows)
    assert all(row.endswith("swap") for row in rows if row.startswith("max"))
    assert all(row.endswith("timed") for row in rows if row.startswith("global average"))
    assert "nan" not in "".join(rows)
    for bad in (["--batches", "one"], ["--batches", "1,0"], ["--rounds", "0"], ["--threads", "0"], ["--shapes", "0"]):
        with pytest.raises(SystemExit) as refused:
            pooling_shapes.main(bad)
        assert refused.value.code == 2
        assert f"error: {bad[0]}: expected " in capsys.readouterr().err


def test_fast_path_ab_takes_turns_in_one_process(capsys):
    """bench.fast_path_ab: one round of two calls each way on one deployed ResNet-18, uint8 images; bad counts
    refused in one line (exit 2)."""
    from bench import fast_path_ab
    from vpns_fast.deploy import sparse_cpu

    available, reason = sparse_cpu.available()
    if not available:
        pytest.skip(f"sparse CPU kernels unavailable: {reason}")
    assert fast_path_ab.main(["resnet18", "0.1", "--rounds", "1", "--calls", "2", "--uint8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# resnet18 at 0.1 kept, batch 1, 2 threads, uint8 images")
    assert lines[1].startswith("round 1: general ") and " fast " in lines[1]
    assert lines[2].startswith("a call:   1 rounds, general ") and "general / fast " in lines[2]
    assert "nan" not in lines[2]
    with pytest.raises(SystemExit) as refused:
        fast_path_ab.main(["resnet18", "0.1", "--calls", "0"])
    assert refused.value.code == 2
    assert "--rounds and --calls must be at least 1, got 10 and 0" in capsys.readouterr().err


def test_global_avg_pool_ab_takes_turns_in_one_network(capsys):
    """bench.global_avg_pool_ab: one round each way on one deployed ResNet-18, the step timed both ways."""
    from bench import global_avg_pool_ab
    from vpns_fast.deploy import sparse_cpu

    available, reason = sparse_cpu.available()
    if not available:
        pytest.skip(f"sparse CPU kernels unavailable: {reason}")
    assert global_avg_pool_ab.main(["resnet18", "0.1", "--rounds", "1", "--calls", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# resnet18 at 0.1 kept, batch 1") and lines[1].startswith("round 1: torch ")
    assert lines[2].startswith("the whole call:   1 rounds, torch ") and "torch / kernel " in lines[2]
    assert lines[3].startswith("the step's median: torch ") and "nan" not in lines[2] + lines[3]

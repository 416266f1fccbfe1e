"""``vpns bench-infer`` / ``benchmark_inference`` against the baselines a deployer would pick: ONNX
Runtime on the same network (checked against it before timing), speedups with their spread over
interleaved rounds, the per-layer decisions, and a warning when the engine is not faster."""
from __future__ import annotations

import json

import pytest
import torch
from test_export import make_checkpoint

from vpns_fast import cli
from vpns_fast.deploy import baselines, runtime, sparse_cpu


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path, _, _ = make_checkpoint(tmp_path_factory.mktemp("bench") / "m.pt", granularity="unstructured",
                                 density=0.2, prompt=True)
    return path


def test_onnxruntime_runner_equals_the_network():
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                  torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    x = torch.randn(2, 3, 9, 9)
    run, exporter = baselines.onnxruntime_runner(network, x, threads=1)
    with torch.no_grad():
        expected = network(x)
    for batch in (x, torch.randn(5, 3, 9, 9)):  # the batch axis is dynamic
        with torch.no_grad():
            assert torch.allclose(run(batch), network(batch), atol=1e-5)
    assert exporter.startswith(("torch.export", "torchscript"))
    assert run(x).shape == expected.shape


def test_images_per_second_is_the_batch_over_the_median_latency_for_any_round_count(checkpoint, capsys):
    """With an even number of rounds, the median latency and the median images/s came from different rounds (a
    value picked at a rounded index): 1653 images/s beside 0.412 ms a call at batch 1 (an outside review)."""
    assert runtime._percentile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert runtime._percentile([5.0], 0.2) == 5.0 and runtime._percentile([1.0, 2.0], 0.8) == pytest.approx(1.8)
    for iters in (2, 4):
        assert cli.main(["bench-infer", str(checkpoint), "--batch", "3", "--iters", str(iters), "--warmup", "0",
                         "--threads", "1", "--json"]) == 0
        for row in json.loads(capsys.readouterr().out):
            assert row["images_per_s"] == pytest.approx(1000 * 3 / row["latency_ms"], rel=1e-9)
            assert row["images_per_s_p20"] <= row["images_per_s"] <= row["images_per_s_p80"]


def test_cli_bench_infer_against_onnxruntime_with_spread_and_layers(checkpoint, capsys):
    pytest.importorskip("onnxruntime")
    assert cli.main(["bench-infer", str(checkpoint), "--batch", "1,3", "--iters", "3", "--warmup", "0",
                     "--threads", "1", "--json", "--layers"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["batch"], r["backend"]) for r in rows} == {(b, name) for b in (1, 3)
                                                         for name in ("deploy", "dense-torch", "onnxruntime")}
    for r in rows:
        assert r["images_per_s_p20"] <= r["images_per_s"] <= r["images_per_s_p80"] and r["rounds"] == 3
        assert r["engine_version"].split()[0] in ("vpns_fast", "torch", "onnxruntime")
        if r["backend"] == "deploy":
            for other in ("dense-torch", "onnxruntime"):
                assert r[f"speedup_vs_{other}_p20"] <= r[f"speedup_vs_{other}"] <= r[f"speedup_vs_{other}_p80"]
            assert r["decisions"] and r["peak_gflops"] > 0 and "torch.fx" in r["fusion"]
            choice = r["network_choice"]  # None when no conv could run either way
            sparse_convs = any(d["type"] == "Conv2d" and d["chosen"] == "sparse" for d in r["decisions"])
            assert choice is None or choice.startswith(("kept ", "every conv dense", "every supported conv sparse",
                                                        "every-conv-"))
            assert not sparse_convs or choice.startswith(("kept ", "every supported conv sparse"))
            # the kernel's ISA is reported where a sparse kernel ran (a layer chosen sparse), and only there
            any_sparse = any(d["chosen"] == "sparse" for d in r["decisions"])
            assert r.get("sparse_kernel_isa") == (sparse_cpu.kernel_isa() if any_sparse else None)
            # made on the outputs' check, before the timed calls
            assert r["call_plan"].startswith("a compiled call plan of ") and r["call_plan"].endswith(" steps")
            # each layer's steps timed inside whole calls: every timed module is one the graph calls, every
            # decided layer is timed, and the parts add up to no more than the calls
            in_call = r["in_call"]
            assert in_call["calls"] == 3 and in_call["steps"] == int(r["call_plan"].split()[-2])
            assert {d["name"] for d in r["decisions"]} <= set(in_call["layers_ms"])
            parts = sum(in_call["layers_ms"].values()) + in_call["other_ms"] + in_call["input_ms"]
            assert all(ms >= 0 for ms in in_call["layers_ms"].values()) and 0 < parts <= in_call["total_ms"] * 1.5
    assert cli.main(["bench-infer", str(checkpoint), "--batch", "2", "--iters", "2", "--warmup", "0",
                     "--threads", "1", "--layers"]) == 0
    out = capsys.readouterr().out
    assert "deployed vs onnxruntime:" in out and "p20-p80 over 2 rounds" in out
    assert "batch 2: the deployed module ran through a compiled call plan of " in out
    assert "per-layer decisions" in out and "nzGF/s" in out and "GFLOP/s (best of a 1024^3 sgemm" in out
    assert "GFLOP/s on the nonzero weights" in out and "FLOP-ratio limit" in out
    if sparse_cpu.available()[0]:
        # printed where a layer was chosen sparse, which the timing decides (a Linear may tie with DenseLinear)
        assert "; sparse kernel:" not in out or f"; sparse kernel: {sparse_cpu.kernel_isa()};" in out
        # the layers' own times against the network's: their sum and the rest add up to the latency
        import re

        found = re.search(r"where the time goes: the layers above, each timed alone, sum to ([0-9.]+) ms of the "
                          r"network's ([0-9.]+) ms \((\d+)%\).*?(?:; the other ([0-9.]+) ms is the work outside them"
                          r"|; (more than the whole network): the layers' timings)", out)
        assert found, out[-800:]
        layers_ms, network_ms, share = (float(value) for value in found.groups()[:3])
        rest = found.group(4)
        # a positive rest that adds up, or (a noisy machine: the layers timed at conversion summing to more than
        # the network timed here; an outside review saw "the other -20.08 ms") no rest printed
        assert layers_ms > 0
        assert abs(layers_ms + float(rest) - network_ms) <= 0.011 if rest is not None else layers_ms >= network_ms
        # the share is of the unrounded times: within what the two printed with 2 decimals allow (a clean-clone CI
        # printed 0.33 of 0.47 ms as 72%)
        low, high = 100 * (layers_ms - 0.005) / (network_ms + 0.005), 100 * (layers_ms + 0.005) / (network_ms - 0.005)
        assert low - 1 <= share <= high + 1
        assert " in call " in out.split("per-layer decisions")[1].splitlines()[1]  # the column's header
        assert re.search(r"inside whole calls \(the compiled call plan's \d+ steps each timed, medians of 2 calls of "
                         r"[0-9.]+ ms\): the layers above [0-9.]+ ms \(column 'in call'\), other modules [0-9.]+ ms, "
                         r"torch functions and tensor methods [0-9.]+ ms, the input stage", out), out[-800:]


def test_chosen_layers_ms_sums_what_each_layer_runs():
    table = [{"chosen": "sparse", "sparse_ms": 1.0, "dense_ms": 3.0}, {"chosen": "dense", "sparse_ms": 0.5,
                                                                      "dense_ms": 2.0},
             {"chosen": "dense", "sparse_ms": None, "dense_ms": None}]
    assert sparse_cpu.chosen_layers_ms(table) == (3.0, 1)


def test_onnxruntime_missing_is_a_skipped_row(checkpoint, monkeypatch):
    monkeypatch.setattr(baselines, "onnxruntime_version", lambda: None)
    rows = runtime.benchmark_inference(checkpoint, (1,), iters=1, warmup=0, threads=1)
    skipped = [r for r in rows if r["backend"] == "onnxruntime"]
    assert len(skipped) == 1 and "not installed" in skipped[0]["skipped"]
    assert "speedup_vs_onnxruntime" not in next(r for r in rows if r["backend"] == "deploy")
    with pytest.raises(ValueError, match="baselines: expected names among"):
        runtime.benchmark_inference(checkpoint, (1,), baselines=("tensorrt",))


def test_a_slower_engine_is_warned_about_against_either_baseline(capsys):
    row = {"batch": 1, "backend": "deploy", "network": "folded", "engine": "sparse_cpu", "images_per_s": 10.0,
           "images_per_s_p20": 9.0, "images_per_s_p80": 11.0, "latency_ms": 100.0, "rounds": 5,
           "speedup_vs_dense-torch": 0.8, "speedup_vs_dense-torch_p20": 0.7, "speedup_vs_dense-torch_p80": 0.9,
           "speedup_vs_onnxruntime": 1.2, "speedup_vs_onnxruntime_p20": 1.1, "speedup_vs_onnxruntime_p80": 1.3}
    cli._print_bench_rows([row], layers=False)
    assert "deployed vs dense-torch: 0.80x (p20-p80 over 5 rounds: 0.70-0.90x)" in capsys.readouterr().out
    cli._warn_where_not_faster([row])
    assert capsys.readouterr().err == ("vpns bench-infer: warning: at batch 1 the deployed module is not faster "
                                       "than dense-torch (0.80x); see `--layers` for the per-layer decisions\n")
    cli._warn_where_not_faster([{**row, "speedup_vs_dense-torch": 1.3, "speedup_vs_onnxruntime": 0.9}])
    assert "not faster than onnxruntime (0.90x)" in capsys.readouterr().err
    cli._warn_where_not_faster([{**row, "speedup_vs_dense-torch": 1.3}])
    assert capsys.readouterr().err == ""


def test_json_output_warns_too_and_rows_say_where_and_how(checkpoint, capsys, monkeypatch):
    real = runtime.benchmark_inference

    def slower(*args, **kwargs):
        rows = real(*args, **kwargs)
        for row in rows:
            row["speedup_vs_dense-torch"] = 0.5  # as if the engine had lost
        return rows

    monkeypatch.setattr(runtime, "benchmark_inference", slower)
    torch.manual_seed(3)
    expected_draw = torch.rand(2)
    torch.manual_seed(3)
    threads = torch.get_num_threads()
    assert cli.main(["bench-infer", str(checkpoint), "--batch", "1", "--iters", "1", "--warmup", "0", "--threads",
                     "1", "--json", "--policy", "dense"]) == 0
    assert torch.equal(torch.rand(2), expected_draw)  # the caller's random stream is untouched
    assert torch.get_num_threads() == threads
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert "not faster than dense-torch (0.50x)" in captured.err
    for row in rows:
        if "skipped" not in row:
            assert row["cpu"] and row["date"].startswith("20")
        if row["backend"] == "onnxruntime" and "skipped" not in row:
            assert row["engine_settings"] == baselines.ONNXRUNTIME_SETTINGS
    deployed = [row for row in rows if row["backend"] == "deploy"]
    assert deployed
    for row in deployed:  # the vector kernel a sparse layer ran with; none under --policy dense
        assert "sparse_kernel_isa" not in row


def test_a_baseline_with_other_outputs_is_not_timed(checkpoint, monkeypatch):
    pytest.importorskip("onnxruntime")
    real = baselines.onnxruntime_runner

    def wrong_at_batch_two(network, example, threads=None):
        run, exporter = real(network, example, threads)
        return (lambda x: run(x) + (x.shape[0] == 2)), exporter  # right at the first batch size only

    monkeypatch.setattr(baselines, "onnxruntime_runner", wrong_at_batch_two)
    with pytest.raises(RuntimeError, match="onnxruntime's output differs by .* at batch 2; not benchmarking it"):
        runtime.benchmark_inference(checkpoint, (1, 2), iters=1, warmup=0, threads=1, policy="dense")


def test_baselines_run_the_network_the_engine_runs(tmp_path):
    path, _, _ = make_checkpoint(tmp_path / "c.pt", granularity="channel", density=0.5, prompt=False)
    rows = runtime.benchmark_inference(path, (1,), iters=1, warmup=0, threads=1, policy="dense",
                                       baselines=("dense-torch",))
    networks = {row["backend"]: row["network"] for row in rows}
    assert networks == {"deploy": "slim", "dense-torch": "slim"}


def test_interleaved_rounds_rotate_and_time_everyone():
    calls = []

    class Recorder(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, x):
            calls.append(self.name)
            return x

    times = runtime._interleaved_seconds({"a": Recorder("a"), "b": Recorder("b")}, torch.zeros(1), 4, 0)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert all(len(values) == 4 and min(values) >= 0 for values in times.values())


def test_a_batch_over_the_machines_memory_is_a_one_line_error(checkpoint, capsys, monkeypatch):
    """The kernel's out-of-memory killer ends a process without a word: a batch whose estimated peak exceeds the
    memory available is refused before it is allocated, naming the batch."""
    from vpns_fast import environment

    monkeypatch.setattr(environment, "available_memory_bytes", lambda: 64 << 20)  # 64 MiB
    with pytest.raises(MemoryError, match=r"batch 4096 needs about .* GiB .* 64 MiB are available"):
        runtime.benchmark_inference(checkpoint, (1, 4096), iters=1, warmup=0, baselines=())
    assert cli.main(["bench-infer", str(checkpoint), "--batch", "4096", "--iters", "1", "--warmup", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vpns bench-infer: error: out of memory (batch 4096 needs about") and "\n" not in err
    assert err.endswith("try a smaller --batch")
    monkeypatch.setattr(environment, "available_memory_bytes", lambda: None)  # unknown: not refused
    rows = runtime.benchmark_inference(checkpoint, (2,), iters=1, warmup=0, baselines=())
    assert rows and rows[0]["batch"] == 2


def test_no_winograd_reaches_the_deployed_module(checkpoint, capsys, monkeypatch):
    """``--no-winograd`` (bench-infer) and ``deploy(..., winograd=False)`` convert without Winograd: no layer is
    timed or run by it, and each eligible 3x3 layer's row says why."""
    from vpns_fast.deploy import runtime

    if not sparse_cpu.available()[0]:
        pytest.skip("the C++ extension is not built")
    seen = []
    real_deploy = runtime.deploy

    def recording_deploy(*args, **kwargs):
        seen.append(kwargs.get("winograd", True))
        return real_deploy(*args, **kwargs)

    monkeypatch.setattr(runtime, "deploy", recording_deploy)
    assert cli.main(["bench-infer", str(checkpoint), "--batch", "1", "--iters", "1", "--warmup", "0", "--threads",
                     "1", "--json", "--layers", "--no-winograd"]) == 0
    row = next(r for r in json.loads(capsys.readouterr().out) if r["backend"] == "deploy")
    assert False in seen and row["winograd"] is None
    assert all(d.get("dense_algorithm") != "Winograd" and d.get("winograd_ms") is None for d in row["decisions"])
    eligible = [d for d in row["decisions"] if d["type"] == "Conv2d" and d["weight_shape"][2:] == [3, 3]
                and d.get("dense_algorithm") is not None]
    assert all(d["winograd_note"] == "winograd=False" for d in eligible)
    module = real_deploy(checkpoint, winograd=False)
    assert not any(isinstance(m, sparse_cpu.WinogradConv2d) for m in module.modules())


def test_a_row_says_why_the_deployed_module_ran_without_a_plan(checkpoint, monkeypatch):
    from vpns_fast.deploy import call_plan

    monkeypatch.setattr(call_plan, "_ENABLED", {"on": False})
    (row,) = [r for r in runtime.benchmark_inference(checkpoint, (1,), iters=1, warmup=0, threads=1,
                                                     baselines=("dense-torch",)) if r["backend"] == "deploy"]
    if row["engine"] == "sparse_cpu":
        assert row["call_plan"] == "its traced graph (no compiled call plan: turned off (call_plan.set_call_plans))"
    else:  # no extension: no engine to plan for
        assert "call_plan" not in row

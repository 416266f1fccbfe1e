"""Per-epoch logs: OUT/metrics.csv (one row per epoch, kept exact across a kill and resume), the
TensorBoard and wandb loggers (same scalars, the prompt image, the final table; a missing package is a
one-line error before anything runs), the plain per-epoch line of --no-progress and the job's ETA."""
from __future__ import annotations

import contextlib
import csv
import importlib.machinery
import importlib.util
import io
import json
import math
import os
import re
import sys
import types

import pytest
import torch
from helpers import tiny_config

from vpns_fast import cli
from vpns_fast.training import run_files
from vpns_fast.training.loop import EpochProgress
from vpns_fast.training.metrics_log import CsvSink, JobClock, MetricsLog, format_duration
from vpns_fast.training.trainer import TwoStageTrainer, resume

EXPECTED_COLUMNS = ["run", "method", "density", "phase", "epoch", "epochs", "train_loss", "train_acc", "val_acc",
                    "val_acc_prompt", "test_acc", "test_acc_prompt", "threshold", "actual_density", "lr", "lr_prompt",
                    "images_per_s", "seconds"]
TIMING = ("images_per_s", "seconds")
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
# vpns: search 2 + finetune 1 epochs; hydra the same: six epochs in all
PRUNE = ["prune", "--dataset", "synthetic", "--limit", "32", "--batch-size", "32", "--search-epochs", "2",
         "--finetune-epochs", "1", "--method", "vpns,hydra", "--density", "0.5", "--deterministic", "--device", "cpu"]
LINE = re.compile(r"^\[(vpns|hydra) d=0\.5\] (search|finetune) (\d)/(\d) \| loss \d+\.\d{4} \| acc \d+\.\d\d% \| "
                  r"val acc \d+\.\d\d%( \(prompt \d+\.\d\d%\))? \| \d+\.\d s \| job ETA (\d+:\d\d:\d\d)$")


def read_metrics(out) -> tuple[list[str], list[dict]]:
    with open(os.path.join(out, "metrics.csv"), newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), list(reader)


@pytest.fixture(scope="module")
def cli_job(tmp_path_factory):
    """`vpns prune --no-progress` (with --logger tensorboard where it is installed): (out, stdout)."""
    out = str(tmp_path_factory.mktemp("metrics") / "job")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = cli.main([*PRUNE, "--no-progress", "--out", out, *(["--logger", "tensorboard"] if HAS_TENSORBOARD
                                                                   else [])])
    assert code == 0
    return out, stdout.getvalue()


def test_metrics_csv_has_one_row_per_epoch_with_every_column(cli_job):
    out, _ = cli_job
    header, rows = read_metrics(out)
    assert header == EXPECTED_COLUMNS
    assert [(r["run"], r["phase"], r["epoch"], r["epochs"]) for r in rows] == [
        ("vpns_d0.5", "search", "1", "2"), ("vpns_d0.5", "search", "2", "2"), ("vpns_d0.5", "finetune", "1", "1"),
        ("hydra_d0.5", "search", "1", "2"), ("hydra_d0.5", "search", "2", "2"), ("hydra_d0.5", "finetune", "1", "1")]
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)["runs"]
    for run in results:  # the same numbers as results.json's history, epoch by epoch
        mine = [r for r in rows if r["method"] == run["method"]]
        assert [float(r["val_acc"]) for r in mine] == [h["val_acc"] for h in run["history"]]
        assert [float(r["train_loss"]) for r in mine] == [h["train_loss"] for h in run["history"]]
        assert float(mine[-1]["actual_density"]) == pytest.approx(run["actual_density"])
        assert float(mine[-1]["test_acc"]) == run["last_test_acc"]
        assert all(float(r["images_per_s"]) > 0 and float(r["seconds"]) > 0 for r in mine)
    vpns = [r for r in rows if r["method"] == "vpns"]
    hydra = [r for r in rows if r["method"] == "hydra"]
    # search epochs evaluate no test split; the final phase does
    assert [r["test_acc"] == "" for r in vpns] == [True, True, False]
    # VPNs: one global threshold, Adam 1e-4 for the scores and the prompt in epoch 1, cosine-halved in epoch 2
    assert all(float(r["threshold"]) > 0 for r in vpns)
    assert [(float(r["lr"]), float(r["lr_prompt"])) for r in vpns[:2]] == [(1e-4, 1e-4), (5e-5, 5e-5)]
    assert float(vpns[2]["lr"]) == 0.01 and vpns[0]["val_acc_prompt"] != ""
    # HYDRA: per-layer thresholds (no single value) and no prompt
    assert all(r["threshold"] == "" and r["lr_prompt"] == "" and r["val_acc_prompt"] == "" for r in hydra)
    assert float(hydra[0]["lr"]) == 0.01


def test_no_progress_prints_exactly_one_plain_line_per_epoch(cli_job):
    _, stdout = cli_job
    lines = stdout.splitlines()
    assert len(lines) == 6, stdout
    matches = [LINE.match(line) for line in lines]
    assert all(matches), stdout
    assert [(m[1], m[2], m[3], m[4]) for m in matches] == [
        ("vpns", "search", "1", "2"), ("vpns", "search", "2", "2"), ("vpns", "finetune", "1", "1"),
        ("hydra", "search", "1", "2"), ("hydra", "search", "2", "2"), ("hydra", "finetune", "1", "1")]
    assert matches[-1][6] == "0:00:00"  # nothing left after the job's last epoch


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is in the test extras")
def test_tensorboard_logs_the_same_scalars_the_prompt_and_the_table(cli_job):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = cli_job
    events = EventAccumulator(os.path.join(out, "tensorboard"), size_guidance={"scalars": 0, "images": 0,
                                                                             "tensors": 0})
    events.Reload()
    _, rows = read_metrics(out)
    for run in ("vpns_d0.5", "hydra_d0.5"):
        mine = [r for r in rows if r["run"] == run]
        for column in ("train_loss", "val_acc", "actual_density", "lr"):
            logged = [(e.step, e.value) for e in events.Scalars(f"{run}/{column}")]
            assert logged == [(i + 1, pytest.approx(float(r[column]), rel=1e-6)) for i, r in enumerate(mine)]
    assert "hydra_d0.5/threshold" not in events.Tags()["scalars"]  # no shared threshold: nothing logged
    assert events.Tags()["images"] == ["vpns_d0.5/prompt"]  # HYDRA has no prompt
    (image,) = events.Images("vpns_d0.5/prompt")
    assert (image.width, image.height, image.step) == (32, 32, 3)
    (text,) = events.Tensors("results/text_summary")
    table = text.tensor_proto.string_val[0].decode()
    assert "test acc" in table and "hydra" in table and "vpns" in table


def test_a_kill_between_the_row_and_the_checkpoint_leaves_no_duplicate_row(cli_job, tmp_path, monkeypatch):
    """The row of search epoch 2 is written, then the job dies before last.pt: resume runs the epoch
    again, and its new row replaces the first; the file ends as the uninterrupted job's."""
    class Killed(BaseException):
        pass

    original, calls = run_files.RunCheckpoints.save_last, {"n": 0}

    def die_on_second_save(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Killed
        return original(self, *args, **kwargs)

    config = tiny_config(tmp_path / "job", search_epochs=2, finetune_epochs=1)
    monkeypatch.setattr(run_files.RunCheckpoints, "save_last", die_on_second_save)
    with pytest.raises(Killed):
        TwoStageTrainer(config).run()
    _, rows = read_metrics(tmp_path / "job")
    assert [(r["phase"], r["epoch"]) for r in rows] == [("search", "1"), ("search", "2")]
    monkeypatch.setattr(run_files.RunCheckpoints, "save_last", original)
    resume(str(tmp_path / "job"), progress=False)
    header, rows = read_metrics(tmp_path / "job")
    assert header == EXPECTED_COLUMNS
    assert [(r["phase"], r["epoch"]) for r in rows] == [("search", "1"), ("search", "2"), ("finetune", "1")]
    _, uninterrupted = read_metrics(cli_job[0])  # the same vpns run, never killed (bitwise on CPU)
    strip = [{k: v for k, v in r.items() if k not in TIMING} for r in uninterrupted if r["method"] == "vpns"]
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in rows] == strip


@pytest.mark.parametrize("logger", ["tensorboard", "wandb"])
def test_a_missing_logger_package_is_a_one_line_error_before_anything_runs(tmp_path, capsys, monkeypatch, logger):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == logger else real(name, *a))
    out = tmp_path / "job"
    assert cli.main([*PRUNE, "--no-progress", "--out", str(out), "--logger", logger]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == (f"vpns prune: error: --logger {logger}: needs the {logger} package "
                                    f"(pip install 'vpns_fast[{logger}]')")
    assert captured.out == "" and not out.exists()


def test_logger_names_are_checked(tmp_path, capsys):
    assert cli.main([*PRUNE, "--out", str(tmp_path / "a"), "--logger", "tensorbored"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "logger: unknown logger 'tensorbored'" in err
    with pytest.raises(ValueError, match="tensorboard writes its event files under out"):
        tiny_config(None, logger="tensorboard")
    config = tiny_config(tmp_path / "b", logger=["wandb", "tensorboard"])
    assert config.logger == ("wandb", "tensorboard")
    assert json.loads(json.dumps(config.to_dict()))["logger"] == ["wandb", "tensorboard"]  # in config.json
    assert tiny_config(tmp_path / "c", logger="none").logger == ()
    assert config.identity() == tiny_config(tmp_path / "b").identity()  # a presentation option


class FakeWandb(types.ModuleType):
    """Records what the wandb logger calls."""

    def __init__(self):
        super().__init__("wandb")
        self.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        self.calls: list = []
        fake = self

        class Run:
            def log(self, data):
                fake.calls.append(("log", data))

            def finish(self):
                fake.calls.append(("finish",))

        self.Settings = lambda **kwargs: ("settings", kwargs)
        self.Image = lambda array: ("image", array.shape, str(array.dtype))
        self.Table = lambda columns, data: ("table", columns, data)
        self.init = lambda **kwargs: fake.calls.append(("init", kwargs)) or Run()


def test_wandb_logs_the_same_scalars_offline_by_default(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    TwoStageTrainer(tiny_config(tmp_path / "job", logger="wandb")).run()
    (_, init), *logged, finish = fake.calls
    assert init["mode"] == "offline" and init["dir"] == str(tmp_path / "job") and init["config"]["logger"] == ["wandb"]
    assert finish == ("finish",)
    scalars = [data for _, data in logged if "vpns_d0.5/val_acc" in data]
    _, rows = read_metrics(tmp_path / "job")
    assert [d["vpns_d0.5/val_acc"] for d in scalars] == [float(r["val_acc"]) for r in rows]
    assert [d["vpns_d0.5/epoch_in_run"] for d in scalars] == [1.0, 2.0]
    images = [data["vpns_d0.5/prompt"] for _, data in logged if "vpns_d0.5/prompt" in data]
    assert images == [("image", (32, 32, 3), "uint8")]
    (table,) = [data["results"] for _, data in logged if "results" in data]
    assert table[0] == "table" and table[2][0][:2] == ["vpns", 0.5]

    fake.calls.clear()
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the user's choice wins
    TwoStageTrainer(tiny_config(tmp_path / "job2", logger="wandb", search_epochs=0, finetune_epochs=1)).run()
    assert fake.calls[0][1]["mode"] == "disabled"


def test_wandb_really_runs_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is an optional extra (heavy), not in the test extras")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    os.makedirs(tmp_path / "wandb-dir")
    out = tmp_path / "job"
    TwoStageTrainer(tiny_config(out, logger="wandb")).run()
    assert not (out / "wandb").exists()  # WANDB_DIR wins
    (run,) = [p for p in (tmp_path / "wandb-dir" / "wandb").iterdir() if p.name.startswith("offline-run-")]
    (records,) = run.glob("run-*.wandb")
    data = records.read_bytes()
    for column in ("train_loss", "val_acc", "threshold", "lr_prompt", "prompt"):
        assert f"vpns_d0.5/{column}".encode() in data
    (table,) = run.glob("files/media/table/results_*.table.json")
    assert json.loads(table.read_text())["data"][0][:2] == ["vpns", 0.5]


def test_progress_bar_shows_the_whole_jobs_eta(tmp_path, capsys):
    TwoStageTrainer(tiny_config(tmp_path / "job", progress=True, search_epochs=2)).run()
    captured = capsys.readouterr()
    assert "job_eta=" in captured.err
    assert "[vpns d=0.5] test acc" in captured.out and "search 1/2 |" not in captured.out  # bars, not lines


def test_job_clock_counts_every_phase_of_every_run_left():
    clock = JobClock()
    assert clock.eta() is None  # nothing measured
    clock.plan("a", [(2, 10), (3, 5)])   # 20 + 15 steps
    clock.plan("b", [(4, 5)])            # 20 steps
    clock.start("a", 0, 1, done=False)   # resumed after its first epoch: 10 + 15 left
    assert clock.eta(steps_into_epoch=5, epoch_seconds=1.0) == pytest.approx((25 + 20 - 5) * 0.2)
    clock.epoch_done("a", 0, seconds=2.0)  # 10 steps in 2 s: 0.2 s per step
    assert clock.eta() == pytest.approx((15 + 20) * 0.2)
    clock.start("b", 0, 0, done=True)
    assert clock.eta() == pytest.approx(15 * 0.2)
    assert clock.progress_eta(0, 0.0) == "0:00:03" and format_duration(3725.4) == "1:02:05"


def test_epoch_progress_bar_carries_the_job_eta():
    asked = []

    def job_eta(steps, seconds):
        asked.append(steps)
        return "0:01:00"

    bar = EpochProgress("run", steps=20, world_size=1, job_eta=job_eta, steps_per_batch=2)
    for i in range(20):
        bar.update(torch.tensor([1.0 * (i + 1), 1.0]), seen=i + 1)
    assert asked == [20, 40] and bar.bar.postfix.endswith("job_eta=0:01:00")
    bar.close()


def test_only_rank_zero_writes_and_a_foreign_metrics_file_is_refused(tmp_path):
    config = tiny_config(tmp_path, logger="tensorboard")
    assert MetricsLog.open(config, is_main=False, resuming=False).sinks == []
    assert not any(tmp_path.iterdir())
    (tmp_path / "metrics.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="metrics.csv: not a metrics file"):
        CsvSink(str(tmp_path), resuming=True)
    sink = CsvSink(str(tmp_path), resuming=False)  # a new job replaces it
    sink.epoch({"run": "r", "phase": "search", "epoch": 1, "threshold": -math.inf}, step=1)
    _, rows = read_metrics(tmp_path)
    assert rows[0]["threshold"] == "-inf" and rows[0]["val_acc"] == ""


def test_dense_pretraining_epochs_get_rows_and_plain_lines(tmp_path, capsys):
    import csv

    from vpns_fast.training.trainer import TwoStageTrainer

    out = tmp_path / "job"
    TwoStageTrainer(tiny_config(out, pretrain_epochs=2, search_epochs=1, finetune_epochs=1)).run()
    with open(out / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    pretrain = [row for row in rows if row["phase"] == "pretrain"]
    assert [(row["run"], row["epoch"], row["epochs"]) for row in pretrain] == [("dense", "1", "2"), ("dense", "2", "2")]
    assert all(float(row["train_loss"]) > 0 and row["val_acc"] == "" and float(row["lr"]) > 0 for row in pretrain)
    assert len(rows) == 2 + 2  # then one row per epoch of the run's two phases
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[dense] pretrain")]
    assert [line.split(" | ")[0] for line in lines] == ["[dense] pretrain 1/2", "[dense] pretrain 2/2"]

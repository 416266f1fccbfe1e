"""What a job guarantees the user when things go wrong: a folder that is not a vpns run is not
overwritten, a diverging loss stops the job with its checkpoints kept, damaged checkpoints are caught,
and kills, failures and concurrent runs leave a folder that resumes or reruns cleanly."""
import json
import os
import warnings

import pytest
import torch
from helpers import tiny_config

from vpns_fast.cli import main
from vpns_fast.files import FileLockedError, atomic_write, file_lock
from vpns_fast.models import build_model
from vpns_fast.pruning import checkpoint as checkpoint_module
from vpns_fast.pruning.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from vpns_fast.pruning.masking import sparsify
from vpns_fast.training import dense as dense_module
from vpns_fast.training import trainer as trainer_module
from vpns_fast.training.loop import TrainingDivergedError
from vpns_fast.training.run_files import RunInUseError, run_folder_lock
from vpns_fast.training.trainer import TrainConfig, TwoStageTrainer, resume


def tiny(out=None, **overrides) -> TrainConfig:
    return tiny_config(out, **{"limit": 16, "batch_size": 16, "methods": ("dense",), **overrides})


PRUNE_ARGS = ["--dataset", "synthetic", "--limit", "16", "--batch-size", "16", "--method", "dense",
              "--epochs", "1", "--device", "cpu", "--no-progress"]


# ----------------------------------------------------------------------------- 1. a folder that is not a run

def test_prune_refuses_an_existing_folder_that_is_not_a_run(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "results.json").write_text("my own results")
    assert main(["prune", *PRUNE_ARGS, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err and "not a vpns run" in err
    assert (out / "results.json").read_text() == "my own results"
    assert sorted(os.listdir(out)) == ["results.json"]
    # an empty folder is fine, and --force writes into a foreign one
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["prune", *PRUNE_ARGS, "--out", str(empty)]) == 0
    assert main(["prune", *PRUNE_ARGS, "--out", str(out), "--force"]) == 0
    assert json.loads((out / "results.json").read_text())["runs"][0]["method"] == "dense"


# ----------------------------------------------------------------------------- 2. divergence

def test_a_diverging_loss_stops_the_job_and_keeps_the_last_finite_checkpoint(tmp_path, monkeypatch, capsys):
    original = trainer_module.train_epoch
    calls = {"n": 0}

    def poison_second_epoch(network, *args, **kwargs):  # one process: the network itself
        calls["n"] += 1
        if calls["n"] == 2:
            with torch.no_grad():
                network.model.fc.bias.fill_(float("nan"))
        return original(network, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "train_epoch", poison_second_epoch)
    with pytest.raises(TrainingDivergedError) as error:
        TwoStageTrainer(tiny(tmp_path, methods=("omp",), finetune_epochs=3)).run()
    last = os.path.join(str(tmp_path), "runs", "omp_d0.5", "last.pt")
    assert str(error.value).startswith("training diverged: the loss became NaN at run omp d=0.5, phase finetune, "
                                       "epoch 2/3, step 1 of 1")
    assert last in str(error.value)
    kept = load_checkpoint(last)
    assert kept["meta"]["training"]["state"]["epoch"] == 1  # the epoch before, every tensor finite
    assert all(torch.isfinite(v).all() for v in kept["state_dict"].values() if v.is_floating_point())
    assert not os.path.exists(os.path.join(str(tmp_path), "results.json"))
    monkeypatch.setattr(trainer_module, "train_epoch", original)
    # a learning rate that diverges, from the CLI: exit 2, one line
    assert main(["prune", *PRUNE_ARGS, "--limit", "64", "--batch-size", "8", "--method", "omp", "--lr",
                 "finetune_weights=1e6", "--out", str(tmp_path / "cli")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "diverged" in err and "phase finetune, epoch 1/1" in err


def test_results_json_is_strict_json(tmp_path, monkeypatch):
    original = trainer_module.TwoStageTrainer._result_row

    def with_nan(self, run, wall):
        return dict(original(self, run, wall), wall_s=float("nan"), train_s=float("inf"))

    monkeypatch.setattr(trainer_module.TwoStageTrainer, "_result_row", with_nan)
    TwoStageTrainer(tiny(tmp_path)).run()
    text = (tmp_path / "results.json").read_text()
    row = json.loads(text, parse_constant=lambda name: pytest.fail(f"bare {name} in results.json"))["runs"][0]
    assert row["wall_s"] is None and row["train_s"] is None


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_non_finite_or_negative_learning_rates_are_refused(value, capsys):
    with pytest.raises(ValueError, match="lr of finetune_weights"):
        tiny(optimizers={"finetune_weights": {"lr": float(value)}})
    assert main(["prune", *PRUNE_ARGS, "--lr", f"finetune_weights={value}"]) == 2
    assert "finetune_weights" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 5. checkpoint integrity

@pytest.fixture
def saved_checkpoint(tmp_path):
    model = sparsify(build_model("small_resnet", num_classes=10), granularity="unstructured")
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, model_name="small_resnet", model_kwargs={"num_classes": 10}, meta={"a": 1.5})
    return path


def test_checkpoint_input_size_is_the_prompts_network_input(tmp_path):
    """With a prompt the network's input is the prompt's output: save_checkpoint stores that size when none is
    given and refuses one that contradicts it, by name (it was stored as given, misleading every reader)."""
    from vpns_fast.nn.prompts import build_prompt

    model = sparsify(build_model("small_resnet", num_classes=10), granularity="unstructured")
    prompt = build_prompt("pad", 40, 32, 4, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    save_checkpoint(tmp_path / "a.pt", model, model_name="small_resnet", model_kwargs={"num_classes": 10},
                    prompt=prompt)
    assert load_checkpoint(tmp_path / "a.pt")["input_size"] == [3, 40, 40]
    save_checkpoint(tmp_path / "b.pt", model, model_name="small_resnet", model_kwargs={"num_classes": 10},
                    prompt=prompt, input_size=(3, 40, 40))
    with pytest.raises(ValueError, match=r"input_size: expected the network input the prompt gives, \(3, 40, 40\), "
                                         r"got \(3, 32, 32\)"):
        save_checkpoint(tmp_path / "c.pt", model, model_name="small_resnet", model_kwargs={"num_classes": 10},
                        prompt=prompt, input_size=(3, 32, 32))
    assert not (tmp_path / "c.pt").exists()


def _flip_a_tensor_byte(path):
    payload = torch.load(path, weights_only=True)
    name = next(k for k, v in payload["state_dict"].items() if v.is_floating_point() and v.numel() > 100)
    data = bytearray(path.read_bytes())
    needle = payload["state_dict"][name].reshape(-1)[:4].numpy().tobytes()
    at = data.find(needle)
    assert at >= 0
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_flipped_byte_in_a_checkpoint_is_caught(saved_checkpoint, capsys):
    load_checkpoint(saved_checkpoint)  # intact
    _flip_a_tensor_byte(saved_checkpoint)
    with pytest.raises(CheckpointError, match=f"{saved_checkpoint}.*integrity"):
        load_checkpoint(saved_checkpoint)
    assert main(["report", str(saved_checkpoint)]) == 2
    assert "integrity" in capsys.readouterr().err


def test_a_changed_meta_value_is_caught(saved_checkpoint):
    payload = torch.load(saved_checkpoint, weights_only=True)
    payload["meta"]["a"] = 2.5
    torch.save(payload, saved_checkpoint)
    with pytest.raises(CheckpointError, match="integrity"):
        load_checkpoint(saved_checkpoint)


def test_checkpoints_without_a_checksum_load_with_one_warning(saved_checkpoint, tmp_path, monkeypatch):
    payload = torch.load(saved_checkpoint, weights_only=True)
    del payload["sha256"]
    old = tmp_path / "old.pt"
    torch.save(payload, old)
    monkeypatch.setattr(checkpoint_module, "_warned_unchecked", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_checkpoint(old)
        load_checkpoint(old)
    assert [str(w.message) for w in caught if "sha256" in str(w.message)] == [
        f"{old} has no sha256 (written by an older vpns_fast): loaded without an integrity check"]
    assert sorted(loaded["state_dict"]) == sorted(payload["state_dict"])


# ----------------------------------------------------------------------------- 8. resume and leftovers

class Interrupted(Exception):
    pass


def test_resume_and_the_next_save_sweep_partial_writes(tmp_path, monkeypatch):
    run = tmp_path / "runs" / "dense_d1"
    original = trainer_module.train_epoch
    calls = {"n": 0}

    def interrupt(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:  # a save killed midway before this epoch: its save sweeps it
            run.mkdir(parents=True, exist_ok=True)
            (run / ".tmp-killedlast.pt").write_bytes(b"partial")
        if calls["n"] == 2:
            assert not (run / ".tmp-killedlast.pt").exists()
            raise Interrupted
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "train_epoch", interrupt)
    with pytest.raises(Interrupted):
        TwoStageTrainer(tiny(tmp_path, finetune_epochs=2)).run()
    monkeypatch.setattr(trainer_module, "train_epoch", original)
    leftovers = [tmp_path / ".tmp-abcresults.json", run / ".tmp-xyzlast.pt"]
    for path in leftovers:
        path.write_bytes(b"partial")
    resume(str(tmp_path), progress=False)
    assert not any(p.exists() for p in leftovers)


def test_a_kill_during_pretraining_resumes_bitwise(tmp_path, monkeypatch):
    settings = dict(pretrain_epochs=3, search_epochs=0, finetune_epochs=1)
    reference = TwoStageTrainer(tiny(tmp_path / "reference", **settings)).run()
    original = dense_module.train_epoch
    calls = {"n": 0}

    def interrupt(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Interrupted
        return original(*args, **kwargs)

    monkeypatch.setattr(dense_module, "train_epoch", interrupt)
    with pytest.raises(Interrupted):
        TwoStageTrainer(tiny(tmp_path / "killed", **settings)).run()
    assert os.path.exists(tmp_path / "killed" / "dense-pretrain.pt")
    counted = {"n": 0}

    def count(*args, **kwargs):
        counted["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(dense_module, "train_epoch", count)
    resumed = resume(str(tmp_path / "killed"), progress=False)
    assert counted["n"] == 1  # only the epoch the kill interrupted
    assert not os.path.exists(tmp_path / "killed" / "dense-pretrain.pt")
    a = torch.load(tmp_path / "reference" / "dense.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "dense.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    timing = ("wall_s", "train_s", "images_per_s")
    assert [{k: v for k, v in r.items() if k not in timing} for r in resumed] == \
        [{k: v for k, v in r.items() if k not in timing} for r in reference]


def test_a_job_that_fails_loading_its_data_leaves_no_config(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["prune", *PRUNE_ARGS, "--dataset", "cifar10", "--data-dir", str(tmp_path / "nothing"),
                 "--out", str(out)]) == 2
    capsys.readouterr()
    assert not (out / "config.json").exists()
    assert main(["prune", *PRUNE_ARGS, "--out", str(out)]) == 0  # the corrected rerun


def test_a_second_process_on_the_same_folder_is_refused(tmp_path, capsys):
    TwoStageTrainer(tiny(tmp_path)).run()
    with run_folder_lock(str(tmp_path), is_main=True):  # the folder's lock, as another job holds it
        with pytest.raises(RunInUseError, match=f"{tmp_path} is in use"):
            resume(str(tmp_path), progress=False)
        assert main(["resume", str(tmp_path), "--no-progress"]) == 2
        assert "in use" in capsys.readouterr().err
    resume(str(tmp_path), progress=False)  # released


def test_file_lock_without_waiting(tmp_path):
    target = tmp_path / "table.json"
    with file_lock(target):
        with pytest.raises(FileLockedError, match="held by another process"):
            with file_lock(target, wait=False):
                pass
    with file_lock(target, wait=False):
        atomic_write(target, lambda f: f.write(b"{}"))


def test_a_lock_taken_on_a_removed_lock_file_is_taken_again(tmp_path, monkeypatch):
    """A failed job removes the folder it made, lock file included, while holding the lock (an outside review found
    the removal racing a second job). A job that opened the lock file before it was removed and locks it after holds
    a lock on a file no one else sees: file_lock locks the file the path names instead, so a third job is refused."""
    import fcntl

    target = tmp_path / "run" / ".vpns"
    lock_path = str(target) + ".lock"
    real_flock, calls = fcntl.flock, []

    def flock_after_removal(fd, operation):
        calls.append(fd)
        if len(calls) == 1:  # the holder removes the lock file and its folder between this open and this lock
            os.unlink(lock_path)
            os.rmdir(tmp_path / "run")
        return real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock_after_removal)
    with file_lock(target, wait=False):
        monkeypatch.setattr(fcntl, "flock", real_flock)
        assert os.path.exists(lock_path) and len(calls) == 2
        with pytest.raises(FileLockedError):
            with file_lock(target, wait=False):
                pass


def test_duplicate_densities_are_refused(capsys):
    with pytest.raises(ValueError, match="densities: 0.3 given more than once"):
        tiny(methods=("omp",), densities=(0.3, 0.3))
    assert main(["prune", *PRUNE_ARGS, "--method", "omp", "--density", "0.3,0.3"]) == 2
    assert "0.3 given more than once" in capsys.readouterr().err

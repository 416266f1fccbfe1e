"""`vpns prune --config FILE`: the keys of a run's config.json, checked against TrainConfig's fields and types;
defaults < file < flags given on the command line; a finished run's config.json repeats the run exactly."""
from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import torch

from vpns_fast.cli import main
from vpns_fast.pruning.checkpoint import load_checkpoint
from vpns_fast.training import trainer as trainer_module
from vpns_fast.training.config import TrainConfig
from vpns_fast.training.config_file import config_from_file, field_types, read_config_file

TINY = ["--dataset", "synthetic", "--limit", "32", "--batch-size", "32", "--epochs", "1", "--density", "0.5",
        "--no-progress", "--device", "cpu"]
TIMING = ("wall_s", "train_s", "images_per_s")


@pytest.fixture
def captured(monkeypatch):
    """`vpns prune` builds its TrainConfig and hands it to this stand-in instead of training."""
    configs = []

    class Recorder:
        def __init__(self, config, force=False):
            configs.append(config)

        def run(self):
            return []

    monkeypatch.setattr(trainer_module, "TwoStageTrainer", Recorder)
    return configs


def write(path, data) -> str:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def test_rerunning_config_json_with_the_deterministic_flag(tmp_path):
    """The issue's command: `vpns prune --config OUT1/config.json --out OUT2 --deterministic`."""
    out1, out2 = tmp_path / "one", tmp_path / "two"
    assert main(["prune", *TINY, "--deterministic", "--out", str(out1)]) == 0
    assert main(["prune", "--config", str(out1 / "config.json"), "--out", str(out2), "--deterministic"]) == 0
    configs = [json.loads((out / "config.json").read_text()) for out in (out1, out2)]
    assert configs[1] == {**configs[0], "out": str(out2)}
    results = [json.loads((out / "results.json").read_text())["runs"] for out in (out1, out2)]
    strip = [[{k: v for k, v in row.items() if k not in TIMING} for row in runs] for runs in results]
    assert strip[0] == strip[1]
    assert strip[0][0]["history"] and strip[0][0]["test_acc"] is not None
    best = [load_checkpoint(out / "runs" / "vpns_d0.5" / "best.pt") for out in (out1, out2)]
    assert sorted(best[0]["state_dict"]) == sorted(best[1]["state_dict"])
    assert [k for k, v in best[0]["state_dict"].items() if not torch.equal(v, best[1]["state_dict"][k])] == []
    assert torch.equal(best[0]["prompt"]["program"], best[1]["prompt"]["program"])


def test_flags_given_override_the_file_and_defaults_do_not(tmp_path, captured):
    settings = {"dataset": "synthetic", "batch_size": 16, "seed": 3, "search_epochs": 2, "finetune_epochs": 4,
                "split_seed": 5, "val_fraction": 0.2, "densities": [0.5, 0.2], "progress": True,
                "optimizers": {"finetune_weights": {"lr": 0.05}}, "model_kwargs": {"width": 8}, "device": "cpu"}
    path = write(tmp_path / "c.json", settings)
    assert main(["prune", "--config", path]) == 0
    config = captured[-1]
    assert (config.batch_size, config.seed, config.search_epochs, config.finetune_epochs) == (16, 3, 2, 4)
    assert (config.split_seed, config.val_fraction, config.densities) == (5, 0.2, (0.5, 0.2))
    assert config.optimizers["finetune_weights"]["lr"] == 0.05 and config.progress is True
    assert config.protocol == "release" and config.methods == ("vpns",)  # not in the file: TrainConfig's defaults

    assert main(["prune", "--config", path, "--seed", "9", "--batch-size", "256", "--epochs", "1", "--no-progress",
                 "--lr", "search_scores=0.5", "--model-arg", "depth=2", "--density", "0.1", "--out",
                 str(tmp_path / "o")]) == 0
    config = captured[-1]
    assert (config.seed, config.batch_size) == (9, 256)  # 256 is the flag's default, but given: it wins
    assert (config.search_epochs, config.finetune_epochs, config.progress) == (1, 1, False)
    assert config.optimizers["search_scores"]["lr"] == 0.5 and config.optimizers["finetune_weights"]["lr"] == 0.05
    assert config.model_kwargs == {"width": 8, "depth": 2} and config.densities == (0.1,)
    assert (config.split_seed, config.out) == (5, str(tmp_path / "o"))
    assert config.val_fraction == 0.2  # the file's: neither val flag given
    assert main(["prune", "--config", path, "--val-fraction", "0", "--split-seed", "2"]) == 0
    assert (captured[-1].split_seed, captured[-1].val_fraction) == (2, 0.0)


def test_the_val_split_flags_reach_the_run(tmp_path, captured):
    assert main(["prune", *TINY, "--out", str(tmp_path / "a")]) == 0
    assert (captured[-1].val_fraction, captured[-1].split_seed) == (0.1, 0)  # TrainConfig's defaults
    assert main(["prune", *TINY, "--val-fraction", "0.25", "--split-seed", "4", "--out", str(tmp_path / "b")]) == 0
    assert (captured[-1].val_fraction, captured[-1].split_seed) == (0.25, 4)


def test_yaml_gives_the_same_config_as_json(tmp_path):
    pytest.importorskip("yaml")
    text = "dataset: synthetic\nbatch_size: 16\ndensities: [0.5, 0.2]\noptimizers:\n  search_scores: {lr: 0.001}\n"
    from_yaml = config_from_file(write(tmp_path / "c.yaml", text))
    from_json = config_from_file(write(tmp_path / "c.json", {"dataset": "synthetic", "batch_size": 16,
                                                              "densities": [0.5, 0.2],
                                                              "optimizers": {"search_scores": {"lr": 0.001}}}))
    assert from_yaml == from_json and from_yaml.batch_size == 16


def test_one_method_or_density_may_be_given_bare(tmp_path):
    """As TrainConfig takes them (an outside review: the file refused "methods": "vpns" that the class accepts)."""
    config = config_from_file(write(tmp_path / "c.json", {"dataset": "synthetic", "methods": "omp", "densities": 0.2}))
    assert (config.methods, config.densities) == (("omp",), (0.2,))
    values = read_config_file(write(tmp_path / "c.yaml", "methods: vpns\ndensities: 1\n"))
    assert (values["methods"], values["densities"]) == (("vpns",), (1,))


def test_the_keys_are_the_dataclass_fields(tmp_path):
    """Derived from TrainConfig, so a field added to it is accepted with no change here (logger, say)."""
    assert list(field_types()) == [f.name for f in dataclasses.fields(TrainConfig)]
    everything = TrainConfig(dataset="synthetic", out=str(tmp_path / "o")).to_dict()
    values = read_config_file(write(tmp_path / "all.json", everything))
    assert set(values) == set(everything) and values["methods"] == ("vpns",)
    assert config_from_file(str(tmp_path / "all.json")) == TrainConfig(**values)


@pytest.mark.parametrize(("content", "expected"), [
    ({"batchsize": 16}, r"unknown key 'batchsize' \(did you mean 'batch_size'\?\)"),
    ({"zzzz": 1}, r"unknown key 'zzzz' \(the keys are the fields of TrainConfig: dataset, .*, out\)"),
    ({"batch_size": "16"}, r"batch_size: expected an integer, got a string '16'"),
    ({"deterministic": 1}, r"deterministic: expected true or false, got an integer 1"),
    ({"limit": 2.5}, r"limit: expected an integer or null, got a number 2.5"),
    ({"densities": "0.1"}, r"densities: expected a number or a list of numbers, got a string '0.1'"),
    ({"methods": ["vpns", 3]}, r"methods: expected a string or a list of strings"),
    ({"methods": ["nope"]}, r"methods: expected methods among vpns, .*, got 'nope'"),
    ({"model_kwargs": [1]}, r"model_kwargs: expected an object, got a list"),
    # TrainConfig's own check, named with the file (the file's reader had a copy of it)
    ({"optimizers": {"search_scores": 0.1}}, r"error: --config .*c.json: optimizers: search_scores: expected a dict "
                                             r"such as \{'name': 'sgd', 'lr': 0.01\}, got 0.1$"),
    ({"model": {"python_object": "mine.Net"}}, r"model: the run was given its model as a Python object \(mine.Net\)"),
    ({"dataset": "bogus"}, r"dataset: unknown dataset 'bogus'; expected one of digits"),
    ({"density": [0.5]}, r"unknown key 'density' \(did you mean 'densities'\?\)"),
    ([1, 2], r"expected an object of settings .*, got a list"),
    ("{not json", r"not valid JSON \(Expecting property name"),
    ({"limit": 0}, r"limit: expected an integer >= 1"),
])
def test_a_bad_file_is_one_line_naming_the_key(tmp_path, capsys, captured, content, expected):
    import re

    path = write(tmp_path / "c.json", content)
    assert main(["prune", "--config", path]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vpns prune: error: ")
    assert re.search(expected, err), err
    assert captured == []


def test_missing_folder_and_yaml_without_pyyaml(tmp_path, capsys, monkeypatch):
    cases = [(str(tmp_path / "nope.json"), "nope.json: no such file"),
             (str(tmp_path), "is a folder; expected a settings file")]
    for path, expected in cases:
        assert main(["prune", "--config", path]) == 2
        assert expected in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "yaml", None)  # `import yaml` raises ImportError
    path = write(tmp_path / "c.yml", "batch_size: 16\n")
    assert main(["prune", "--config", path]) == 2
    err = capsys.readouterr().err
    assert "reading YAML needs PyYAML (pip install pyyaml)" in err and err.count("\n") == 1


def test_a_flag_replaces_a_bad_device_of_the_file(tmp_path, captured):
    """The file's device is checked only when no flag replaces it (a GPU run's config rerun on a CPU)."""
    path = write(tmp_path / "c.json", {"device": "cuda:7", "dataset": "synthetic"})
    if not torch.cuda.is_available():
        assert main(["prune", "--config", path]) == 2
    assert main(["prune", "--config", path, "--device", "cpu"]) == 0
    assert captured[-1].device == "cpu"


def _image_folder(root, images_per_class: int) -> str:
    """An ImageFolder dataset of two classes with ``images_per_class`` training images each."""
    from PIL import Image

    for split, count in (("train", images_per_class), ("test", 1)):
        for index, name in enumerate(("cat", "dog")):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (8, 8), (90 * index, 8 * i, 0)).save(root / split / name / f"{i}.png")
    return str(root)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_the_data_stage_names_the_file_where_the_file_set_the_setting(tmp_path, capsys):
    """Refusals of the data stage (the dataset's files missing under data_dir, a val fraction that leaves no val
    image) named --data-dir and --val-fraction, flags a config file's user had not given: named as TrainConfig's
    refusals are, by the config file's field where the file set it, by the flag where a flag did."""
    common = ["--model", "small_resnet", "--input-size", "8", "--epochs", "1", "--method", "omp", "--density", "0.5",
              "--device", "cpu", "--no-progress"]
    path = write(tmp_path / "c.json", {"dataset": "imagefolder", "data_dir": str(tmp_path / "nothing")})
    assert main(["prune", "--config", path, *common, "--out", str(tmp_path / "a")]) == 2
    err = _one_line_error(capsys)
    assert f"error: --config {path}: data_dir: ImageFolder dataset not found in {tmp_path / 'nothing'}" in err, err
    assert "--data-dir" not in err

    data = _image_folder(tmp_path / "data", 4)  # 8 training images: a share of 0.05 holds out none
    assert main(["prune", "--config", path, "--data-dir", data, "--val-fraction", "0.05", *common, "--out",
                 str(tmp_path / "b")]) == 2
    assert "error: --val-fraction: 0.05 of the 8 training images rounds to no val image" in _one_line_error(capsys)
    path = write(tmp_path / "c.json", {"dataset": "imagefolder", "data_dir": data, "val_fraction": 0.05})
    assert main(["prune", "--config", path, *common, "--out", str(tmp_path / "c")]) == 2
    err = _one_line_error(capsys)
    assert f"error: --config {path}: val_fraction: 0.05 of the 8 training images rounds to no val image" in err
    assert "--val-fraction" not in err
    assert main(["prune", "--config", path, "--data-dir", str(tmp_path / "nothing"), *common, "--out",
                 str(tmp_path / "d")]) == 2  # the flag replaces the file's folder: the flag is named
    assert "error: --data-dir: ImageFolder dataset not found" in _one_line_error(capsys)
    assert not any((tmp_path / name).exists() for name in "abcd")  # refused before anything was written


def test_a_num_classes_that_is_not_the_named_datasets_is_refused(tmp_path, capsys):
    """num_classes is for datasets passed as Dataset objects: beside a named dataset (or a DataSplits) a count
    other than the dataset's had been ignored without a word."""
    from vpns_fast.data import load_dataset
    from vpns_fast.errors import SettingError
    from vpns_fast.training.loaders import load_job_data

    path = write(tmp_path / "c.json", {"dataset": "synthetic", "num_classes": 100, "limit": 16})
    assert main(["prune", "--config", path, "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "a")]) == 2
    err = _one_line_error(capsys)
    assert (f"error: --config {path}: num_classes: the dataset synthetic has 10 classes, got 100; leave num_classes "
            "out (it is for a dataset passed as Dataset objects)") in err, err
    assert not (tmp_path / "a").exists()

    with pytest.raises(SettingError, match="num_classes: the dataset digits has 10 classes, got 100") as info:
        load_job_data(TrainConfig(dataset="digits", num_classes=100, limit=8))
    assert info.value.field == "num_classes"
    splits = load_dataset("synthetic", image_size=8, limit=8)
    with pytest.raises(SettingError, match="the dataset synthetic has 10 classes, got 3"):
        load_job_data(TrainConfig(dataset=splits, num_classes=3, input_size=8))
    assert load_job_data(TrainConfig(dataset="digits", num_classes=10, limit=8)).num_classes == 10  # its own count
    # a run started before the check (the count ignored) resumes as it started
    assert load_job_data(TrainConfig(dataset="digits", num_classes=100, limit=8), resuming=True).num_classes == 10


def test_a_bad_optimizer_group_of_the_file_is_refused_once_by_trainconfig(tmp_path, capsys):
    """The file's reader had its own copy of TrainConfig's check of a group's object: one check, named with the file
    where the file set the group, with the flag where a flag did."""
    path = write(tmp_path / "c.json", {"dataset": "synthetic", "optimizers": {"search_scores": [0.1]}})
    assert main(["prune", "--config", path]) == 2
    assert (f"error: --config {path}: optimizers: search_scores: expected a dict such as {{'name': 'sgd', 'lr': "
            "0.01}, got [0.1]") in _one_line_error(capsys)
    path = write(tmp_path / "c.json", {"dataset": "synthetic", "optimizers": {"search_scores": {"lr": 0.1}}})
    assert main(["prune", "--config", path, "--lr", "finetune_weights=-1"]) == 2
    assert "error: --lr: lr of finetune_weights: expected a finite number >= 0, got -1.0" in _one_line_error(capsys)

"""What a file from someone else says is checked before it is used. A file records its network by name, and a
factory name ('package.module:factory') is code that rebuilding the network imports and runs. A crafted checkpoint
naming 'os:system' ran a shell command when `vpns report` read it (an outside review, 2026-12-06). Files may name
only factories this process was itself told to build, or ones the user lists in VPNS_TRUSTED_FACTORIES; anything
else is refused in one line, before any of its code runs. Edited input sizes and label mappings are refused too."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import vpns_fast as V
from vpns_fast import models
from vpns_fast.cli import main
from vpns_fast.deploy.export import _write_safetensors, read_export
from vpns_fast.models import build_model
from vpns_fast.pruning.checkpoint import load_checkpoint, model_from_checkpoint, payload_sha256, save_checkpoint
from vpns_fast.training.config import TrainConfig


@pytest.fixture
def nothing_trusted(monkeypatch):
    """A process that has built no factory by name, and no VPNS_TRUSTED_FACTORIES."""
    monkeypatch.setattr(models, "_FACTORIES_NAMED_HERE", set())
    monkeypatch.delenv(models.TRUSTED_FACTORIES_VARIABLE, raising=False)


def checkpoint_naming(path, name: str, kwargs: dict):
    """A valid checkpoint, its model record then replaced by ``name`` / ``kwargs``, its checksum made again (as
    anyone can)."""
    model = V.sparsify(build_model("small_resnet", num_classes=10), "unstructured")
    save_checkpoint(path, model, model_name="small_resnet", model_kwargs={"num_classes": 10}, input_size=(3, 32, 32))
    payload = load_checkpoint(path)
    payload["model"] = {"name": name, "kwargs": kwargs, "class": "x"}
    payload["sha256"] = payload_sha256(payload)
    torch.save(payload, path)
    return path


def one_line_refusal(capsys, command: str, name: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"vpns {command}: error: ") and "\n" not in err and "Traceback" not in err, err
    assert f"by the factory {name!r}" in err and "VPNS_TRUSTED_FACTORIES" in err, err
    return err


@pytest.mark.parametrize("command", ["report", "export", "infer"])
def test_a_checkpoint_naming_a_shell_command_runs_nothing(tmp_path, capsys, nothing_trusted, command):
    marker = tmp_path / "ran"
    path = checkpoint_naming(tmp_path / "crafted.pt", "os:system", {"command": f"touch {marker}"})
    Image.new("RGB", (32, 32)).save(tmp_path / "img.png")
    argv = {"report": ["report", str(path)],
            "export": ["export", str(path), "--format", "dense", "--out", str(tmp_path / "x.safetensors")],
            "infer": ["infer", str(path), str(tmp_path / "img.png")]}[command]
    assert main(argv) == 2
    one_line_refusal(capsys, command, "os:system")
    assert not marker.exists()


def test_an_export_naming_a_shell_command_runs_nothing(tmp_path, capsys, nothing_trusted):
    marker = tmp_path / "ran"
    good = checkpoint_naming(tmp_path / "good.pt", "small_resnet", {"num_classes": 10})
    V.export(str(good), "dense", tmp_path / "good.safetensors")
    tensors, meta = read_export(tmp_path / "good.safetensors")
    kind = meta.pop("kind")
    meta["model"] = {"name": "subprocess:getoutput", "kwargs": {"cmd": f"touch {marker}"}}
    _write_safetensors(kind, tensors, meta, tmp_path / "crafted.safetensors", True)
    Image.new("RGB", (32, 32)).save(tmp_path / "img.png")
    assert main(["infer", str(tmp_path / "crafted.safetensors"), str(tmp_path / "img.png")]) == 2
    one_line_refusal(capsys, "infer", "subprocess:getoutput")
    assert not marker.exists()


def test_a_run_folder_naming_a_shell_command_is_not_resumed(tmp_path, capsys, nothing_trusted):
    marker = tmp_path / "ran"
    run = tmp_path / "run"
    run.mkdir()
    config = TrainConfig(model="small_resnet", dataset="digits").to_dict()
    config["model"] = "os:system"
    config["model_kwargs"] = {"command": f"touch {marker}"}
    (run / "config.json").write_text(json.dumps(config))
    assert main(["resume", str(run)]) == 2
    one_line_refusal(capsys, "resume", "os:system")
    assert not marker.exists()


def test_a_factory_is_trusted_when_named_here_or_listed(tmp_path, nothing_trusted, monkeypatch):
    """The user's own factory: a checkpoint naming it loads once the user lists it in VPNS_TRUSTED_FACTORIES, or
    once this process has built it by name (as `vpns prune --model` does before it writes the checkpoint)."""
    name = "user_networks:tiny_network"
    model = V.sparsify(build_model(name, num_classes=10, width=4), "unstructured")
    save_checkpoint(tmp_path / "own.pt", model, model_name=name, model_kwargs={"num_classes": 10, "width": 4},
                    input_size=(3, 32, 32))
    models._FACTORIES_NAMED_HERE.clear()  # as a new process reading the file would be
    payload = load_checkpoint(tmp_path / "own.pt")
    with pytest.raises(models.UntrustedFactoryError, match="this checkpoint names its network by the factory"):
        model_from_checkpoint(payload)
    for listed in ("other:factory, user_networks:tiny_network", "*"):
        monkeypatch.setenv(models.TRUSTED_FACTORIES_VARIABLE, listed)
        assert type(model_from_checkpoint(payload)) is type(model)
    monkeypatch.delenv(models.TRUSTED_FACTORIES_VARIABLE)
    with pytest.raises(models.UntrustedFactoryError):
        model_from_checkpoint(payload)
    build_model(name, num_classes=10, width=4)
    assert type(model_from_checkpoint(payload)) is type(model)
    models.check_file_model_name("resnet18", "a file")  # other names are not code: nothing to trust
    models.check_file_model_name("timm:resnet18", "a file")


@pytest.mark.parametrize("field, value, expected", [
    ("input_size", [3, 0, 0], "input_size must be 3 positive integers"),
    ("input_size", [3, -16, -16], "input_size must be 3 positive integers"),
    ("label_mapping", torch.tensor([0, 1, -1]), "label_mapping must be a non-empty list of class indices >= 0"),
    ("label_mapping", torch.tensor([0.0, 1.0]), "label_mapping must be"),
])
def test_edited_input_size_and_label_mapping_are_refused_by_name(tmp_path, capsys, field, value, expected):
    """Files edited by hand (checksum made again): `vpns infer` failed with a traceback on input size [3, 0, 0],
    and an ONNX export of a mapping with index -1 mapped that class to the network's last output, silently (an
    outside review). The checkpoint and an export written from the good one both refuse the field by name."""
    path = checkpoint_naming(tmp_path / "edited.pt", "small_resnet", {"num_classes": 10})
    payload = load_checkpoint(path)
    payload[field] = value
    payload["sha256"] = payload_sha256(payload)
    torch.save(payload, path)
    for command in (["infer", str(path), str(tmp_path / "img.png")],
                    ["export", str(path), "--format", "onnx", "--out", str(tmp_path / "x.onnx")]):
        Image.new("RGB", (32, 32)).save(tmp_path / "img.png")
        assert main(command) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "Traceback" not in err and expected in err and "edited.pt" in err, err
    assert not (tmp_path / "x.onnx").exists()
    V.export(str(checkpoint_naming(tmp_path / "good.pt", "small_resnet", {"num_classes": 10})), "dense",
             tmp_path / "good.safetensors")
    tensors, meta = read_export(tmp_path / "good.safetensors")
    kind = meta.pop("kind")
    meta[field] = value.tolist() if isinstance(value, torch.Tensor) else value
    _write_safetensors(kind, tensors, meta, tmp_path / "edited.safetensors", True)
    with pytest.raises(ValueError, match=expected):
        read_export(tmp_path / "edited.safetensors")


def test_a_config_file_naming_a_shell_command_is_not_run(tmp_path, capsys, nothing_trusted):
    """`vpns prune --config FILE` with the model named in the file (a review found this way round the check)."""
    marker = tmp_path / "ran"
    config = TrainConfig(model="small_resnet", dataset="digits").to_dict()
    config.update(model="os:system", model_kwargs={"command": f"touch {marker}"}, out=str(tmp_path / "out"))
    (tmp_path / "job.json").write_text(json.dumps(config))
    assert main(["prune", "--config", str(tmp_path / "job.json")]) == 2
    one_line_refusal(capsys, "prune", "os:system")
    assert not marker.exists()


@pytest.mark.parametrize("argument", ["weights", "pretrained", "checkpoint_path", "pretrained_cfg_overlay"])
def test_a_file_may_not_set_builder_arguments_that_read_other_files(tmp_path, capsys, argument):
    path = checkpoint_naming(tmp_path / "c.pt", "small_resnet", {"num_classes": 10, argument: "/etc/passwd"})
    assert main(["report", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"sets the network builder's {argument!r}" in err, err

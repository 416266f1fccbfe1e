"""Checkpoint format (atomic, versioned, safe loading) and the `vpns info` / `vpns report` CLI."""
import json
import os

import pytest
import torch

import vpns_fast as V
from vpns_fast.cli import main
from vpns_fast.models import build_model
from vpns_fast.pruning.checkpoint import (
    CheckpointError,
    atomic_save,
    load_checkpoint,
    model_from_checkpoint,
    prompt_from_spec,
    save_checkpoint,
)


@pytest.fixture
def checkpoint(tmp_path):
    model = V.sparsify(build_model("small_resnet", num_classes=10), granularity="kernel")
    V.set_density(model, 0.3)
    prompt = V.PadPrompt(32, 32, pad=3)
    with torch.no_grad():
        prompt.program.normal_()
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, model_name="small_resnet", model_kwargs={"num_classes": 10},
                    input_size=(3, 32, 32), prompt=prompt, label_mapping=torch.arange(10), meta={"note": "x"})
    return path, model, prompt


def test_checkpoint_records_the_network_class(checkpoint):
    payload = load_checkpoint(checkpoint[0])
    assert payload["model"] == {"name": "small_resnet", "kwargs": {"num_classes": 10},
                                "class": "vpns_fast.models.SmallResNet"}
    old_format = dict(payload, model={"name": "small_resnet", "kwargs": {"num_classes": 10}})  # no "class"
    assert sorted(model_from_checkpoint(old_format).state_dict()) == sorted(payload["state_dict"])


def test_round_trip_rebuilds_the_same_masked_model_and_prompt(checkpoint):
    path, model, prompt = checkpoint
    payload = load_checkpoint(path)
    rebuilt = model_from_checkpoint(payload)
    assert payload["granularity"] == "kernel" and payload["meta"] == {"note": "x"}
    for (name, a), (_, b) in zip(V.masks(model).items(), V.masks(rebuilt).items()):
        assert torch.equal(a, b), name
    model.eval(), rebuilt.eval()
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(model(x), rebuilt(x))
    assert torch.equal(prompt_from_spec(payload["prompt"])(x), prompt(x))


def test_never_overwrites_silently_and_writes_atomically(tmp_path, checkpoint):
    path, model, _ = checkpoint
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_checkpoint(path, model, model_name="small_resnet")
    before = path.read_bytes()

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"x": Unpicklable()}, path, overwrite=True)
    assert path.read_bytes() == before  # the failed write left the old file intact
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # and no temporary file behind


@pytest.mark.parametrize("damage,match", [
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "not a readable checkpoint"),
    (lambda p: p.write_bytes(b"garbage" * 10), "not a readable checkpoint"),
    (lambda p: torch.save({"weights": torch.zeros(1)}, p), "not a vpns_fast checkpoint"),
    (lambda p: torch.save({**torch.load(p, weights_only=True), "version": 99}, p), "version 99"),
])
def test_damaged_files_give_clear_errors(checkpoint, damage, match):
    path = checkpoint[0]
    damage(path)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


def test_loading_never_runs_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"format": "vpns_fast.checkpoint", "x": Evil()}, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_cli_info(capsys):
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert "torch" in text and "backends:" in text and "cpp" in text
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info["backends"]) == {"torch", "triton", "cpp"}
    assert info["backends"]["torch"]["devices"]["cpu"]["available"] is True
    # the torch backend runs on CUDA only where there is a device (it said "available" beside cuda_available False)
    assert info["backends"]["torch"]["devices"]["cuda"]["available"] is info["cuda_available"]
    from vpns_fast.deploy import sparse_cpu

    available, reason = sparse_cpu.available()
    assert info["cpu_engine"] == (f"available, {sparse_cpu.kernel_isa()} kernel" if available
                                  else f"unavailable: {reason}")
    assert "onnxruntime" in info and "onnxscript" in info and "cpu_engine" in text


def test_cli_report(checkpoint, capsys):
    path, model, _ = checkpoint
    assert main(["report", str(path)]) == 0
    text = capsys.readouterr().out
    assert "conv1" in text and "FLOPs kept" in text and "total" in text
    assert main(["report", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kept"] == V.density_report(model).kept
    payload = load_checkpoint(path)  # the text's first line, in the JSON too
    assert report["checkpoint"] == str(path) and report["granularity"] == payload["granularity"]
    assert report["model"] == payload["model"]["name"] and report["input_size"] == list(payload["input_size"])


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["report"])  # argparse: checkpoint is required
    for command in ("info", "report", "prune", "resume", "eval", "transfer"):
        with pytest.raises(SystemExit) as exc:
            main([command, "--help"])
        assert exc.value.code == 0


def test_checkpoint_of_a_newer_version_says_so(tmp_path, checkpoint):
    payload = torch.load(checkpoint[0], weights_only=True)
    payload["version"] = 99
    path = tmp_path / "future.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="version 99.*newer vpns_fast"):
        load_checkpoint(path)

"""Any model and any data: `vpns prune` with a torchvision name and a user's factory, the trainer on a user's
module and TensorDataset, what checkpoints record to rebuild them, resume of a run given objects, timm, and the
errors for models that cannot be used."""
import copy
import importlib
import json
import os

import pytest
import torch
from tolerance import assert_close
from torch.utils.data import TensorDataset
from user_networks import TinyNetwork

from vpns_fast import cli
from vpns_fast.pruning.checkpoint import load_checkpoint, model_from_checkpoint
from vpns_fast.pruning.masking import fold, set_density, sparsify
from vpns_fast.training.config import module_weights_sha256
from vpns_fast.training.trainer import TrainConfig, TwoStageTrainer, resume


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def prune_args(out, model, *extra):
    return ["prune", "--dataset", "digits", "--model", model, "--input-size", "32", "--prompt-size", "2",
            "--limit", "40", "--batch-size", "20", "--epochs", "1", "--density", "0.5", "--device", "cpu",
            "--no-progress", "--out", str(out), *extra]


def rebuilt_outputs_match(path):
    payload = load_checkpoint(path)
    model = model_from_checkpoint(payload).eval()
    reference = torch.load(path, weights_only=True)["state_dict"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.items())
    return payload


def test_cli_prune_a_torchvision_model_by_name(tmp_path):
    assert cli.main(prune_args(tmp_path, "mobilenet_v3_small")) == 0
    payload = rebuilt_outputs_match(tmp_path / "runs" / "vpns_d0.5" / "best.pt")
    assert payload["model"]["name"] == "mobilenet_v3_small"
    assert payload["model"]["kwargs"] == {"num_classes": 10}
    assert payload["model"]["class"] == "torchvision.models.mobilenetv3.MobileNetV3"


def test_cli_prune_a_user_factory(tmp_path):
    assert cli.main(prune_args(tmp_path, "user_networks:tiny_network", "--model-arg", "width=4")) == 0
    payload = rebuilt_outputs_match(tmp_path / "runs" / "vpns_d0.5" / "last.pt")
    assert payload["model"]["name"] == "user_networks:tiny_network"
    assert payload["model"]["kwargs"] == {"num_classes": 10, "width": 4}
    with open(tmp_path / "results.json") as f:
        assert json.load(f)["runs"][0]["actual_density"] == pytest.approx(0.5, abs=0.02)


def test_a_conv_head_factory_keeps_its_outputs_and_maps_them(tmp_path):
    """A factory without num_classes and without a Linear keeps its 12 outputs (the README says so); label
    mapping maps them to digits' 10 classes, as it does a pretrained head's."""
    assert cli.main(prune_args(tmp_path, "user_networks:conv_head_network")) == 0
    payload = rebuilt_outputs_match(tmp_path / "runs" / "vpns_d0.5" / "last.pt")
    with torch.no_grad():
        assert model_from_checkpoint(payload)(torch.zeros(1, 3, 32, 32)).shape == (1, 12)
    mapping = payload["label_mapping"]
    assert mapping is not None and mapping.numel() == 10 and int(mapping.max()) < 12


@pytest.mark.parametrize("model, expected", [
    ("resnet7", "unknown model 'resnet7'; name a model as a torchvision classification model name"),
    ("user_networks:not_a_network", "the factory returned a dict, expected an nn.Module"),
    ("user_networks:missing", "module 'user_networks' has no 'missing'"),
    ("no_such_package.models:build", "cannot import module 'no_such_package.models'"),
    ("user_networks:pool_only", "to sparsify"),  # sparsify's own message: nothing to mask
])
def test_cli_bad_models_are_one_line_errors(tmp_path, capsys, model, expected):
    assert cli.main(prune_args(tmp_path, model)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vpns prune: error: ") and "\n" not in err and "Traceback" not in err
    assert expected in err
    if model == "resnet7":
        assert "timm:NAME" in err and "package.module:factory" in err


# ----------------------------------------------------------------------------- a user's module and data


def user_data(samples=48, classes=3, size=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(samples) % classes
    colours = torch.rand(classes, 3, 1, 1, generator=generator)
    images = (0.5 * colours[labels] + 0.5 * torch.rand(samples, 3, size, size, generator=generator)).clamp(0, 1)
    return TensorDataset(images, labels)  # float images in [0, 1]


def user_config(out, network, dataset, **overrides):
    settings = dict(model=network, dataset=dataset, num_classes=3, input_size=16, prompt_size=2, batch_size=16,
                    search_epochs=1, finetune_epochs=1, densities=(0.5,), progress=False, deterministic=True,
                    device="cpu", out=str(out))
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture(scope="module")
def user_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("user_run")
    torch.manual_seed(0)
    network = TinyNetwork(num_classes=5, width=4)  # 5 outputs for 3 classes: label mapping
    before = {k: v.clone() for k, v in network.state_dict().items()}
    dataset = user_data()
    results = TwoStageTrainer(user_config(out, network, dataset)).run()
    return out, network, dataset, results, before


def test_trainer_runs_on_a_user_module_and_tensor_dataset(user_run):
    out, network, _, results, before = user_run
    assert all(torch.equal(network.state_dict()[k], v) for k, v in before.items())  # the caller's module: as given
    (row,) = results
    assert row["actual_density"] == pytest.approx(0.5, abs=0.02) and row["test_acc"] is not None
    payload = load_checkpoint(os.path.join(out, "runs", "vpns_d0.5", "best.pt"))
    assert payload["model"]["name"] is None and payload["model"]["class"] == "user_networks.TinyNetwork"
    assert payload["label_mapping"] is not None and payload["label_mapping"].numel() == 3


def test_checkpoint_of_a_module_object_needs_model(user_run):
    out, network, *_ = user_run
    payload = load_checkpoint(os.path.join(out, "runs", "vpns_d0.5", "best.pt"))
    with pytest.raises(ValueError, match=r"user_networks.TinyNetwork\) was passed as an object.*model="):
        model_from_checkpoint(payload)
    model = model_from_checkpoint(payload, model=TinyNetwork(num_classes=5, width=4))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in payload["state_dict"].items())
    with pytest.raises(ValueError, match=r"do not fit the model \(the model= given, user_networks.TinyNetwork; the "
                                         r"checkpoint was made from user_networks.TinyNetwork\)") as refused:
        model_from_checkpoint(payload, model=TinyNetwork(num_classes=5, width=6))
    # one line naming the first problem and how many more, not torch's header line alone
    assert "\n" not in str(refused.value) and "size mismatch for " in str(refused.value)
    assert "Error(s) in loading" not in str(refused.value) and "(in all: 14 size mismatches)" in str(refused.value)


def test_the_cli_says_a_module_objects_checkpoint_needs_python(user_run, capsys, tmp_path):
    """The Python advice (model=...) is no use on the command line: it says where to go instead, in one line."""
    from vpns_fast.cli import main

    out, *_ = user_run
    best = os.path.join(out, "runs", "vpns_d0.5", "best.pt")
    for argv in (["export", best, "--format", "dense", "--out", str(tmp_path / "m.dense")], ["bench-infer", best]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "(user_networks.TinyNetwork) was passed as an object" in err
        assert "the command line cannot give one: load the file in Python with model=" in err
        assert "; pass model=" not in err and err.endswith("or name the model as 'package.module:factory' when "
                                                          "training")


def test_run_given_objects_resumes_from_python_only(user_run, capsys):
    out, network, dataset, results, _ = user_run
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["model"] == {"python_object": "user_networks.TinyNetwork",
                               "weights_sha256": module_weights_sha256(network)}
    assert config["dataset"] == {"python_object": "torch.utils.data.dataset.TensorDataset"}
    assert cli.main(["resume", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "as a Python object" in err and "resume(OUT, " in err and "\n" not in err.strip()
    again = resume(str(out), progress=False, model=network, dataset=dataset)  # finished: nothing reruns
    assert again[0]["test_acc"] == results[0]["test_acc"]
    # a module of the same class with other weights would prune the later runs from other dense weights, silently
    # (an outside review): refused by the fingerprint config.json records
    other = copy.deepcopy(network)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    with pytest.raises(ValueError, match=r"model: its weights differ from those the run in .* started from \(sha256 "
                                         r"[0-9a-f]{12}\.\.\.\); pass the same module, with the weights it had then"):
        resume(str(out), progress=False, model=other, dataset=dataset)
    with pytest.raises(ValueError, match="model: expected a model name or an nn.Module"):
        TrainConfig(model=42)
    with pytest.raises(ValueError, match="num_classes: a dataset passed as Dataset objects needs"):
        TrainConfig(dataset=dataset)


def test_deploy_a_module_object_checkpoint_with_model(user_run):
    from vpns_fast.deploy.runtime import deploy

    export_module = importlib.import_module("vpns_fast.deploy.export")  # the package re-exports a function
    out, *_ = user_run
    path = os.path.join(out, "runs", "vpns_d0.5", "best.pt")
    with pytest.raises(ValueError, match="model="):
        deploy(path, "cpu", policy="dense")
    architecture = TinyNetwork(num_classes=5, width=4)
    deployed = deploy(path, "cpu", policy="dense", model=architecture)
    images = torch.rand(2, 3, 16, 16)
    assert deployed(images).shape == (2, 3)
    dense = str(out / "dense.safetensors")
    export_module.export(path, "dense", dense, force=True, model=architecture)
    assert_close(deploy(dense, "cpu", policy="dense", model=architecture)(images), deployed(images))


# ----------------------------------------------------------------------------- timm


@pytest.mark.parametrize("name, kwargs", [("resnet18", {}), ("vit_tiny_patch16_224", {"img_size": 32}),
                                          ("convnext_atto", {})])
def test_timm_models_build_and_sparsify(name, kwargs):
    pytest.importorskip("timm", reason="timm is optional: pip install 'vpns_fast[timm]'")
    from vpns_fast.models import build_model_spec, source_num_classes

    model, spec = build_model_spec(f"timm:{name}", num_classes=7, **kwargs)
    assert spec == {"name": f"timm:{name}", "kwargs": {"num_classes": 7, **kwargs}}
    assert source_num_classes(model, 32) == 7
    sparsify(model)
    set_density(model, 0.3)
    model.eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        masked = model(x)
        assert masked.shape == (2, 7)
        assert_close(fold(model)(x), masked, relative_to_max=True, rtol=1e-5)


def test_module_fingerprint_follows_what_the_run_starts_from(user_run, tmp_path):
    """A run given weights= starts from the file, not the module's own weights: a fresh module of the class resumes
    it (a review found it refused). A folder written before weights were hashed is still the same run. A lazy
    module is not hashed (its parameters do not exist yet)."""
    out, network, dataset, *_ = user_run
    path = os.path.join(out, "config.json")
    with open(path) as f:
        text = f.read()
    recorded = json.loads(text)
    del recorded["model"]["weights_sha256"]  # as written before this check existed
    try:
        with open(path, "w") as f:
            json.dump(recorded, f)
        with pytest.raises(FileExistsError, match="already holds this run"):  # not "a different config"
            TwoStageTrainer(user_config(out, network, dataset)).run()
    finally:  # the module's other tests read the folder as the run wrote it
        with open(path, "w") as f:
            f.write(text)
    weights = tmp_path / "w.pt"
    torch.save(network.state_dict(), weights)
    run = tmp_path / "with_weights"
    TwoStageTrainer(user_config(run, TinyNetwork(num_classes=5, width=4), dataset, weights=str(weights))).run()
    with open(run / "config.json") as f:
        assert "weights_sha256" not in json.load(f)["model"]
    assert resume(str(run), progress=False, model=TinyNetwork(num_classes=5, width=4), dataset=dataset)
    lazy = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(5))
    assert "weights_sha256" not in user_config(None, lazy, dataset).to_dict()["model"]

"""Model zoo: shapes, torchvision-compatible keys, local weight files, offline errors, heads."""
import os
import urllib.error

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from vpns_fast import models
from vpns_fast.models import (
    MODELS,
    build_model,
    default_input_size,
    load_weights,
    source_num_classes,
)

TORCHVISION_BUILDERS = {
    "resnet18": torchvision.models.resnet18,
    "resnet50": torchvision.models.resnet50,
    "vgg16": torchvision.models.vgg16,
}


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """Empty hub cache and no network: any download attempt raises like an offline machine."""
    hub = tmp_path / "hub"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.delenv("VPNS_FAST_OFFLINE", raising=False)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return hub


def _plain_layers_only(model):
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            assert type(module) in (nn.Conv2d, nn.Linear)


@pytest.mark.parametrize("name", ["cifar_resnet18", "small_resnet"])
def test_small_models_forward_at_default_size(name):
    model = build_model(name).eval()
    size = default_input_size(name)
    assert size == 32
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 10)
    assert source_num_classes(model) == 10
    _plain_layers_only(model)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_small_resnet_is_small():
    params = sum(p.numel() for p in build_model("small_resnet").parameters())
    assert 50_000 < params < 250_000


def test_cifar_resnet18_architecture():
    model = build_model("cifar_resnet18", num_classes=100)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    reference = torchvision.models.resnet18(num_classes=100)
    assert list(model.state_dict()) == list(reference.state_dict())
    # Only the stem differs from the ImageNet ResNet-18 (7x7 -> 3x3 kernel).
    difference = 64 * 3 * (7 * 7 - 3 * 3)
    def count(module):
        return sum(p.numel() for p in module.parameters())

    assert count(reference) - count(model) == difference
    assert source_num_classes(model) == 100


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "vgg16"])
def test_torchvision_models_match_torchvision(name):
    with torch.device("meta"):  # keys and shapes only: skip the cost of initialising 138M params
        ours = build_model(name)
        reference = TORCHVISION_BUILDERS[name](weights=None)
    assert default_input_size(name) == 224
    ours_state, reference_state = ours.state_dict(), reference.state_dict()
    assert list(ours_state) == list(reference_state)
    assert all(ours_state[k].shape == reference_state[k].shape for k in ours_state)
    assert source_num_classes(ours) == 1000
    _plain_layers_only(ours)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "vgg16"])
def test_torchvision_forward_shapes(name):
    # Meta tensors propagate shapes at the default 224 input without computing anything.
    with torch.device("meta"):
        model = build_model(name).eval()
        assert model(torch.empty(2, 3, 224, 224)).shape == (2, 1000)


def test_resnet18_forward_small_input():
    # A real forward at 64x64 (cheap on CPU): adaptive pooling makes the size irrelevant.
    with torch.no_grad():
        assert build_model("resnet18").eval()(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet7")
    assert set(MODELS) == {"resnet18", "resnet50", "vgg16", "cifar_resnet18", "small_resnet"}


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_weights_round_trip(tmp_path, empty_hub, suffix):
    source = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".pth":
        torch.save(source.state_dict(), path)
    else:
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = build_model("resnet18", weights=path).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))
    assert source_num_classes(model) == 1000  # the pretrained source head is kept


def test_load_weights_helper_and_mismatch(tmp_path):
    source = build_model("small_resnet").eval()
    path = tmp_path / "small.safetensors"
    save_file(source.state_dict(), str(path))
    target = load_weights(build_model("small_resnet"), path).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))

    state = dict(source.state_dict())
    del state["fc.bias"]
    state["fc.extra"] = torch.zeros(1)
    broken = tmp_path / "broken.pth"
    torch.save(state, broken)
    expected = r"(?s)missing keys \(1\): fc.bias.*unexpected keys \(1\): fc.extra"
    with pytest.raises(RuntimeError, match=expected):
        load_weights(build_model("small_resnet"), broken)
    with pytest.raises(RuntimeError, match=r"shape mismatches.*conv1.weight"):
        load_weights(build_model("cifar_resnet18"), path)


def test_wrapped_checkpoint_is_unwrapped(tmp_path):
    source = build_model("small_resnet")
    path = tmp_path / "ckpt.pt"
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3}, path)
    model = build_model("small_resnet", weights=path)
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)


def test_pretrained_from_hub_cache(empty_hub):
    checkpoints = empty_hub / "checkpoints"
    checkpoints.mkdir(parents=True)
    source = torchvision.models.resnet18(weights=None)
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    torch.save(source.state_dict(), checkpoints / os.path.basename(url))
    model = build_model("resnet18", pretrained=True)
    assert torch.equal(model.fc.weight, source.fc.weight)


def test_offline_without_file_is_a_clear_error(empty_hub, monkeypatch):
    expected = os.path.join(str(empty_hub), "checkpoints", "resnet18-f37072fd.pth")
    with pytest.raises(FileNotFoundError) as info:
        build_model("resnet18", pretrained=True)
    message = str(info.value)
    assert expected in message and "weights=" in message and "download failed" in message

    # The offline switch must not even try the network.
    def must_not_download(weights):
        raise AssertionError("download attempted while offline")

    monkeypatch.setattr(models, "_download_state_dict", must_not_download)
    monkeypatch.setenv("VPNS_FAST_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="resnet50-11ad3fa6.pth"):
        build_model("resnet50", pretrained=True)


def test_a_job_refused_for_its_pretrained_weights_writes_nothing(tmp_path, empty_hub, capsys):
    """An outside review: offline, `vpns prune --model resnet18 --weights pretrained` failed after config.json was
    written, and the corrected command was then refused ("holds a run with a different config")."""
    from vpns_fast import cli

    out = tmp_path / "run"
    argv = ["prune", "--model", "resnet18", "--weights", "pretrained", "--dataset", "synthetic", "--limit", "8",
            "--epochs", "1", "--device", "cpu", "--no-progress", "--out", str(out)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "pretrained weights for resnet18" in err and err.count("\n") == 1
    assert not (out / "config.json").exists()


def test_a_job_refused_for_its_timm_weights_writes_nothing(tmp_path, capsys, monkeypatch):
    """As above for a timm model, whose weights timm fetched only inside build_model, after config.json."""
    pytest.importorskip("timm")
    from vpns_fast import cli

    monkeypatch.setenv("VPNS_FAST_OFFLINE", "1")
    out = tmp_path / "run"
    argv = ["prune", "--model", "timm:resnet18", "--weights", "pretrained", "--dataset", "synthetic", "--limit",
            "8", "--epochs", "1", "--device", "cpu", "--no-progress", "--out", str(out)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "pretrained weights for timm:resnet18" in err and err.count("\n") == 1
    assert not (out / "config.json").exists()


def test_a_job_builds_its_timm_pretrained_model_once_before_writing(tmp_path, capsys, monkeypatch):
    """A job built a timm model with its pretrained weights twice: once to fetch them before writing anything, then
    again for the dense start. Built once now, still before config.json is written."""
    timm = pytest.importorskip("timm")
    from vpns_fast import cli

    out = tmp_path / "run"
    built = []  # for each build: whether config.json existed by then

    def pretrained_timm(key, kwargs):  # no hub here: timm's random weights stand for the published ones
        built.append((out / "config.json").exists())
        return timm.create_model(key, pretrained=False, **kwargs)

    monkeypatch.setattr(models, "_pretrained_timm", pretrained_timm)
    argv = ["prune", "--model", "timm:resnet18", "--weights", "pretrained", "--dataset", "synthetic", "--limit", "8",
            "--input-size", "32", "--epochs", "0", "--method", "omp", "--density", "0.5", "--device", "cpu",
            "--no-progress", "--out", str(out)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert built == [False]


def test_missing_explicit_file_and_no_published_weights(tmp_path, empty_hub):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_model("resnet18", weights=tmp_path / "nowhere.pth")
    with pytest.raises(ValueError, match="weights=PATH"):
        build_model("small_resnet", pretrained=True)


def test_head_replacement(tmp_path):
    source = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(source.state_dict(), path)
    model = build_model("resnet18", num_classes=37, weights=path)
    assert type(model.fc) is nn.Linear and model.fc.out_features == 37
    assert source_num_classes(model) == 37
    assert torch.equal(model.conv1.weight, source.conv1.weight)  # the body stays pretrained
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 37)
    assert build_model("resnet18", num_classes=5).fc.out_features == 5  # no weights: plain head


def test_vgg16_head_replacement_on_meta():
    with torch.device("meta"):
        model = build_model("vgg16")
        models._replace_head(model, 10)
    assert type(model.classifier[6]) is nn.Linear and model.classifier[6].out_features == 10
    assert source_num_classes(model) == 10


# ----------------------------------------------------------------------------- any model


def test_any_torchvision_classification_model_by_name():
    assert "mobilenet_v3_small" in models.torchvision_model_names()
    assert not any(n.startswith(("fasterrcnn", "raft", "r3d", "quantized")) for n in models.torchvision_model_names())
    model, spec = models.build_model_spec("squeezenet1_1", num_classes=7)  # a conv head: no linear layer
    assert spec == {"name": "squeezenet1_1", "kwargs": {"num_classes": 7}}
    assert source_num_classes(model, 64) == 7
    with pytest.raises(ValueError, match="pass input_size"):
        source_num_classes(model)
    googlenet, spec = models.build_model_spec("googlenet", num_classes=3)
    assert spec["kwargs"]["aux_logits"] is False  # a training forward gives one logits tensor
    assert isinstance(googlenet.train()(torch.randn(2, 3, 64, 64)), torch.Tensor)
    assert default_input_size("inception_v3") == 299 and default_input_size("mobilenet_v3_small") == 224


def test_generic_pretrained_weights_from_hub_cache_and_offline_error(empty_hub, monkeypatch):
    monkeypatch.setenv("VPNS_FAST_OFFLINE", "1")
    file_name = os.path.basename(torchvision.models.MobileNet_V3_Small_Weights.DEFAULT.url)
    with pytest.raises(FileNotFoundError, match=file_name):
        build_model("mobilenet_v3_small", pretrained=True)
    checkpoints = empty_hub / "checkpoints"
    checkpoints.mkdir(parents=True)
    source = torchvision.models.mobilenet_v3_small(weights=None)
    torch.save(source.state_dict(), checkpoints / file_name)
    model = build_model("mobilenet_v3_small", pretrained=True)
    assert torch.equal(model.classifier[3].weight, source.classifier[3].weight)
    model, spec = models.build_model_spec("mobilenet_v3_small", num_classes=12, pretrained=True)
    assert model.classifier[3].out_features == 12 and spec["kwargs"] == {"num_classes": 12}
    assert torch.equal(model.features[0][0].weight, source.features[0][0].weight)  # the body stays pretrained


def test_factory_models(tmp_path):
    model, spec = models.build_model_spec("user_networks:tiny_network", num_classes=4, width=6)
    assert spec == {"name": "user_networks:tiny_network", "kwargs": {"num_classes": 4, "width": 6}}
    assert source_num_classes(model, 16) == 4
    fixed = build_model("user_networks:tiny_network_fixed_head", num_classes=3)  # no num_classes: head replaced
    assert source_num_classes(fixed, 16) == 3
    path = tmp_path / "tiny.pth"
    torch.save(model.state_dict(), path)
    loaded = build_model("user_networks:tiny_network", weights=path, width=6)  # the file's head is kept
    assert source_num_classes(loaded) == 4 and torch.equal(loaded.head.weight, model.head.weight)
    with pytest.raises(ValueError, match="weights=PATH"):
        build_model("user_networks:tiny_network", pretrained=True)
    with pytest.raises(ValueError, match="the factory returned a dict"):
        build_model("user_networks:not_a_network")


def test_timm_missing_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_timm(name, *args, **kwargs):
        if name == "timm":
            raise ImportError("No module named 'timm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_timm)
    with pytest.raises(ValueError, match=r"vpns_fast\[timm\]"):
        build_model("timm:resnet18")

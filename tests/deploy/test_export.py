"""Export formats (dense, sparse, slim, onnx): round trips, exactness against the masked model,
the slim channel bookkeeping, and bad files (truncated, garbage, checksum, version, format tag)."""
import importlib.util
import json
import os

import pytest
import tolerance
import torch
from helpers import randomize_batchnorm
from safetensors.torch import load as st_load
from safetensors.torch import load_file, save_file
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

import vpns_fast as V
from vpns_fast.deploy.export import (
    ExportFormatError,
    decode_weight,
    encode_weight,
    export,
    load_dense,
    load_slim,
    load_sparse,
    read_export,
)
from vpns_fast.deploy.slim import slim_resnet
from vpns_fast.models import build_model
from vpns_fast.nn.label_mapping import LabelMapping
from vpns_fast.nn.prompted_network import PromptedNetwork
from vpns_fast.nn.prompts import normalize
from vpns_fast.ops import IMAGENET_MEAN, IMAGENET_STD
from vpns_fast.pruning.checkpoint import save_checkpoint

HAS_ONNX = importlib.util.find_spec("onnx") is not None
MAPPING = torch.tensor([3, 1, 7, 0, 9])  # 5 target classes out of the 10 source classes
RTOL = 1e-4  # relative to the largest reference logit: BN folding rounds differently, nothing else


def make_masked(name="small_resnet", granularity="channel", density=0.4, num_classes=10):
    model = build_model(name, num_classes=num_classes)
    randomize_batchnorm(model)
    V.sparsify(model, granularity)
    V.set_density(model, density)
    return model.eval()


def make_checkpoint(path, name="small_resnet", granularity="channel", density=0.4, prompt=True, size=32,
                    protocol="prompted", class_names=None):
    """A checkpoint file plus the reference PromptedNetwork (masked model, eval mode)."""
    model = make_masked(name, granularity, density)
    visual = None
    if prompt:
        visual = V.PadPrompt(size, size - 4, pad=3)
        with torch.no_grad():
            visual.program.normal_()
    meta = {"config": {"protocol": protocol}}
    if class_names:
        meta["class_names"] = class_names
    save_checkpoint(path, model, model_name=name, model_kwargs={"num_classes": 10}, input_size=(3, size, size),
                    prompt=visual, label_mapping=MAPPING, meta=meta)
    mapping = LabelMapping(len(MAPPING), "flm", 10)
    mapping.set_mapping(MAPPING)
    mean, std = (visual.mean, visual.std) if visual else (IMAGENET_MEAN, IMAGENET_STD)
    reference = PromptedNetwork(model, visual, mapping, mean, std).eval()
    image_size = visual.in_size if visual else size
    return path, reference, image_size


def assert_close(out, ref, rtol=RTOL):
    tolerance.assert_close(out.float(), ref.float(), relative_to_max=True, rtol=rtol)


# --------------------------------------------------------------------------- dense

def test_dense_export_loads_into_the_stock_model(tmp_path):
    path, ref, size = make_checkpoint(tmp_path / "m.pt", "resnet18", "unstructured", density=0.3, prompt=False)
    export(path, "dense", tmp_path / "m.safetensors")
    stock = build_model("resnet18", num_classes=10).eval()
    stock.load_state_dict(load_file(tmp_path / "m.safetensors"))  # strict: no extra keys
    masked = ref.model.layer3[0].conv2
    assert torch.equal(stock.layer3[0].conv2.weight, masked.masked_weight())
    assert torch.equal(stock.fc.weight, ref.model.fc.masked_weight())
    model, prompt, mapping, meta = load_dense(tmp_path / "m.safetensors")
    assert prompt is None and torch.equal(mapping, MAPPING) and meta["model"]["name"] == "resnet18"
    x = normalize(torch.rand(2, 3, size, size))
    assert torch.equal(model(x), stock(x))


def test_dense_export_keeps_the_prompt_in_the_header(tmp_path):
    path, ref, size = make_checkpoint(tmp_path / "m.pt")
    export(path, "dense", tmp_path / "d.safetensors")
    model, prompt, mapping, meta = load_dense(tmp_path / "d.safetensors")
    assert meta["use_prompt"] and torch.equal(prompt.program, ref.prompt.program)
    x = torch.rand(3, 3, size, size)
    assert_close(model(prompt(x))[:, mapping], ref(x))


# --------------------------------------------------------------------------- sparse

@pytest.mark.parametrize("granularity", ["unstructured", "kernel", "channel"])
def test_sparse_round_trip_is_bit_exact(tmp_path, granularity):
    path, ref, size = make_checkpoint(tmp_path / "m.pt", granularity=granularity, density=0.2)
    meta = export(path, "sparse", tmp_path / "m.vpns")
    model, prompt, mapping, _ = load_sparse(tmp_path / "m.vpns")
    folded = V.fold(ref.model)
    for key, value in folded.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert meta["bytes"]["weights_encoded"] < meta["bytes"]["weights_dense"]
    x = torch.rand(2, 3, size, size)
    assert_close(model(prompt(x))[:, mapping], ref(x))


def test_sparse_encoding_picks_the_smallest_and_round_trips():
    torch.manual_seed(0)
    w = torch.randn(8, 6, 3, 3)
    channel = w * (torch.arange(8) % 2 == 0).float()[:, None, None, None]
    kernel = w * (torch.rand(8, 6, 1, 1) > 0.5).float()
    big = torch.randn(64, 64, 3, 3)
    very_sparse = big * (torch.rand_like(big) > 0.99).float()
    linear = torch.randn(7, 13)
    cases = {"channel": (channel, "bitmask-channel"), "kernel": (kernel, "bitmask-kernel"),
             "csr": (very_sparse, "csr"), "dense": (w, "dense"), "linear": (linear, "dense"),
             "empty": (torch.zeros(4, 3, 3, 3), "bitmask-channel"),
             "half": (w * (torch.rand_like(w) > 0.5).float(), "bitmask-element")}
    for name, (weight, encoding) in cases.items():
        tensors, info = encode_weight(name, weight)
        assert info["encoding"] == encoding, name
        assert sum(t.numel() * t.element_size() for t in tensors.values()) == info["bytes"]
        assert torch.equal(decode_weight(name, tensors, info), weight), name


# --------------------------------------------------------------------------- slim

@pytest.mark.parametrize("granularity,density", [("channel", 0.4), ("kernel", 0.3), ("unstructured", 0.5)])
def test_slim_export_matches_the_masked_model(tmp_path, granularity, density):
    path, ref, size = make_checkpoint(tmp_path / "m.pt", granularity=granularity, density=density)
    meta = export(path, "slim", tmp_path / "m.slim")
    model, prompt, mapping, _ = load_slim(tmp_path / "m.slim", with_meta=True)
    assert isinstance(load_slim(tmp_path / "m.slim"), nn.Module)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # BN folded
    for batch in (1, 2, 33):
        x = torch.rand(batch, 3, size, size)
        assert_close(model(prompt(x))[:, mapping], ref(x))
    report = meta["channels"]
    dropped = meta["channels_dropped"]
    assert dropped == sum(r["dropped"] for r in report.values())
    for name, row in report.items():
        if not row["role"].startswith("inside"):
            assert row["dropped"] == 0, name  # residual-sum channels are never removed
    if granularity == "channel":
        assert dropped > 0 and sum(p.numel() for p in model.parameters()) < \
            sum(p.numel() for p in V.fold(ref.model).parameters())
    if granularity == "unstructured":
        assert dropped == 0  # no whole channel is pruned at density 0.5


class TinyBottleneckResNet(ResNet):
    """torchvision's ResNet forward and Bottleneck blocks at a test-sized width."""

    def __init__(self):
        nn.Module.__init__(self)
        self._norm_layer, self.inplanes, self.dilation, self.groups, self.base_width = nn.BatchNorm2d, 16, 1, 1, 64
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1, self.relu, self.maxpool = nn.BatchNorm2d(16), nn.ReLU(inplace=True), nn.Identity()
        self.layer1 = self._make_layer(Bottleneck, 8, 2)
        self.layer2 = self._make_layer(Bottleneck, 16, 1, stride=2)
        self.layer3, self.layer4 = nn.Identity(), nn.Identity()
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(64, 10)


@torch.no_grad()
@pytest.mark.parametrize("granularity", ["channel", "kernel", "unstructured"])
def test_slim_bottleneck_folds_constants_into_pointwise_consumers(granularity):
    model = TinyBottleneckResNet()
    randomize_batchnorm(model)
    V.sparsify(model, granularity)
    V.set_density(model, 0.4 if granularity != "unstructured" else 0.05)
    model.eval()
    slim, architecture, report = slim_resnet(V.fold(model))
    for batch in (1, 2, 33):
        x = torch.rand(batch, 3, 16, 16)
        assert_close(slim(x), model(x))
    if granularity == "channel":
        # conv2 feeds the 1x1 conv3: every pruned conv2 channel goes (dead or folded), except the
        # one channel a conv must keep when all are pruned
        for name, row in report.items():
            if name.endswith("conv2"):
                assert row["kept_pruned"] == 0 or row["dropped"] == row["channels"] - 1, name
                assert row["dropped"] + row["kept_pruned"] >= row["pruned"], name
        assert sum(r["folded"] for r in report.values()) > 0
        # conv1 feeds a padded 3x3 conv: pruned channels with a positive constant are kept
        assert any(r["kept_pruned"] > 0 for n, r in report.items() if n.endswith("conv1") and "layer" in n)
    assert architecture["convs"]["layer1.0.conv3"][1] == 32  # block output untouched


def test_slim_cifar_resnet18_channel(tmp_path):
    path, ref, size = make_checkpoint(tmp_path / "m.pt", "cifar_resnet18", "channel", density=0.3, size=16)
    export(path, "slim", tmp_path / "m.slim")
    model, prompt, mapping, meta = load_slim(tmp_path / "m.slim", with_meta=True)
    x = torch.rand(2, 3, size, size)
    assert_close(model(prompt(x))[:, mapping], ref(x))
    assert meta["channels_dropped"] > 0


def test_slim_refuses_non_resnets_and_masked_models():
    with pytest.raises(ValueError, match="ResNet"):
        slim_resnet(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    with pytest.raises(ValueError, match="fold"):
        slim_resnet(make_masked())


# --------------------------------------------------------------------------- onnx

def tiny_vit():
    from torchvision.models import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16,
                             num_classes=5)


def export_masked_vit(tmp_path) -> tuple[torch.nn.Module, dict]:
    """A masked tiny ViT (nn.MultiheadAttention) at density 0.3, saved and exported to tmp_path/vit.onnx:
    (the masked model, the export's metadata)."""
    model = V.sparsify(tiny_vit()).eval()
    V.set_density(model, 0.3)
    save_checkpoint(tmp_path / "vit.pt", model, model_name=None, input_size=(3, 32, 32))
    return model, export(tmp_path / "vit.pt", "onnx", tmp_path / "vit.onnx", model=tiny_vit())


@pytest.mark.skipif(not HAS_ONNX, reason="onnx not installed (pip install vpns_fast[onnx])")
def test_onnx_export_of_an_attention_model(tmp_path):
    """nn.MultiheadAttention's inference fast path has no ONNX symbolic: the export traces the plain
    path instead, and the graph computes what the masked model computes."""
    from onnx.reference import ReferenceEvaluator

    model, _ = export_masked_vit(tmp_path)
    assert torch.backends.mha.get_fastpath_enabled()  # restored
    x = torch.rand(2, 3, 32, 32)
    out = ReferenceEvaluator(str(tmp_path / "vit.onnx")).run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        assert_close(torch.from_numpy(out), model(normalize(x)))


@pytest.mark.skipif(not HAS_ONNX, reason="onnx not installed (pip install vpns_fast[onnx])")
@pytest.mark.parametrize("prompt,slim", [(True, False), (False, True)])
def test_onnx_export_checks_and_matches(tmp_path, prompt, slim):
    import onnx
    from onnx.reference import ReferenceEvaluator

    path, ref, size = make_checkpoint(tmp_path / "m.pt", granularity="channel", prompt=prompt)
    export(path, "onnx", tmp_path / "m.onnx", slim=slim)
    graph = onnx.load(tmp_path / "m.onnx")
    onnx.checker.check_model(graph)
    meta = json.loads({p.key: p.value for p in graph.metadata_props}["vpns_fast.meta"])
    assert meta["slim"] is slim and meta["use_prompt"] is prompt
    evaluator = ReferenceEvaluator(graph)
    for batch in (1, 3):  # dynamic batch axis
        x = torch.rand(batch, 3, size, size)
        out = torch.from_numpy(evaluator.run(None, {"images": x.numpy()})[0])
        assert_close(out, ref(x))


def test_onnx_missing_dependency_names_the_extra(tmp_path, monkeypatch, capsys):
    from vpns_fast.cli import main
    from vpns_fast.deploy.export import MissingDependencyError

    path, _, _ = make_checkpoint(tmp_path / "m.pt", prompt=False)
    monkeypatch.setitem(__import__("sys").modules, "onnx", None)  # import onnx -> ImportError
    with pytest.raises(MissingDependencyError, match=r"vpns_fast\[onnx\]"):
        export(path, "onnx", tmp_path / "m.onnx")
    assert main(["export", str(path), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "pip install vpns_fast[onnx]" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


# --------------------------------------------------------------------------- bad files, overwrite

@pytest.fixture
def sparse_file(tmp_path):
    path, _, _ = make_checkpoint(tmp_path / "m.pt", granularity="kernel", density=0.3)
    export(path, "sparse", tmp_path / "m.vpns")
    return tmp_path / "m.vpns"


def _rewrite_metadata(path, **changes):
    tensors = st_load(path.read_bytes())
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        metadata = dict(f.metadata())
    metadata.update(changes)
    save_file(tensors, path, metadata=metadata)


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage,match", [
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "truncated|corrupted"),
    (lambda p: p.write_bytes(p.read_bytes()[:5]), "truncated"),
    (lambda p: p.write_bytes(b"garbage" * 10), "truncated|not a safetensors"),
    (_flip_last_byte, "checksum"),
    (lambda p: _rewrite_metadata(p, **{"vpns_fast.meta": "{}"}), "checksum"),
    (lambda p: _rewrite_metadata(p, **{"vpns_fast.version": "2"}), "version '2'"),
    (lambda p: _rewrite_metadata(p, **{"vpns_fast.format": "someone.else"}), "not a vpns_fast export"),
    (lambda p: save_file({"w": torch.zeros(2)}, p), "without vpns_fast metadata"),
])
def test_bad_files_raise_a_clear_error(sparse_file, damage, match):
    damage(sparse_file)
    with pytest.raises(ExportFormatError, match=match):
        load_sparse(sparse_file)
    assert issubclass(ExportFormatError, ValueError)


def test_wrong_kind_is_rejected(sparse_file):
    with pytest.raises(ExportFormatError, match="is a 'sparse' export, expected 'slim'"):
        load_slim(sparse_file)
    with pytest.raises(ExportFormatError, match="expected 'dense'"):
        load_dense(sparse_file)
    _, meta = read_export(sparse_file)
    assert meta["kind"] == "sparse"


@pytest.mark.parametrize("fmt", ["dense", "sparse", "slim"] + (["onnx"] if HAS_ONNX else []))
def test_never_overwrites_without_force(tmp_path, fmt):
    path, _, _ = make_checkpoint(tmp_path / "m.pt", prompt=False)
    out = tmp_path / f"out.{fmt}"
    out.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="force"):
        export(path, fmt, out)
    assert out.read_bytes() == b"keep me"
    export(path, fmt, out, force=True)
    assert out.read_bytes() != b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", f"out.{fmt}"]  # no temporary file left


def test_an_export_never_replaces_its_own_checkpoint(tmp_path):
    """Found by an outside trial: ``--out`` naming the checkpoint itself, with ``--force``, replaced the only copy
    of the trained weights by the export. A link to it is the same file."""
    path, _, _ = make_checkpoint(tmp_path / "m.pt", prompt=False)
    before = path.read_bytes()
    os.symlink(path, tmp_path / "link.pt")
    for out in (path, tmp_path / "link.pt"):
        with pytest.raises(ValueError, match=r"is the checkpoint being exported; write the export to another file"):
            export(path, "dense", out, force=True)
    assert path.read_bytes() == before


def test_unknown_format_and_missing_file(tmp_path):
    path, _, _ = make_checkpoint(tmp_path / "m.pt", prompt=False)
    with pytest.raises(ValueError, match="format must be one of"):
        export(path, "tflite", tmp_path / "x")
    with pytest.raises(FileNotFoundError):
        load_sparse(tmp_path / "nope.vpns")
    assert os.listdir(tmp_path) == ["m.pt"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_every_format_gets_the_usual_file_mode(tmp_path):
    path, _, _ = make_checkpoint(tmp_path / "m.pt", granularity="channel")
    formats = ("dense", "sparse", "slim") + (("onnx",) if HAS_ONNX else ())
    previous = os.umask(0o022)
    try:
        for fmt in formats:
            export(path, fmt, tmp_path / f"m.{fmt}")
    finally:
        os.umask(previous)
    modes = {fmt: oct(os.stat(tmp_path / f"m.{fmt}").st_mode & 0o777) for fmt in formats}
    assert set(modes.values()) == {"0o644"}, modes


def test_nan_in_a_prompt_inference_applies_is_refused_and_nan_scores_pass(tmp_path):
    """A NaN in the prompt makes every logit NaN: refused at export and at load. A NaN score only prunes its
    weight (|NaN| > threshold is false), so the network is sound and passes."""
    from vpns_fast.deploy.export import export, load_any

    prompt = V.PadPrompt(32, 28, pad=3)
    with torch.no_grad():
        prompt.program.view(-1)[0] = float("nan")
    save_checkpoint(tmp_path / "p.pt", make_masked(), model_name="small_resnet", model_kwargs={"num_classes": 10},
                    input_size=(3, 32, 32), prompt=prompt, meta={"config": {"protocol": "prompted"}})
    with pytest.raises(ValueError, match=r"p.pt prompt: program holds NaN values"):
        export(tmp_path / "p.pt", "dense", tmp_path / "p.dense")
    with pytest.raises(ValueError, match=r"p.pt prompt: program holds NaN values"):
        load_any(tmp_path / "p.pt")
    model = make_masked(granularity="unstructured")
    with torch.no_grad():
        model.conv1.scores.view(-1)[0] = float("nan")
    save_checkpoint(tmp_path / "s.pt", model, model_name="small_resnet", model_kwargs={"num_classes": 10},
                    input_size=(3, 32, 32))
    network = load_any(tmp_path / "s.pt")[0]
    export(tmp_path / "s.pt", "dense", tmp_path / "s.dense")
    assert not torch.isnan(network(torch.randn(1, 3, 32, 32))).any()

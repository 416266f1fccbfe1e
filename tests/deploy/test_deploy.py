"""deploy(): the inference module from every source (checkpoint, dense / sparse / slim exports,
masked modules) equals the masked PyTorch model; and the export / infer / bench-infer CLI."""
import copy
import json
import warnings

import pytest
import torch
from PIL import Image
from test_export import MAPPING, assert_close, make_checkpoint, make_masked

from vpns_fast.cli import main
from vpns_fast.deploy.export import export
from vpns_fast.deploy.runtime import DeployedModel, deploy
from vpns_fast.deploy.sparse_cpu import PrunedWeightsLeftDenseWarning
from vpns_fast.nn.prompts import normalize

SOURCES = ("checkpoint", "dense", "sparse", "slim", "module")


def _deployed(tmp_path, source, ckpt, reference, **kwargs):
    if source == "checkpoint":
        return deploy(ckpt, **kwargs)
    if source == "module":
        return deploy(reference, **kwargs)  # the PromptedNetwork itself
    out = tmp_path / f"m.{source}"
    export(ckpt, source, out)
    return deploy(out, **kwargs)


@pytest.mark.parametrize("granularity", ["unstructured", "kernel", "channel"])
@pytest.mark.parametrize("prompt", [True, False])
def test_every_source_matches_the_masked_model(tmp_path, granularity, prompt):
    ckpt, reference, size = make_checkpoint(tmp_path / "m.pt", granularity=granularity, density=0.3, prompt=prompt)
    inputs = {batch: torch.rand(batch, 3, size, size) for batch in (1, 2, 33)}
    expected = {batch: reference(x) for batch, x in inputs.items()}
    for source in SOURCES:
        module = _deployed(tmp_path, source, ckpt, reference)
        assert isinstance(module, DeployedModel) and not module.training
        assert (module.prompt is not None) == prompt, source
        structured = granularity in ("kernel", "channel")
        assert module.info["network"] == ("slim" if structured or source == "slim" else "folded"), source
        for batch, x in inputs.items():
            out = module(x)
            assert out.shape == (batch, len(MAPPING)) and not out.requires_grad
            assert_close(out, expected[batch])


def test_uint8_images_equal_their_float_version(tmp_path):
    ckpt, _, size = make_checkpoint(tmp_path / "m.pt")
    module = deploy(ckpt)
    images = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    assert_close(module(images), module(images.float() / 255), rtol=1e-5)
    with pytest.raises(ValueError, match="images: expected a shape"):
        module(torch.rand(2, 3, size + 1, size + 1))


def test_decisions_cover_every_layer_and_record_why_dense(tmp_path):
    ckpt, _, _ = make_checkpoint(tmp_path / "m.pt", granularity="unstructured")
    module = deploy(ckpt)
    layers = {name for name, m in module.network.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    assert {row["name"] for row in module.decisions} >= layers
    assert all(row["chosen"] in ("dense", "sparse") and row["reason"] for row in module.decisions
               if row["name"] in layers)
    if module.info["backend"] != "sparse_cpu":
        assert module.info["reason"]  # why the sparse CPU engine was not used
    dense = deploy(ckpt, policy="dense", slim=False)
    assert dense.info["backend"] == "torch-dense" and dense.info["network"] == "folded"
    assert all(row["chosen"] == "dense" and row["reason"] == "policy=dense" for row in dense.decisions)


def test_without_the_sparse_engine_deploy_says_so_and_runs_dense(tmp_path, monkeypatch):
    """No silent fallback: the engine's absence (extension not built, CPU not supported) is a warning naming the
    reason, and .info records it; policy="dense" asked for dense and warns nothing."""
    import warnings

    from vpns_fast.deploy import SparseEngineUnavailableWarning, sparse_cpu

    ckpt, _, _ = make_checkpoint(tmp_path / "m.pt", granularity="unstructured")
    monkeypatch.setattr(sparse_cpu, "available", lambda: (False, "the C++ extension is not built"))
    with pytest.warns(SparseEngineUnavailableWarning,
                      match="deploy: sparse CPU engine unavailable: the C\\+\\+ extension is not built; the network "
                            "runs dense with torch") as caught:
        module = deploy(ckpt, slim=False)
    assert caught[0].filename == __file__  # pointed at the caller's line
    assert module.info["backend"] == "torch-dense" and "not built" in module.info["reason"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deploy(ckpt, policy="dense", slim=False)


def test_the_readmes_own_module_example():
    """The README's example of a pruned module of one's own: mean 0 / std 1 gives the model's own logits on
    [0, 1] images (left out, ImageNet's normalization is applied); the output carries no gradient, the network
    alone keeps the input's; .info and .decisions hold what the example prints."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()
    with torch.no_grad():
        for weight in (model[0].weight, model[5].weight):
            weight.mul_(torch.rand(weight.shape) < 0.3)
    images = torch.rand(2, 3, 16, 16)
    engine = deploy(model, example_input_size=(2, 3, 16, 16), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    with torch.inference_mode():
        logits = engine(images)
    assert_close(logits, model(images).detach(), rtol=1e-4)
    assert engine.info["backend"] == "torch-dense" or engine.info["network_choice"]
    assert {"name", "chosen", "reason", "dense_ms", "sparse_ms"} <= set(engine.decisions[0])
    imagenet = deploy(model, example_input_size=(2, 3, 16, 16), policy="dense")
    assert imagenet.mean == (0.485, 0.456, 0.406) and imagenet.std == (0.229, 0.224, 0.225)
    x = images.clone().requires_grad_()
    assert not engine(x).requires_grad
    engine.network(x).sum().backward()
    expected = images.clone().requires_grad_()
    model(expected).sum().backward()
    assert_close(x.grad, expected.grad, rtol=1e-4)


def test_release_protocol_checkpoints_run_without_the_prompt(tmp_path):
    ckpt, reference, size = make_checkpoint(tmp_path / "m.pt", protocol="release")
    module = deploy(ckpt)
    assert module.prompt is None and module.image_size == size + 4  # the model's own input size
    x = torch.rand(2, 3, size + 4, size + 4)
    assert_close(module(x), reference(x, use_prompt=False))


def test_plain_and_masked_modules(tmp_path):
    masked = make_masked(granularity="channel")
    module = deploy(masked, image_size=32)
    x = torch.rand(2, 3, 32, 32)
    assert_close(module(x), masked(normalize(x)))
    assert module.mapping is None
    with pytest.raises(ValueError, match="policy"):
        deploy(masked, policy="fastest")
    with pytest.raises(TypeError):
        deploy(42)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    ckpt, _, _ = make_checkpoint(tmp_path / "m.pt")
    with pytest.raises(ValueError, match="cuda"):
        deploy(ckpt, device="cuda")


def test_cuda_matches_the_masked_model(tmp_path, cuda_or_skip):
    ckpt, reference, size = make_checkpoint(tmp_path / "m.pt", granularity="channel")
    module = deploy(ckpt, device="cuda")
    x = torch.rand(33, 3, size, size)
    assert_close(module(x.cuda()).cpu(), reference(x), rtol=1e-3)  # cuDNN may use TF32


# --------------------------------------------------------------------------- CLI

def test_cli_export_infer_bench(tmp_path, capsys):
    names = [f"class-{i}" for i in range(len(MAPPING))]
    ckpt, reference, size = make_checkpoint(tmp_path / "m.pt", class_names=names)
    for fmt in ("dense", "sparse", "slim"):
        assert main(["export", str(ckpt), "--format", fmt, "--out", str(tmp_path / f"m.{fmt}")]) == 0
    assert "channels removed" in capsys.readouterr().out
    assert main(["export", str(ckpt), "--format", "slim", "--out", str(tmp_path / "m.slim")]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["export", str(ckpt), "--format", "slim", "--out", str(tmp_path / "m.slim"), "--force"]) == 0

    images = []
    for i in range(2):
        path = tmp_path / f"img{i}.png"
        Image.fromarray((torch.rand(40, 36, 3) * 255).byte().numpy()).save(path)
        images.append(str(path))
    capsys.readouterr()
    assert main(["infer", str(tmp_path / "m.sparse"), *images, "--top", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in rows] == images and all(len(r["top"]) == 2 for r in rows)
    assert rows[0]["top"][0]["name"] == names[rows[0]["top"][0]["class"]]
    assert main(["infer", str(tmp_path / "m.slim"), images[0], "--top", "1"]) == 0
    assert "class-" in capsys.readouterr().out
    assert main(["infer", str(tmp_path / "m.slim"), str(tmp_path / "missing.png")]) == 2

    # infer deploys with policy measure unless told (as deploy()), on --threads threads, and gives the caller's
    # thread count back
    from vpns_fast.deploy import runtime as runtime_module

    seen = []
    real_deploy = runtime_module.deploy

    def recording_deploy(*args, **kwargs):
        seen.append((kwargs["policy"], torch.get_num_threads()))
        return real_deploy(*args, **kwargs)

    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runtime_module, "deploy", recording_deploy)
        assert main(["infer", str(tmp_path / "m.sparse"), images[0], "--threads", "1"]) == 0
        assert main(["infer", str(tmp_path / "m.sparse"), images[0], "--policy", "sparse"]) == 0
    assert seen == [("measure", 1), ("sparse", threads)] and torch.get_num_threads() == threads

    capsys.readouterr()
    assert main(["bench-infer", str(ckpt), "--batch", "1,2", "--iters", "1", "--warmup", "0", "--threads", "1",
                 "--json"]) == 0
    rows = [r for r in json.loads(capsys.readouterr().out) if r["backend"] != "onnxruntime"]  # test_bench_infer.py
    assert {(r["batch"], r["backend"]) for r in rows} == {(1, "deploy"), (1, "dense-torch"), (2, "deploy"),
                                                         (2, "dense-torch")}
    assert all(r["images_per_s"] > 0 for r in rows)
    assert main(["bench-infer", str(tmp_path / "m.dense"), "--batch", "1", "--iters", "1", "--warmup", "0"]) == 0
    assert "images/s" in capsys.readouterr().out


@pytest.mark.parametrize("source", ["checkpoint", "module"])
def test_deploy_inside_inference_mode(tmp_path, source):
    ckpt, reference, size = make_checkpoint(tmp_path / "m.pt", density=0.3)
    x = torch.rand(2, 3, size, size)
    expected = deploy(ckpt if source == "checkpoint" else reference, policy="sparse")(x)
    with torch.inference_mode():
        module = deploy(ckpt if source == "checkpoint" else reference, policy="sparse")
        assert_close(module(x), expected)
    assert_close(module(x), expected)  # and the engine built there still runs outside it


@pytest.mark.parametrize("source", ["checkpoint", "dense", "module"])
def test_deploy_and_export_under_a_float64_default_dtype(tmp_path, source):
    """Code that sets torch's default dtype to float64 still deploys and exports a float32 model: the example
    images deploy() measures with are float32, as forward() passes them on, and every layer stays float32 (the
    slimmed network's rebuilt layers were float64, and the engine ran them dense: PrunedWeightsLeftDenseWarning)."""
    ckpt, reference, size = make_checkpoint(tmp_path / "m.pt", density=0.3)
    x = torch.rand(2, 3, size, size)
    expected = deploy(ckpt if source == "checkpoint" else reference, policy="sparse")(x)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert_close(_deployed(tmp_path, source, ckpt, reference, policy="sparse")(x), expected)  # exports too
        source_path = tmp_path / "m.dense" if source == "dense" else ckpt if source == "checkpoint" else reference
        with warnings.catch_warnings():
            warnings.simplefilter("error", PrunedWeightsLeftDenseWarning)
            deployed = deploy(source_path, policy="measure")
        assert_close(deployed(x), expected)
        assert {t.dtype for t in deployed.state_dict().values() if t.is_floating_point()} == {torch.float32}
    finally:
        torch.set_default_dtype(previous)


def test_deploy_leaves_the_global_random_stream_to_other_threads(tmp_path):
    """The caller's stream is where it was after deploy(); a module is deployed without forking and restoring
    it, so a thread drawing meanwhile never gets the same numbers again (a restore rewinds its draws)."""
    import threading
    import time

    ckpt, reference, size = make_checkpoint(tmp_path / "m.pt", density=0.3)
    for source in (ckpt, reference):
        torch.manual_seed(7)
        expected = torch.rand(3)
        torch.manual_seed(7)
        deploy(source, policy="measure")
        assert torch.equal(torch.rand(3), expected)
    draws, stop = [], threading.Event()

    def sampler():
        while not stop.is_set():
            draws.append(int(torch.randint(0, 2**62, (1,))))
            time.sleep(0.0005)

    thread = threading.Thread(target=sampler)
    thread.start()
    try:
        for _ in range(2):
            deploy(reference, policy="measure")
    finally:
        stop.set()
        thread.join()
    assert len(draws) > 10 and len(set(draws)) == len(draws)


def test_input_stage_and_label_mapping_are_checked_when_deploying(tmp_path):
    """Each bad argument is refused by deploy() with its name, not by every call later (or never: a zero std
    gave non-finite logits, fractional indices were truncated)."""
    ckpt, reference, size = make_checkpoint(tmp_path / "m.pt", density=0.3)
    network = reference.model  # a plain module: deploy() takes the input stage from the arguments
    refused = [({"std": (0.0, 0.2, 0.2)}, "std: expected 3 positive numbers"),
               ({"std": (-1.0, 0.2, 0.2)}, "std: expected 3 positive"),
               ({"mean": (0.5, 0.5)}, "mean: expected 3 finite numbers"),
               ({"mean": (0.5, float("nan"), 0.5)}, "mean: expected 3 finite"),
               ({"mean": "abc"}, "mean: expected 3 finite"),
               ({"image_size": 0}, "image_size: expected a positive int, got 0"),
               ({"image_size": 64.5}, "image_size: expected a positive int, got 64.5"),
               ({"image_size": True}, "image_size: expected a positive int"),
               ({"label_mapping": [0.5, 1.7]}, "label_mapping: expected a non-empty list of class indices"),
               ({"label_mapping": [-1, 2]}, "label_mapping: expected"),
               ({"label_mapping": [[0, 1], [2, 3]]}, "label_mapping: expected"),
               ({"label_mapping": []}, "label_mapping: expected"),
               ({"label_mapping": [0, 1], "policy": "dense"}, None)]
    outputs = network(normalize(torch.rand(1, 3, size, size))).shape[1]
    refused.append(({"label_mapping": [0, outputs]}, f"label_mapping: index {outputs} is out of range for the "
                                                     f"network's {outputs} outputs"))
    for kwargs, message in refused:
        if message is None:
            module = deploy(network, image_size=size, **kwargs)
            assert module(torch.rand(2, 3, size, size)).shape == (2, 2)
            continue
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            deploy(network, image_size=kwargs.pop("image_size", size), policy="dense", **kwargs)
    # a PromptedNetwork carries its own input path and mapping, and a prompt its own normalization and size:
    # arguments that differ are refused rather than ignored or applied
    contradictions = [({"mean": (0.5, 0.5, 0.5)}, r"mean: the PromptedNetwork normalizes with its own mean \(0\.485"),
                      ({"label_mapping": [0, 1]}, "label_mapping: the PromptedNetwork carries its own label mapping"),
                      ({"prompt": copy.deepcopy(reference.prompt)}, "prompt: the PromptedNetwork carries its own"),
                      ({"image_size": size + 8}, f"image_size: the prompt takes {size}x{size} images, got {size + 8}")]
    for kwargs, message in contradictions:
        with pytest.raises(ValueError, match=message):
            deploy(reference, policy="dense", **kwargs)
    with pytest.raises(ValueError, match="mean: the prompt normalizes with its own mean"):
        deploy(network, prompt=reference.prompt, mean=(0.5, 0.5, 0.5), policy="dense")
    agreeing = deploy(reference, mean=reference.prompt.mean, label_mapping=reference.mapping.mapping.tolist(),
                      prompt=reference.prompt, image_size=size, policy="dense")
    x_same = torch.rand(2, 3, size, size)
    assert_close(agreeing(x_same), reference(x_same))
    # a file brings its own input stage: the module-only arguments are refused rather than ignored
    for name, value in (("mean", (0.5, 0.5, 0.5)), ("label_mapping", [0]), ("image_size", 32)):
        with pytest.raises(ValueError, match=f"{name}: only for a module; a file carries its own"):
            deploy(ckpt, **{name: value})

    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return {"out": self.body(x)}

    with pytest.raises(ValueError, match="label_mapping: the network returns dict, not"):
        deploy(TwoHeads(), image_size=16, label_mapping=[0], policy="dense")
    # logits with trailing dimensions, (B, classes, 1, 1), map along dimension 1 as before
    pooled = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.AdaptiveAvgPool2d(1))
    module = deploy(pooled, image_size=16, label_mapping=[4, 0], policy="dense")
    x16 = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert_close(module(x16), pooled(normalize(x16))[:, [4, 0]])


def test_a_deployed_module_pickled_before_image_shape_and_mapping_end(tmp_path):
    """Modules pickled by an earlier version lack the attributes added since: unpickling fills them in."""
    import pickle

    ckpt, reference, size = make_checkpoint(tmp_path / "m.pt", density=0.3, prompt=False)
    module = deploy(ckpt, policy="dense")
    x = torch.rand(2, 3, size, size)
    expected = module(x)
    del module.__dict__["image_shape"], module.__dict__["mapping_end"]
    restored = pickle.loads(pickle.dumps(module))
    assert restored.image_shape == (size, size) and restored.mapping_end == int(restored.mapping.max()) + 1
    assert_close(restored(x), expected)


def test_a_module_holding_nan_is_refused_by_the_name_of_the_tensor(tmp_path):
    """As for a file: the engine's own output check would name the first layer whose output differed."""
    ckpt, reference, size = make_checkpoint(tmp_path / "m.pt", density=0.3)
    network = reference.model
    name, weight = next((n, p) for n, p in network.named_parameters() if p.dim() == 4)
    with torch.no_grad():
        weight.view(-1)[0] = float("nan")
    for policy in ("sparse", "measure", "dense"):
        with pytest.raises(ValueError, match=f"model_or_path: {name} holds NaN values"):
            deploy(network, image_size=size, policy=policy)


def test_a_network_trained_on_images_that_are_not_square(tmp_path, capsys):
    """A checkpoint saved with input_size (3, 24, 40) deploys for 24x40 images (it was made square, 40x40, and
    refused the network's own images), and so do its exports and `vpns infer`."""
    from test_export import make_masked

    from vpns_fast.pruning.checkpoint import save_checkpoint

    model = make_masked("small_resnet", "unstructured", 0.4)
    path = tmp_path / "wide.pt"
    save_checkpoint(path, model, model_name="small_resnet", model_kwargs={"num_classes": 10}, input_size=(3, 24, 40))
    x = torch.rand(2, 3, 24, 40)
    with torch.no_grad():
        expected = model.eval()(normalize(x))
    export(path, "dense", tmp_path / "wide.dense")
    for source in (path, tmp_path / "wide.dense"):
        for policy in ("sparse", "dense"):
            module = deploy(source, policy=policy)
            assert module.image_shape == (24, 40) and module.image_size is None
            assert_close(module(x), expected)
            with pytest.raises(ValueError, match=r"images: expected a shape \(B, 3, 24, 40\), got \(2, 3, 40, 40\)"):
                module(torch.rand(2, 3, 40, 40))
    with pytest.raises(ValueError, match="example_input_size: the module takes 24x40 images, got 40x40"):
        deploy(path, example_input_size=(1, 3, 40, 40))
    Image.new("RGB", (64, 48)).save(tmp_path / "img.png")
    assert main(["infer", str(path), str(tmp_path / "img.png"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["top"]
    # evaluation's datasets resize to squares: refused rather than run on 40x40 images
    from vpns_fast.training.evaluation import evaluate_checkpoint

    with pytest.raises(ValueError, match=r"wide.pt: its network takes 24x40 images .* evaluation resizes to squares"):
        evaluate_checkpoint(str(path), "synthetic", device="cpu", limit=8)


def test_out_of_range_pixels_are_refused(tmp_path):
    ckpt, _, size = make_checkpoint(tmp_path / "m.pt")
    module = deploy(ckpt)
    x = torch.rand(2, 3, size, size)
    assert_close(module(x.double()), module(x))  # any float dtype in [0, 1]
    module((x * 1.08 - 0.04).clamp(-0.05, 1.05))  # resampling overshoot is within the slack
    for images, message in ((x * 255, r"must lie in \[0, 1\]"), ((x * 255).long(), "dtype torch.int64"),
                            (x.masked_fill(x > 0.9, float("nan")), "NaN or Inf"),
                            (x.masked_fill(x > 0.9, float("inf")), "NaN or Inf")):
        with pytest.raises(ValueError, match=f"images: .*{message}"):
            module(images)


def test_a_checkpoint_saved_in_half_precision_deploys_in_float32(tmp_path):
    """Found in review: loading into the saved dtype made a float16 checkpoint's network float16, which deploy()
    could not run; it is rebuilt in float32, as before."""
    import vpns_fast as V
    from vpns_fast.models import build_model
    from vpns_fast.pruning.checkpoint import save_checkpoint

    model = V.sparsify(build_model("small_resnet", num_classes=10), "unstructured").half()
    save_checkpoint(tmp_path / "half.pt", model, model_name="small_resnet", model_kwargs={"num_classes": 10},
                    input_size=(3, 32, 32))
    deployed = deploy(tmp_path / "half.pt", policy="sparse")
    assert {t.dtype for t in deployed.state_dict().values() if t.is_floating_point()} == {torch.float32}
    assert deployed(torch.rand(2, 3, 32, 32)).isfinite().all()


@pytest.mark.parametrize("policy", ["measure", "dense"])
def test_a_float64_model_given_for_a_file_is_refused_as_a_float64_module_is(tmp_path, policy):
    """deploy("ckpt.pt", model=net().double()) failed on the engine's example, "example_input: the model fails on a
    tensor of shape ...", where deploy(net().double()) says "call .float() on the model first" (an outside trial)."""
    from torch import nn

    from vpns_fast.pruning.checkpoint import save_checkpoint

    def net():
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    save_checkpoint(tmp_path / "net.pt", net().eval(), model_name=None, input_size=(3, 8, 8))
    with pytest.raises(ValueError, match=r"^model: float32 models only, got torch.float64 tensors \(call .float\(\) "
                                         r"on the model first; on float32 images it fails: RuntimeError: "):
        deploy(tmp_path / "net.pt", model=net().double(), policy=policy)
    assert deploy(tmp_path / "net.pt", model=net(), policy=policy)(torch.rand(2, 3, 8, 8)).shape == (2, 4)


def test_a_users_module_keeps_its_own_dtypes_when_a_checkpoint_is_loaded_into_it(tmp_path):
    """Found in review: rebuilding in float32 is for stock networks; a module passed as ``model=`` with a float64
    head its forward casts to must keep that head float64."""
    from torch import nn

    from vpns_fast.pruning.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint

    class Float64Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 8, 3), nn.Linear(8, 4).double()

        def forward(self, x):
            return self.head(self.conv(x).mean((2, 3)).double()).float()

    save_checkpoint(tmp_path / "mixed.pt", Float64Head().eval(), model_name=None, input_size=(3, 8, 8))
    rebuilt = model_from_checkpoint(load_checkpoint(tmp_path / "mixed.pt"), Float64Head())
    assert rebuilt.head.weight.dtype == torch.float64 and rebuilt.conv.weight.dtype == torch.float32
    assert deploy(tmp_path / "mixed.pt", model=Float64Head(), policy="dense")(torch.rand(2, 3, 8, 8)).shape == (2, 4)

"""Graph rewrites of the CPU engine (``vpns_fast.deploy.fusion``) and the sparse convolution's fused
epilogue: batch norm folded into convolutions, residual add and ReLU computed in the kernel's output
loop. Every rewritten model must give the original's output; models that cannot be traced keep their
layers and say why; the engine runs in and out of inference mode and from two threads at once."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from helpers import outputs_from_two_threads, run_in_threads
from tolerance import assert_close
from torch import fx, nn

from vpns_fast.deploy import call_plan, fusion, sparse_cpu

_OK, _REASON = sparse_cpu.available()
pytestmark = pytest.mark.skipif(not _OK, reason=_REASON)


def masked(shape, density, generator):
    weight = torch.randn(shape, generator=generator)
    return weight * (torch.rand(shape, generator=generator) < density)


@pytest.mark.parametrize("batch", [1, 2, 33])
@pytest.mark.parametrize("geometry", [(6, 5, 11, 13, 3, 1, 1), (7, 4, 12, 9, 1, 2, 0), (3, 8, 17, 15, 7, 2, 3)])
@pytest.mark.parametrize("epilogue", ["relu", "add", "add+relu"])
def test_fused_epilogue_matches_unfused(batch, geometry, epilogue):
    in_channels, out_channels, height, width, kernel, stride, padding = geometry
    generator = torch.Generator().manual_seed(batch * 100 + kernel)
    weight = masked((out_channels, in_channels, kernel, kernel), 0.3, generator)
    bias = torch.randn(out_channels, generator=generator)
    x = torch.randn(batch, in_channels, height, width, generator=generator)
    conv = F.conv2d(x, weight, bias, stride, padding)
    residual = torch.randn(conv.shape, generator=generator) if "add" in epilogue else None
    expected = conv + residual if residual is not None else conv
    expected = torch.relu(expected) if "relu" in epilogue else expected
    layer = sparse_cpu.SparseConv2d(weight, bias, stride, padding, relu="relu" in epilogue)
    got = layer(x, residual)
    assert_close(got, expected, baseline=expected, reduction=in_channels * kernel * kernel)
    if "relu" in epilogue:
        assert float(got.min()) >= 0.0


def test_fused_relu_keeps_nan_and_residual_shape_is_checked():
    """NaN stays NaN under the fused ReLU. A residual of another shape that broadcasts (a fusion decided on a
    batch-1 example, met with a larger batch) is added by torch, as the model's own add would; one that
    does not broadcast is refused by name."""
    weight = torch.ones(2, 1, 1, 1)
    layer = sparse_cpu.SparseConv2d(weight, None, relu=True)
    x = torch.tensor([[[[1.0, float("nan")], [-1.0, 2.0]]]])
    out = layer(x)
    assert torch.isnan(out[0, :, 0, 1]).all() and torch.equal(out[0, :, 1, 0], torch.zeros(2))
    for dense in (False, True):
        fused = sparse_cpu.DenseConv2d(weight, relu=True) if dense else layer
        batch = torch.cat([x, -x, 2 * x])
        template = torch.tensor([0.5, -3.0]).view(1, 2, 1, 1)
        expected = torch.relu(F.conv2d(batch, weight) + template)
        assert torch.equal(fused(batch, template).isnan(), expected.isnan())
        torch.testing.assert_close(fused(batch, template), expected, equal_nan=True)
        with pytest.raises(ValueError, match=r"residual of shape \(1, 2, 3, 3\) does not broadcast"):
            fused(x, torch.zeros(1, 2, 3, 3))
    with pytest.raises(ValueError, match="residual"):
        layer(x, torch.zeros(1, 2, 2, 2, dtype=torch.float64))


def pruned_resnet18(density=0.1):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(torch.rand_like(m.weight) < density)
            if isinstance(m, nn.BatchNorm2d):  # statistics that make folding change the weights
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


def test_resnet_fusion_folds_every_batchnorm_and_fuses_every_epilogue():
    model = pruned_resnet18()
    x = torch.randn(2, 3, 64, 64)
    summary = {}
    converted, table = sparse_cpu.convert_for_cpu(model, x, policy="sparse", summary=summary)
    with torch.no_grad():
        expected, got = model(x), converted(x)
    assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    assert isinstance(converted, fx.GraphModule)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in converted.modules())
    # 20 convolutions each with its batch norm; 8 blocks x (conv1: relu, conv2: add + relu) + the stem's relu
    assert summary["batchnorm_folded"] == 20 and summary["epilogues_fused"] == 17
    rows = {row["name"]: row for row in table}
    assert rows["conv1"]["fused"] == ["batchnorm", "relu"]
    assert rows["layer2.0.conv2"]["fused"] == ["batchnorm", "add", "relu"]  # residual from the downsample branch
    assert rows["layer2.0.downsample.0"]["fused"] == ["batchnorm"]
    assert rows["fc"]["fused"] == []
    assert all(isinstance(m, nn.BatchNorm2d) for m in [model.bn1])  # the original is left alone
    # the rewritten model survives the usual round trips
    for clone in (copy.deepcopy(converted), pickle.loads(pickle.dumps(converted))):
        with torch.no_grad():
            assert torch.equal(clone(x), got)


def test_fusion_matches_the_unfused_engine_and_the_dense_model_when_layers_stay_dense():
    model = pruned_resnet18()
    x = torch.randn(1, 3, 48, 48)
    fused, _ = sparse_cpu.convert_for_cpu(model, x, policy="dense")
    unfused, _ = sparse_cpu.convert_for_cpu(model, x, policy="dense", fuse=False)
    with torch.no_grad():
        expected = model(x)
        assert_close(fused(x), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
        assert torch.equal(unfused(x), expected)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())  # folded for dense layers too


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return torch.relu(y) if float(y.sum()) > 0 else y


def test_untraceable_model_is_converted_without_rewrites_and_says_why():
    model = Branchy().eval()
    x = torch.randn(1, 3, 10, 10)
    summary = {}
    converted, table = sparse_cpu.convert_for_cpu(model, x, policy="sparse", summary=summary)
    assert "cannot trace Branchy" in summary["fusion"] and summary["batchnorm_folded"] == 0
    assert isinstance(converted.bn, nn.BatchNorm2d) and isinstance(converted.conv, sparse_cpu.SparseConv2d)
    with torch.no_grad():
        assert_close(converted(x), model(x), rtol=1e-4, atol=1e-5)
    assert table[0]["fused"] == []


class SharedConvOutput(nn.Module):
    """The conv output feeds the batch norm and something else: it must not be folded, and a conv
    whose output is added twice keeps its add outside."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        z = self.conv2(x)
        return self.bn(y) + y + z + z


def test_layers_with_several_uses_are_not_rewritten():
    model = SharedConvOutput().eval()
    with torch.no_grad():
        model.bn.running_var.fill_(2.0)
    x = torch.randn(2, 4, 7, 7)
    summary = {}
    converted, table = sparse_cpu.convert_for_cpu(model, x, policy="sparse", summary=summary)
    assert summary["batchnorm_folded"] == 0 and summary["epilogues_fused"] == 0
    with torch.no_grad():
        assert_close(converted(x), model(x), rtol=1e-4, atol=1e-5)


def test_fold_batchnorm_leaves_training_mode_batchnorm():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    graph = fx.symbolic_trace(model)
    graph.get_submodule("1").train()
    assert fusion.fold_batchnorm(graph) == []
    graph.eval()
    assert fusion.fold_batchnorm(graph) == ["0"]


def test_engine_built_and_called_in_inference_mode_and_no_grad():
    model = pruned_resnet18()
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        expected = model(x)
    for context in (torch.inference_mode, torch.no_grad):
        with context():
            converted, _ = sparse_cpu.convert_for_cpu(model, x, policy="sparse")
            inside = converted(x)
        outside = converted(x)
        assert_close(inside, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
        assert torch.equal(inside, outside)


def test_two_threads_calling_one_converted_model_get_their_own_results():
    model = pruned_resnet18()
    converted, _ = sparse_cpu.convert_for_cpu(model, torch.randn(1, 3, 40, 40), policy="sparse")
    inputs = [torch.randn(batch, 3, size, size) for batch, size in [(1, 40), (3, 48), (2, 40), (1, 56)]]
    with torch.no_grad():
        expected = [converted(x) for x in inputs]
    for index, got in outputs_from_two_threads(converted, inputs, rounds=5):
        assert torch.equal(got, expected[index])


def test_deployed_module_from_two_threads(tmp_path):
    """The whole deployed pipeline (pixel check, prompt, engine, label mapping) shared by two threads."""
    from test_export import make_checkpoint

    from vpns_fast.deploy.runtime import deploy

    ckpt, _, size = make_checkpoint(tmp_path / "m.pt", granularity="unstructured", density=0.2, prompt=True)
    module = deploy(ckpt, policy="sparse")
    assert module.info["backend"] == "sparse_cpu" and "torch.fx" in module.info["fusion"]
    images = [torch.rand(batch, 3, size, size) for batch in (1, 2, 3, 4)]
    expected = [module(x) for x in images]
    results = {}

    def work(thread):
        for round_ in range(4):
            for i in range(thread, len(images), 2):
                results[(thread, round_, i)] = module(images[i])

    assert not run_in_threads(work) and len(results) == 2 * 4 * 2
    assert all(torch.equal(got, expected[i]) for (_, _, i), got in results.items())


def _sparse_conv(generator, channels=4, **kwargs):
    conv = nn.Conv2d(channels, channels, 3, padding=1, **kwargs)
    with torch.no_grad():
        conv.weight.mul_((torch.rand(conv.weight.shape, generator=generator) < 0.3).float())
    return conv


class _TwoConvs(nn.Module):
    def __init__(self, g):
        super().__init__()
        self.c0, self.c1 = _sparse_conv(g), _sparse_conv(g)


class AliasedInplaceResidual(_TwoConvs):
    """``r += conv(x)`` where ``r`` is read again afterwards."""

    def forward(self, x):
        r = self.c0(x)
        alias = r
        r += self.c1(x)
        return (r + alias,)


class WrittenBetween(_TwoConvs):
    """The conv's input is changed in place between the conv and its add."""

    def forward(self, x):
        h = self.c0(x)
        a = self.c1(h)
        h.relu_()
        return (a + h,)


class CalledTwice(nn.Module):
    """One conv called from two places: one call followed by batch norm, one by ReLU."""

    def __init__(self, g):
        super().__init__()
        self.c, self.bn = _sparse_conv(g), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.c(x)) + 0, torch.relu(self.c(x)), self.c(x)


class NotAResidual(nn.Module):
    """``conv(x) + p`` with a broadcast parameter, and ``conv(x) + int``: not same-shape residuals."""

    def __init__(self, g):
        super().__init__()
        self.c, self.d = _sparse_conv(g), _sparse_conv(g)
        self.p = nn.Parameter(torch.randn(1, 4, 1, 1, generator=g))

    def forward(self, x):
        return {"broadcast": self.c(x) + self.p, "number": self.d(x) + x.shape[1]}


@pytest.mark.parametrize("cls", [AliasedInplaceResidual, WrittenBetween, CalledTwice, NotAResidual])
def test_rewrites_that_would_change_the_result_are_not_made(cls):
    """Each model is one the graph rewrite must not change (an outside review's cases): either it is left
    alone, or the end-to-end check (structured outputs included) refuses it and the model is converted
    without the rewrite. Either way the outputs are the model's own."""
    g = torch.Generator().manual_seed(7)
    model = cls(g).eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.running_mean.uniform_(-1, 1, generator=g)
                module.running_var.uniform_(0.5, 2, generator=g)
                module.weight.uniform_(-2, 2, generator=g)
    x = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        expected = sparse_cpu._output_values(model(x.clone()))
    summary = {}
    converted, _ = sparse_cpu.convert_for_cpu(model, x.clone(), policy="sparse", summary=summary)
    with torch.no_grad():
        got = sparse_cpu._output_values(converted(x.clone()))
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert summary["fusion"]


def test_a_rewrite_that_changes_a_structured_output_is_refused_and_redone_without_it(monkeypatch):
    """The safety net itself: a deliberately wrong rewrite (the fused ReLU flag on a conv whose output is
    also returned raw) is caught on a tuple output and the model converted again without the rewrite."""
    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(_sparse_conv(g), nn.ReLU()).eval()

    def wrong(graph_module, fusable, example):
        for module in graph_module.modules():
            if isinstance(module, fusable):
                module.relu = True
        return {"0": ["relu"]}

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = model

        def forward(self, x):
            return self.body[0](x), self.body(x)

    monkeypatch.setattr(fusion, "fuse_epilogues", wrong)
    x = torch.randn(1, 4, 6, 6, generator=g)
    summary = {}
    converted, _ = sparse_cpu.convert_for_cpu(Twice().eval(), x, policy="sparse", summary=summary)
    assert summary["fusion"].startswith("graph rewrite refused (output 0 differs")
    with torch.no_grad():
        raw, activated = converted(x)
        assert float(raw.min()) < 0 and float(activated.min()) >= 0


def test_a_trace_does_not_break_modules_called_in_other_threads():
    """torch.fx patches nn.Module.__call__ for the whole process while it traces; a module another thread calls
    meanwhile (a server deploying a second model while it serves the first) must run as usual. Two traces at
    once must each get their whole graph."""
    import threading

    served, errors, traced_started = threading.Event(), [], threading.Event()
    layer = nn.Linear(4, 3)
    call, getattr_ = nn.Module.__call__, nn.Module.__getattr__  # as they were before any trace here

    class WaitsForTheServer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(4, 4)

        def forward(self, x):  # runs in the tracing thread, with the patches in place
            traced_started.set()
            served.wait(timeout=30)
            return self.inner(x)

    def serve():
        traced_started.wait(timeout=30)
        try:
            with torch.no_grad():
                layer(torch.ones(2, 4))
                layer.weight  # noqa: B018 (an attribute read, through nn.Module.__getattr__'s patch too)
        except Exception as exc:  # what the test looks for
            errors.append(f"{type(exc).__name__}: {exc}")
        served.set()

    server = threading.Thread(target=serve)
    server.start()
    graph_module, reason = fusion.trace(WaitsForTheServer())
    server.join()
    assert errors == [] and reason == ""
    assert [node.target for node in graph_module.graph.nodes if node.op == "call_module"] == ["inner"]

    class Pair(nn.Module):
        def __init__(self, pause):
            super().__init__()
            self.first, self.second, self.pause = nn.Linear(4, 4), nn.Linear(4, 4), pause

        def forward(self, x):
            self.pause()
            return self.second(self.first(x))

    other_started, first_done, results = threading.Event(), threading.Event(), {}

    def trace_in_thread(name, model):
        results[name] = fusion.trace(model)
        if name == "a":
            first_done.set()

    # Untaken turns would interleave them: the first trace pauses until the second has started, the second
    # until the first has finished (and restored what it patched). Taking turns, each waits 0.5 s at most.
    first = threading.Thread(target=trace_in_thread, args=("a", Pair(lambda: other_started.wait(timeout=0.5))))
    second = threading.Thread(target=trace_in_thread, args=(
        "b", Pair(lambda: (other_started.set(), first_done.wait(timeout=0.5)))))
    first.start()
    second.start()
    first.join()
    second.join()
    for name in ("a", "b"):
        graph_module, reason = results[name]
        assert reason == "" and [node.target for node in graph_module.graph.nodes
                                 if node.op == "call_module"] == ["first", "second"], (name, reason)
    assert nn.Module.__call__ is call and nn.Module.__getattr__ is getattr_  # every patch undone


def test_a_traced_assert_says_the_values_it_was_given():
    """torch.fx formats an assert's f-string message on the trace's proxies ("got Proxy(getitem_2)"); the
    trace formats it from the values the call sees, as the model does, and survives pickling."""

    class ChecksItsInput(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            height = x.shape[2]
            torch._assert(height == 8, f"Wrong image height {{h}}! Expected 8 but got {height} ({x.shape[3]} wide)!")
            return self.conv(x)

    graph_module, reason = fusion.trace(ChecksItsInput())
    assert reason == ""
    assert graph_module(torch.randn(1, 3, 8, 8)).shape == (1, 4, 6, 6)
    for module in (graph_module, pickle.loads(pickle.dumps(graph_module))):
        with pytest.raises(AssertionError) as refused:
            module(torch.randn(1, 3, 9, 7))
        assert str(refused.value) == "Wrong image height {h}! Expected 8 but got 9 (7 wide)!"


class _ConvBatchNormActivation(nn.Module):
    """conv -> batch norm -> activation, as EfficientNet's and MobileNet's blocks: the activation a module, or
    (``activation`` None) torch's function ``function``."""

    def __init__(self, g, activation: nn.Module | None, function=F.silu, in_place: bool = True):
        super().__init__()
        self.conv = _sparse_conv(g)
        self.bn = nn.BatchNorm2d(4).eval()
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5, generator=g)
            self.bn.running_var.uniform_(0.5, 1.5, generator=g)
        self.activation, self.function, self.in_place = activation, function, in_place
        self.head = _sparse_conv(g)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if self.activation is not None:
            y = self.activation(y)
        else:
            y = self.function(y, inplace=True) if self.in_place else self.function(y)
        return self.head(y)


class _NotQuiteSiLU(nn.SiLU):
    def forward(self, x):
        return super().forward(x) + 1.0


# each activation an epilogue computes: its module, torch's function, whether both take inplace=
_ACTIVATIONS = {"relu": (nn.ReLU, F.relu, True), "silu": (nn.SiLU, F.silu, True), "relu6": (nn.ReLU6, F.relu6, True),
                "hardswish": (nn.Hardswish, F.hardswish, True), "sigmoid": (nn.Sigmoid, torch.sigmoid, False),
                "hardsigmoid": (nn.Hardsigmoid, F.hardsigmoid, True)}


@pytest.mark.parametrize("policy", ["sparse", "measure"])
@pytest.mark.parametrize("name", sorted(_ACTIVATIONS))
def test_an_activation_after_a_conv_runs_in_its_epilogue(name, policy):
    """An activation the epilogue computes (its module, in place or not, or torch's function) after a conv and
    its batch norm goes into the conv's epilogue, sparse or DenseConv2d; the module with a hook stays a module
    of its own (the hook must run). A subclass of nn.SiLU that computes something more is traced through: its
    F.silu is fused and the rest stays. Outputs equal the model's."""
    assert set(_ACTIVATIONS) == set(sparse_cpu.EPILOGUE_ACTIVATIONS)
    # what the rewrite recognizes is what the epilogues compute (fusion cannot import sparse_cpu: the other way)
    for names in (fusion._ACTIVATION_MODULES.values(), fusion._ACTIVATION_FUNCTIONS.values(),
                  fusion._ACTIVATION_METHODS.values()):
        assert set(names) <= set(sparse_cpu.EPILOGUE_ACTIVATIONS)
    assert set(fusion._ACTIVATION_MODULES.values()) == set(sparse_cpu.EPILOGUE_ACTIVATIONS)
    module_type, function, in_place = _ACTIVATIONS[name]
    g = torch.Generator().manual_seed(11)
    hooked = module_type()
    hooked.register_forward_hook(lambda module, args, out: None)
    cases = [(module_type(), True), (None, True), (hooked, False)]
    if in_place:
        cases.append((module_type(inplace=True), True))
    if name == "silu":
        cases.append((_NotQuiteSiLU(), True))
    if name == "relu6":  # bounds of its own (an nn.Hardtanh's attributes): not the ReLU6 the epilogue computes
        other_bounds = nn.ReLU6()
        other_bounds.max_val = 4.0
        cases.append((other_bounds, False))
    x = torch.randn(2, 4, 9, 7, generator=g) * 4
    for activation, fused in cases:
        model = _ConvBatchNormActivation(g, activation, function, in_place).eval()
        with torch.no_grad():
            expected = model(x.clone())
        summary = {}
        converted, table = sparse_cpu.convert_for_cpu(model, x.clone(), policy=policy, repeats=2, summary=summary)
        conv = converted.get_submodule("conv")
        row = next(row for row in table if row["name"] == "conv")
        if fused:
            assert conv.activation == name and row["fused"] == ["batchnorm", name], (activation, row)
            assert not any(type(m) is module_type for m in converted.modules())
        else:
            assert conv.activation is None and name not in row["fused"], (activation, row)
        with torch.no_grad():
            assert_close(converted(x.clone()), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dense", [False, True])
def test_activation_attribute_relu_flag_and_old_pickles(dense):
    """``activation`` is what the epilogue applies; ``relu`` reads and sets it as the flag it was; a name the
    epilogue does not know, or relu=True with another activation, is refused by name; layers pickled when
    the flag was an attribute load with it as their activation."""
    kind = sparse_cpu.DenseConv2d if dense else sparse_cpu.SparseConv2d
    weight = torch.randn(3, 2, 3, 3) * (torch.rand(3, 2, 3, 3) < 0.5)
    x = torch.randn(1, 2, 6, 5)
    layer = kind(weight, activation="silu")
    assert layer.activation == "silu" and not layer.relu and "activation='silu'" in repr(layer)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.silu(F.conv2d(x, weight)), rtol=1e-5, atol=1e-5)
    layer.relu = False  # clears a ReLU only
    assert layer.activation == "silu"
    layer.relu = True
    assert layer.activation == "relu" and layer.relu
    layer.relu = False
    assert layer.activation is None
    known = r"\['hardsigmoid', 'hardswish', 'relu', 'relu6', 'sigmoid', 'silu'\]"
    with pytest.raises(ValueError, match=rf"{kind.__name__}: activation must be None or one of {known}, got 'gelu'"):
        kind(weight, activation="gelu")
    for bad in ("SiLU", ["relu"], 1):  # refused when set too, not at the next call
        with pytest.raises(ValueError, match=rf"{kind.__name__}: activation must be None or one of {known}"):
            layer.activation = bad
    assert layer.activation is None
    with pytest.raises(ValueError, match="relu=True contradicts activation='silu'"):
        kind(weight, relu=True, activation="silu")
    with pytest.raises(ValueError, match=rf"{kind.__name__}: relu must be a bool, got 'silu'"):
        kind(weight, relu="silu")
    with pytest.raises(ValueError, match=rf"{kind.__name__}: relu must be a bool, got 1"):
        layer.relu = 1
    old = kind(weight)
    state = old.__getstate__()
    state.pop("_activation", None)
    state["relu"] = True  # as the flag was pickled before
    revived = kind.__new__(kind)
    revived.__setstate__(state)
    assert revived.activation == "relu" and "relu" not in revived.__dict__
    with torch.no_grad():
        torch.testing.assert_close(revived(x), torch.relu(F.conv2d(x, weight)), rtol=1e-5, atol=1e-5)
    assert pickle.loads(pickle.dumps(layer)).activation is None


def _marked(converted: nn.Module) -> set[str]:
    return {node.target for node in converted.graph.nodes if node.kwargs.get("residual_reusable")}


@pytest.mark.parametrize("layers", ["sparse", "dense"])
def test_the_last_reader_of_each_resnet_residual_may_add_into_it(layers):
    """In a ResNet every block's second conv is the last reader of its residual (the stem's pooling, the
    downsample conv or the previous block's output): each dense call is marked, and the outputs stay the model's."""
    model = pruned_resnet18(0.5)
    x = torch.randn(2, 3, 64, 64)
    summary = {}
    # dense: by oneDNN (Winograd's layers write a new tensor, test_winograd.py)
    kwargs = {"policy": "sparse"} if layers == "sparse" else {"min_speedup": 1e9, "repeats": 2, "winograd": False}
    converted, _ = sparse_cpu.convert_for_cpu(model, x, summary=summary, **kwargs)
    kind = sparse_cpu.SparseConv2d if layers == "sparse" else sparse_cpu.DenseConv2d
    assert all(isinstance(converted.get_submodule(f"layer{i}.{j}.conv2"), kind) for i in range(1, 5) for j in (0, 1))
    if layers == "sparse":  # no sparse output reaches the in-place threshold (1 MiB) here: none marked, no check paid
        assert _marked(converted) == set() and summary["residuals_reusable"] == 0
        assert not any(node.op == "get_attr" for node in converted.graph.nodes)
    else:
        assert _marked(converted) == {f"layer{i}.{j}.conv2" for i in range(1, 5) for j in (0, 1)}
        assert summary["residuals_reusable"] == 8
        assert "8 of them dense convolutions that may add into their residual" in summary["fusion"]
    with torch.no_grad():
        expected = model(x)
        for _ in range(2):
            assert_close(converted(x), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


@pytest.mark.parametrize("threshold, stages", [(0, 4), (64 << 10, 2)])
def test_sparse_calls_whose_outputs_reach_the_threshold_write_into_their_residual(threshold, stages):
    """The sparse calls marked are those whose output on the example batch reaches the in-place threshold: at 0 every
    block's second conv of a ResNet, at 64 KiB those of layer1 and layer2 only (128 and 64 KiB outputs for two 64x64
    images; layer3's 32, layer4's 16); the summary says so, the call plan's steps for them may write into the residual
    (named "+=residual"), and the outputs stay the model's, call after call and at another batch size, through the
    graph and through its compiled call plans; the caller's input is never written."""
    model = pruned_resnet18(0.5)
    x = torch.rand(2, 3, 64, 64)
    previous = sparse_cpu.set_in_place_residual_bytes(threshold)
    try:
        summary = {}
        converted, _ = sparse_cpu.convert_for_cpu(model, x, summary=summary, policy="sparse")
        marked = {f"layer{i}.{j}.conv2" for i in range(1, stages + 1) for j in (0, 1)}
        assert _marked(converted) == marked and summary["residuals_reusable"] == 2 * stages
        assert f"{2 * stages} sparse convolutions that may write their output into their residual" in summary["fusion"]
        with torch.no_grad():
            plan, reason, _ = call_plan.build(converted, x)
        assert reason == "" and plan.compiled.step_names.count("sparse_conv+=residual") == 2 * stages
        plans = call_plan.NetworkPlans()
        with torch.inference_mode():
            for inputs in (x, torch.randn(3, 3, 64, 64)):
                expected, kept = model(inputs), inputs.clone()
                for _ in range(2):
                    for got in (converted(inputs), plans.output(converted, inputs)):
                        assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
                        assert torch.equal(inputs, kept)
        assert [entry["steps"] > 0 for entry in plans.summary()] == [True, True]
    finally:
        sparse_cpu.set_in_place_residual_bytes(previous)


class ResidualDeadAfter(_TwoConvs):
    """Either conv may absorb the add: the rewrite takes c0 (met first), with c1's output as its residual."""

    def forward(self, x):
        r = self.c0(x)
        return self.c1(x) + r


class ResidualReadAfter(_TwoConvs):
    def forward(self, x):
        r = self.c0(x)
        return self.c1(x) + r, r * 2


class ResidualIsTheInput(_TwoConvs):
    def forward(self, x):
        r = self.c0(x)
        return self.c1(r) + r


class ResidualViewedBefore(_TwoConvs):
    """A view taken before the conv and returned: its values must stay the residual's."""

    def forward(self, x):
        r = self.c0(x)
        flat = r.flatten(1)
        return self.c1(x) + r, flat


class ResidualFromTheInput(_TwoConvs):
    def forward(self, x):
        return self.c1(self.c0(x)) + x


@pytest.mark.parametrize("cls, marked", [(ResidualDeadAfter, {"c0"}), (ResidualReadAfter, set()),
                                         (ResidualIsTheInput, set()), (ResidualViewedBefore, set()),
                                         (ResidualFromTheInput, set())])
def test_a_residual_is_reused_only_where_nothing_reads_it_later(cls, marked):
    """The engine's dense convolutions (every conv kept dense) write in place where marked: a wrong mark would
    change the outputs, which must stay the model's."""
    g = torch.Generator().manual_seed(11)
    model = cls(g).eval()
    x = torch.randn(2, 4, 8, 8, generator=g)
    converted, _ = sparse_cpu.convert_for_cpu(model, x.clone(), min_speedup=1e9, repeats=2, winograd=False)
    assert isinstance(converted.get_submodule("c1"), sparse_cpu.DenseConv2d)
    assert _marked(converted) == marked
    with torch.no_grad():
        expected = sparse_cpu._output_values(model(x.clone()))
        for _ in range(2):
            got = sparse_cpu._output_values(converted(x.clone()))
            assert len(got) == len(expected)
            for a, b in zip(got, expected):
                assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_no_residual_is_reused_around_a_layer_with_a_hook():
    """A hook could keep the tensor (a feature capture): with one on the layer that makes the residual, on one
    that reads it, or on the layer itself, the call is not marked."""
    g = torch.Generator().manual_seed(5)
    dense = [sparse_cpu.DenseConv2d.from_dense(_sparse_conv(g)) for _ in range(3)]

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.c0, self.c1, self.c2 = dense

        def forward(self, x):
            r = self.c0(x)
            return self.c2(self.c1(r), r)

    class Leaves(fx.Tracer):
        def is_leaf_module(self, module, name):
            return isinstance(module, sparse_cpu.DenseConv2d) or super().is_leaf_module(module, name)

    for hooked in (None, "c0", "c1", "c2"):
        root = Block()
        graph_module = fx.GraphModule(root, Leaves().trace(root))
        handle = None
        if hooked is not None:
            handle = graph_module.get_submodule(hooked).register_forward_hook(lambda module, args, out: None)
        reused = fusion.mark_reusable_residuals(graph_module, (sparse_cpu.DenseConv2d,),
                                                sparse_cpu._FRESH_OUTPUT_LAYERS)
        assert reused == (["c2"] if hooked is None else []), hooked
        if handle is not None:
            handle.remove()


class _ReluBlock(nn.Module):
    """``relu(c2(relu(c1(r))) + r)`` with ``r = relu(c0(x))``: c2 is the last reader of r."""

    def __init__(self):
        super().__init__()
        self.c0, self.c1, self.c2 = (nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1),
                                     nn.Conv2d(8, 8, 3, padding=1))

    def forward(self, x):
        r = torch.relu(self.c0(x))
        return torch.relu(self.c2(torch.relu(self.c1(r))) + r).mean((2, 3))


@pytest.mark.parametrize("where", ["producer", "reader", "writer pre-hook", "every module"])
def test_a_hook_added_after_conversion_sees_the_residual_unchanged(where):
    """The marked call asks on every run whether a hook is registered where it could keep the residual (an
    outside review's case: a feature captured by a hook on the layer that made it was overwritten)."""
    torch.manual_seed(0)
    model = _ReluBlock().eval()
    x = torch.randn(2, 3, 16, 16)
    converted, _ = sparse_cpu.convert_for_cpu(model, x, min_speedup=1e9, repeats=2, winograd=False)
    assert _marked(converted) == {"c2"}
    seen = {}

    def keep(value):  # a hook that returns None changes nothing but keeps the tensor
        seen.setdefault("r", value)

    if where == "producer":
        handle = converted.c0.register_forward_hook(lambda module, args, out: keep(out))
    elif where == "reader":
        handle = converted.c1.register_forward_pre_hook(lambda module, args: keep(args[0]))
    elif where == "writer pre-hook":
        handle = converted.c2.register_forward_pre_hook(lambda module, args: keep(args[1]))
    else:
        handle = nn.modules.module.register_module_forward_hook(
            lambda module, args, out: keep(out) if module is converted.c0 else None)
    try:
        with torch.no_grad():
            out = converted(x.clone())
            expected_r = torch.relu(model.c0(x))
            assert_close(out, model(x), rtol=1e-4, atol=1e-4)
            assert_close(seen["r"], expected_r, rtol=1e-4, atol=1e-4)
    finally:
        handle.remove()
    with torch.no_grad():  # without the hook the layer writes in place again, and the output is still right
        assert_close(converted(x.clone()), model(x), rtol=1e-4, atol=1e-4)


def test_a_graph_traced_again_from_the_converted_one_does_not_overwrite_what_it_returns():
    """torchvision's feature extractor traces the converted network again and returns an intermediate value that
    the engine's graph had let the next block overwrite; so does unpickling, which re-traces."""
    torchvision = pytest.importorskip("torchvision")
    from torchvision.models.feature_extraction import create_feature_extractor

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    converted, _ = sparse_cpu.convert_for_cpu(model, x, min_speedup=1e9, repeats=2, winograd=False)
    extractor = create_feature_extractor(converted, {"layer1.0.conv2": "feature", "fc": "out"},
                                         tracer_kwargs={"leaf_modules": list(sparse_cpu.ENGINE_LAYERS)})
    with torch.no_grad():
        got = extractor(x.clone())
        expected = model.layer1[0](model.maxpool(model.relu(model.bn1(model.conv1(x)))))
        assert_close(got["feature"], expected, rtol=1e-4, atol=1e-4)
        assert_close(got["out"], model(x), rtol=1e-4, atol=1e-4)
        assert_close(pickle.loads(pickle.dumps(converted))(x.clone()), model(x), rtol=1e-4, atol=1e-4)


def test_a_residual_someone_else_holds_is_not_overwritten():
    """An outside review's cases: an ``fx.Interpreter`` that records every layer's output, and a wrapper swapped
    in after conversion that keeps its input. Each recorded tensor must stay the value it was."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    converted, _ = sparse_cpu.convert_for_cpu(model, x, min_speedup=1e9, repeats=2, winograd=False)
    expected = model.layer1[0](model.maxpool(model.relu(model.bn1(model.conv1(x)))))

    class Recorder(fx.Interpreter):
        def run_node(self, node):
            out = super().run_node(node)
            if node.op == "call_module":
                self.seen[node.target] = out
            return out

    recorder = Recorder(converted)
    recorder.seen = {}
    with torch.no_grad():
        out = recorder.run(x.clone())
    assert_close(recorder.seen["layer1.0.conv2"], expected, rtol=1e-4, atol=1e-4)
    assert_close(out, model(x), rtol=1e-4, atol=1e-4)

    class Keep(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.layer, self.kept = layer, None

        def forward(self, x, *args, **kwargs):
            self.kept = x
            return self.layer(x, *args, **kwargs)

    converted.set_submodule("layer1.1.conv1", Keep(converted.get_submodule("layer1.1.conv1")))
    with torch.no_grad():
        out = converted(x.clone())
    assert_close(converted.get_submodule("layer1.1.conv1").kept, expected, rtol=1e-4, atol=1e-4)
    assert_close(out, model(x), rtol=1e-4, atol=1e-4)


def test_residual_reuse_allowed_counts_who_holds_the_tensor():
    """Called as the marked graph calls it: the residual a local variable, passed positionally (a call through
    ``*args`` would hold it once more in the argument tuple)."""
    first, second = [sparse_cpu.DenseConv2d.from_dense(nn.Conv2d(2, 2, 1)) for _ in range(2)]
    fusion._REUSE_SAFE_TYPES.add(sparse_cpu.DenseConv2d)

    def alone():
        residual = torch.zeros(1, 2, 2, 2)
        return fusion.residual_reuse_allowed(residual, first, second)

    def kept():
        residual = torch.zeros(1, 2, 2, 2)
        holder = [residual]
        return fusion.residual_reuse_allowed(residual, first, second), holder

    assert alone() and not kept()[0]
    handle = first.register_forward_hook(lambda *args: None)
    assert not alone()
    handle.remove()
    assert alone() and not fusion.residual_reuse_allowed(torch.zeros(1), nn.Conv2d(1, 1, 1))


def test_unmarking_restores_the_plain_graph():
    torch.manual_seed(0)
    model = _ReluBlock().eval()
    x = torch.randn(2, 3, 16, 16)
    converted, _ = sparse_cpu.convert_for_cpu(model, x, min_speedup=1e9, repeats=2, winograd=False)
    assert _marked(converted) == {"c2"}
    fusion.unmark_reusable_residuals(converted)
    assert _marked(converted) == set()
    assert all(node.op in ("placeholder", "call_module", "call_function", "call_method", "output")
               and node.target is not fusion.residual_reuse_allowed for node in converted.graph.nodes)
    with torch.no_grad():
        assert_close(converted(x), model(x), rtol=1e-4, atol=1e-4)



class AlignedReaders(nn.Module):
    """a is read by b, a 1x1 conv, only (aligned); b by c, a 3x3 conv (no in-place reader: not aligned); c by d, a
    1x1, as its input and its fused residual (aligned); d by e, a 3x3 (not aligned); e by f, a 1x1, and by a
    ``.view`` (not aligned); f by g, a 1x1, and returned (not aligned)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 24, 1)
        self.c = nn.Conv2d(24, 16, 3, padding=1)
        self.d = nn.Conv2d(16, 16, 1)
        self.e = nn.Conv2d(16, 8, 3, padding=1)
        self.f = nn.Conv2d(8, 8, 1)
        self.g = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        c = self.c(self.b(self.a(x)))
        d = torch.relu(self.d(c) + c)
        e = self.e(d)
        f = self.f(e)
        return self.g(f), f, e.view(e.shape[0], -1)


def _aligned_calls(converted: fx.GraphModule) -> set[str]:
    return {node.target for node in converted.graph.nodes if node.kwargs.get("aligned_output")}


def test_outputs_only_sparse_readers_see_are_aligned():
    """convert_for_cpu passes ``aligned_output=True`` exactly to the calls whose output every reader is a sparse
    conv, one reading it in place (1x1), none hooked; the outputs stay the model's and contiguous, from two threads
    at once too; unmarking gives the same bits; a layer called directly returns a contiguous output."""
    torch.manual_seed(0)
    model = AlignedReaders().eval()
    with torch.no_grad():
        for conv in model.modules():
            if isinstance(conv, nn.Conv2d):
                conv.weight.mul_(torch.rand_like(conv.weight) < 0.4)
    x = torch.randn(2, 3, 7, 7)  # planes of 49 floats, laid out 64 apart
    summary = {}
    converted, _ = sparse_cpu.convert_for_cpu(model, x, policy="sparse", summary=summary)
    assert _aligned_calls(converted) == {"a", "c"} and summary["aligned_outputs"] == 2
    assert "2 sparse convolutions write channel-aligned outputs" in summary["fusion"]
    with torch.no_grad():
        expected = model(x)
        got = converted(x)
        for out, reference in zip(got, expected):
            assert_close(out, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))
        assert all(out.is_contiguous() for out in got)
        assert converted.a(x).is_contiguous()
    for _index, outputs in outputs_from_two_threads(converted, [x, x], rounds=3):
        assert all(torch.equal(out, first) for out, first in zip(outputs, got))
    with torch.no_grad():
        fusion.unmark_aligned_outputs(converted)
        assert _aligned_calls(converted) == set()
        for out, plain in zip(got, converted(x)):
            assert torch.equal(out, plain)
    converted.b.register_forward_hook(lambda module, args, output: None)  # a's reader now has a hook
    fusion.mark_aligned_outputs(converted, sparse_cpu.SparseConv2d)
    assert _aligned_calls(converted) == {"c"}


class _ReadsItsConvWeight(nn.Module):
    """A conv + BN whose forward also reads the conv's (or the BN's) tensors itself, on a path that the example
    input does not take (``gate`` is 0 for inputs below 0.7 on average): folding the BN into the conv would change
    what those reads see, and the end-to-end check on such an example could not notice."""

    def __init__(self, read: str):
        super().__init__()
        self.read = read
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=read != "weight")
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)
        with torch.no_grad():  # a batch norm that scales by 4: folding it changes the weight a lot
            self.bn.running_var.fill_(0.25)
            self.bn.weight.fill_(2.0)
            self.conv.weight.mul_(torch.rand_like(self.conv.weight) < 0.5)

    def forward(self, x):
        h = F.relu(self.stem(x))
        gate = F.relu(x.mean() - 0.7) * 10
        if self.read == "weight":
            extra = F.conv2d(h, self.conv.weight, padding=1)
        elif self.read == "bias":
            extra = self.conv.bias.view(1, -1, 1, 1)
        else:
            extra = self.bn.running_var.view(1, -1, 1, 1)
        return self.fc((self.bn(self.conv(h)) + gate * extra).mean((2, 3)))


@pytest.mark.parametrize("read", ["weight", "bias", "running_var"])
def test_no_batchnorm_is_folded_where_the_model_reads_the_tensors_itself(read):
    """A silent wrong result an outside review found: the batch norm was folded into a conv whose weight the
    forward also read directly (``F.conv2d(h, self.conv.weight)``), which then read the folded weight. The
    example (dark images) cannot show it; bright images did (0.136 off on logits of 0.195). Now neither is
    folded, and both kinds of input give the model's output."""
    torch.manual_seed(0)
    model = _ReadsItsConvWeight(read).eval()
    graph, why_not = fusion.trace(model)
    if read == "running_var":  # torch.fx copies a buffer read that way into a constant: no rewrite at all
        assert graph is None and "neither a parameter nor a buffer" in why_not
    else:
        assert fusion.fold_batchnorm(graph) == []
    summary = {}
    converted, _ = sparse_cpu.convert_for_cpu(model, torch.rand(2, 3, 16, 16) * 0.5, policy="sparse",
                                              summary=summary)
    assert summary["batchnorm_folded"] == 0
    for x in (torch.rand(2, 3, 16, 16) * 0.5, 0.9 + 0.1 * torch.rand(2, 3, 16, 16)):
        with torch.no_grad():
            expected = model(x)
        assert_close(converted(x), expected, rtol=1e-4, atol=1e-5 * (1 + float(expected.abs().max())))


class _OptionalOutput(nn.Module):
    """``if w is not None`` on a module's second output: a torch.fx trace takes the branch (its stand-in for
    ``w`` is never None) and then calls ``w.sum()`` on the real None."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 4, stride=4)
        self.attention = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        tokens = self.conv(x).flatten(2).transpose(1, 2)
        out, weights = self.attention(tokens, tokens, tokens, need_weights=False)
        if weights is not None:
            out = out + weights.sum()
        return self.fc(out.mean(1))


def test_a_trace_that_does_not_compute_the_model_is_not_used():
    """The eager model runs; its trace raised inside the engine (AttributeError from the traced graph) where the
    engine promises to convert without the rewrite. The trace is now checked on the example before any rewrite."""
    torch.manual_seed(0)
    model = _OptionalOutput().eval()
    x = torch.rand(2, 3, 16, 16)
    summary = {}
    converted, _ = sparse_cpu.convert_for_cpu(model, x, policy="sparse", summary=summary)
    assert not isinstance(converted, fx.GraphModule)
    assert "the torch.fx trace does not compute what the model does" in summary["fusion"]
    assert "NoneType" in summary["fusion"]
    with torch.no_grad():
        assert_close(converted(x), model(x), rtol=1e-4, atol=1e-5)


def test_tracing_the_engine_is_refused():
    """torch.jit.trace (and the TorchScript ONNX exporter) recorded none of the engine's kernel calls: the traced
    module returned the example's output for every input, and the ONNX file held one constant. Refused by name,
    on a layer, a converted network (its call plan included) and the deployed module."""
    model = pruned_resnet18()
    x = torch.randn(1, 3, 32, 32)
    converted, _ = sparse_cpu.convert_for_cpu(model, x, policy="sparse")
    layer = sparse_cpu.SparseConv2d(torch.ones(2, 3, 1, 1))
    pool = sparse_cpu.SeparableMaxPool2d(3, 2, 1)
    for module, name in ((layer, "SparseConv2d"), (pool, "SeparableMaxPool2d"), (converted, "SparseConv2d")):
        with pytest.raises(RuntimeError, match=f"{name}: torch.jit.trace .* cannot record"):
            torch.jit.trace(module, torch.randn(1, 3, 8, 8) if module is not converted else x, check_trace=False)
    from vpns_fast.deploy.runtime import deploy

    deployed = deploy(model, example_input_size=(1, 3, 32, 32), policy="sparse", mean=(0, 0, 0), std=(1, 1, 1))
    deployed(x.clamp(0, 1))  # a call plan is made for this shape
    with pytest.raises(RuntimeError, match="DeployedModel: torch.jit.trace"):
        torch.jit.trace(deployed, x.clamp(0, 1), check_trace=False)
    import io

    with pytest.raises(RuntimeError, match="DeployedModel: torch.jit.trace"):
        torch.onnx.export(deployed, (x.clamp(0, 1),), io.BytesIO(), dynamo=False)
    assert deployed(x.clamp(0, 1)).shape == (1, 10)  # still usable after the refusals


def test_blocks_the_rewrite_inlined_warn_of_hooks_and_index_by_position():
    """A hook on ``network.layer1`` of a deployed ResNet never ran (the rewrite calls the block's layers, not the
    block) and ``network.layer1[0]`` raised TypeError. Registering the hook now warns (a tool hooking every module
    goes on); indexing takes the layers' own positions, and a layer folded away is an IndexError, not its
    neighbour."""
    model = pruned_resnet18()
    converted, _ = sparse_cpu.convert_for_cpu(model, torch.randn(1, 3, 32, 32), policy="sparse")
    block = converted.layer1
    assert isinstance(block, fusion.InlinedBlock)
    assert block[0] is getattr(block, "0") and block[1] is getattr(block, "1") and block["1"] is block[1]
    with pytest.raises(TypeError, match="indices must be integers or names"):
        block[0.5]
    with pytest.raises(IndexError, match="positions"):
        block[-1]
    with pytest.raises(IndexError, match="layer 2 of this block is not in the converted network"):
        block[2]
    for register in (block.register_forward_hook, block.register_forward_pre_hook,
                     block.register_full_backward_hook):
        with pytest.warns(UserWarning, match="inlined by the CPU engine's graph rewrite"):
            register(lambda *args: None).remove()
    seen = []
    handle = block[0].conv1.register_forward_hook(lambda *args: seen.append(1))  # a layer's hook still runs
    converted(torch.randn(1, 3, 32, 32))
    handle.remove()
    assert seen == [1]
    copied = pickle.loads(pickle.dumps(converted))
    assert isinstance(copied.layer1, fusion.InlinedBlock)
    assert isinstance(copy.deepcopy(converted).layer1, fusion.InlinedBlock)
    sequential = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    folded, _ = sparse_cpu.convert_for_cpu(nn.Sequential(sequential), torch.randn(1, 3, 8, 8), policy="sparse")
    holder = getattr(folded, "0")
    assert isinstance(holder, fusion.InlinedBlock) and holder[3] is getattr(holder, "3")
    with pytest.raises(IndexError, match="folded or fused"):
        holder[1]  # the batch norm folded into conv 0: not conv 3

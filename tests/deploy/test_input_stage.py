"""The CPU engine's input stage in one pass (csrc/input_stage.cpp): bit for bit ``normalize``, in either layout, with
the float pixels' range for the checks; and the deployed module that uses it."""
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from vpns_fast.deploy import call_plan, runtime, sparse_cpu
from vpns_fast.nn.prompts import normalize

pytestmark = pytest.mark.skipif(not sparse_cpu.available()[0], reason="the C++ extension is not built")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _staged(images, mean=MEAN, std=STD, height=0, width=0):
    return sparse_cpu._ops().input_stage(images, list(mean), list(std), height, width)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("shape", [(1, 3, 7, 5), (3, 3, 33, 17), (2, 3, 64, 64), (0, 3, 4, 4)])
def test_the_input_stage_is_normalize_bit_for_bit(dtype, shape):
    generator = torch.Generator().manual_seed(sum(shape))
    if dtype == torch.uint8:
        images = torch.randint(0, 256, shape, dtype=dtype, generator=generator)
    else:
        images = torch.rand(shape, generator=generator) * 1.2 - 0.1
    out, low, high = _staged(images)
    expected = normalize(images, MEAN, STD)
    assert out.dtype == torch.float32 and out.shape == expected.shape and torch.equal(out, expected)
    assert out.is_contiguous()
    if dtype == torch.uint8 or not images.numel():
        assert (low, high) == (0.0, 1.0)  # on the [0, 1] scale: no pixel outside it
    else:
        assert (low, high) == tuple(v.item() for v in torch.aminmax(images))


def test_the_input_stage_reads_views_and_reports_faults():
    images = torch.rand(2, 3, 20, 30).transpose(2, 3)  # not contiguous
    out, _, _ = _staged(images)
    assert torch.equal(out, normalize(images, MEAN, STD))
    for fault in (float("nan"), float("inf"), -float("inf")):
        faulty = images.clone()
        faulty[1, 2, 7, 3] = fault
        _, low, high = _staged(faulty)
        if fault != fault:
            assert low != low and high != high  # NaN for both
        else:
            assert (low, high) == tuple(v.item() for v in torch.aminmax(faulty))


@pytest.mark.parametrize("column", [0, 1, 15, 16, 17, 31, 32, 35, 36])
def test_the_float_range_finds_a_fault_in_any_column(column):
    """The range runs in 16 lanes a row and a tail after them: a NaN or an extreme in any of them (a 37-wide row: two
    whole blocks of lanes and five left) is found, and a zero below the other pixels gives a zero low (its sign is
    not kept: -0.0 and 0.0 are reported as 0.0, which the range check treats alike); the output still bit for bit
    normalize's."""
    images = torch.rand(2, 3, 4, 37, generator=torch.Generator().manual_seed(column)) * 0.5 + 0.25
    for fault, expected in ((float("nan"), None), (-7.0, (-7.0, None)), (9.0, (None, 9.0)), (-0.0, (0.0, None))):
        faulty = images.clone()
        faulty[1, 1, 2, column] = fault
        out, low, high = _staged(faulty)
        reference = normalize(faulty, MEAN, STD)
        assert torch.equal(out.isnan(), reference.isnan()) and torch.equal(out.nan_to_num(), reference.nan_to_num())
        if expected is None:
            assert low != low and high != high
        else:
            want_low, want_high = (v.item() for v in torch.aminmax(faulty))
            assert (low, high) == (want_low, want_high)
            assert (expected[0] is None or low == expected[0]) and (expected[1] is None or high == expected[1])
            assert math.copysign(1.0, low) == math.copysign(1.0, want_low + 0.0)  # a zero low is +0.0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="guard pages through mmap/mprotect: Linux")
def test_the_input_stage_reads_nothing_past_the_images():
    """The pass reads its rows in blocks of 16 lanes and a tail: on images whose last pixel is the last byte before
    an inaccessible page (tests/guarded_memory.py), every width from 1 to 40, float32 and uint8, runs without a crash
    and gives normalize's values. In a child process, so that a read past the end fails this test alone."""
    script = f"""
import sys
sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
import torch
from guarded_memory import before_a_guard_page
from vpns_fast.deploy import sparse_cpu
from vpns_fast.nn.prompts import normalize
mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
count = 0
for threads in (1, 2):
    torch.set_num_threads(threads)
    for width in range(1, 41):
        for values in (torch.rand(2, 3, 3, width), torch.randint(0, 256, (2, 3, 3, width), dtype=torch.uint8)):
            images, mapping = before_a_guard_page(values)
            out, low, high = sparse_cpu._ops().input_stage(images, mean, std, 0, 0)
            assert torch.equal(out, normalize(values, mean, std)), width
            count += 1
print("ok", count)
"""
    result = subprocess.run([sys.executable, "-c", script], env=dict(os.environ), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.split()[-1]) == 160


def _stemmed(kept: float) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(16, 4)).eval()
    with torch.no_grad():
        model[0].weight.mul_(torch.rand_like(model[0].weight) < kept)
    return model


@pytest.mark.parametrize("stem", ["sparse", "dense"])
@pytest.mark.parametrize("stats", [(MEAN, STD), ((0.5,), (0.25,))])
def test_a_deployed_module_normalizes_in_one_pass_as_normalize_does(stem, stats):
    """Found in review: one mean and one std for every channel (a module's own, which deploy() does not expand)
    raised in the one-pass stage; normalize broadcasts them."""
    mean, std = stats
    # min_speedup no sparse layer reaches keeps the stem a dense convolution
    model = runtime.deploy(_stemmed(0.2), policy="sparse" if stem == "sparse" else "measure",
                           example_input_size=(1, 3, 16, 16), image_size=16, mean=MEAN, std=STD,
                           **({} if stem == "sparse" else {"min_speedup": 1e9}))
    model.mean, model.std = mean, std
    assert model.info["backend"] == "sparse_cpu" and not model.info.get("channels_last")
    assert isinstance(model.network.get_submodule("0"), sparse_cpu.SparseConv2d if stem == "sparse"
                      else sparse_cpu.DenseConv2d)  # Winograd's layer is a DenseConv2d
    for images in (torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8), torch.rand(2, 3, 16, 16)):
        with torch.no_grad():
            expected = model.network(normalize(images, mean, std))
            assert torch.equal(model(images), expected) and torch.equal(model(images), expected)
    assert model.call_plans()[0]["steps"]


def test_the_one_pass_input_stage_refuses_what_the_checks_refuse(monkeypatch):
    """Both paths (the fast one, and the general one's one-pass branch, which timed_call and _checked_forward take)
    refuse out-of-range and non-finite pixels with the range check's messages, without torch's pixel check."""
    model = runtime.deploy(_stemmed(0.2), policy="sparse", example_input_size=(1, 3, 16, 16), image_size=16,
                           mean=MEAN, std=STD)
    x = torch.rand(2, 3, 16, 16)

    def not_reached(images):
        raise AssertionError("the one-pass stage should have taken these images")

    monkeypatch.setattr(runtime, "_checked_pixels", not_reached)
    model((x * 1.08 - 0.04).clamp(-0.05, 1.05))  # resampling overshoot is within the slack
    model.timed_call((x * 1.08 - 0.04).clamp(-0.05, 1.05))
    for images, message in ((x * 255, r"must lie in \[0, 1\], got values in \[0\.[0-9]+, 25"),
                            (x.masked_fill(x > 0.9, float("nan")), "NaN or Inf"),
                            (x.masked_fill(x > 0.9, float("inf")), "NaN or Inf"),
                            (x - 0.5, r"must lie in \[0, 1\], got values in \[-0.")):
        for path in (model, model._checked_forward, lambda images: model.timed_call(images)[0]):
            with pytest.raises(ValueError, match=f"images: .*{message}"):
                path(images)
    monkeypatch.undo()
    previous = call_plan.set_call_plans(False)
    try:  # the graph path takes the same input
        assert torch.equal(model(x), model.network(normalize(x, MEAN, STD)))
    finally:
        call_plan.set_call_plans(previous)


def test_the_input_stage_takes_or_leaves_images_but_never_raises():
    """What the one-pass stage takes (both of the deployed module's paths call it): a strided CPU tensor (B, 3, H, W)
    of the size asked (0, 0: any), uint8 or float32, no gradient, with three means and stds; the rest gives None,
    never an error (the general path then checks it with its own messages). The range is the caller's to check:
    out-of-range and non-finite pixels are taken and reported by low and high."""
    x = torch.rand(2, 3, 16, 12)
    for images in (x, (x * 255).to(torch.uint8), x.transpose(2, 3).contiguous().transpose(2, 3),
                   torch.rand(0, 3, 16, 12), x * 255, x.masked_fill(x > 0.9, float("nan"))):
        staged = _staged(images, height=16, width=12)
        assert staged is not None and torch.equal(staged[0].nan_to_num(), normalize(images, MEAN, STD).nan_to_num())
    assert _staged(x * 255, height=16, width=12)[2] == (x * 255).max().item()
    assert _staged(torch.rand(1, 3, 5, 7)) is not None  # any size
    refused = {
        "a meta tensor": torch.empty(2, 3, 16, 12, device="meta"),
        "3-d": x[0], "one channel": x[:, :1], "another height": torch.rand(2, 3, 12, 12),
        "another width": torch.rand(2, 3, 16, 16), "float64": x.double(), "int16": (x * 255).to(torch.int16),
        "needs a gradient": x.clone().requires_grad_(),
    }
    for what, images in refused.items():
        assert _staged(images, height=16, width=12) is None, what
    assert _staged(x, [0.5], [0.25], 16, 12) is None  # three values a channel only


def _path_spies(monkeypatch) -> tuple[list, list, list]:
    """(the images of the calls that went the general path, the input shape of each run of a compiled plan, whether
    gradients were on at each plan build)."""
    missed, runs, builds = [], [], []
    general, run, build = runtime.DeployedModel._checked_forward, call_plan.NetworkPlan.run, call_plan.build

    def counted(self, images):
        missed.append(images)
        return general(self, images)

    def counted_run(self, x):
        runs.append(tuple(x.shape))
        return run(self, x)

    def recorded_build(network, x):
        builds.append(torch.is_grad_enabled())
        return build(network, x)

    monkeypatch.setattr(runtime.DeployedModel, "_checked_forward", counted)
    monkeypatch.setattr(call_plan.NetworkPlan, "run", counted_run)
    monkeypatch.setattr(call_plan, "build", recorded_build)
    return missed, runs, builds


def _deployed_stem(**options) -> runtime.DeployedModel:
    return runtime.deploy(_stemmed(0.2), policy="sparse", example_input_size=(1, 3, 16, 16), image_size=16,
                          mean=MEAN, std=STD, **options)


def test_a_deployed_module_takes_its_fast_path_with_the_general_paths_output(monkeypatch):
    """A deployed CPU module normalizes valid images in one call of the extension and runs its call plan (made on
    the first call, under torch.no_grad() though the caller has gradients on) without torch.no_grad() around it:
    the general path's output bit for bit, for float32 and uint8 images, a channels_last batch, in inference mode,
    and in copies and unpickled modules."""
    import copy
    import pickle

    model = _deployed_stem()
    missed, runs, builds = _path_spies(monkeypatch)
    x = torch.rand(3, 3, 16, 16)
    assert torch.is_grad_enabled()
    first = model(x)
    assert not missed and not runs and builds == [False]  # the input stage taken; the plan made, gradients off
    assert torch.equal(first, model._checked_forward(x)) and model.call_plans()[0]["steps"]
    for images in (x, (x * 255).to(torch.uint8), x[:1], x.contiguous(memory_format=torch.channels_last)):
        expected = model._checked_forward(images)
        missed.clear()
        runs.clear()
        out = model(images)
        assert not missed and runs == [tuple(images.shape)] and torch.equal(out, expected), images.shape
        assert not out.requires_grad and out.grad_fn is None
    runs.clear()
    with torch.inference_mode():
        assert torch.equal(model(x), first) and len(runs) == 1
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        runs.clear()
        assert torch.equal(clone(x), first) and torch.equal(clone(x), first)
        assert len(runs) == 1  # its plan made on the first call, run on the second
    assert not missed and builds == [False] * 4


def test_what_the_fast_path_does_not_take_goes_the_general_way(monkeypatch):
    """Images the stage does not take (the general path's messages), a tensor subclass, a nested tensor, a mean given
    as a list (it can change in place), a module given a label mapping and a subclass of the module with steps of
    its own or a step replaced on the instance go the general way; pixels out of range (with a slack changed where
    the check reads it too) are refused on the fast path with the general messages; with call plans off or a hook on
    the network the images are normalized once (the fast input stage), then the graph runs with gradients off though
    the caller has them on."""
    import vpns_fast.data

    model = _deployed_stem()
    x = torch.rand(3, 3, 16, 16)
    expected = model(x)
    missed, runs, _builds = _path_spies(monkeypatch)
    with pytest.raises(ValueError, match="images: NaN or Inf"):
        model(x.masked_fill(x > 0.9, float("nan")))
    assert not missed  # the range checked where the stage took the images, with the same rule and message
    with pytest.raises(ValueError, match=r"images: expected a shape \(B, 3, 16, 16\)"):
        model(torch.rand(1, 3, 8, 8))

    class Marked(torch.Tensor):
        pass

    assert torch.equal(model(x.as_subclass(Marked)), expected)
    with warnings.catch_warnings():  # the nested tensors' prototype warning
        warnings.simplefilter("ignore")
        nested = torch.nested.nested_tensor([x[0], x[1]])
    with pytest.raises(RuntimeError) as general_error:
        model._checked_forward(nested)
    with pytest.raises(RuntimeError) as error:
        model(nested)
    assert str(error.value) == str(general_error.value)
    # the nested images: once directly, once through the module; the subclass's call ran the plan the general way
    assert len(missed) == 4 and len(runs) == 1
    model.mean = [0.5, 0.5, 0.5]  # a list: the general path, which reads it at every call
    model(x)
    model.mean[0] = 0.1
    with torch.no_grad():
        assert torch.equal(model(x), model.network(normalize(x, (0.1, 0.5, 0.5), STD)))
    assert len(missed) == 6
    model.mean = (0.1, 0.5, 0.5)  # a tuple again: the fast path, with these values
    missed.clear()
    with torch.no_grad():
        assert torch.equal(model(x), model.network(normalize(x, (0.1, 0.5, 0.5), STD)))
    assert not missed
    monkeypatch.setattr(vpns_fast.data, "FLOAT_PIXEL_SLACK", 0.0)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        model(x * 1.02)
    monkeypatch.setattr(vpns_fast.data, "FLOAT_PIXEL_SLACK", math.inf)  # any value, but finite ones only
    with pytest.raises(ValueError, match="images: NaN or Inf"):
        model(x.masked_fill(x > 0.9, float("inf")))
    monkeypatch.undo()
    missed, runs, _builds = _path_spies(monkeypatch)
    ops, calls = sparse_cpu._ops(), {"input_stage": 0}

    def counting(name: str, original):
        def counted(*args):
            calls[name] += 1
            return original(*args)
        return counted

    for name in calls:
        monkeypatch.setattr(ops, name, counting(name, getattr(ops, name)))
    model.mean = MEAN
    model.__dict__.pop("_input_stage")  # made again with the spy
    previous = call_plan.set_call_plans(False)
    try:
        assert torch.equal(model(x), expected) and calls == {"input_stage": 1}
    finally:
        call_plan.set_call_plans(previous)
    grad_modes = []
    handle = model.network.register_forward_hook(lambda module, args, out: grad_modes.append(torch.is_grad_enabled()))
    assert torch.equal(model(x), expected) and calls == {"input_stage": 2}
    handle.remove()
    assert torch.is_grad_enabled() and grad_modes == [False]
    assert not missed and not runs
    model._mapped = lambda logits: logits * 0  # a step replaced on the instance: the general path, which calls it
    assert torch.equal(model(x), expected * 0) and len(missed) == 1
    assert calls == {"input_stage": 3}  # the general path's one-pass branch: the same call, once
    del model._mapped

    class Doubled(runtime.DeployedModel):
        def _mapped(self, logits):
            return logits * 2

    doubled = copy_as(Doubled, model)
    assert torch.equal(doubled(x), 2 * expected) and len(missed) == 2
    mapped = _deployed_stem(label_mapping=[3, 1])
    mapped(x)
    missed.clear()
    assert torch.equal(mapped(x), expected[:, [3, 1]]) and len(missed) == 1


def copy_as(kind: type, module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` of class ``kind`` (a subclass of its own)."""
    clone = kind.__new__(kind)
    clone.__dict__.update(module.__dict__)
    return clone

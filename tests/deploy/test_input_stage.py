"""The CPU engine's input stage in one pass (csrc/input_stage.cpp): bit for bit ``normalize``, in either layout, with
the float pixels' range for the checks; and the deployed module that uses it."""
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from vpns_fast.deploy import call_plan, runtime, sparse_cpu
from vpns_fast.nn.prompts import normalize

pytestmark = pytest.mark.skipif(not sparse_cpu.available()[0], reason="the C++ extension is not built")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("shape", [(1, 3, 7, 5), (3, 3, 33, 17), (2, 1, 64, 64), (0, 3, 4, 4)])
def test_normalize_images_is_normalize_bit_for_bit(dtype, shape):
    generator = torch.Generator().manual_seed(sum(shape))
    if dtype == torch.uint8:
        images = torch.randint(0, 256, shape, dtype=dtype, generator=generator)
    else:
        images = torch.rand(shape, generator=generator) * 1.2 - 0.1
    mean, std = (MEAN * 3)[:shape[1]], (STD * 3)[:shape[1]]
    out, low, high = sparse_cpu._ops().normalize_images(images, list(mean), list(std))
    expected = normalize(images, mean, std)
    assert out.dtype == torch.float32 and out.shape == expected.shape and torch.equal(out, expected)
    assert out.is_contiguous()
    if dtype == torch.uint8:
        assert (low, high) == (0.0, 255.0)
    elif images.numel():
        assert (low, high) == tuple(v.item() for v in torch.aminmax(images))


def test_normalize_images_reads_views_and_reports_faults():
    ops = sparse_cpu._ops()
    images = torch.rand(2, 3, 20, 30).transpose(2, 3)  # not contiguous
    out, _, _ = ops.normalize_images(images, list(MEAN), list(STD))
    assert torch.equal(out, normalize(images, MEAN, STD))
    for fault in (float("nan"), float("inf"), -float("inf")):
        faulty = images.clone()
        faulty[1, 2, 7, 3] = fault
        _, low, high = ops.normalize_images(faulty, list(MEAN), list(STD))
        if fault != fault:
            assert low != low and high != high  # NaN for both
        else:
            assert (low, high) == tuple(v.item() for v in torch.aminmax(faulty))
    with pytest.raises(RuntimeError, match="one mean and one std per channel"):
        ops.normalize_images(images, [0.5], [0.5, 0.5, 0.5])
    with pytest.raises(RuntimeError, match="uint8 or float32"):
        ops.normalize_images(images.double(), list(MEAN), list(STD))


@pytest.mark.parametrize("column", [0, 1, 15, 16, 17, 31, 32, 35, 36])
def test_the_float_range_finds_a_fault_in_any_column(column):
    """The range runs in 16 lanes a row and a tail after them: a NaN or an extreme in any of them (a 37-wide row: two
    whole blocks of lanes and five left) is found, and a zero below the other pixels gives a zero low (its sign is
    not kept: -0.0 and 0.0 are reported as 0.0, which the range check treats alike); the output still bit for bit
    normalize's."""
    ops = sparse_cpu._ops()
    images = torch.rand(2, 3, 4, 37, generator=torch.Generator().manual_seed(column)) * 0.5 + 0.25
    for fault, expected in ((float("nan"), None), (-7.0, (-7.0, None)), (9.0, (None, 9.0)), (-0.0, (0.0, None))):
        faulty = images.clone()
        faulty[1, 1, 2, column] = fault
        out, low, high = ops.normalize_images(faulty, list(MEAN), list(STD))
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
def test_normalize_images_reads_nothing_past_the_images():
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
            out, low, high = sparse_cpu._ops().normalize_images(images, mean, std)
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


def test_the_one_pass_input_stage_refuses_what_the_checks_refuse():
    model = runtime.deploy(_stemmed(0.2), policy="sparse", example_input_size=(1, 3, 16, 16), image_size=16,
                           mean=MEAN, std=STD)
    x = torch.rand(2, 3, 16, 16)
    model((x * 1.08 - 0.04).clamp(-0.05, 1.05))  # resampling overshoot is within the slack
    for images, message in ((x * 255, r"must lie in \[0, 1\], got values in \[0\.[0-9]+, 25"),
                            (x.masked_fill(x > 0.9, float("nan")), "NaN or Inf"),
                            (x.masked_fill(x > 0.9, float("inf")), "NaN or Inf"),
                            (x - 0.5, r"must lie in \[0, 1\], got values in \[-0.")):
        with pytest.raises(ValueError, match=f"images: .*{message}"):
            model(images)
    previous = call_plan.set_call_plans(False)
    try:  # the graph path takes the same input
        assert torch.equal(model(x), model.network(normalize(x, MEAN, STD)))
    finally:
        call_plan.set_call_plans(previous)

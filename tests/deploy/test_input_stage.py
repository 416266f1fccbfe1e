"""The CPU engine's input stage in one pass (csrc/input_stage.cpp): bit for bit ``normalize``, in either layout, with
the float pixels' range for the checks; and the deployed module that uses it."""
import pytest
import torch
from torch import nn

from vpns_fast.deploy import call_plan, runtime, sparse_cpu
from vpns_fast.nn.prompts import normalize

pytestmark = pytest.mark.skipif(not sparse_cpu.available()[0], reason="the C++ extension is not built")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("shape", [(1, 3, 7, 5), (3, 3, 33, 17), (2, 1, 64, 64), (0, 3, 4, 4)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_normalize_images_is_normalize_bit_for_bit(dtype, shape, channels_last):
    generator = torch.Generator().manual_seed(sum(shape))
    if dtype == torch.uint8:
        images = torch.randint(0, 256, shape, dtype=dtype, generator=generator)
    else:
        images = torch.rand(shape, generator=generator) * 1.2 - 0.1
    mean, std = (MEAN * 3)[:shape[1]], (STD * 3)[:shape[1]]
    out, low, high = sparse_cpu._ops().normalize_images(images, list(mean), list(std), channels_last)
    expected = normalize(images, mean, std)
    assert out.dtype == torch.float32 and out.shape == expected.shape and torch.equal(out, expected)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=layout)
    if dtype == torch.uint8:
        assert (low, high) == (0.0, 255.0)
    elif images.numel():
        assert (low, high) == tuple(v.item() for v in torch.aminmax(images))


def test_normalize_images_reads_views_and_reports_faults():
    ops = sparse_cpu._ops()
    images = torch.rand(2, 3, 20, 30).transpose(2, 3)  # not contiguous
    out, _, _ = ops.normalize_images(images, list(MEAN), list(STD), False)
    assert torch.equal(out, normalize(images, MEAN, STD))
    for fault in (float("nan"), float("inf"), -float("inf")):
        faulty = images.clone()
        faulty[1, 2, 7, 3] = fault
        _, low, high = ops.normalize_images(faulty, list(MEAN), list(STD), True)
        if fault != fault:
            assert low != low and high != high  # NaN for both
        else:
            assert (low, high) == tuple(v.item() for v in torch.aminmax(faulty))
    with pytest.raises(RuntimeError, match="one mean and one std per channel"):
        ops.normalize_images(images, [0.5], [0.5, 0.5, 0.5], False)
    with pytest.raises(RuntimeError, match="uint8 or float32"):
        ops.normalize_images(images.double(), list(MEAN), list(STD), False)


def _stemmed(kept: float) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(16, 4)).eval()
    with torch.no_grad():
        model[0].weight.mul_(torch.rand_like(model[0].weight) < kept)
    return model


@pytest.mark.parametrize("stem", ["sparse", "dense"])
def test_a_deployed_module_feeds_its_first_layer_the_layout_it_reads(stem):
    # min_speedup no sparse layer reaches keeps the stem a dense (channels_last) convolution
    model = runtime.deploy(_stemmed(0.2), policy="sparse" if stem == "sparse" else "measure",
                           example_input_size=(1, 3, 16, 16), image_size=16, mean=MEAN, std=STD,
                           **({} if stem == "sparse" else {"min_speedup": 1e9}))
    assert model.info["backend"] == "sparse_cpu"
    assert model.info["channels_last"] == (stem == "dense")
    assert isinstance(model.network.get_submodule("0"), sparse_cpu.SparseConv2d if stem == "sparse"
                      else sparse_cpu.DenseConv2d)  # Winograd's layer is a DenseConv2d
    for images in (torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8), torch.rand(2, 3, 16, 16)):
        with torch.no_grad():
            expected = model.network(normalize(images, MEAN, STD))
            assert torch.equal(model(images), expected) and torch.equal(model(images), expected)
    entries = model.__dict__["_call_plans"].entries.values()
    names = [name for entry in entries if entry.plan for name in entry.plan.compiled.step_names]
    # the dense stem's plan reads the input as given: no copy into channels_last first
    assert names and (stem == "sparse" or "channels_last_copy" not in names)


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

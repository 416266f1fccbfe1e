"""The first convolution's input gradient on the prompt's region only (vpns_fast/ops/region_grad.py):
the box gradient against the whole gradient masked, and a PromptedNetwork's every gradient with the
narrowing against the same network without it."""
import copy
import itertools

import pytest
import torch
import torchvision
from tolerance import assert_close
from torch import nn

import vpns_fast as V
from vpns_fast import ops
from vpns_fast.kernels.prompt import prompt_region_boxes, prompt_region_ref
from vpns_fast.nn import LabelMapping, PromptedNetwork, build_prompt
from vpns_fast.ops.region_grad import conv2d_input_grad_in_boxes_ref

# (kernel, stride, padding, dilation, groups): ResNet's stem, stride 3, dilation, depthwise, 1x1 stride 2
# (odd pixels read by no output), even kernels, padding beyond the kernel's reach.
GEOMETRIES = [(7, 2, 3, 1, 1), (3, 1, 1, 1, 1), (3, 3, 0, 1, 1), (3, 2, 2, 2, 1), (3, 1, 1, 1, 3), (1, 2, 0, 1, 1),
              (2, 2, 0, 1, 1), (4, 3, 2, 1, 3), (5, 1, 4, 1, 1), (16, 16, 0, 1, 1)]
# boxes in a 21 x 18 input: edges, one pixel, the whole input, a box no output reaches (with (1, 2, 0) the
# odd rows and columns), and a frame as the prompts give it
BOXES = [[(0, 3, 0, 18)], [(20, 21, 17, 18)], [(5, 6, 7, 8)], [(0, 21, 0, 18)], [(1, 2, 1, 2)],
         [(0, 3, 0, 18), (3, 18, 0, 3), (3, 18, 15, 18), (18, 21, 0, 18)], []]


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "k{}s{}p{}d{}g{}".format(*g))
def test_box_gradient_equals_the_whole_gradient_masked(geometry, memory_format):
    kernel, stride, padding, dilation, groups = geometry
    shape = (2, 3, 21, 18) if kernel < 16 else (2, 3, 32, 48)
    x = torch.randn(shape, dtype=torch.float64)
    weight = torch.randn(2 * groups, 3 // groups, kernel, kernel, dtype=torch.float64)
    grad_out = torch.randn_like(torch.nn.functional.conv2d(x, weight, None, stride, padding, dilation, groups))
    nonzero = 0
    for boxes in BOXES:
        got = ops.conv2d_input_grad_in_boxes(grad_out, weight, shape, boxes, stride, padding, dilation, groups,
                                             memory_format)
        expected = conv2d_input_grad_in_boxes_ref(grad_out, weight, shape, boxes, stride, padding, dilation, groups)
        assert_close(got, expected, rtol=1e-12, atol=1e-12)
        assert got.is_contiguous(memory_format=memory_format)
        nonzero += bool(expected.abs().sum() > 0)
    assert nonzero >= 3  # the comparison can fail: the whole input's, a band's and the frame's are not zero


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_box_gradient_in_low_precision(dtype):
    x = torch.randn(4, 3, 40, 40)
    weight = torch.randn(8, 3, 7, 7)
    grad_out = torch.randn(4, 8, 20, 20, dtype=dtype)
    boxes = prompt_region_boxes("pad", 40, 40, pad=5)
    got = ops.conv2d_input_grad_in_boxes(grad_out, weight, x.shape, boxes, 2, 3)
    expected = conv2d_input_grad_in_boxes_ref(grad_out.double(), weight.double(), x.shape, boxes, 2, 3)
    assert got.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    assert_close(got.double(), expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())


def test_box_gradient_on_cuda(cuda_or_skip, ieee_fp32):
    shape = (8, 3, 64, 64)
    weight = torch.randn(16, 3, 7, 7, device="cuda")
    grad_out = torch.randn(8, 16, 32, 32, device="cuda")
    boxes = prompt_region_boxes("pad", 64, 64, pad=8)
    got = ops.conv2d_input_grad_in_boxes(grad_out, weight, shape, boxes, 2, 3, memory_format=torch.channels_last)
    expected = conv2d_input_grad_in_boxes_ref(grad_out.double(), weight.double(), shape, boxes, 2, 3)
    assert_close(got.double(), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize("kind,out,in_size,args", [
    ("pad", 32, 32, {"pad": 4}), ("pad", 17, 10, {"pad": 1}), ("fix", 32, 32, {"mask_size": 32}),
    ("fix", 20, 20, {"mask_size": 3}), ("random", 20, 20, {"mask_size": 5, "row": 15, "col": 0}),
    ("expansive", 32, 20, {}), ("expansive", 17, 10, {})])
def test_region_boxes_tile_the_region(kind, out, in_size, args):
    boxes = prompt_region_boxes(kind, out, in_size, **args)
    cover = torch.zeros(out, out, dtype=torch.int32)
    for y0, y1, x0, x1 in boxes:
        assert 0 <= y0 < y1 <= out and 0 <= x0 < x1 <= out
        cover[y0:y1, x0:x1] += 1
    assert cover.max() == 1  # disjoint
    assert torch.equal(cover.bool(), prompt_region_ref(kind, out, in_size, **args))


def test_narrowed_output_is_the_convolution_output_itself():
    x = torch.randn(2, 3, 12, 12, requires_grad=True)
    conv = nn.Conv2d(3, 4, 3, 2, 1)
    out = conv(x.detach())
    narrowed = ops.narrow_input_grad(out, x, conv.weight, [(0, 2, 0, 12)], 2, 1)
    assert narrowed is out  # no copy, no view: an in-place ReLU after it is allowed
    torch.relu_(narrowed).sum().backward()
    assert x.grad[:, :, 2:].abs().sum() == 0 and x.grad[:, :, :2].abs().sum() > 0
    assert conv.weight.grad is not None and conv.bias.grad is not None


# --------------------------------------------------------------------------- PromptedNetwork

def _gradients(network, images, labels):
    network.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(network(images), labels).backward()
    return {name: p.grad.clone() for name, p in network.named_parameters() if p.grad is not None}


def _pair_of_networks(model, kind, out, in_size, channels_last=False, dtype=torch.float64):
    prompt = build_prompt(kind, out, in_size, size=6)
    with torch.no_grad():
        prompt.program.normal_(0, 0.5)  # some pixels clamp: the clamp's gradient mask matters
    network = PromptedNetwork(model, prompt, LabelMapping(10, "none"), prompt.mean, prompt.std,
                                channels_last).to(dtype)
    if channels_last:
        network.to(memory_format=torch.channels_last)
    whole = copy.deepcopy(network)
    whole.narrow_input_grad = False
    return network, whole


def _assert_same_gradients(network, whole, images, labels, rtol=1e-9):
    if network.prompt.kind == "random":  # the same square on both
        network.prompt.generator = torch.Generator().manual_seed(3)
        whole.prompt.generator = torch.Generator().manual_seed(3)
    got, expected = _gradients(network, images, labels), _gradients(whole, images, labels)
    assert got.keys() == expected.keys() and "prompt.program" in got
    for name in got:
        assert_close(got[name], expected[name], rtol=rtol, atol=rtol * expected[name].abs().max().item(), msg=name)
    assert whole.narrowed_layers == ()


@pytest.mark.parametrize("kind,in_size", [("pad", 48), ("fix", 48), ("random", 48), ("expansive", 36)])
@pytest.mark.parametrize("channels_last,masked", list(itertools.product([False, True], [False, True])))
def test_resnet_gradients_equal_the_whole_input_gradient(kind, in_size, channels_last, masked):
    model = torchvision.models.resnet18(num_classes=10)
    if masked:
        model = V.sparsify(model, "unstructured", "scaled")
    network, whole = _pair_of_networks(model, kind, 48, in_size, channels_last)
    images = torch.randint(0, 256, (3, 3, in_size, in_size), dtype=torch.uint8)
    _assert_same_gradients(network, whole, images, torch.randint(0, 10, (3,)))
    assert network.narrowed_layers == ("conv1",)


class _InputReadTwice(nn.Module):
    """The input read by two convolutions (one dilated, one strided with groups) and a skip path."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, 1, 2, dilation=2)
        self.b = nn.Conv2d(3, 6, 5, 2, 2, groups=3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(15, 10)

    def forward(self, x):
        features = [self.pool(torch.relu_(self.a(x))), self.pool(self.b(x)), self.pool(x * x)]
        return self.fc(torch.cat(features, 1).flatten(1))


class _NormFirst(nn.Module):
    """The input reaches the first convolution through another op: nothing to narrow."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(4, 10))

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("kind", ["pad", "fix"])
def test_input_read_by_several_layers(kind):
    network, whole = _pair_of_networks(_InputReadTwice(), kind, 24, 24)
    images = torch.rand(4, 3, 24, 24, dtype=torch.float64)
    _assert_same_gradients(network, whole, images, torch.randint(0, 10, (4,)))
    assert network.narrowed_layers == ("a", "b")
    # the second forward watches only the two readers, found by the first
    assert network._input_convs[1] == ("a", "b")
    _assert_same_gradients(network, whole, images, torch.randint(0, 10, (4,)))
    assert network.narrowed_layers == ("a", "b")


def test_first_layer_not_a_convolution():
    network, whole = _pair_of_networks(_NormFirst(), "pad", 16, 16)
    images = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    _assert_same_gradients(network, whole, images, torch.randint(0, 10, (2,)))
    assert network.narrowed_layers == () and network._input_convs[1] == ()


def test_replaced_first_convolution_is_found_again():
    model = torchvision.models.resnet18(num_classes=10)
    network, _ = _pair_of_networks(model, "pad", 32, 32)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    _gradients(network, images, torch.tensor([1, 2]))
    assert network.narrowed_layers == ("conv1",)
    # the stem replaced: the watched name now reads nothing, so the next forward looks again
    model.conv1 = nn.Sequential(nn.Identity(), nn.Conv2d(3, 64, 7, 2, 3, bias=False).double())
    whole = copy.deepcopy(network)
    whole.narrow_input_grad = False
    _assert_same_gradients(network, whole, images, torch.tensor([1, 2]))
    assert network.narrowed_layers == ()
    _assert_same_gradients(network, whole, images, torch.tensor([1, 2]))
    assert network.narrowed_layers == ("conv1.1",)


def test_images_that_require_grad_get_their_whole_gradient():
    network, whole = _pair_of_networks(_InputReadTwice(), "pad", 24, 24)
    images = torch.rand(2, 3, 24, 24, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1])
    got_params = _gradients(network, images, labels)
    got_images = images.grad.clone()
    images.grad = None
    expected_params = _gradients(whole, images, labels)
    assert network.narrowed_layers == ()
    assert_close(got_images, images.grad)
    assert_close(got_params["prompt.program"], expected_params["prompt.program"])


def test_not_narrowed_without_a_program_gradient():
    network, _ = _pair_of_networks(_InputReadTwice(), "pad", 24, 24)
    images = torch.rand(2, 3, 24, 24, dtype=torch.float64)
    with torch.no_grad():
        network(images)
    assert network.narrowed_layers == ()
    network.prompt.program.requires_grad_(False)
    network(images).sum().backward()
    assert network.narrowed_layers == ()
    network(images, use_prompt=False)
    assert network.narrowed_layers == ()


def test_prompt_only_training_with_frozen_weights():
    """The convolution's output needs no gradient of its own: the narrowing still reaches the program."""
    model = torchvision.models.resnet18(num_classes=10)
    model.requires_grad_(False)
    network, whole = _pair_of_networks(model, "pad", 32, 32)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    _assert_same_gradients(network, whole, images, torch.tensor([3, 4]))
    assert network.narrowed_layers == ("conv1",)


def test_bfloat16_autocast_gradients():
    model = V.sparsify(torchvision.models.resnet18(num_classes=10), "unstructured", "scaled")
    network, whole = _pair_of_networks(model, "pad", 32, 32, channels_last=True, dtype=torch.float32)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (4,))
    with torch.autocast("cpu", torch.bfloat16):
        got = _gradients(network, images, labels)
        expected = _gradients(whole, images, labels)
    assert network.narrowed_layers == ("conv1",)
    program, reference = got["prompt.program"], expected["prompt.program"]
    assert ((program - reference).norm() / reference.norm()).item() < 2e-2

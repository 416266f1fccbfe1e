"""The first convolution's input gradient on the prompt's region only (vpns_fast/ops/region_grad.py):
the box gradient against the whole gradient masked, and a PromptedNetwork's every gradient with the
narrowing against the same network without it."""
import copy
import itertools
import threading

import pytest
import torch
import torchvision
from helpers import run_in_threads
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


# --------------------------------------------------------------------------- the marked input

def _whole_and_narrowed(model, x, boxes, create_graph=False):
    """Every gradient of sum(model(x)**2) w.r.t. x (inside the boxes) and model's parameters, with
    and without the marked input."""
    results = []
    for narrowed in (False, True):
        leaf = x.detach().clone().requires_grad_(True)
        source = leaf * 1.0  # x as a network sees it: a non-leaf with history
        marked = ops.narrow_input_grad(source, boxes) if narrowed else source
        loss = model(marked).pow(2).sum()
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, [leaf, *params], create_graph=create_graph)
        results.append((grads, marked.narrowed_convs if narrowed else 0))
    (whole, _), (narrow, count) = results
    inside = torch.zeros(x.shape[-2:], dtype=torch.bool)
    for y0, y1, x0, x1 in boxes:
        inside[y0:y1, x0:x1] = True
    whole = (whole[0] * inside, *whole[1:])
    return whole, narrow, count


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_marked_input_gives_the_whole_gradient_inside_the_boxes(memory_format):
    model = nn.Sequential(nn.Conv2d(3, 5, 3, 2, 1), nn.ReLU(inplace=True), nn.Conv2d(5, 4, 3)).double()
    x = torch.randn(2, 3, 17, 15, dtype=torch.float64).to(memory_format=memory_format)
    boxes = [(0, 3, 0, 15), (3, 17, 0, 2)]
    whole, narrow, count = _whole_and_narrowed(model, x, boxes)
    assert count == 1  # the first conv only: the second reads the first's output
    for a, b in zip(narrow, whole):
        assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert narrow[0].abs().sum() > 0


def test_other_ops_see_a_plain_tensor():
    x = ops.narrow_input_grad(torch.randn(1, 3, 8, 8, requires_grad=True) * 1.0, [(0, 1, 0, 8)])
    assert type(x) is not torch.Tensor
    weight = torch.randn(2, 3, 1, 1)
    for result in (x + 1, torch.relu(x), x[:, :1], x.to(torch.float64), nn.functional.conv2d(x + 0, weight)):
        assert type(result) is torch.Tensor
    assert x.contiguous() is x  # a no-op returns the tensor itself, as for any tensor
    assert type(nn.functional.conv2d(x, torch.randn(2, 3, 1, 1))) is torch.Tensor
    assert x.narrowed_convs == 1


def test_not_narrowed_after_an_in_place_change():
    """An in-place op may move pixels (the gradient inside would come from outside): the whole gradient."""
    conv = nn.Conv2d(3, 2, 3, padding=1).double()
    leaf = torch.randn(1, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    x = ops.narrow_input_grad(leaf * 1.0, [(0, 1, 0, 6)])
    x.copy_(x.flip(-1) * 1.0)
    conv(x).sum().backward()
    assert x.narrowed_convs == 0
    reference = leaf.detach().clone().requires_grad_(True)
    y = reference * 1.0
    y.copy_(y.flip(-1) * 1.0)
    conv(y).sum().backward()
    assert_close(leaf.grad, reference.grad)


def test_double_backward_through_the_narrowed_conv():
    """create_graph=True: the box gradient's own derivative (through the weight) is kept."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.Tanh(), nn.Flatten(), nn.LazyLinear(2)).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    model(x)
    boxes = [(0, 2, 0, 8)]
    whole, narrow, count = _whole_and_narrowed(model, x, boxes, create_graph=True)
    assert count == 1
    for grads in (whole, narrow):
        for p in model.parameters():
            p.grad = None
        grads[0].pow(2).sum().backward()  # d/dparams of |dL/dx inside|^2
        grads_of_grad = [p.grad.clone() for p in model.parameters()]
        if grads is whole:
            expected = grads_of_grad
    for a, b in zip(grads_of_grad, expected):
        assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_autocast_casts_as_conv2d_does():
    conv = nn.Conv2d(3, 4, 3, 2, 1)
    x = torch.randn(2, 3, 12, 12, requires_grad=True)
    with torch.autocast("cpu", torch.bfloat16):
        marked = ops.narrow_input_grad(x * 1.0, [(0, 12, 0, 12)])
        out, reference = conv(marked), conv(x * 1.0)
    assert out.dtype == reference.dtype == torch.bfloat16 and torch.equal(out, reference)
    (grad_narrow,) = torch.autograd.grad(out.float().sum(), x)
    (grad_whole,) = torch.autograd.grad(reference.float().sum(), x)
    assert grad_narrow.dtype == torch.float32
    assert_close(grad_narrow, grad_whole, rtol=2e-2, atol=2e-2)


def test_no_narrowing_without_grad_or_with_string_padding():
    x = ops.narrow_input_grad(torch.randn(1, 3, 8, 8, requires_grad=True) * 1.0, [(0, 1, 0, 8)])
    with torch.no_grad():
        nn.functional.conv2d(x, torch.randn(2, 3, 3, 3))
    nn.functional.conv2d(x, torch.randn(2, 3, 3, 3), padding="same")
    assert x.narrowed_convs == 0


# --------------------------------------------------------------------------- PromptedNetwork

def _gradients(network, images, labels):
    network.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(network(images), labels).backward()
    return {name: p.grad.clone() for name, p in network.named_parameters() if p.grad is not None}


def _pair_of_networks(model, kind, out, in_size, channels_last=False, dtype=torch.float64, prompt=None):
    prompt = prompt or build_prompt(kind, out, in_size, size=6)
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
    assert whole.narrowed_convs == 0


@pytest.mark.parametrize("kind,in_size", [("pad", 48), ("fix", 48), ("random", 48), ("expansive", 36)])
@pytest.mark.parametrize("channels_last,masked", list(itertools.product([False, True], [False, True])))
def test_resnet_gradients_equal_the_whole_input_gradient(kind, in_size, channels_last, masked):
    model = torchvision.models.resnet18(num_classes=10)
    if masked:
        model = V.sparsify(model, "unstructured", "scaled")
    network, whole = _pair_of_networks(model, kind, 48, in_size, channels_last)
    images = torch.randint(0, 256, (3, 3, in_size, in_size), dtype=torch.uint8)
    _assert_same_gradients(network, whole, images, torch.randint(0, 10, (3,)))
    assert network.narrowed_convs == 1


def test_compiled_models_get_the_plain_input():
    """A tensor subclass input fails inside AOTAutograd: under torch.compile nothing is narrowed."""
    model = _Stem(nn.Conv2d(3, 4, 3, 2, 1)).double()
    model(torch.rand(1, 3, 24, 24, dtype=torch.float64))
    network, whole = _pair_of_networks(model, "pad", 24, 24)
    network.model = torch.compile(network.model, backend="aot_eager")
    whole.model = torch.compile(whole.model, backend="aot_eager")
    _assert_same_gradients(network, whole, torch.rand(2, 3, 24, 24, dtype=torch.float64), torch.tensor([0, 1]))
    assert network.narrowed_convs == 0
    network.model, whole.model = network.model._orig_mod, whole.model._orig_mod
    network.model.conv.compile(backend="aot_eager")  # a submodule compiled in place
    _assert_same_gradients(network, whole, torch.rand(2, 3, 24, 24, dtype=torch.float64), torch.tensor([0, 1]))
    assert network.narrowed_convs == 0


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


class _StandardizedConv(nn.Conv2d):
    """A conv subclass with its own forward (weight standardization, as timm's StdConv2d)."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class _PaddedFirst(nn.Conv2d):
    """Pads its input itself before the conv (as timm's Conv2dSame): the conv reads another tensor."""

    def forward(self, x):
        return nn.functional.conv2d(nn.functional.pad(x, (1, 0, 1, 0)), self.weight, self.bias, self.stride)


class _Stem(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.conv, self.pool, self.fc = conv, nn.AdaptiveAvgPool2d(1), nn.LazyLinear(10)

    def forward(self, x):
        return self.fc(self.pool(torch.sigmoid(self.conv(x))).flatten(1))


@pytest.mark.parametrize("conv,count", [(_StandardizedConv(3, 4, 3, 2, 1), 1), (_PaddedFirst(3, 4, 3, 2), 0)])
def test_conv_subclasses_with_their_own_forward(conv, count):
    model = _Stem(conv).double()
    model(torch.rand(1, 3, 24, 24, dtype=torch.float64))
    network, whole = _pair_of_networks(model, "pad", 24, 24)
    _assert_same_gradients(network, whole, torch.rand(2, 3, 24, 24, dtype=torch.float64), torch.tensor([0, 1]))
    assert network.narrowed_convs == count


def test_hooks_and_saved_outputs_of_the_conv():
    """A user's forward hook that replaces the conv's output, another that keeps it for a regularizer."""
    model = _Stem(nn.Conv2d(3, 4, 3, 2, 1)).double()
    model(torch.rand(1, 3, 24, 24, dtype=torch.float64))
    kept = {}
    model.conv.register_forward_hook(lambda module, args, out: out * 2)
    model.conv.register_forward_hook(lambda module, args, out: kept.__setitem__("reg", out.pow(2).mean()))
    network, whole = _pair_of_networks(model, "pad", 24, 24)
    images, labels = torch.rand(2, 3, 24, 24, dtype=torch.float64), torch.tensor([0, 1])
    results = []
    for net in (network, whole):
        net.zero_grad(set_to_none=True)
        (nn.functional.cross_entropy(net(images), labels) + kept["reg"]).backward()
        results.append({n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})
    assert network.narrowed_convs == 1
    for name in results[1]:
        assert_close(results[0][name], results[1][name], rtol=1e-9, atol=1e-12, msg=name)


def test_checkpointed_stem():
    class Checkpointed(_Stem):
        def forward(self, x):
            y = torch.utils.checkpoint.checkpoint(self.conv, x, use_reentrant=False)
            return self.fc(self.pool(y).flatten(1))

    model = Checkpointed(nn.Conv2d(3, 4, 3, 2, 1)).double()
    model(torch.rand(1, 3, 24, 24, dtype=torch.float64))
    network, whole = _pair_of_networks(model, "pad", 24, 24)
    _assert_same_gradients(network, whole, torch.rand(2, 3, 24, 24, dtype=torch.float64), torch.tensor([0, 1]))
    assert network.narrowed_convs == 1


@pytest.mark.parametrize("kind", ["pad", "fix"])
def test_input_read_by_several_layers(kind):
    network, whole = _pair_of_networks(_InputReadTwice(), kind, 24, 24)
    images = torch.rand(4, 3, 24, 24, dtype=torch.float64)
    _assert_same_gradients(network, whole, images, torch.randint(0, 10, (4,)))
    assert network.narrowed_convs == 2


def test_prompt_subclasses_and_other_prompt_modules_are_not_narrowed():
    """A subclass may add to the program outside the region; a module of the user's has no region."""

    class PadWithBias(V.PadPrompt):
        def __init__(self):
            super().__init__(24, 24, pad=4)
            self.bias = nn.Parameter(torch.zeros(3, 24, 24))

        def forward(self, images, out_dtype=None):
            return super().forward(images, out_dtype) + self.bias

    class Plain(nn.Module):
        kind, mean, std = "plain", (0.5,) * 3, (0.5,) * 3

        def __init__(self):
            super().__init__()
            self.program = nn.Parameter(torch.zeros(3, 24, 24))

        def forward(self, images):
            return images + self.program

    for prompt in (PadWithBias(), Plain()):
        network, whole = _pair_of_networks(_InputReadTwice(), "pad", 24, 24, prompt=prompt)
        _assert_same_gradients(network, whole, torch.rand(2, 3, 24, 24, dtype=torch.float64), torch.tensor([0, 1]))
        assert network.narrowed_convs == 0


def test_two_threads_on_one_network():
    network, whole = _pair_of_networks(_InputReadTwice(), "pad", 24, 24)
    batches = [torch.rand(2, 3, 24, 24, dtype=torch.float64) for _ in range(2)]
    expected = [torch.autograd.grad(whole(b).pow(2).sum(), whole.prompt.program)[0] for b in batches]

    def work(thread):
        for _ in range(20):
            grad = torch.autograd.grad(network(batches[thread]).pow(2).sum(), network.prompt.program)[0]
            assert_close(grad, expected[thread], rtol=1e-9, atol=1e-12)
            assert network.narrowed_convs == 2

    assert run_in_threads(work, 2) == []  # the threads' failures, with their index


def test_first_layer_not_a_convolution():
    network, whole = _pair_of_networks(_NormFirst(), "pad", 16, 16)
    _assert_same_gradients(network, whole, torch.rand(2, 3, 16, 16, dtype=torch.float64), torch.randint(0, 10, (2,)))
    assert network.narrowed_convs == 0


class _NormFirst(nn.Module):
    """The input reaches the first convolution through another op: nothing to narrow."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(4, 10))

    def forward(self, x):
        return self.body(x)


def test_images_that_require_grad_get_their_whole_gradient():
    network, whole = _pair_of_networks(_InputReadTwice(), "pad", 24, 24)
    images = torch.rand(2, 3, 24, 24, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1])
    got_params = _gradients(network, images, labels)
    got_images = images.grad.clone()
    images.grad = None
    expected_params = _gradients(whole, images, labels)
    assert network.narrowed_convs == 0
    assert_close(got_images, images.grad)
    assert_close(got_params["prompt.program"], expected_params["prompt.program"])


def test_not_narrowed_without_a_program_gradient():
    network, _ = _pair_of_networks(_InputReadTwice(), "pad", 24, 24)
    images = torch.rand(2, 3, 24, 24, dtype=torch.float64)
    with torch.no_grad():
        network(images)
    assert network.narrowed_convs == 0
    network.prompt.program.requires_grad_(False)
    network(images).sum().backward()
    assert network.narrowed_convs == 0
    network(images, use_prompt=False)
    assert network.narrowed_convs == 0


def test_prompt_only_training_with_frozen_weights():
    model = torchvision.models.resnet18(num_classes=10)
    model.requires_grad_(False)
    network, whole = _pair_of_networks(model, "pad", 32, 32)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    _assert_same_gradients(network, whole, images, torch.tensor([3, 4]))
    assert network.narrowed_convs == 1


def test_bfloat16_autocast_gradients():
    model = V.sparsify(torchvision.models.resnet18(num_classes=10), "unstructured", "scaled")
    network, whole = _pair_of_networks(model, "pad", 32, 32, dtype=torch.float32)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (4,))
    with torch.autocast("cpu", torch.bfloat16):
        got = _gradients(network, images, labels)
        expected = _gradients(whole, images, labels)
    assert network.narrowed_convs == 1
    program, reference = got["prompt.program"], expected["prompt.program"]
    assert ((program - reference).norm() / reference.norm()).item() < 2e-2


# --------------------------------------------------------------------------- found in review

def test_batched_backward():
    """is_grads_batched (and a vectorized jacobian) runs the backward under vmap."""
    weight = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    leaf = torch.randn(1, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    boxes = [(0, 2, 0, 8), (2, 8, 0, 1)]
    results = []
    for marked in (ops.narrow_input_grad(leaf * 1.0, boxes), leaf * 1.0):
        out = nn.functional.conv2d(marked, weight, None, 2, 1).flatten()[:5]
        (grads,) = torch.autograd.grad(out, leaf, torch.eye(5, dtype=torch.float64), is_grads_batched=True)
        results.append(grads)
    inside = torch.zeros(8, 8, dtype=torch.bool)
    for y0, y1, x0, x1 in boxes:
        inside[y0:y1, x0:x1] = True
    assert_close(results[0], results[1] * inside, rtol=1e-12, atol=1e-12)
    assert results[0].abs().sum() > 0


def test_other_subclasses_keep_their_own_torch_function():
    class Doubled(torch.Tensor):  # a weight whose conv uses 2 * w (as a fake-quant weight might)
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if func is torch.conv2d:
                args = (args[0], args[1].as_subclass(torch.Tensor) * 2, *args[2:])
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))

    weight = torch.randn(2, 3, 3, 3).as_subclass(Doubled)
    plain = torch.randn(1, 3, 6, 6, requires_grad=True) * 1.0
    marked = ops.narrow_input_grad(plain, [(0, 1, 0, 6)])
    assert torch.equal(nn.functional.conv2d(marked, weight), nn.functional.conv2d(plain, weight))


@pytest.mark.parametrize("stride,padding", [([2], [1]), ((2,), 1), (torch.tensor(2), torch.tensor(1))])
def test_conv_arguments_in_every_form_conv2d_takes(stride, padding):
    class Conv(nn.Conv2d):
        def forward(self, x):
            return nn.functional.conv2d(x, self.weight, None, stride, padding)

    x = torch.randn(1, 3, 9, 9, dtype=torch.float64)
    whole, narrow, count = _whole_and_narrowed(Conv(3, 2, 3, bias=False).double(), x, [(0, 9, 0, 3)])
    assert count == 1
    assert_close(narrow[0], whole[0], rtol=1e-12, atol=1e-12)


def test_float64_conv_under_autocast_stays_float64():
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    with torch.autocast("cpu", torch.bfloat16):
        out, reference = conv(ops.narrow_input_grad(x * 1.0, [(0, 8, 0, 8)])), conv(x * 1.0)
    assert out.dtype == torch.float64 and torch.equal(out, reference)


def test_inputs_needing_no_gradient_are_returned_as_they_are():
    x = torch.randn(1, 3, 4, 4)
    assert ops.narrow_input_grad(x, [(0, 1, 0, 4)]) is x
    with torch.inference_mode():
        y = torch.randn(1, 3, 4, 4)
    assert ops.narrow_input_grad(y, [(0, 1, 0, 4)]) is y


def test_random_prompt_region_of_each_thread_is_its_own():
    """Each thread narrows to the square its own prompt call drew, not to another thread's last_offset."""
    model = _Stem(nn.Conv2d(3, 4, 3, 2, 1)).double()  # the input read by the conv alone
    model(torch.rand(1, 3, 24, 24, dtype=torch.float64))
    network, whole = _pair_of_networks(model, "random", 24, 24)
    images = torch.rand(2, 3, 24, 24, dtype=torch.float64)
    # both threads' prompts draw before either takes its region: the race made certain
    barrier, narrows = threading.Barrier(2, timeout=30), network._narrows
    network._narrows = lambda *args: barrier.wait() is None or narrows(*args)

    def work(thread):
        for _ in range(10):
            grad = torch.autograd.grad(network(images).pow(2).sum(), network.prompt.program)[0]
            rows, cols = (grad.abs().sum(0) > 0).nonzero(as_tuple=True)
            # the whole 6-pixel square of this call (narrowed to another call's square, it would be cut to
            # the overlap of the two, or to nothing)
            assert len(rows) and rows.max() - rows.min() == 5 and cols.max() - cols.min() == 5

    assert run_in_threads(work, 2) == []  # the threads' failures, with their index


def test_compiled_forward_methods_and_functions():
    model = _Stem(nn.Conv2d(3, 4, 3, 2, 1)).double()
    model(torch.rand(1, 3, 24, 24, dtype=torch.float64))
    network, whole = _pair_of_networks(model, "pad", 24, 24)
    network.model.forward = torch.compile(network.model.forward, backend="aot_eager")
    _assert_same_gradients(network, whole, torch.rand(2, 3, 24, 24, dtype=torch.float64), torch.tensor([0, 1]))
    assert network.narrowed_convs == 0

    class CallsACompiledFunction(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 10)
            self.pool = torch.compile(lambda x: x.mean((2, 3)), backend="aot_eager")

        def forward(self, x):
            return self.fc(self.pool(x))

    network, _ = _pair_of_networks(CallsACompiledFunction().double(), "pad", 24, 24)
    with pytest.raises(TypeError, match="narrow_input_grad=False"):
        network(torch.rand(2, 3, 24, 24, dtype=torch.float64))


def test_prompts_with_hooks_are_not_narrowed():
    network, whole = _pair_of_networks(_InputReadTwice(), "pad", 24, 24)
    bias = nn.Parameter(torch.zeros(3, 24, 24, dtype=torch.float64))
    for net in (network, whole):
        net.prompt.register_forward_hook(lambda module, args, out: out + bias)
    _assert_same_gradients(network, whole, torch.rand(2, 3, 24, 24, dtype=torch.float64), torch.tensor([0, 1]))
    assert network.narrowed_convs == 0

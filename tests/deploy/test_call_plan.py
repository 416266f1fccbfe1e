"""Compiled call plans (vpns_fast.deploy.call_plan): the same output as the traced graph, bit for bit, for every step
kind; and never a stale plan: edits of weights, attributes, the module tree, hooks and switches are all seen."""
import copy
import pickle
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vpns_fast.deploy import call_plan, runtime, sparse_cpu
from vpns_fast.nn.prompts import normalize

pytestmark = pytest.mark.skipif(not sparse_cpu.available()[0], reason="the C++ extension is not built")
torchvision = pytest.importorskip("torchvision")


@pytest.fixture
def plans_restored():
    previous = call_plan.set_call_plans(True)
    yield
    call_plan.set_call_plans(previous)


def _pruned_resnet(block: str, density: float = 0.3) -> nn.Module:
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

    torch.manual_seed(0)
    model = ResNet(Bottleneck if block == "bottleneck" else BasicBlock, [1, 1, 1, 1], num_classes=10).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):  # statistics that make folding change the weights
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(torch.rand_like(m.weight) < density)
    return model


def _converted(block: str, choice: str, x: torch.Tensor) -> nn.Module:
    model = _pruned_resnet(block)
    if choice == "sparse":
        return sparse_cpu.convert_for_cpu(model, x, policy="sparse")[0]
    # min_speedup no sparse layer reaches: every conv dense (oneDNN, Winograd, the 1x1 kernel)
    return sparse_cpu.convert_for_cpu(model, x, min_speedup=1e9, repeats=2)[0]


def _graph_output(network: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return network(x)


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
@pytest.mark.parametrize("choice", ["dense", "sparse"])
@pytest.mark.parametrize("batch", [1, 3])
def test_the_plan_gives_the_graphs_output_bit_for_bit(block, choice, batch):
    x = torch.randn(batch, 3, 40, 40)
    network = _converted(block, choice, x)
    expected = _graph_output(network, x)
    with torch.no_grad():
        plan, reason, output = call_plan.build(network, x)
    assert reason == "" and plan is not None
    assert torch.equal(output, expected)
    names = plan.compiled.step_names
    if choice == "sparse":
        assert "sparse_conv+residual" in names and "sparse_conv" in names and "max_pool" in names
    else:
        assert "channels_last_copy" in names  # the NCHW image into the dense stem
        assert any(name.startswith("onednn_conv") for name in names)
        if block == "bottleneck" and sparse_cpu.pointwise_conv_supported():
            assert "pointwise_conv" in names and "pointwise_conv+=residual" in names
    # the average pooling through GlobalAvgPool2d's kernel: the conversion swaps it by rule (a 2x2 plane) even where
    # no layer passes min_speedup (the dense choice), and so the max pooling
    assert "max_pool" in names
    assert names[-3:] == ["global_avg_pool", "flatten", names[-1]] and names[-1].endswith("_linear")
    for _ in range(2):  # a plan runs again and again, in and out of inference mode
        with torch.no_grad():
            assert torch.equal(plan.run(x), expected)
        with torch.inference_mode():
            assert torch.equal(plan.run(x), expected)


def test_a_plan_mixes_sparse_and_dense_layers():
    """Dense layers fed by sparse ones (NCHW, channel-aligned outputs copied to channels_last) and sparse layers fed
    by dense ones (channels_last inputs), as a measured conversion mixes them."""
    x = torch.randn(2, 3, 40, 40)
    network = _converted("bottleneck", "sparse", x)
    swapped = 0
    for name, module in list(network.named_modules()):
        if isinstance(module, sparse_cpu.SparseConv2d) and name.endswith("conv2"):  # no residual: any dense layer
            dense_class = sparse_cpu.WinogradConv2d if module.stride == (1, 1) else sparse_cpu.DenseConv2d
            network.set_submodule(name, dense_class(module.to_dense_weight(), module.bias, module.stride,
                                                    module.padding, module.dilation, module.groups,
                                                    activation=module.activation))
            swapped += 1
    assert swapped == 4
    expected = _graph_output(network, x)
    with torch.no_grad():
        plan, reason, _ = call_plan.build(network, x)
    assert reason == "", reason
    assert "winograd_conv" in plan.compiled.step_names and "channels_last_copy" in plan.compiled.step_names
    with torch.no_grad():
        assert torch.equal(plan.run(x), expected)


class _Scaled(nn.Module):
    """A conv, then work the plan has no C++ step for: a torch function, a method, a shape query and a module."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x):
        y = torch.sigmoid(self.conv(x)) * 2
        return self.pool(y).reshape(y.size(0), -1).add_(1)


def test_nodes_without_a_kernel_step_are_called_back_in_python():
    x = torch.randn(2, 3, 8, 8)
    network = sparse_cpu.convert_for_cpu(_Scaled().eval(), x, policy="sparse")[0]
    expected = _graph_output(network, x)
    with torch.no_grad():
        plan, reason, output = call_plan.build(network, x)
        assert reason == "" and torch.equal(output, expected)
        names = plan.compiled.step_names
        assert names[0] == "sparse_conv" and "expect_sizes" in names, names  # y.size(0): checked on every run
        assert all(name.startswith("python:") or name == "expect_sizes" for name in names[1:]), names
        assert any("pool" in name for name in names) and any("reshape" in name for name in names)
        assert torch.equal(plan.run(x), expected)
        # the shape query was answered when the plan was made: a plan is for one input shape (its key)
        assert call_plan.plan_key(x) != call_plan.plan_key(x[:1])


def test_a_value_the_input_shape_does_not_decide_refuses_the_plan():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 3, padding=1)

        def forward(self, x):
            return self.conv(x) * x.mean().item()

    x = torch.randn(1, 3, 8, 8)
    network = sparse_cpu.convert_for_cpu(DataDependent().eval(), x, policy="sparse")[0]
    with torch.no_grad():
        plan, reason, output = call_plan.build(network, x)
        assert plan is None and "gives a float, not a tensor" in reason
        assert torch.equal(output, network(x))


def _deployed(block: str = "basic") -> runtime.DeployedModel:
    return runtime.deploy(_pruned_resnet(block), policy="sparse", example_input_size=(1, 3, 40, 40))


def _images(batch: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, 40, 40, generator=torch.Generator().manual_seed(batch))


def _without_plans(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    previous = call_plan.set_call_plans(False)
    try:
        return model(images)
    finally:
        call_plan.set_call_plans(previous)


def test_deploy_runs_its_network_through_a_plan_per_input_shape(plans_restored):
    model = _deployed()
    for batch in (1, 2):
        images = _images(batch)
        first, second = model(images), model(images)
        with torch.inference_mode():
            inside = model(images)
        expected = _without_plans(model, images)
        assert torch.equal(first, expected) and torch.equal(second, expected) and torch.equal(inside, expected)
    plans = model.call_plans()
    assert [p["input_shape"] for p in plans] == [(1, 3, 40, 40), (2, 3, 40, 40)]
    assert all(p["steps"] > 10 and p["refused"] == "" for p in plans)


def test_each_step_is_timed_and_named_after_its_graph_node(plans_restored):
    model, images = _deployed("bottleneck"), _images()
    x = normalize(images, model.mean, model.std)
    plans = call_plan.NetworkPlans()
    assert plans.timed_output(model.network, x)[1] is None  # no plan yet: the graph runs (and one is made)
    expected = plans.output(model.network, x)
    out, steps = plans.timed_output(model.network, x)
    assert torch.equal(out, expected) and torch.equal(out, _graph_output(model.network, x))
    (entry,) = plans.summary()
    assert len(steps) == entry["steps"] and all(seconds >= 0 for *_, seconds in steps)
    called = {node.target for node in model.network.graph.nodes if node.op == "call_module"}
    timed = {target for op, target, _, _ in steps if op == "call_module"}
    assert "conv1" in timed and timed <= called
    assert any(name.startswith("sparse_conv") for op, target, name, _ in steps if target == "conv1")
    call_plan.set_call_plans(False)
    assert plans.timed_output(model.network, x)[1] is None  # plans turned off: the graph, untimed
    logits, timing = model.timed_call(images)
    assert torch.equal(logits, model(images)) and timing["steps"] is None
    call_plan.set_call_plans(True)
    model(images)
    logits, timing = model.timed_call(images)
    assert torch.equal(logits, model(images)) and len(timing["steps"]) == model.call_plans()[0]["steps"]
    assert 0 < timing["input_ms"] + timing["network_ms"] <= timing["total_ms"]
    assert sum(ms for *_, ms in timing["steps"]) <= timing["network_ms"]


def _plan_runs(monkeypatch) -> list:
    runs = []
    original = call_plan.NetworkPlan.run

    def counted(self, x):
        runs.append(x.shape)
        return original(self, x)

    monkeypatch.setattr(call_plan.NetworkPlan, "run", counted)
    return runs


def _first_sparse_conv(model: runtime.DeployedModel) -> sparse_cpu.SparseConv2d:
    return next(m for m in model.network.modules() if isinstance(m, sparse_cpu.SparseConv2d))


@pytest.mark.parametrize("edit", ["in place", "data", "attribute", "module", "switch"])
def test_an_edit_after_the_plan_was_made_is_seen(plans_restored, monkeypatch, edit):
    model, images = _deployed(), _images()
    before = model(images)
    runs = _plan_runs(monkeypatch)
    assert torch.equal(model(images), before) and len(runs) == 1
    conv = _first_sparse_conv(model)
    edits = sparse_cpu.layer_edits()
    with torch.no_grad():
        if edit == "in place":
            conv.values.mul_(2)
        elif edit == "data":
            conv.values.data = conv.values.data * 2  # new memory, no version bump
        elif edit == "attribute":
            conv.activation = None
        elif edit == "module":  # a layer of the tree replaced (through a torch container, not an engine layer)
            block = model.network.layer1.get_submodule("0")
            replacement = copy.deepcopy(block.conv1)
            replacement.values.mul_(2)
            block.conv1 = replacement
        else:
            sparse_cpu.set_pointwise_conv(sparse_cpu.set_pointwise_conv(False))
    assert (sparse_cpu.layer_edits() != edits) == (edit in ("attribute", "switch"))
    got = model(images)
    expected = _without_plans(model, images)
    assert torch.equal(got, expected)
    assert torch.equal(got, before) == (edit == "switch")
    assert torch.equal(model(images), expected)
    # a watched tensor changed: the old plan ran and said it was stale; else it was not run; then a new plan ran
    assert len(runs) == (3 if edit in ("in place", "data") else 2)
    assert model.call_plans()[0]["steps"] > 0


def test_a_dense_layers_refresh_counts_as_an_edit():
    layer = sparse_cpu.DenseConv2d(torch.randn(4, 3, 3, 3))
    edits = sparse_cpu.layer_edits()
    layer.refresh()
    assert sparse_cpu.layer_edits() == edits + 1


def test_hooks_run_and_the_plan_comes_back_when_they_are_removed(plans_restored, monkeypatch):
    model, images = _deployed(), _images()
    model(images)
    runs = _plan_runs(monkeypatch)
    seen = []
    conv = _first_sparse_conv(model)
    for register in (conv.register_forward_hook, model.network.register_forward_pre_hook,
                     nn.modules.module.register_module_forward_hook):
        handle = register(lambda *args: seen.append(1))
        model(images)
        assert seen and not runs, register
        handle.remove()
        seen.clear()
    model(images)
    assert len(runs) == 1 and not seen


def test_two_threads_call_one_planned_model(plans_restored):
    model = _deployed("bottleneck")
    inputs = [_images(1), _images(2)]
    expected = [_without_plans(model, images) for images in inputs]
    problems = []

    def calls(index):
        for _ in range(15):
            if not torch.equal(model(inputs[index]), expected[index]):
                problems.append(index)

    threads = [threading.Thread(target=calls, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not problems
    assert len(model.call_plans()) == 2


def test_a_planned_model_pickles_and_copies_without_its_plans(plans_restored):
    model, images = _deployed(), _images()
    expected = model(images)
    model(images)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert clone.call_plans() == []
        assert torch.equal(clone(images), expected)
        assert clone.call_plans()[0]["steps"] > 0


def test_a_sparse_conv_step_runs_on_checked_segments_a_private_copy():
    """A plan's sparse conv step takes the segments as check_segments made them: copied and checked once to start at 0
    and never decrease (its calls then read only their ends). A set that decreases anywhere is refused when checked,
    a plain tensor is not taken, and a change to the caller's tensor afterwards does not reach the step."""
    ops = sparse_cpu._ops()
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 8, 3, 3, generator=generator) * (torch.rand(24, 8, 3, 3, generator=generator) < 0.5)
    shape = [24, 8, 3, 3]
    offsets, segments, values = ops.sparse_conv2d_offsets(*ops.sparse_conv2d_pack(weight), shape, [6, 6], [1], [1],
                                                          [1])
    assert segments.numel() > 20 and int(segments[-1]) == values.numel() > 0
    source = segments.clone()

    def plan_with(these_segments):
        plan = ops.CallPlan(2, 1)
        plan.add_sparse_conv(0, -1, 1, ops.check_segments(these_segments), ops.check_offsets(offsets), values, shape,
                             None, [1], [1], [1], 0, 0, False)
        return plan

    x = torch.randn(2, 8, 6, 6, generator=generator)
    expected = F.conv2d(x, weight, padding=1)
    plan = plan_with(segments)
    torch.testing.assert_close(plan.run(x), expected, rtol=1e-5, atol=1e-5)
    middle = segments.numel() // 2
    for index in (1, middle, segments.numel() - 2):  # one pointer above the next: the second pair, mid-way, the last
        broken = segments.clone()
        broken[index] = broken[index + 1] + 1
        with pytest.raises(RuntimeError, match="must be non-decreasing"):
            plan_with(broken)
    with pytest.raises(RuntimeError, match="segments must start at 0, got 1"):
        plan_with(torch.cat([torch.ones(1, dtype=torch.long), segments[1:]]))
    with pytest.raises(RuntimeError, match="segments must be a nonempty 1-d int64"):
        plan_with(segments.int())
    with pytest.raises(TypeError, match="incompatible function arguments"):  # a plain tensor: never checked
        ops.CallPlan(2, 1).add_sparse_conv(0, -1, 1, segments, ops.check_offsets(offsets), values, shape, None, [1],
                                           [1], [1], 0, 0, False)
    segments[middle] = segments[middle + 1] + 1  # the caller's tensor, after the step was added
    torch.testing.assert_close(plan.run(x), expected, rtol=1e-5, atol=1e-5)
    # what the step reads stays checked against the values at each call: the values the plan shares, resized in place
    # after the step was added, and a last segment past the nonzeros (the segments start at 0 and never decrease)
    shared = values.clone()
    plan_values = ops.CallPlan(2, 1)
    plan_values.add_sparse_conv(0, -1, 1, ops.check_segments(source), ops.check_offsets(offsets), shared, shape, None,
                                [1], [1], [1], 0, 0, False)
    torch.testing.assert_close(plan_values.run(x), expected, rtol=1e-5, atol=1e-5)
    shared.resize_(values.numel() - 1)
    with pytest.raises(RuntimeError, match=f"offsets has {values.numel()} entries but values has {values.numel() - 1}"):
        plan_values.run(x)
    past_the_end = source.clone()
    past_the_end[-1] += 1
    with pytest.raises(RuntimeError, match=f"must end at nnz = {values.numel()}, got {values.numel() + 1}"):
        plan_with(past_the_end).run(x)


def test_a_plan_runs_with_gradients_off_whatever_its_caller_set():
    """A plan's steps record no gradient even where the caller has them on (a deployed model's fast path calls it
    without torch.no_grad()): a Python step sees them off and its product with a parameter that needs a gradient
    does not track one; the caller's setting is back after the run, and after a step that raised."""
    ops = sparse_cpu._ops()
    weight = torch.randn(4, requires_grad=True)
    seen = []

    def scaled(t):
        seen.append(torch.is_grad_enabled())
        return t * weight

    def failing(t):
        raise ValueError("a step that fails")

    plan = ops.CallPlan(2, 1)
    plan.add_python_call("scaled", [0], [1], scaled)
    for run in (plan.run, lambda t: plan.run_timed(t)[0]):
        assert torch.is_grad_enabled()
        out = run(torch.ones(4))
        assert seen[-1] is False and not out.requires_grad and torch.equal(out, weight.detach())
        assert torch.is_grad_enabled()
    failing_plan = ops.CallPlan(2, 1)
    failing_plan.add_python_call("failing", [0], [1], failing)
    with pytest.raises(ValueError, match="a step that fails"):
        failing_plan.run(torch.ones(4))
    assert torch.is_grad_enabled() and (weight * 2).requires_grad


def test_the_extension_plan_checks_its_arguments_and_goes_stale():
    ops = sparse_cpu._ops()
    with pytest.raises(RuntimeError, match="output slot 3 out of 3"):
        ops.CallPlan(3, 3)
    plan = ops.CallPlan(3, 2)
    with pytest.raises(RuntimeError, match="no step yet"):
        plan.release_after_last_step([1])
    with pytest.raises(RuntimeError, match="slot 5 out of 3"):
        plan.add_flatten(0, 5, 1, -1)
    for bad in ((-1, 1), (0, -1)):  # only a residual may be -1 (none)
        with pytest.raises(RuntimeError, match="slot -1 out of 3"):
            plan.add_flatten(*bad, 1, -1)
    with pytest.raises(RuntimeError, match="residual slot -2"):
        plan.add_pointwise_conv(0, -2, 1, torch.zeros(1, 1, 16), None, False, False)
    with pytest.raises(RuntimeError, match="slot -1 out of 3"):
        plan.add_python_call("f", [-1], [1], lambda t: t)
    with torch.inference_mode():
        inference = torch.zeros(2)
    with pytest.raises(RuntimeError, match="inference tensor"):
        plan.watch(inference)
    plan.add_adaptive_avg_pool(0, 1, [1, 1])
    plan.add_flatten(1, 2, 1, -1)
    with pytest.raises(RuntimeError, match="slot -1 out of 3"):
        plan.release_after_last_step([-1])
    plan.release_after_last_step([1])
    watched = torch.ones(3)
    plan.watch(watched)
    x = torch.randn(2, 4, 5, 5)
    assert torch.equal(plan.run(x), torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))
    assert plan.step_names == ["adaptive_avg_pool", "flatten"]
    out, seconds = plan.run_timed(x)
    assert torch.equal(out, plan.run(x)) and len(seconds) == 2 and all(0 <= s < 1 for s in seconds)
    watched.add_(1)
    assert plan.run(x) is None
    assert plan.run_timed(x) == (None, [])


def _tiny_deployed(module: nn.Module) -> runtime.DeployedModel:
    torch.manual_seed(0)
    return runtime.deploy(module.eval(), policy="sparse", example_input_size=(1, 3, 16, 16), image_size=16,
                          mean=(0.5,) * 3, std=(0.25,) * 3)


def _plan_agrees(model: nn.Module, images: torch.Tensor) -> bool:
    with torch.no_grad():
        return torch.equal(model(images), _without_plans(model, images))


class _Pooled(nn.Module):
    def __init__(self, output_size=1):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool, self.flat = nn.AdaptiveAvgPool2d(output_size), nn.Flatten()
        self.fc = nn.Linear(8 * (output_size if isinstance(output_size, int) else output_size[0] * output_size[1]), 4)

    def forward(self, x):
        return self.fc(self.flat(self.pool(self.conv(x))))


def test_a_shape_the_data_decides_is_checked_on_every_run(plans_restored):
    class Selected(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 4)

        def forward(self, x):
            y = self.conv(x).mean((2, 3))
            chosen = y[y > 0]  # how many: the data decides
            return self.fc(y) + chosen.sum() / chosen.shape[0]

    model = _tiny_deployed(Selected())
    images = [torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(i)) * (i / 4) for i in range(1, 5)]
    for image in images:
        assert _plan_agrees(model, image) and _plan_agrees(model, image)
    assert "a shape that the data decides" in model.call_plans()[0]["refused"]


def test_swapped_tensors_patched_forwards_and_edited_lists_are_seen(plans_restored):
    model, images = _tiny_deployed(_Pooled([2, 2])), _images()[:, :, :16, :16]
    model(images)
    assert model.call_plans()[0]["steps"] and _plan_agrees(model, images)
    conv = model.network.conv
    with torch.no_grad():
        new_bias = {"network.conv.bias": torch.full((8,), 5.0)}
        with_plan = torch.func.functional_call(model, new_bias, (images,))
        call_plan.set_call_plans(False)
        expected = torch.func.functional_call(model, new_bias, (images,))
        call_plan.set_call_plans(True)
    assert torch.equal(with_plan, expected)
    conv._buffers["values"] = conv.values * 2  # no setattr
    assert _plan_agrees(model, images)
    model.network.pool.output_size[:] = [4, 1]  # the list edited in place (as many features)
    assert _plan_agrees(model, images)
    model.network.pool.forward = lambda t: F.adaptive_max_pool2d(t, (4, 1))  # patched on the instance
    assert _plan_agrees(model, images)
    del model.network.pool.forward

    class Maximum(nn.AdaptiveAvgPool2d):
        def forward(self, x):
            return F.adaptive_max_pool2d(x, self.output_size)

    model.network.pool.__class__ = Maximum
    assert _plan_agrees(model, images)
    model.network.pool.__class__ = nn.AdaptiveAvgPool2d
    assert _plan_agrees(model, images)
    network = model.network
    network.forward = lambda x: network.fc(network.flat(network.pool(network.conv(x)))) * 2
    assert _plan_agrees(model, images) and "forward of its own" in model.call_plans()[0]["refused"]
    del network.forward  # the refusal goes with it
    assert _plan_agrees(model, images) and model.call_plans()[0]["steps"]
    # a module dict replaced whole, with no setattr, and the instance dict replaced
    network.__dict__["_modules"] = {**network._modules, "pool": nn.AdaptiveMaxPool2d([2, 2])}
    assert _plan_agrees(model, images) and model.call_plans()[0]["steps"]
    network.__dict__ = {**network.__dict__, "_modules": {**network._modules, "pool": nn.AdaptiveAvgPool2d([2, 2])}}
    assert _plan_agrees(model, images) and model.call_plans()[0]["steps"]
    conv.__dict__["_buffers"] = {**conv._buffers, "values": conv.values + 1}
    assert _plan_agrees(model, images)
    # found in review: a module in the instance dict, which the traced forward's self.fc finds before _modules
    network.__dict__["fc"] = nn.Linear(8 * 4, 4)
    assert _plan_agrees(model, images) and "hides the submodule" in model.call_plans()[0]["refused"]
    del network.__dict__["fc"]
    assert _plan_agrees(model, images)


def test_hook_dicts_replaced_whole_make_a_new_plan(plans_restored, monkeypatch):
    """Found in review: ``m._forward_hooks = OrderedDict()`` (a way to drop every hook) left the plan checking the
    old dict, which kept its hook: the graph ran from then on. The new dict now makes the plan stale."""
    import collections

    model, images = _tiny_deployed(_Pooled()), _images()[:, :, :16, :16]
    model(images)
    runs = _plan_runs(monkeypatch)
    pool = model.network.pool
    pool.register_forward_hook(lambda module, args, out: out)
    assert _plan_agrees(model, images) and not runs
    pool._forward_hooks = collections.OrderedDict()
    model(images)  # a new plan made on this call
    model(images)
    assert len(runs) == 1 and _plan_agrees(model, images)


def test_a_cycle_through_a_plan_is_collected(plans_restored):
    """Found in review: the extension's ObjectChecks held their objects out of the cycle collector's sight, so a
    deployed module in a cycle through its own plan was never freed."""
    import gc
    import weakref

    model, images = _tiny_deployed(_Pooled()), _images()[:, :, :16, :16]
    model(images)
    model.network.conv.owner = [model]  # the plan's checks hold the conv, which holds the module
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


def test_a_cycle_through_a_python_step_is_collected(plans_restored):
    """A layer the engine leaves to torch (here GELU) runs as a Python step, which the compiled plan holds weakly
    (the NetworkPlan holds it, where the cycle collector sees it); the plan without its holder says so."""
    import gc
    import weakref

    class Gelu(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.act = nn.Conv2d(3, 8, 3, padding=1), nn.GELU()
            self.pool, self.flat, self.fc = nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(self.flat(self.pool(self.act(self.conv(x)))))

    model, images = _tiny_deployed(Gelu()), _images()[:, :, :16, :16]
    assert _plan_agrees(model, images) and _plan_agrees(model, images)
    (entry,) = model.__dict__["_call_plans"].entries.values()
    assert any(name.startswith("python:") for name in entry.plan.compiled.step_names) and entry.plan.python_calls
    compiled, x = entry.plan.compiled, normalize(images, model.mean, model.std)
    model.network.act.owner = [model]
    alive = weakref.ref(model)
    del model, entry
    gc.collect()
    assert alive() is None
    with pytest.raises(RuntimeError, match="callable is gone"):
        compiled.run(x)


def test_object_checks_hold_until_an_object_changes():
    class Holder:
        def forward(self):
            return 1

    owner, child, other = Holder(), object(), object()
    mapping, hooks = {"child": child}, {}
    owner.__dict__["mapping"] = mapping
    checks = sparse_cpu._ops().ObjectChecks()
    checks.add_item(mapping, "child", child)
    checks.add_absent(mapping, "missing")
    checks.add_instance_dict(owner, owner.__dict__)
    checks.add_attribute(Holder, "forward", Holder.forward)
    checks.add_type(owner, Holder)
    checks.add_empty(hooks)
    assert len(checks) == 6 and checks()
    forward = Holder.forward
    for change, undo in [(lambda: mapping.__setitem__("child", other), lambda: mapping.__setitem__("child", child)),
                         (lambda: mapping.__setitem__("missing", None), lambda: mapping.pop("missing")),
                         (lambda: hooks.__setitem__(0, print), hooks.clear),
                         (lambda: setattr(Holder, "forward", lambda self: 2),
                          lambda: setattr(Holder, "forward", forward)),
                         (lambda: setattr(owner, "__class__", type("Other", (Holder,), {})),
                          lambda: setattr(owner, "__class__", Holder))]:
        change()
        assert not checks()
        undo()
        assert checks()
    kept = owner.__dict__
    owner.__dict__ = dict(kept)  # equal, but another dict
    assert not checks()
    owner.__dict__ = kept
    assert checks()
    del Holder.forward  # an attribute gone reads as changed, not as an error
    assert not checks()


_INNER: dict = {}


@torch.fx.wrap
def _inner_logits(x):
    """A deployed model called from inside another one's traced graph (as one call: fx does not trace into it)."""
    return _INNER["model"](x.clamp(0, 1))


class _Outer(_Pooled):
    def forward(self, x):
        return super().forward(x) + _inner_logits(x)


def test_a_deployed_model_called_inside_another_ones_graph(plans_restored):
    inner = _INNER["model"] = _tiny_deployed(_Pooled())
    Outer = _Outer

    outer, images = _tiny_deployed(Outer()), _images()[:, :, :16, :16]
    results = []
    thread = threading.Thread(target=lambda: results.extend(outer(images) for _ in range(3)))
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "a call that makes a plan while another model makes its own never returned"
    expected = _without_plans(outer, images)
    assert all(torch.equal(result, expected) for result in results)
    assert outer.call_plans()[0]["steps"] and inner.call_plans()[0]["steps"]


def test_entries_of_a_replaced_network_are_dropped(plans_restored):
    import weakref

    model = _tiny_deployed(_Pooled())
    model(_images(1)[:, :, :16, :16])
    model(_images(2)[:, :, :16, :16])
    old = weakref.ref(model.network)
    model.network = copy.deepcopy(model.network)
    model(_images(1)[:, :, :16, :16])
    assert [p["input_shape"][0] for p in model.call_plans()] == [1]
    import gc

    gc.collect()
    assert old() is None


def test_a_tensor_a_python_step_shapes_from_the_data_is_checked_before_a_kernel_reads_it(plans_restored,
                                                                                          monkeypatch):
    """A kernel step is made for its input's shape: where a Python step made that input (rows kept by a mask), its
    sizes and strides are checked first, and a change ends the plan for that input shape rather than run the
    kernel on a shape it was not made for; the plan runs at most once a call (the module's fast path, which found
    the change, ends the call through the graph itself)."""

    class MaskedRows(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            y = self.c1(x)
            y = y[:, :, y.mean((0, 1, 3)) > 0.0]  # how many rows: the data decides
            return self.fc(self.c2(y).mean((2, 3)))

    model = _tiny_deployed(MaskedRows())
    base = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    rows = set()
    runs = _plan_runs(monkeypatch)
    for scale in (1.0, 1.0, 0.5, 0.2, 0.8, 0.1, 0.3):
        images = base * scale
        before = len(runs)
        assert torch.equal(model(images), _without_plans(model, images)), scale
        assert len(runs) - before <= 1, scale
        with torch.no_grad():
            c1 = model.network.c1(normalize(images, model.mean, model.std))
        rows.add(int((c1.mean((0, 1, 3)) > 0).sum()))
    assert len(rows) > 1  # the shape did change, and the plan gave way
    assert model.call_plans()[0]["refused"].startswith("a shape that the data decides")

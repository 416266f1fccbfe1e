"""Sparse 1x1 layers through machine code written for their nonzeros (csrc/generated_conv.cpp): its outputs are
sparse_conv2d's, bit for bit (each output's nonzeros summed from zero in the same order, the same epilogue), on the
geometries it takes (several register groups and blocks of rows, spans shorter than the plane, empty rows, no nonzero
at all), with and without bias, residual and ReLU, from contiguous and channel-aligned inputs and residuals, into
plain and aligned outputs, NaN included; SparseConv2d runs it only where it applies, in eager calls and compiled call
plans alike, and without it where the system refuses executable memory; bad calls are refused."""
from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
import torch
from helpers import kernel_switch_runs
from torch import nn

from vpns_fast import _extension, environment
from vpns_fast.deploy import sparse_cpu

_OK, _REASON = sparse_cpu.available()
_GENERATED = _OK and _extension.load().sparse_pointwise_generated_supported([4, 4, 1, 1], [7, 7], [1, 1], [0, 0],
                                                                             [1, 1])
pytestmark = [pytest.mark.skipif(not _OK, reason=_REASON),
              pytest.mark.skipif(_OK and "avx512" not in sparse_cpu.kernel_isas(), reason="needs AVX-512"),
              pytest.mark.skipif(_OK and not _GENERATED, reason="generated code needs x86-64 Linux")]

# (C_in, C_out, H): one register group; 10 groups, all 300 rows in spans of 35 of a 7x7 plane; 900 rows in blocks of
# 240 over whole 7x7 planes; all 240 rows in spans of 42 of a 14x14 plane (the last 28); odd planes (5x5, 9x9), a
# plane of one position, a 28x28 plane in spans, and the largest plane it takes (64x64)
GEOMETRIES = [(8, 12, 7), (64, 300, 7), (16, 900, 7), (20, 16, 14), (512, 240, 14), (33, 61, 5), (100, 31, 9),
              (3, 5, 1), (6, 40, 28), (2, 3, 64)]


@pytest.fixture
def avx512():
    previous = sparse_cpu.set_kernel_isa("avx512")
    yield
    sparse_cpu.set_kernel_isa(previous)


def _weight(in_channels, out_channels, generator, density=0.2):
    weight = torch.randn(out_channels, in_channels, 1, 1, generator=generator)
    weight *= torch.rand(weight.shape, generator=generator) < density
    weight[0] = 0.0  # a row without nonzeros
    return weight


def _aligned(ops, x):
    """``x`` as a sparse layer's channel-aligned output hands it on (an identity 1x1 conv writing one)."""
    channels, size = x.shape[1], x.shape[2]
    identity = torch.eye(channels).view(channels, channels, 1, 1)
    row_ptr, channel_index, tap_index, values = ops.sparse_conv2d_pack(identity)
    one = ops.sparse_conv2d_offsets(row_ptr, channel_index, tap_index, values, list(identity.shape), [size, size],
                                    [1, 1], [0, 0], [1, 1])
    aligned = ops.sparse_conv2d(x, one[1], one[0], one[2], list(identity.shape), None, [1, 1], [0, 0], [1, 1], None,
                                0, 0, True)
    torch.testing.assert_close(aligned, x, rtol=0, atol=0, equal_nan=True)
    return aligned


@pytest.mark.parametrize("batch", [16, 48])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "{}-{}-{}px".format(*g))
def test_outputs_equal_the_kernels_bit_for_bit(geometry, batch, avx512):
    in_channels, out_channels, size = geometry
    generator = torch.Generator().manual_seed(in_channels * 31 + batch)
    weight = _weight(in_channels, out_channels, generator)
    bias = torch.randn(out_channels, generator=generator)
    ops = _extension.load()
    row_ptr, channel_index, tap_index, values = ops.sparse_conv2d_pack(weight)
    shape = list(weight.shape)
    offsets, segments, ordered = ops.sparse_conv2d_offsets(row_ptr, channel_index, tap_index, values, shape,
                                                           [size, size], [1, 1], [0, 0], [1, 1])
    code, table = ops.sparse_pointwise_generate(row_ptr, channel_index, values, shape, [size, size])
    x = torch.randn(batch, in_channels, size, size, generator=generator)
    x[1, 0, 0, size - 1] = float("nan")  # reaches the outputs it touches, as in sparse_conv2d
    residual = torch.randn(batch, out_channels, size, size, generator=generator)
    residual[2, 1, size // 2, 0] = float("-inf")
    for source in (x, _aligned(ops, x)):
        for added in (None, residual, _aligned(ops, residual)):
            for b in (bias, None):
                for activation in (0, 1):
                    for aligned_output in (False, True):
                        want = ops.sparse_conv2d(source, segments, offsets, ordered, shape, b, [1, 1], [0, 0], [1, 1],
                                                 added, activation, 0, aligned_output)
                        got = ops.sparse_pointwise_generated(source, code, table, b, added, activation,
                                                             aligned_output)
                        assert got.shape == want.shape and got.stride() == want.stride()
                        # the bits, -0 and NaN included (assert_close takes -0 for +0)
                        assert torch.equal(got.view(torch.int32), want.view(torch.int32))
                        if aligned_output:  # the padding past each plane holds zeros, as sparse_conv2d's does
                            rows = got.as_strided((got.shape[0], got.shape[1], got.stride(1)),
                                                  (got.stride(0), got.stride(1), 1))
                            assert (rows[..., size * size:] == 0).all()
    clean = x.nan_to_num()
    reference = torch.relu(torch.nn.functional.conv2d(clean, weight, bias) + residual.nan_to_num())
    got = ops.sparse_pointwise_generated(clean, code, table, bias, residual.nan_to_num(), 1)
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-4)


def test_a_layer_without_nonzeros_writes_its_bias(avx512):
    ops = _extension.load()
    weight = torch.zeros(40, 16, 1, 1)
    bias = torch.randn(40)
    row_ptr, channel_index, _, values = ops.sparse_conv2d_pack(weight)
    code, table = ops.sparse_pointwise_generate(row_ptr, channel_index, values, list(weight.shape), [7, 7])
    assert table.numel() == 0
    got = ops.sparse_pointwise_generated(torch.randn(16, 16, 7, 7), code, table, bias)
    torch.testing.assert_close(got, bias.view(1, 40, 1, 1).expand(16, 40, 7, 7), rtol=0, atol=0)


def test_bad_calls_are_refused(avx512):
    ops = _extension.load()
    weight = _weight(6, 5, torch.Generator().manual_seed(0), density=0.5)
    row_ptr, channel_index, tap_index, values = ops.sparse_conv2d_pack(weight)
    code, table = ops.sparse_pointwise_generate(row_ptr, channel_index, values, list(weight.shape), [7, 7])
    with pytest.raises(RuntimeError, match="the batch must be a multiple of 16, got 8"):
        ops.sparse_pointwise_generated(torch.randn(8, 6, 7, 7), code, table, None)
    with pytest.raises(RuntimeError, match="written for 6 channels of 49 positions, got 6 of 64"):
        ops.sparse_pointwise_generated(torch.randn(16, 6, 8, 8), code, table, None)
    with pytest.raises(RuntimeError, match="written for 6 channels of 49 positions, got 7 of 49"):
        ops.sparse_pointwise_generated(torch.randn(16, 7, 7, 7), code, table, None)
    with pytest.raises(RuntimeError, match="table must be the contiguous float32 tensor"):
        ops.sparse_pointwise_generated(torch.randn(16, 6, 7, 7), code, table[:-1], None)
    with pytest.raises(RuntimeError, match="activation must be 0 \\(none\\) or 1 \\(relu\\)"):
        ops.sparse_pointwise_generated(torch.randn(16, 6, 7, 7), code, table, None, None, 2)
    with pytest.raises(RuntimeError, match="residual must be a float32 CPU tensor of the output's shape"):
        ops.sparse_pointwise_generated(torch.randn(16, 6, 7, 7), code, table, None, torch.randn(16, 5, 7, 6))
    with pytest.raises(RuntimeError, match="bias must be a float32 CPU tensor"):
        ops.sparse_pointwise_generated(torch.randn(16, 6, 7, 7), code, table, torch.randn(4))
    with pytest.raises(RuntimeError, match="at most 4096 positions"):
        ops.sparse_pointwise_generate(row_ptr, channel_index, values, list(weight.shape), [65, 65])
    unsorted = channel_index.clone()
    first = int(row_ptr[1])  # row 1's nonzeros, reversed
    unsorted[first:int(row_ptr[2])] = channel_index[first:int(row_ptr[2])].flip(0)
    with pytest.raises(RuntimeError, match="sorted by input channel"):
        ops.sparse_pointwise_generate(row_ptr, unsorted, values, list(weight.shape), [7, 7])
    with pytest.raises(RuntimeError, match="channel_index out of range"):
        ops.sparse_pointwise_generate(row_ptr, channel_index + 6, values, list(weight.shape), [7, 7])
    supported = ops.sparse_pointwise_generated_supported
    assert supported([4, 3, 1, 1], [14, 14], [1, 1], [0, 0], [1, 1]) and supported([4, 3, 1, 1], [64, 64], [1, 1],
                                                                                   [0, 0], [1, 1])
    assert not supported([4, 3, 1, 1], [65, 65], [1, 1], [0, 0], [1, 1])
    assert not supported([4, 8192, 1, 1], [64, 64], [1, 1], [0, 0], [1, 1])  # 2^25 vectors: past 32-bit displacements
    pays = sparse_cpu._generated_code_pays  # SparseConv2d's rule, from measurements (its docstring)
    assert pays((2048, 512, 1, 1), 7, 7) and pays((1024, 256, 1, 1), 14, 14) and pays((512, 2048, 1, 1), 7, 7)
    assert not pays((256, 1024, 1, 1), 14, 14)  # 784 KiB of input an image: the copy loses
    assert not pays((160, 960, 1, 1), 7, 7) and not pays((512, 128, 1, 1), 28, 28)
    assert not pays((512, 512, 3, 3), 7, 7)
    assert not supported([4, 3, 1, 1], [14, 14], [2, 2], [0, 0], [1, 1])
    assert not supported([4, 3, 3, 3], [7, 7], [1, 1], [1, 1], [1, 1])


def test_on_by_default_except_on_intel_cpus():
    """Measured: on a 2-vCPU Intel Xeon ResNet-50 ran 0.90-0.95x as fast with the generated code (Zen 4: 1.02-1.06x);
    the default a fresh process starts with follows the vendor the CPU names."""
    assert sparse_cpu.generated_code_default("GenuineIntel") is False
    assert sparse_cpu.generated_code_default("AuthenticAMD") is True
    assert sparse_cpu.generated_code_default("") is True  # unknown: as the extension decides (AVX-512, Linux)
    vendor = environment.cpu_vendor()
    assert isinstance(vendor, str) and (vendor or not sys.platform.startswith("linux"))
    started = subprocess.run(
        [sys.executable, "-c", "from vpns_fast.deploy import sparse_cpu; print(sparse_cpu.set_generated_code(True))"],
        capture_output=True, text=True, check=True, cwd=pathlib.Path(__file__).parents[2]).stdout.strip()
    assert started == str(sparse_cpu.generated_code_default(vendor))


class _Block(nn.Module):
    """Two 1x1 layers the code takes (512 output channels at 7x7; one with a residual and ReLU) after a 3x3 layer it
    does not take."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(3, 16, 3, 2, 1)
        self.expand = nn.Conv2d(16, 512, 1)
        self.mix = nn.Conv2d(512, 512, 1)

    def forward(self, x):
        y = torch.relu(self.expand(torch.relu(self.down(x))))
        return torch.relu(self.mix(y) + y)


@pytest.mark.parametrize("batch", [16, 20])
def test_sparse_layers_take_it_where_it_applies(batch, avx512):
    """Eager and through the compiled call plan: the same outputs with the code on and off; it runs for both 1x1
    layers at batches of 16, not at batch 20."""
    torch.manual_seed(batch)
    model = _Block().eval()
    with torch.no_grad():
        for conv in (model.down, model.expand, model.mix):
            conv.weight *= torch.rand(conv.weight.shape) < 0.3
    x = torch.rand(batch, 3, 14, 14)
    found = kernel_switch_runs(model, x, sparse_cpu.set_generated_code, "_generated_arguments",
                               "sparse_pointwise_generated")
    assert found["taken"] == {False: 0, True: 2 if batch % 16 == 0 else 0}
    assert found["steps"] == (2 if batch % 16 == 0 else 0)


def test_a_system_refusing_executable_memory_runs_without_it(avx512, monkeypatch):
    torch.manual_seed(0)
    model = _Block().eval()
    x = torch.rand(16, 3, 14, 14)
    converted, _ = sparse_cpu.convert_for_cpu(model, x, policy="sparse")
    with torch.inference_mode():
        want = converted(x)
    ops = _extension.load()

    class Refusing:
        def __getattr__(self, name):
            return getattr(ops, name)

        def sparse_pointwise_generate(self, *arguments):
            raise RuntimeError("sparse_pointwise_generate: this system refuses executable memory (mprotect PROT_EXEC)")

    previous = sparse_cpu.set_generated_code(True)
    converted, _ = sparse_cpu.convert_for_cpu(model, x, policy="sparse")
    for layer in converted.modules():
        if isinstance(layer, sparse_cpu.SparseConv2d):
            layer._geometry_cache = {}  # the code its conversion generated: made again below
    monkeypatch.setattr(sparse_cpu, "_ops", lambda: Refusing())
    try:
        with pytest.warns(RuntimeWarning, match="without generated code: RuntimeError: .*refuses executable memory"):
            with torch.inference_mode():
                got = converted(x)
        assert sparse_cpu.set_generated_code(True) is False  # turned off by the refusal
    finally:
        sparse_cpu.set_generated_code(previous)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_the_switch_takes_a_bool():
    with pytest.raises(TypeError, match="enabled must be a bool, got 1"):
        sparse_cpu.set_generated_code(1)


def test_odd_strides_planes_and_malformed_packs(avx512):
    """An outside review: a 1-channel input (or residual) whose channel dimension has an odd stride, which torch
    still calls contiguous, was read at that stride (wrong outputs, or a crash); a row_ptr [0, huge, nnz] read past
    channel_index before it was refused. Also planes that are not square and whose positions no chunk divides."""
    ops = _extension.load()
    generator = torch.Generator().manual_seed(5)
    for in_channels, out_channels, height, width in [(1, 64, 7, 7), (8, 1, 7, 7), (5, 40, 1, 17), (7, 33, 13, 5)]:
        weight = torch.randn(out_channels, in_channels, 1, 1, generator=generator)
        weight *= torch.rand(weight.shape, generator=generator) < 0.6
        shape = list(weight.shape)
        row_ptr, channel_index, tap_index, values = ops.sparse_conv2d_pack(weight)
        offsets, segments, ordered = ops.sparse_conv2d_offsets(row_ptr, channel_index, tap_index, values, shape,
                                                               [height, width], [1, 1], [0, 0], [1, 1])
        code, table = ops.sparse_pointwise_generate(row_ptr, channel_index, values, shape, [height, width])
        x = torch.randn(16, height, width, in_channels, generator=generator).permute(0, 3, 1, 2)
        residual = torch.randn(16, height, width, out_channels, generator=generator).permute(0, 3, 1, 2)
        for source in (x, x.contiguous()):
            for added in (residual, residual.contiguous()):
                want = ops.sparse_conv2d(source.contiguous(), segments, offsets, ordered, shape, None, [1, 1], [0, 0],
                                         [1, 1], added.contiguous(), 1, 0, False)
                got = ops.sparse_pointwise_generated(source, code, table, None, added, 1)
                torch.testing.assert_close(got, want, rtol=0, atol=0)
                reference = torch.relu(torch.nn.functional.conv2d(source, weight) + added)
                torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)
    far = torch.empty_strided((16, 1, 7, 7), (49, 1 << 20, 7, 1)).copy_(torch.randn(16, 1, 7, 7))
    row_ptr, channel_index, _, values = ops.sparse_conv2d_pack(torch.ones(3, 1, 1, 1))
    code, table = ops.sparse_pointwise_generate(row_ptr, channel_index, values, [3, 1, 1, 1], [7, 7])
    torch.testing.assert_close(ops.sparse_pointwise_generated(far, code, table, None), far.expand(16, 3, 7, 7),
                               rtol=0, atol=0)
    broken = row_ptr.clone()
    broken[1] = 1 << 40
    with pytest.raises(RuntimeError, match="row_ptr must not decrease"):
        ops.sparse_pointwise_generate(broken, channel_index, values, [3, 1, 1, 1], [7, 7])


def test_new_weights_and_inference_buffers_are_never_read_stale(avx512):
    """An outside review: a buffer reassigned twice came back at the first one's address with version 0, and the
    layer ran the code (and values) cached for the first; now each cache entry holds the tensors it was made from.
    Buffers that are inference tensors (loaded inside torch.inference_mode) have no version counter: the layer
    then runs the per-image kernel rather than write the code again at every call."""
    torch.manual_seed(3)
    conv = nn.Conv2d(16, 512, 1)
    with torch.no_grad():
        conv.weight *= torch.rand(conv.weight.shape) < 0.2
    layer = sparse_cpu.SparseConv2d.from_dense(conv)
    x = torch.randn(16, 16, 7, 7)
    previous = sparse_cpu.set_generated_code(True)
    try:
        with torch.no_grad():
            weight = conv.weight.clone()
            for scale in (2.0, 1.5, 3.0, 0.5):
                layer.values = layer.values * scale  # a new tensor each time, at version 0
                weight *= scale
                assert layer._generated_arguments(x, None, None) is not None
                torch.testing.assert_close(layer(x), torch.nn.functional.conv2d(x, weight, conv.bias), rtol=1e-4,
                                           atol=1e-4)
        inference = sparse_cpu.SparseConv2d.from_dense(conv)
        with torch.inference_mode():
            inference.values = inference.values.clone()  # as load_state_dict inside inference_mode leaves it
            assert inference._buffers["values"].is_inference()
            assert inference._generated_arguments(x, None, None) is None
            torch.testing.assert_close(inference(x), conv(x), rtol=1e-4, atol=1e-4)
    finally:
        sparse_cpu.set_generated_code(previous)

"""Test setup: Triton kernels run on the CPU through the interpreter unless a GPU is present.

TRITON_INTERPRET must be set before triton is imported, so it is set here, first.
"""
import os
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

# The masked-conv dispatch table (vpns_fast/ops/conv_dispatch.py): never the user's own.
os.environ["VPNS_FAST_CONV_TABLE"] = os.path.join(tempfile.mkdtemp(prefix="vpns-fast-tests-"), "conv_dispatch.json")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def cuda_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch.device("cuda")


@pytest.fixture
def ieee_fp32():
    """float32 convolutions at float32 precision: no TF32 (cuDNN's default for convs on CUDA,
    which the Triton conv follows; it only exists there)."""
    previous = torch.backends.cudnn.conv.fp32_precision
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    yield
    torch.backends.cudnn.conv.fp32_precision = previous

"""Helpers shared by several test files."""
import pytest
import torch
from torch import nn

from vpns_fast.ops import backend_report

# Interpreted Triton costs ~0.1 s a call on the CPU: those tests get a reduced matrix.
INTERPRETED = {"triton"} if not torch.cuda.is_available() else set()
# Tests of the Triton kernels on the default device (CUDA, else CPU through the interpreter).
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
requires_triton = pytest.mark.skipif(
    not backend_report()["triton"]["devices"][TRITON_DEVICE]["available"], reason="triton cannot run here")


def backends_for(op: str) -> list[str]:
    """Every backend that implements ``op`` and can run on CPU tensors here."""
    return [name for name, r in backend_report().items() if op in r["ops"] and r["devices"]["cpu"]["available"]]


def case_id(value) -> str:
    """Readable pytest id for one parameter: dtypes without ``torch.``, shapes joined by x, lists
    of shapes as their count and first shape."""
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, list):
        return f"{len(value)}tensors-" + "x".join(map(str, value[0]))
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return str(value)


def cases_on_backends(backends, full, reduced=None, ids=case_id):
    """``full`` cases on every backend, or ``reduced`` ones on interpreted backends; each case
    gets the backend name appended."""
    reduced = full if reduced is None else reduced
    return [pytest.param(*case, b, id="-".join(map(ids, case + (b,))))
            for b in backends for case in (reduced if b in INTERPRETED else full)]


@torch.no_grad()
def randomize_batchnorm(model: nn.Module, seed: int = 1) -> None:
    """BN statistics and affine far from identity, so pruned channels output constants of both signs."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)

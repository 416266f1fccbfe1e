"""Fixtures of the deploy tests."""
import pytest

from vpns_fast.deploy import sparse_cpu


@pytest.fixture(params=sparse_cpu.KERNEL_ISAS)
def kernel_isa(request):
    """Runs the test with each vector kernel this CPU has (the default is one of them), then restores the choice. The
    sparse layers follow it; the dense 1x1 tile (the 1x1 kernel's and Winograd's products) runs 16 lanes with
    "avx512" and AVX2 with the others, "scalar" included."""
    try:
        previous = sparse_cpu.set_kernel_isa(request.param)
    except RuntimeError as exc:  # "this CPU has no avx512"
        pytest.skip(str(exc).splitlines()[0])
    yield request.param
    sparse_cpu.set_kernel_isa(previous)

"""Fixtures of the deploy tests."""
import pytest

from vpns_fast.deploy import sparse_cpu


@pytest.fixture(params=sparse_cpu.KERNEL_ISAS)
def kernel_isa(request):
    """Runs the test with each vector kernel this CPU has (the default is one of them; the sparse layers and the dense
    1x1 kernel follow the one choice), then restores the choice."""
    try:
        previous = sparse_cpu.set_kernel_isa(request.param)
    except RuntimeError as exc:  # "this CPU has no avx512"
        pytest.skip(str(exc).splitlines()[0])
    yield request.param
    sparse_cpu.set_kernel_isa(previous)

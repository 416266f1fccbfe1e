"""The shared comparison helper must fail where it should: a check that cannot fail is a defect."""
import pytest
import torch
from tolerance import EXACT, assert_close, atol_for


def test_exact_rule_rejects_one_ulp():
    x = torch.tensor([1.0, 2.0])
    assert_close(x, x.clone(), **EXACT)
    with pytest.raises(AssertionError):
        assert_close(x, torch.nextafter(x, torch.tensor(3.0)), **EXACT)


def test_twice_torch_error_rule():
    expected = torch.tensor([1.0, 1.0], dtype=torch.float64)
    baseline = torch.tensor([1.01, 1.0])  # torch's own rounding error: 0.01 on the first element
    assert_close(torch.tensor([0.985, 1.0]), expected, baseline=baseline, atol=0.0)
    with pytest.raises(AssertionError, match="twice torch's error"):
        assert_close(torch.tensor([1.0, 1.001]), expected, baseline=baseline, atol=0.0)  # torch was exact there


def test_default_atol_grows_with_the_reduction():
    assert atol_for(torch.float32, 100) == pytest.approx(10 * atol_for(torch.float32))


def test_relative_to_max_and_dtype_table():
    expected = torch.tensor([100.0, 1.0])
    assert_close(expected + torch.tensor([0.0, 0.009]), expected, relative_to_max=True, rtol=1e-4)
    with pytest.raises(AssertionError, match="relative error"):
        assert_close(expected + torch.tensor([0.0, 0.02]), expected, relative_to_max=True, rtol=1e-4)
    with pytest.raises(AssertionError):
        assert_close(torch.tensor([1.001]), torch.tensor([1.0]))  # float32's table entry is 1e-5

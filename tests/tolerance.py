"""The one float comparison of the test suite: a dtype table and ``assert_close``.

Three rules, one function:

* **exact** (``rtol=0, atol=0``): masks, thresholds, integer work, anything the kernels must
  reproduce bit for bit.
* **twice torch's error** (``baseline=`` given): ``|actual - expected| <= 2 * |baseline - expected| + atol``,
  with ``expected`` computed in float64 and ``baseline`` the same computation in the test's own
  precision by plain torch (``atol`` may be a tensor: a per-element slack). A kernel may round
  differently from torch, but not worse than twice as far from the truth. ``atol`` defaults to the
  dtype's entry of :data:`ATOL`, scaled by the square root of the reduction length (rounding errors
  of a sum of ``n`` terms grow like ``sqrt(n)``).
* **relative to the largest value** (``relative_to_max=True``): ``max|actual - expected| / max|expected|
  <= rtol``, for whole networks whose logits differ only by a different order of summation.

Otherwise it is ``torch.testing.assert_close`` with the dtype's ``(rtol, atol)`` from :data:`TOLERANCE`.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

EXACT = {"rtol": 0.0, "atol": 0.0}

# (rtol, atol) per dtype for results that should agree to a few units of roundoff; the same values
# torch.testing uses by default, so a test that names no tolerance means exactly this.
TOLERANCE = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1.3e-6, 1e-5),
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
}

# Absolute slack of the twice-torch's-error rule, per term of a reduction (scaled by sqrt(n)).
ATOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,
    torch.float16: 1e-3,
    torch.bfloat16: 1e-2,
}


def atol_for(dtype: torch.dtype, reduction: int = 1) -> float:
    return ATOL[dtype] * math.sqrt(max(reduction, 1))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, baseline: torch.Tensor | None = None,
                 reduction: int = 1, rtol: float | None = None, atol: float | torch.Tensor | None = None,
                 relative_to_max: bool = False, equal_nan: bool = False,
                 msg: str | Callable[[str], str] = "") -> None:
    if not isinstance(actual, torch.Tensor):  # numbers and tuples: torch.testing's own rules
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=msg or None)
        return
    actual, expected = actual.detach(), torch.as_tensor(expected).detach()
    where = f"{msg}: " if isinstance(msg, str) and msg else ""
    assert actual.shape == expected.shape, f"{where}shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if baseline is not None:
        atol = atol_for(actual.dtype, reduction) if atol is None else atol
        error = (actual.double() - expected.double()).abs()
        bound = 2 * (baseline.detach().double() - expected.double()).abs() + atol
        excess = (error - bound).max().item() if error.numel() else 0.0
        slack = f"{atol:.3g}" if isinstance(atol, float) else "atol"
        assert excess <= 0, f"{where}error exceeds twice torch's error + {slack} by {excess:.3g}"
        return
    if relative_to_max:
        rtol = TOLERANCE[actual.dtype][0] if rtol is None else rtol
        scale = expected.double().abs().max().clamp_min(1e-6)
        error = ((actual.double() - expected.double()).abs().max() / scale).item()
        assert error <= rtol, f"{where}relative error {error:.3g} > {rtol}"
        return
    if rtol is None and atol is None:
        rtol, atol = TOLERANCE.get(actual.dtype, (0.0, 0.0))
    elif rtol is None or atol is None:
        raise TypeError("give both rtol and atol, or neither (the dtype's entry of TOLERANCE)")
    message = msg if callable(msg) else ((lambda m: f"{where}{m}") if msg else None)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=equal_nan, msg=message)

"""vpns_fast.errors: an exception as the one line a message, warning or table shows."""
from __future__ import annotations

import pytest

from vpns_fast.errors import exception_reason, state_dict_mismatch


def test_the_first_line_that_is_not_blank_with_the_type():
    exc = RuntimeError("\n  \n  shapes differ: [2, 3] and [3]  \nTraceback (most recent call last):\n  ...")
    assert exception_reason(exc) == "RuntimeError: shapes differ: [2, 3] and [3]"
    assert exception_reason(exc, with_type=False) == "shapes differ: [2, 3] and [3]"


def test_an_empty_message_gives_the_type_alone_or_nothing():
    assert exception_reason(MemoryError()) == "MemoryError"
    assert exception_reason(KeyError(""), with_type=False) == "''"  # str(KeyError('')) is "''"
    assert exception_reason(ValueError("   \n"), with_type=False) == ""


def test_long_lines_are_cut_to_the_limit_with_an_ellipsis():
    exc = ValueError("x" * 500)
    reason = exception_reason(exc, 40)
    assert len(reason) == 40 and reason.startswith("ValueError: xxx") and reason.endswith("...")
    assert exception_reason(ValueError("short"), 40) == "ValueError: short"
    assert len(exception_reason(exc)) == 200  # the default limit


def test_state_dict_mismatch_names_the_first_problem_and_counts_the_rest():
    import torch
    from torch import nn

    with pytest.raises(RuntimeError) as caught:
        nn.Linear(3, 2).load_state_dict({"weight": torch.zeros(4, 3), "bias": torch.zeros(4)})
    reason = state_dict_mismatch(caught.value)
    assert reason.startswith("size mismatch for weight: copying a param with shape torch.Size([4, 3])")
    assert reason.endswith("(in all: 2 size mismatches)") and "\n" not in reason
    with pytest.raises(RuntimeError) as caught:
        nn.Linear(3, 2).load_state_dict({"weight": torch.zeros(2, 3)})
    assert state_dict_mismatch(caught.value) == 'Missing key(s) in state_dict: "bias" (in all: 1 missing keys)'
    # keys are counted, not torch's lines: ResNet-18's weights into a ResNet-50 miss about a hundred keys
    import torchvision

    with pytest.raises(RuntimeError) as caught:
        torchvision.models.resnet50().load_state_dict(torchvision.models.resnet18().state_dict())
    reason = state_dict_mismatch(caught.value)
    import re

    (missing,) = [line for line in str(caught.value).splitlines() if "Missing key(s)" in line]
    listed = len(re.findall(r'"[^"]+"', missing))  # torch's own list, on one line
    assert listed > 100 and reason.endswith(f"(in all: {listed} missing keys, 24 size mismatches)")
    assert len(reason) <= 300
    long = state_dict_mismatch(RuntimeError("Error(s) in loading state_dict for M:\n\t" + "x" * 500 + "\n\ty"), 60)
    assert len(long) == 60 and long.endswith("x...")  # a line torch never writes: nothing to count
    assert state_dict_mismatch(RuntimeError("other\nlines")) == "other"  # not load_state_dict's: its first line

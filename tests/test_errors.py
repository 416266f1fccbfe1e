"""vpns_fast.errors.exception_reason: an exception as the one line a message, warning or table shows."""
from __future__ import annotations

from vpns_fast.errors import exception_reason


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

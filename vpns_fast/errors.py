"""Exceptions told in one line: the reason a one-line error, a warning or a table cell gives."""
from __future__ import annotations


class NetworkNotRebuildable(ValueError):
    """A file whose network was given to training as a module object: the file names its class but cannot
    rebuild it, so only Python code holding a module of that architecture (``model=...``) can load it."""


def exception_reason(exc: BaseException, limit: int = 200, with_type: bool = True) -> str:
    """``Type: first line of the message`` (``with_type=False``: the line alone), the first line that is not
    blank; the type alone when the message is empty. Cut to ``limit`` characters, ending in "..." when cut.
    Messages of torch and its compilers run to dozens of lines (generated code, tracebacks of workers)."""
    line = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    if with_type:
        line = f"{type(exc).__name__}: {line}" if line else type(exc).__name__
    return line if len(line) <= limit else line[:max(0, limit - 3)] + "..."


def state_dict_mismatch(exc: BaseException, limit: int = 300) -> str:
    """One line for ``load_state_dict``'s RuntimeError, whose first line ("Error(s) in loading state_dict for
    ResNet:") says nothing: the first problem (missing / unexpected keys, a size mismatch), how many more
    there are, cut to ``limit`` characters."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if len(lines) < 2 or not lines[0].startswith("Error(s) in loading state_dict"):
        return exception_reason(exc, limit, with_type=False)
    more = f" (and {len(lines) - 2} more)" if len(lines) > 2 else ""
    first = lines[1].rstrip(".")
    room = max(0, limit - len(more))
    return (first if len(first) <= room else first[:max(0, room - 3)] + "...") + more

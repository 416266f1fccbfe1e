"""Exceptions told in one line: the reason a one-line error, a warning or a table cell gives."""
from __future__ import annotations

import os
import sys


class NetworkNotRebuildable(ValueError):
    """A file whose network was given to training as a module object: the file names its class but cannot
    rebuild it, so only Python code holding a module of that architecture (``model=...``) can load it.
    ``reason`` is the first part of the message, without the advice, which is for Python code."""

    TRAINING_ADVICE = "name the model as 'package.module:factory' when training"

    def __init__(self, what: str, network_class: str):
        self.reason = (f"{what}'s network ({network_class}) was passed as an object, which the file cannot "
                       "rebuild")
        super().__init__(f"{self.reason}; pass model=<a module of the same architecture> (or "
                         f"{self.TRAINING_ADVICE})")


class SettingError(ValueError):
    """A setting that is refused, told as ``"{field}: {reason}"``: ``field`` names the setting (a TrainConfig field,
    an argument), so whoever set it can be named instead (the CLI names the flag that set it, a config file the
    file), and ``reason`` says what was expected. ``part``: the keys within a dict setting at fault (an optimizer
    group and its key, e.g. ``("search_scores", "lr")``), where a file and flags may each set some of it."""

    def __init__(self, field: str, reason: str, part: tuple[str, ...] = ()):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason, self.part = field, reason, tuple(part)


class MissingFilesError(SettingError, FileNotFoundError):
    """A setting naming a folder that lacks the files it should hold (a dataset's ``data_dir``): a SettingError, so
    that whoever set it is named (the flag, or the config file), and a FileNotFoundError, as the dataset loaders
    have always raised for missing files."""


def shortened(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, ending in "..." when cut."""
    return text if len(text) <= limit else text[:max(0, limit - 3)] + "..."


def first_items(items, count: int = 3) -> str:
    """The first ``count`` of ``items`` (strings) joined by ", ", ending in ", ..." when there are more: one way for
    every message that names a few of many."""
    items = list(items)
    return ", ".join(items[:count]) + (", ..." if len(items) > count else "")


def exception_reason(exc: BaseException, limit: int = 200, with_type: bool = True) -> str:
    """``Type: first line of the message`` (``with_type=False``: the line alone), the first line that is not
    blank; the type alone when the message is empty. Cut to ``limit`` characters, ending in "..." when cut.
    Messages of torch and its compilers run to dozens of lines (generated code, tracebacks of workers)."""
    line = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    if with_type:
        line = f"{type(exc).__name__}: {line}" if line else type(exc).__name__
    return shortened(line, limit)


def state_dict_mismatch(exc: BaseException, limit: int = 300) -> str:
    """One line for ``load_state_dict``'s RuntimeError, whose first line ("Error(s) in loading state_dict for
    ResNet:") says nothing: its first problem (missing or unexpected keys, a size mismatch), cut to ``limit``
    characters, then how many problems of each kind there are in all."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if len(lines) < 2 or not lines[0].startswith("Error(s) in loading state_dict"):
        return exception_reason(exc, limit, with_type=False)
    counts = {"missing keys": 0, "unexpected keys": 0, "size mismatches": 0}
    for line in lines[1:]:
        keys = line.split(": ", 1)[1].count('", "') + 1 if ": " in line else 1  # torch lists them as "a", "b"
        if line.startswith("Missing key(s)"):
            counts["missing keys"] += keys
        elif line.startswith("Unexpected key(s)"):
            counts["unexpected keys"] += keys
        elif line.startswith("size mismatch"):
            counts["size mismatches"] += 1
    counted = ", ".join(f"{count} {kind}" for kind, count in counts.items() if count)
    total = f" (in all: {counted})" if counted else ""
    return shortened(lines[1].rstrip("."), max(0, limit - len(total))) + total


def caller_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` made by the function calling this one that points at the first
    frame outside the vpns_fast package: the user's line, whichever public function led there (Python 3.12's
    ``skip_file_prefixes``, which 3.11 lacks)."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


class UncheckedFileWarning(UserWarning):
    """A file read or written without one of its usual guards: a checkpoint with no checksum (an older
    vpns_fast wrote it), or a file written without its lock (the file system refused the lock file)."""

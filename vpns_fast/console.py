"""The training job's console lines (its header, one line per finished run or epoch, the results table), written
through the logger ``vpns_fast.training`` so that an application can silence, redirect or format them with
:mod:`logging`, and printed on stdout, as a command-line tool would, where nothing has configured logging."""
from __future__ import annotations

import logging

LOGGER = logging.getLogger("vpns_fast.training")


def say(message: str) -> None:
    """``message`` at INFO on ``vpns_fast.training``.

    - A level set on ``vpns_fast`` or ``vpns_fast.training`` is obeyed:
      ``logging.getLogger("vpns_fast").setLevel(logging.WARNING)`` silences the job; at INFO or below its lines go
      to logging's handlers where there are any (``addHandler``, ``logging.basicConfig``).
    - With no level set there, the lines go to logging where the application asked for INFO (a root logger at
      INFO or below with a handler, ``logging.basicConfig(level=logging.INFO)``), and are printed on stdout
      otherwise, as a command-line tool's would: the root's default WARNING is not a choice about this package.
    - ``logging.disable`` covering INFO silences them either way.

    Before, the lines were plain ``print`` calls that no logging setting could reach (an outside review)."""
    if logging.root.manager.disable >= logging.INFO:
        return
    level = _level_set_here()
    if level is not None and level > logging.INFO:
        return
    if LOGGER.hasHandlers() and (level is not None or logging.root.level <= logging.INFO):
        LOGGER.info(message)
    else:
        print(message, flush=True)


def _level_set_here() -> int | None:
    """The first level set on ``vpns_fast.training`` or ``vpns_fast``; None where neither has one."""
    for name in ("vpns_fast.training", "vpns_fast"):
        level = logging.getLogger(name).level
        if level != logging.NOTSET:
            return level
    return None

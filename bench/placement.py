"""Rounds of a one-process A/B grouped by where the host put the two cores: sharing an L3 or not.

The 2-vCPU guests measured here find their two vCPUs on cores that share an L3 (a cache line passed between two
pinned threads comes back in 50-110 ns) or not (310-360 ns), the host moving them every few seconds to minutes; a
change that touches what the two threads share can pay in one placement and cost in the other. Each round runs
``calls_per_round`` calls of every run (their medians), the order rotating round by round, then measures the round
trip (``bench.environment.core_round_trip_ns``) with the engine idle; rounds below ``SHARED_BELOW_NS`` count as
"shared", from ``APART_FROM_NS`` as "apart", the others (and rounds where it could not be measured) as "between".
Used by ``bench.private_planes_ab`` and ``bench.output_prefetch_ab``.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from bench.environment import core_round_trip_ns
from bench.runner import round_ratio_line
from bench.timing import rotating_times_ms

SHARED_BELOW_NS, APART_FROM_NS = 150.0, 250.0
GROUPS = ("shared", "apart", "between")


def _round(runs: dict[str, Callable[[], Any]], prepare: Callable[[str], Any], calls: int,
           round_index: int) -> dict[str, float]:
    """Each run's median ms over ``calls`` calls (``prepare(name)`` first), in an order rotated by ``round_index``."""
    names = list(runs)
    shift = round_index % len(names)
    medians = {}
    for name in names[shift:] + names[:shift]:
        prepare(name)
        medians[name] = float(np.median(rotating_times_ms({name: runs[name]}, calls)[name]))
    return medians


def placement_grouped_rounds(runs: dict[str, Callable[[], Any]], prepare: Callable[[str], Any], seconds: float,
                             calls_per_round: int = 20, max_rounds: int | None = None) -> dict[str, list[dict]]:
    """Rounds for ``seconds`` (at most ``max_rounds``), grouped by placement: {"shared": [round medians, ...],
    "apart": [...], "between": [...]}, each round a {run name: median ms}."""
    groups: dict[str, list] = {group: [] for group in GROUPS}
    deadline = time.monotonic() + seconds
    index = 0
    while time.monotonic() < deadline and (max_rounds is None or index < max_rounds):
        medians = _round(runs, prepare, calls_per_round, index)
        index += 1
        trip = core_round_trip_ns()  # None: it could not be measured this time
        group = ("between" if trip is None or SHARED_BELOW_NS <= trip < APART_FROM_NS
                 else "shared" if trip < SHARED_BELOW_NS else "apart")
        groups[group].append(medians)
    return groups


def grouped_summary(label: str, rounds: list[dict[str, float]], first: str, second: str,
                    shown: tuple[str, str] | None = None) -> str:
    """One line: the rounds' count, each run's median of round medians, and the median and p20-p80 of the per-round
    ratios first / second (above 1: ``second`` is faster); the two runs called ``shown`` (default: their names)."""
    if not rounds:
        return f"{label}: no round"
    return round_ratio_line(label, [r[first] for r in rounds], [r[second] for r in rounds], shown or (first, second))

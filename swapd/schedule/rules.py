"""Pure rules of the schedule: who is idle, how long to back off.

No processes, no clocks, no I/O: every input is an argument (tests/test_policy.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class IdleInput:
    model: str
    ttl: float  # 0 = never idle-evicted
    inflight: int
    last_used: float  # monotonic seconds at the end of the last request
    ready: bool


def idle(engines: Iterable[IdleInput], now: float) -> list[str]:
    """Ready engines whose ttl has passed since their last request ended.

    An engine with a request in flight is never idle (LocalAI #5221: an idle timer
    killed a model in the middle of a long stream).
    """
    return [
        e.model
        for e in engines
        if e.ready and e.ttl > 0 and e.inflight == 0 and now - e.last_used >= e.ttl
    ]


def next_idle_check(engines: Iterable[IdleInput], now: float) -> float | None:
    """Seconds until the earliest engine could become idle, or None if none can."""
    waits = [
        max(0.0, e.last_used + e.ttl - now)
        for e in engines
        if e.ready and e.ttl > 0 and e.inflight == 0
    ]
    return min(waits) if waits else None


def backoff(failures: int, initial: float, cap: float) -> float:
    """Delay before restart attempt number `failures` (1-based): 1 s, 2 s, 4 s … cap."""
    if failures <= 0:
        return 0.0
    return float(min(cap, initial * (2 ** (failures - 1))))


"""Pure rules of the schedule: when an engine is idle, how long to back off.

No processes, no clocks, no I/O: every input is an argument (tests/test_policy.py).
"""

from __future__ import annotations


def idle_at(ttl: float, inflight: int, last_used: float, ready: bool) -> float | None:
    """When an engine becomes idle: `ttl` seconds (0: never) after its last request ended
    (`last_used`, monotonic), or None while it cannot: not ready, or a request in flight
    (LocalAI #5221: an idle timer killed a model in the middle of a long stream)."""
    if not ready or ttl <= 0 or inflight:
        return None
    return last_used + ttl


def backoff(failures: int, initial: float, cap: float) -> float:
    """Delay before restart attempt number `failures` (1-based): 1 s, 2 s, 4 s … cap."""
    if failures <= 0:
        return 0.0
    return float(min(cap, initial * (2 ** (failures - 1))))


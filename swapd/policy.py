"""Pure decisions: who is evicted for whom, who is idle, how long to back off.

No processes, no clocks, no I/O: every input is an argument, so each rule is
tested directly (tests/test_policy.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from swapd.config import GroupConfig

# Models in no group behave as llama-swap's implicit default group: one at a time,
# and loading one unloads every other non-persistent group.
DEFAULT_GROUP = GroupConfig(name="(default)", swap=True, exclusive=True, persistent=False)


def group_of(model: str, groups: Iterable[GroupConfig]) -> GroupConfig:
    for group in groups:
        if model in group.members:
            return group
    return DEFAULT_GROUP


def evictions(
    target: str,
    running: Iterable[str],
    groups: Iterable[GroupConfig],
    gpu: Mapping[str, bool],
) -> list[str]:
    """The running models that must stop before `target` may start.

    llama-swap's group rules (its #109): within a group, `swap: true` allows one
    member at a time; across groups, an `exclusive` target unloads every other
    group that is not `persistent`. Models with `gpu: false` are no GPU tenant:
    they neither evict nor get evicted.
    """
    groups = tuple(groups)
    if not gpu.get(target, True):
        return []
    mine = group_of(target, groups)
    out: list[str] = []
    for other in running:
        if other == target or not gpu.get(other, True):
            continue
        theirs = group_of(other, groups)
        if theirs is mine or theirs.name == mine.name:
            if mine.swap:
                out.append(other)
        elif mine.exclusive and not theirs.persistent:
            out.append(other)
    return out


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


"""When a stopped engine's memory is back: the rule, and the wait the scheduler runs on it.

After an engine exits, its memory returns when its device file descriptors close, and page
cache left by the last load counts as used (vLLM #48140): the next GPU tenant starts only
once MemAvailable has recovered. `released` is the rule, a pure function of its inputs
(tests/test_memory_release.py drives it as a table); `MemoryRelease` notes what it compares
against (MemAvailable before an engine's spawn and just before its stop, what the engine was
measured holding) and polls MemAvailable until the rule holds or the stopped engines'
`memoryReleaseTimeout` passes: there is no event for "MemAvailable grew".
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

import structlog

from swapd.config.sizes import MiB
from swapd.config.types import ModelConfig
from swapd.memory.meminfo import MemoryReadings, Room

log = structlog.get_logger("swapd.memory")

# Memory that comes back after a stop is counted with this much slack: the last pages of a
# process tree (page tables, a driver's bookkeeping) and page-cache noise.
RELEASE_SLACK_RATIO: Final = 0.05
RELEASE_SLACK_MIN: Final = 64 * MiB
# The old rule, kept for an engine swapd never measured and a target of unknown size: come
# back to within 2% of MemTotal of the level before the engine started (vLLM #48140).
BASELINE_SLACK_RATIO: Final = 0.02
# MemAvailable that rose less than RELEASE_SLACK_MIN over this long has stopped rising.
PLATEAU: Final = 0.5
# How often MemAvailable is re-read while waiting.
POLL: Final = 0.1


def released(
    *,
    freed: int,
    expected: int | None,
    need: int | None,
    room: Room,
    baseline: int | None = None,
    to_come: int = 0,
    rising: int | None = None,
) -> bool:
    """Has enough memory come back after stopping engines to start the next one?

    `freed`: how much MemAvailable rose since the stop began; `expected`: what the stopped
    engines were measured holding (None: never measured); `need`: the next model's footprint
    (None: unknown); `baseline`: MemAvailable before the stopped engine was spawned (the old
    rule, used only when neither of the others is known); `to_come`: what engines still
    starting will take; `rising`: how much MemAvailable rose over the last PLATEAU seconds
    (None: the stop ended less than that ago).

    Other processes allocating meanwhile do not stall the swap: either the engines' own memory
    is back, or the next model fits anyway, or MemAvailable has stopped rising (what the
    engines' exit gives back has come back; a shortfall is someone else's allocation).
    """
    if need is not None and need <= room.available - room.reserve - to_come:
        return True
    if expected is not None:
        slack = max(expected * RELEASE_SLACK_RATIO, RELEASE_SLACK_MIN)
        if freed >= expected - slack:
            return True
    elif need is None and baseline is not None:
        if room.available >= baseline - room.total * BASELINE_SLACK_RATIO:
            return True
    elif need is None:
        return True  # nothing known to wait for
    return rising is not None and rising < RELEASE_SLACK_MIN


@dataclass(frozen=True, slots=True)
class _Before:
    """MemAvailable and what the engine held, just before it was stopped."""

    available: int
    expected: int | None  # what the engine held (None: never measured)
    baseline: int | None  # MemAvailable before it was spawned
    timeout: float


class MemoryRelease:
    """The release wait for one scheduler: told about GPU engines' spawns and stops, asked
    to wait before the next start. Unreadable memory never blocks a start."""

    def __init__(self, readings: MemoryReadings, clock: Callable[[], float]) -> None:
        self._readings = readings
        self._clock = clock
        self._baseline: dict[str, int | None] = {}
        self._before: dict[str, _Before] = {}

    def spawning(self, cfg: ModelConfig) -> None:
        """`cfg`'s engine is about to be spawned: note MemAvailable (its baseline)."""
        baseline = None
        if cfg.gpu:
            try:
                baseline = self._readings.meminfo().available
            except (OSError, ValueError):
                pass
        self._baseline[cfg.id] = baseline

    def stopping(self, cfg: ModelConfig) -> None:
        """`cfg`'s engine is about to be stopped: note what the wait compares against."""
        if not cfg.gpu:
            return
        try:
            info = self._readings.meminfo()
        except (OSError, ValueError):
            return
        self._before[cfg.id] = _Before(
            available=info.available,
            expected=self._readings.used(cfg.id),
            baseline=self._baseline.get(cfg.id),
            timeout=cfg.memory_release_timeout,
        )

    async def wait(self, stopped: Iterable[str], target: ModelConfig | None, reserve: int,
                   to_come: Callable[[], int]) -> None:
        """After GPU tenants stop, wait until their own memory is back or `target` fits.

        Not "until MemAvailable is back where it was": anything else that allocated meanwhile
        would stall every swap for the whole memoryReleaseTimeout. `to_come()`: what engines
        still starting (other than the target) will take on top of what they hold now.
        """
        stopped = list(stopped)
        before = [r for m in stopped if (r := self._before.pop(m, None)) is not None]
        if not before:
            return
        start = min(r.available for r in before)
        expected = (None if any(r.expected is None for r in before)
                    else sum(r.expected or 0 for r in before))
        baselines = [r.baseline for r in before if r.baseline is not None]
        baseline = min(baselines) if baselines else None
        need = self._readings.footprint(target) if target is not None else None
        stopped_at = self._clock()
        deadline = stopped_at + max(r.timeout for r in before)
        readings: collections.deque[tuple[float, int]] = collections.deque()
        while True:
            try:
                info = self._readings.meminfo()
            except (OSError, ValueError):
                return
            now = self._clock()
            readings.append((now, info.available))
            while readings[0][0] < now - PLATEAU - POLL / 2:
                readings.popleft()
            rising = None
            if now - stopped_at >= PLATEAU:
                rising = info.available - min(a for _, a in readings)
            room = Room(info.available, info.total, reserve)
            if released(freed=info.available - start, expected=expected, need=need,
                        room=room, baseline=baseline, to_come=to_come(), rising=rising):
                return
            if now >= deadline:
                log.warning("memory not released in time; starting anyway",
                            model=target.id if target is not None else None,
                            stopped=sorted(stopped), available=info.available,
                            freed=info.available - start, expected=expected, need=need)
                return
            await asyncio.sleep(POLL)

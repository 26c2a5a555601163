"""The host memory guard: an engine that drives MemAvailable below the floor is killed at once.

GB10 hosts that run out of memory can freeze until power-cycled (vLLM #46307, #56824,
open-gpu-kernel-modules #1358); a SIGTERM with a grace period is too slow to win that race.
llama-swap's unreleased "redline" reads memory once a second and evicts the least recently used
model while sparing the one loading; here the culprit is the one that goes:
- with an engine starting, the starting engine (vLLM profiling its KV cache is the usual cause);
- with none starting, the engine whose memory grew most in the last 10 s;
- pressure from anything else (no engine grew) is only logged: the guard never kills a process
  that is not an engine.

MemAvailable is read with one `pread` of /proc/meminfo (swapd/memory.py: ~6 µs), on the event
loop: every 25 ms while an engine starts or memory falls toward the floor, once a second when
nothing moves. The guard decides; the scheduler carries out the kill (only the engine module
sends signals).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import structlog

from swapd.config.sizes import Floor, MiB, format_size
from swapd.engines.procgroup import Tree
from swapd.memory.meminfo import MemInfo, MemReader

log = structlog.get_logger("swapd.memguard")

FAST_INTERVAL: Final = 0.025  # while an engine starts, or memory heads for the floor
SLOW_INTERVAL: Final = 1.0
GROWTH_WINDOW: Final = 10.0  # "grew most in the last 10 s"
# Growth below this is noise (allocator churn, a request's buffers), not a culprit.
MIN_GROWTH: Final = 128 * MiB
# Outside pressure is logged at most this often.
WARN_EVERY: Final = 10.0
# Closer than this (or than the floor itself, if larger) to the floor: read fast.
NEAR_FLOOR: Final = 1024 * MiB
# The fall rate is measured over this long: allocators grow in steps (a reading between two
# steps sees no change), and one flat interval must not slow the guard down to once a second.
RATE_WINDOW: Final = 1.0


@dataclass(frozen=True)
class Suspect:
    """A running engine as the guard sees it."""

    model: str
    starting: bool
    grown: int  # bytes its process tree grew in the last GROWTH_WINDOW seconds


@dataclass(frozen=True)
class Verdict:
    kill: str | None = None
    why: str = ""  # "starting" or "grew"
    warn: bool = False  # below the floor, and no engine to blame


def decide(available: int, floor: int, suspects: Sequence[Suspect],
           min_growth: int = MIN_GROWTH) -> Verdict:
    """Whom to kill when MemAvailable is `available` and the floor is `floor`."""
    if available >= floor:
        return Verdict()
    starting = [s for s in suspects if s.starting]
    if starting:
        culprit = max(starting, key=lambda s: (s.grown, s.model))
        return Verdict(kill=culprit.model, why="starting")
    grew = [s for s in suspects if s.grown >= min_growth]
    if grew:
        culprit = max(grew, key=lambda s: (s.grown, s.model))
        return Verdict(kill=culprit.model, why="grew")
    return Verdict(warn=True)


def next_interval(available: int, floor: int, falling: float, starting: bool) -> float:
    """Seconds to the next read: fast while an engine starts, and as the floor comes near.

    `falling`: bytes per second MemAvailable fell over the last second (≤ 0: not falling).
    Reading again at a quarter of the projected time to the floor keeps the crossing found
    within one FAST_INTERVAL of happening. Within the floor's own size of it (at least
    NEAR_FLOOR) the pace is fast whatever the trend: other processes freeing memory can hide
    an engine's growth from the rate, and a single large allocation has no trend.
    """
    if starting or available < floor + max(floor, NEAR_FLOOR):
        return FAST_INTERVAL
    if falling <= 0:
        return SLOW_INTERVAL
    to_floor = (available - floor) / falling
    return min(SLOW_INTERVAL, max(FAST_INTERVAL, to_floor / 4))


class GrowthWindow:
    """Per-model (time, bytes) readings of the last GROWTH_WINDOW seconds."""

    def __init__(self, window: float = GROWTH_WINDOW) -> None:
        self._window = window
        self._readings: dict[str, collections.deque[tuple[float, int]]] = {}

    def add(self, model: str, at: float, used: int) -> None:
        readings = self._readings.setdefault(model, collections.deque())
        readings.append((at, used))
        while readings and readings[0][0] < at - self._window:
            readings.popleft()

    def grown(self, model: str) -> int:
        """How far the latest reading is above the lowest of the window."""
        readings = self._readings.get(model)
        if not readings:
            return 0
        return max(0, readings[-1][1] - min(used for _, used in readings))

    def keep(self, models: Sequence[str]) -> None:
        for model in [m for m in self._readings if m not in models]:
            del self._readings[model]


@dataclass(frozen=True)
class Watched:
    """A running engine the guard may blame: its process tree and whether it is starting."""

    model: str
    tree: Tree
    starting: bool


@dataclass(frozen=True)
class GuardEvent:
    """One guard action, for /status and the log."""

    at: float  # wall clock
    model: str | None  # None: pressure from outside the engines (a warning)
    available: int
    floor: int
    why: str

    def message(self) -> str:
        if self.model is None:
            return (f"MemAvailable {format_size(self.available)} is below the memory guard floor "
                    f"{format_size(self.floor)}, and no engine grew: pressure from outside swapd")
        what = "while it was starting" if self.why == "starting" else "after its memory grew"
        return (f"model {self.model!r} was killed by the memory guard {what}: MemAvailable "
                f"{format_size(self.available)} fell below the floor {format_size(self.floor)}")


Usage = Callable[[Mapping[str, Tree]], Mapping[str, int]]
"""model → process tree in, model → bytes used (tree RSS + GPU) out."""


def fall_rate(readings: Sequence[tuple[float, int]]) -> float:
    """Bytes a second MemAvailable fell, from the highest reading of the window to the last
    (≤ 0: not falling). `readings`: (time, MemAvailable), oldest first."""
    if len(readings) < 2:
        return 0.0
    now, latest = readings[-1]
    at, high = max(list(readings)[:-1], key=lambda r: (r[1], -r[0]))
    return (high - latest) / (now - at) if now > at else 0.0


@dataclass
class _State:
    last: MemInfo | None = None
    recent: collections.deque[tuple[float, int]] = field(default_factory=collections.deque)
    killing: str | None = None  # a kill asked for and not yet gone
    warned_at: float = -WARN_EVERY
    events: collections.deque[GuardEvent] = field(
        default_factory=lambda: collections.deque(maxlen=20))


class MemoryGuard:
    """Reads MemAvailable on the event loop and asks for a kill when it falls below the floor.

    `floor()`: the configured floor (re-read each time, reload changes it); `watched()`: the
    running engines; `usage(groups)`: a fresh read of their memory; `kill(model, event)`: the
    scheduler's kill (True when it killed); `observe(model, used)`: each fresh reading, for
    footprint learning.
    """

    def __init__(
        self,
        *,
        floor: Callable[[], Floor],
        watched: Callable[[], Sequence[Watched]],
        usage: Usage,
        kill: Callable[[str, GuardEvent], bool],
        observe: Callable[[str, int], None] | None = None,
        reader: MemReader | None = None,
        enabled: Callable[[], bool] = lambda: True,
    ) -> None:
        self._floor = floor
        self._watched = watched
        self._usage = usage
        self._kill = kill
        self._observe = observe
        self._reader = reader if reader is not None else MemReader()
        self._enabled = enabled
        self._growth = GrowthWindow()
        self._state = _State()
        self._timer: asyncio.Handle | None = None
        self._closed = False
        self.reads = 0  # how many times MemAvailable was read (tests, docs/memory.md)

    # -- views ---------------------------------------------------------------------

    def latest(self) -> MemInfo | None:
        return self._state.last

    def floor_bytes(self) -> int | None:
        last = self._state.last
        return self._floor().resolve(last.total) if last is not None else None

    def events(self) -> list[GuardEvent]:
        return list(self._state.events)

    # -- feeding -------------------------------------------------------------------

    def sampled(self, used: Mapping[str, int], at: float | None = None) -> None:
        """Per-engine memory from the sampler (≈1 Hz): the growth window's regular diet."""
        at = time.monotonic() if at is None else at
        for model, value in used.items():
            self._growth.add(model, at, value)

    def poke(self) -> None:
        """Read again now: an engine is about to start (the fast pace starts at once)."""
        if self._timer is not None and not self._closed:
            self._timer.cancel()
            self._timer = asyncio.get_running_loop().call_soon(self._tick)

    # -- the loop ------------------------------------------------------------------

    def start(self) -> None:
        self._closed = False
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_soon(self._tick)

    def stop(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._reader.close()

    def _tick(self) -> None:
        self._timer = None
        if self._closed:
            return
        interval = SLOW_INTERVAL
        try:
            interval = self.check()
        except Exception as exc:  # the guard must outlive any surprise
            log.error("memory guard check failed", error=repr(exc))
        if not self._closed:
            self._timer = asyncio.get_running_loop().call_later(interval, self._tick)

    def check(self) -> float:
        """One read and, below the floor, one decision. Returns seconds to the next read."""
        state = self._state
        try:
            info = self._reader.read()
        except (OSError, ValueError) as exc:
            if state.last is not None or self.reads == 0:
                log.warning("cannot read MemAvailable; memory guard paused", error=str(exc))
            state.last = None
            state.recent.clear()
            self.reads += 1
            return SLOW_INTERVAL
        now = time.monotonic()
        self.reads += 1
        state.last = info
        state.recent.append((now, info.available))
        while len(state.recent) > 2 and state.recent[0][0] < now - RATE_WINDOW:
            state.recent.popleft()
        watched = self._watched()
        starting = any(w.starting for w in watched)
        floor = self._floor().resolve(info.total)
        falling = fall_rate(state.recent)
        if state.killing is not None:
            if all(w.model != state.killing for w in watched):
                state.killing = None  # gone; judge again from the next read
            return FAST_INTERVAL
        if info.available < floor and self._enabled():
            self._below(info, floor, watched, now)
        return next_interval(info.available, floor, falling, starting)

    def _below(self, info: MemInfo, floor: int, watched: Sequence[Watched], now: float) -> None:
        state = self._state
        groups = {w.model: w.tree for w in watched}
        if groups:
            # A fresh read: the sampler's last one may be a second old, and the growth that
            # crossed the floor happened in that second.
            fresh = self._usage(groups)
            for model, used in fresh.items():
                self._growth.add(model, now, used)
                if self._observe is not None:
                    self._observe(model, used)
        self._growth.keep(list(groups))
        suspects = [Suspect(w.model, w.starting, self._growth.grown(w.model)) for w in watched]
        verdict = decide(info.available, floor, suspects)
        if verdict.kill is not None:
            event = GuardEvent(time.time(), verdict.kill, info.available, floor, verdict.why)
            log.error("memory guard: killing engine", model=verdict.kill, why=verdict.why,
                      available=info.available, floor=floor,
                      grown=self._growth.grown(verdict.kill))
            if self._kill(verdict.kill, event):
                state.killing = verdict.kill
                state.events.append(event)
            return
        if verdict.warn and now - state.warned_at >= WARN_EVERY:
            state.warned_at = now
            event = GuardEvent(time.time(), None, info.available, floor, "outside")
            state.events.append(event)
            log.warning("memory guard: MemAvailable below the floor, no engine to blame",
                        available=info.available, floor=floor)

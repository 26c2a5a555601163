"""A key's limits (docs/keys.md): `maxConcurrent`, `requestsPerMinute`, `tokensPerDay`.

The decisions are pure functions of what happened and the time (`rate_wait`,
`concurrency_wait`, `quota_wait`): each answers how long the key must wait, 0 when it may
go now. `Limits` keeps what happened per key name and asks them, with injected clocks, so
the tests step time instead of sleeping. `Retry-After` is the wait they compute, since SDKs
obey it: a rate window frees a slot when its oldest request leaves the window, a quota when
the UTC day ends; a concurrency slot when the first request in flight ends, which is known
only as an estimate (the key's typical duration, less the oldest one's age).
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from swapd.config.types import KeyConfig

MINUTE = 60.0
DAY = 86400.0
# The shortest Retry-After swapd sends for a busy key: a client that comes back sooner
# finds the same requests in flight.
MIN_WAIT = 1.0
# How fast a key's typical duration follows its latest requests (exponential average).
DURATION_WEIGHT = 0.2


class Limit(StrEnum):
    CONCURRENCY = "maxConcurrent"
    RATE = "requestsPerMinute"
    QUOTA = "tokensPerDay"


def rate_wait(started: Sequence[float], limit: int, now: float, window: float = MINUTE) -> float:
    """Seconds until one more request fits `limit` requests per `window`: 0 now, else when
    the oldest of the last `limit` starts leaves the window. `started`: start times, oldest
    first."""
    if limit <= 0 or len(started) < limit:
        return 0.0
    return max(0.0, started[len(started) - limit] + window - now)


def concurrency_wait(inflight: Sequence[float], limit: int, typical: float | None,
                     now: float) -> float:
    """Seconds until a slot frees when `inflight` (start times) hold `limit` or more: 0 when
    one is free; else the typical duration less the oldest request's age (the one expected to
    end first), never under MIN_WAIT (also when the key has no history yet)."""
    if limit <= 0 or len(inflight) < limit:
        return 0.0
    if typical is None:
        return MIN_WAIT
    return max(MIN_WAIT, min(inflight) + typical - now)


def day_start(wall: float) -> float:
    """The UTC midnight that began the day of `wall` (quotas count per UTC day)."""
    return math.floor(wall / DAY) * DAY


def quota_wait(used: int, limit: int, wall: float) -> float:
    """Seconds until the day's count restarts once `used` reached `limit` (a request is let in
    while `used` is below it, and counted when it ends: the one that crosses it finishes)."""
    if limit <= 0 or used < limit:
        return 0.0
    return day_start(wall) + DAY - wall


@dataclass(frozen=True)
class Refusal:
    """Why a key must wait, and how long (seconds; `reset_at`: Unix time for a quota)."""

    limit: Limit
    wait: float
    reset_at: float | None = None


@dataclass(frozen=True)
class Slot:
    """An admitted request: its release ends it."""

    key: str
    started: float


class _KeyState:
    __slots__ = ("day", "day_requests", "day_tokens", "inflight", "started", "typical")

    def __init__(self) -> None:
        self.started: collections.deque[float] = collections.deque()
        self.inflight: list[float] = []
        self.typical: float | None = None
        self.day = 0.0
        self.day_tokens = 0
        self.day_requests = 0


class Limits:
    """What each key did (by name; reloads keep it), and the admission of its requests."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._wall = wall
        self._keys: dict[str, _KeyState] = {}

    def _state(self, name: str) -> _KeyState:
        state = self._keys.get(name)
        if state is None:
            state = self._keys[name] = _KeyState()
        return state

    def _today(self, state: _KeyState, wall: float) -> None:
        today = day_start(wall)
        if state.day != today:
            state.day, state.day_tokens, state.day_requests = today, 0, 0

    def admit(self, key: KeyConfig) -> Slot | Refusal:
        """Let a request of `key` in (its Slot, to release when it ends), or say how long
        it must wait. A refused request is not counted against the rate."""
        state = self._state(key.name)
        now = self._clock()
        wall = self._wall()
        self._today(state, wall)
        started = state.started
        while started and started[0] <= now - MINUTE:
            started.popleft()
        wait = quota_wait(state.day_tokens, key.tokens_per_day, wall)
        if wait:
            return Refusal(Limit.QUOTA, wait, day_start(wall) + DAY)
        wait = concurrency_wait(state.inflight, key.max_concurrent, state.typical, now)
        if wait:
            return Refusal(Limit.CONCURRENCY, wait)
        wait = rate_wait(started, key.requests_per_minute, now)
        if wait:
            return Refusal(Limit.RATE, wait)
        if key.requests_per_minute:
            started.append(now)
        state.inflight.append(now)
        state.day_requests += 1
        return Slot(key.name, now)

    def release(self, slot: Slot) -> None:
        state = self._state(slot.key)
        try:
            state.inflight.remove(slot.started)
        except ValueError:
            return
        duration = self._clock() - slot.started
        state.typical = duration if state.typical is None else (
            (1 - DURATION_WEIGHT) * state.typical + DURATION_WEIGHT * duration)

    def add_tokens(self, name: str, tokens: int, at: float | None = None) -> None:
        """Count a finished request's tokens against its key's day (`at`: when it came)."""
        state = self._state(name)
        wall = self._wall() if at is None else at
        self._today(state, self._wall())
        if day_start(wall) == state.day:
            state.day_tokens += tokens

    def seed(self, today: Mapping[str, tuple[int, int]]) -> None:
        """Today's (requests, tokens) per key as the activity store kept them: a restart does
        not give a key a fresh day."""
        wall = self._wall()
        for name, (requests, tokens) in today.items():
            state = self._state(name)
            self._today(state, wall)
            state.day_requests += requests
            state.day_tokens += tokens

    def today(self, name: str) -> tuple[int, int, int]:
        """(requests in flight, requests today, tokens today) of a key."""
        state = self._keys.get(name)
        if state is None:
            return 0, 0, 0
        self._today(state, self._wall())
        return len(state.inflight), state.day_requests, state.day_tokens

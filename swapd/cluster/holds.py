"""The peer side of a cluster: the table of holds this node's workers are under.

A hold (`POST /api/cluster/holds`) is a head on another node saying "keep my worker running
on your GPU". It is pure bookkeeping with the time passed in: the decision core
(swapd.schedule.core) owns one table and decides what a hold means (a GPU tenant started
through this node's own queue, never evicted by a request of this node, stopped when the
hold ends or goes `ttl` seconds unrenewed).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from enum import StrEnum

# How many ended holds are remembered, so that a late renewal or release learns why its
# hold ended (worker exited, unloaded, expired) instead of a bare "unknown".
ENDED_KEPT = 256


class HoldState(StrEnum):
    WAITING = "waiting"  # the worker is being started for it (queued, starting)
    HELD = "held"  # the worker is ready and held; `until` counts


@dataclass(slots=True)
class Hold:
    id: str
    worker: str
    holder: str
    ttl: float
    since: float
    ticket: int  # its place in the core's queue while WAITING
    until: float | None = None  # None while WAITING: the ttl counts from readiness

    @property
    def state(self) -> HoldState:
        return HoldState.WAITING if self.until is None else HoldState.HELD


@dataclass(frozen=True, slots=True)
class HoldView:
    id: str
    worker: str
    holder: str
    ttl: float
    state: HoldState
    expires_in: float | None  # seconds; None while the worker starts


class HoldTable:
    """At most one hold per worker; ids are given by the caller (random, unguessable)."""

    def __init__(self) -> None:
        self._holds: dict[str, Hold] = {}
        self._ended: OrderedDict[str, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._holds)

    def get(self, hold_id: str) -> Hold | None:
        return self._holds.get(hold_id)

    def of_worker(self, worker: str) -> Hold | None:
        for hold in self._holds.values():
            if hold.worker == worker:
                return hold
        return None

    def by_ticket(self, ticket: int) -> Hold | None:
        for hold in self._holds.values():
            if hold.ticket == ticket and hold.until is None:
                return hold
        return None

    def add(self, hold: Hold) -> None:
        self._holds[hold.id] = hold

    def granted(self, hold: Hold, now: float) -> None:
        """The worker is ready: the hold's ttl starts counting."""
        hold.until = now + hold.ttl

    def renew(self, hold_id: str, now: float, ttl: float | None = None) -> Hold | None:
        hold = self._holds.get(hold_id)
        if hold is None:
            return None
        if ttl is not None:
            hold.ttl = ttl
        if hold.until is not None:
            hold.until = now + hold.ttl
        return hold

    def end(self, hold_id: str, reason: str) -> Hold | None:
        hold = self._holds.pop(hold_id, None)
        if hold is not None:
            self._ended[hold_id] = reason
            while len(self._ended) > ENDED_KEPT:
                self._ended.popitem(last=False)
        return hold

    def ended(self, hold_id: str) -> str | None:
        """Why a hold that is gone ended (None: never known here)."""
        return self._ended.get(hold_id)

    def expired(self, now: float) -> list[Hold]:
        return [h for h in self._holds.values() if h.until is not None and h.until <= now]

    def next_expiry(self) -> float | None:
        due = [h.until for h in self._holds.values() if h.until is not None]
        return min(due) if due else None

    def all(self) -> list[Hold]:
        return list(self._holds.values())

    @staticmethod
    def view(hold: Hold, now: float) -> HoldView:
        return HoldView(hold.id, hold.worker, hold.holder, hold.ttl, hold.state,
                        None if hold.until is None else round(max(0.0, hold.until - now), 3))

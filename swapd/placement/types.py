"""What routers and the queue order see and answer: the types every placement policy shares."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from swapd.config.types import GroupConfig
from swapd.schedule.phase import RUNNING, Phase, StopReason

# -- what pluggable policies see ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelView:
    """A frozen view of one model, for routers and read-only callers."""

    id: str
    phase: Phase
    gpu: bool
    inflight: int
    queued: int
    last_used: float  # monotonic; end of the last request (or ready time)
    group: str  # the group's name; DEFAULT_GROUP's for models in none
    failures: int  # consecutive failed starts / crashes
    start_failed: bool  # the last failure was a start that never became ready
    retry_at: float  # monotonic; not started again before this
    last_error: str | None
    stop_reason: StopReason | None  # while a stop is decided or under way
    swappable: bool = True  # false: no request for another model stops it (llama-swap #1127)

    @property
    def running(self) -> bool:
        return self.phase in RUNNING

    @property
    def idle(self) -> bool:
        """Evictable without cutting anyone off: ready, nothing in flight, nothing queued."""
        return self.phase == Phase.READY and self.inflight == 0 and self.queued == 0


@dataclass(frozen=True, slots=True)
class RouteQuery:
    """The input of a `Router`: start `target`; what must stop first?"""

    target: str
    models: Mapping[str, ModelView]  # every configured model
    groups: tuple[GroupConfig, ...]
    now: float


@dataclass(frozen=True, slots=True)
class Wait:
    """A router's answer: the target cannot be placed now; its requests keep waiting
    (backpressure, up to queueTimeout) and placement is asked again on the next event (a
    release, a stop, a start's end), or at `until` (monotonic) if given: a condition with
    no event of its own, such as MemAvailable growing."""

    reason: str
    until: float | None = None


@dataclass(frozen=True, slots=True)
class Refuse:
    """A router's answer: the target can never be placed (larger than the machine); its
    requests are answered at once instead of waiting for queueTimeout."""

    reason: str


RouteAnswer = tuple[str, ...] | Wait | Refuse
# Pure: (RouteQuery) -> the running models to evict (maybe none), Wait, or Refuse.
Router = Callable[[RouteQuery], RouteAnswer]


@dataclass(frozen=True, slots=True)
class Queued:
    """A queued request, as the queue order sees it."""

    seq: int  # arrival order, unique
    model: str
    since: float
    priority: int = 0


# Pure: (Queued) -> sort key; the queue is kept sorted by it, smallest served first.
QueueKey = Callable[[Queued], tuple[float, ...]]


def fifo_key(w: Queued) -> tuple[float, ...]:
    return (w.seq,)



"""Placement by measured memory: does a model fit, and whom to stop so it does.

Pure functions of their inputs (no processes, no clocks, no /proc):
tests/test_memory_router_units.py drives every rule as a table. The scheduler feeds them
MemAvailable, each engine's footprint (configured `memory:` or learned) and what it measures
each engine using right now.

The rules (docs/memory.md):
- A model fits when its footprint ≤ MemAvailable − reserve − what the engines still starting
  will take on top of what they hold already (a vLLM at 10% of its load has 90% to go).
- Otherwise idle engines (ready, nothing in flight, nothing queued, not in a persistent group)
  are stopped, least recently used first, until it fits; memory that engines being stopped will
  give back counts as coming. When even stopping all of them cannot make it fit, nothing is
  stopped: the request waits (backpressure) until something changes.
- A footprint larger than the whole machine (MemTotal − reserve) can never fit: say so at once.
- Sleeping engines (docs/sleep.md) hold only a residue and serve nobody; they are stopped
  only when the target cannot fit otherwise, after every idle engine, oldest sleeper first.
- A model whose footprint is not known yet (no `memory:`, not learned) behaves like the one-
  tenant default: every idle engine is stopped and it starts; the guard is the safety net, and
  what it measures is used the next time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from swapd.config.sizes import format_size
from swapd.config.types import Config
from swapd.memory.meminfo import MemoryReadings, Room
from swapd.placement.groups import group_of, groups_router
from swapd.placement.types import Refuse, RouteAnswer, RouteQuery, Router, Wait
from swapd.schedule.phase import Phase

# Reasons for swapd_placement_evictions_total{reason}.
MAKE_ROOM: Final = "make_room"
UNKNOWN_FOOTPRINT: Final = "unknown_footprint"
EVICTION_REASONS: Final = (MAKE_ROOM, UNKNOWN_FOOTPRINT)


class TenantPhase(StrEnum):
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    SLEEPING = "sleeping"  # asleep: holds its residue; stopped last, oldest first


@dataclass(frozen=True)
class Tenant:
    """A running engine as placement sees it."""

    model: str
    phase: TenantPhase
    footprint: int | None  # bytes it needs when loaded (configured or learned); None: unknown
    used: int | None  # bytes it holds now (process tree RSS + GPU); None: not measured yet
    inflight: int = 0
    queued: int = 0
    last_used: float = 0.0  # any monotonic clock: only the order matters
    persistent: bool = False

    @property
    def busy(self) -> bool:
        return self.inflight > 0 or self.queued > 0

    @property
    def holds(self) -> int:
        """What stopping it gives back: what it was measured holding, else its footprint."""
        if self.used is not None:
            return self.used
        return self.footprint or 0

    @property
    def to_come(self) -> int:
        """What a starting engine will still take on top of what it holds."""
        if self.phase != TenantPhase.STARTING or self.footprint is None:
            return 0
        return max(0, self.footprint - (self.used or 0))


@dataclass(frozen=True)
class MemoryPlan:
    """The answer: start now after stopping `evict` (maybe none), wait, or never."""

    evict: tuple[str, ...] = ()
    wait: str | None = None  # why it cannot start now; retried when anything changes
    never: str | None = None  # why it can never start on this machine
    reason: str = MAKE_ROOM  # why `evict` is stopped (metric label)
    # Stopped engines still giving memory back: the start waits for them (release wait).
    releasing: tuple[str, ...] = ()

    @property
    def start(self) -> bool:
        return self.wait is None and self.never is None


def free_room(room: Room, others: Sequence[Tenant]) -> int:
    """MemAvailable − reserve − what engines still starting will take."""
    return room.available - room.reserve - sum(t.to_come for t in others)


def place(target: str, need: int | None, tenants: Sequence[Tenant], room: Room) -> MemoryPlan:
    """Where `target` (footprint `need`, None: unknown) goes, given the running `tenants`."""
    others = [t for t in tenants if t.model != target]
    unknown_starting = sorted(
        t.model for t in others if t.phase == TenantPhase.STARTING and t.footprint is None
    )
    if unknown_starting:
        # Its growth cannot be accounted for: one unknown at a time, then it is known.
        return MemoryPlan(wait=f"{', '.join(unknown_starting)} is starting and its memory "
                         "footprint is not known yet")
    stopping = [t for t in others if t.phase == TenantPhase.STOPPING]
    releasing = tuple(sorted(t.model for t in stopping))
    idle = sorted(
        (t for t in others if t.phase == TenantPhase.READY and not t.busy and not t.persistent),
        key=lambda t: (t.last_used, t.model),
    )
    sleepers = sorted((t for t in others if t.phase == TenantPhase.SLEEPING),
                      key=lambda t: (t.last_used, t.model))
    if need is None:
        return MemoryPlan(evict=tuple(t.model for t in idle), reason=UNKNOWN_FOOTPRINT,
                         releasing=releasing)
    machine = room.total - room.reserve
    if need > machine:
        return MemoryPlan(never=f"{target} needs {format_size(need)}, more than this machine "
                         f"can give it ({format_size(room.total)} MemTotal − "
                         f"{format_size(room.reserve)} reserve)")
    free = free_room(room, others)
    if need <= free:
        return MemoryPlan()
    coming = sum(t.holds for t in stopping)
    if need <= free + coming:
        # It fits once engines already stopping have given their memory back: wait for
        # that rather than stop more, or start into memory that is not free yet.
        return MemoryPlan(wait=f"{target} fits once {', '.join(releasing)} "
                         "gave back its memory", releasing=releasing)
    chosen: list[str] = []
    for tenant in [*idle, *sleepers]:
        if need <= free + coming:
            break
        chosen.append(tenant.model)
        coming += tenant.holds
    if need <= free + coming:
        return MemoryPlan(evict=tuple(chosen), releasing=releasing)
    busy = sorted(t.model for t in others if t.phase not in (
        TenantPhase.STOPPING, TenantPhase.SLEEPING) and t not in idle)
    held = f"; held by {', '.join(busy)}" if busy else ""
    return MemoryPlan(wait=f"{target} needs {format_size(need)}; {format_size(max(free, 0))} "
                     f"free after the {format_size(room.reserve)} reserve, "
                     f"{format_size(coming)} more if every idle engine stopped{held}")


# -- the router the scheduler's core asks (swapd/core.py) -----------------------------------

# A Wait is asked again this soon: MemAvailable growing has no event of its own.
RETRY: Final = 0.5

_PHASES: Final = {
    Phase.STARTING: TenantPhase.STARTING,
    Phase.READY: TenantPhase.READY,
    Phase.DRAINING: TenantPhase.STOPPING,
    Phase.STOPPING: TenantPhase.STOPPING,
    # Falling asleep gives memory back like a stop; a wake takes it like a start.
    Phase.FALLING_ASLEEP: TenantPhase.STOPPING,
    Phase.WAKING: TenantPhase.STARTING,
    Phase.SLEEPING: TenantPhase.SLEEPING,
}


def memory_router(source: MemoryReadings, config: Config,
                  evicted: Callable[[str, str], None] | None = None) -> Router:
    """`routing.router.use: memory` as the core's Router: `place` over what `source`
    measures now. MemAvailable unreadable: the one-tenant rule (groups)."""

    def route(p: RouteQuery) -> RouteAnswer:
        target = config.models.get(p.target)
        if target is not None and not target.gpu:
            return ()  # no GPU tenant (a CPU helper): starts beside anything, as with groups
        try:
            info = source.meminfo()
        except (OSError, ValueError):
            return groups_router(p)
        tenants = []
        for v in p.models.values():
            phase = _PHASES.get(v.phase)
            if phase is None or v.id == p.target:
                continue
            cfg = config.models.get(v.id)
            tenants.append(Tenant(
                model=v.id, phase=phase,
                footprint=source.footprint(cfg) if cfg is not None else None,
                used=source.used(v.id), inflight=v.inflight, queued=v.queued,
                last_used=v.last_used,
                # gpu: false engines are never stopped for room (their memory still counts)
                persistent=group_of(v.id, p.groups).persistent or not v.gpu
                or not v.swappable,
            ))
        need = source.footprint(target) if target is not None else None
        result = place(p.target, need, tenants,
                       Room(info.available, info.total, config.memory_reserve))
        if result.never is not None:
            return Refuse(result.never)
        if result.wait is not None:
            return Wait(result.wait, until=p.now + RETRY)
        if evicted is not None:
            for model in result.evict:
                evicted(model, result.reason)
        return result.evict

    return route


def with_sleepers(router: Router, source: MemoryReadings, config: Config) -> Router:
    """The groups and matrix routers know no memory, so they never stop a sleeper: this adds
    the sleepers (oldest first) a start needs stopped when the target's footprint does not
    fit beside them. Nothing changes while no engine sleeps (the usual case costs one pass
    over the views)."""

    def route(p: RouteQuery) -> RouteAnswer:
        answer = router(p)
        if not isinstance(answer, tuple):
            return answer
        sleepers = sorted((v for v in p.models.values()
                           if v.phase == Phase.SLEEPING and v.id != p.target),
                          key=lambda v: (v.last_used, v.id))
        target = config.models.get(p.target)
        if not sleepers or target is None or not target.gpu:
            return answer
        need = source.footprint(target)
        if need is None:
            return answer  # unknown: sleepers hold little; the guard is the safety net
        try:
            info = source.meminfo()
        except (OSError, ValueError):
            return answer

        def holds(model: str) -> int:
            cfg = config.models.get(model)
            used = source.used(model)
            if used is not None:
                return used
            return (source.footprint(cfg) or 0) if cfg is not None else 0

        free = info.available - config.memory_reserve + sum(holds(v) for v in answer)
        chosen = list(answer)
        for v in sleepers:
            if need <= free:
                break
            chosen.append(v.id)
            free += holds(v.id)
        return tuple(chosen)

    return route

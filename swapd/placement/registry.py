"""Every router, in one table; and the queue order a config asks for.

The scheduler's core (`swapd.schedule.core`) asks two pure functions for its placement
choices:

- a `Router`, `(RouteQuery) -> RouteAnswer`: given the target model and a frozen `ModelView`
  of every model (phase, gpu, inflight, queued, last_used, group, failures, retry_at), the
  running models to stop before the target starts (a tuple, maybe empty), `Wait(reason,
  until=None)` when it cannot be placed now (its requests keep waiting; placement is asked
  again on the next event or at `until`), or `Refuse(reason)` when it never can (its requests
  are answered at once).
- a `QueueKey`, `(Queued) -> tuple`: the queue is kept sorted by it; the smallest key is
  served first. `Queued` carries `seq` (arrival order), `model`, `since`, `priority`.

`ROUTERS` maps each `routing.router.use` (`RouterKind`) to a factory that builds its Router
from the config, what swapd measures about memory and the eviction counter: registering a
router is a `RouterKind` value and one line here. `router_for` and `queue_key_for` are called
by the scheduler when it is built and on every reload.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Final

from swapd.config.types import Config, RouterKind
from swapd.memory.meminfo import MemoryReadings, Unmeasured
from swapd.placement import by_memory, matrix
from swapd.placement.groups import groups_router
from swapd.placement.matrix import Program
from swapd.placement.types import Queued, QueueKey, RouteAnswer, RouteQuery, Router, fifo_key

# `evicted(model, reason)`: a router's eviction, for swapd_placement_evictions_total.
Evicted = Callable[[str, str], None]
# Each model's recent start durations in seconds (swapd.engines.starts.StartTimes.samples).
LoadTimes = Callable[[], Mapping[str, Sequence[float]]]
RouterFactory = Callable[[Config, MemoryReadings, Evicted | None, LoadTimes | None], Router]


def matrix_router(program: Program | None, load_times: LoadTimes | None = None) -> Router:
    """llama-swap's matrix router: the set containing the target whose running models
    outside it cost least to evict (swapd.placement.matrix.solve), a model's cost its
    `evict_costs` multiplier times its measured median load time (`load_times`, llama-swap's
    rule; without, the multiplier alone); `gpu: false` models stay out."""
    if program is None:
        raise ValueError("routing.router.use is matrix but no matrix is configured")

    def route(p: RouteQuery) -> RouteAnswer:
        running = [m for m, v in p.models.items() if v.running and m != p.target]
        gpu = {m: v.gpu for m, v in p.models.items()}
        weights = matrix.load_weights(load_times()) if load_times is not None else None
        return matrix.evictions(program, p.target, running, gpu, weights)

    return route


ROUTERS: Final[Mapping[RouterKind, RouterFactory]] = {
    # llama-swap's groups (the default)
    RouterKind.GROUP: lambda config, memory, evicted, load_times: groups_router,
    # llama-swap's matrix: routing.router.settings.matrix
    RouterKind.MATRIX: lambda config, memory, evicted, load_times: matrix_router(
        config.matrix, load_times),
    # placement by measured memory (docs/memory.md)
    RouterKind.MEMORY: lambda config, memory, evicted, load_times: by_memory.memory_router(
        memory, config, evicted),
}


def router_for(config: Config, memory: MemoryReadings | None = None,
               evicted: Evicted | None = None, load_times: LoadTimes | None = None) -> Router:
    """The Router `routing.router.use` selects, built over `memory` (what swapd measures:
    the daemon's MemoryWatch; without one, /proc/meminfo and the configured footprints)."""
    readings = memory if memory is not None else Unmeasured()
    router = ROUTERS[RouterKind(config.router)](config, readings, evicted, load_times)
    if config.router != RouterKind.MEMORY and any(
            m.sleep is not None for m in config.models.values()):
        # Sleepers are stopped when a start needs their memory (docs/sleep.md); the memory
        # router weighs them itself.
        router = by_memory.with_sleepers(router, readings, config)
    return router


def queue_key_for(config: Config) -> QueueKey:
    """The queue order the config selects: FIFO (the default), by priority first when
    `routing.scheduler.settings.fifo.priority` names any model."""
    return priority_key if config.priority else fifo_key


def priority_key(w: Queued) -> tuple[float, ...]:
    """llama-swap's fifo priority: higher first, equal priorities in arrival order."""
    return (-w.priority, w.seq)


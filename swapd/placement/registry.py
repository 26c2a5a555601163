"""Which placement policy and queue order a config asks for.

The scheduler's core (`swapd.core`) asks two pure functions for its placement choices:

- a `Router`, `(RouteQuery) -> tuple[str, ...] | Wait`: given the target model and a frozen
  `ModelView` of every model (phase, gpu, inflight, queued, last_used, group, failures,
  retry_at), the running models to stop before the target starts, or `Wait(reason)` when it
  cannot be placed now (its requests keep waiting; placement is asked again on the next
  event: a release, a stop, a timer).
- a `QueueKey`, `(Queued) -> tuple`: the queue is kept sorted by it; the smallest key is
  served first. `Queued` carries `seq` (arrival order), `model`, `since`, `priority`.

A new policy is a function here (or in a module of its own) plus a line in `router_for` /
`queue_key_for` that picks it from the config. Both are called by the scheduler when it
is built and on every reload.
"""

from __future__ import annotations

from collections.abc import Callable

from swapd.config.types import Config, RouterKind
from swapd.placement import by_memory, matrix
from swapd.placement.groups import groups_router
from swapd.placement.matrix import Program
from swapd.placement.types import Queued, QueueKey, RouteAnswer, RouteQuery, Router, fifo_key

ROUTERS: dict[str, Router] = {"groups": groups_router}


def router_for(config: Config, memory: by_memory.MemoryReadings | None = None,
               evicted: Callable[[str, str], None] | None = None) -> Router:
    """The eviction policy the config selects: llama-swap's groups (the default), or
    placement by measured memory (`routing.router.use: memory`, docs/memory.md), which
    needs `memory` (what it measures; `evicted(model, reason)` counts its evictions)."""
    if config.router == RouterKind.MEMORY and memory is not None:
        return by_memory.memory_router(memory, config, evicted)
    if config.matrix is not None:
        return matrix_router(config.matrix)
    return ROUTERS["groups"]


def queue_key_for(config: Config) -> QueueKey:
    """The queue order the config selects: FIFO (the default), by priority first when
    `routing.scheduler.settings.fifo.priority` names any model."""
    return priority_key if config.priority else fifo_key


def matrix_router(program: Program) -> Router:
    """llama-swap's matrix router: the set containing the target whose running models
    outside it cost least to evict (swapd.matrix.solve); `gpu: false` models stay out."""

    def route(p: RouteQuery) -> RouteAnswer:
        running = [m for m, v in p.models.items() if v.running and m != p.target]
        gpu = {m: v.gpu for m, v in p.models.items()}
        return matrix.evictions(program, p.target, running, gpu)

    return route


def priority_key(w: Queued) -> tuple[float, ...]:
    """llama-swap's fifo priority: higher first, equal priorities in arrival order."""
    return (-w.priority, w.seq)


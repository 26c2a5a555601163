"""The scheduler: the only holder of engines.

It decides which engine runs, when one is started, stopped or swapped, and hands
requests a lease on a ready engine. Every decision that gates a start or a stop is
taken here, synchronously, between two awaits, so no request can slip through a
state read (llama-swap #946: a request that arrived during a TTL unload hung).

Requests wait in one FIFO queue. The oldest request that cannot be served picks the
next swap; from then on the engines that swap evicts take no new requests (steady
traffic to the tenant must not starve a waiting model, llama-swap #612), and once
the new engine is ready every request queued for it is served together before the
next swap (no thrash, llama-swap #19/#588).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog

from swapd import gpu, policy, procgroup
from swapd.config import Config, ModelConfig
from swapd.engine import Engine, EngineState, GroupRecord, LineSink, StartError
from swapd.errors import ApiError

log = structlog.get_logger("swapd.scheduler")

# How often memory is re-read while waiting for a stopped tenant's memory to come
# back: there is no event for "MemAvailable grew".
MEMORY_POLL = 0.1


class SchedulerError(ApiError):
    """A request the scheduler cannot serve. Carries the HTTP answer."""

    status = 503
    code = "service_unavailable"
    type = "server_error"


class UnknownModel(SchedulerError):
    status = 404
    code = "model_not_found"
    type = "invalid_request_error"


class ConcurrencyLimited(SchedulerError):
    status = 429
    code = "concurrency_limit"
    type = "rate_limit_error"


class QueueFull(SchedulerError):
    code = "queue_full"


class QueueTimeout(SchedulerError):
    status = 504
    code = "queue_timeout"


class StartFailed(SchedulerError):
    code = "engine_start_failed"


class ShuttingDown(SchedulerError):
    code = "shutting_down"


@dataclass(eq=False)
class _Waiter:
    model: str
    future: asyncio.Future[Engine]
    since: float = field(default_factory=time.monotonic)


@dataclass(eq=False)
class _Slot:
    """What the scheduler knows about one model besides its engine."""

    engine: Engine
    inflight: int = 0
    last_used: float = field(default_factory=time.monotonic)
    failures: int = 0
    retry_at: float = 0.0  # monotonic; restart not before this
    retiring: bool = False  # reload changed or removed the recipe: stop when idle
    removed: bool = False
    mem_baseline: int | None = None  # MemAvailable before spawn
    draining: bool = False  # unload/idle stop under way: take no new requests
    launching: bool = False  # a start was decided; counts as running from that instant
    pending_cfg: ModelConfig | None = None  # what replaces a retiring engine
    ready_since: float = 0.0  # monotonic time the engine last became ready


@dataclass(frozen=True)
class Lease:
    model: str
    upstream: str
    engine: Engine


Hooks = Callable[[str, str], None]


class Scheduler:
    def __init__(
        self,
        config: Config,
        *,
        sink: LineSink | None = None,
        record: GroupRecord | None = None,
        on_engine_state: Callable[[Engine], None] | None = None,
        on_engine_start: Callable[[str, str, float], None] | None = None,
        on_engine_stop: Callable[[str, str, bool], None] | None = None,
        on_queue: Callable[[str, int], None] | None = None,
        on_inflight: Callable[[str, int], None] | None = None,
        meminfo: Callable[[], tuple[int, int]] | None = None,
    ) -> None:
        self.config = config
        self._sink = sink
        self._record = record
        self._on_engine_state = on_engine_state
        self._on_engine_start = on_engine_start
        self._on_engine_stop = on_engine_stop
        self._on_queue = on_queue
        self._on_inflight = on_inflight
        self._meminfo = meminfo if meminfo is not None else read_meminfo
        self._slots: dict[str, _Slot] = {}
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._swap_target: str | None = None
        self._swap_victims: frozenset[str] = frozenset()
        self._tasks: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()
        self._idle_timer: asyncio.TimerHandle | None = None
        self._retry_timer: asyncio.TimerHandle | None = None
        self._closing = False
        for cfg in config.models.values():
            self._slots[cfg.id] = _Slot(engine=self._new_engine(cfg))

    # -- read-only views (for /status, /running, metrics) ------------------------------

    def engines(self) -> list[Engine]:
        return [slot.engine for slot in self._slots.values()]

    def engine(self, model: str) -> Engine | None:
        slot = self._slots.get(model)
        return slot.engine if slot else None

    def inflight(self, model: str) -> int:
        slot = self._slots.get(model)
        return slot.inflight if slot else 0

    def queued(self, model: str | None = None) -> int:
        return sum(1 for w in self._waiters if model is None or w.model == model)

    def tenant(self) -> list[str]:
        """The running GPU engines."""
        return [m for m, s in self._slots.items() if s.engine.running and s.engine.cfg.gpu]

    def process_groups(self) -> dict[str, procgroup.Tree]:
        """The process tree of each running engine (`procgroup.engine_trees` lists it)."""
        return {
            m: s.engine.tree
            for m, s in self._slots.items()
            if s.engine.running and s.engine.tree is not None
        }

    def is_ready(self, model: str) -> bool:
        slot = self._slots.get(model)
        return slot is not None and self._grantable(slot)

    # -- leases ----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lease(self, model: str) -> AsyncIterator[Lease]:
        """Hold a ready engine for the duration of one request."""
        engine = await self.acquire(model)
        try:
            yield Lease(model=model, upstream=engine.upstream, engine=engine)
        finally:
            self.release(model)

    async def acquire(self, model: str) -> Engine:
        if self._closing:
            raise ShuttingDown("swapd is shutting down", retry_after=5)
        slot = self._slots.get(model)
        if slot is None or slot.removed:
            raise UnknownModel(f"model {model!r} is not configured")
        limit = slot.engine.cfg.concurrency_limit
        if limit and slot.inflight >= limit:
            raise ConcurrencyLimited(
                f"model {model!r} has {slot.inflight} requests in flight "
                f"(concurrencyLimit {limit})",
                retry_after=1,
            )
        # Fast path: the ready tenant, nobody queued ahead that could be overtaken.
        if not self._waiters and self._grantable(slot):
            self._grant(slot)
            return slot.engine
        self._check_backoff(model, slot)
        if len(self._waiters) >= self.config.max_queue:
            raise QueueFull(
                f"{len(self._waiters)} requests are already waiting (maxQueue)", retry_after=5
            )
        waiter = _Waiter(model, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        self._queue_changed(model)
        self._dispatch()
        try:
            return await asyncio.wait_for(asyncio.shield(waiter.future), self.config.queue_timeout)
        except TimeoutError:
            self._drop_waiter(waiter)
            if waiter.future.done() and not waiter.future.cancelled():
                # Answered in the very tick the timeout fired (a busy loop runs both
                # callbacks in one pass): that answer stands. Dropping a grant here
                # would leak the lease: in-flight never back to 0, no swap ever again.
                return waiter.future.result()
            raise QueueTimeout(
                f"model {model!r} was not ready within "
                f"{self.config.queue_timeout:g}s (queueTimeout)",
                retry_after=5,
            ) from None
        except asyncio.CancelledError:
            # The client went away while waiting. If the lease was granted in the
            # same tick, give it back.
            self._drop_waiter(waiter)
            if waiter.future.done() and not waiter.future.cancelled():
                if waiter.future.exception() is None:
                    self.release(model)
            raise

    def release(self, model: str) -> None:
        slot = self._slots.get(model)
        if slot is None:
            return
        slot.inflight -= 1
        slot.last_used = time.monotonic()
        if self._on_inflight:
            self._on_inflight(model, slot.inflight)
        if slot.inflight == 0:
            self._notify()
            self._dispatch()
            self._arm_idle_timer()

    def _grantable(self, slot: _Slot) -> bool:
        return self._serving(slot) and slot.engine.id not in self._swap_victims

    @staticmethod
    def _serving(slot: _Slot) -> bool:
        return slot.engine.state == EngineState.READY and not slot.retiring and not slot.draining

    def _grant(self, slot: _Slot) -> None:
        slot.inflight += 1
        if self._on_inflight:
            self._on_inflight(slot.engine.id, slot.inflight)

    def _drop_waiter(self, waiter: _Waiter) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)
            self._queue_changed(waiter.model)
        if not waiter.future.done():
            waiter.future.cancel()

    def _queue_changed(self, model: str) -> None:
        if self._on_queue:
            self._on_queue(model, self.queued(model))

    def _fail_waiters(self, model: str | None, error: Exception) -> None:
        keep: collections.deque[_Waiter] = collections.deque()
        touched = set()
        for w in self._waiters:
            if model is None or w.model == model:
                if not w.future.done():
                    w.future.set_exception(error)
                touched.add(w.model)
            else:
                keep.append(w)
        self._waiters = keep
        for m in touched:
            self._queue_changed(m)

    def _check_backoff(self, model: str, slot: _Slot) -> None:
        """A model that keeps crashing is answered 503 until its backoff expires."""
        if slot.engine.state != EngineState.FAILED:
            return
        wait = slot.retry_at - time.monotonic()
        if wait > 0:
            raise StartFailed(
                f"model {model!r} failed {slot.failures} times; next retry in {wait:.0f}s",
                retry_after=max(1, round(wait)),
            )
        slot.engine.clear_failed()

    # -- the decision loop -----------------------------------------------------------

    def _dispatch(self) -> None:
        """Serve what can be served now; start the next swap if one is due.

        Synchronous on purpose: nothing can change between the decisions it takes.
        Two passes: first every queued request whose engine is serving gets it (so
        all requests queued for a model are served together), then the oldest
        request left decides the next start or swap.
        """
        if self._closing:
            return
        now = time.monotonic()
        waiting: collections.deque[_Waiter] = collections.deque()
        touched: set[str] = set()
        for w in self._waiters:
            slot = self._slots.get(w.model)
            if w.future.done():
                touched.add(w.model)
            elif slot is None or slot.removed:
                w.future.set_exception(UnknownModel(f"model {w.model!r} is no longer configured"))
                touched.add(w.model)
            elif self._serving(slot) and not self._held(w, slot):
                limit = slot.engine.cfg.concurrency_limit
                if limit and slot.inflight >= limit:
                    waiting.append(w)
                    continue
                self._grant(slot)
                w.future.set_result(slot.engine)
                touched.add(w.model)
            else:
                waiting.append(w)
        self._waiters = waiting
        for w in list(waiting):
            if self._decide(w, now):
                waiting.remove(w)
                touched.add(w.model)
        for m in touched:
            self._queue_changed(m)

    def _held(self, w: _Waiter, slot: _Slot) -> bool:
        """A request for a pending swap's victim that arrived after the victim was
        ready waits for the swap: steady traffic to the tenant must not starve the
        waiting model (llama-swap #612). Requests that queued while the victim was
        still loading are served by it first: they were there before the swap."""
        return w.model in self._swap_victims and w.since >= slot.ready_since

    def _decide(self, w: _Waiter, now: float) -> bool:
        """Start or swap for a request whose engine is not serving; True if answered."""
        slot = self._slots[w.model]
        engine = slot.engine
        if engine.state == EngineState.FAILED:
            if slot.retry_at > now:
                w.future.set_exception(
                    StartFailed(
                        f"model {w.model!r} failed {slot.failures} times",
                        retry_after=max(1, round(slot.retry_at - now)),
                    )
                )
                return True
            engine.clear_failed()
        if engine.state != EngineState.STOPPED or slot.launching or slot.retiring or slot.draining:
            return False  # starting, stopping, or waiting to be replaced: wait for it
        if slot.retry_at > now:
            self._arm_retry_timer(slot.retry_at - now)
            return False
        if engine.cfg.gpu and self._swap_target is not None:
            return False  # one swap at a time; this request's turn comes next
        victims = self._evictions_for(w.model)
        slot.launching = True
        if not victims:
            self._spawn_task(self._start(w.model), f"start-{w.model}")
            return False
        self._swap_target = w.model
        self._swap_victims = frozenset(victims)
        log.info("swap", model=w.model, evicting=sorted(victims))
        self._spawn_task(self._swap(w.model, victims), f"swap-{w.model}")
        return False

    def _evictions_for(self, model: str) -> list[str]:
        running = [m for m, s in self._slots.items() if s.engine.running or s.launching]
        gpu = {m: s.engine.cfg.gpu for m, s in self._slots.items()}
        return policy.evictions(model, running, self.config.groups, gpu)

    async def _swap(self, target: str, victims: list[str]) -> None:
        try:
            # Requests already granted to the old tenant finish first.
            await self._wait_for(lambda: all(self._victim_drained(v) for v in victims))
            await asyncio.gather(*(self._stop(v, "swap") for v in victims))
            await self._wait_memory([self._slots[v] for v in victims if v in self._slots])
        finally:
            self._swap_target = None
            self._swap_victims = frozenset()
        await self._start(target)

    def _victim_drained(self, model: str) -> bool:
        slot = self._slots.get(model)
        if slot is None:
            return True
        return (
            slot.inflight == 0
            and slot.engine.state != EngineState.STARTING
            and not (slot.launching and slot.engine.state == EngineState.STOPPED)
        )

    async def _start(self, model: str) -> None:
        slot = self._slots.get(model)
        if slot is None:
            return
        try:
            await self._start_engine(model, slot)
        finally:
            slot.launching = False
            self._notify()
            self._dispatch()

    async def _start_engine(self, model: str, slot: _Slot) -> None:
        engine = slot.engine
        if engine.state != EngineState.STOPPED:
            return
        try:
            slot.mem_baseline = self._meminfo()[1] if engine.cfg.gpu else None
        except OSError:
            slot.mem_baseline = None
        try:
            seconds = await engine.start()
        except StartError as exc:
            self._record_failure(slot)
            if self._on_engine_start:
                self._on_engine_start(model, "failure", 0.0)
            log.error("engine start failed", model=model, error=str(exc), exit_code=exc.exit_code)
            self._fail_waiters(model, StartFailed(str(exc), retry_after=5))
            return
        if self._on_engine_start:
            self._on_engine_start(model, "success", seconds)
        slot.last_used = slot.ready_since = time.monotonic()
        self._spawn_task(self._monitor(model, engine), f"monitor-{model}")
        slot.launching = False
        self._dispatch()
        self._arm_idle_timer()

    def _record_failure(self, slot: _Slot) -> None:
        restart = slot.engine.cfg.restart
        slot.failures += 1
        delay = policy.backoff(slot.failures, restart.backoff_initial, restart.backoff_max)
        slot.retry_at = time.monotonic() + delay
        if slot.failures > restart.max_retries:
            slot.engine.mark_failed()
            log.error(
                "engine marked failed", model=slot.engine.id, failures=slot.failures, retry_in=delay
            )

    async def _monitor(self, model: str, engine: Engine) -> None:
        """Notice an engine that exits on its own (a crash)."""
        await engine.wait_exit()
        slot = self._slots.get(model)
        if engine.state != EngineState.READY or slot is None or slot.engine is not engine:
            return  # an exit we caused (stop), handled there
        info = engine.last_exit
        code = info.code if info else None
        log.error(
            "engine crashed",
            model=model,
            exit_code=code,
            last_lines=list(info.tail[-5:]) if info else [],
        )
        if engine.ready_at and time.time() - engine.ready_at > engine.cfg.restart.backoff_max:
            slot.failures = 0  # it ran fine for a long while: a fresh crash, not a loop
        # Collect what the dead leader left in its group (vLLM's EngineCore).
        await self._stop(model, "crash")
        self._record_failure(slot)
        self._notify()
        self._dispatch()

    async def _stop(self, model: str, reason: str) -> None:
        slot = self._slots.get(model)
        if slot is None:
            return
        engine = slot.engine
        if engine.state in (EngineState.STOPPED, EngineState.FAILED):
            return
        if engine.state == EngineState.STOPPING:
            await self._wait_for(lambda: not engine.running)
            return
        log.info("stopping engine", model=model, reason=reason, pid=engine.pid)
        killed = await engine.stop()
        if self._on_engine_stop:
            self._on_engine_stop(model, reason, killed)
        if reason in ("idle", "swap", "unload"):
            slot.failures = 0
        if slot.retiring:
            self._replace(model)
        self._notify()
        self._dispatch()

    async def _wait_memory(self, stopped: Iterable[_Slot]) -> None:
        """After a GPU tenant stops, wait for unified memory to come back."""
        for slot in stopped:
            if slot.mem_baseline is None or not slot.engine.cfg.gpu:
                continue
            deadline = time.monotonic() + slot.engine.cfg.memory_release_timeout
            while True:
                try:
                    total, available = self._meminfo()
                except OSError:
                    break
                if policy.memory_released(slot.mem_baseline, available, total):
                    break
                if time.monotonic() >= deadline:
                    log.warning(
                        "memory not released in time; starting anyway",
                        model=slot.engine.id,
                        available=available,
                        baseline=slot.mem_baseline,
                    )
                    break
                await asyncio.sleep(MEMORY_POLL)

    # -- idle eviction, retries ------------------------------------------------------

    def _idle_inputs(self) -> list[policy.IdleInput]:
        return [
            policy.IdleInput(
                model=m,
                ttl=s.engine.cfg.ttl,
                inflight=s.inflight,
                last_used=s.last_used,
                ready=s.engine.state == EngineState.READY,
            )
            for m, s in self._slots.items()
        ]

    def _arm_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        wait = policy.next_idle_check(self._idle_inputs(), time.monotonic())
        if wait is None or self._closing:
            return
        loop = asyncio.get_running_loop()
        self._idle_timer = loop.call_later(wait + 0.001, self._reap_idle)

    def _reap_idle(self) -> None:
        self._idle_timer = None
        for model in policy.idle(self._idle_inputs(), time.monotonic()):
            # Marked synchronously: a request arriving from now on waits for the
            # stop to finish and then starts the engine again (llama-swap #946).
            self._slots[model].draining = True
            self._spawn_task(self._stop_idle(model), f"idle-{model}")
        self._arm_idle_timer()

    async def _stop_idle(self, model: str) -> None:
        try:
            await self._stop(model, "idle")
        finally:
            slot = self._slots.get(model)
            if slot is not None:
                slot.draining = False
            self._dispatch()

    def _arm_retry_timer(self, wait: float) -> None:
        if self._retry_timer is not None:
            return
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._retry_timer = None
            self._dispatch()

        self._retry_timer = loop.call_later(wait + 0.001, fire)

    # -- operations ------------------------------------------------------------------

    async def load(self, model: str) -> Engine:
        """Start a model (swapping if needed) and wait until it is ready."""
        async with self.lease(model) as lease:
            return lease.engine

    async def unload(self, model: str | None = None, reason: str = "unload") -> list[str]:
        """Stop one engine or all, after their in-flight requests finish."""
        targets = [
            m for m, s in self._slots.items() if (model is None or m == model) and s.engine.running
        ]
        for m in targets:
            self._slots[m].draining = True
        try:
            with contextlib.suppress(asyncio.TimeoutError):
                await self._wait_for(
                    lambda: all(self._victim_drained(m) for m in targets),
                    timeout=self.config.shutdown_timeout,
                )
            await asyncio.gather(*(self._stop(m, reason) for m in targets))
        finally:
            for m in targets:
                if m in self._slots:
                    self._slots[m].draining = False
            self._dispatch()
        return targets

    def preload(self, models: Iterable[str]) -> None:
        for model in models:
            if model in self._slots:
                self._spawn_task(self._preload(model), f"preload-{model}")

    async def _preload(self, model: str) -> None:
        try:
            await self.load(model)
        except SchedulerError as exc:
            log.error("preload failed", model=model, error=str(exc))

    def apply_config(self, config: Config) -> dict[str, list[str]]:
        """Adopt a reloaded config. Engines whose recipe is unchanged keep running."""
        changes: dict[str, list[str]] = {"added": [], "changed": [], "removed": []}
        old = self.config
        self.config = config
        for model, cfg in config.models.items():
            slot = self._slots.get(model)
            if slot is None:
                self._slots[model] = _Slot(engine=self._new_engine(cfg))
                changes["added"].append(model)
            elif slot.engine.cfg != cfg:
                changes["changed"].append(model)
                self._retire(model, cfg)
            elif slot.removed:
                slot.removed = False
        for model in old.models:
            if model not in config.models and model in self._slots:
                changes["removed"].append(model)
                self._slots[model].removed = True
                self._retire(model, None)
        self._dispatch()
        return changes

    def _retire(self, model: str, cfg: ModelConfig | None) -> None:
        slot = self._slots[model]
        slot.pending_cfg = cfg
        if not slot.engine.running and slot.engine.state != EngineState.STOPPING:
            self._replace(model)
            return
        slot.retiring = True
        self._spawn_task(self._retire_when_idle(model), f"retire-{model}")

    async def _retire_when_idle(self, model: str) -> None:
        await self._wait_for(lambda: self._victim_drained(model))
        await self._stop(model, "reload")

    def _replace(self, model: str) -> None:
        slot = self._slots[model]
        cfg = slot.pending_cfg
        if slot.removed or cfg is None:
            del self._slots[model]
            self._fail_waiters(model, UnknownModel(f"model {model!r} is no longer configured"))
            return
        self._slots[model] = _Slot(engine=self._new_engine(cfg))

    async def close(self, drain: float | None = None) -> None:
        """Shutdown: refuse new requests, let in-flight ones finish, stop every engine."""
        drain = self.config.shutdown_timeout if drain is None else drain
        self._closing = True
        self._fail_waiters(None, ShuttingDown("swapd is shutting down", retry_after=5))
        for timer in (self._idle_timer, self._retry_timer):
            if timer is not None:
                timer.cancel()
        with contextlib.suppress(asyncio.TimeoutError):
            await self._wait_for(
                lambda: all(s.inflight == 0 for s in self._slots.values()), timeout=drain
            )
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(
            *(self._stop(m, "shutdown") for m, s in self._slots.items() if s.engine.running),
            return_exceptions=True,
        )

    async def kill_all(self) -> None:
        """Fast exit: SIGKILL every engine group now (second SIGINT)."""
        self._closing = True
        await asyncio.gather(
            *(s.engine.stop(grace=0) for s in self._slots.values() if s.engine.running),
            return_exceptions=True,
        )

    # -- plumbing --------------------------------------------------------------------

    def _new_engine(self, cfg: ModelConfig) -> Engine:
        return Engine(cfg, sink=self._sink, record=self._record, on_state=self._engine_state)

    def _engine_state(self, engine: Engine) -> None:
        self._notify()
        if self._on_engine_state:
            self._on_engine_state(engine)

    def _spawn_task(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Every task is about one engine, named "{kind}-{model}": say which (model=).
            kind, _, model = task.get_name().partition("-")
            log.error("scheduler task failed", model=model, task=kind, error=repr(task.exception()))

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_for(self, condition: Callable[[], bool], timeout: float | None = None) -> None:
        """Wait until `condition()` holds, re-checked on every scheduler state change."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not condition():
            event = self._changed
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError
            await asyncio.wait_for(event.wait(), remaining)


def read_meminfo() -> tuple[int, int]:
    """(MemTotal, MemAvailable) in bytes: GB10's GPU memory is this memory."""
    used, total = gpu.read_meminfo()
    return total, total - used

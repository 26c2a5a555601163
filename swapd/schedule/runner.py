"""The scheduler: the only holder of engines, and the runner of the core's effects.

Every decision (who is served, started, stopped, refused) is taken by `swapd.core.Core`,
synchronously and without a clock. This module feeds it events (a request, a release, a
start's result, an engine's exit, a timer) with the time from an injected clock, and
carries out the effects it returns with `Engine` objects from an injected factory.

Handlers see only `async with scheduler.lease(model) as lease` (an upstream URL) and
frozen `EngineView` snapshots; nothing outside this module touches an `Engine`.
"""

from __future__ import annotations

import asyncio
import collections
import time
import types
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from swapd.config.types import Config, ModelConfig
from swapd.engines import procgroup
from swapd.engines.engine import Engine, EngineState, GroupRecord, LineSink, StartError
from swapd.errors import ApiError
from swapd.memory.guard import GuardEvent
from swapd.memory.meminfo import MemInfo, read_meminfo
from swapd.memory.watch import MemoryWatch
from swapd.placement import by_memory, registry
from swapd.placement.types import Router
from swapd.schedule.core import ArmTimer, Core, Effect, Fail, Forget, Grant, Refusal, Start, Stop
from swapd.schedule.phase import RUNNING, Phase, StopReason

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


class NotLoaded(SchedulerError):
    """A ready-only lease (upstream.ignorePaths) for a model that does not serve now."""

    status = 409
    code = "model_not_loaded"
    type = "invalid_request_error"


class MemoryGuardKilled(SchedulerError):
    """The memory guard killed the engine (MemAvailable fell below its floor)."""

    code = "memory_guard"


class InsufficientMemory(SchedulerError):
    """The memory router can never place the model on this machine."""

    code = "insufficient_memory"


ERRORS: dict[Refusal, type[SchedulerError]] = {
    Refusal.UNKNOWN_MODEL: UnknownModel,
    Refusal.CONCURRENCY: ConcurrencyLimited,
    Refusal.QUEUE_FULL: QueueFull,
    Refusal.QUEUE_TIMEOUT: QueueTimeout,
    Refusal.START_FAILED: StartFailed,
    Refusal.SHUTTING_DOWN: ShuttingDown,
    Refusal.MEMORY_GUARD: MemoryGuardKilled,
    Refusal.WONT_FIT: InsufficientMemory,
}


@dataclass(frozen=True, slots=True)
class _Release:
    """MemAvailable and what the engine held, just before it was stopped."""

    available: int
    expected: int | None  # what the engine held (None: never measured)
    baseline: int | None  # MemAvailable before it was spawned
    timeout: float


@dataclass(frozen=True, slots=True)
class Lease:
    model: str
    upstream: str


@dataclass(frozen=True, slots=True)
class ExitView:
    code: int | None
    at: float  # wall clock
    tail: tuple[str, ...]
    reason: str  # why it ended: a stop reason, or crash / start_failed (swapd.engine)
    signal: str | None  # the signal that ended it, by name


@dataclass(frozen=True, slots=True)
class EngineView:
    """A frozen snapshot of one model and its engine, for /status, /running and metrics."""

    id: str
    phase: Phase
    state: str  # stopped, starting, ready, stopping, failed (metrics' and /status' word)
    pid: int | None  # while running
    started_at: float | None  # wall clock
    inflight: int
    queued: int
    upstream: str
    cfg: ModelConfig
    last_exit: ExitView | None
    failures: int
    last_error: str | None
    next_retry_at: float | None  # wall clock; None when not in backoff

    @property
    def running(self) -> bool:
        return self.phase in RUNNING


class Observer(Protocol):
    """What the scheduler tells the rest of swapd (metrics, systemd status)."""

    def engine_state(self, model: str, state: str) -> None: ...

    def engine_started(self, model: str, ok: bool, seconds: float) -> None: ...

    def engine_stopped(self, model: str, reason: str, killed: bool) -> None: ...

    def evicted(self, model: str, reason: str) -> None: ...


class NullObserver:
    def engine_state(self, model: str, state: str) -> None:
        pass

    def engine_started(self, model: str, ok: bool, seconds: float) -> None:
        pass

    def engine_stopped(self, model: str, reason: str, killed: bool) -> None:
        pass

    def evicted(self, model: str, reason: str) -> None:
        pass


# Builds the engine for a recipe; `on_state` must be called on every state change.
EngineFactory = Callable[[ModelConfig, Callable[[Engine], None]], Engine]
Progress = Callable[[float], Awaitable[None]]


class _Groups:
    """The record of owned process trees, and the immutable `model -> Tree` snapshot the
    GPU sampler thread reads (replaced, never mutated: no lock, no retry)."""

    def __init__(self, record: GroupRecord | None) -> None:
        self._record = record
        self._trees: dict[str, procgroup.Tree] = {}
        self.snapshot: Mapping[str, procgroup.Tree] = types.MappingProxyType({})

    def add(self, model: str, tree: procgroup.Tree) -> None:
        if self._record is not None:
            self._record.add(model, tree)
        self._trees[model] = tree
        self.snapshot = types.MappingProxyType(dict(self._trees))

    def remove(self, pid: int) -> None:
        if self._record is not None:
            self._record.remove(pid)
        self._trees = {m: t for m, t in self._trees.items() if t.leader != pid}
        self.snapshot = types.MappingProxyType(dict(self._trees))


class Scheduler:
    def __init__(
        self,
        config: Config,
        *,
        observer: Observer | None = None,
        engines: EngineFactory | None = None,
        sink: LineSink | None = None,
        record: GroupRecord | None = None,
        clock: Callable[[], float] = time.monotonic,
        memory: MemoryWatch | None = None,
    ) -> None:
        self.config = config
        self._observer: Observer = observer if observer is not None else NullObserver()
        self._groups = _Groups(record)
        self._factory: EngineFactory = engines if engines is not None else self._default_engine
        self._sink = sink
        self._clock = clock
        self._memory = memory
        self._core = Core(config, self._router_for(config), registry.queue_key_for(config))
        self._engines: dict[str, Engine] = {}
        self._waiting: dict[int, asyncio.Future[None]] = {}
        self._starts: dict[str, asyncio.Task[None]] = {}
        self._mem_baseline: dict[str, int | None] = {}
        # MemAvailable and what the engine held, read just before a GPU engine's stop.
        self._release_before: dict[str, _Release] = {}
        self._guard_events: dict[str, GuardEvent] = {}  # the memory guard killed this run
        self._stops: dict[str, int] = {}  # stop_finished count per model (unload waits on it)
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._changed = asyncio.Event()
        for cfg in config.models.values():
            self._engines[cfg.id] = self._factory(cfg, self._engine_state)

    # -- read-only views (for /status, /running, metrics) ------------------------------

    def views(self) -> list[EngineView]:
        return [v for m in self._core.views() if (v := self.view(m)) is not None]

    def counts(self) -> dict[str, tuple[int, int]]:
        """(in flight, queued) of each model, now."""
        return self._core.counts()

    def view(self, model: str) -> EngineView | None:
        core = self._core.view(model)
        engine = self._engines.get(model)
        if core is None or engine is None:
            return None
        now = self._clock()
        exit_info = engine.last_exit
        in_backoff = core.phase in (Phase.STOPPED, Phase.FAILED) and core.retry_at > now
        running = engine.running
        return EngineView(
            id=model,
            phase=core.phase,
            state="failed" if core.phase == Phase.FAILED else str(engine.state),
            pid=engine.pid if running else None,
            started_at=engine.started_at if running else None,
            inflight=core.inflight,
            queued=core.queued,
            upstream=engine.upstream,
            cfg=engine.cfg,
            last_exit=None if exit_info is None
            else ExitView(exit_info.code, exit_info.at, exit_info.tail, exit_info.reason,
                          exit_info.signal),
            failures=core.failures,
            last_error=core.last_error if core.failures else None,
            next_retry_at=time.time() + (core.retry_at - now) if in_backoff else None,
        )

    def inflight(self, model: str) -> int:
        view = self._core.view(model)
        return view.inflight if view else 0

    def queued(self, model: str | None = None) -> int:
        if model is None:
            return self._core.queue_length()
        view = self._core.view(model)
        return view.queued if view else 0

    def live_gpu_engines(self) -> list[str]:
        """The GPU engines whose processes run now."""
        return [m for m, e in self._engines.items() if e.running and e.cfg.gpu]

    def process_groups(self) -> Mapping[str, procgroup.Tree]:
        """An immutable `model -> process tree` snapshot (safe to read from another thread;
        `procgroup.engine_trees` lists the pids)."""
        return self._groups.snapshot

    def is_ready(self, model: str) -> bool:
        return self._core.is_ready(model)

    # -- leases ----------------------------------------------------------------------

    def lease(
        self, model: str, progress: Progress | None = None, priority: int = 0,
        ready_only: bool = False,
    ) -> _LeaseContext:
        """`async with scheduler.lease(model) as lease`: a ready engine for one request.

        Raises SchedulerError on entry if the model cannot be served. `progress(waited)`
        is awaited about once a second while the request waits (a chat UI's loading
        message); if it raises, the wait is abandoned. `priority` goes to the core's
        queue order (`registry.queue_key_for`). `ready_only`: only an engine that serves
        right now, else NotLoaded (409) at once; never queues, starts or swaps
        (llama-swap's upstream.ignorePaths).
        """
        return _LeaseContext(self, model, progress, priority, ready_only)

    async def _acquire(self, model: str, priority: int = 0) -> str:
        got = self._request(model, priority)
        return got if isinstance(got, str) else await self._wait(model, *got)

    def _request(self, model: str, priority: int) -> str | tuple[int, list[Effect]]:
        """A request arrives: the upstream when it is granted at once (the fast path: ready,
        nobody queued), its refusal raised, or its ticket and effects to wait on."""
        ticket, fx = self._core.request(model, self._clock(), priority)
        first = fx[0] if fx else None
        if type(first) is Grant and first.ticket == ticket:
            return self._engines[model].upstream
        if type(first) is Fail and first.ticket == ticket:
            raise ERRORS[first.refusal](first.message, retry_after=first.retry_after)
        return ticket, fx

    async def _wait(self, model: str, ticket: int, fx: list[Effect]) -> str:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[ticket] = future
        self._apply(fx)
        try:
            # No timeout here: the core times the queue out (tick), so a grant and a
            # timeout can never both happen to one request.
            await future
        except asyncio.CancelledError:
            self._waiting.pop(ticket, None)
            if future.done() and not future.cancelled() and future.exception() is None:
                self._release(model)  # granted in the tick its client left
            else:
                self._apply(self._core.leave(ticket, self._clock()))
            raise
        return self._engines[model].upstream

    def _acquire_ready(self, model: str) -> str:
        _, fx = self._core.request_ready(model, self._clock())
        if not fx:
            raise NotLoaded(f"model {model!r} is not loaded, and this request may not "
                            "start or swap one (upstream.ignorePaths)")
        return self._engines[model].upstream

    async def _acquire_with_progress(
        self, model: str, progress: Progress, priority: int = 0
    ) -> str:
        task = asyncio.ensure_future(self._acquire(model, priority))
        started = self._clock()
        try:
            while not (await asyncio.wait({task}, timeout=1.0))[0]:
                await progress(self._clock() - started)
        except BaseException:
            task.cancel()
            if task.done() and not task.cancelled() and task.exception() is None:
                self._release(model)
            raise
        return task.result()

    def _release(self, model: str) -> None:
        fx = self._core.release(model, self._clock())
        if fx:  # the usual release changes nothing but a count: no effects
            self._apply(fx)

    # -- carrying out effects ------------------------------------------------------------

    def _apply(self, fx: Iterable[Effect], notify: bool = False) -> None:
        """Carry out the core's effects; wake `_wait_for` if there were any (or `notify`:
        the event itself was a change, e.g. a stop that finished)."""
        changed = notify
        for e in fx:
            changed = True
            if isinstance(e, Grant):
                future = self._waiting.pop(e.ticket, None)
                if future is not None and not future.done():
                    future.set_result(None)
                else:
                    # Its client left in this very tick: give the lease back.
                    self._release(e.model)
            elif isinstance(e, Fail):
                future = self._waiting.pop(e.ticket, None)
                if future is not None and not future.done():
                    future.set_exception(ERRORS[e.refusal](e.message, retry_after=e.retry_after))
            elif isinstance(e, Start):
                self._starts[e.model] = self._spawn_task(self._start(e), f"start-{e.model}")
            elif isinstance(e, Stop):
                self._spawn_task(self._stop(e.model, e.reason), f"stop-{e.model}")
            elif isinstance(e, ArmTimer):
                self._arm(e.at)
            elif isinstance(e, Forget):
                self._engines.pop(e.model, None)
        if changed:
            self._notify()

    def _arm(self, at: float | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if at is not None:
            delay = max(0.0, at - self._clock()) + 0.001
            self._timer = asyncio.get_running_loop().call_later(delay, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._apply(self._core.tick(self._clock()), notify=True)

    async def _start(self, e: Start) -> None:
        model = e.model
        engine = self._engines.get(model)
        if engine is None or engine.cfg != e.cfg:
            engine = self._engines[model] = self._factory(e.cfg, self._engine_state)
        if e.after:
            await self._wait_memory(e.after, model)
        try:
            self._mem_baseline[model] = self._read_memory().available if e.cfg.gpu else None
        except (OSError, ValueError):
            self._mem_baseline[model] = None
        self._guard_events.pop(model, None)
        try:
            seconds = await engine.start()
        except StartError as exc:
            self._observer.engine_started(model, False, 0.0)
            event = self._guard_events.pop(model, None)
            if event is None:
                log.error("engine start failed", model=model, error=str(exc),
                          exit_code=exc.exit_code)
                fx = self._core.start_finished(model, self._clock(), ok=False, error=str(exc))
            else:
                log.error("engine start failed: killed by the memory guard", model=model,
                          available=event.available, floor=event.floor)
                fx = self._core.start_finished(model, self._clock(), ok=False,
                                               error=event.message(),
                                               refusal=Refusal.MEMORY_GUARD)
            self._apply(fx, notify=True)
            self._report_failed(model)
            return
        finally:
            self._starts.pop(model, None)
        self._observer.engine_started(model, True, seconds)
        self._spawn_task(self._monitor(model, engine), f"monitor-{model}")
        self._apply(self._core.start_finished(model, self._clock(), ok=True), notify=True)

    async def _monitor(self, model: str, engine: Engine) -> None:
        """Notice an engine that exits on its own (a crash)."""
        info = await engine.wait_exit()
        if self._engines.get(model) is not engine or engine.state != EngineState.READY:
            return  # an exit we caused (a stop), handled there
        code = info.code if info else None
        tail = list(info.tail[-5:]) if info else []
        event = self._guard_events.get(model)
        error = f"model {model!r} crashed: exited with code {code}"
        if event is not None:
            error = event.message()
        elif tail:
            error += "; last output: " + " | ".join(tail)
        fx = self._core.engine_exited(model, self._clock(), error)
        if fx:
            log.error("engine crashed" if event is None else "engine killed by the memory guard",
                      model=model, exit_code=code, last_lines=tail)
        self._apply(fx)

    async def _stop(self, model: str, reason: StopReason) -> None:
        start = self._starts.get(model)
        if start is not None and not start.done():
            start.cancel()  # Engine.start removes a half-started group itself
            await asyncio.gather(start, return_exceptions=True)
        engine = self._engines.get(model)
        if engine is not None and engine.running:
            self._note_before_stop(model, engine)
            label = "memory_guard" if self._guard_events.pop(model, None) else str(reason)
            log.info("stopping engine", model=model, reason=label, pid=engine.pid)
            killed = await engine.stop(reason=label)
            self._observer.engine_stopped(model, label, killed)
        self._stops[model] = self._stops.get(model, 0) + 1
        self._apply(self._core.stop_finished(model, self._clock()), notify=True)
        self._report_failed(model)

    def _report_failed(self, model: str) -> None:
        if self._core.phase(model) == Phase.FAILED:
            view = self._core.view(model)
            assert view is not None
            log.error("engine marked failed", model=model, failures=view.failures,
                      retry_in=round(view.retry_at - self._clock(), 3))
            self._observer.engine_state(model, "failed")

    def _note_before_stop(self, model: str, engine: Engine) -> None:
        """Note, just before a GPU engine stops, what the release wait compares against."""
        if not engine.cfg.gpu:
            return
        try:
            info = self._read_memory()
        except (OSError, ValueError):
            return
        self._release_before[model] = _Release(
            available=info.available,
            expected=self._memory.used(model) if self._memory is not None else None,
            baseline=self._mem_baseline.get(model),
            timeout=engine.cfg.memory_release_timeout,
        )

    async def _wait_memory(self, stopped: Iterable[str], target: str) -> None:
        """After GPU tenants stop, wait until their own memory is back or `target` fits.

        Not "until MemAvailable is back where it was": anything else that allocated meanwhile
        would stall every swap for the whole memoryReleaseTimeout (swapd/by_memory.py).
        """
        before = [r for m in stopped if (r := self._release_before.pop(m, None)) is not None]
        if not before:
            return
        start = min(r.available for r in before)
        expected = (None if any(r.expected is None for r in before)
                    else sum(r.expected or 0 for r in before))
        baselines = [r.baseline for r in before if r.baseline is not None]
        baseline = min(baselines) if baselines else None
        cfg = self._core.cfg(target)
        need = self._footprint(cfg) if cfg is not None else None
        stopped_at = self._clock()
        deadline = stopped_at + max(r.timeout for r in before)
        readings: collections.deque[tuple[float, int]] = collections.deque()
        while True:
            try:
                info = self._read_memory()
            except (OSError, ValueError):
                return
            now = self._clock()
            readings.append((now, info.available))
            while readings[0][0] < now - by_memory.PLATEAU - MEMORY_POLL / 2:
                readings.popleft()
            rising = None
            if now - stopped_at >= by_memory.PLATEAU:
                rising = info.available - min(a for _, a in readings)
            room = by_memory.Room(info.available, info.total, self.config.memory_reserve)
            if by_memory.released(freed=info.available - start, expected=expected, need=need,
                                  room=room, baseline=baseline, to_come=self._to_come(target),
                                  rising=rising):
                return
            if now >= deadline:
                log.warning("memory not released in time; starting anyway", model=target,
                            stopped=sorted(stopped), available=info.available,
                            freed=info.available - start, expected=expected, need=need)
                return
            await asyncio.sleep(MEMORY_POLL)

    def _read_memory(self) -> MemInfo:
        if self._memory is not None:
            return self._memory.meminfo()
        return read_meminfo()

    def _footprint(self, cfg: ModelConfig) -> int | None:
        return self._memory.footprint(cfg) if self._memory is not None else cfg.memory

    def _to_come(self, target: str) -> int:
        """What engines still starting (other than `target`) will take on top of what they
        hold."""
        total = 0
        for view in self._core.views().values():
            if view.phase != Phase.STARTING or view.id == target:
                continue
            cfg = self._core.cfg(view.id)
            footprint = self._footprint(cfg) if cfg is not None else None
            used = self._memory.used(view.id) if self._memory is not None else None
            if footprint is not None:
                total += max(0, footprint - (used or 0))
        return total

    def _router_for(self, config: Config) -> Router:
        return registry.router_for(config, self._memory, self._observer.evicted)

    # -- the memory guard ------------------------------------------------------------

    def guard_kill(self, model: str, event: GuardEvent) -> bool:
        """Kill `model`'s engine now (SIGKILL, no grace): the memory guard's verdict.

        Its queued requests get 503 `memory_guard` at once; a start under way fails with the
        same answer; a ready engine's exit is handled as a crash (backoff), logged and counted
        as what it was. False when the engine is not running (nothing to kill).
        """
        engine = self._engines.get(model)
        if engine is None or not engine.running:
            return False
        self._guard_events[model] = event
        if not engine.kill_now():
            self._guard_events.pop(model, None)
            return False
        self._apply(self._core.engine_killed(model, self._clock(), event.message()))
        return True

    # -- operations ------------------------------------------------------------------

    async def load(self, model: str, *, clear_failure: bool = False) -> EngineView:
        """Start a model (swapping if needed) and wait until it is ready. An admin load
        (`clear_failure`) forgets the model's failures and backoff first."""
        if clear_failure:
            self._core.clear_failure(model)
        async with self.lease(model):
            view = self.view(model)
        assert view is not None
        return view

    async def unload(self, model: str | None = None, reason: str = "unload") -> list[str]:
        """Stop one engine or all, after their in-flight requests finish."""
        before = dict(self._stops)
        targets, fx = self._core.unload(model, self._clock(), StopReason(reason))
        self._apply(fx)
        await self._wait_for(
            lambda: all(
                self._stops.get(m, 0) > before.get(m, 0) or self._core.phase(m) not in RUNNING
                for m in targets
            )
        )
        return targets

    def preload(self, models: Iterable[str]) -> None:
        for model in models:
            if self._core.phase(model) is not None:
                self._spawn_task(self._preload(model), f"preload-{model}")

    async def _preload(self, model: str) -> None:
        try:
            await self.load(model)
        except SchedulerError as exc:
            log.error("preload failed", model=model, error=str(exc))

    def apply_config(self, config: Config) -> dict[str, list[str]]:
        """Adopt a reloaded config. Engines whose recipe is unchanged keep running."""
        self.config = config
        self._core.router = self._router_for(config)
        self._core.queue_key = registry.queue_key_for(config)
        changes, fx = self._core.apply_config(config, self._clock())
        for model in changes["added"]:
            self._engines[model] = self._factory(config.models[model], self._engine_state)
        for model in changes["changed"]:
            engine = self._engines.get(model)
            if engine is not None and not engine.running:
                self._engines[model] = self._factory(config.models[model], self._engine_state)
        self._apply(fx)
        return changes

    async def close(self, drain: float | None = None) -> None:
        """Shutdown: refuse new requests, let in-flight ones finish, stop every engine."""
        drain = self.config.shutdown_timeout if drain is None else drain
        self._apply(self._core.shutdown(self._clock(), drain))
        await self._wait_for(
            lambda: all(self._core.phase(m) not in RUNNING for m in list(self._engines))
        )
        if self._timer is not None:
            self._timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def kill_all(self) -> None:
        """Fast exit: SIGKILL every engine group now (second SIGINT)."""
        self._core.shutdown(self._clock(), 0.0)
        await asyncio.gather(
            *(e.stop(grace=0, reason="shutdown") for e in self._engines.values() if e.running),
            return_exceptions=True,
        )

    # -- plumbing --------------------------------------------------------------------

    def _default_engine(self, cfg: ModelConfig, on_state: Callable[[Engine], None]) -> Engine:
        return Engine(cfg, sink=self._sink, record=self._groups, on_state=on_state)

    def _engine_state(self, engine: Engine) -> None:
        self._notify()
        self._observer.engine_state(engine.id, str(engine.state))

    def _spawn_task(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Every task is about one engine, named "{kind}-{model}": say which (model=).
            kind, _, model = task.get_name().partition("-")
            log.error("scheduler task failed", model=model, task=kind, error=repr(task.exception()))

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_for(self, condition: Callable[[], bool]) -> None:
        """Wait until `condition()` holds, re-checked on every scheduler state change."""
        while not condition():
            await self._changed.wait()


class _LeaseContext:
    """The one place a lease is taken and given back (a class, not a generator: it is on
    every request's path)."""

    __slots__ = ("_held", "_model", "_priority", "_progress", "_ready_only", "_scheduler")

    def __init__(
        self, scheduler: Scheduler, model: str, progress: Progress | None, priority: int,
        ready_only: bool = False,
    ) -> None:
        self._scheduler = scheduler
        self._model = model
        self._progress = progress
        self._priority = priority
        self._ready_only = ready_only
        self._held = False

    async def __aenter__(self) -> Lease:
        s = self._scheduler
        if self._ready_only:
            upstream = s._acquire_ready(self._model)
        elif self._progress is None:
            # _acquire without its coroutine: one less on every request.
            got = s._request(self._model, self._priority)
            upstream = got if isinstance(got, str) else await s._wait(self._model, *got)
        else:
            upstream = await s._acquire_with_progress(self._model, self._progress, self._priority)
        self._held = True
        return Lease(self._model, upstream)

    async def __aexit__(self, *exc: object) -> None:
        if self._held:
            self._held = False
            self._scheduler._release(self._model)

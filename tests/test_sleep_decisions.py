"""Warm swaps as plain sequences of events (issue 20, docs/sleep.md): where a swap or a ttl
would stop a model whose recipe enables sleep, the core asks for a Sleep; a sleeping engine
is no GPU tenant; a request wakes it through the queue; failures fall back to the cold path.
No processes, no clock: `swapd.schedule.core.Core` and the effects it returns."""

from __future__ import annotations

from typing import Any

from swapd.config.presets import VLLM_SLEEP, VLLM_WAKE
from swapd.config.types import Config, ModelConfig, SleepPolicy
from swapd.placement.types import RouteAnswer, RouteQuery
from swapd.schedule.core import (
    ArmTimer,
    Core,
    Sleep,
    Start,
    Stop,
    Wake,
)
from swapd.schedule.phase import Phase, SleepResult, StopReason
from tests.support.core import RESTART, core, grants, kinds

SLEEPY = SleepPolicy(sleep=VLLM_SLEEP, wake=VLLM_WAKE)


def cfg(name: str, sleep: SleepPolicy | None = SLEEPY, **kw: Any) -> ModelConfig:
    kw.setdefault("restart", RESTART)
    return ModelConfig(id=name, cmd=("engine", name), sleep=sleep, **kw)


def awake_gpu(c: Core) -> list[str]:
    """GPU tenants: running, not asleep (the one-tenant rule counts these)."""
    return c.running_gpu()


def ready(c: Core, model: str, now: float) -> None:
    t, fx = c.request(model, now)
    started = [e for e in fx if isinstance(e, Start | Wake)]
    assert [e.model for e in started] == [model]
    fx = (c.start_finished if isinstance(started[0], Start) else c.wake_finished)(
        model, now + 1, ok=True)
    assert grants(fx) == [t]
    c.release(model, now + 1)


def asleep_by_swap(c: Core, sleeper: str, target: str, now: float) -> int:
    """`sleeper` is the ready tenant; a request for `target` puts it to sleep and starts
    `target`. Returns the target's ticket (granted)."""
    t, fx = c.request(target, now)
    assert kinds(fx) == [Sleep(sleeper, StopReason.SWAP)]
    assert c.phase(sleeper) == Phase.FALLING_ASLEEP
    assert c.phase(target) == Phase.STARTING
    fx = c.sleep_finished(sleeper, now + 1, SleepResult.SLEPT)
    assert c.phase(sleeper) == Phase.SLEEPING
    assert [e for e in fx if isinstance(e, Start)] == [
        Start(target, c.cfg(target), (sleeper,))]  # type: ignore[arg-type]
    fx = c.start_finished(target, now + 2, ok=True)
    assert grants(fx) == [t]
    return t


def test_a_swap_puts_a_sleepy_tenant_to_sleep_instead_of_stopping_it() -> None:
    c = core(cfg("a"), cfg("b", sleep=None))
    ready(c, "a", 0.0)
    asleep_by_swap(c, "a", "b", 5.0)
    assert awake_gpu(c) == ["b"]  # a sleeper is no GPU tenant
    view = c.view("a")
    assert view is not None and view.phase == Phase.SLEEPING and not view.running


def test_the_one_tenant_rule_waits_for_the_sleep_to_be_verified() -> None:
    """While the sleep is being verified the engine still holds its memory: the next
    tenant does not start before sleep_finished."""
    c = core(cfg("a"), cfg("b"))
    ready(c, "a", 0.0)
    c.request("b", 5.0)
    fx = c.release("a", 5.1)  # nothing held: nothing new
    assert [e for e in fx if isinstance(e, Start | Wake)] == []
    assert sorted(awake_gpu(c)) == ["a", "b"]  # a counts until verified, b is decided
    assert c.phase("a") == Phase.FALLING_ASLEEP


def test_a_request_for_a_sleeper_wakes_it_through_the_swap_rules() -> None:
    c = core(cfg("a"), cfg("b"))
    ready(c, "a", 0.0)
    tb = asleep_by_swap(c, "a", "b", 5.0)
    c.release("b", 6.0)
    ta, fx = c.request("a", 7.0)
    # b (sleepy too) falls asleep first; a wakes only once b is verified asleep.
    assert kinds(fx) == [Sleep("b", StopReason.SWAP)]
    assert c.phase("a") == Phase.WAKING
    fx = c.sleep_finished("b", 7.5, SleepResult.SLEPT)
    assert kinds(fx) == [Wake("a", c.cfg("a"), ("b",))]  # type: ignore[arg-type]
    fx = c.wake_finished("a", 8.0, ok=True)
    assert grants(fx) == [ta]
    assert c.phase("a") == Phase.READY and c.phase("b") == Phase.SLEEPING
    assert awake_gpu(c) == ["a"]
    assert tb != ta


def test_a_request_for_a_sleeper_with_no_tenant_wakes_it_at_once() -> None:
    c = core(cfg("a"))
    ready(c, "a", 0.0)
    fx = c.unload("a", 1.0)[1]
    assert [e for e in fx if isinstance(e, Stop)] == [Stop("a", StopReason.UNLOAD)]
    c.stop_finished("a", 2.0)
    # An admin sleep instead:
    ready(c, "a", 3.0)
    why, fx = c.sleep("a", 5.0)
    assert why is None and kinds(fx) == [Sleep("a", StopReason.UNLOAD)]
    c.sleep_finished("a", 5.5, SleepResult.SLEPT)
    t, fx = c.request("a", 6.0)
    assert kinds(fx) == [Wake("a", c.cfg("a"))]  # type: ignore[arg-type]
    assert grants(c.wake_finished("a", 6.5, ok=True)) == [t]


def test_sleep_that_frees_nothing_stops_the_engine_and_turns_sleep_off() -> None:
    c = core(cfg("a"), cfg("b", sleep=None))
    ready(c, "a", 0.0)
    _, fx = c.request("b", 5.0)
    assert kinds(fx) == [Sleep("a", StopReason.SWAP)]
    fx = c.sleep_finished("a", 6.0, SleepResult.NO_MEMORY_FREED, "freed 0B of 2.0GiB")
    assert kinds(fx) == [Stop("a", StopReason.SWAP)]
    assert c.phase("a") == Phase.STOPPING
    fx = c.stop_finished("a", 7.0)
    assert [e.model for e in fx if isinstance(e, Start)] == ["b"]
    assert c.sleep_off("a") == "freed 0B of 2.0GiB"
    # Next time a is swapped out it is stopped, no sleep tried.
    c.start_finished("b", 8.0, ok=True)
    c.release("b", 8.5)
    c.request("a", 9.0)
    assert c.phase("b") == Phase.STOPPING


def test_a_failed_sleep_call_stops_the_engine_but_keeps_sleep_on() -> None:
    c = core(cfg("a"), cfg("b", sleep=None))
    ready(c, "a", 0.0)
    c.request("b", 5.0)
    fx = c.sleep_finished("a", 6.0, SleepResult.FAILED, "POST /sleep answered 500")
    assert kinds(fx) == [Stop("a", StopReason.SWAP)]
    assert c.sleep_off("a") is None


def test_a_failed_wake_cold_starts_and_the_request_is_still_served() -> None:
    c = core(cfg("a"), cfg("b", sleep=None))
    ready(c, "a", 0.0)
    asleep_by_swap(c, "a", "b", 5.0)
    c.release("b", 6.0)
    ta, fx = c.request("a", 7.0)
    c.stop_finished("b", 7.5)  # b cannot sleep: stopped
    assert c.phase("a") == Phase.WAKING
    fx = c.wake_finished("a", 8.0, ok=False, error="wake_up answered 500")
    assert kinds(fx) == [Start("a", c.cfg("a"))]  # type: ignore[arg-type]
    assert c.phase("a") == Phase.STARTING
    assert grants(c.start_finished("a", 20.0, ok=True)) == [ta]
    assert c.sleep_off("a") is None  # one failed wake: sleep stays on


def test_two_failed_wakes_turn_sleep_off_until_the_recipe_changes() -> None:
    c = core(cfg("a"), cfg("b", sleep=None))
    ready(c, "a", 0.0)
    for round_ in range(2):
        now = 10.0 * (round_ + 1)
        asleep_by_swap(c, "a", "b", now)
        c.release("b", now + 2.5)
        c.request("a", now + 3)
        c.stop_finished("b", now + 3.5)
        c.wake_finished("a", now + 4, ok=False, error="engine exited with code -9")
        c.start_finished("a", now + 5, ok=True)
        c.release("a", now + 5)
    assert "2 wakes failed" in (c.sleep_off("a") or "")
    c.request("b", 40.0)
    assert c.phase("a") == Phase.STOPPING  # stopped now, not put to sleep
    # A changed recipe starts with sleep on again.
    new = cfg("a", env=(("X", "1"),))
    c.stop_finished("a", 41.0)
    c.apply_config(Config(models={"a": new, "b": cfg("b", sleep=None)}), 42.0)
    assert c.sleep_off("a") is None


def test_ttl_puts_a_sleepy_model_to_sleep_and_sleep_ttl_stops_it() -> None:
    sleepy = SleepPolicy(sleep=VLLM_SLEEP, wake=VLLM_WAKE, ttl=100.0)
    c = core(cfg("a", sleep=sleepy, ttl=10.0))
    ready(c, "a", 0.0)
    fx = c.tick(11.0)
    assert kinds(fx) == [Sleep("a", StopReason.IDLE)]
    fx = c.sleep_finished("a", 12.0, SleepResult.SLEPT)
    assert [e.at for e in fx if isinstance(e, ArmTimer)] == [112.0]
    assert kinds(c.tick(50.0)) == []
    fx = c.tick(112.0)
    assert kinds(fx) == [Stop("a", StopReason.IDLE)]
    c.stop_finished("a", 113.0)
    assert c.phase("a") == Phase.STOPPED


def test_unload_reload_and_shutdown_stop_sleepers() -> None:
    c = core(cfg("a"), cfg("b"), cfg("c", sleep=None))
    ready(c, "a", 0.0)
    asleep_by_swap(c, "a", "b", 5.0)
    c.release("b", 6.0)
    targets, fx = c.unload(None, 7.0)
    assert sorted(targets) == ["a", "b"]
    assert Stop("a", StopReason.UNLOAD) in fx and Stop("b", StopReason.UNLOAD) in fx
    c.stop_finished("a", 8.0)
    c.stop_finished("b", 8.0)
    # reload
    ready(c, "a", 10.0)
    asleep_by_swap(c, "a", "c", 15.0)
    changed = cfg("a", env=(("X", "2"),))
    _, fx = c.apply_config(Config(models={"a": changed, "b": cfg("b"), "c": cfg("c", sleep=None)}),
                           20.0)
    assert kinds(fx) == [Stop("a", StopReason.RELOAD)]
    c.stop_finished("a", 21.0)
    assert c.cfg("a") == changed and c.phase("a") == Phase.STOPPED
    # shutdown
    c.release("c", 22.0)
    c.request("a", 23.0)
    c.stop_finished("c", 24.0)
    c.start_finished("a", 25.0, ok=True)
    c.release("a", 25.0)
    c.request("c", 26.0)
    c.sleep_finished("a", 27.0, SleepResult.SLEPT)
    fx = c.shutdown(28.0, drain=5.0)
    assert Stop("a", StopReason.SHUTDOWN) in fx


def test_a_stop_owed_during_the_sleep_is_issued_when_it_ends() -> None:
    c = core(cfg("a"), cfg("b", sleep=None))
    ready(c, "a", 0.0)
    c.request("b", 5.0)
    assert c.phase("a") == Phase.FALLING_ASLEEP
    targets, fx = c.unload("a", 5.5)
    assert targets == ["a"] and [e for e in fx if isinstance(e, Stop)] == []
    fx = c.sleep_finished("a", 6.0, SleepResult.SLEPT)
    assert Stop("a", StopReason.UNLOAD) in fx


def test_a_sleeper_that_crashes_is_collected_as_a_crash() -> None:
    c = core(cfg("a"), cfg("b", sleep=None))
    ready(c, "a", 0.0)
    asleep_by_swap(c, "a", "b", 5.0)
    fx = c.engine_exited("a", 9.0, "exited with code -9")
    assert kinds(fx) == [Stop("a", StopReason.CRASH)]


def test_a_router_may_stop_a_sleeper_to_make_room() -> None:
    """Sleepers are stopped when a router says their memory is needed (the memory router's
    last resort, oldest sleeper first): the core stops them, never wakes them."""

    def router(p: RouteQuery) -> RouteAnswer:
        return tuple(v.id for v in p.models.values()
                     if v.id != p.target and (v.running or v.phase == Phase.SLEEPING))

    c = core(cfg("a"), cfg("b"), cfg("c", sleep=None))
    c.router = router
    ready(c, "a", 0.0)
    c.request("b", 5.0)
    c.sleep_finished("a", 6.0, SleepResult.SLEPT)
    c.start_finished("b", 7.0, ok=True)
    c.release("b", 8.0)
    _, fx = c.request("c", 9.0)
    assert Stop("a", StopReason.SWAP) in fx and Sleep("b", StopReason.SWAP) in fx
    c.sleep_finished("b", 10.0, SleepResult.SLEPT)
    fx = c.stop_finished("a", 11.0)
    assert [e.model for e in fx if isinstance(e, Start)] == ["c"]


def test_admin_sleep_refusals() -> None:
    c = core(cfg("a"), cfg("n", sleep=None))
    why, fx = c.sleep("a", 0.0)
    assert "not ready" in (why or "") and fx == []
    why, _ = c.sleep("n", 0.0)
    assert "cannot sleep" in (why or "")
    why, _ = c.sleep("zz", 0.0)
    assert "not configured" in (why or "")


def test_never_two_awake_gpu_tenants_across_a_run_of_swaps() -> None:
    """A, B, A, B … with both sleepy: after every event at most one model is awake or
    being woken/started, apart from the one falling asleep that the next waits for."""
    c = core(cfg("a"), cfg("b"))
    ready(c, "a", 0.0)
    now = 1.0
    for target, other in [("b", "a"), ("a", "b")] * 3:
        now += 1
        t, fx = c.request(target, now)
        assert c.phase(other) == Phase.FALLING_ASLEEP
        fx = c.sleep_finished(other, now + 0.1, SleepResult.SLEPT)
        assert awake_gpu(c) == [target]
        done = [e for e in fx if isinstance(e, Start | Wake)]
        finished = (c.start_finished if isinstance(done[0], Start) else c.wake_finished)(
            target, now + 0.2, ok=True)
        assert grants(finished) == [t]
        c.release(target, now + 0.3)


# -- placement: sleepers are stopped last, oldest first, only when memory is needed -------

GiB = 1024**3


def test_memory_placement_stops_sleepers_only_when_the_target_cannot_fit_otherwise() -> None:
    from swapd.placement.by_memory import Room, Tenant, TenantPhase, place

    room = Room(available=20 * GiB, total=128 * GiB, reserve=8 * GiB)
    sleepers = [
        Tenant("old", TenantPhase.SLEEPING, footprint=60 * GiB, used=4 * GiB, last_used=1.0),
        Tenant("new", TenantPhase.SLEEPING, footprint=60 * GiB, used=4 * GiB, last_used=2.0),
    ]
    idle = Tenant("idle", TenantPhase.READY, footprint=30 * GiB, used=30 * GiB, last_used=3.0)
    # Fits beside everyone: nothing stopped.
    assert place("t", 10 * GiB, [*sleepers, idle], room).evict == ()
    # Needs the idle engine: the sleepers stay.
    assert place("t", 30 * GiB, [*sleepers, idle], room).evict == ("idle",)
    # Needs more: then the oldest sleeper, and no more than needed.
    assert place("t", 45 * GiB, [*sleepers, idle], room).evict == ("idle", "old")


def test_the_groups_router_gains_the_sleepers_a_start_needs_stopped() -> None:
    from swapd.memory.meminfo import MemInfo
    from swapd.placement.by_memory import with_sleepers
    from swapd.placement.groups import groups_router

    class Readings:
        available = 20 * GiB

        def meminfo(self) -> MemInfo:
            return MemInfo(total=128 * GiB, available=self.available)

        def footprint(self, cfg: ModelConfig) -> int | None:
            return {"big": 30 * GiB}.get(cfg.id, 1 * GiB)

        def used(self, model: str) -> int | None:
            return 6 * GiB

    config = Config(models={m.id: m for m in (cfg("a"), cfg("b"), cfg("big"))},
                    memory_reserve=0)
    c = Core(config, with_sleepers(groups_router, Readings(), config))
    ready(c, "a", 0.0)
    c.request("b", 1.0)
    c.sleep_finished("a", 2.0, SleepResult.SLEPT)
    c.start_finished("b", 3.0, ok=True)
    c.release("b", 3.5)
    # 20 GiB free + b's 6 GiB (swapped out) < 30 GiB: the sleeper a is stopped too.
    _, fx = c.request("big", 4.0)
    assert Stop("a", StopReason.SWAP) in fx and Sleep("b", StopReason.SWAP) in fx


# -- the memory check (swapd.memory.sleep): pure parts ------------------------------------


def test_freed_reads_the_tree_where_its_memory_shows_else_memavailable() -> None:
    from swapd.memory.sleep import Before, freed, min_freed

    # CPU host: the tree held the ballast in its RSS; other processes' churn is ignored.
    before = Before(available=10 * GiB, tree=5 * GiB)
    assert freed(before, available=9 * GiB, tree=1 * GiB, need=2 * GiB) == 4 * GiB
    # GB10: CUDA memory is in no RSS (the tree held less than must come back): MemAvailable.
    before = Before(available=10 * GiB, tree=3 * GiB)
    assert freed(before, available=50 * GiB, tree=3 * GiB, need=20 * GiB) == 40 * GiB
    assert freed(Before(None, None), None, None, need=1) == 0
    # sleepMinFreed: a size, else its percent of the footprint, else of the tree before.
    assert min_freed(GiB, 50.0, 80 * GiB, before) == GiB
    assert min_freed(None, 50.0, 80 * GiB, before) == 40 * GiB
    assert min_freed(None, 50.0, None, before) == int(1.5 * GiB)


def test_sleep_verdicts_are_kept_per_recipe(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from swapd.memory.sleep import SleepVerdicts

    a = cfg("a")
    SleepVerdicts(tmp_path).remember(a, "sleep freed 0B of the 1.0GiB sleepMinFreed asks")
    kept = SleepVerdicts(tmp_path)  # a restart
    assert kept.off(a) == "sleep freed 0B of the 1.0GiB sleepMinFreed asks"
    assert kept.off(cfg("a", env=(("X", "1"),))) is None  # another recipe
    assert SleepVerdicts(None).off(a) is None
    (tmp_path / "sleep.json").write_text("{not json")
    assert SleepVerdicts(tmp_path).off(a) is None  # a cache: unreadable means try again


def test_before_a_footprint_is_learned_the_run_measured_so_far_is_the_base() -> None:
    """On a GB10 the first sleep comes before any stop taught a footprint: 50 % of the
    tree's RSS (a few GB of Python) would be judged by the tree, which CUDA memory is not
    in; the run's MemAvailable drop to readiness is the base instead."""
    from swapd.memory.footprints import FootprintStore, Learner

    learner = Learner(FootprintStore(None))
    learner.unified = True
    assert learner.measured("a") is None
    learner.spawned("a", available=100 * GiB)
    learner.observed("a", 5 * GiB)  # the tree's RSS
    learner.became_ready("a", available=40 * GiB)  # CUDA took 60 GiB
    assert learner.measured("a") == 60 * GiB

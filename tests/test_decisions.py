"""The scheduler's decisions as plain sequences of events: no processes, no clock, no
sleeps. Each test feeds `swapd.core.Core` what happened and checks the effects it asks
for: the rules a user notices (who is served, who is started or stopped, who is refused
and for how long)."""

from __future__ import annotations

import dataclasses

import pytest

from swapd.config.types import Config, GroupConfig, RestartPolicy
from swapd.placement.groups import groups_router
from swapd.placement.types import Queued, RouteQuery, Wait
from swapd.schedule.core import Core, Fail, Forget, Grant, Refusal, Start
from swapd.schedule.phase import Phase, StopReason
from tests.support.core import cfg, core, fails, grants, kinds, ready, starts, stops, timer

# -- serving -----------------------------------------------------------------------------


def test_cold_request_starts_the_engine_and_is_granted_when_ready() -> None:
    c = core(cfg("a"))
    t, fx = c.request("a", 0.0)
    assert kinds(fx) == [Start("a", cfg("a"))]
    assert c.phase("a") == Phase.STARTING
    fx = c.start_finished("a", 2.0, ok=True)
    assert kinds(fx) == [Grant(t, "a")]
    assert c.phase("a") == Phase.READY


def test_ready_model_is_granted_at_once_and_touches_no_engine() -> None:
    c = core(cfg("a"))
    ready(c, "a", 0.0)
    t, fx = c.request("a", 5.0)
    assert kinds(fx) == [Grant(t, "a")]
    assert c.view("a").inflight == 1  # type: ignore[union-attr]
    assert kinds(c.release("a", 6.0)) == []
    assert c.view("a").inflight == 0  # type: ignore[union-attr]


def test_requests_queued_for_a_loading_model_are_served_together() -> None:
    """Batching: every request that queued while the engine loaded is granted at once."""
    c = core(cfg("a"))
    tickets = [c.request("a", 0.1 * i)[0] for i in range(5)]
    fx = c.start_finished("a", 2.0, ok=True)
    assert grants(fx) == tickets
    assert c.view("a").inflight == 5  # type: ignore[union-attr]


def test_interleaved_requests_for_two_models_swap_once_each_way() -> None:
    """Batching across a swap: queued a, b, a, b … costs two swaps, not one per request."""
    c = core(cfg("a"), cfg("b"))
    ready(c, "a", 0.0)
    t_hold, _ = c.request("a", 2.0)  # in flight on a
    queued = [c.request(m, 2.1 + i * 0.01) for i, m in enumerate(["b", "a", "b", "a"])]
    b_tickets = [queued[0][0], queued[2][0]]
    a_tickets = [queued[1][0], queued[3][0]]
    # a's new requests wait: a is the swap's victim (llama-swap #612).
    assert all(grants(fx) == [] for _, fx in queued)
    fx = c.release("a", 3.0)
    assert stops(fx) == [("a", StopReason.SWAP)]
    fx = c.stop_finished("a", 3.5)
    assert kinds(fx) == [Start("b", cfg("b"), after=("a",))]
    fx = c.start_finished("b", 4.0, ok=True)
    assert grants(fx) == b_tickets
    c.release("b", 4.5)
    fx = c.release("b", 4.6)
    assert stops(fx) == [("b", StopReason.SWAP)]
    fx = c.stop_finished("b", 5.0)
    assert starts(fx) == ["a"]
    assert grants(c.start_finished("a", 6.0, ok=True)) == a_tickets
    assert t_hold not in a_tickets


def test_steady_tenant_traffic_does_not_starve_a_waiting_model() -> None:
    """llama-swap #612: requests for the tenant keep coming while another model waits."""
    c = core(cfg("a"), cfg("b"))
    ready(c, "a", 0.0)
    held = [c.request("a", 1.0)[0] for _ in range(2)]
    assert len(held) == 2
    tb, _ = c.request("b", 1.5)
    late = []
    for i in range(20):  # a's clients keep asking
        t, fx = c.request("a", 2.0 + i)
        assert grants(fx) == []
        late.append(t)
    c.release("a", 3.0)
    fx = c.release("a", 3.1)  # the last one in flight ends: a stops at once
    assert stops(fx) == [("a", StopReason.SWAP)]
    assert starts(c.stop_finished("a", 4.0)) == ["b"]
    assert grants(c.start_finished("b", 5.0, ok=True)) == [tb]
    assert stops(c.release("b", 6.0)) == [("b", StopReason.SWAP)]
    assert starts(c.stop_finished("b", 6.5)) == ["a"]
    assert grants(c.start_finished("a", 7.0, ok=True)) == late  # together, in order


def test_b_is_served_before_the_tenant_gets_its_engine_back() -> None:
    c = core(cfg("a"), cfg("b"))
    ready(c, "a", 0.0)
    tb, _ = c.request("b", 1.0)
    ta, _ = c.request("a", 1.1)
    fx = c.stop_finished("a", 2.0)  # (a had nothing in flight: stopped at once)
    assert starts(fx) == ["b"]
    fx = c.start_finished("b", 3.0, ok=True)
    assert grants(fx) == [tb]
    fx = c.release("b", 4.0)
    assert stops(fx) == [("b", StopReason.SWAP)]
    assert starts(c.stop_finished("b", 4.5)) == ["a"]
    assert grants(c.start_finished("a", 5.0, ok=True)) == [ta]


def test_first_queued_request_picks_the_next_swap() -> None:
    """Fairness: the order of arrival decides which cold model comes next."""
    c = core(cfg("a"), cfg("b"), cfg("c"))
    ready(c, "a", 0.0)
    _t_hold, _ = c.request("a", 1.0)
    tc, _ = c.request("c", 1.1)
    _tb, _ = c.request("b", 1.2)
    c.release("a", 2.0)
    fx = c.stop_finished("a", 2.5)
    assert starts(fx) == ["c"]
    assert grants(c.start_finished("c", 3.0, ok=True)) == [tc]


def test_requests_queued_while_the_victim_loaded_are_served_by_it_first() -> None:
    """They were there before the swap was decided."""
    c = core(cfg("a"), cfg("b"))
    ta, fx = c.request("a", 0.0)
    assert starts(fx) == ["a"]
    _tb, fx = c.request("b", 0.5)  # decides the swap while a still loads
    assert starts(fx) == []
    fx = c.start_finished("a", 1.0, ok=True)
    assert grants(fx) == [ta]
    fx = c.release("a", 2.0)
    assert stops(fx) == [("a", StopReason.SWAP)]
    assert starts(c.stop_finished("a", 2.5)) == ["b"]


def test_gpu_false_model_neither_evicts_nor_is_evicted() -> None:
    c = core(cfg("a"), cfg("emb", gpu=False))
    ready(c, "a", 0.0)
    _t, fx = c.request("emb", 1.0)
    assert kinds(fx) == [Start("emb", cfg("emb", gpu=False))]
    assert c.phase("a") == Phase.READY


def test_group_without_swap_keeps_members_together() -> None:
    groups = (GroupConfig("pair", swap=False, exclusive=True, members=("a", "b")),)
    c = core(cfg("a"), cfg("b"), groups=groups)
    ready(c, "a", 0.0)
    _, fx = c.request("b", 1.0)
    assert starts(fx) == ["b"] and stops(fx) == []


def test_concurrency_limit_refuses_at_once() -> None:
    c = core(cfg("a", concurrency_limit=1))
    ready(c, "a", 0.0)
    c.request("a", 1.0)
    t, fx = c.request("a", 1.1)
    [fail] = fails(fx)
    assert fail.refusal == Refusal.CONCURRENCY and fail.ticket == t


def test_full_queue_refuses_at_once() -> None:
    c = core(cfg("a"), max_queue=2)
    c.request("a", 0.0)
    c.request("a", 0.0)
    _, fx = c.request("a", 0.0)
    assert [f.refusal for f in fails(fx)] == [Refusal.QUEUE_FULL]


def test_unknown_model_is_refused() -> None:
    c = core(cfg("a"))
    _, fx = c.request("nope", 0.0)
    assert [f.refusal for f in fails(fx)] == [Refusal.UNKNOWN_MODEL]


# -- the queue timeout and clients that leave ---------------------------------------------


def test_queue_timeout_fails_the_request_and_the_start_goes_on() -> None:
    c = core(cfg("a"), queue_timeout=10)
    t, fx = c.request("a", 0.0)
    assert timer(fx) == 10.0
    assert fails(c.tick(9.99)) == []
    fx = c.tick(10.0)
    assert [(f.ticket, f.refusal) for f in fails(fx)] == [(t, Refusal.QUEUE_TIMEOUT)]
    assert c.phase("a") == Phase.STARTING  # not abandoned
    assert grants(c.start_finished("a", 11.0, ok=True)) == []
    assert c.view("a").inflight == 0  # type: ignore[union-attr]


@pytest.mark.parametrize("grant_first", [True, False])
def test_grant_in_the_tick_of_the_queue_timeout_is_answered_once(grant_first: bool) -> None:
    """The engine becomes ready at the very instant the request times out: whichever event
    comes first wins, the other does nothing; a lease is never leaked (in-flight stays
    right, so the model can still be swapped out)."""
    c = core(cfg("a"), cfg("b"), queue_timeout=10)
    t, _ = c.request("a", 0.0)
    events = [lambda: c.start_finished("a", 10.0, ok=True), lambda: c.tick(10.0)]
    fx = [e for ev in (events if grant_first else events[::-1]) for e in ev()]
    answers = [e for e in fx if isinstance(e, Grant | Fail) and e.ticket == t]
    assert len(answers) == 1
    assert isinstance(answers[0], Grant if grant_first else Fail)
    if grant_first:
        c.release("a", 11.0)
    assert c.view("a").inflight == 0  # type: ignore[union-attr]
    _, fx = c.request("b", 12.0)  # a is idle: b may take its place
    assert stops(fx) == [("a", StopReason.SWAP)]


def test_client_that_left_is_not_granted() -> None:
    c = core(cfg("a"))
    t, _ = c.request("a", 0.0)
    t2, _ = c.request("a", 0.0)
    c.leave(t, 1.0)
    assert grants(c.start_finished("a", 2.0, ok=True)) == [t2]
    assert c.view("a").inflight == 1  # type: ignore[union-attr]


def test_waiting_model_whose_clients_all_left_does_not_swap() -> None:
    c = core(cfg("a"), cfg("b"))
    ready(c, "a", 0.0)
    c.request("a", 1.0)  # busy tenant
    tb, fx = c.request("b", 1.5)
    assert c.phase("a") == Phase.DRAINING  # the swap is decided …
    c.leave(tb, 2.0)  # … and goes on: b is started even so
    fx = c.release("a", 3.0)
    assert stops(fx) == [("a", StopReason.SWAP)]


# -- idle, unload, shutdown ---------------------------------------------------------------


def test_idle_engine_is_stopped_after_ttl_counted_from_the_last_request() -> None:
    c = core(cfg("a", ttl=30))
    _t, _ = c.request("a", 0.0)
    c.start_finished("a", 1.0, ok=True)
    assert stops(c.tick(100.0)) == []  # a request in flight is never idle (LocalAI #5221)
    fx = c.release("a", 100.0)
    assert timer(fx) == 130.0
    assert stops(c.tick(129.9)) == []
    fx = c.tick(130.0)
    assert stops(fx) == [("a", StopReason.IDLE)]


def test_request_during_idle_stop_restarts_the_engine() -> None:
    """llama-swap #946: a request arriving while a TTL unload runs must not hang."""
    c = core(cfg("a", ttl=5))
    ready(c, "a", 0.0)
    assert stops(c.tick(6.0)) == [("a", StopReason.IDLE)]
    t, fx = c.request("a", 6.1)
    assert kinds(fx) == []  # waits for the stop
    assert starts(c.stop_finished("a", 7.0)) == ["a"]
    assert grants(c.start_finished("a", 8.0, ok=True)) == [t]


def test_unload_waits_for_requests_in_flight_then_stops() -> None:
    c = core(cfg("a"), shutdown_timeout=30)
    ready(c, "a", 0.0)
    c.request("a", 1.0)
    targets, fx = c.unload(None, 2.0)
    assert targets == ["a"] and stops(fx) == []
    _t, fx = c.request("a", 2.5)  # takes no new request meanwhile
    assert grants(fx) == []
    assert stops(c.release("a", 3.0)) == [("a", StopReason.UNLOAD)]
    assert starts(c.stop_finished("a", 4.0)) == ["a"]  # the queued one brings it back


def test_unload_stops_a_busy_engine_after_the_drain_deadline() -> None:
    c = core(cfg("a"), shutdown_timeout=30)
    ready(c, "a", 0.0)
    c.request("a", 1.0)
    _, fx = c.unload("a", 2.0)
    assert timer(fx) == 32.0
    assert stops(c.tick(32.0)) == [("a", StopReason.UNLOAD)]


def test_shutdown_fails_queued_requests_and_stops_everything() -> None:
    c = core(cfg("a"), cfg("b"), cfg("emb", gpu=False))
    ready(c, "a", 0.0)
    c.request("a", 1.0)  # in flight
    te, _ = c.request("emb", 1.0)  # starting
    tb, _ = c.request("b", 1.0)  # queued: a swap to b is decided
    fx = c.shutdown(2.0, drain=10)
    assert sorted(f.ticket for f in fails(fx)) == [te, tb]
    assert {f.refusal for f in fails(fx)} == {Refusal.SHUTTING_DOWN}
    # The starts are called off; a finishes its request first (at most `drain` seconds).
    assert sorted(stops(fx)) == [("b", StopReason.SHUTDOWN), ("emb", StopReason.SHUTDOWN)]
    assert timer(fx) == 12.0
    _, fx = c.request("a", 3.0)
    assert [f.refusal for f in fails(fx)] == [Refusal.SHUTTING_DOWN]
    assert stops(c.release("a", 4.0)) == [("a", StopReason.SHUTDOWN)]


# -- failures -----------------------------------------------------------------------------


def test_start_failure_fails_every_waiter_with_the_real_backoff() -> None:
    c = core(cfg("a"))
    tickets = [c.request("a", 0.0)[0] for _ in range(3)]
    fx = c.start_finished("a", 2.0, ok=False, error="exited with code 3")
    answered = fails(fx)
    assert [f.ticket for f in answered] == tickets
    assert all(f.retry_after == 1.0 and f.refusal == Refusal.START_FAILED for f in answered)
    assert "exited with code 3" in answered[0].message


def test_model_in_backoff_is_refused_at_once_with_the_time_left_and_no_engine() -> None:
    c = core(cfg("a"), cfg("b"))
    ready(c, "b", 0.0)
    c.request("a", 10.0)
    c.stop_finished("b", 10.5)
    c.start_finished("a", 11.0, ok=False, error="boom")  # retry at 12.0
    t, fx = c.request("a", 11.25)
    assert kinds(fx) == [Fail(t, "a", Refusal.START_FAILED, fx[0].message, 0.75)]  # type: ignore[union-attr]
    assert "in backoff after 1 failure" in fails(fx)[0].message


def test_backoff_doubles_and_max_retries_marks_failed_until_backoff_max() -> None:
    restart = RestartPolicy(max_retries=3, backoff_initial=1.0, backoff_max=60.0)
    c = core(cfg("a", restart=restart))
    now = 0.0
    seen = []
    for _ in range(3):
        _, fx = c.request("a", now)
        assert starts(fx) == ["a"]
        fx = c.start_finished("a", now, ok=False, error="boom")
        seen.append(fails(fx)[0].retry_after)
        now += fails(fx)[0].retry_after or 0
    assert seen == [1.0, 2.0, 60.0]  # the third failure: failed, for backoffMax
    assert c.phase("a") == Phase.FAILED
    _, fx = c.request("a", now - 1)
    assert fails(fx)[0].retry_after == 1.0 and "is failed after 3" in fails(fx)[0].message
    _, fx = c.request("a", now)  # the cool-down is over: one more try
    assert starts(fx) == ["a"]


def test_max_retries_one_allows_one_failed_start_per_cool_down() -> None:
    restart = RestartPolicy(max_retries=1, backoff_initial=1.0, backoff_max=30.0)
    c = core(cfg("a", restart=restart))
    c.request("a", 0.0)
    c.start_finished("a", 1.0, ok=False, error="boom")
    assert c.phase("a") == Phase.FAILED
    attempts = 0
    for i in range(290):
        _, fx = c.request("a", 1.0 + i * 0.1)
        attempts += len(starts(fx))
    assert attempts == 0


def test_admin_load_clears_a_failed_model() -> None:
    c = core(cfg("a", restart=RestartPolicy(max_retries=1)))
    c.request("a", 0.0)
    c.start_finished("a", 1.0, ok=False, error="boom")
    c.clear_failure("a")
    assert c.phase("a") == Phase.STOPPED
    _, fx = c.request("a", 1.5)
    assert starts(fx) == ["a"]


def test_failed_model_does_not_evict_a_busy_tenant() -> None:
    """After its backoff, a model that failed may not stop a tenant with a request in
    flight: its requests get 503 with Retry-After at once and the tenant keeps serving."""
    c = core(cfg("crashy"), cfg("alpha"))
    c.request("crashy", 0.0)
    c.start_finished("crashy", 1.0, ok=False, error="boom")  # failures 1, retry at 2.0
    ready(c, "alpha", 1.0)
    _ta, _ = c.request("alpha", 5.0)  # in flight
    t, fx = c.request("crashy", 5.5)
    assert stops(fx) == [] and starts(fx) == []
    [fail] = fails(fx)
    assert fail.ticket == t and fail.refusal == Refusal.START_FAILED
    assert fail.retry_after == 1.0 and "not stopping busy alpha" in fail.message
    assert c.phase("alpha") == Phase.READY
    t2, fx = c.request("alpha", 5.6)  # the tenant keeps serving
    assert grants(fx) == [t2]


def test_failed_model_does_not_evict_a_tenant_with_requests_queued() -> None:
    c = core(cfg("crashy"), cfg("alpha"))
    c.request("crashy", 0.0)
    c.start_finished("crashy", 1.0, ok=False, error="boom")
    ta, fx = c.request("alpha", 5.0)  # alpha is loading, one request queued for it
    assert starts(fx) == ["alpha"]
    _, fx = c.request("crashy", 5.5)
    assert [f.refusal for f in fails(fx)] == [Refusal.START_FAILED]
    assert grants(c.start_finished("alpha", 6.0, ok=True)) == [ta]


def test_failed_model_may_evict_an_idle_tenant_after_its_backoff() -> None:
    c = core(cfg("crashy"), cfg("alpha"))
    c.request("crashy", 0.0)
    c.start_finished("crashy", 1.0, ok=False, error="boom")
    ready(c, "alpha", 1.0)
    _, fx = c.request("crashy", 5.0)
    assert stops(fx) == [("alpha", StopReason.SWAP)]
    assert starts(c.stop_finished("alpha", 5.5)) == ["crashy"]


def test_model_that_crashed_after_serving_queues_behind_a_busy_tenant() -> None:
    """The busy-tenant rule is for models that cannot start; one that ran and crashed
    waits its turn like any other once its backoff is over."""
    c = core(cfg("a"), cfg("b"))
    ready(c, "a", 0.0)
    c.engine_exited("a", 5.0, "crash")
    c.stop_finished("a", 5.0)  # backoff until 6.0
    ready(c, "b", 6.0)
    c.request("b", 8.0)  # b busy
    ta, fx = c.request("a", 8.5)
    assert fails(fx) == [] and c.phase("b") == Phase.DRAINING
    assert stops(c.release("b", 9.0)) == [("b", StopReason.SWAP)]
    assert starts(c.stop_finished("b", 9.5)) == ["a"]
    assert grants(c.start_finished("a", 10.0, ok=True)) == [ta]


def test_crash_backs_off_and_queued_requests_wait_for_the_retry() -> None:
    c = core(cfg("a"))
    ready(c, "a", 0.0)
    assert stops(c.engine_exited("a", 5.0, "crashed: code 3")) == [("a", StopReason.CRASH)]
    t, fx = c.request("a", 5.1)  # queued during the crash's stop
    fx = c.stop_finished("a", 5.2)  # it ran 4 s (< backoffMax): a loop candidate
    assert starts(fx) == [] and timer(fx) == 6.2
    _, fx = c.request("a", 5.5)  # a new one is refused: in backoff
    assert fails(fx)[0].retry_after == pytest.approx(0.7)
    fx = c.tick(6.2)
    assert starts(fx) == ["a"]
    assert grants(c.start_finished("a", 7.0, ok=True)) == [t]


def test_crash_after_a_long_healthy_run_is_a_fresh_failure() -> None:
    restart = RestartPolicy(max_retries=2, backoff_initial=1.0, backoff_max=10.0)
    c = core(cfg("a", restart=restart))
    for start in (0.0, 100.0, 200.0):
        _, _fx = c.request("a", start)
        c.start_finished("a", start + 1, ok=True)
        c.release("a", start + 1)
        c.engine_exited("a", start + 50, "crash")
        c.stop_finished("a", start + 50)
        assert c.view("a").failures == 1  # type: ignore[union-attr]
        assert c.phase("a") == Phase.STOPPED


# -- reload -------------------------------------------------------------------------------


def test_reload_keeps_an_unchanged_engine_and_retires_a_changed_one_when_idle() -> None:
    a, b = cfg("a"), cfg("b")
    groups = (GroupConfig("all", swap=False, exclusive=True, members=("a", "b")),)
    c = core(a, b, groups=groups)
    ready(c, "a", 0.0)
    ready(c, "b", 0.0)
    _tb, _ = c.request("b", 1.0)  # in flight on the old b
    b2 = dataclasses.replace(b, ttl=60)
    changes, fx = c.apply_config(Config(models={"a": a, "b": b2}, groups=groups), 2.0)
    assert changes == {"added": [], "changed": ["b"], "removed": []}
    assert kinds(fx) == []
    assert c.phase("a") == Phase.READY and c.phase("b") == Phase.DRAINING
    t2, fx = c.request("b", 2.5)  # waits for the new recipe
    assert grants(fx) == []
    assert stops(c.release("b", 3.0)) == [("b", StopReason.RELOAD)]
    fx = c.stop_finished("b", 3.5)
    assert kinds(fx) == [Start("b", b2)]
    assert grants(c.start_finished("b", 4.0, ok=True)) == [t2]


def test_reload_that_removes_a_model_stops_it_and_refuses_its_waiters() -> None:
    a, b = cfg("a"), cfg("b")
    c = core(a, b)
    ready(c, "a", 0.0)
    c.request("a", 1.0)  # in flight
    changes, fx = c.apply_config(Config(models={"b": b}), 2.0)
    assert changes["removed"] == ["a"]
    _, fx = c.request("a", 2.1)
    assert [f.refusal for f in fails(fx)] == [Refusal.UNKNOWN_MODEL]
    assert stops(c.release("a", 3.0)) == [("a", StopReason.RELOAD)]
    fx = c.stop_finished("a", 3.5)
    assert Forget("a") in fx and c.phase("a") is None


def test_reload_of_a_stopped_model_applies_at_once_and_clears_its_failures() -> None:
    a = cfg("a")
    c = core(a)
    c.request("a", 0.0)
    c.start_finished("a", 1.0, ok=False, error="boom")
    a2 = dataclasses.replace(a, cmd=("engine", "fixed"))
    c.apply_config(Config(models={"a": a2}), 1.5)
    assert c.view("a").failures == 0  # type: ignore[union-attr]
    _, fx = c.request("a", 1.6)
    assert kinds(fx) == [Start("a", a2)]


# -- the placement hooks ------------------------------------------------------------------


def test_router_wait_holds_requests_until_placement_is_asked_again() -> None:
    """Backpressure (a memory router that finds no room): nothing is started or stopped;
    placement is asked again on the next event, or at the time the router named."""
    room = {"free": False}

    def router(p: RouteQuery) -> tuple[str, ...] | Wait:
        return groups_router(p) if room["free"] else Wait("no memory", until=p.now + 0.5)

    c = Core(Config(models={"a": cfg("a"), "b": cfg("b")}), router=router)
    _, fx = c.request("a", 0.0)
    assert kinds(fx) == [] and timer(fx) == 0.5
    assert kinds(c.tick(0.5)) == []  # still no room: asked again later
    room["free"] = True
    fx = c.tick(1.0)
    assert starts(fx) == ["a"]


def test_router_sees_a_frozen_view_of_every_model() -> None:
    seen: list[RouteQuery] = []

    def router(p: RouteQuery) -> tuple[str, ...] | Wait:
        seen.append(p)
        return tuple(m for m, v in p.models.items() if v.idle and m != p.target)

    c = Core(Config(models={"a": cfg("a"), "b": cfg("b")}), router=router)
    ready(c, "a", 0.0)
    _, fx = c.request("b", 5.0)
    assert stops(fx) == [("a", StopReason.SWAP)]
    p = seen[-1]
    assert p.target == "b" and p.now == 5.0
    assert p.models["a"].phase == Phase.READY and p.models["a"].last_used == 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.models["a"].inflight = 3  # type: ignore[misc]


def test_queue_key_orders_who_is_served_first() -> None:
    """A priority order (higher first, FIFO among equals) is one sort key. A swap decided
    while its victim still serves has not begun: a higher priority arriving meanwhile goes
    first (llama-swap's fifo queues such a swap until the victim is idle); once a stop is
    under way, it is not taken back (tests/test_routing_decisions.py)."""

    def by_priority(w: Queued) -> tuple[float, ...]:
        return (-w.priority, w.seq)

    c = Core(Config(models={m: cfg(m) for m in "abcd"}), queue_key=by_priority)
    ready(c, "a", 0.0)
    c.request("a", 1.0)  # busy tenant
    tb, _ = c.request("b", 1.1)  # would be next
    c.request("c", 1.2, priority=0)
    td, _ = c.request("d", 1.3, priority=5)  # later, but higher: served before b and c
    c.release("a", 2.0)
    assert starts(c.stop_finished("a", 2.5)) == ["d"]
    assert grants(c.start_finished("d", 3.0, ok=True)) == [td]
    c.release("d", 4.0)
    assert starts(c.stop_finished("d", 4.5)) == ["b"]  # then arrival order
    assert grants(c.start_finished("b", 5.0, ok=True)) == [tb]

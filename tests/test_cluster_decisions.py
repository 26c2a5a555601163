"""Cluster holds as plain sequences of events (issue 24, docs/two-sparks.md): the peer side
of a hold in `swapd.schedule.core.Core` — no processes, no clock, no sockets."""

from __future__ import annotations

from swapd.config.types import Config
from swapd.schedule.core import Core, Refusal, Start
from swapd.schedule.phase import Phase, StopReason
from tests.support.core import cfg, core, fails, grants, starts, stops, timer

WORKER = cfg("w", cluster_worker=True)


def held(c: Core, now: float = 0.0, hold_id: str = "h1", ttl: float = 15.0) -> int:
    t, fx = c.hold("w", now, hold_id, "node1/big", ttl)
    assert starts(fx) == ["w"]
    fx = c.start_finished("w", now + 1, ok=True)
    assert grants(fx) == [t]
    return t


def test_a_request_never_starts_a_worker_and_a_hold_starts_it() -> None:
    c = core(WORKER)
    _, fx = c.request("w", 0.0)
    [f] = fails(fx)
    assert f.refusal == Refusal.UNKNOWN_MODEL and "cluster worker" in f.message
    assert c.request_ready("w", 0.0)[1] == []
    held(c)
    assert c.phase("w") == Phase.READY
    [view] = c.holds(1.0)
    assert (view.holder, view.state, view.expires_in) == ("node1/big", "held", 15.0)
    # a ready, held worker still serves no request
    assert fails(c.request("w", 2.0)[1])[0].refusal == Refusal.UNKNOWN_MODEL


def test_a_hold_for_a_non_worker_or_held_worker_is_refused() -> None:
    c = core(WORKER, cfg("a"))
    assert fails(c.hold("a", 0.0, "x", "n", 5)[1])[0].refusal == Refusal.NOT_A_WORKER
    assert fails(c.hold("nope", 0.0, "x", "n", 5)[1])[0].refusal == Refusal.UNKNOWN_MODEL
    held(c)
    [f] = fails(c.hold("w", 2.0, "h2", "intruder", 5)[1])
    assert f.refusal == Refusal.HOLD_CONFLICT and "node1/big" in f.message
    assert c.phase("a") == Phase.STOPPED


def test_a_hold_evicts_the_tenant_by_this_nodes_rules() -> None:
    c = core(WORKER, cfg("a"))
    c.request("a", 0.0)
    c.start_finished("a", 1.0, ok=True)
    th, fx = c.hold("w", 2.0, "h1", "node1/big", 15)
    assert starts(fx) == [] and grants(fx) == []  # `a` still serves its request
    fx = c.release("a", 3.0)
    assert stops(fx) == [("a", StopReason.SWAP)]
    fx = c.stop_finished("a", 4.0)
    assert [(e.model, e.after) for e in fx if isinstance(e, Start)] == [("w", ("a",))]
    assert grants(c.start_finished("w", 5.0, ok=True)) == [th]


def test_held_means_held_a_local_request_waits_and_times_out_naming_the_holder() -> None:
    c = core(WORKER, cfg("a"), queue_timeout=30.0)
    held(c)
    t, fx = c.request("a", 2.0)
    assert starts(fx) == [] and stops(fx) == [] and fails(fx) == []
    assert c.phase("w") == Phase.READY
    c.renew_hold("h1", 10.0)
    c.renew_hold("h1", 20.0)
    fx = c.tick(32.0)
    [f] = fails(fx)
    assert f.ticket == t and f.refusal == Refusal.HELD
    assert "node1/big" in f.message and "h1" in f.message
    assert stops(fx) == []


def test_release_stops_the_worker_and_a_waiting_request_then_starts() -> None:
    c = core(WORKER, cfg("a"))
    held(c)
    c.request("a", 2.0)
    hold, fx = c.unhold("h1", 3.0, "released by its holder")
    assert hold is not None and stops(fx) == [("w", StopReason.RELEASE)]
    fx = c.stop_finished("w", 4.0)
    assert starts(fx) == ["a"]
    assert c.unhold("h1", 5.0, "again")[0] is None
    assert c.hold_ended("h1") == "released by its holder"


def test_release_alone_stops_the_worker() -> None:
    c = core(WORKER)
    held(c)
    _, fx = c.unhold("h1", 3.0, "released")
    assert stops(fx) == [("w", StopReason.RELEASE)]


def test_an_unrenewed_hold_expires_after_its_ttl() -> None:
    c = core(WORKER)
    held(c, ttl=6.0)  # granted at 1.0
    _, fx = c.renew_hold("h1", 4.0)
    assert timer(fx) == 10.0
    assert stops(c.tick(9.9)) == []
    fx = c.tick(10.0)
    assert stops(fx) == [("w", StopReason.RELEASE)]
    assert "not renewed" in (c.hold_ended("h1") or "")
    assert c.renew_hold("h1", 11.0)[0] is None


def test_the_ttl_counts_from_readiness_not_while_the_worker_starts() -> None:
    c = core(WORKER)
    t, _ = c.hold("w", 0.0, "h1", "n", 2.0)
    assert stops(c.tick(50.0)) == []
    assert grants(c.start_finished("w", 60.0, ok=True)) == [t]
    assert c.holds(60.0)[0].expires_in == 2.0


def test_a_worker_that_fails_to_start_fails_the_hold_and_backs_off() -> None:
    c = core(WORKER)
    t, _ = c.hold("w", 0.0, "h1", "n", 15)
    fx = c.start_finished("w", 1.0, ok=False, error="exited with code 1")
    [f] = fails(fx)
    assert f.ticket == t and f.refusal == Refusal.START_FAILED and "code 1" in f.message
    assert c.hold_of("w") is None
    # in backoff: the next hold is refused at once
    assert fails(c.hold("w", 1.5, "h2", "n", 15)[1])[0].refusal == Refusal.START_FAILED


def test_a_worker_that_dies_ends_its_hold_with_the_reason() -> None:
    c = core(WORKER)
    held(c)
    fx = c.engine_exited("w", 5.0, "exited with code 9")
    assert stops(fx) == [("w", StopReason.CRASH)]
    assert "code 9" in (c.hold_ended("h1") or "")


def test_admin_unload_shutdown_and_guard_end_a_hold_at_once() -> None:
    for end in ("unload", "shutdown", "guard"):
        c = core(WORKER)
        held(c)
        if end == "unload":
            _, fx = c.unload("w", 3.0)
        elif end == "shutdown":
            fx = c.shutdown(3.0, drain=30.0)
        else:
            fx = c.engine_killed("w", 3.0, "MemAvailable below the floor")
            fx += c.engine_exited("w", 3.1, "killed")
        assert stops(fx), end
        assert c.hold_of("w") is None and c.hold_ended("h1"), end


def test_a_holder_that_leaves_while_the_worker_starts_stops_it_once_ready() -> None:
    c = core(WORKER)
    t, _ = c.hold("w", 0.0, "h1", "n", 15)
    _, fx = c.unhold("h1", 1.0, "the holder went away")
    assert [f.ticket for f in fails(fx)] == [t]
    fx = c.start_finished("w", 2.0, ok=True)
    assert stops(fx) == [("w", StopReason.RELEASE)]


def test_a_reload_that_changes_the_worker_ends_its_hold() -> None:
    c = core(WORKER)
    held(c)
    new = Config(models={"w": cfg("w", cluster_worker=True, env=(("X", "1"),))})
    _, fx = c.apply_config(new, 3.0)
    assert stops(fx) == [("w", StopReason.RELOAD)]
    assert "reload" in (c.hold_ended("h1") or "")

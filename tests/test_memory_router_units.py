"""Placement by measured memory (swapd/placement/by_memory.py): every rule as a table, no
processes (end to end: test_memory_router.py)."""

from __future__ import annotations

import dataclasses

import pytest

from swapd.config.sizes import GiB
from swapd.config.types import Config
from swapd.memory.meminfo import Room
from swapd.placement.by_memory import (
    MAKE_ROOM,
    RETRY,
    UNKNOWN_FOOTPRINT,
    Tenant,
    TenantPhase,
    place,
)
from swapd.placement.groups import groups_router
from swapd.placement.registry import router_for
from swapd.schedule.core import ArmTimer, Fail, Refusal, Start, Stop
from swapd.schedule.phase import StopReason
from tests.support.core import Measured, bring_up, gib_model, mem_core

R, S, X = TenantPhase.READY, TenantPhase.STARTING, TenantPhase.STOPPING

# A GB10: 128 GB MemTotal (about 119 GiB), 8 GiB kept for the OS.
SPARK = dict(total=119 * GiB, reserve=8 * GiB)


def room(available_gib: float) -> Room:
    return Room(available=int(available_gib * GiB), **SPARK)


def t(model: str, phase: TenantPhase = R, used: float | None = None, footprint: float | None = None,
      inflight: int = 0, queued: int = 0, last_used: float = 0.0,
      persistent: bool = False) -> Tenant:
    return Tenant(
        model=model, phase=phase,
        footprint=None if footprint is None else int(footprint * GiB),
        used=None if used is None else int(used * GiB),
        inflight=inflight, queued=queued, last_used=last_used, persistent=persistent,
    )


CASES = [
    # (name, target need GiB, tenants, MemAvailable GiB, expected evict, wait?, never?)
    ("empty machine: the brain fits", 70, [], 110, (), False, False),
    ("sprinter beside the brain", 16, [t("brain", used=70, footprint=70)], 40, (), False, False),
    ("exactly at the reserve", 16, [], 24, (), False, False),
    ("one byte over: the idle one goes", 16.001, [t("a", used=20, last_used=5)], 24,
     ("a",), False, False),
    ("least recently used goes first",
     30, [t("new", used=20, last_used=9), t("old", used=20, last_used=1)], 20,
     ("old",), False, False),
    ("as many as it takes, oldest first",
     50, [t("a", used=20, last_used=1), t("b", used=20, last_used=2),
          t("c", used=20, last_used=3)], 20,
     ("a", "b"), False, False),
    ("busy in flight: never evicted; the idle one goes",
     30, [t("busy", used=40, inflight=1, last_used=0), t("idle", used=25, last_used=5)], 20,
     ("idle",), False, False),
    ("queued for it counts as busy",
     30, [t("q", used=40, queued=2, last_used=0), t("idle", used=25, last_used=5)], 20,
     ("idle",), False, False),
    ("persistent group members stay", 30, [t("p", used=40, persistent=True)], 20, (), True, False),
    ("only busy tenants: wait, stop nothing", 30, [t("busy", used=40, inflight=3)], 20,
     (), True, False),
    ("stopping them all would not do: stop none",
     60, [t("idle", used=10), t("busy", used=40, inflight=1)], 20, (), True, False),
    ("a starting engine's remaining growth is counted",
     20, [t("loading", S, used=10, footprint=70)], 80, (), True, False),
    ("a starting engine near its footprint leaves room",
     20, [t("loading", S, used=65, footprint=70)], 40, (), False, False),
    ("a starting engine of unknown size: wait for it", 1, [t("loading", S, used=1)], 100,
     (), True, False),
    ("memory coming back from a stop: wait, stop nothing more",
     30, [t("going", X, used=30), t("idle", used=30)], 20, (), True, False),
    ("bigger than the machine", 200, [], 110, (), False, True),
    ("a starting engine is never evicted", 30, [t("loading", S, used=5, footprint=10)], 20,
     (), True, False),
    ("not measured yet: its footprint counts as what it gives back",
     30, [t("fresh", used=None, footprint=25, last_used=1)], 20, ("fresh",), False, False),
]


@pytest.mark.parametrize(("name", "need", "tenants", "avail", "evict", "wait", "never"), CASES,
                         ids=[c[0] for c in CASES])
def test_place(name: str, need: float, tenants: list[Tenant], avail: float,
               evict: tuple[str, ...], wait: bool, never: bool) -> None:
    got = place("target", int(need * GiB), tenants, room(avail))
    assert got.evict == evict
    assert (got.wait is not None) == wait, got
    assert (got.never is not None) == never, got
    assert got.start == (not wait and not never)


def test_stopping_tenants_are_named_as_releasing() -> None:
    got = place("target", 30 * GiB, [t("going", X, used=30), t("idle", used=30)], room(20))
    assert got.releasing == ("going",) and got.evict == ()
    assert got.wait == "target fits once going gave back its memory"


def test_unknown_footprint_stops_every_idle_engine_like_one_tenant() -> None:
    tenants = [t("b", used=10, last_used=2), t("a", used=10, last_used=1),
               t("busy", used=10, inflight=1), t("p", used=10, persistent=True)]
    got = place("target", None, tenants, room(100))
    assert got.evict == ("a", "b")
    assert got.reason == UNKNOWN_FOOTPRINT and got.start


def test_known_footprint_reason_is_make_room() -> None:
    got = place("target", 30 * GiB, [t("a", used=30)], room(20))
    assert got.evict == ("a",) and got.reason == MAKE_ROOM


def test_the_target_itself_is_not_a_tenant() -> None:
    # A retry for a model whose old engine is still listed must not evict itself.
    got = place("target", 30 * GiB, [t("target", used=30)], room(20))
    assert got.evict == () and got.wait is not None


def test_wait_message_names_the_numbers_and_who_holds_memory() -> None:
    got = place("big", 60 * GiB, [t("busy", used=40, inflight=1)], room(20))
    assert got.wait is not None
    assert "big needs 60.0GiB" in got.wait and "busy" in got.wait and "8.0GiB reserve" in got.wait


def test_never_message_names_the_machine() -> None:
    got = place("huge", 200 * GiB, [], room(110))
    assert got.never is not None and "200GiB" in got.never and "119GiB MemTotal" in got.never


# -- the memory router inside the scheduler's core (events in, effects out) ---------------


def test_core_places_the_brain_and_the_sprinter_side_by_side() -> None:
    source = Measured(available_gib=118)
    c = mem_core(source, gib_model("brain", 70), gib_model("sprinter", 16))
    bring_up(c, source, "brain", 0, 70)
    bring_up(c, source, "sprinter", 10, 16)
    assert c.running_gpu() == ["brain", "sprinter"]


def test_core_a_start_counts_what_a_loading_engine_still_takes() -> None:
    source = Measured(available_gib=118)
    c = mem_core(source, gib_model("brain", 70), gib_model("coder", 45))
    c.request("brain", 0)  # starting, holds nothing yet: 70 GiB to come
    _, fx = c.request("coder", 1)  # 45 > 118 - 8 - 70: must wait, nothing to stop
    assert not [e for e in fx if isinstance(e, Start | Stop)]
    source.use["brain"] = 70 * GiB
    source.available -= 70 * GiB
    fx = c.start_finished("brain", 2, ok=True)  # brain ready: 40 GiB left, coder still waits
    assert [e.model for e in fx if isinstance(e, Start)] == []


def test_core_stops_the_least_recently_used_idle_engine_and_counts_it() -> None:
    source = Measured(available_gib=118)
    evicted: list[tuple[str, str]] = []
    c = mem_core(source, gib_model("a", 40), gib_model("b", 40), gib_model("c", 40),
                 evicted=evicted)
    bring_up(c, source, "a", 0, 40)
    bring_up(c, source, "b", 10, 40)
    _, fx = c.request("c", 20)  # 38 - 8 = 30 < 40: a (used longest ago) goes
    assert [(e.model, e.reason) for e in fx if isinstance(e, Stop)] == [("a", StopReason.SWAP)]
    assert evicted == [("a", "make_room")]
    source.available += 40 * GiB
    fx = c.stop_finished("a", 21)
    start = [e for e in fx if isinstance(e, Start)]
    assert [(e.model, e.after) for e in start] == [("c", ("a",))]


def test_core_never_stops_a_busy_engine_and_waits_with_a_retry_time() -> None:
    source = Measured(available_gib=118)
    c = mem_core(source, gib_model("a", 40), gib_model("b", 40), gib_model("c", 40))
    bring_up(c, source, "a", 0, 40)
    bring_up(c, source, "b", 10, 40)
    c.request("a", 15)  # a busy again (granted, in flight)
    c.request("b", 16)  # b busy too
    _, fx = c.request("c", 20)
    assert not [e for e in fx if isinstance(e, Stop | Start)]
    assert any(isinstance(e, ArmTimer) and e.at is not None and e.at <= 20 + RETRY
               for e in fx)  # MemAvailable has no event: asked again soon
    fx = c.release("b", 30)  # b idle now: it goes, a (busy) stays
    assert [e.model for e in fx if isinstance(e, Stop)] == ["b"]


def test_core_refuses_at_once_what_can_never_fit() -> None:
    source = Measured(available_gib=118)
    c = mem_core(source, gib_model("huge", 200))
    _, fx = c.request("huge", 0)
    fail = [e for e in fx if isinstance(e, Fail)]
    assert [f.refusal for f in fail] == [Refusal.WONT_FIT]
    assert "200GiB" in fail[0].message and fail[0].retry_after is None


def test_core_unknown_footprint_stops_every_idle_engine() -> None:
    source = Measured(available_gib=118)
    evicted: list[tuple[str, str]] = []
    c = mem_core(source, gib_model("a", 10), gib_model("b", 10), gib_model("new", None),
                 evicted=evicted)
    bring_up(c, source, "a", 0, 10)
    bring_up(c, source, "b", 5, 10)
    _, fx = c.request("new", 10)
    assert sorted(e.model for e in fx if isinstance(e, Stop)) == ["a", "b"]
    assert sorted(evicted) == [("a", "unknown_footprint"), ("b", "unknown_footprint")]


def test_core_falls_back_to_one_tenant_when_memory_cannot_be_read() -> None:
    source = Measured(available_gib=118)
    c = mem_core(source, gib_model("a", 10), gib_model("b", 10))
    bring_up(c, source, "a", 0, 10)
    source.fail = True
    _, fx = c.request("b", 5)
    assert [e.model for e in fx if isinstance(e, Stop)] == ["a"]


def test_core_gpu_false_helpers_are_never_stopped_and_start_beside_anything() -> None:
    source = Measured(available_gib=20)
    helper = dataclasses.replace(gib_model("helper", 4), gpu=False)
    c = mem_core(source, gib_model("a", 4), helper, gib_model("big", 7))
    bring_up(c, source, "helper", 0, 4)
    bring_up(c, source, "a", 5, 4)
    _, fx = c.request("big", 10)  # 12 - 8 = 4 < 7: only a may go, not the older helper
    assert [e.model for e in fx if isinstance(e, Stop)] == ["a"]
    source.available = 9 * GiB  # below the reserve: a CPU helper still starts
    c2 = mem_core(source, dataclasses.replace(helper, id="h2"))
    _, fx = c2.request("h2", 0)
    assert [e.model for e in fx if isinstance(e, Start)] == ["h2"]


def test_the_default_router_is_unchanged_without_use_memory() -> None:
    config = Config(models={"a": gib_model("a", 1), "b": gib_model("b", 1)})
    assert router_for(config, Measured(118)) is groups_router

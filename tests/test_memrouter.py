"""Placement by measured memory (swapd/memrouter.py): every rule as a table, no processes."""

from __future__ import annotations

import pytest

from swapd.memory import GiB, MiB
from swapd.memrouter import (
    MAKE_ROOM,
    UNKNOWN_FOOTPRINT,
    Phase,
    Placement,
    Room,
    Tenant,
    place,
    released,
)

R, S, X = Phase.READY, Phase.STARTING, Phase.STOPPING

# A GB10: 128 GB MemTotal (about 119 GiB), 8 GiB kept for the OS.
SPARK = dict(total=119 * GiB, reserve=8 * GiB)


def room(available_gib: float) -> Room:
    return Room(available=int(available_gib * GiB), **SPARK)


def t(model: str, phase: Phase = R, used: float | None = None, footprint: float | None = None,
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
     30, [t("going", X, used=30), t("idle", used=30)], 20, (), False, False),
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
    assert got == Placement(releasing=("going",))


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


RELEASE = [
    # (name, freed, expected, need, available, baseline, rising, released?)
    ("own memory back", 30 * GiB, 30 * GiB, None, 40 * GiB, None, None, True),
    ("own memory back within slack", 30 * GiB - 50 * MiB, 30 * GiB, None, 40 * GiB, None, None,
     True),
    ("not back, still rising, next does not fit", 10 * GiB, 30 * GiB, 50 * GiB, 40 * GiB, None,
     5 * GiB, False),
    ("not back, next unknown, still rising", 10 * GiB, 30 * GiB, None, 40 * GiB, None, GiB,
     False),
    ("not back, but stopped rising: someone else took the rest", 10 * GiB, 30 * GiB, None,
     40 * GiB, None, 10 * MiB, True),
    ("just stopped: no plateau measured yet", 0, 30 * GiB, None, 40 * GiB, None, None, False),
    ("not back, but the next fits anyway (something else allocated meanwhile)",
     10 * GiB, 30 * GiB, 16 * GiB, 40 * GiB, None, GiB, True),
    ("never measured, next unknown: the old baseline rule, met",
     0, None, None, 99 * GiB, 100 * GiB, None, True),
    ("never measured, next unknown: the old baseline rule, not met, still rising",
     0, None, None, 90 * GiB, 100 * GiB, GiB, False),
    ("never measured, next unknown: the old rule not met, but no longer rising",
     0, None, None, 90 * GiB, 100 * GiB, 0, True),
    ("nothing known at all: do not wait", 0, None, None, 10 * GiB, None, None, True),
    ("never measured, next known and fits", 0, None, 16 * GiB, 40 * GiB, 100 * GiB, None, True),
    ("never measured, next known, does not fit, rising", 0, None, 50 * GiB, 40 * GiB, None, GiB,
     False),
]


@pytest.mark.parametrize(("name", "freed", "expected", "need", "avail", "baseline", "rising",
                          "ok"), RELEASE, ids=[c[0] for c in RELEASE])
def test_released(name: str, freed: int, expected: int | None, need: int | None, avail: int,
                  baseline: int | None, rising: int | None, ok: bool) -> None:
    r = Room(available=avail, **SPARK)
    assert released(freed=freed, expected=expected, need=need, room=r, baseline=baseline,
                    rising=rising) is ok


def test_released_counts_what_starting_engines_will_take() -> None:
    r = Room(available=40 * GiB, **SPARK)
    assert released(freed=0, expected=30 * GiB, need=16 * GiB, room=r, to_come=0)
    assert not released(freed=0, expected=30 * GiB, need=16 * GiB, room=r, to_come=20 * GiB)

"""`swappable: false` (llama-swap #1127) as pure decisions: a request for another model
never stops such a model; an unload, its ttl and the memory guard still do. No processes,
no clock."""

from __future__ import annotations

import dataclasses

from swapd.config.sizes import GiB
from swapd.config.types import GroupConfig
from swapd.schedule.core import Fail, Refusal, Start, Stop
from swapd.schedule.phase import Phase, StopReason
from tests.support.core import (
    Measured,
    bring_up,
    cfg,
    core,
    fails,
    gib_model,
    grants,
    mem_core,
    ready,
    starts,
    stops,
)


def test_a_request_for_another_model_is_refused_at_once_and_the_model_keeps_running() -> None:
    c = core(cfg("big", swappable=False), cfg("small"))
    ready(c, "big", 0.0)
    t, fx = c.request("small", 5.0)
    assert stops(fx) == [] and starts(fx) == []
    (fail,) = fails(fx)
    assert (fail.ticket, fail.refusal, fail.retry_after) == (t, Refusal.NOT_SWAPPABLE, None)
    assert "swappable: false" in fail.message and "big" in fail.message
    assert c.phase("big") == Phase.READY
    # The model itself is served as ever.
    t, fx = c.request("big", 6.0)
    assert grants(fx) == [t]


def test_it_is_never_chosen_while_starting_either() -> None:
    c = core(cfg("big", swappable=False), cfg("small"))
    c.request("big", 0.0)  # starting
    _, fx = c.request("small", 1.0)
    assert [f.refusal for f in fails(fx)] == [Refusal.NOT_SWAPPABLE]
    assert c.phase("big") == Phase.STARTING


def test_unload_and_ttl_still_stop_it_and_then_the_other_starts() -> None:
    c = core(cfg("big", swappable=False, ttl=60.0), cfg("small"))
    ready(c, "big", 0.0)
    _, fx = c.unload("big", 10.0)
    assert stops(fx) == [("big", StopReason.UNLOAD)]
    c.stop_finished("big", 11.0)
    _, fx = c.request("small", 12.0)
    assert starts(fx) == ["small"]
    c2 = core(cfg("big", swappable=False, ttl=60.0))
    ready(c2, "big", 0.0)
    fx = c2.tick(62.0)
    assert stops(fx) == [("big", StopReason.IDLE)]


def test_a_swappable_model_beside_it_is_swapped_as_usual() -> None:
    """Only a start that would stop the pinned model is refused: in a group that lets the
    pinned one run beside others, they swap among themselves."""
    groups = (GroupConfig("pinned", swap=False, exclusive=False, persistent=True,
                          members=("big",)),
              GroupConfig("rest", swap=True, exclusive=False, members=("a", "b")))
    c = core(cfg("big", swappable=False), cfg("a"), cfg("b"), groups=groups)
    ready(c, "big", 0.0)
    ready(c, "a", 1.0)
    _, fx = c.request("b", 5.0)
    assert fails(fx) == []
    assert stops(fx) == [("a", StopReason.SWAP)]


def test_the_memory_router_makes_room_around_it() -> None:
    source = Measured(available_gib=118)
    c = mem_core(source, dataclasses.replace(gib_model("big", 60), swappable=False),
                 gib_model("a", 40), gib_model("b", 40))
    bring_up(c, source, "big", 0, 60)  # used longer ago than a, but not swappable
    bring_up(c, source, "a", 10, 40)
    _, fx = c.request("b", 20)
    assert [(e.model, e.reason) for e in fx if isinstance(e, Stop)] == [("a", StopReason.SWAP)]
    assert not [e for e in fx if isinstance(e, Fail | Start)]
    assert source.available == 18 * GiB

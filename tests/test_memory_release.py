"""When a stopped engine's memory is back (swapd/memory/release.py): the rule as a table."""

from __future__ import annotations

import pytest

from swapd.config.sizes import GiB, MiB
from swapd.memory.meminfo import Room
from swapd.memory.release import released

# A GB10: 128 GB MemTotal (about 119 GiB), 8 GiB kept for the OS.
SPARK = dict(total=119 * GiB, reserve=8 * GiB)


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

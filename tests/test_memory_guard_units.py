"""The memory guard's decisions (swapd/memory/guard.py) as tables, and its loop with a fake
meminfo: no processes (end to end: test_memory_guard.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path

import pytest

from swapd.config.sizes import Floor, GiB, MiB
from swapd.engines.procgroup import Tree
from swapd.memory.guard import (
    FAST_INTERVAL,
    MIN_GROWTH,
    SLOW_INTERVAL,
    GrowthWindow,
    GuardEvent,
    MemoryGuard,
    Suspect,
    Verdict,
    Watched,
    decide,
    fall_rate,
    next_interval,
)
from swapd.memory.meminfo import MemReader
from tests.support import wait_until_async

FLOOR = 2 * GiB


@pytest.mark.parametrize(("available", "suspects", "verdict"), [
    (3 * GiB, [Suspect("a", True, 5 * GiB)], Verdict()),  # above the floor: nothing
    (FLOOR, [Suspect("a", True, 5 * GiB)], Verdict()),  # at the floor: nothing
    # Starting engine: it goes, even when another grew more.
    (GiB, [Suspect("loading", True, 0), Suspect("big", False, 9 * GiB)],
     Verdict(kill="loading", why="starting")),
    # Two starting: the one that grew most.
    (GiB, [Suspect("a", True, GiB), Suspect("b", True, 3 * GiB)],
     Verdict(kill="b", why="starting")),
    # None starting: the one that grew most in the window.
    (GiB, [Suspect("a", False, GiB), Suspect("b", False, 3 * GiB), Suspect("c", False, 0)],
     Verdict(kill="b", why="grew")),
    # Growth below the noise threshold is nobody's fault: a warning only.
    (GiB, [Suspect("a", False, MIN_GROWTH - 1)], Verdict(warn=True)),
    (GiB, [], Verdict(warn=True)),
])
def test_decide(available: int, suspects: list[Suspect], verdict: Verdict) -> None:
    assert decide(available, FLOOR, suspects) == verdict


@pytest.mark.parametrize(("available", "falling", "starting", "interval"), [
    (50 * GiB, 0.0, True, FAST_INTERVAL),  # an engine starts: ≥ 10 reads a second
    (50 * GiB, 0.0, False, SLOW_INTERVAL),  # nothing moves: once a second
    (50 * GiB, -GiB, False, SLOW_INTERVAL),  # rising
    (50 * GiB, 1 * GiB, False, SLOW_INTERVAL),  # 48 s from the floor
    (8 * GiB, 1 * GiB, False, 1.0),  # 6 s from the floor
    (6 * GiB, 1 * GiB, False, 1.0),  # 4 s from the floor
    (5 * GiB, 2 * GiB, False, 0.375),  # 1.5 s from the floor: read at a quarter of it
    (4 * GiB - 1, 0.0, False, FAST_INTERVAL),  # within the floor's size of it: fast anyway
    (2 * GiB + 50 * MiB, 1 * GiB, False, FAST_INTERVAL),  # about to cross
    (GiB, 0.0, False, FAST_INTERVAL),  # below: keep watching closely
])
def test_next_interval(available: int, falling: float, starting: bool, interval: float) -> None:
    assert next_interval(available, FLOOR, falling, starting) == pytest.approx(interval)


def test_fall_rate_sees_through_flat_readings_between_allocation_steps() -> None:
    # 40 MiB every 100 ms, read every 25 ms: most reads see no change since the one before.
    readings = [(0.0, 10 * GiB), (0.025, 10 * GiB), (0.05, 10 * GiB - 40 * MiB),
                (0.075, 10 * GiB - 40 * MiB), (0.1, 10 * GiB - 40 * MiB)]
    assert fall_rate(readings) == pytest.approx(40 * MiB / 0.1)
    assert fall_rate([(0.0, GiB), (1.0, 2 * GiB)]) < 0  # rising
    assert fall_rate([(0.0, GiB)]) == 0.0


def test_growth_window() -> None:
    w = GrowthWindow(window=10.0)
    w.add("a", 0.0, 5 * GiB)
    w.add("a", 5.0, 4 * GiB)
    w.add("a", 9.0, 7 * GiB)
    assert w.grown("a") == 3 * GiB  # from its lowest point in the window
    w.add("a", 16.0, 7 * GiB)  # the 4 GiB low left the window at t=15
    assert w.grown("a") == 0
    assert w.grown("never-seen") == 0
    w.keep(["b"])
    assert w.grown("a") == 0


MEMINFO = "MemTotal: {total} kB\nMemFree: 1 kB\nMemAvailable: {avail} kB\n"


class Rig:
    """A guard over a meminfo file the test writes, engines the test lists."""

    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "meminfo"
        self.set(avail=50 * GiB)
        self.watched: list[Watched] = []
        self.usage: dict[str, int] = {}
        self.killed: list[tuple[str, GuardEvent]] = []
        self.guard = MemoryGuard(
            floor=lambda: Floor(bytes=FLOOR),
            watched=lambda: self.watched,
            usage=self.read_usage,
            kill=self.kill,
            reader=MemReader(str(self.path)),
        )

    def set(self, avail: int) -> None:
        self.path.write_text(MEMINFO.format(total=64 * GiB // 1024, avail=avail // 1024))

    def read_usage(self, groups: Mapping[str, Tree]) -> Mapping[str, int]:
        return {m: self.usage.get(m, 0) for m in groups}

    def kill(self, model: str, event: GuardEvent) -> bool:
        self.killed.append((model, event))
        return True


def test_guard_kills_the_starting_engine_once(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.watched = [Watched("loading", Tree(100, 0), True), Watched("serving", Tree(200, 0), False)]
    assert rig.guard.check() == FAST_INTERVAL
    rig.set(avail=GiB)
    rig.guard.check()
    assert [m for m, _ in rig.killed] == ["loading"]
    event = rig.killed[0][1]
    assert "'loading'" in event.message() and "1.0GiB" in event.message()
    assert "2.0GiB" in event.message()
    rig.guard.check()  # still below, the kill not finished: no second kill
    assert len(rig.killed) == 1
    rig.watched = [Watched("serving", Tree(200, 0), False)]
    rig.guard.check()  # gone: judged afresh; "serving" did not grow: a warning only
    rig.guard.check()
    assert len(rig.killed) == 1
    assert [e.model for e in rig.guard.events()] == ["loading", None]


def test_guard_blames_growth_seen_in_a_fresh_read(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.watched = [Watched("a", Tree(100, 0), False), Watched("b", Tree(200, 0), False)]
    rig.guard.sampled({"a": GiB, "b": GiB})  # the sampler's last view, before the growth
    rig.usage = {"a": GiB, "b": 3 * GiB}
    rig.set(avail=GiB)
    rig.guard.check()
    assert [m for m, _ in rig.killed] == ["b"]
    assert rig.killed[0][1].why == "grew"


def test_guard_never_kills_for_outside_pressure(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.watched = [Watched("a", Tree(100, 0), False)]
    rig.usage = {"a": GiB}
    rig.guard.sampled({"a": GiB})
    rig.set(avail=GiB)
    for _ in range(5):
        rig.guard.check()
    assert rig.killed == []
    assert [e.model for e in rig.guard.events()] == [None]  # one warning, not five


def test_guard_disabled_only_reads(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.guard = MemoryGuard(floor=lambda: Floor(bytes=FLOOR), watched=lambda: rig.watched,
                            usage=rig.read_usage, kill=rig.kill,
                            reader=MemReader(str(rig.path)), enabled=lambda: False)
    rig.watched = [Watched("loading", Tree(100, 0), True)]
    rig.set(avail=GiB)
    rig.guard.check()
    assert rig.killed == [] and rig.guard.latest() is not None


def test_guard_unreadable_meminfo_pauses_it(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.path.unlink()
    assert rig.guard.check() == SLOW_INTERVAL
    assert rig.guard.latest() is None


async def test_guard_loop_reads_fast_while_an_engine_starts(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.watched = [Watched("loading", Tree(100, 0), True)]
    rig.guard.start()
    try:
        # At 25 ms, 4 reads take 0.1 s; at the slow pace (1 s) they would take 3 s. Counted
        # by the loop's clock, so a loaded machine that runs the loop late cannot fail it.
        loop = asyncio.get_running_loop()
        t0, reads0 = loop.time(), rig.guard.reads
        await wait_until_async(lambda: rig.guard.reads >= reads0 + 4, timeout=30,
                               message="4 guard reads")
        assert loop.time() - t0 < 3 * SLOW_INTERVAL
        rig.watched = []
        await asyncio.sleep(FAST_INTERVAL * 2)  # the read that sees nothing starting
        reads = rig.guard.reads
        await asyncio.sleep(0.3)
        assert rig.guard.reads - reads <= 1  # back to once a second
    finally:
        rig.guard.stop()

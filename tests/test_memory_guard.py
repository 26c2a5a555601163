"""The memory guard end to end: real engines allocating real RAM under a real swapd.

Sizes are relative to this machine's MemAvailable when the test starts (CI: 24 GiB, shared
with other test runs): the floor is set a few hundred MiB below it, and the fake engine grows
past it. The fake engine never takes MemAvailable below 2.25 GiB (tests/fake_engine.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from swapd.config.sizes import MiB
from swapd.memory.meminfo import MemReader
from tests.support import (
    HOG,
    Swapd,
    fake_cmd,
    metric_value,
    model,
    pid_alive,
    read_records,
    wait_until,
)
from tests.support.memory import available

# Real RAM, and floors or fits measured from MemAvailable: one such test at a time (the
# real_memory fixture's lock; their xdist group too), so none moves MemAvailable under another.
pytestmark = [pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="needs Linux"),
              pytest.mark.xdist_group("real_memory"), pytest.mark.usefixtures("real_memory")]

# How far below MemAvailable-at-start the floor is; the grower goes well past it.
HEADROOM = 600 * MiB
GROW_RATE = "400"  # MiB a second
GROW_MAX = "1400"


PF_EXITING = 0x4  # include/linux/sched.h: set as the process starts exiting (do_exit)


def killed(pid: int) -> bool:
    """The process is exiting (SIGKILL taken: it runs no more of its own code) or gone.

    Not "its memory is back": the kernel frees a killed process's pages at its own pace
    (here ~300 ms for 1.2 GB on a loaded CI box; seconds for 70 GB), whoever sent the kill.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return True
    return fields[0] in ("Z", "X") or bool(int(fields[6]) & PF_EXITING)


class Watch(threading.Thread):
    """Reads MemAvailable and one pid's state every ~0.5 ms: when the floor was crossed
    (first reading below it), when the process was killed, and when it was gone."""

    def __init__(self, floor: int, pid: Callable[[], int | None]) -> None:
        super().__init__(daemon=True)
        self.floor = floor
        self._pid = pid
        self.crossed_at: float | None = None
        self.died_at: float | None = None  # killed (exiting)
        self.gone_at: float | None = None  # exited, memory given back
        self.lowest: int | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        reader = MemReader()
        pid = None
        try:
            while not self._halt.is_set():
                available = reader.read().available
                now = time.monotonic()
                self.lowest = available if self.lowest is None else min(self.lowest, available)
                if self.crossed_at is None and available < self.floor:
                    self.crossed_at = now
                pid = pid or self._pid()
                if pid is not None and self.died_at is None and killed(pid):
                    self.died_at = now
                if pid is not None and not pid_alive(pid):
                    self.gone_at = now
                    return
                time.sleep(0.0005)
        finally:
            reader.close()

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


def spawned_pid(record: Path) -> Callable[[], int | None]:
    """The pid of the engine's latest start, from its --record file (cheap to poll)."""
    def read() -> int | None:
        starts = [r["pid"] for r in read_records(record) if r["event"] == "start"]
        return starts[-1] if starts else None
    return read


def pid_of(daemon: Swapd, name: str) -> int | None:
    doc = daemon.status()["models"][name]
    return doc["pid"] if doc["state"] in ("starting", "ready") else None


def keep_asking(daemon: Swapd, name: str, stop: threading.Event, codes: list[int],
                rtts: list[float] | None = None) -> None:
    """Chat with `name` until `stop`; each answer's status in `codes`, its round trip in
    `rtts` (how late swapd's loop runs on this machine now: the guard runs on it too)."""
    while not stop.is_set():
        t0 = time.monotonic()
        code, _ = daemon.post("/v1/chat/completions",
                              {"model": name, "messages": [{"role": "user", "content": "hi"}]},
                              timeout=10)
        codes.append(code)
        if rtts is not None:
            rtts.append(time.monotonic() - t0)


# The guard reads MemAvailable 40 times a second: on a quiet machine it kills within 200 ms
# of the crossing. On a loaded one its loop runs late like everything on it, so the bound
# adds the slowest round trip of requests served by the same swapd during the same window.
GUARD_BUDGET = 0.2


def guard_bound(rtts: list[float]) -> float:
    return GUARD_BUDGET + max(rtts, default=0.0)


def guarded_config(floor: int, grower: str) -> dict[str, Any]:
    return {
        "memoryGuard": {"floor": floor},
        # Both may run at once: the group router with one non-swapping group.
        "groups": {"pair": {"swap": False, "members": ["steady", "grower"]}},
        "models": {
            "steady": model(fake_cmd(name="steady")),
            "grower": model(grower, healthCheckTimeout=30),
        },
    }


def test_a_starting_engine_that_crosses_the_floor_is_killed_at_once(
    start_swapd, tmp_path: Path
) -> None:
    floor = available() - HEADROOM
    record = tmp_path / "grower.jsonl"
    grower = fake_cmd("--boot-delay", "20", "--grow-mb-per-s", GROW_RATE, "--grow-max-mb",
                      GROW_MAX, name="grower", record=record)
    daemon = start_swapd(guarded_config(floor, grower))
    assert daemon.post("/models/steady/load")[0] == 200
    steady_pid = pid_of(daemon, "steady")
    stop, codes, rtts = threading.Event(), [], []
    asker = threading.Thread(target=keep_asking, args=(daemon, "steady", stop, codes, rtts),
                             daemon=True)
    asker.start()

    watch = Watch(floor, spawned_pid(record))
    watch.start()
    t0 = time.monotonic()
    code, doc = daemon.post("/v1/chat/completions",
                            {"model": "grower", "messages": [{"role": "user", "content": "hi"}]})
    answered = time.monotonic()
    wait_until(lambda: watch.gone_at is not None or not watch.is_alive(), timeout=10,
               message="the starting engine to be gone")
    watch.stop()
    stop.set()
    asker.join(15)

    # The client waiting for the engine gets 503 memory_guard, naming model, MemAvailable, floor.
    assert code == 503, doc
    assert doc["error"]["code"] == "memory_guard"
    message = doc["error"]["message"]
    assert "'grower'" in message and "MemAvailable" in message and "floor" in message
    assert answered - t0 < 15  # long before its 20 s load would have finished
    # Killed within 200 ms of crossing the floor (plus how late this machine runs swapd now).
    assert watch.crossed_at is not None and watch.died_at is not None, (watch.crossed_at,
                                                                       watch.died_at)
    latency = watch.died_at - watch.crossed_at
    gone = (watch.gone_at or 0) - watch.crossed_at
    print(f"guard latency: killed {latency * 1000:.1f} ms, gone {gone * 1000:.1f} ms "
          "after crossing the floor")
    bound = guard_bound(rtts)
    assert latency < bound, (f"killed {latency * 1000:.0f} ms after crossing the floor "
                             f"(bound {bound * 1000:.0f} ms)")
    # Nothing else was killed; the other engine served throughout.
    assert steady_pid is not None and pid_alive(steady_pid)
    assert pid_of(daemon, "steady") == steady_pid
    assert codes and set(codes) == {200}, codes
    assert daemon.proc.poll() is None
    # Counted, shown in /status, logged.
    text = daemon.get("/metrics")[1]
    assert metric_value(text, "swapd_memory_guard_kills_total", model="grower") == 1
    assert metric_value(text, "swapd_memory_guard_kills_total", model="steady") == 0
    assert metric_value(text, "swapd_memory_available_bytes") > 0
    events = daemon.status()["memory"]["guard"]["events"]
    assert [e["model"] for e in events if e["model"]] == ["grower"]
    assert events[0]["why"] == "starting"
    wait_until(lambda: "killing engine" in daemon.log(), message="the guard's log line")


def test_a_ready_engine_that_grows_most_is_the_one_killed(start_swapd, tmp_path: Path) -> None:
    floor = available() - HEADROOM
    record = tmp_path / "grower.jsonl"
    grower = fake_cmd("--grow-after", "1", "--grow-mb-per-s", GROW_RATE, "--grow-max-mb",
                      GROW_MAX, name="grower", record=record)
    daemon = start_swapd(guarded_config(floor, grower))
    assert daemon.post("/models/steady/load")[0] == 200
    steady_pid = pid_of(daemon, "steady")
    watch = Watch(floor, spawned_pid(record))
    assert daemon.post("/models/grower/load")[0] == 200
    grower_pid = pid_of(daemon, "grower")
    watch.start()
    stop, codes, rtts = threading.Event(), [], []
    asker = threading.Thread(target=keep_asking, args=(daemon, "steady", stop, codes, rtts),
                             daemon=True)
    asker.start()
    try:
        wait_until(lambda: watch.gone_at is not None, timeout=15,
                   message="the growing engine to be killed")
    finally:
        watch.stop()
        stop.set()
        asker.join(15)
    assert grower_pid is not None and not pid_alive(grower_pid)
    assert watch.crossed_at is not None and watch.died_at is not None
    latency = watch.died_at - watch.crossed_at
    gone = (watch.gone_at or 0) - watch.crossed_at
    print(f"guard latency (ready engine): killed {latency * 1000:.1f} ms, gone "
          f"{gone * 1000:.1f} ms after crossing the floor")
    bound = guard_bound(rtts)
    assert latency < bound, (f"killed {latency * 1000:.0f} ms after crossing the floor "
                             f"(bound {bound * 1000:.0f} ms)")
    assert steady_pid is not None and pid_alive(steady_pid)
    assert codes and set(codes) == {200}, codes
    events = daemon.status()["memory"]["guard"]["events"]
    assert [(e["model"], e["why"]) for e in events if e["model"]] == [("grower", "grew")]
    wait_until(lambda: "engine killed by the memory guard" in daemon.log(),
               message="the kill logged as what it was")


def test_pressure_from_outside_the_engines_is_only_a_warning(start_swapd) -> None:
    daemon = start_swapd({
        "memoryGuard": {"floor": "1GiB"},
        "models": {"steady": model(fake_cmd(name="steady"))},
    })
    assert daemon.post("/models/steady/load")[0] == 200
    steady_pid = pid_of(daemon, "steady")
    hog = subprocess.Popen([sys.executable, "-c", HOG, str(300 * MiB)], stdout=subprocess.PIPE)
    try:
        assert hog.stdout is not None and hog.stdout.readline().strip() == b"holding"
        # Raise the floor above what is available now (a reload, so that no engine is
        # starting): the box is "short" while no engine grew.
        config = yaml.safe_load(daemon.config_path.read_text())
        config["memoryGuard"]["floor"] = available() + 512 * MiB
        daemon.config_path.write_text(yaml.safe_dump(config))
        daemon.signal(signal.SIGHUP)
        wait_until(lambda: any(e["model"] is None for e in
                               daemon.status()["memory"]["guard"]["events"]),
                   timeout=10, message="the guard's warning")
        assert hog.poll() is None  # never kills a process that is not an engine
        assert steady_pid is not None and pid_alive(steady_pid)
        assert daemon.post("/v1/chat/completions",
                           {"model": "steady", "messages": []})[0] == 200
        assert "no engine to blame" in daemon.log()
        assert metric_value(daemon.get("/metrics")[1], "swapd_memory_guard_kills_total",
                            model="steady") == 0
    finally:
        hog.kill()
        hog.wait()

"""The memory router end to end under a real swapd: side by side, LRU eviction, never a busy
engine, backpressure, and a learned footprint used on the next start.

Engines are fake engines that allocate real RAM (`--alloc-mb`, pages touched). The machine is
shared with other test runs, so each decision is forced by setting the reserve (a reload) just
before it, from MemAvailable at that moment: the target misses the room by half an engine and
fits once one idle engine is stopped, so a few hundred MB of noise cannot flip it.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from swapd.config.sizes import MiB
from tests.support import (
    Swapd,
    fake_cmd,
    metric_value,
    model,
    pid_alive,
    read_records,
    wait_until,
)
from tests.support.memory import available, chat

# Real RAM, and floors or fits measured from MemAvailable: one such test at a time (the
# real_memory fixture's lock; their xdist group too), so none moves MemAvailable under another.
pytestmark = [pytest.mark.xdist_group("real_memory"), pytest.mark.usefixtures("real_memory")]

# -- the memory router ---------------------------------------------------------------------

ALLOC_MB = 400  # what each engine really holds (plus ~35 MiB of interpreter)


def reload_with(daemon: Swapd, change: Any) -> None:
    """Rewrite the config with `change(config)` applied, SIGHUP, wait for the reload."""
    config = yaml.safe_load(daemon.config_path.read_text())
    change(config)
    daemon.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    before = daemon.log().count('"config reloaded"')
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: daemon.log().count('"config reloaded"') > before, timeout=10,
               message="the reload")


def squeeze(daemon: Swapd, target: str) -> None:
    """Set the reserve so that `target` misses the room by half an engine, and fits once one
    idle engine is stopped: the decision cannot flip on a few hundred MB of noise from other
    processes on the machine."""
    used = measured_engines(daemon)
    one = min(used.values())
    need = yaml.safe_load(daemon.config_path.read_text())["models"][target]["memory"]

    def change(config: dict[str, Any]) -> None:
        config["routing"]["router"]["settings"]["memory"]["reserve"] = (
            available() - need + one // 2)
    reload_with(daemon, change)


def measured_engines(daemon: Swapd) -> dict[str, int]:
    def ready() -> dict[str, int] | None:
        models = daemon.status()["models"]
        running = {m: d["memory"]["used"] for m, d in models.items() if d["state"] == "ready"}
        if running and all(v is not None and v >= ALLOC_MB * MiB for v in running.values()):
            return running
        return None
    return dict(wait_until(ready, timeout=10, interval=0.1, message="engines measured"))


def running(daemon: Swapd) -> set[str]:
    return {m for m, d in daemon.status()["models"].items() if d["state"] == "ready"}


def memory_config(tmp_path: Path) -> dict[str, Any]:
    def engine(name: str, need_mib: int) -> dict[str, Any]:
        return model(fake_cmd("--alloc-mb", str(ALLOC_MB), name=name,
                              record=tmp_path / "records.jsonl"),
                     memory=need_mib * MiB, memoryReleaseTimeout=10)
    return {
        "routing": {"router": {"use": "memory",
                               "settings": {"memory": {"reserve": 256 * MiB}}}},
        "models": {"a": engine("a", 600), "b": engine("b", 600), "c": engine("c", 600)},
    }


def test_memory_router_side_by_side_lru_and_never_a_busy_engine(start_swapd,
                                                                tmp_path: Path) -> None:
    daemon = start_swapd(memory_config(tmp_path))
    # Two that fit run side by side.
    assert chat(daemon, "a")[0] == 200
    assert chat(daemon, "b")[0] == 200
    assert running(daemon) == {"a", "b"}
    pid_a = daemon.status()["models"]["a"]["pid"]

    # A third that does not fit: the least recently used idle engine (a) goes, b stays.
    squeeze(daemon, "c")
    assert chat(daemon, "c")[0] == 200
    assert running(daemon) == {"b", "c"}
    assert not pid_alive(pid_a)
    text = daemon.get("/metrics")[1]
    assert metric_value(text, "swapd_placement_evictions_total", model="a",
                        reason="make_room") == 1

    # b busy (a request in flight), c idle though used more recently: c goes, never b.
    pid_b = daemon.status()["models"]["b"]["pid"]
    done: list[int] = []
    slow = threading.Thread(target=lambda: done.append(
        daemon.post("/upstream/b/slow?seconds=6", {}, timeout=30)[0]))
    slow.start()
    wait_until(lambda: daemon.status()["models"]["b"]["inflight"] == 1,
               message="b's request in flight")
    squeeze(daemon, "a")
    assert chat(daemon, "a")[0] == 200
    assert running(daemon) == {"a", "b"}
    assert pid_alive(pid_b) and not done  # b's request still running, b never stopped
    slow.join(30)
    assert done == [200]
    text = daemon.get("/metrics")[1]
    assert metric_value(text, "swapd_placement_evictions_total", model="c",
                        reason="make_room") == 1
    assert metric_value(text, "swapd_placement_evictions_total", model="b",
                        reason="make_room") == 0


def test_memory_router_waits_while_only_busy_engines_hold_the_room(start_swapd,
                                                                   tmp_path: Path) -> None:
    config = memory_config(tmp_path)
    del config["models"]["c"]
    daemon = start_swapd(config)
    assert chat(daemon, "a")[0] == 200
    pid_a = daemon.status()["models"]["a"]["pid"]
    done: list[int] = []
    slow = threading.Thread(target=lambda: done.append(
        daemon.post("/upstream/a/slow?seconds=3", {}, timeout=30)[0]))
    slow.start()
    wait_until(lambda: daemon.status()["models"]["a"]["inflight"] == 1,
               message="a's request in flight")
    squeeze(daemon, "b")
    t0 = time.monotonic()
    code, _ = chat(daemon, "b")  # waits (backpressure) until a is idle, then a goes
    waited = time.monotonic() - t0
    slow.join(30)
    assert code == 200 and done == [200]
    # b started only after a's request ended: the engines' own records say so.
    records = read_records(tmp_path / "records.jsonl")
    b_start = next(r["t"] for r in records if r["event"] == "start" and r["model"] == "b")
    a_exit = next(r["t"] for r in records if r["event"] == "exit" and r["pid"] == pid_a)
    assert a_exit <= b_start
    assert waited > 0
    assert running(daemon) == {"b"}


def test_a_learned_footprint_lets_the_next_start_go_beside(start_swapd,
                                                           tmp_path: Path) -> None:
    config = memory_config(tmp_path)
    del config["models"]["c"]
    del config["models"]["b"]["memory"]  # b: unknown until it has run once
    daemon = start_swapd(config)
    assert chat(daemon, "a")[0] == 200
    # Unknown footprint: one tenant's rule, every idle engine stops first.
    assert chat(daemon, "b")[0] == 200
    assert running(daemon) == {"b"}
    text = daemon.get("/metrics")[1]
    assert metric_value(text, "swapd_placement_evictions_total", model="a",
                        reason="unknown_footprint") == 1
    measured_engines(daemon)
    assert daemon.post("/models/b/unload")[0] == 200
    learned = daemon.status()["models"]["b"]["memory"]
    assert learned["footprint_source"] == "learned" and learned["footprint"] >= ALLOC_MB * MiB
    # Next time b's size is known: it starts beside a.
    assert chat(daemon, "a")[0] == 200
    assert chat(daemon, "b")[0] == 200
    assert running(daemon) == {"a", "b"}

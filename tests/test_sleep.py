"""Warm swaps end to end (issue 20): a real swapd, real engine processes (the fake engine with
vLLM's sleep API), and memory that really moves: the stand-in's ballast (`--alloc-mb`, every
page touched) is what its sleep frees and its wake takes back.

Timing comparisons are against a reference taken in the same test (the cold start of the
same engine), never against a fixed figure: CI shares two cores.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from swapd.config.sizes import MiB
from tests.support import Swapd, fake_cmd, http, metric_value, model, read_records, wait_until

# Real RAM, and floors or fits measured from MemAvailable: one such test at a time (the
# real_memory fixture's lock; their xdist group too), so none moves MemAvailable under another.
pytestmark = [pytest.mark.xdist_group("real_memory"), pytest.mark.usefixtures("real_memory")]

BALLAST_MB = 240
# The cold start pays this (a model read from disk); a wake does not.
BOOT = "1.5"


def sleepy(name: str, record: Path, *flags: str, **extra: Any) -> dict[str, Any]:
    """A recipe with `engine: vllm` and `sleepMode: enable`: the preset's level 2 calls."""
    return model(fake_cmd("--alloc-mb", str(BALLAST_MB), "--boot-delay", BOOT, *flags,
                          record=record, name=name),
                 engine="vllm", sleepMode="enable", healthCheckTimeout=60, **extra)


def chat(daemon: Swapd, name: str, timeout: float = 90) -> tuple[int, Any]:
    return daemon.post("/v1/chat/completions",
                       {"model": name, "messages": [{"role": "user", "content": "hi"}]},
                       timeout=timeout)


def timed_chat(daemon: Swapd, name: str) -> tuple[float, Any]:
    t0 = time.monotonic()
    code, doc = chat(daemon, name)
    elapsed = time.monotonic() - t0
    assert code == 200, doc
    return elapsed, doc


def rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def state(daemon: Swapd, name: str) -> str:
    return str(daemon.status()["models"][name]["state"])


def a_asleep(start_swapd: Any, tmp_path: Path, *flags: str, **extra: Any) -> tuple[Swapd, int]:
    """swapd with a sleepy `a` (the stand-in's `flags`, the recipe's `extra`) and a plain
    `b`; `a` served once, then put to sleep by a swap to `b`. The daemon and a's pid."""
    record = tmp_path / "events.jsonl"
    daemon = start_swapd({"models": {
        "a": sleepy("a", record, *flags, **extra),
        "b": model(fake_cmd(record=record, name="b")),
    }})
    _, doc = timed_chat(daemon, "a")
    timed_chat(daemon, "b")
    assert state(daemon, "a") == "sleeping"
    return daemon, int(doc["x_pid"])


def awake_intervals(records: list[dict[str, Any]], name: str) -> list[tuple[float, float]]:
    """When `name`'s engine held its memory and could serve: from its start (or a wake) to
    its sleep (or exit)."""
    out, since = [], None
    for r in records:
        if r["model"] != name:
            continue
        if r["event"] in ("start", "wake") and since is None:
            since = r["t"]
        elif r["event"] in ("sleep", "exit") and since is not None:
            out.append((since, r["t"]))
            since = None
    if since is not None:
        out.append((since, float("inf")))
    return out


def test_a_sleeps_on_a_swap_and_wakes_faster_than_it_starts(start_swapd, tmp_path: Path) -> None:
    record = tmp_path / "events.jsonl"
    daemon = start_swapd({"models": {
        "a": sleepy("a", record),
        "b": model(fake_cmd(record=record, name="b")),
    }})
    cold, doc = timed_chat(daemon, "a")
    pid = doc["x_pid"]
    held = rss(pid)
    assert held >= BALLAST_MB * MiB

    # A swap to b puts a to sleep: same process, its ballast given back, b serves.
    _, doc_b = timed_chat(daemon, "b")
    assert doc_b["x_served_by"] == "b"
    assert state(daemon, "a") == "sleeping"
    status = daemon.status()
    assert status["models"]["a"]["pid"] == pid and status["tenant"] == ["b"]
    assert status["models"]["a"]["sleep"] == {"off": None}
    assert rss(pid) <= held - (BALLAST_MB * MiB) * 0.8
    running = {r["model"]: r["state"] for r in daemon.get("/running")[1]["running"]}
    assert running == {"a": "sleeping", "b": "ready"}
    listed = {m["id"]: m["state"] for m in daemon.get("/v1/models")[1]["data"]}
    assert listed["a"] == "sleeping"

    # A request for a wakes it: the same pid, the memory back, faster than its cold start.
    warm, doc = timed_chat(daemon, "a")
    assert doc["x_pid"] == pid
    assert rss(pid) >= BALLAST_MB * MiB
    assert warm < cold, f"wake {warm:.2f}s, cold start {cold:.2f}s"
    assert state(daemon, "b") == "stopped"  # b cannot sleep: stopped as always

    # Never two awake GPU tenants: a's and b's awake intervals do not overlap.
    records = read_records(record)
    a_awake, b_awake = awake_intervals(records, "a"), awake_intervals(records, "b")
    assert len(a_awake) == 2 and len(b_awake) == 1
    for a0, a1 in a_awake:
        for b0, b1 in b_awake:
            assert a1 <= b0 or b1 <= a0, (a_awake, b_awake)

    _, text = daemon.get("/metrics")
    assert metric_value(text, "swapd_engine_sleeps_total", model="a", result="slept") == 1
    assert metric_value(text, "swapd_engine_wakes_total", model="a", result="woken") == 1
    assert metric_value(text, "swapd_engine_wake_seconds_count", model="a") == 1
    assert metric_value(text, "swapd_engine_sleeps_total", model="a",
                        result="no_memory_freed") == 0
    assert metric_value(text, "swapd_engine_state", model="a", state="ready") == 1
    assert daemon.stop() == 0
    wait_until(lambda: not psutil.pid_exists(pid), timeout=10, message="a's engine gone")


def test_a_sleep_that_frees_nothing_is_stopped_and_remembered(start_swapd,
                                                              tmp_path: Path) -> None:
    record = tmp_path / "events.jsonl"
    config = {"models": {
        "a": sleepy("a", record, "--sleep-frees-nothing", sleepTimeout=1.5),
        "b": model(fake_cmd(record=record, name="b")),
    }}
    daemon = start_swapd(config)
    _, doc = timed_chat(daemon, "a")
    pid = doc["x_pid"]
    timed_chat(daemon, "b")
    # It said yes (200) and freed nothing: stopped as before, and sleep is off for it.
    wait_until(lambda: not psutil.pid_exists(pid), timeout=10, message="a stopped")
    info = daemon.status()["models"]["a"]
    assert info["state"] == "stopped"
    assert "sleepMinFreed" in (info["sleep"]["off"] or ""), info
    assert any(r["event"] == "sleep" for r in read_records(record))
    _, text = daemon.get("/metrics")
    assert metric_value(text, "swapd_engine_sleeps_total", model="a",
                        result="no_memory_freed") == 1
    assert "sleep freed too little" in daemon.log()
    # Next time it is simply stopped on a swap: no sleep call is made.
    timed_chat(daemon, "a")
    timed_chat(daemon, "b")
    assert sum(r["event"] == "sleep" for r in read_records(record)) == 1
    assert state(daemon, "a") == "stopped"
    # Remembered across a restart (stateDir/sleep.json), for this recipe only.
    off = daemon.status()["models"]["a"]["sleep"]["off"]
    assert daemon.stop() == 0
    again = start_swapd(config)
    assert again.status()["models"]["a"]["sleep"]["off"] == off


@pytest.mark.parametrize("failure", ["--wake-crash", "--wake-fail"])
def test_a_wake_that_crashes_is_cold_started_and_the_request_answered(
        start_swapd, tmp_path: Path, failure: str) -> None:
    """--wake-crash: the engine dies in wake_up; --wake-fail: wake_up answers 500 and the
    engine stays up, half-woken: swapd kills its whole tree either way."""
    daemon, pid = a_asleep(start_swapd, tmp_path, failure)
    # vLLM #50011: wake_up kills the engine. The client still gets its answer, from a
    # fresh engine; no process of the old tree is left.
    _, doc = timed_chat(daemon, "a")
    assert doc["x_pid"] != pid
    assert not psutil.pid_exists(pid)
    _, text = daemon.get("/metrics")
    assert metric_value(text, "swapd_engine_wakes_total", model="a", result="failed") == 1
    assert metric_value(text, "swapd_engine_starts_total", model="a", result="success") == 2
    assert "engine wake failed: cold start" in daemon.log()
    # One failed wake: sleep stays on (two turn it off, tests/test_sleep_decisions.py).
    assert daemon.status()["models"]["a"]["sleep"] == {"off": None}


def test_an_operator_puts_a_model_to_sleep_by_hand(start_swapd, tmp_path: Path) -> None:
    record = tmp_path / "events.jsonl"
    daemon = start_swapd({"models": {
        "a": sleepy("a", record),
        "n": model(fake_cmd(name="n"), gpu=False),
    }})
    _, doc = timed_chat(daemon, "a")
    # The same gate as /models/{id}/unload: a foreign page cannot do it.
    code, answer = http("POST", daemon.url + "/models/a/sleep",
                        headers={"Origin": "http://attacker.example"})
    assert code == 403 and answer["error"]["code"] == "cross_origin_forbidden"
    assert state(daemon, "a") == "ready"
    code, answer = daemon.post("/models/a/sleep")
    assert code == 200 and answer["state"] == "sleeping", answer
    assert daemon.status()["tenant"] == []
    # A model whose recipe does not enable sleep: refused, nothing touched.
    timed_chat(daemon, "n")
    code, answer = daemon.post("/models/n/sleep")
    assert code == 409 and answer["error"]["code"] == "cannot_sleep", answer
    assert state(daemon, "n") == "ready"
    # Unload stops a sleeper.
    code, answer = daemon.post("/models/a/unload")
    assert code == 200 and answer["unloaded"] == ["a"]
    wait_until(lambda: not psutil.pid_exists(doc["x_pid"]), timeout=10, message="a gone")
    assert state(daemon, "a") == "stopped"


def test_a_slow_wake_is_waited_for_past_sleep_timeout(start_swapd, tmp_path: Path) -> None:
    """A wake reloads weights (minutes from disk on a Spark): its calls are bounded by
    healthCheckTimeout, not by the sleepTimeout meant for giving memory back."""
    daemon, pid = a_asleep(start_swapd, tmp_path, "--wake-delay", "2", sleepTimeout=1)
    waited, doc = timed_chat(daemon, "a")
    assert doc["x_pid"] == pid and waited >= 2
    _, text = daemon.get("/metrics")
    assert metric_value(text, "swapd_engine_wakes_total", model="a", result="woken") == 1

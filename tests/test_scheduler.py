"""The scheduler in-process, with real fake-engine processes: tenancy, batching,
fairness, idle eviction races, crash backoff and reload."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from swapd.config.types import Config, GroupConfig, ModelConfig, RestartPolicy
from swapd.schedule.runner import QueueTimeout, Scheduler, StartFailed
from tests.support import FAKE_ENGINE, free_port, pid_alive, read_records
from tests.support import wait_until_async as until


def fake(name: str, *flags: str, record: Path | None = None, **kw: object) -> ModelConfig:
    port = free_port()
    cmd = [sys.executable, str(FAKE_ENGINE), "--port", str(port), "--model-name", name, *flags]
    if record is not None:
        cmd += ["--record", str(record)]
    return ModelConfig(
        id=name,
        cmd=tuple(cmd),
        proxy=f"http://127.0.0.1:{port}",
        health_check_timeout=20,
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
async def make():  # type: ignore[no-untyped-def]
    made: list[Scheduler] = []

    def build(*models: ModelConfig, clock: Any = time.monotonic, **kw: object) -> Scheduler:
        sched = Scheduler(Config(models={m.id: m for m in models}, **kw),  # type: ignore[arg-type]
                          clock=clock)
        made.append(sched)
        return sched

    yield build
    for sched in made:
        await sched.close(drain=0)


def intervals(records: list[dict[str, object]]) -> list[tuple[float, float, str]]:
    out = []
    for s in records:
        if s["event"] != "start":
            continue
        end = next(
            (e["t"] for e in records if e["event"] == "exit" and e["pid"] == s["pid"]), None
        )
        assert end is not None, f"no exit record for {s}"
        out.append((float(s["t"]), float(end), str(s["model"])))  # type: ignore[arg-type]
    return sorted(out)


async def test_interleaved_requests_batch_per_model_and_never_overlap(make, tmp_path):
    rec = tmp_path / "rec.jsonl"
    sched = make(fake("a", record=rec), fake("b", record=rec))
    order = ["a", "b"] * 10

    async def one(model: str) -> str:
        async with sched.lease(model) as lease:
            await asyncio.sleep(0.01)
            return lease.model

    assert await asyncio.gather(*(one(m) for m in order)) == order
    await sched.unload()
    spans = intervals(read_records(rec))
    for (_, end, m1), (start, _, m2) in itertools.pairwise(spans):
        assert end <= start, f"{m1} and {m2} overlapped"
    assert len(spans) == 2, f"20 queued requests for 2 models caused {len(spans)} starts"


async def test_waiting_model_is_not_starved_by_steady_tenant_traffic(make):
    """llama-swap #612: requests for the tenant keep coming; the other model still gets in."""
    sched = make(fake("a"), fake("b"))
    await sched.load("a")
    stop = asyncio.Event()
    events: list[str] = []

    async def hammer() -> None:
        while not stop.is_set():
            async with sched.lease("a"):
                events.append("a")
                await asyncio.sleep(0.02)

    hammers = [asyncio.create_task(hammer()) for _ in range(4)]
    await until(lambda: events.count("a") >= 8, message="steady traffic to a")
    events.append("b asked")
    async with sched.lease("b"):
        assert sched.view("b").state == "ready"  # type: ignore[union-attr]
        events.append("b served")
    await until(lambda: events[-1] == "a", message="a served again after b")
    stop.set()
    await asyncio.gather(*hammers)
    # Once b is waiting, the tenant takes no new request until b has been served:
    # the requests in flight finish, the next ones queue behind b.
    asked, served = events.index("b asked"), events.index("b served")
    assert served == asked + 1, events[asked:served + 1]


async def test_request_during_idle_stop_restarts_the_engine(make):
    """llama-swap #946: a request arriving while a TTL unload runs must not hang."""
    sched = make(fake("a", "--exit-on-sigterm-delay", "0.3", ttl=0.2))
    first_pid = (await sched.load("a")).pid
    await until(lambda: sched.view("a").state == "stopping")  # type: ignore[union-attr]
    async with sched.lease("a"):
        view = sched.view("a")
        assert view is not None and view.state == "ready"
        assert view.pid != first_pid
    assert not pid_alive(first_pid)  # type: ignore[arg-type]


async def test_ttl_counts_from_end_of_last_request():
    # The scheduler's clock jumps a second while the request is in flight: a request longer
    # than the ttl, without waiting one out (a tick during it is tests/test_decisions.py's).
    offset = [0.0]
    sched = Scheduler(Config(models={"a": fake("a", ttl=0.3)}),
                      clock=lambda: time.monotonic() + offset[0])
    try:
        async with sched.lease("a"):
            offset[0] += 1.0
            assert sched.view("a").state == "ready"  # type: ignore[union-attr]
        t_end = time.monotonic()
        await until(lambda: sched.view("a").state == "stopped")  # type: ignore[union-attr]
        assert time.monotonic() - t_end >= 0.3
    finally:
        await sched.close(drain=0)


async def test_crash_loop_backs_off_then_fails_then_recovers(make, tmp_path):
    rec = tmp_path / "rec.jsonl"
    restart = RestartPolicy(max_retries=2, backoff_initial=0.3, backoff_max=0.6)
    # The backoff is waited out by moving the scheduler's clock, not by sleeping.
    offset = [0.0]
    sched = make(fake("a", "--crash-after", "0", record=rec, restart=restart), fake("b"),
                 clock=lambda: time.monotonic() + offset[0])

    def starts() -> int:
        return sum(1 for r in read_records(rec) if r["event"] == "start")

    with pytest.raises(StartFailed, match="exited with code 3"):
        await sched.load("a")
    def time_left() -> float:
        view = sched.view("a")
        assert view is not None and view.next_retry_at is not None
        return view.next_retry_at - time.time()

    # In backoff: refused at once, with the time left in the message, and no engine started.
    with pytest.raises(StartFailed, match=r"in backoff after 1 failure.*"
                       r"next start in 1s at the earliest") as err:
        await sched.load("a")
    assert err.value.headers.get("x-should-retry") == "false"  # a client fails at once
    left = time_left()
    assert 0 < left <= 0.3
    assert starts() == 1
    offset[0] += left + 0.01
    with pytest.raises(StartFailed, match="exited with code 3"):  # second failure: failed
        await sched.load("a")
    view = sched.view("a")
    assert view is not None and view.state == "failed" and view.failures == 2
    assert view.next_retry_at is not None and "exited with code 3" in (view.last_error or "")
    with pytest.raises(StartFailed, match=r"is failed after 2.*next start in 1s at the earliest"):
        await sched.load("a")
    assert 0.3 < time_left() <= 0.6
    assert starts() == 2
    # The failed model never blocks another.
    assert (await sched.load("b")).state == "ready"
    # A changed recipe starts with a clean slate.
    good = dataclasses.replace(fake("a"), restart=restart)
    sched.apply_config(Config(models={"a": good, "b": sched.config.models["b"]}))
    assert (await sched.load("a")).state == "ready"


async def test_queue_timeout(make):
    sched = make(fake("a", "--boot-delay", "2"), queue_timeout=0.3)
    with pytest.raises(QueueTimeout):
        await sched.load("a")


async def test_reload_keeps_unchanged_engine_and_replaces_changed_one(make):
    a, b = fake("a"), fake("b", ttl=0)
    groups = (GroupConfig("all", swap=False, exclusive=True, members=("a", "b")),)
    sched = make(a, b, groups=groups)
    ea = await sched.load("a")
    eb = await sched.load("b")
    pid_a, pid_b = ea.pid, eb.pid
    b2 = dataclasses.replace(b, ttl=60)
    changes = sched.apply_config(Config(models={"a": a, "b": b2}, groups=groups))
    assert changes["changed"] == ["b"] and not changes["added"]
    await until(lambda: not pid_alive(pid_b))  # type: ignore[arg-type]
    assert sched.view("a").pid == pid_a and pid_alive(pid_a)  # type: ignore[union-attr,arg-type]
    eb2 = await sched.load("b")
    assert eb2.cfg.ttl == 60 and eb2.pid != pid_b
    changes = sched.apply_config(Config(models={"a": a}, groups=groups))
    assert changes["removed"] == ["b"]
    await until(lambda: sched.view("b") is None)
    assert not pid_alive(eb2.pid)  # type: ignore[arg-type]


async def test_shutdown_stops_a_starting_engine(make):
    sched = make(fake("a", "--boot-delay", "5", "--spawn-grandchild"))
    task = asyncio.create_task(sched.load("a"))
    await until(lambda: sched.view("a").pid is not None)  # type: ignore[union-attr]
    pid = sched.view("a").pid  # type: ignore[union-attr]
    await sched.close(drain=0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert not pid_alive(pid)  # type: ignore[arg-type]


async def test_readiness_noticed_fast(make, tmp_path):
    rec = tmp_path / "rec.jsonl"
    sched = make(fake("a", "--health-503-for", "0.5", "--record-probes", record=rec))
    await sched.load("a")
    probes = [r["status"] for r in read_records(rec) if r["event"] == "health"]
    # Probed all along the 0.5 s of 503s (every 50 ms, not seconds apart), and ready on
    # the first probe that found the engine ready.
    assert probes.count(503) >= 3, probes
    assert probes[-1] == 200 and probes.count(200) == 1, probes

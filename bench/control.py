"""Control-path, footprint and scale benchmarks, against tests/fake_engine.py.

Times come from three clocks that are one clock: the fake engine's `--record` lines
(`time.time()` when it started, became ready, exited), swapd's JSON log (ISO timestamps, µs) and
the client's `time.time()`. All three run on this machine.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import select
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.datapath import RssWatch
from bench.procs import PY, ROOT, Swapd, cpu_seconds, http_post, parse_ts, wait_until

FAKE = ROOT / "tests" / "fake_engine.py"


def fake_cmd(name: str, record: Path, *flags: str) -> str:
    return " ".join(
        [PY, str(FAKE), "--port", "${PORT}", "--model-name", name, "--record", str(record), *flags]
    )


class ExitWatch:
    """The instant a process (not our child) exits, seen through a pidfd, in a thread."""

    def __init__(self, pid: int) -> None:
        self.at: float | None = None
        self._fd = os.pidfd_open(pid)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            select.select([self._fd], [], [], 120)
            self.at = time.time()
        finally:
            os.close(self._fd)

    def wait(self, timeout: float = 30.0) -> float:
        self._thread.join(timeout)
        if self.at is None:
            raise RuntimeError("the process did not exit")
        return self.at


def records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def events(sw: Swapd, event: str, **match: Any) -> list[dict[str, Any]]:
    return [
        e
        for e in sw.events()
        if e.get("event") == event and all(e.get(k) == v for k, v in match.items())
    ]


def chat(sw: Swapd, model: str, timeout: float = 120.0) -> tuple[int, float]:
    """A small non-streaming chat request; (status, time.time() when its answer arrived)."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})
    code, _ = http_post(sw.url + "/v1/chat/completions", body.encode(), timeout)
    return code, time.time()


# -- readiness ------------------------------------------------------------------------------


@dataclass
class Readiness:
    style: str
    lags: list[float] = field(default_factory=list)  # engine ready → swapd's "engine ready"
    # engine ready → the first queued request reaches the engine (the request that started it)
    to_request: list[float] = field(default_factory=list)


def readiness(workdir: Path, rounds: int = 8, delay: float = 0.3) -> list[Readiness]:
    """How long after an engine becomes ready swapd notices it, and the request that waited
    for it reaches it: llama.cpp style (/health answers 503 while loading) and vLLM style (the
    port opens only once loaded). Each round is a cold start by a chat request. The engine's
    own start time varies by tens of ms, so readiness falls anywhere in the probe period."""
    rec = workdir / "ready.jsonl"
    styles = {"health 503 while loading": "--health-503-for", "port opens late": "--boot-delay"}
    cfg = {
        "logLevel": "info",
        "models": {
            f"r{i}": {"cmd": fake_cmd(f"r{i}", rec, flag, str(delay), "--record-requests"),
                      "ttl": 0}
            for i, flag in enumerate(styles.values())
        },
    }
    sw = Swapd("swapd-ready", workdir / "ready", cfg).start().wait_http()
    out = []
    try:
        for i, style in enumerate(styles):
            res = Readiness(style)
            model = f"r{i}"
            for _ in range(rounds):
                code, _ = chat(sw, model)
                if code != 200:
                    raise RuntimeError(f"chat answered {code}: {sw.log()[-2000:]}")
                mine = [r for r in records(rec) if r["model"] == model]
                t_ready = [r["t"] for r in mine if r["event"] == "ready"][-1]
                t_request = next(r["t"] for r in mine
                                 if r["event"] == "request" and r["t"] >= t_ready)
                logged = events(sw, "engine ready", model=model)
                res.lags.append(parse_ts(logged[-1]["timestamp"]) - t_ready)
                res.to_request.append(t_request - t_ready)
                http_post(sw.url + f"/models/{model}/unload", timeout=60)
            out.append(res)
    finally:
        sw.stop()
    return out


# -- swap ------------------------------------------------------------------------------------


@dataclass
class Swap:
    total: float
    drain: float  # request → SIGTERM to the old tenant
    stop_engine: float  # SIGTERM → the old engine's process exits (its own shutdown)
    stop_notice: float  # exit → swapd knows the group is gone
    memory: float  # group gone → new engine spawned (memory check included)
    start_engine: float  # spawn → the new engine ready (the engine's own start)
    readiness: float  # engine ready → swapd noticed
    first_byte: float  # noticed → the client has the answer's first byte

    @property
    def swapd_share(self) -> float:
        return self.total - self.stop_engine - self.start_engine


SWAP_FLAGS = ("--health-503-for", "0.5", "--exit-on-sigterm-delay", "0.3")


def swaps(workdir: Path, rounds: int = 6) -> list[Swap]:
    """A request for B while A is the GPU tenant, timed from request to B's first byte."""
    rec = workdir / "swap.jsonl"
    cfg = {
        "logLevel": "debug",
        "unloadTimeout": 10,
        "models": {m: {"cmd": fake_cmd(m, rec, *SWAP_FLAGS), "ttl": 0} for m in ("a", "b")},
    }
    sw = Swapd("swapd-swap", workdir / "swap", cfg).start().wait_http()
    out = []
    try:
        if chat(sw, "a")[0] != 200:
            raise RuntimeError(sw.log()[-2000:])
        for n in range(rounds):
            old, new = ("a", "b") if n % 2 == 0 else ("b", "a")
            watch = ExitWatch(sw.status()["models"][old]["pid"])
            t_req = time.time()
            code, t_fb = chat(sw, new)
            if code != 200:
                raise RuntimeError(f"swap request answered {code}")
            ev = [e for e in sw.events() if parse_ts(e["timestamp"]) >= t_req]

            def at(event: str, model: str, events: list[dict[str, Any]] = ev, **kw: Any) -> float:
                for e in events:
                    if e.get("event") == event and e.get("model") == model:
                        if all(e.get(k) == v for k, v in kw.items()):
                            return parse_ts(e["timestamp"])
                raise RuntimeError(f"no {event!r} for {model} in swapd's log")

            recs = [r for r in records(rec) if r["t"] >= t_req]

            def rec_at(event: str, model: str, recs: list[dict[str, Any]] = recs) -> float:
                return next(r["t"] for r in recs if r["event"] == event and r["model"] == model)

            t_term = at("stopping engine", old, reason="swap")
            t_exit = watch.wait()
            t_gone = at("engine state", old, state="stopped")
            t_spawn = at("engine spawned", new)
            t_ready = rec_at("ready", new)
            t_noticed = at("engine ready", new)
            out.append(
                Swap(
                    total=t_fb - t_req,
                    drain=t_term - t_req,
                    stop_engine=t_exit - t_term,
                    stop_notice=t_gone - t_exit,
                    memory=t_spawn - t_gone,
                    start_engine=t_ready - t_spawn,
                    readiness=t_noticed - t_ready,
                    first_byte=t_fb - t_noticed,
                )
            )
    finally:
        sw.stop()
    return out


# -- SIGKILL escalation ---------------------------------------------------------------------


def escalation(workdir: Path, rounds: int = 3, grace: float = 1.0) -> list[float]:
    """Seconds past `unloadTimeout` until swapd had SIGKILLed an engine (and its grandchild)
    that ignores SIGTERM, and confirmed the group gone."""
    rec = workdir / "kill.jsonl"
    cfg = {
        "logLevel": "info",
        "models": {
            "k": {
                "cmd": fake_cmd("k", rec, "--ignore-sigterm", "--spawn-grandchild"),
                "ttl": 0,
                "unloadTimeout": grace,
            }
        },
    }
    sw = Swapd("swapd-kill", workdir / "kill", cfg).start().wait_http()
    late = []
    try:
        for _ in range(rounds):
            if http_post(sw.url + "/models/k/load")[0] != 200:
                raise RuntimeError(sw.log()[-2000:])
            http_post(sw.url + "/models/k/unload")
            t_term = parse_ts(events(sw, "stopping engine", model="k")[-1]["timestamp"])
            killed = events(sw, "engine outlived its grace: SIGKILL", model="k")
            t_kill = parse_ts(killed[-1]["timestamp"])
            late.append(t_kill - t_term - grace)
    finally:
        sw.stop()
    return late


# -- footprint -------------------------------------------------------------------------------


@dataclass
class Idle:
    rss: int
    cpu_share: float  # of one core
    seconds: float
    wakeups: float  # per second, all threads (times a thread was put on a CPU)
    threads: int


def schedstat(pid: int) -> tuple[float, int]:
    """CPU seconds (ns resolution) and run slices of every thread of `pid` (/proc schedstat)."""
    cpu, slices = 0, 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            on_cpu, _, runs = (task / "schedstat").read_text().split()
            cpu += int(on_cpu)
            slices += int(runs)
    return cpu / 1e9, slices


def idle(workdir: Path, seconds: float = 20.0, models: int = 10) -> Idle:
    """swapd with `models` configured models (none started), left alone."""
    rec = workdir / "idle.jsonl"
    cfg = {
        "logLevel": "info",
        "apiKeys": ["bench-key"],
        "models": {
            f"model-{i}": {"cmd": fake_cmd(f"model-{i}", rec), "ttl": 300} for i in range(models)
        },
    }
    sw = Swapd("swapd-idle", workdir / "idle", cfg).start().wait_http()
    try:
        time.sleep(2.0)  # let startup settle (measured: nothing to wait for)
        p = sw.process()
        (cpu0, runs0), t0 = schedstat(p.pid), time.monotonic()
        time.sleep(seconds)
        (cpu1, runs1), t1 = schedstat(p.pid), time.monotonic()
        return Idle(
            rss=p.memory_info().rss,
            cpu_share=(cpu1 - cpu0) / (t1 - t0),
            seconds=t1 - t0,
            wakeups=(runs1 - runs0) / (t1 - t0),
            threads=p.num_threads(),
        )
    finally:
        sw.stop()


def loading(workdir: Path, seconds: float = 6.0) -> Idle:
    """swapd while an engine loads (its /health answers 503): the readiness probe's cost."""
    rec = workdir / "loading.jsonl"
    cfg = {
        "logLevel": "info",
        "models": {"m": {"cmd": fake_cmd("m", rec, "--health-503-for", "600"), "ttl": 0}},
    }
    sw = Swapd("swapd-loading", workdir / "loading", cfg).start().wait_http()
    try:
        def load() -> None:
            with contextlib.suppress(OSError):  # it times out: the engine never gets ready
                http_post(sw.url + "/models/m/load", timeout=seconds + 3)

        loader = threading.Thread(target=load)
        loader.start()
        wait_until(
            lambda: sw.status()["models"]["m"]["state"] == "starting", 10, message="starting"
        )
        time.sleep(1.0)  # past the spawn
        p = sw.process()
        (cpu0, runs0), t0 = schedstat(p.pid), time.monotonic()
        time.sleep(seconds)
        (cpu1, runs1), t1 = schedstat(p.pid), time.monotonic()
        loader.join()
        return Idle(
            rss=p.memory_info().rss,
            cpu_share=(cpu1 - cpu0) / (t1 - t0),
            seconds=t1 - t0,
            wakeups=(runs1 - runs0) / (t1 - t0),
            threads=p.num_threads(),
        )
    finally:
        sw.stop()


# -- scale -----------------------------------------------------------------------------------


@dataclass
class Scale:
    requests: int
    statuses: dict[int, int]
    boot: float
    served_after_ready: float  # engine ready → last answer
    rss_before: int
    rss_peak: int
    rss_after: int
    cpu: float


def scale(workdir: Path, requests: int = 1000, boot: float = 3.0, waves: int = 2) -> list[Scale]:
    """`requests` clients at once for a cold model whose engine takes `boot` s to open its
    port; then the model is unloaded and the next wave comes."""
    rec = workdir / "scale.jsonl"
    cfg = {
        "logLevel": "info",
        "maxQueue": requests * 2,
        "queueTimeout": 120,
        "models": {"s": {"cmd": fake_cmd("s", rec, "--boot-delay", str(boot)), "ttl": 0}},
    }
    sw = Swapd("swapd-scale", workdir / "scale", cfg).start().wait_http()
    out = []
    try:
        p = sw.process()
        for _ in range(waves):
            rss_before = p.memory_info().rss
            cpu0 = cpu_seconds([p])
            with RssWatch(p, 0.05) as watch:
                statuses, t_last = asyncio.run(_flood(sw.url, requests))
            ready = [r["t"] for r in records(rec) if r["event"] == "ready"]
            out.append(
                Scale(
                    requests=requests,
                    statuses=statuses,
                    boot=boot,
                    served_after_ready=t_last - ready[-1] if ready else float("nan"),
                    rss_before=rss_before,
                    rss_peak=watch.peak,
                    rss_after=p.memory_info().rss,
                    cpu=cpu_seconds([p]) - cpu0,
                )
            )
            http_post(sw.url + "/models/s/unload")
    finally:
        sw.stop()
    return out


async def _flood(base: str, n: int) -> tuple[dict[int, int], float]:
    statuses: collections.Counter[int] = collections.Counter()
    body = json.dumps({"model": "s", "messages": [{"role": "user", "content": "hi"}]})
    last = 0.0
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=180)
    ) as session:

        async def one() -> None:
            nonlocal last
            try:
                async with session.post(
                    base + "/v1/chat/completions",
                    data=body,
                    headers={"Content-Type": "application/json"},
                ) as resp:
                    await resp.read()
                    statuses[resp.status] += 1
            except (aiohttp.ClientError, TimeoutError):
                statuses[0] += 1
            last = max(last, time.time())

        await asyncio.gather(*(one() for _ in range(n)))
    return dict(statuses), last

"""Soak: randomized concurrent traffic over three models, faults injected, nothing lost.

    python -m bench.soak --minutes 10            # the documented long run (not in CI)
    python -m bench.soak --minutes 2 --json out.json

A real swapd process serves fake engines (tests/fake_engine.py, each with --record) while
client tasks send randomized traffic: chat and streaming chat over three models, clients that
disconnect mid-stream, malformed requests, and (with faults on, the default) a fourth model
that crashes mid-stream, engines SIGKILLed under load, slow clients holding half-sent requests
(slowloris) and SIGHUP reloads. Afterwards everything is checked from the outside:

- the engines' own start/exit records: never two GPU engines alive at once;
- every request was answered, with a status in the spec's set, from the right engine; every
  stream ended with `[DONE]` or an error event, never a hang;
- no request waited past `queueTimeout`;
- engine starts ≤ what the arrival order forces (1 + model changes, + injected kills);
- swapd's file descriptors, asyncio tasks and threads come back to their baseline; no zombie.

tests/test_reliability.py runs the same functions for a few seconds in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tests.support import (
    PY,
    fake_cmd,
    free_port,
    http,
    pid_alive,
    read_records,
    wait_until,
    write_config,
)

MODELS = ("alpha", "beta", "gamma")
CRASHY = "delta"  # with faults: a GPU model whose engine dies in the middle of each stream
# Statuses the spec allows for an inference request (SPEC.md, HTTP surface).
SPEC_STATUSES = frozenset({200, 400, 401, 404, 413, 429, 502, 503, 504})

# Bad requests mixed into the traffic, and the answer each must get.
BAD_INPUTS: tuple[tuple[str, bytes, str, int, str], ...] = (
    # (name, body, content type, status, error code)
    ("malformed", b'{"model": "alpha", "messages": [}', "application/json", 400, "bad_json"),
    ("truncated", b'{"model": "alpha", "mess', "application/json", 400, "bad_json"),
    ("non-object", b'["alpha"]', "application/json", 400, "bad_json"),
    ("no-model", b'{"messages": []}', "application/json", 400, "missing_model"),
    ("model-int", b'{"model": 7}', "application/json", 400, "missing_model"),
    ("unknown-model", b'{"model": "nope"}', "application/json", 404, "model_not_found"),
    ("oversized", b'{"model": "alpha", "pad": "' + b"x" * 70_000 + b'"}', "application/json",
     413, "body_too_large"),
    ("multipart-no-model", b"--b\r\nContent-Disposition: form-data; name=\"file\"; "
     b"filename=\"a.wav\"\r\n\r\nRIFF\r\n--b--\r\n", "multipart/form-data; boundary=b",
     400, "missing_model"),
)
MAX_BODY_BYTES = 65_536  # the config's maxBodyBytes: "oversized" is above it

# A sitecustomize that makes a Python process write its asyncio task names to
# $SWAPD_TASK_DUMP on SIGUSR1: how the task count of a running swapd is read from outside.
TASK_DUMPER = '''\
import os
if os.environ.get("SWAPD_TASK_DUMP"):
    import asyncio, json, signal

    def _swapd_dump_tasks(signum, frame):
        try:
            names = sorted(t.get_name() for t in asyncio.all_tasks())
        except RuntimeError:
            return
        with open(os.environ["SWAPD_TASK_DUMP"], "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "tasks": names}) + "\\n")

    signal.signal(signal.SIGUSR1, _swapd_dump_tasks)
'''


# -- configuration ----------------------------------------------------------------------------


def swapd_config(record: Path, *, queue_timeout: float, faults: bool, tokens: int = 6,
                 token_delay: float = 0.01) -> dict[str, Any]:
    """Three models (four with faults) on the fake engine, each recording its start and exit."""
    flags = ("--stream-tokens", str(tokens), "--token-delay", str(token_delay))
    restart = {"maxRetries": 3, "backoffInitial": 0.1, "backoffMax": 1.0}
    models: dict[str, Any] = {
        m: {"cmd": fake_cmd(*flags, record=record, name=m), "proxy": "http://127.0.0.1:${PORT}",
            "unloadTimeout": 3, "restart": restart}
        for m in MODELS
    }
    if faults:
        models[CRASHY] = {
            "cmd": fake_cmd("--crash-mid-stream", *flags, record=record, name=CRASHY),
            "proxy": "http://127.0.0.1:${PORT}", "unloadTimeout": 3,
            "restart": {"maxRetries": 2, "backoffInitial": 0.1, "backoffMax": 2.0},
        }
    return {
        "healthCheckTimeout": 20,
        "queueTimeout": queue_timeout,
        "maxBodyBytes": MAX_BODY_BYTES,
        "logLevel": "info",
        "models": models,
    }


def instrument(workdir: Path) -> dict[str, str]:
    """Environment for swapd that lets `task_names` read its asyncio tasks (SIGUSR1)."""
    site = workdir / "site"
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(TASK_DUMPER)
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "SWAPD_TASK_DUMP": str(workdir / "tasks.jsonl")}


# -- swapd's resources, from /proc ---------------------------------------------------------------


@dataclass(frozen=True)
class Resources:
    fds: int
    threads: int
    children: int
    zombies: tuple[int, ...]


def resources(pid: int) -> Resources:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    threads = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                threads = int(line.split()[1])
    children, zombies = 0, []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children += 1
            if fields[0] == "Z":
                zombies.append(int(entry))
    return Resources(fds, threads, children, tuple(zombies))


def task_names(pid: int, dump: Path, timeout: float = 5.0) -> list[str]:
    """swapd's asyncio tasks right now (needs the `instrument` environment)."""
    before = len(dump.read_text().splitlines()) if dump.exists() else 0
    os.kill(pid, signal.SIGUSR1)
    wait_until(lambda: dump.exists() and len(dump.read_text().splitlines()) > before,
               timeout, message="swapd's task dump")
    names: list[str] = json.loads(dump.read_text().splitlines()[-1])["tasks"]
    return names


# -- traffic ---------------------------------------------------------------------------------


@dataclass
class Outcome:
    kind: str  # chat, stream, cut (disconnects mid-stream), crashy, bad:<name>
    model: str
    sent: float  # wall clock, comparable with the engines' records
    status: int | None = None
    answered: float | None = None  # response headers arrived
    done: float | None = None
    pid: int | None = None  # the engine that answered, as it says
    problem: str | None = None  # a loss or a wrong answer; None when all is well
    note: str = ""  # how a stream ended, the error code, …


@dataclass
class Mix:
    """What the clients send, as relative weights."""

    chat: float = 0.45
    stream: float = 0.30
    cut: float = 0.15
    bad: float = 0.10
    crashy: float = 0.0

    def pick(self, rng: random.Random) -> str:
        kinds = ["chat", "stream", "cut", "bad", "crashy"]
        weights = [self.chat, self.stream, self.cut, self.bad, self.crashy]
        return rng.choices(kinds, weights)[0]


def _error_code(doc: Any) -> str | None:
    if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
        err = doc["error"]
        if {"message", "type", "code"} <= set(err):
            return str(err["code"])
    return None


async def _read_stream(resp: aiohttp.ClientResponse, cut_after: int | None) -> tuple[str, int, str]:
    """Read an SSE body: (how it ended, token chunks, the first chunk's id)."""
    events, first_id = 0, ""
    async for raw in resp.content:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return "done", events, first_id
        doc = json.loads(data)
        if "error" in doc:
            return f"error:{_error_code(doc)}", events, first_id
        first_id = first_id or str(doc.get("id", ""))
        choices = doc.get("choices") or [{}]
        if not (choices[0].get("delta") or {}).get("content"):
            continue  # the role-less final chunk (finish_reason)
        events += 1
        if cut_after is not None and events >= cut_after:
            resp.close()  # the client goes away mid-stream
            return "cut", events, first_id
    return "eof", events, first_id


async def one_request(session: aiohttp.ClientSession, url: str, kind: str, model: str,
                      rng: random.Random, timeout: float, tokens: int) -> Outcome:
    out = Outcome(kind, model, time.time())
    body: bytes
    ctype = "application/json"
    bad = None
    if kind.startswith("bad:"):
        bad = next(b for b in BAD_INPUTS if b[0] == kind[4:])
        _, body, ctype, _, _ = bad
    else:
        doc: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        if kind != "chat":
            doc["stream"] = True
        body = json.dumps(doc).encode()
    try:
        async with session.post(url + "/v1/chat/completions", data=body,
                                headers={"Content-Type": ctype},
                                timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            out.status, out.answered = resp.status, time.time()
            if out.status == 200 and kind in ("stream", "cut", "crashy"):
                ended, events, first_id = await _read_stream(
                    resp, rng.randint(1, 2) if kind == "cut" else None)
                out.note = ended
                with contextlib.suppress(ValueError, IndexError):
                    out.pid = int(first_id.split("-")[2])  # "chatcmpl-fake-{pid}-{n}"
                if ended == "eof":
                    out.problem = f"stream cut after {events} tokens without [DONE] or an error"
                elif kind == "stream" and ended == "done" and events != tokens:
                    out.problem = f"stream done after {events}/{tokens} tokens"
                elif kind == "crashy" and not ended.startswith("error:"):
                    out.problem = f"crashing engine's stream ended {ended!r}, not an error event"
            else:
                raw = await resp.read()
                try:
                    answer = json.loads(raw)
                except ValueError:
                    answer = None
                if out.status == 200 and not bad:
                    if not isinstance(answer, dict) or answer.get("x_served_by") != model:
                        out.problem = f"answered by the wrong engine: {str(answer)[:120]}"
                    else:
                        out.pid = int(answer["x_pid"])
                else:
                    code = _error_code(answer)
                    out.note = str(code)
                    if code is None:
                        out.problem = f"{out.status} without an OpenAI-shaped error: {raw[:120]!r}"
                    elif bad and (out.status, code) != (bad[3], bad[4]):
                        out.problem = f"expected {bad[3]} {bad[4]}, got {out.status} {code}"
                    elif out.status in (503, 504) and "Retry-After" not in resp.headers:
                        out.problem = f"{out.status} without Retry-After"
            out.done = time.time()
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        out.done = time.time()
        out.problem = f"no answer: {type(exc).__name__}: {exc}"
    if out.status is not None and out.status not in SPEC_STATUSES:
        out.problem = out.problem or f"status {out.status} is not in the spec's set"
    return out


async def drive(url: str, *, duration: float, clients: int, seed: int, mix: Mix,
                queue_timeout: float, tokens: int, models: tuple[str, ...] = MODELS
                ) -> list[Outcome]:
    """`clients` concurrent clients, each sending one request after another for `duration`."""
    outcomes: list[Outcome] = []
    deadline = time.monotonic() + duration
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def client(n: int) -> None:
            rng = random.Random(seed * 1000 + n)
            while time.monotonic() < deadline:
                kind = mix.pick(rng)
                model = rng.choice(models)
                if kind == "bad":
                    kind = "bad:" + rng.choice(BAD_INPUTS)[0]
                    model = "-"
                elif kind == "crashy":
                    model = CRASHY
                outcomes.append(await one_request(
                    session, url, kind, model, rng, queue_timeout + 30, tokens))
                await asyncio.sleep(rng.uniform(0, 0.02))

        await asyncio.gather(*(client(n) for n in range(clients)))
    return outcomes


# -- faults injected during a soak -------------------------------------------------------------


@dataclass
class Faults:
    kills: list[dict[str, Any]] = field(default_factory=list)  # {"pid", "model", "t", "gone"}
    reloads: int = 0
    slow_clients: int = 0


async def kill_engines(url: str, every: float, until: float, faults: Faults,
                       rng: random.Random) -> None:
    """SIGKILL a running engine's main process now and then (an OOM kill, a segfault)."""
    async with aiohttp.ClientSession() as session:
        while time.monotonic() + every < until:
            await asyncio.sleep(rng.uniform(0.5, 1.5) * every)
            ready: list[tuple[str, int]] = []
            for _ in range(100):  # the tenant may be swapping just now: look again soon
                async with session.get(url + "/status") as resp:
                    status = await resp.json()
                ready = [(m, s["pid"]) for m, s in status["models"].items()
                         if s["state"] == "ready" and s["pid"]]
                if ready:
                    break
                await asyncio.sleep(0.05)
            if not ready:
                continue
            model, pid = rng.choice(ready)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            t = time.time()
            # Dead at once, then a zombie until swapd reaps it: "gone" is the first
            # instant it is seen dead, the end of its life for the overlap check.
            await asyncio.to_thread(wait_until, lambda p=pid: not pid_alive(p), 5.0, 0.002)
            faults.kills.append({"pid": pid, "model": model, "t": t, "gone": time.time()})


async def reload_now_and_then(pid: int, every: float, until: float, faults: Faults) -> None:
    """SIGHUP with an unchanged config: nothing may restart, nothing may be lost."""
    while time.monotonic() + every < until:
        await asyncio.sleep(every)
        os.kill(pid, signal.SIGHUP)
        faults.reloads += 1


async def slow_clients(port: int, count: int, until: float, faults: Faults) -> None:
    """Slowloris: connections that send half a request, a few bytes at a time."""

    async def one(partial_body: bool) -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        faults.slow_clients += 1
        try:
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
            if partial_body:
                writer.write(b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{")
            while time.monotonic() < until:
                await asyncio.sleep(0.5)
                writer.write(b" " if partial_body else b"X-Slow: 1\r\n")
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    await asyncio.gather(*(one(i % 2 == 1) for i in range(count)))


# -- checks from the outside ---------------------------------------------------------------------


def engine_intervals(records: list[dict[str, Any]], kills: list[dict[str, Any]] | None = None
                     ) -> tuple[list[tuple[float, float, str, int]], list[str]]:
    """(start, end, model, pid) of every engine from its own records; a SIGKILLed engine
    writes no exit record, its end is when it was seen dead."""
    killed = {k["pid"]: k["gone"] for k in kills or []}
    exits = {r["pid"]: r["t"] for r in records if r["event"] == "exit"}
    out, problems = [], []
    for r in records:
        if r["event"] != "start":
            continue
        end = exits.get(r["pid"], killed.get(r["pid"]))
        if end is None:
            problems.append(f"engine {r['model']} pid {r['pid']} has no exit record")
            continue
        out.append((float(r["t"]), float(end), str(r["model"]), int(r["pid"])))
    return sorted(out), problems


def overlaps(intervals: list[tuple[float, float, str, int]]) -> list[str]:
    """Any two engines alive at the same instant (one GPU tenant at a time)."""
    found = []
    latest_end, latest = 0.0, None
    for start, end, model, pid in intervals:
        if latest is not None and start < latest_end:
            found.append(f"{model} (pid {pid}) started at {start:.3f} while {latest[2]} "
                         f"(pid {latest[3]}) lived until {latest_end:.3f}")
        if end > latest_end:
            latest_end, latest = end, (start, end, model, pid)
    return found


def forced_starts(outcomes: list[Outcome]) -> int:
    """Engine starts the arrival order forces: 1 + model changes among requests that reached
    the scheduler (bad input never does), in the order they were sent."""
    seq = [o.model for o in sorted(outcomes, key=lambda o: o.sent) if not o.kind.startswith("bad")]
    return (1 if seq else 0) + sum(1 for a, b in itertools.pairwise(seq) if a != b)


def judge(outcomes: list[Outcome], records: list[dict[str, Any]], queue_timeout: float,
          *, faults: bool, slack: float = 2.0) -> list[str]:
    """Every request answered, from the right engine, none waiting past queueTimeout. Without
    injected faults, every good request must succeed and every stream end with [DONE]."""
    problems = [f"{o.kind} {o.model}: {o.problem}" for o in outcomes if o.problem]
    pid_model = {r["pid"]: r["model"] for r in records if r["event"] == "start"}
    for o in outcomes:
        if not faults and not o.problem and o.kind in ("chat", "stream", "cut"):
            if o.status != 200:
                problems.append(f"{o.kind} {o.model}: {o.status} {o.note} in a fault-free run")
            elif o.note.startswith("error"):
                problems.append(f"{o.kind} {o.model}: stream ended {o.note} in a fault-free run")
        if o.pid is not None and pid_model.get(o.pid) != o.model:
            problems.append(f"{o.kind} {o.model} was answered by pid {o.pid} "
                            f"({pid_model.get(o.pid)})")
        if o.answered is not None and o.answered - o.sent > queue_timeout + slack:
            problems.append(f"{o.kind} {o.model} waited {o.answered - o.sent:.2f}s for its "
                            f"answer (queueTimeout {queue_timeout:g}s) → {o.status}")
    return problems


def summary(outcomes: list[Outcome]) -> dict[str, Any]:
    by_status = collections.Counter(str(o.status) for o in outcomes)
    by_kind = collections.Counter(o.kind.split(":")[0] for o in outcomes)
    waits = sorted(o.answered - o.sent for o in outcomes if o.answered and o.status == 200)
    return {
        "requests": len(outcomes),
        "by_kind": dict(by_kind),
        "by_status": dict(by_status),
        "stream_endings": dict(collections.Counter(o.note for o in outcomes
                                                   if o.kind in ("stream", "cut", "crashy"))),
        "wait_p50_s": round(waits[len(waits) // 2], 3) if waits else None,
        "wait_p99_s": round(waits[int(len(waits) * 0.99)], 3) if waits else None,
        "wait_max_s": round(waits[-1], 3) if waits else None,
        "losses": sum(1 for o in outcomes if o.problem),
    }


# -- the soak ------------------------------------------------------------------------------------


@contextlib.contextmanager
def running_swapd(
    workdir: Path, config: dict[str, Any]
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    config = {"listen": f"127.0.0.1:{port}", "stateDir": str(workdir / "state"),
              "startPort": free_port(), **config}
    path = write_config(workdir, config)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **instrument(workdir)}
    with (workdir / "swapd.log").open("wb") as log:
        proc = subprocess.Popen([PY, "-m", "swapd", "serve", "--config", str(path)],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"swapd exited {proc.returncode}; see {workdir}/swapd.log")
            try:
                return http("GET", url + "/health", timeout=1)[0] == 200
            except OSError:
                return False

        wait_until(up, 20, message="swapd /health")
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def settle(url: str, pid: int, baseline: Resources, dump: Path, base_tasks: list[str],
           timeout: float = 15.0) -> tuple[Resources, list[str], list[str]]:
    """Unload everything, then wait for swapd's resources to come back to the baseline."""
    code, doc = http("POST", url + "/unload", timeout=60)
    assert code == 200, doc
    problems: list[str] = []

    def back() -> bool:
        now = resources(pid)
        return now.fds <= baseline.fds + 2 and not now.zombies and now.children == 0

    with contextlib.suppress(AssertionError):
        wait_until(back, timeout, interval=0.1, message="swapd's fds back to baseline")
    after = resources(pid)
    if after.fds > baseline.fds + 2:
        problems.append(f"file descriptors: {baseline.fds} before, {after.fds} after")
    if after.zombies:
        problems.append(f"zombie children: {after.zombies}")
    if after.children:
        problems.append(f"{after.children} children left after /unload")
    if after.threads > baseline.threads + 4:
        problems.append(f"threads: {baseline.threads} before, {after.threads} after")
    tasks = task_names(pid, dump)
    extra = sorted((collections.Counter(tasks) - collections.Counter(base_tasks)).elements())
    if len(tasks) > len(base_tasks) + 1:  # +1: the connection that may still be closing
        problems.append(f"asyncio tasks: {len(base_tasks)} before, {len(tasks)} after: {extra}")
    return after, tasks, problems


def warm_up(url: str, models: tuple[str, ...]) -> None:
    """Start and stop each model once so that lazily created things exist for the baseline."""
    for m in models:
        code, doc = http("POST", url + "/v1/chat/completions", {"model": m, "messages": []})
        assert code == 200, doc
    code, doc = http("POST", url + "/unload", timeout=60)
    assert code == 200, doc


def soak(workdir: Path, *, duration: float, clients: int, seed: int, faults: bool,
         queue_timeout: float = 20.0, tokens: int = 6) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    record = workdir / "records.jsonl"
    record.unlink(missing_ok=True)
    config = swapd_config(record, queue_timeout=queue_timeout, faults=faults, tokens=tokens)
    mix = Mix(crashy=0.01) if faults else Mix()
    fault_log = Faults()
    with running_swapd(workdir, config) as (url, proc):
        port = int(url.rsplit(":", 1)[1])
        dump = workdir / "tasks.jsonl"
        warm_up(url, tuple(config["models"]))
        baseline = resources(proc.pid)
        base_tasks = task_names(proc.pid, dump)

        async def run() -> list[Outcome]:
            until = time.monotonic() + duration
            rng = random.Random(seed)
            injectors = []
            if faults:
                injectors = [
                    asyncio.create_task(kill_engines(url, 8.0, until, fault_log, rng)),
                    asyncio.create_task(reload_now_and_then(proc.pid, 15.0, until, fault_log)),
                    asyncio.create_task(slow_clients(port, 40, until, fault_log)),
                ]
            outcomes = await drive(url, duration=duration, clients=clients, seed=seed, mix=mix,
                                   queue_timeout=queue_timeout, tokens=tokens,
                                   models=MODELS)
            await asyncio.gather(*injectors)
            return outcomes

        t0 = time.monotonic()
        outcomes = asyncio.run(run())
        elapsed = time.monotonic() - t0
        status = http("GET", url + "/status")[1]
        inflight = {m: s["inflight"] for m, s in status["models"].items() if s["inflight"]}
        after, tasks, resource_problems = settle(url, proc.pid, baseline, dump, base_tasks)
        records = read_records(record)
    intervals, record_problems = engine_intervals(records, fault_log.kills)
    starts = len(intervals) + len(record_problems)
    forced = forced_starts(outcomes) + len(fault_log.kills)
    problems = (
        judge(outcomes, records, queue_timeout, faults=faults)
        + record_problems
        + overlaps(intervals)
        + ([f"{starts} engine starts, the arrival order forces at most {forced}"]
           if starts - len(config["models"]) > forced else [])  # warm-up started each once
        + ([f"leases still held after the traffic: {inflight}"] if inflight else [])
        + resource_problems
    )
    return {
        "seconds": round(elapsed, 1),
        "clients": clients,
        "seed": seed,
        **summary(outcomes),
        "engine_starts": starts - len(config["models"]),
        "forced_starts_bound": forced,
        "faults_injected": {
            "engine_sigkills": len(fault_log.kills),
            "crash_mid_stream": sum(1 for o in outcomes if o.kind == "crashy"),
            "client_disconnects": sum(1 for o in outcomes if o.kind == "cut"),
            "bad_requests": sum(1 for o in outcomes if o.kind.startswith("bad")),
            "slow_clients": fault_log.slow_clients,
            "sighup_reloads": fault_log.reloads,
        },
        "resources": {"before": asdict(baseline), "after": asdict(after),
                      "tasks_before": len(base_tasks), "tasks_after": len(tasks)},
        "problems": problems,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--clients", type=int, default=40)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--no-faults", action="store_true", help="traffic only, no injected faults")
    p.add_argument("--queue-timeout", type=float, default=20.0)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None, help="write the report here too")
    args = p.parse_args(argv)
    import tempfile

    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        report = soak(workdir, duration=args.minutes * 60, clients=args.clients, seed=args.seed,
                      faults=not args.no_faults, queue_timeout=args.queue_timeout)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())

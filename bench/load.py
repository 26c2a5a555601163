"""Load generators: LLM-shaped streams (aiohttp, per-chunk timing) and saturation (wrk)."""

from __future__ import annotations

import asyncio
import json
import re
import resource
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Tell me a story about a lighthouse keeper."}]


def chat_body(stream: bool, tokens: int = 16, ttft: float = 0.0, token_delay: float = 0.0) -> bytes:
    body: dict[str, object] = {"model": "m", "messages": MESSAGES, "stream": stream}
    if stream:
        body.update(max_tokens=tokens, x_ttft=ttft, x_token_delay=token_delay)
    return json.dumps(body).encode()


@dataclass
class StreamStats:
    ttfb: list[float] = field(default_factory=list)  # request sent → first token received
    delays: list[float] = field(default_factory=list)  # chunk written upstream → received
    tokens: int = 0
    requests: int = 0
    errors: int = 0
    wall: float = 0.0

    def add(self, other: StreamStats) -> None:
        self.ttfb += other.ttfb
        self.delays += other.delays
        self.tokens += other.tokens
        self.requests += other.requests
        self.errors += other.errors
        self.wall += other.wall


async def _one_stream(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str], st: StreamStats
) -> None:
    t0 = time.monotonic()
    async with session.post(url, data=body, headers=headers) as resp:
        if resp.status != 200:
            await resp.read()
            st.errors += 1
            return
        buf = b""
        first = True
        async for data in resp.content.iter_any():
            now = time.monotonic()
            buf += data
            *events, buf = buf.split(b"\n\n")
            for ev in events:
                i = ev.rfind(b'"x_t":')
                if i < 0:
                    continue
                sent = float(ev[i + 6 : ev.index(b"}", i)])
                if first:
                    st.ttfb.append(now - t0)
                    first = False
                st.delays.append(now - sent)
                st.tokens += 1
    st.requests += 1


async def streams(
    session: aiohttp.ClientSession,
    base: str,
    headers: dict[str, str],
    concurrency: int,
    per_stream: int,
    tokens: int,
    ttft: float,
    token_delay: float,
) -> StreamStats:
    """`concurrency` clients, each making `per_stream` streaming requests one after another."""
    st = StreamStats()
    body = chat_body(True, tokens, ttft, token_delay)
    hdrs = {"Content-Type": "application/json", **headers}

    async def client() -> None:
        for _ in range(per_stream):
            await _one_stream(session, base + CHAT, body, hdrs, st)

    t0 = time.monotonic()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    st.wall = time.monotonic() - t0
    return st


# -- saturation ----------------------------------------------------------------------------


@dataclass
class Burst:
    requests: int
    seconds: float
    bad: int  # non-2xx answers and socket errors
    client_cpu: float
    p50_ms: float | None = None
    p99_ms: float | None = None

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


WRK = shutil.which("wrk")

_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(text)
    return float(m.group(1)) * _UNIT[m.group(2)]


def wrk(url: str, body: bytes, headers: dict[str, str], conns: int, seconds: float) -> Burst:
    """One closed-loop burst of `wrk` (one thread, `conns` keep-alive connections)."""
    assert WRK is not None
    lines = ['wrk.method = "POST"', f"wrk.body = {json.dumps(body.decode())}"]
    lines += [f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items()]
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write("\n".join(lines) + "\n")
        script = f.name
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(
        [WRK, "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--latency", "-s", script, url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    Path(script).unlink()
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    if not m:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    secs = float(m.group(2)) * {"ms": 1e-3, "s": 1.0, "m": 60.0}[m.group(3)]
    bad = sum(int(x) for x in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    se = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if se:
        bad += sum(int(x) for x in se.groups())
    pct = dict(re.findall(r"^\s+(50|99)(?:\.0+)?%\s+(\S+)", out, re.M))
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Burst(
        requests=int(m.group(1)),
        seconds=secs,
        bad=bad,
        client_cpu=cpu,
        p50_ms=_ms(pct["50"]) if "50" in pct else None,
        p99_ms=_ms(pct["99"]) if "99" in pct else None,
    )


async def _aiohttp_burst(
    url: str, body: bytes, headers: dict[str, str], conns: int, seconds: float
) -> Burst:
    done = bad = 0
    deadline = time.monotonic() + seconds
    t0 = time.monotonic()
    cpu0 = time.process_time()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def worker() -> None:
            nonlocal done, bad
            while time.monotonic() < deadline:
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    done += 1
                    bad += resp.status >= 300

        await asyncio.gather(*(worker() for _ in range(conns)))
    return Burst(done, time.monotonic() - t0, bad, time.process_time() - cpu0)


def burst(url: str, body: bytes, headers: dict[str, str], conns: int, seconds: float) -> Burst:
    """A saturation burst with wrk when it is installed, else with an aiohttp client."""
    hdrs = {"Content-Type": "application/json", **headers}
    if WRK:
        return wrk(url, body, hdrs, conns, seconds)
    return asyncio.run(_aiohttp_burst(url, body, hdrs, conns, seconds))

"""Data-path benchmarks: LLM-shaped streams, and saturation with an instant upstream.

Every contender talks to the same upstream process (`bench.upstream`); swapd's model points
its `proxy:` at it, so "direct" is literally the same server without swapd in between.
"""

from __future__ import annotations

import asyncio
import importlib.util
import math
import statistics
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import psutil

from bench import load
from bench.common import loop_factory
from bench.procs import API_KEY, cpu_seconds

AUTH = {"Authorization": f"Bearer {API_KEY}"}
HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None


@dataclass
class Contender:
    key: str
    label: str
    base: str
    procs: Callable[[], list[psutil.Process]] = list  # the relay's processes; none for direct


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


class RssWatch:
    """Samples a process's resident memory in a thread; keeps the peak."""

    def __init__(self, proc: psutil.Process, interval: float = 0.1) -> None:
        self.proc = proc
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> RssWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# -- LLM-shaped streams --------------------------------------------------------------------


@dataclass
class StreamSettings:
    ttft: float = 0.15
    token_delay: float = 0.02  # 50 tokens/s per stream
    tokens: int = 64
    # concurrency -> (rounds, requests per stream per round); contenders alternate each round
    levels: dict[int, tuple[int, int]] = field(
        default_factory=lambda: {1: (8, 3), 16: (10, 1), 64: (10, 1)}
    )


@dataclass
class StreamRow:
    stats: load.StreamStats
    cpu: float  # the contender's own CPU seconds
    upstream_cpu: float
    rounds: list[load.StreamStats] = field(default_factory=list)  # each round's own

    @property
    def tokens_per_s(self) -> float:
        return self.stats.tokens / self.stats.wall if self.stats.wall else 0.0


async def _stream_level(
    contenders: list[Contender],
    upstream: psutil.Process,
    conc: int,
    rounds: int,
    per_round: int,
    s: StreamSettings,
) -> dict[str, StreamRow]:
    rows = {c.key: StreamRow(load.StreamStats(), 0.0, 0.0) for c in contenders}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=120)
    ) as session:
        for c in contenders:  # warm-up: open connections, fill caches
            await load.streams(session, c.base, AUTH, conc, 1, 2, 0.0, 0.0)
        for r in range(rounds):
            order = contenders if r % 2 == 0 else contenders[::-1]
            for c in order:
                procs = c.procs()
                cpu0, up0 = cpu_seconds(procs), cpu_seconds([upstream])
                st = await load.streams(
                    session, c.base, AUTH, conc, per_round, s.tokens, s.ttft, s.token_delay
                )
                row = rows[c.key]
                row.cpu += cpu_seconds(procs) - cpu0
                row.upstream_cpu += cpu_seconds([upstream]) - up0
                row.stats.add(st)
                row.rounds.append(st)
    return rows


def paired(a: StreamRow, b: StreamRow, q: float) -> float:
    """Median over rounds of (a's TTFB percentile q − b's) in the same round: contenders run
    back to back in each round, so a burst of load from elsewhere hits both or neither."""
    diffs = [pct(x.ttfb, q) - pct(y.ttfb, q) for x, y in zip(a.rounds, b.rounds, strict=True)]
    return statistics.median(diffs) if diffs else float("nan")


def run_streams(
    contenders: list[Contender], upstream: psutil.Process, s: StreamSettings
) -> dict[int, dict[str, StreamRow]]:
    out = {}
    for conc, (rounds, per_round) in s.levels.items():
        # The client on uvloop when it can: its own delays are noise in every contender's TTFB.
        with asyncio.Runner(loop_factory=loop_factory("uvloop" if HAVE_UVLOOP else "asyncio")) as r:
            out[conc] = r.run(_stream_level(contenders, upstream, conc, rounds, per_round, s))
    return out


# -- saturation ----------------------------------------------------------------------------


@dataclass
class SatRow:
    requests: int = 0
    seconds: float = 0.0
    bad: int = 0
    cpu: float = 0.0
    upstream_cpu: float = 0.0
    client_cpu: float = 0.0
    p50_ms: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)
    # CPU seconds per request in each round: a burst of load from elsewhere hits one round,
    # and a ratio taken round by round (the contenders run back to back) sheds it.
    per_round: list[float] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def per_request_us(self, cpu: float) -> float:
        return cpu / self.requests * 1e6 if self.requests else float("nan")


@dataclass
class SatSettings:
    conns: int = 16
    seconds: float = 5.0
    warmup: float = 1.0
    rounds: int = 3
    stream_tokens: int = 64


def run_saturation(
    contenders: list[Contender], upstream: psutil.Process, s: SatSettings
) -> dict[str, dict[str, SatRow]]:
    """workload ("plain", "stream") -> contender -> totals over the rounds."""
    workloads = {
        "plain": load.chat_body(False),
        "stream": load.chat_body(True, tokens=s.stream_tokens),
    }
    out: dict[str, dict[str, SatRow]] = {}
    for name, body in workloads.items():
        rows = {c.key: SatRow() for c in contenders}
        for r in range(s.rounds):
            order = contenders if r % 2 == 0 else contenders[::-1]
            for c in order:
                url = c.base + load.CHAT
                load.burst(url, body, AUTH, s.conns, s.warmup)
                procs = c.procs()
                cpu0, up0 = cpu_seconds(procs), cpu_seconds([upstream])
                b = load.burst(url, body, AUTH, s.conns, s.seconds)
                row = rows[c.key]
                cpu = cpu_seconds(procs) - cpu0
                row.cpu += cpu
                row.per_round.append(cpu / b.requests if b.requests else math.nan)
                row.upstream_cpu += cpu_seconds([upstream]) - up0
                row.client_cpu += b.client_cpu
                row.requests += b.requests
                row.seconds += b.seconds
                row.bad += b.bad
                if b.p50_ms is not None and b.p99_ms is not None:
                    row.p50_ms.append(b.p50_ms)
                    row.p99_ms.append(b.p99_ms)
        out[name] = rows
    return out


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")

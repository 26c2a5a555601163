"""swapd's benchmarks: does swapd cost anything next to the same upstream reached directly?

    python -m bench [--quick] [--only stream,saturation,control,footprint,scale]
                    [--wait-load 1.0] [--no-write]

Runs every measurement in one go on this machine and rewrites the results section of
docs/benchmarks.md (between the `bench:results` markers; the rest of the file is kept). Takes
about 8 minutes; `--quick` (about 2) is for trying the harness, not for numbers. Needs `wrk`
for the saturation runs (falls back to an aiohttp client) and, for contender (d), LiteLLM's
proxy in its own venv (`BENCH_LITELLM=/path/to/bin/litellm`, default /tmp/litellm-venv).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import control, datapath, load, procs
from bench.datapath import Contender, RssWatch, pct

DOC = procs.ROOT / "docs" / "benchmarks.md"
BEGIN = "<!-- bench:results:begin -->"
END = "<!-- bench:results:end -->"
PHASES = ("stream", "saturation", "control", "footprint", "scale")

LABELS = {
    "direct": "(a) direct",
    "relay": "(b) bare relay, asyncio",
    "relay-uvloop": "(b′) bare relay, uvloop",
    "swapd": "(c) swapd, uvloop",
    "swapd-asyncio": "(c′) swapd, asyncio",
    "litellm": "(d) LiteLLM proxy",
}


@dataclass
class Run:
    started: str = ""
    load_before: str = ""
    load_after: str = ""
    seconds: float = 0.0
    streams: dict[int, dict[str, datapath.StreamRow]] = field(default_factory=dict)
    stream_settings: datapath.StreamSettings = field(default_factory=datapath.StreamSettings)
    sat: dict[str, dict[str, datapath.SatRow]] = field(default_factory=dict)
    sat_settings: datapath.SatSettings = field(default_factory=datapath.SatSettings)
    litellm_note: str = ""
    rss_streams: int = 0
    rss_saturation: int = 0
    readiness: list[control.Readiness] = field(default_factory=list)
    swaps: list[control.Swap] = field(default_factory=list)
    kills: list[float] = field(default_factory=list)
    kill_grace: float = 1.0
    idle: control.Idle | None = None
    loading: control.Idle | None = None
    scale: list[control.Scale] = field(default_factory=list)


# -- running ---------------------------------------------------------------------------------


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def wait_for_quiet(limit: float, deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while True:
        one = float(loadavg().split()[0])
        if one < limit:
            return
        if time.monotonic() > deadline:
            print(f"load still {one} after {deadline_s:.0f}s; running anyway", file=sys.stderr)
            return
        print(f"waiting for a quiet machine: 1-min load {one} ≥ {limit}", file=sys.stderr)
        time.sleep(15)


def swapd_for(
    upstream: procs.Server, workdir: Path, loop: str, extra: dict[str, Any] | None = None,
    name: str = "",
) -> procs.Swapd:
    """swapd as deployed: auth on, logging at info, metrics on; its model's `proxy:` is the
    shared upstream and its `cmd` a placeholder process that swapd supervises. `extra`: more
    top-level config keys."""
    name = name or f"swapd-{loop}"
    sw = procs.Swapd(
        name,
        workdir / name,
        {
            "logLevel": "info",
            "apiKeys": [procs.API_KEY],
            "models": {"m": {"cmd": "sleep 86400", "proxy": upstream.url, "ttl": 0}},
            "hooks": {"on_startup": {"preload": ["m"]}},
            **(extra or {}),
        },
        loop=loop,
    )
    sw.start().wait_http()
    procs.wait_until(
        lambda: sw.status()["models"]["m"]["state"] == "ready", 30, message="model m ready"
    )
    return sw


@contextlib.contextmanager
def servers(workdir: Path, want_litellm: bool, run: Run) -> Iterator[dict[str, Any]]:
    started: list[procs.Server] = []
    try:
        up = procs.upstream(workdir).start().wait_http()
        started.append(up)
        relay = procs.relay(workdir, up.url, "asyncio").start().wait_http("/health")
        started.append(relay)
        relay_uv = procs.relay(workdir, up.url, "uvloop").start().wait_http("/health")
        started.append(relay_uv)
        sw = swapd_for(up, workdir, "uvloop")
        started.append(sw)
        sw_aio = swapd_for(up, workdir, "asyncio")
        started.append(sw_aio)
        lite = procs.litellm(workdir, up.url) if want_litellm else None
        if want_litellm and lite is None:
            run.litellm_note = f"LiteLLM is not installed at {procs.LITELLM}: (d) skipped."
        if lite is not None:
            lite.start()
            started.append(lite)
            try:
                lite.wait_http("/health/liveliness", timeout=180)
            except (TimeoutError, RuntimeError) as exc:
                run.litellm_note = f"LiteLLM did not start: {exc}"[:300]
                lite.stop()
                lite = None
        yield {
            "upstream": up,
            "relay": relay,
            "relay-uvloop": relay_uv,
            "swapd": sw,
            "swapd-asyncio": sw_aio,
            "litellm": lite,
        }
    finally:
        for s in reversed(started):
            s.stop()


def contender(key: str, server: procs.Server | None, base: str | None = None) -> Contender:
    if server is None:
        assert base is not None
        return Contender(key, LABELS[key], base)
    return Contender(key, LABELS[key], server.url, server.tree)


def run_all(args: argparse.Namespace) -> Run:
    run = Run()
    phases = set(args.only.split(",")) if args.only else set(PHASES)
    if args.quick:
        run.stream_settings = datapath.StreamSettings(
            tokens=32, levels={1: (2, 3), 16: (2, 1), 64: (2, 1)}
        )
        run.sat_settings = datapath.SatSettings(seconds=2, rounds=1)
    run.started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    run.load_before = loadavg()
    t0 = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="swapd-bench-"))
    print(f"work folder: {workdir}", file=sys.stderr)

    if phases & {"stream", "saturation"}:
        with servers(workdir, "saturation" in phases and not args.no_litellm, run) as s:
            up = s["upstream"].process()
            direct = contender("direct", None, s["upstream"].url)
            swapd_proc = s["swapd"].process()
            if "stream" in phases:
                print("LLM-shaped streams...", file=sys.stderr)
                cs = [
                    direct,
                    contender("relay", s["relay"]),
                    contender("swapd", s["swapd"]),
                    contender("swapd-asyncio", s["swapd-asyncio"]),
                ]
                with RssWatch(swapd_proc) as w:
                    run.streams = datapath.run_streams(cs, up, run.stream_settings)
                run.rss_streams = w.peak
            if "saturation" in phases:
                print("saturation...", file=sys.stderr)
                cs = [
                    direct,
                    contender("relay", s["relay"]),
                    contender("relay-uvloop", s["relay-uvloop"]),
                    contender("swapd", s["swapd"]),
                    contender("swapd-asyncio", s["swapd-asyncio"]),
                ]
                if s["litellm"] is not None:
                    cs.append(contender("litellm", s["litellm"]))
                with RssWatch(swapd_proc) as w:
                    run.sat = datapath.run_saturation(cs, up, run.sat_settings)
                run.rss_saturation = w.peak
    if "control" in phases:
        print("control path...", file=sys.stderr)
        rounds = 3 if args.quick else 8
        run.readiness = control.readiness(workdir, rounds=rounds)
        run.swaps = control.swaps(workdir, rounds=2 if args.quick else 6)
        run.kills = control.escalation(workdir, rounds=2 if args.quick else 3, grace=run.kill_grace)
    if "footprint" in phases:
        print("idle footprint...", file=sys.stderr)
        run.idle = control.idle(workdir, seconds=5 if args.quick else 30)
        run.loading = control.loading(workdir, seconds=3 if args.quick else 6)
    if "scale" in phases:
        print("scale...", file=sys.stderr)
        run.scale = control.scale(workdir, requests=200 if args.quick else 1000)
    run.seconds = time.monotonic() - t0
    run.load_after = loadavg()
    return run


# -- report ----------------------------------------------------------------------------------


def ms(x: float, digits: int = 1) -> str:
    return "–" if math.isnan(x) else f"{x * 1e3:.{digits}f}"


def us(x: float) -> str:
    return "–" if math.isnan(x) else f"{x * 1e6:.0f}"


def mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def versions() -> str:
    import aiohttp

    parts = [f"Python {platform.python_version()}", f"aiohttp {aiohttp.__version__}"]
    with contextlib.suppress(ImportError):
        import uvloop

        parts.append(f"uvloop {uvloop.__version__}")
    if procs.LITELLM.exists():
        pip = procs.LITELLM.parent / "pip"
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [str(pip), "show", "litellm"], capture_output=True, text=True, timeout=60
            ).stdout
            for line in out.splitlines():
                if line.startswith("Version:"):
                    parts.append(f"LiteLLM {line.split()[1]}")
    if load.WRK:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([load.WRK, "-v"], capture_output=True, text=True).stdout
            parts.append(out.split()[0] + " " + out.split()[1] if out else "wrk")
    return ", ".join(parts)


def machine() -> str:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem = Path("/proc/meminfo").read_text().split()[1]
    return (
        f"{os.cpu_count()} cores ({model}), {int(mem) / 2**20:.0f} GiB RAM, "
        f"Linux {platform.release()}"
    )


@dataclass
class Target:
    what: str
    measured: str
    met: bool | None  # None: not measured


def render(run: Run) -> str:
    out: list[str] = []
    targets: list[Target] = []
    w = out.append
    w(f"Run of {run.started}: {machine()}; {versions()}.")
    w(
        f"Load average (1, 5, 15 min) {run.load_before} before, {run.load_after} after; "
        f"the run took {run.seconds / 60:.1f} min."
    )
    w("")

    if run.streams:
        s = run.stream_settings
        w("### Data path, LLM-shaped upstream")
        w("")
        w(
            f"Each stream: time to first token {s.ttft * 1e3:.0f} ms, then {s.tokens} tokens at "
            f"{1 / s.token_delay:.0f} tokens/s (one SSE chunk each). TTFB: request sent → first "
            "token received. Chunk delay: the upstream wrote the chunk → the client read it "
            "(one monotonic clock). Late: chunks delayed more than one token interval "
            f"({s.token_delay * 1e3:.0f} ms). CPU: the relay's own CPU time per chunk relayed "
            "(per-request work included). In the targets, swapd is compared with (b) round by "
            "round (they run back to back in each round) and the median over rounds is taken: a "
            "burst of load from elsewhere on this shared machine hits one round, not the result."
        )
        w("")
        w(
            "| streams | contender | requests | tokens/s | × direct | TTFB p50 ms | TTFB p99 ms "
            "| added p50 ms | added p99 ms | chunk delay p50 / p99 / max ms | late | "
            "CPU µs/chunk | errors |"
        )
        w("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for conc, rows in run.streams.items():
            d = rows["direct"]
            d50, d99 = pct(d.stats.ttfb, 50), pct(d.stats.ttfb, 99)
            for key, r in rows.items():
                st = r.stats
                p50, p99 = pct(st.ttfb, 50), pct(st.ttfb, 99)
                late = sum(1 for x in st.delays if x > s.token_delay)
                ratio = r.tokens_per_s / d.tokens_per_s if d.tokens_per_s else float("nan")
                w(
                    f"| {conc} | {LABELS[key]} | {st.requests} | {r.tokens_per_s:.0f} | "
                    f"{ratio:.3f} | {ms(p50)} | {ms(p99)} | "
                    f"{'' if key == 'direct' else ms(p50 - d50, 2)} | "
                    f"{'' if key == 'direct' else ms(p99 - d99, 2)} | "
                    f"{ms(pct(st.delays, 50), 2)} / {ms(pct(st.delays, 99), 2)} / "
                    f"{ms(max(st.delays) if st.delays else float('nan'), 1)} | {late} | "
                    f"{'' if key == 'direct' else us(r.cpu / max(st.tokens, 1))} | {st.errors} |"
                )
        w("")
        for key in ("swapd", "swapd-asyncio"):
            ratios, add50, add99, lates = [], [], [], []
            for _conc, rows in run.streams.items():
                if key not in rows:
                    continue
                d, r, b = rows["direct"], rows[key], rows["relay"]
                ratios.append(r.tokens_per_s / d.tokens_per_s)
                add50.append(datapath.paired(r, b, 50))
                add99.append(datapath.paired(r, b, 99))
                lates.append(
                    sum(1 for x in r.stats.delays if x > s.token_delay)
                    - sum(1 for x in d.stats.delays if x > s.token_delay)
                )
            if not ratios:
                continue
            label = LABELS[key]
            targets.append(
                Target(
                    f"{label}: aggregate tokens/s ≥ 0.98× direct (1, 16, 64 streams)",
                    " / ".join(f"{x:.3f}" for x in ratios),
                    min(ratios) >= 0.98,
                )
            )
            targets.append(
                Target(
                    f"{label}: added TTFB within 1 ms of the bare relay's, p50 (1, 16, 64; "
                    "median over rounds of the difference to (b) in the same round)",
                    " / ".join(f"{x * 1e3:+.2f} ms" for x in add50),
                    max(add50) <= 0.001,
                )
            )
            targets.append(
                Target(
                    f"{label}: same, p99 (1, 16, 64)",
                    " / ".join(f"{x * 1e3:+.2f} ms" for x in add99),
                    max(add99) <= 0.001,
                )
            )
            targets.append(
                Target(
                    f"{label}: no chunk delayed by buffering (late chunks beyond direct's)",
                    " / ".join(str(x) for x in lates),
                    max(lates) <= 0,
                )
            )

    if run.sat:
        s2 = run.sat_settings
        w("### Data path at saturation (instant upstream)")
        w("")
        client = "wrk, one thread" if load.WRK else "an aiohttp client"
        w(
            f"Closed loop, {s2.conns} keep-alive connections ({client}), "
            f"{s2.rounds} × {s2.seconds:g} s per contender, contenders interleaved. CPU: user + "
            "system time of the contender's own process(es) (psutil), divided by the requests "
            "answered. Latency: wrk's, median of the rounds."
        )
        w("")
        titles = {
            "plain": "Non-streaming chat completion (a ~300-byte JSON answer)",
            "stream": f"Streaming chat completion, {s2.stream_tokens} chunks written at once",
        }
        for wl, rows in run.sat.items():
            base = rows.get("relay")
            w(f"**{titles[wl]}**")
            w("")
            w(
                "| contender | req/s | CPU µs/request | × (b) | upstream CPU µs/req | "
                "client CPU µs/req | latency p50 / p99 ms | errors |"
            )
            w("|---|---|---|---|---|---|---|---|")
            for key, r in rows.items():
                cpu = r.cpu / r.requests if r.requests else float("nan")
                rel = (
                    f"{cpu / (base.cpu / base.requests):.2f}"
                    if base and base.requests and key != "direct"
                    else ""
                )
                lat = (
                    f"{datapath.median(r.p50_ms):.2f} / {datapath.median(r.p99_ms):.2f}"
                    if r.p50_ms
                    else "–"
                )
                w(
                    f"| {LABELS[key]} | {r.rps:.0f} | {'' if key == 'direct' else us(cpu)} | "
                    f"{rel} | {us(r.upstream_cpu / max(r.requests, 1))} | "
                    f"{us(r.client_cpu / max(r.requests, 1))} | {lat} | {r.bad} |"
                )
            if wl == "stream":
                w("")
                w(
                    f"Per chunk ({s2.stream_tokens} per request, per-request work included): "
                    + ", ".join(
                        f"{LABELS[k]} {us(r.cpu / r.requests / s2.stream_tokens)} µs"
                        for k, r in rows.items()
                        if k != "direct" and r.requests
                    )
                    + "."
                )
            w("")
        if run.litellm_note:
            w(run.litellm_note)
            w("")
        plain = run.sat.get("plain", {})
        if "relay" in plain:
            b = plain["relay"].cpu / plain["relay"].requests
            for key in ("swapd", "swapd-asyncio"):
                if key in plain:
                    c = plain[key].cpu / plain[key].requests
                    targets.append(
                        Target(
                            f"{LABELS[key]}: CPU per request at or below (b)",
                            f"{c * 1e6:.0f} µs vs {b * 1e6:.0f} µs = {c / b:.2f}×",
                            c <= b,
                        )
                    )
                    targets.append(
                        Target(
                            f"{LABELS[key]}: CPU per request never worse than 1.2× (b)",
                            f"{c / b:.2f}×",
                            c <= b * 1.2,
                        )
                    )
            if "litellm" in plain and "swapd" in plain:
                d = plain["litellm"].cpu / plain["litellm"].requests
                c = plain["swapd"].cpu / plain["swapd"].requests
                targets.append(
                    Target(
                        "(c) swapd far ahead of (d) LiteLLM in CPU per request",
                        f"{c * 1e6:.0f} µs vs {d * 1e6:.0f} µs: LiteLLM costs {d / c:.1f}×",
                        d / c >= 3,
                    )
                )

    if run.readiness or run.swaps or run.kills:
        w("### Control path")
        w("")
    if run.readiness:
        w(
            "Engine ready → swapd's `engine ready` log line, and → the queued request that "
            "started it reaching the engine (the engine's `--record` times vs swapd's log "
            "time; each round a cold start by a chat request):"
        )
        w("")
        w("| engine style | rounds | noticed p50 ms | noticed max ms | request p50 ms "
          "| request max ms |")
        w("|---|---|---|---|---|---|")
        worst = 0.0
        for r in run.readiness:
            worst = max(worst, max(r.lags))
            w(f"| {r.style} | {len(r.lags)} | {ms(statistics.median(r.lags))} | "
              f"{ms(max(r.lags))} | {ms(statistics.median(r.to_request))} | "
              f"{ms(max(r.to_request))} |")
        w("")
        targets.append(
            Target("engine ready → swapd notices ≤ 100 ms", f"max {ms(worst)} ms", worst <= 0.1)
        )
        health = run.readiness[0].to_request
        targets.append(Target(
            "/health 200 → first queued request reaches the engine: p50 ≤ 25 ms, max ≤ 50 ms",
            f"p50 {ms(statistics.median(health))} ms, max {ms(max(health))} ms",
            statistics.median(health) <= 0.025 and max(health) <= 0.05))
    if run.swaps:
        w(
            f"Swap: a request for B while A is the GPU tenant, to B's answer ({len(run.swaps)} "
            f"swaps, A↔B; fake engines: `{' '.join(control.SWAP_FLAGS)}`, so A's own stop is "
            "~0.3 s and B's own start ~0.5 s plus interpreter start). A's exit is seen "
            "through a pidfd; the other instants are swapd's log lines and the engine's record."
        )
        w("")
        cols = [
            ("drain", "request → SIGTERM to A"),
            ("stop_engine", "A's own stop (SIGTERM → exit)"),
            ("stop_notice", "A's exit → swapd saw the group gone"),
            ("memory", "memory check → B spawned"),
            ("start_engine", "B's own start (spawn → ready)"),
            ("readiness", "B ready → swapd noticed"),
            ("first_byte", "noticed → client has the answer"),
        ]
        w("| step | median ms | max ms | whose |")
        w("|---|---|---|---|")
        for attr, title in cols:
            vals = [getattr(x, attr) for x in run.swaps]
            whose = "engine" if attr in ("stop_engine", "start_engine") else "swapd"
            w(f"| {title} | {ms(statistics.median(vals))} | {ms(max(vals))} | {whose} |")
        totals = [x.total for x in run.swaps]
        shares = [x.swapd_share for x in run.swaps]
        w(f"| **total** | {ms(statistics.median(totals))} | {ms(max(totals))} | |")
        med = statistics.median(shares)
        w(f"| **swapd's share** (total − engines' own) | {ms(med)} | {ms(max(shares))} | |")
        w("")
        targets.append(
            Target(
                "swap: swapd's share ≤ 200 ms beyond the engines' own stop and start",
                f"median {ms(statistics.median(shares))} ms, max {ms(max(shares))} ms",
                max(shares) <= 0.2,
            )
        )
    if run.kills:
        w(
            f"SIGKILL escalation: an engine (and its grandchild) ignoring SIGTERM, "
            f"`unloadTimeout: {run.kill_grace:g}`; SIGTERM → swapd's `engine outlived its grace: "
            "SIGKILL` line, which it writes once the killed group is confirmed gone, minus the "
            f"grace: {', '.join(ms(x) + ' ms' for x in run.kills)}."
        )
        w("")
        targets.append(
            Target(
                "SIGKILL within 100 ms after unloadTimeout",
                f"max {ms(max(run.kills))} ms (upper bound: includes confirming the group gone)",
                max(run.kills) <= 0.1,
            )
        )

    if run.idle or run.rss_streams or run.rss_saturation:
        w("### Footprint")
        w("")
    if run.idle:
        i = run.idle
        w(
            f"Idle, 10 configured models, none started, auth on: resident memory {mb(i.rss)}; "
            f"CPU {i.cpu_share * 100:.3f}% of one core over {i.seconds:.0f} s "
            f"({i.wakeups:.1f} wake-ups/s over its {i.threads} threads; /proc schedstat)."
        )
        targets.append(
            Target("idle resident memory ≤ 80 MB (10 models)", mb(i.rss), i.rss <= 80 * 2**20)
        )
        targets.append(
            Target(
                "idle CPU < 0.5% of one core (no busy polling)",
                f"{i.cpu_share * 100:.3f}%",
                i.cpu_share < 0.005,
            )
        )
    if run.loading:
        i = run.loading
        w(
            f"While an engine loads (/health answering 503, probed every 50 ms): CPU "
            f"{i.cpu_share * 100:.2f}% of one core, {i.wakeups:.0f} wake-ups/s."
        )
    if run.rss_streams or run.rss_saturation:
        parts = []
        if run.rss_streams:
            parts.append(
                f"peak resident memory of (c) during the stream runs {mb(run.rss_streams)}"
            )
        if run.rss_saturation:
            parts.append(f"during the saturation runs {mb(run.rss_saturation)}")
        if 64 in run.streams and "swapd" in run.streams[64]:
            r = run.streams[64]["swapd"]
            parts.append(
                f"CPU of (c) while relaying 64 streams: "
                f"{r.cpu / r.stats.wall * 100:.0f}% of one core"
            )
        w("Under load: " + "; ".join(parts) + ".")
    w("")

    if run.scale:
        w("### Scale")
        w("")
        w(
            "Requests sent all at once for a cold model whose engine opens its port only after "
            "a slow start (`--boot-delay`), `maxQueue` above the count; then the model is "
            "unloaded and the same again (a second wave shows whether memory keeps growing)."
        )
        w("")
        w(
            "| wave | requests | answers | engine ready → last answer | RSS before | RSS peak "
            "| RSS after | swapd CPU |"
        )
        w("|---|---|---|---|---|---|---|---|")
        for n, sc in enumerate(run.scale, 1):
            answers = ", ".join(f"{k or 'failed'}: {v}" for k, v in sorted(sc.statuses.items()))
            w(
                f"| {n} | {sc.requests} | {answers} | {sc.served_after_ready:.2f} s | "
                f"{mb(sc.rss_before)} | {mb(sc.rss_peak)} | {mb(sc.rss_after)} | {sc.cpu:.2f} s |"
            )
        w("")
        ok = all(sc.statuses.get(200, 0) == sc.requests for sc in run.scale)
        first, last = run.scale[0], run.scale[-1]
        bounded = last.rss_peak <= first.rss_peak * 1.1
        targets.append(
            Target(
                f"{first.requests} requests queued behind a slow cold start: all served, none lost",
                ", ".join(
                    f"{sum(sc.statuses.values())} answers, {sc.statuses.get(200, 0)} × 200"
                    for sc in run.scale
                ),
                ok,
            )
        )
        targets.append(
            Target(
                "swapd's memory bounded (second wave's peak within 10% of the first's)",
                f"{mb(first.rss_peak)} then {mb(last.rss_peak)}",
                bounded,
            )
        )

    if targets:
        w("### Targets")
        w("")
        w("| target | measured | met |")
        w("|---|---|---|")
        for t in targets:
            mark = "–" if t.met is None else ("yes" if t.met else "**no**")
            w(f"| {t.what} | {t.measured} | {mark} |")
        w("")
    return "\n".join(out).rstrip() + "\n"


def write_doc(section: str) -> None:
    text = DOC.read_text() if DOC.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text = text.rstrip() + f"\n\n## Results\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{BEGIN}\n{section}{END}{tail}")


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="short runs: try the harness")
    p.add_argument("--only", default="", help=f"comma-separated phases of {', '.join(PHASES)}")
    p.add_argument("--no-write", action="store_true", help="print, do not touch the doc")
    p.add_argument("--no-litellm", action="store_true", help="skip contender (d)")
    p.add_argument(
        "--wait-load",
        type=float,
        default=0.0,
        metavar="L",
        help="first wait (up to --wait-max s) until the 1-min load average is below L",
    )
    p.add_argument("--wait-max", type=float, default=1200.0)
    args = p.parse_args()
    # One bench at a time on this machine: two would measure each other.
    lock = open(Path(tempfile.gettempdir()) / "swapd-bench.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sys.exit("another `python -m bench` is running on this machine")
    if args.wait_load:
        wait_for_quiet(args.wait_load, args.wait_max)
    run = run_all(args)
    section = render(run)
    print(section)
    if not args.no_write:
        write_doc(section)
        print(f"wrote {DOC.relative_to(procs.ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""Warm swaps against cold swaps, A↔B, with the stand-in that frees real memory (issue 20).

    python -m bench.warm [--rounds 6] [--ballast-mb 400] [--boot 2.0] [--write]

Two swapd daemons in one run, on the same two fake engines (tests/fake_engine.py with a
ballast of `--ballast-mb` MiB of touched RAM, the "weights", and `--boot` seconds before its
port opens, the "load from disk"): one stops and cold-starts on every swap (no sleepMode), the
other puts the old tenant to sleep (`engine: vllm`, `sleepMode: enable`: the preset's level 2
calls) and wakes the new one. Each swap is a chat request for the model that is not the
tenant, timed from the request to its answer, and split into the engines' own time and
swapd's share:

- cold: the old engine's stop (SIGTERM → its exit) and the new one's start (spawn → ready, the
  stand-in's `ready` record) are the engines'; the rest (draining, noticing the exit, the
  memory release wait, the readiness probe, relaying the answer) is swapd's;
- warm: the old engine's sleep (swapd's "putting engine to sleep" → the stand-in's `sleep`
  record, its ballast freed) and the new one's wake (swapd's "waking engine" → the stand-in's
  `wake` record, its ballast touched again) are the engines'; the rest (the memory check that
  verifies the sleep, the other wake calls, the readiness probe, relaying) is swapd's.

`--write` puts the table into docs/benchmarks.md between the `bench:warm` markers.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import write_section
from bench.control import chat, fake_cmd, records
from bench.procs import ROOT, Swapd, parse_ts

DOC = ROOT / "docs" / "benchmarks.md"
BEGIN = "<!-- bench:warm:begin -->"
END = "<!-- bench:warm:end -->"


@dataclass
class Swap:
    total: float  # request → the answer
    engines: float  # the engines' own part (see the module's docstring)

    @property
    def swapd_share(self) -> float:
        return self.total - self.engines


def _at(events: list[dict[str, Any]], event: str, model: str, since: float) -> float:
    for e in events:
        t = parse_ts(e["timestamp"])
        if t >= since and e.get("event") == event and e.get("model") == model:
            return t
    raise RuntimeError(f"no {event!r} for {model} in swapd's log")


def _rec(path: Path, event: str, model: str, since: float) -> float:
    for r in records(path):
        if r["t"] >= since and r["event"] == event and r["model"] == model:
            return float(r["t"])
    raise RuntimeError(f"no {event!r} record for {model}")


def run(workdir: Path, warm: bool, rounds: int, ballast_mb: int, boot: float) -> list[Swap]:
    rec = workdir / ("warm.jsonl" if warm else "cold.jsonl")
    flags = ("--alloc-mb", str(ballast_mb), "--boot-delay", str(boot))
    extra: dict[str, Any] = {"engine": "vllm", "sleepMode": "enable"} if warm else {}
    cfg = {
        "logLevel": "debug",
        "models": {m: {"cmd": fake_cmd(m, rec, *flags), "ttl": 0, "healthCheckTimeout": 120,
                       "unloadTimeout": 10, **extra} for m in ("a", "b")},
    }
    sw = Swapd("swapd-warm" if warm else "swapd-cold", workdir / ("warm" if warm else "cold"),
               cfg).start().wait_http()
    out = []
    try:
        for model in ("a", "b"):  # both loaded once: from here on every swap is measured
            if chat(sw, model)[0] != 200:
                raise RuntimeError(sw.log()[-2000:])
        for n in range(rounds):
            old, new = ("b", "a") if n % 2 == 0 else ("a", "b")
            t_req = time.time()
            code, t_answer = chat(sw, new)
            if code != 200:
                raise RuntimeError(f"swap request answered {code}: {sw.log()[-2000:]}")
            ev = sw.events()
            if warm:
                asleep = _rec(rec, "sleep", old, t_req) - _at(ev, "putting engine to sleep",
                                                              old, t_req)
                woken = _rec(rec, "wake", new, t_req) - _at(ev, "waking engine", new, t_req)
                engines = asleep + woken
            else:
                t_term = _at(ev, "stopping engine", old, t_req)
                t_exit = _rec(rec, "exit", old, t_req)
                t_spawn = _at(ev, "engine spawned", new, t_req)
                engines = (t_exit - t_term) + (_rec(rec, "ready", new, t_req) - t_spawn)
            out.append(Swap(total=t_answer - t_req, engines=engines))
        if warm and '"no_memory_freed"' in sw.log():
            raise RuntimeError("a sleep freed too little: the warm runs were not warm")
    finally:
        sw.stop()
    return out


def table(cold: list[Swap], warm: list[Swap], ballast_mb: int, boot: float) -> str:
    def med(xs: list[float]) -> str:
        return f"{statistics.median(xs) * 1000:.0f} ms"

    def span(xs: list[float]) -> str:
        return f"{min(xs) * 1000:.0f}–{max(xs) * 1000:.0f} ms"

    rows = [
        "| swap A↔B | total (median) | range | engines' own | swapd's share (median) | range |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, swaps in (("cold: stop, start", cold), ("warm: sleep, wake", warm)):
        rows.append(
            f"| {label} | {med([s.total for s in swaps])} | {span([s.total for s in swaps])} "
            f"| {med([s.engines for s in swaps])} | {med([s.swapd_share for s in swaps])} "
            f"| {span([s.swapd_share for s in swaps])} |")
    ratio = statistics.median([s.total for s in cold]) / statistics.median(
        [s.total for s in warm])
    return "\n".join([
        f"Stand-in: tests/fake_engine.py with `--alloc-mb {ballast_mb} --boot-delay {boot:g}` "
        f"({len(cold)} cold and {len(warm)} warm swaps, one run, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}); the warm swap is "
        f"{ratio:.1f}× faster.",
        "",
        *rows,
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--ballast-mb", type=int, default=400)
    p.add_argument("--boot", type=float, default=2.0)
    p.add_argument("--write", action="store_true")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-warm-") as tmp:
        cold = run(Path(tmp), False, args.rounds, args.ballast_mb, args.boot)
        warm = run(Path(tmp), True, args.rounds, args.ballast_mb, args.boot)
    text = table(cold, warm, args.ballast_mb, args.boot)
    print(text)
    for label, swaps in (("cold", cold), ("warm", warm)):
        print(label, " ".join(f"{s.total * 1000:.0f}/{s.swapd_share * 1000:.0f}" for s in swaps),
              "(total/swapd ms)")
    if args.write:
        write_section(DOC, BEGIN, END, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Data-path CPU of swapd at a git revision against the working tree, side by side.

    python -m bench.compare REF [--seconds 5] [--rounds 3]

`REF`'s `swapd/` is extracted (git archive) into a temporary folder and run from there; the
working tree's swapd runs on both event loops; the bare relay (asyncio) is the yardstick. Every
contender talks to the same upstream, under the same closed-loop load as `python -m bench`'s
saturation runs. Prints a Markdown table: how a change to the relay path moved its cost, as
totals over the rounds and as the median of the ratios taken round by round (the contenders
of a round run back to back: a burst of load from elsewhere moves one round, not the median).
"""

from __future__ import annotations

import argparse
import math
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from bench import datapath, procs
from bench.__main__ import contender, swapd_for
from bench.datapath import Contender


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n")[0])
    p.add_argument("ref", help="git revision to compare with (e.g. HEAD, a commit)")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--proxy-host",
        default="",
        help="a name of this machine for the old swapd's proxy URL (e.g. one /etc/hosts maps to "
        "127.0.0.1): revisions from bf2e9c3 to a03e862 refuse a placeholder cmd in front of a "
        "server on a loopback address, and do not resolve names",
    )
    p.add_argument(
        "--activity-off",
        action="store_true",
        help="also the working tree (uvloop) with activity.size: 0: what activity records cost",
    )
    p.add_argument(
        "--keys",
        type=int,
        default=0,
        help="also the working tree (uvloop) with no key at all, and with this many named keys "
        "(the bench's own one of them, with a scope and every limit): what named keys cost",
    )
    args = p.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="swapd-compare-"))
    old_tree = workdir / "tree"
    old_tree.mkdir()
    archive = subprocess.run(
        ["git", "archive", args.ref, "swapd"], cwd=procs.ROOT, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(old_tree)], input=archive, check=True)

    started: list[procs.Server] = []
    try:
        up = procs.upstream(workdir).start().wait_http()
        started.append(up)
        relay = procs.relay(workdir, up.url, "asyncio").start().wait_http("/health")
        started.append(relay)
        old = {}
        old_url = up.url.replace("127.0.0.1", args.proxy_host) if args.proxy_host else up.url
        for loop in ("asyncio", "uvloop"):
            sw = procs.Swapd(
                f"old-{loop}",
                workdir / f"old-{loop}",
                {
                    "logLevel": "info",
                    "apiKeys": [procs.API_KEY],
                    "models": {"m": {"cmd": "sleep 86400", "proxy": old_url, "ttl": 0}},
                    "hooks": {"on_startup": {"preload": ["m"]}},
                },
                loop=loop,
            )
            sw.cwd = old_tree
            sw.start().wait_http()
            started.append(sw)
            procs.wait_until(
                lambda sw=sw: sw.status()["models"]["m"]["state"] == "ready", 30, message="m"
            )
            old[loop] = sw
        new = {loop: swapd_for(up, workdir, loop) for loop in ("asyncio", "uvloop")}
        started += new.values()
        if args.activity_off:
            new["quiet"] = swapd_for(up, workdir, "uvloop", {"activity": {"size": 0}}, "quiet")
            started.append(new["quiet"])
        if args.keys:
            new["nokeys"] = swapd_for(up, workdir, "uvloop", {"apiKeys": []}, "nokeys")
            started.append(new["nokeys"])
            new["keys"] = swapd_for(up, workdir, "uvloop", named_keys(args.keys), "keys")
            started.append(new["keys"])
        cs = [
            contender("relay", relay),
            Contender(
                "old-asyncio", f"{args.ref}, asyncio", old["asyncio"].url, old["asyncio"].tree
            ),
            Contender(
                "old-uvloop", f"{args.ref}, default loop", old["uvloop"].url, old["uvloop"].tree
            ),
            Contender(
                "new-asyncio", "working tree, asyncio", new["asyncio"].url, new["asyncio"].tree
            ),
            Contender("new-uvloop", "working tree, uvloop", new["uvloop"].url, new["uvloop"].tree),
        ]
        if args.activity_off:
            cs.append(Contender("new-quiet", "working tree, uvloop, activity off",
                                new["quiet"].url, new["quiet"].tree))
        if args.keys:
            cs.append(Contender("new-nokeys", "working tree, uvloop, no keys",
                                new["nokeys"].url, new["nokeys"].tree))
            cs.append(Contender("new-keys", f"working tree, uvloop, {args.keys} named keys",
                                new["keys"].url, new["keys"].tree))
        labels = {c.key: c.label for c in cs}
        res = datapath.run_saturation(
            cs, up.process(), datapath.SatSettings(seconds=args.seconds, rounds=args.rounds)
        )
        print(f"Load average at the end: {Path('/proc/loadavg').read_text().split()[:3]}\n")
        print("| workload | contender | req/s | CPU µs/request | × relay | × relay, median of "
              "rounds |")
        print("|---|---|---|---|---|---|")
        for wl, rows in res.items():
            base = rows["relay"]
            b = base.cpu / base.requests
            for key, r in rows.items():
                c = r.cpu / r.requests
                pairs = zip(r.per_round, base.per_round, strict=True)
                paired = datapath.median([mine / theirs for mine, theirs in pairs
                                          if not math.isnan(mine / theirs)])
                print(f"| {wl} | {labels[key]} | {r.rps:.0f} | {c * 1e6:.0f} | {c / b:.2f} "
                      f"| {paired:.2f} |")
    finally:
        for s in reversed(started):
            s.stop()


def named_keys(n: int) -> dict[str, Any]:
    """`n` named keys (no apiKeys); the bench's key is the middle one, scoped to its model,
    with every limit set far above what the bench reaches (so each request is admitted,
    counted and released as a limited key's is)."""
    keys: dict[str, Any] = {
        f"user{i:03d}": {"key": f"bench-key-{i:03d}", "models": [f"other{i}*"]} for i in range(n)
    }
    keys[f"user{n // 2:03d}"] = {
        "key": procs.API_KEY,
        "models": ["m*"],
        "maxConcurrent": 10_000,
        "requestsPerMinute": 1_000_000_000,
        "tokensPerDay": 1_000_000_000_000,
    }
    return {"apiKeys": [], "keys": keys}


if __name__ == "__main__":
    main()

"""Where a relay's time goes per request: py-spy on swapd (working tree) or the bare relay
under the bench's closed-loop load, as microseconds of sampled time per request.

    python -m bench.profile swapd|relay [--workload plain|stream] [--seconds 8]
        [--py-spy PATH] [--top 40]

py-spy is not a dependency (`pip install py-spy` into any environment and pass its path).
Prints each function's inclusive time per request (its callees included) and the functions
whose own code the samples landed in. Read it as shares, not as CPU: py-spy samples the
thread's wall time while it is not idle, so a syscall counts as the Python frame that made it.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from bench import load, procs
from bench.__main__ import swapd_for
from bench.datapath import AUTH

RATE = 400  # samples a second
FRAME = re.compile(r"^(?P<name>.*?) \((?P<file>.*?)(?::\d+)?\)$")


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n")[0])
    p.add_argument("target", choices=("swapd", "relay"))
    p.add_argument("--workload", choices=("plain", "stream"), default="plain")
    p.add_argument("--seconds", type=int, default=8)
    p.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy")
    p.add_argument("--top", type=int, default=40)
    args = p.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="swapd-profile-"))
    raw = workdir / "samples.txt"
    started: list[procs.Server] = []
    try:
        up = procs.upstream(workdir).start().wait_http()
        started.append(up)
        if args.target == "relay":
            server: procs.Server = procs.relay(workdir, up.url, "asyncio").start()
            server.wait_http("/health")
        else:
            server = swapd_for(up, workdir, "uvloop")
        started.append(server)
        body = load.chat_body(args.workload == "stream")
        url = server.url + load.CHAT
        load.burst(url, body, AUTH, 16, 1.0)  # warm
        spy = subprocess.Popen(
            [args.py_spy, "record", "-p", str(server.process().pid), "-r", str(RATE),
             "-d", str(args.seconds), "-f", "raw", "-o", str(raw), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        done = load.burst(url, body, AUTH, 16, args.seconds)
        spy.wait()
    finally:
        for s in reversed(started):
            s.stop()
    report(raw, done.requests, args.top)


def report(raw: Path, requests: int, top: int) -> None:
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        names = [_name(f) for f in stack.split(";")]
        for name in set(names):
            inclusive[name] += n
        own[names[-1]] += n
    per_sample = 1e6 / RATE / max(requests, 1)  # µs per request one sample stands for
    print(f"{requests} requests; µs of sampled time per request\n\ninclusive:")
    for name, n in inclusive.most_common(top):
        print(f"{n * per_sample:8.1f}  {name}")
    print("\nown code:")
    for name, n in own.most_common(top):
        print(f"{n * per_sample:8.1f}  {name}")


def _name(frame: str) -> str:
    m = FRAME.match(frame)
    return f"{m['name']} ({Path(m['file']).name})" if m else frame


if __name__ == "__main__":
    main()

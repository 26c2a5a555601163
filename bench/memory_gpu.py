"""Footprint learning on a real NVIDIA GPU: NVML's per-process GPU memory counts.

    python -m bench.memory_gpu [--gb 8] [--out FILE]

Starts swapd with a fake engine that holds `--gb` GB of CUDA memory (torch) and 200 MiB of
host RAM, serves one request, unloads it, and reads back what swapd learned: the footprint
must cover the CUDA memory NVML attributes to the engine's processes, not only their RSS.
Then a second swapd on the same stateDir shows the figure as `learned`. Not part of CI (no
GPU there).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.gpu_smoke import FAKE, ROOT, call, smi
from tests.support import free_port

GiB = 1024**3


def start(cfg: dict[str, Any], tmp: str, name: str) -> tuple[subprocess.Popen[bytes], Any]:
    import yaml

    path = Path(tmp) / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = open(Path(tmp) / f"{name}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "swapd", "serve", "--config", str(path)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    base = f"http://{cfg['listen']}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if call("GET", base + "/health")[0] == 200:
                return proc, log
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("swapd did not come up")
        time.sleep(0.05)


def stop(proc: subprocess.Popen[bytes], log: Any) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    log.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=float, default=8)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    report: dict[str, Any] = {"gb": args.gb}
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        cfg = {
            "listen": f"127.0.0.1:{port}", "startPort": free_port(), "stateDir": f"{tmp}/state",
            "models": {"gpu": {
                "cmd": f"{sys.executable} {FAKE} --port ${{PORT}} --model-name gpu "
                       f"--gpu-alloc-gb {args.gb} --alloc-mb 200",
                "healthCheckTimeout": 120,
            }},
        }
        proc, log = start(cfg, tmp, "first")
        try:
            t0 = time.monotonic()
            code, _ = call("POST", base + "/v1/chat/completions", {"model": "gpu", "messages": []})
            report["request"] = {"code": code, "seconds": round(time.monotonic() - t0, 3)}
            deadline = time.monotonic() + 20
            while True:  # the sampler runs at ~1 Hz
                status = json.loads(call("GET", base + "/status")[1])
                mem = status["models"]["gpu"]["memory"]
                if (mem["used"] or 0) >= args.gb * GiB or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            report["while_running"] = {"status_memory": mem, "smi": smi(),
                                       "available": status["memory"]["available"]}
            metrics = call("GET", base + "/metrics")[1]
            report["metrics"] = [line for line in metrics.splitlines()
                                 if line.startswith(("swapd_engine_memory_peak_bytes",
                                                     "swapd_engine_gpu_memory_bytes",
                                                     "swapd_engine_resident_memory_bytes",
                                                     "swapd_memory_available_bytes"))]
            report["unload"] = call("POST", base + "/models/gpu/unload")[0]
        finally:
            stop(proc, log)
        saved = json.loads((Path(tmp) / "state" / "footprints.json").read_text())
        report["footprints_json"] = saved
        learned = saved["models"]["gpu"]["bytes"]
        report["learned_gib"] = round(learned / GiB, 3)
        report["covers_cuda_memory"] = learned >= args.gb * GiB
        proc, log = start(cfg, tmp, "second")
        try:
            status = json.loads(call("GET", base + "/status")[1])
            report["after_restart"] = status["models"]["gpu"]["memory"]
        finally:
            stop(proc, log)
        report["swapd_log"] = [
            line for line in (Path(tmp) / "first.log").read_text().splitlines()
            if "footprint" in line or "NVML" in line
        ]
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()

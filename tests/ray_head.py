#!/usr/bin/env python3
"""A real Ray head for tests/test_cluster_ray.py, run with a Python that has `ray`:

    python tests/ray_head.py --port P --gcs-port G --nodes N --temp-dir D

It runs `ray start --head --block` (GCS, raylet and their agents) and answers on P what a
`vllm serve --distributed-executor-backend ray` would: /health 503 until N Ray nodes are
alive (the worker node joined), then 200; POST /v1/chat/completions names the nodes. It never
calls `ray stop` itself: swapd's stop must leave no Ray daemon behind on its own.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import subprocess
import sys
import threading
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--gcs-port", type=int, required=True)
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--temp-dir", required=True)
    args = p.parse_args()
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    subprocess.Popen([ray, "start", "--head", f"--port={args.gcs_port}", "--num-cpus=1",
                      "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats",
                      f"--temp-dir={args.temp_dir}", "--block"])
    alive: list[str] = []

    def watch() -> None:
        import ray as ray_api

        while True:
            try:
                ray_api.init(address=f"127.0.0.1:{args.gcs_port}", log_to_driver=False)
                break
            except Exception:  # the GCS is not up yet
                time.sleep(0.2)
        while True:
            alive[:] = [n["NodeID"] for n in ray_api.nodes() if n["Alive"]]
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True).start()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._answer(200 if len(alive) >= args.nodes else 503, {"nodes": len(alive)})

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self._answer(200, {"object": "chat.completion", "choices": [{
                "index": 0, "finish_reason": "stop",
                "message": {"role": "assistant", "content": f"{len(alive)} ray nodes"}}]})

        def _answer(self, status: int, body: object) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *_: object) -> None:
            pass

    http.server.ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()

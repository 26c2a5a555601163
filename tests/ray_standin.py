#!/usr/bin/env python3
"""Stand-ins for a Ray cluster's two sides (issue 24), so two swapds can run a "cluster
model" on one machine without Ray or GPUs:

    python tests/ray_standin.py head --port P --gcs-port G --workers N [--record F]
    python tests/ray_standin.py worker --gcs HOST:G [--record F] [--reconnect-timeout S]

`head` plays `ray start --head` + `vllm serve --tensor-parallel-size N`: it listens on the
"GCS" port G for workers, and its OpenAI port P answers /health 200 only once N workers are
connected (vLLM's TP=2 engine is not up before its Ray workers are). It does not die when a
worker goes away (vLLM hangs in an NCCL collective until its timeout): swapd must notice.

`worker` plays `ray start --address HOST:G --block`: it keeps trying to connect to the head
(the head starts after it), sends its name, and stays; when the head goes away it tries to
reconnect for --reconnect-timeout seconds, then exits 1 (a raylet that lost its GCS). SIGUSR1
makes it die at once with code 7 ("dies when asked"). SIGTERM: exit 0.

Each side appends JSON lines to --record: {"event", "pid", "side", "t"} for start, ready
(head) / connected (worker), worker_lost (head), exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time

from aiohttp import web


def record(path: str | None, side: str, event: str, **extra: object) -> None:
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"event": event, "pid": os.getpid(), "side": side,
                                "t": time.time(), **extra}) + "\n")


async def head(args: argparse.Namespace) -> None:
    connected: set[str] = set()
    ready = asyncio.Event()

    async def on_worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = (await reader.readline()).decode().strip()
        name = line.removeprefix("hello ") or "?"
        connected.add(name)
        if len(connected) >= args.workers and not ready.is_set():
            ready.set()
            record(args.record, "head", "ready", workers=sorted(connected))
        await reader.read()  # until the worker goes away
        connected.discard(name)
        record(args.record, "head", "worker_lost", worker=name)
        writer.close()

    gcs = await asyncio.start_server(on_worker, "127.0.0.1", args.gcs_port)

    async def health(_: web.Request) -> web.Response:
        ok = len(connected) >= args.workers
        return web.json_response({"workers": sorted(connected)}, status=200 if ok else 503)

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        # "delay": a long answer (a request in flight when a worker dies)
        await asyncio.sleep(float(body.get("delay", 0)))
        return web.json_response({
            "id": "standin", "object": "chat.completion", "model": body.get("model"),
            "choices": [{"index": 0, "finish_reason": "stop", "message": {
                "role": "assistant", "content": f"tp over {sorted(connected)}"}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        })

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.port).start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    gcs.close()
    await runner.cleanup()


async def worker(args: argparse.Namespace) -> None:
    host, _, port = args.gcs.rpartition(":")
    name = f"worker-{os.getpid()}"
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, lambda: (record(args.record, "worker", "exit",
                                                            code=7), os._exit(7)))
    loop.add_signal_handler(signal.SIGTERM, lambda: (record(args.record, "worker", "exit",
                                                            code=0), os._exit(0)))
    first = True
    while True:
        deadline = time.monotonic() + (args.connect_timeout if first else args.reconnect_timeout)
        while True:
            try:
                reader, writer = await asyncio.open_connection(host, int(port))
                break
            except OSError:
                if time.monotonic() > deadline:
                    record(args.record, "worker", "exit", code=1)
                    print("worker: the head is unreachable, giving up", flush=True)
                    sys.exit(1)
                await asyncio.sleep(0.1)  # a raylet retrying its GCS
        writer.write(f"hello {name}\n".encode())
        await writer.drain()
        record(args.record, "worker", "connected")
        print(f"worker {name} connected to {args.gcs}", flush=True)
        first = False
        await reader.read()  # until the head goes away
        writer.close()


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="side", required=True)
    h = sub.add_parser("head")
    h.add_argument("--port", type=int, required=True)
    h.add_argument("--gcs-port", type=int, required=True)
    h.add_argument("--workers", type=int, default=1)
    h.add_argument("--record")
    w = sub.add_parser("worker")
    w.add_argument("--gcs", required=True)
    w.add_argument("--record")
    w.add_argument("--connect-timeout", type=float, default=60.0)
    w.add_argument("--reconnect-timeout", type=float, default=30.0)
    args = p.parse_args()
    record(args.record, args.side, "start")
    try:
        asyncio.run(head(args) if args.side == "head" else worker(args))
    finally:
        if args.side == "head":
            record(args.record, "head", "exit")


if __name__ == "__main__":
    main()

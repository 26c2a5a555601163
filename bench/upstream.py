"""The benchmark's upstream: an OpenAI-shaped engine that costs as little CPU as it can.

    python -m bench.upstream --port N

Every contender of the data-path benchmark (direct, the bare relay, swapd, LiteLLM) talks to
one process of this server, so the upstream's cost is the same for all of them and is measured
apart. It writes nothing per request (a chatty engine would make swapd's log pump, not its relay,
the thing measured).

``POST /v1/chat/completions`` (any other POST path answers the same):

- ``"stream": false`` (default): a small chat.completion JSON at once.
- ``"stream": true``: an event stream of ``max_tokens`` chunks (default 16), then
  ``data: [DONE]``. Before the first chunk it waits ``x_ttft`` seconds, before each later chunk
  ``x_token_delay`` seconds (both default 0: a saturation upstream). Each chunk carries
  ``"x_t"``, the ``time.monotonic()`` at which it was written, so a client on the same machine
  sees how long the chunk spent on its way (``CLOCK_MONOTONIC`` is one clock for every process).

``GET /health`` answers 200.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from aiohttp import web

from bench.common import run_app

COMPLETION = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 0,
        "model": "bench",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello! How can I help you today?"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21},
    }
).encode()

CHUNK_HEAD = (
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":0,'
    b'"model":"bench","choices":[{"index":0,"delta":{"content":" token"},'
    b'"finish_reason":null}],"x_t":'
)
DONE = b"data: [DONE]\n\n"


async def health(request: web.Request) -> web.Response:
    return web.Response(text='{"status":"ok"}', content_type="application/json")


async def complete(request: web.Request) -> web.StreamResponse:
    body = json.loads(await request.read() or b"{}")
    if not body.get("stream"):
        return web.Response(body=COMPLETION, content_type="application/json")
    tokens = int(body.get("max_tokens") or 16)
    ttft = float(body.get("x_ttft") or 0.0)
    delay = float(body.get("x_token_delay") or 0.0)
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await resp.prepare(request)
    if ttft:
        await asyncio.sleep(ttft)
    try:
        for i in range(tokens):
            if i and delay:
                await asyncio.sleep(delay)
            await resp.write(b"%s%.6f}\n\n" % (CHUNK_HEAD, time.monotonic()))
        await resp.write(DONE)
        await resp.write_eof()
    except ConnectionError:
        pass
    return resp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="uvloop")
    opts = parser.parse_args()
    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/{tail:.*}", complete)
    run_app(app, opts.host, opts.port, opts.loop)


if __name__ == "__main__":
    main()

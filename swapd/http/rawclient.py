"""The lower path to a local engine: pooled HTTP/1.1 connections, without aiohttp's client.

aiohttp's `ClientSession.request` builds, per request, a URL object, a `ClientRequest` (with
its cookie, auth, proxy, compression and trace steps), a timer context, a `Connection` and a
`ClientResponse`: about a fifth of swapd's CPU per plain request (py-spy, docs/benchmarks.md),
for features a relay to `http://127.0.0.1:PORT` never uses. Here a request is one `write` of
bytes built from the relayed headers, and its answer is read by the same protocol and C
parser aiohttp's client uses (`ResponseHandler`, llhttp): errors, flow control and chunked or
sized bodies behave as they did, and `proxy.UPSTREAM_BROKE` still names what a dying engine
raises.

Only what this path can honour comes here (`eligible`): plain http, no credentials in the
URL, no per-model `timeouts` (their keep-alive and idle settings are aiohttp connector
options, swapd.http.clients). Everything else keeps aiohttp's client.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections import deque
from collections.abc import Iterable
from urllib.parse import urlsplit

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.streams import StreamReader
from multidict import CIMultiDictProxy

# How long an idle connection is reused: below the 5 s keep-alive of uvicorn (vLLM, SGLang)
# and cpp-httplib (llama.cpp), so swapd never writes a request into a connection the engine
# is closing at that moment (a POST is not retried: the engine may have read it).
IDLE_REUSE = 3.0
# aiohttp's own session gives a connect 30 s (swapd.app's upstream session).
CONNECT_TIMEOUT = 30.0


def _compatible() -> bool:
    """Whether this aiohttp's ResponseHandler (not a public class) takes what `request`
    gives it; if a future aiohttp changes it, every request keeps aiohttp's client."""
    try:
        params = inspect.signature(ResponseHandler.set_response_params).parameters
    except (TypeError, ValueError):
        return False
    wanted = {"skip_payload", "read_until_eof", "auto_decompress"}
    return wanted <= params.keys() and callable(getattr(ResponseHandler, "read", None))


COMPATIBLE = _compatible()

# Up to this size a body is sent in one buffer with the request head (one copy of a small
# body is cheaper than a second buffer).
BODY_COPY = 64 * 1024


class RawResponse:
    """What the relay reads of an engine's answer: `aiohttp.ClientResponse`'s names for it."""

    __slots__ = ("_key", "_pool", "_proto", "content", "headers", "reason", "status")

    def __init__(self, status: int, reason: str, headers: CIMultiDictProxy[str],
                 content: StreamReader, proto: ResponseHandler, pool: RawClient,
                 key: tuple[str, int]) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.content = content
        self._proto = proto
        self._pool = pool
        self._key = key

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        return int(value) if value is not None and value.isdigit() else None

    def release(self) -> None:
        """The body was read to its end: the connection goes back to the pool if it can."""
        proto = self._proto
        if self.content.is_eof() and not proto.should_close and proto.is_connected():
            self._pool.keep(self._key, proto)
        else:
            proto.close()

    def close(self) -> None:
        """Drop the connection (the client left, or the engine broke off): the engine sees
        the disconnect and stops generating."""
        self._proto.close()


class RawClient:
    """Idle connections per engine address, reused newest first."""

    def __init__(self) -> None:
        self._idle: dict[tuple[str, int], deque[tuple[ResponseHandler, float]]] = {}
        self._targets: dict[str, tuple[str, int, str, str] | None] = {}

    def target(self, base: str) -> tuple[str, int, str, str] | None:
        """(host, port, Host header, path prefix) of an engine's base URL that this path
        serves; None for one that needs aiohttp's client."""
        if not COMPATIBLE:
            return None
        try:
            return self._targets[base]
        except KeyError:
            pass
        found = None
        try:
            parts = urlsplit(base)
            port = parts.port or 80
        except ValueError:
            parts = None
        if (parts is not None and parts.scheme == "http" and parts.hostname
                and "@" not in parts.netloc and not parts.query and not parts.fragment):
            found = (parts.hostname, port, parts.netloc, parts.path.rstrip("/"))
        if len(self._targets) > 1024:  # bases come from the config; a bound all the same
            self._targets.clear()
        self._targets[base] = found
        return found

    async def request(self, method: str, target: tuple[str, int, str, str], path: str,
                      headers: Iterable[tuple[str, str]], body: bytes) -> RawResponse:
        """Send one request and wait for its status line and headers."""
        host, port, netloc, prefix = target
        head = [f"{method} {prefix}{path} HTTP/1.1\r\nHost: {netloc}\r\n"]
        head += [f"{k}: {v}\r\n" for k, v in headers]
        if body or method in ("POST", "PUT", "PATCH"):
            head.append(f"Content-Length: {len(body)}\r\n")
        head.append("\r\n")
        text = "".join(head)
        # Header names and values came through aiohttp's parser (no CR or LF) or from
        # swapd's config; a line break in one would still split it into a header of the
        # client's making, so it is refused here as aiohttp's writer refuses it.
        lines = len(head) + 1  # the request line and Host share the first entry
        if text.count("\n") != lines or text.count("\r") != lines:
            raise ValueError("a header or the path holds a line break: not sent to the engine")
        # surrogateescape gives back the bytes a client sent.
        data = text.encode("utf-8", "surrogateescape")
        key = (host, port)  # the request is whole before a connection is taken
        proto = self._idle_connection(key)
        if proto is None:
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(CONNECT_TIMEOUT):
                try:
                    _, proto = await loop.create_connection(
                        lambda: ResponseHandler(loop), host, port)
                except OSError as exc:
                    raise aiohttp.ClientConnectionError(
                        f"cannot connect to {netloc}: {exc.strerror or exc}") from None
        # read_until_eof: a body with neither a length nor chunks ends when the engine
        # closes (HTTP/1.0 style), as aiohttp's session reads it by default.
        proto.set_response_params(skip_payload=method == "HEAD", read_until_eof=True,
                                  auto_decompress=False)
        assert proto.transport is not None
        try:
            if len(body) <= BODY_COPY:
                proto.transport.write(data + body)
            else:  # a big upload is not copied once more (and held twice) to be sent
                proto.transport.writelines((data, body))
            while True:
                message, payload = await proto.read()
                # 1xx answers (100 Continue) come before the real one; 101 is not relayed
                # (Upgrade is a hop-by-hop header swapd never passes on).
                if not 100 <= message.code < 200:
                    break
        except BaseException:
            proto.close()
            raise
        return RawResponse(message.code, message.reason, message.headers, payload, proto,
                           self, key)

    def keep(self, key: tuple[str, int], proto: ResponseHandler) -> None:
        """An idle connection, for the next request to the same engine; the ones idle past
        IDLE_REUSE are closed on the way (oldest first, so the list stays short)."""
        now = time.monotonic()
        idle = self._idle.get(key)
        if idle is None:
            idle = self._idle[key] = deque()
        while idle and now - idle[0][1] > IDLE_REUSE:
            idle.popleft()[0].close()
        idle.append((proto, now))

    def _idle_connection(self, key: tuple[str, int]) -> ResponseHandler | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            proto, since = idle.pop()
            if now - since <= IDLE_REUSE and proto.is_connected() and not proto.should_close:
                return proto
            proto.close()
        return None

    def close(self) -> None:
        for idle in self._idle.values():
            for proto, _ in idle:
                proto.close()
        self._idle.clear()

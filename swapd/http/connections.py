"""Client connections: how many swapd holds, how long one may take to send its header, and
the answers aiohttp itself gives (issue 21).

Under `ulimit -n 200`, 320 idle connections made `/health` time out and asyncio's accept error
wrote 118 MB of log in 40 s. So:
- at start the soft RLIMIT_NOFILE is raised to the hard limit (systemd's default soft limit
  is 1024), and connections are capped below it: half of what is left after a reserve for
  engines' pipes, state files and the listening socket (each client connection may need an
  upstream one too);
- at the cap, a new connection pushes out the oldest one that is idle (one that never sent a
  complete header first, then an idle keep-alive one); with none idle, it gets 503;
- a connection that has not sent a complete request header within `headerTimeout` gets 408
  and is closed;
- one kind of loop error (an accept that fails) is logged once per interval, with a count.

aiohttp answers some requests before any handler or middleware runs: a malformed request
(bad request line, oversized header, Content-Length with Transfer-Encoding, a bad chunk, two
`Host`s) and an `Expect` other than `100-continue`. Those answers are text/plain and echo the
request; here they are JSON in swapd's error shape (swapd.errors), naming nothing the
client sent.
"""

from __future__ import annotations

import asyncio
import resource
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from swapd.errors import answer, error_body

log = structlog.get_logger("swapd.connections")

# File descriptors kept for what is not a client connection (see the module docstring).
FD_RESERVE = 128
MIN_CONNECTIONS = 16
# How often one kind of loop error is logged at most.
LOOP_ERROR_INTERVAL = 10.0

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-files limit", soft=soft, hard=hard, error=str(exc))
    return soft


def connection_cap(fd_limit: int) -> int:
    """Most client connections held at once under `fd_limit` open files."""
    if fd_limit == resource.RLIM_INFINITY or fd_limit > 1 << 20:
        fd_limit = 1 << 20
    return max(MIN_CONNECTIONS, (fd_limit - FD_RESERVE) // 2)


class Runner(web.AppRunner):
    """web.AppRunner whose server holds connections as the module docstring says."""

    def __init__(self, app: web.Application, *, max_connections: int,
                 header_timeout: float, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._max_connections = max_connections
        self._header_timeout = header_timeout

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # aiohttp builds its Server itself; ours only adds to it (connection_made and the
        # protocol it makes), so the object is kept and its class narrowed.
        server.__class__ = _Server
        assert isinstance(server, _Server)
        server.setup(self._max_connections, self._header_timeout)
        return server


class _Server(web.Server):
    max_connections: int
    header_timeout: float

    def setup(self, max_connections: int, header_timeout: float) -> None:
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.request_handler = _json_errors(self.request_handler)

    def __call__(self) -> RequestHandler:
        kwargs = dict(self._kwargs)  # what web.Server passes to its own protocol
        return _Protocol(self, loop=self._loop, **kwargs)

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        if len(self._connections) <= self.max_connections:
            return
        victim = _idlest(self._connections, handler)
        if victim is not None:
            victim.force_close()
            return
        # Every other connection is busy: this one is told so and closed.
        body = error_body("swapd holds as many connections as it can; retry shortly",
                          type="server_error", code="too_many_connections")
        transport.write(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nRetry-After: 1\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        handler.force_close()


def _idlest(connections: dict[RequestHandler, Any], new: RequestHandler) -> RequestHandler | None:
    """The oldest connection that never sent a complete header, else the oldest idle
    keep-alive one, else None. (aiohttp's own state: a protocol waiting for a message.)"""
    idle: RequestHandler | None = None
    for conn in connections:  # oldest first
        if conn is new or conn._request_in_progress or conn._messages:
            continue
        if conn._request_count == 0:
            return conn
        if idle is None and conn._waiter is not None:
            idle = conn
    return idle


class _Protocol(RequestHandler):
    """aiohttp's protocol with a header deadline and JSON answers of its own errors."""

    __slots__ = ("_header_timer",)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        manager = self._manager
        super().connection_made(transport)
        timeout = manager.header_timeout if isinstance(manager, _Server) else 0.0
        self._header_timer: asyncio.TimerHandle | None = None
        if timeout > 0 and not self._force_close:
            self._header_timer = self._loop.call_later(timeout, self._no_header, timeout)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._header_timer is not None and self._request_count:
            self._header_timer.cancel()
            self._header_timer = None

    def connection_lost(self, exc: BaseException | None) -> None:
        if getattr(self, "_header_timer", None) is not None:
            self._header_timer.cancel()  # type: ignore[union-attr]
            self._header_timer = None
        super().connection_lost(exc)

    def _no_header(self, timeout: float) -> None:
        self._header_timer = None
        if self._request_count or self.transport is None:
            return
        body = error_body(f"no complete request header within {timeout:g} s (headerTimeout)",
                          type="invalid_request_error", code="header_timeout")
        self.transport.write(
            b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: " + str(len(body)).encode()
            + b"\r\n\r\n" + body
        )
        self.force_close()

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """aiohttp's answer to a request it could not parse (400) or whose handler failed
        outside swapd's middleware: JSON, naming no byte of the request."""
        if status >= 500:
            self.log_exception("error handling a request", exc_info=exc)
        what = {
            400: ("malformed HTTP request", "bad_request"),
            413: ("request header too large", "header_too_large"),
            504: ("request handler timed out", "timeout"),
        }.get(status, ("internal error in swapd's HTTP server", "internal_error"))
        kind = "invalid_request_error" if status < 500 else "server_error"
        if exc is not None and status < 500:
            # The exception's class says what was wrong (LineTooLong, BadHttpMethod, ...);
            # its text quotes the request, so it is left out.
            what = (f"{what[0]} ({type(exc).__name__})", what[1])
        resp = web.Response(status=status, body=error_body(what[0], type=kind, code=what[1]),
                            content_type="application/json")
        resp.force_close()
        return resp


def _json_errors(handler: Handler) -> Handler:
    """The app's handler, with what aiohttp raises before swapd's middleware runs (a 417 for
    an unknown `Expect`) answered by swapd.errors like every other error."""

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400 or not isinstance(request, web.Request):
                raise
            resp = await answer(request, exc)
            resp.force_close()  # the body it announced was never read
            return resp

    return handle


class LoopErrors:
    """A loop exception handler that logs one kind of error (its message) once per
    `interval`, then how many more there were: an accept that fails for want of file
    descriptors repeats as fast as the loop turns."""

    def __init__(self, interval: float = LOOP_ERROR_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval
        self._clock = clock
        self._last: dict[str, tuple[float, int]] = {}

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = str(context.get("message", "error"))
        now = self._clock()
        last = self._last.get(message)
        if last is not None and now - last[0] < self._interval:
            self._last[message] = (last[0], last[1] + 1)
            return
        suppressed = last[1] if last is not None else 0
        if len(self._last) > 1000:
            self._last.clear()
        self._last[message] = (now, 0)
        if suppressed:
            context = {**context, "message": f"{message} (and {suppressed} more like it in the "
                                             f"last {self._interval:g} s)"}
        loop.default_exception_handler(context)


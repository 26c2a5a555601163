"""Logging: structlog setup and the `LogHub` behind ``/logs``, ``/logs/stream`` and
``/logs/stream/{model}``.

The hub keeps, in memory, the last ``lines_per_source`` lines of each source (``"swapd"`` for the
daemon's own log, a model id for that engine's stdout/stderr), one combined buffer of every line
(each prefixed ``[source] ``) and one of the engines' lines only (llama-swap's
``/logs/stream/upstream``). Live readers subscribe; a reader that cannot keep up loses lines and
later gets one marker line saying how many; it never slows the writer.

Threading: `LogHub.append` must be called from the event loop thread (the engines' log pumps and
the request handlers run there). Other threads use `LogHub.append_threadsafe`, which hops onto
the loop; the structlog processor installed by `configure_logging` does this by itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
import traceback
from collections import deque
from collections.abc import Callable, Iterable, MutableMapping
from types import TracebackType
from typing import Any, Final, TextIO

import structlog
from aiohttp import web

from swapd.errors import ApiError
from swapd.observe.streams import history_then_live, stream_headers
from swapd.redact import clean_line, clip, redact_text

SWAPD: Final = "swapd"
"""The source name of swapd's own log lines."""

ENGINES: Final = "\x00engines"
"""Pseudo-source for `recent`/`subscribe`: every engine's lines (prefixed), none of swapd's."""

_ALL: Final = "\x00all"

MAX_LINE_CHARS: Final = 16 * 1024
"""Longer lines are cut (an engine dumping a megabyte on one line must not fill memory)."""

DROP_MARKER: Final = "[swapd] ... {n} lines dropped (slow reader)"
_SWAPD_TAG: Final = f"[{SWAPD}]"


def _clip(line: str) -> str:
    line = line.rstrip("\r\n")
    if len(line) > MAX_LINE_CHARS:
        extra = len(line) - MAX_LINE_CHARS
        line = f"{line[:MAX_LINE_CHARS]}... ({extra} more characters)"
    # What /logs* serve: no terminal escapes or NUL from an engine, no secret.
    return clean_line(line)


class Subscription:
    """Live lines of one source (or of all of them) for one reader.

    An async iterator and an async context manager: leaving the ``async with`` block (or calling
    `close`) unsubscribes. Iteration ends when the subscription is closed, by the reader or by
    `LogHub.close` at shutdown. When more than ``queue_size`` lines wait unread, new lines are
    dropped until the reader has taken every waiting line; then it gets one marker line,
    ``"[swapd] ... N lines dropped (slow reader)"``, exactly where the gap is.
    """

    def __init__(self, hub: LogHub, key: str, queue_size: int) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be >= 1")
        self._hub = hub
        self._key = key
        self._max = queue_size
        self._lines: deque[str] = deque()
        self._dropped = 0
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def dropped(self) -> int:
        """Lines lost since the last marker (0 when none)."""
        return self._dropped

    def _offer(self, line: str) -> None:
        if self._closed:
            return
        if self._dropped or len(self._lines) >= self._max:
            self._dropped += 1
            return
        self._lines.append(line)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def get_nowait(self) -> str | None:
        """The next waiting line (or drop marker), None when nothing waits."""
        if self._lines:
            return self._lines.popleft()
        if self._dropped:
            n, self._dropped = self._dropped, 0
            return DROP_MARKER.format(n=n)
        return None

    def drain_nowait(self, limit: int = 1024) -> list[str]:
        """Up to ``limit`` waiting lines, without waiting."""
        out: list[str] = []
        while len(out) < limit:
            line = self.get_nowait()
            if line is None:
                break
            out.append(line)
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._hub._unsubscribe(self)
        self._wake()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> str:
        while True:
            line = self.get_nowait()
            if line is not None:
                return line
            if self._closed:
                raise StopAsyncIteration
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiter = waiter
            try:
                await waiter
            finally:
                if self._waiter is waiter:
                    self._waiter = None

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class LogHub:
    """Per-source ring buffers of log lines and their live subscribers.

    ``append`` is O(1) in the number of stored lines, never awaits and never blocks: it must be
    called from the event loop thread (see `append_threadsafe` for other threads).
    """

    def __init__(self, lines_per_source: int = 2000, max_sources: int = 256) -> None:
        if lines_per_source < 1:
            raise ValueError("lines_per_source must be >= 1")
        self.lines_per_source = lines_per_source
        self.max_sources = max_sources
        self._buffers: dict[str, deque[str]] = {}
        self._all: deque[str] = deque(maxlen=lines_per_source)
        self._engines: deque[str] = deque(maxlen=lines_per_source)
        self._subs: dict[str, set[Subscription]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None

    # -- writing -----------------------------------------------------------------------------

    def _buffer(self, source: str) -> deque[str]:
        buf = self._buffers.get(source)
        if buf is None:
            if len(self._buffers) >= self.max_sources:
                self._evict_one()
            buf = deque(maxlen=self.lines_per_source)
            self._buffers[source] = buf
        return buf

    def _evict_one(self) -> None:
        # The oldest source nobody is reading (swapd's own buffer stays).
        for name in self._buffers:
            if name != SWAPD and not self._subs.get(name):
                del self._buffers[name]
                return

    def _publish(self, key: str, line: str) -> None:
        subs = self._subs.get(key)
        if subs:
            for sub in tuple(subs):
                sub._offer(line)

    def append(self, source: str, line: str, *, also: str | None = None) -> None:
        """Store one line of ``source`` and hand it to live subscribers.

        ``also`` names one more source whose buffer (and readers) get the line, prefixed
        ``[source] `` (swapd's lines about a model show up in that model's stream); the combined
        buffer gets it once. Event loop thread only.
        """
        line = _clip(line)
        if source != SWAPD and line.lstrip().startswith(_SWAPD_TAG):
            # An engine's line that would read as swapd's own in its model's stream (where
            # swapd's lines are tagged `[swapd] `): said to be the engine's.
            line = f"[{source}] {line}"
        self._buffer(source).append(line)
        self._publish(source, line)
        tagged = f"[{source}] {line}"
        self._all.append(tagged)
        self._publish(_ALL, tagged)
        if source != SWAPD:
            self._engines.append(tagged)
            self._publish(ENGINES, tagged)
        if also is not None and also != source:
            self._buffer(also).append(tagged)
            self._publish(also, tagged)

    def append_threadsafe(self, source: str, line: str, *, also: str | None = None) -> None:
        """`append` from any thread: hops onto the loop that serves the subscribers."""
        loop = self._loop
        if loop is not None and self._loop_thread != threading.get_ident() and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._append_kw, source, line, also)
                return
            except RuntimeError:  # the loop closed meanwhile
                pass
        self.append(source, line, also=also)

    def _append_kw(self, source: str, line: str, also: str | None) -> None:
        self.append(source, line, also=also)

    # -- reading -----------------------------------------------------------------------------

    @staticmethod
    def _key(source: str | None) -> str:
        return _ALL if source is None else source

    def recent(self, source: str | None = None) -> list[str]:
        """The stored lines of ``source``, oldest first; ``None``: every line, prefixed
        ``[source] ``; `ENGINES`: every engine's lines, prefixed."""
        if source is None:
            return list(self._all)
        if source == ENGINES:
            return list(self._engines)
        buf = self._buffers.get(source)
        return list(buf) if buf is not None else []

    def sources(self) -> list[str]:
        """Sources that have a buffer."""
        return list(self._buffers)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve subscribers on `loop`, which runs on the calling thread: lines appended from
        other threads (`append_threadsafe`) hop onto it. The daemon binds its hub at startup,
        before any line or reader exists."""
        self._loop = loop
        self._loop_thread = threading.get_ident()

    def subscribe(self, source: str | None = None, queue_size: int = 1000) -> Subscription:
        """Live lines from now on (take `recent` in the same loop iteration for no gap).

        Must be called on the event loop the hub is bound to (the subscription wakes its
        reader there).
        """
        sub = Subscription(self, self._key(source), queue_size)
        self._subs.setdefault(sub._key, set()).add(sub)
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub._key)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub._key]

    def subscriber_count(self) -> int:
        return sum(len(s) for s in self._subs.values())

    def close(self) -> None:
        """End every subscription (shutdown): their iterators stop once drained."""
        for subs in list(self._subs.values()):
            for sub in list(subs):
                sub.close()


# -- structlog --------------------------------------------------------------------------------

_LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

_handler: logging.Handler | None = None

_PLAIN_SKIP: Final = frozenset(
    {"timestamp", "level", "event", "logger", "exc_info", "exception", "stack", "stack_info"}
)


def parse_level(level: str) -> int:
    """A ``logLevel`` value (llama-swap's ``debug``/``info``/``warn``/``error``) as a number."""
    try:
        return _LEVELS[level.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r} (use debug, info, warn, error)") from None


def _fmt_value(value: Any) -> str:
    if isinstance(value, str):
        if value and not any(c in value for c in ' "=\n\t'):
            return value
        return json.dumps(value)
    if isinstance(value, bool | int | float) or value is None:
        return json.dumps(value)
    return repr(value)


def _exc_text(ed: MutableMapping[str, Any]) -> str | None:
    exc = ed.get("exception")
    if isinstance(exc, str):
        return exc
    info = ed.get("exc_info")
    if not info:
        return None
    if isinstance(info, BaseException):
        return "".join(traceback.format_exception(info))
    if isinstance(info, tuple) and len(info) == 3 and info[1] is not None:
        return "".join(traceback.format_exception(info[1]))
    return None


def plain_line(ed: MutableMapping[str, Any]) -> str:
    """One human line for the hub: ``TIMESTAMP LEVEL event key=value ...``."""
    parts = [str(ed.get("timestamp", "")), f"{ed.get('level', 'info'):<7}", str(ed.get("event"))]
    logger_name = ed.get("logger")
    if isinstance(logger_name, str) and not logger_name.startswith("swapd"):
        parts.append(f"logger={logger_name}")
    parts.extend(f"{k}={_fmt_value(v)}" for k, v in ed.items() if k not in _PLAIN_SKIP)
    line = " ".join(p for p in parts if p)
    exc = _exc_text(ed)
    if exc:
        line = f"{line}\n{exc.rstrip()}"
    return line


def _resolve_exc_info(_: Any, __: str, ed: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    # log.exception()/exc_info=True mean "the exception being handled": take it now, while it is.
    if ed.get("exc_info") is True:
        info = sys.exc_info()
        if info[0] is None:
            del ed["exc_info"]
        else:
            ed["exc_info"] = info
    return ed


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        # As long as a served line may be (an engine's output line is a value here).
        return redact_text(clip(value, MAX_LINE_CHARS))
    if isinstance(value, list | tuple):
        return [_redact_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _redact_value(v) for k, v in value.items()}
    return value


def _redact_event(_: Any, __: str, ed: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Processor: every string in the event masked (journald and the hub both get this)."""
    for key, value in ed.items():
        if key not in ("exc_info", "_hub", "_record", "_from_structlog"):
            ed[key] = _redact_value(value)
    return ed


class _HubTee:
    """Formatter processor: copies each event, as one plain line, into the hub."""

    def __init__(self, hub: LogHub) -> None:
        self.hub = hub

    def __call__(self, _: Any, __: str, ed: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        # Engine output echoed into the structured log is in the hub already.
        if ed.pop("_hub", True) is False:
            return ed
        model = ed.get("model")
        also = model if isinstance(model, str) and model and model != SWAPD else None
        line = plain_line(ed)
        try:
            asyncio.get_running_loop()
            on_loop = True
        except RuntimeError:
            on_loop = False
        if on_loop and self.hub._loop_thread in (None, threading.get_ident()):
            self.hub.append(SWAPD, line, also=also)
        else:
            self.hub.append_threadsafe(SWAPD, line, also=also)
        return ed


def configure_logging(
    level: str = "info",
    json_output: bool | None = None,
    hub: LogHub | None = None,
    stream: TextIO | None = None,
) -> None:
    """Set up structlog and stdlib logging (aiohttp, asyncio) to one output.

    JSON lines when the output is not a terminal (journald), a console renderer when it is;
    ``json_output`` forces one. Events below ``level`` are dropped (``warn`` means warning).
    With a hub, every event also becomes a plain line in the hub under ``"swapd"``, and under
    the event's ``model`` as well. Calling it again replaces the previous setup.
    """
    global _handler
    numeric = parse_level(level)
    out = stream if stream is not None else sys.stdout
    isatty = getattr(out, "isatty", None)
    tty = bool(callable(isatty) and isatty())
    if json_output is None:
        json_output = not tty

    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        timestamper,
    ]
    final: list[structlog.typing.Processor] = [
        structlog.stdlib.ProcessorFormatter.remove_processors_meta
    ]
    if json_output:
        # The traceback as text before masking: an exception's message may quote a secret.
        final.append(structlog.processors.format_exc_info)
    final.append(_redact_event)
    if hub is not None:
        final.append(_HubTee(hub))
    if json_output:
        final.append(structlog.processors.JSONRenderer(default=str))
    else:
        final.append(structlog.dev.ConsoleRenderer(colors=tty))

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=final,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)

    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    root.setLevel(numeric)
    _handler = handler
    # aiohttp logs every request at INFO on aiohttp.access; swapd has its own request metrics.
    logging.getLogger("aiohttp.access").setLevel(max(numeric, logging.WARNING))

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            _resolve_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


# -- HTTP -------------------------------------------------------------------------------------

def _not_found(name: str) -> ApiError:
    # 400, as llama-swap answers a logger it does not know.
    return ApiError(
        f"no logs for {name[:200]!r}: use 'proxy', 'upstream' or a configured model's id",
        status=400, code="unknown_log_source",
    )


def log_routes(
    hub: LogHub,
    known_sources: Callable[[], Iterable[str]] | None = None,
    *,
    disconnect_poll: float = 1.0,
) -> list[web.RouteDef]:
    """``GET /logs``, ``GET /logs/stream`` and ``GET /logs/stream/{model}`` over ``hub``.

    ``known_sources`` lists the configured model ids (``/logs/stream/{model}`` answers 404 for
    anything else); without it, any source the hub holds is known. ``swapd`` (and llama-swap's
    ``proxy``) is swapd's own log; llama-swap's ``upstream`` is every engine's output. Streams
    send the recent lines first (unless ``?no-history``), then live lines, and end when the
    client goes away (noticed within ``disconnect_poll`` seconds when no line is flowing) or at
    `LogHub.close`. Authentication is the middleware's business, not this module's.
    """

    def resolve(name: str) -> str | None:
        known = set(known_sources()) if known_sources is not None else set(hub.sources())
        if name in known:
            return name
        if name in (SWAPD, "proxy"):
            return SWAPD
        if name == "upstream":
            return ENGINES
        return None

    async def logs(request: web.Request) -> web.Response:
        lines = hub.recent()
        text = "\n".join(lines) + "\n" if lines else ""
        return web.Response(text=text, content_type="text/plain", charset="utf-8")

    async def stream(request: web.Request, key: str | None) -> web.StreamResponse:
        resp = web.StreamResponse(headers=stream_headers("text/plain; charset=utf-8"))
        # recent() and subscribe() in the same loop iteration: no line lost or repeated.
        history = [] if "no-history" in request.query else hub.recent(key)
        async with hub.subscribe(key) as sub:

            async def live() -> bytes | None:
                batch = sub.drain_nowait()
                if not batch:
                    try:
                        batch = [await anext(sub)]
                    except StopAsyncIteration:
                        return None
                    batch += sub.drain_nowait()
                return ("\n".join(batch) + "\n").encode()

            text = ("\n".join(history) + "\n").encode() if history else b""
            await history_then_live(request, resp, text, live, idle=disconnect_poll)
        return resp

    async def stream_all(request: web.Request) -> web.StreamResponse:
        return await stream(request, None)

    async def stream_one(request: web.Request) -> web.StreamResponse:
        name = request.match_info["model"]
        key = resolve(name)
        if key is None:
            raise _not_found(name)
        return await stream(request, key)

    return [
        web.get("/logs", logs),
        web.get("/logs/stream", stream_all),
        web.get("/logs/stream/{model:.+}", stream_one),  # an id may hold '/'
    ]

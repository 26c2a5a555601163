"""Answers read as they are written: their headers, and the "history, then live" loop of
`/logs/stream*` and `/api/activity/stream`.

One loop for both, so a client that goes away ends either the same way: noticed by a
failed write, or, while nothing flows, at the next idle tick.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web

# Never cached, never held back by a buffering proxy in front (nginx's X-Accel-Buffering).
UNBUFFERED: Final = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def stream_headers(content_type: str = "text/event-stream") -> dict[str, str]:
    """The headers of a stream swapd itself writes (an engine's are relayed as they are)."""
    return {"Content-Type": content_type, **UNBUFFERED, "X-Content-Type-Options": "nosniff"}


def gone(request: web.BaseRequest) -> bool:
    """The client closed its connection (seen without writing to it)."""
    transport = request.transport
    return transport is None or transport.is_closing()


async def history_then_live(
    request: web.Request,
    resp: web.StreamResponse,
    history: bytes,
    live: Callable[[], Awaitable[bytes | None]],
    *,
    idle: float,
    keepalive: bytes = b"",
) -> None:
    """Send `history`, then each piece `live()` gives until it gives None (the source
    closed) or the client leaves. After `idle` seconds without a piece, a client that is
    gone ends the stream; one still there gets `keepalive` (an SSE comment, so proxies
    do not close a silent connection; nothing for plain text)."""
    try:
        await resp.prepare(request)
        if history:
            await resp.write(history)
        while True:
            try:
                async with asyncio.timeout(idle):
                    piece = await live()
            except TimeoutError:
                if gone(request):
                    return
                if keepalive:
                    await resp.write(keepalive)
                continue
            if piece is None:
                return
            await resp.write(piece)
    except ConnectionError:
        pass

"""The HTTP clients swapd talks to engines and peers with.

A local engine without `timeouts` at a plain http URL is reached by the lower path
(swapd.http.rawclient); other models without `timeouts` (https, credentials in the URL) share
swapd's one session. llama-swap's `timeouts` map onto aiohttp like this (0 disables one):

- `connect`: the TCP connect (`ClientTimeout.sock_connect`);
- `tlsHandshake`: added to `connect` for the whole connection setup of an https URL
  (`ClientTimeout.connect`: aiohttp has no separate TLS limit);
- `responseHeader`: from sending the request to the response's headers (a deadline
  around the request call; the body may then stream as long as it likes);
- `keepalive`: TCP keep-alive probes on the connection (SO_KEEPALIVE, TCP_KEEPIDLE and
  TCP_KEEPINTVL);
- `idleConn`: how long an idle pooled connection is kept (`keepalive_timeout` of the
  connector).

The last two are connection-pool settings, so each distinct pair gets a session of its
own, made on first use and closed at shutdown.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import aiohttp

from swapd.config.types import Timeouts


def request_timeout(timeouts: Timeouts, https: bool) -> aiohttp.ClientTimeout:
    connect = timeouts.connect or None
    setup = None
    if connect is not None:
        setup = connect + (timeouts.tls_handshake if https and timeouts.tls_handshake else 0)
        if https and not timeouts.tls_handshake:
            setup = None  # an unlimited handshake makes the whole setup unlimited
    return aiohttp.ClientTimeout(total=None, connect=setup, sock_connect=connect)


def _socket_factory(keepalive: float) -> Callable[[Any], socket.socket]:
    def make(addr_info: Any) -> socket.socket:
        family, kind, proto = addr_info[0], addr_info[1], addr_info[2]
        sock = socket.socket(family=family, type=kind, proto=proto)
        if keepalive > 0:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            seconds = max(1, round(keepalive))
            if hasattr(socket, "TCP_KEEPIDLE"):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, seconds)
            if hasattr(socket, "TCP_KEEPINTVL"):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, seconds)
        return sock

    return make


class Clients:
    """The sessions for `timeouts` (made on first use); `default` is the app's own."""

    def __init__(self) -> None:
        self._sessions: dict[tuple[float, float], aiohttp.ClientSession] = {}

    def for_request(
        self, timeouts: Timeouts | None, url: str, default: aiohttp.ClientSession
    ) -> tuple[aiohttp.ClientSession, aiohttp.ClientTimeout]:
        """The session and the `timeout=` of one request to `url`: `default` (the app's own)
        and its own timeout without `timeouts`."""
        if timeouts is None:
            return default, default.timeout
        key = (timeouts.keepalive, timeouts.idle_conn)
        found = self._sessions.get(key)
        if found is None or found.closed:
            connector = aiohttp.TCPConnector(
                limit=0,
                keepalive_timeout=timeouts.idle_conn or None,
                socket_factory=_socket_factory(timeouts.keepalive),
            )
            found = self._sessions[key] = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None),
                auto_decompress=False,
            )
        return found, request_timeout(timeouts, url.startswith("https:"))

    async def close(self) -> None:
        sessions, self._sessions = list(self._sessions.values()), {}
        await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)

"""llama-swap's `timeouts` as aiohttp sees them: per request, per connection, per pool."""

from __future__ import annotations

import socket

import aiohttp

from swapd.config.types import MODEL_TIMEOUTS, PEER_TIMEOUTS, Timeouts
from swapd.http.clients import Clients, _socket_factory, request_timeout


def test_connect_and_tls_handshake() -> None:
    t = request_timeout(Timeouts(connect=5, tls_handshake=10), https=True)
    assert (t.total, t.sock_connect, t.connect, t.sock_read) == (None, 5, 15, None)
    t = request_timeout(Timeouts(connect=5, tls_handshake=10), https=False)
    assert (t.sock_connect, t.connect) == (5, 5)  # no TLS: the handshake adds nothing


def test_zero_disables() -> None:
    t = request_timeout(Timeouts(connect=0, tls_handshake=0), https=True)
    assert (t.sock_connect, t.connect) == (None, None)
    t = request_timeout(Timeouts(connect=5, tls_handshake=0), https=True)
    assert (t.sock_connect, t.connect) == (5, None)  # an unlimited handshake: no limit


def test_defaults_are_llama_swaps() -> None:
    assert (MODEL_TIMEOUTS.connect, MODEL_TIMEOUTS.response_header) == (30, 0)
    assert (PEER_TIMEOUTS.response_header, PEER_TIMEOUTS.idle_conn) == (60, 90)


def test_keepalive_probes_on_the_socket() -> None:
    info = (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", 1))
    with _socket_factory(17)(info) as sock:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 17
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 17
    with _socket_factory(0)(info) as sock:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0


async def test_one_session_per_pool_setting_and_the_default_for_none() -> None:
    clients = Clients()
    default = aiohttp.ClientSession()
    try:
        url = "http://127.0.0.1:1/v1/models"
        assert clients.for_request(None, url, default) == (default, default.timeout)
        a, timeout = clients.for_request(Timeouts(idle_conn=5), url, default)
        assert timeout.total is None
        same, timeout = clients.for_request(Timeouts(idle_conn=5, connect=1), url, default)
        assert same is a and timeout.sock_connect == 1  # same pool, the request's own limit
        b, _ = clients.for_request(Timeouts(idle_conn=0), url, default)
        assert b is not a
        assert b.connector is not None and b.connector._keepalive_timeout is None  # kept
        assert a.connector is not None and a.connector._keepalive_timeout == 5
    finally:
        await clients.close()
        await default.close()
    assert a.closed and b.closed

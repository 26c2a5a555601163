"""The lower path to a local engine (swapd.http.rawclient), against a real aiohttp server on
a real socket: what the engine receives, what the relay reads back, and which connections
are reused."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from swapd.http.proxy import UPSTREAM_BROKE, forward_headers
from swapd.http.rawclient import RawClient, RawResponse


class Engine:
    """An engine stand-in: records what it got and from which client port."""

    def __init__(self) -> None:
        self.seen: list[dict[str, object]] = []
        self.release = asyncio.Event()
        self.url = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.seen.append({"method": request.method, "path": request.path_qs,
                          "headers": list(request.headers.items()), "body": body,
                          "port": peer[1] if peer else None})
        tail = request.match_info["tail"]
        if tail == "stream":
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(b"data: one\n\n")
            await self.release.wait()  # the relay must see the first event before this
            await resp.write(b"data: two\n\n")
            await resp.write_eof()
            return resp
        if tail == "close":
            resp = web.Response(text="bye")
            resp.force_close()
            return resp
        if tail == "broken":
            resp = web.StreamResponse(headers={"Content-Length": "100"})
            await resp.prepare(request)
            await resp.write(b"only part")
            assert request.transport is not None
            request.transport.abort()
            return resp
        if tail == "empty":
            return web.Response(status=204)
        return web.Response(body=b"answer:" + body, headers={"X-Engine": "yes"})


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    eng = Engine()
    runner = web.AppRunner(eng.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert server is not None
    port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    eng.url = f"http://127.0.0.1:{port}"
    try:
        yield eng
    finally:
        eng.release.set()
        await runner.cleanup()


Target = tuple[str, int, str, str]
Client = tuple[RawClient, Target]


@pytest.fixture
def client(engine: Engine) -> Iterator[Client]:
    """A client and the engine's address as the proxy hands it over."""
    raw = RawClient()
    target = raw.target(engine.url)
    assert target is not None
    yield raw, target
    raw.close()


async def body_of(resp: RawResponse) -> bytes:
    out = b"".join([chunk async for chunk in resp.content.iter_any()])
    resp.release()
    return out


def test_an_aiohttp_whose_protocol_changed_keeps_its_client(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from swapd.http import rawclient

    assert rawclient.COMPATIBLE  # the aiohttp this project installs
    monkeypatch.setattr(rawclient, "COMPATIBLE", False)
    assert RawClient().target("http://127.0.0.1:5800") is None


def test_target_serves_plain_http_only() -> None:
    raw = RawClient()
    assert raw.target("http://127.0.0.1:5800") == ("127.0.0.1", 5800, "127.0.0.1:5800", "")
    assert raw.target("http://localhost/base/") == ("localhost", 80, "localhost", "/base")
    assert raw.target("https://127.0.0.1:5800") is None  # TLS: aiohttp's client
    assert raw.target("http://user:pw@127.0.0.1:5800") is None  # credentials: aiohttp's
    assert raw.target("http://127.0.0.1:99999") is None  # no such port


async def test_the_engine_gets_the_request_as_sent_and_the_connection_is_reused(
        engine: Engine) -> None:
    raw = RawClient()
    target = raw.target(engine.url + "/prefix")
    assert target is not None
    headers = [("Content-Type", "application/json"), ("X-Twice", "a"), ("X-Twice", "b")]
    try:
        for i in range(3):
            resp = await raw.request("POST", target, f"/v1/chat?i={i}", headers, b'{"n": 1}')
            assert (resp.status, resp.reason) == (200, "OK")
            assert resp.headers["X-Engine"] == "yes" and resp.content_length == 15
            assert await body_of(resp) == b'answer:{"n": 1}'
    finally:
        raw.close()
    first = engine.seen[0]
    assert first["method"] == "POST" and first["path"] == "/prefix/v1/chat?i=0"
    got = first["headers"]
    assert isinstance(got, list)
    assert ("X-Twice", "a") in got and ("X-Twice", "b") in got  # repeated headers kept
    assert ("Host", engine.url.removeprefix("http://")) in got
    assert ("Content-Length", "8") in got
    # One connection for all three: the pool handed it back each time.
    assert len({s["port"] for s in engine.seen}) == 1


async def test_a_line_break_in_a_header_or_the_path_is_never_sent(
        engine: Engine, client: Client) -> None:
    raw, target = client
    for path, headers in (("/x", [("X-A", "1\r\nX-Injected: 1")]),
                          ("/x", [("X-A", "1\nGET /y HTTP/1.1")]),
                          ("/x HTTP/1.1\r\nX-Injected: 1\r\n", [])):
        with pytest.raises(ValueError, match="line break"):
            await raw.request("GET", target, path, headers, b"")
    assert await body_of(await raw.request("GET", target, "/x", [("X-A", "1")], b"")) \
        == b"answer:"
    assert len(engine.seen) == 1  # only the last request reached the engine


async def test_a_big_upload_arrives_whole(client: Client) -> None:
    raw, target = client
    body = bytes(range(256)) * 4096  # 1 MiB, past the size sent in one buffer with the head
    resp = await raw.request("POST", target, "/v1/audio/transcriptions", [], body)
    assert await body_of(resp) == b"answer:" + body


async def test_a_stream_arrives_event_by_event(engine: Engine, client: Client) -> None:
    raw, target = client
    resp = await raw.request("GET", target, "/stream", [], b"")
    assert resp.headers["Content-Type"] == "text/event-stream"
    chunks = aiter(resp.content.iter_any())
    assert await asyncio.wait_for(anext(chunks), 10) == b"data: one\n\n"
    engine.release.set()
    assert b"".join([c async for c in chunks]) == b"data: two\n\n"
    resp.release()


async def test_a_connection_the_engine_closes_is_not_reused(engine: Engine, client: Client) -> None:
    raw, target = client
    assert await body_of(await raw.request("GET", target, "/close", [], b"")) == b"bye"
    assert await body_of(await raw.request("GET", target, "/x", [], b"")) == b"answer:"
    assert engine.seen[0]["port"] != engine.seen[1]["port"]
    assert ("Content-Length", "0") not in engine.seen[0]["headers"]  # type: ignore[operator]


async def test_an_engine_dying_mid_body_raises_what_the_relay_handles(client: Client) -> None:
    raw, target = client
    resp = await raw.request("GET", target, "/broken", [], b"")
    with pytest.raises(UPSTREAM_BROKE):
        async for _ in resp.content.iter_any():
            pass
    resp.close()
    # The next request gets a fresh connection and its answer.
    assert await body_of(await raw.request("POST", target, "/x", [], b"1")) == b"answer:1"


async def test_no_body_for_head_and_204(engine: Engine, client: Client) -> None:
    raw, target = client
    resp = await raw.request("HEAD", target, "/x", [], b"")
    assert resp.status == 200 and await body_of(resp) == b""
    resp = await raw.request("GET", target, "/empty", [], b"")
    assert resp.status == 204 and await body_of(resp) == b""
    # Both left the connection reusable.
    assert await body_of(await raw.request("GET", target, "/x", [], b"")) == b"answer:"
    assert len({s["port"] for s in engine.seen}) == 1


async def test_nothing_listening_is_a_client_error() -> None:
    raw = RawClient()
    with socket_on_nothing() as port:
        target = raw.target(f"http://127.0.0.1:{port}")
        assert target is not None
        with pytest.raises(aiohttp.ClientConnectionError, match="cannot connect"):
            await raw.request("GET", target, "/", [], b"")


class socket_on_nothing:
    """A port nothing listens on (bound, never listening, so no one else takes it)."""

    def __enter__(self) -> int:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return int(self.sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


async def test_a_body_that_ends_when_the_engine_closes_is_read_whole() -> None:
    """An engine in HTTP/1.0 style (no Content-Length, no chunks: the body ends at close)."""
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    raw = RawClient()
    try:
        target = raw.target(f"http://127.0.0.1:{port}")
        assert target is not None
        resp = await raw.request("GET", target, "/", [], b"")
        assert await body_of(resp) == b"all of it"
        assert not raw._idle.get((target[0], target[1]))  # a closed connection is not kept
    finally:
        raw.close()
        server.close()
        await server.wait_closed()


def test_what_of_a_clients_headers_reaches_the_engine() -> None:
    """Hop-by-hop headers, the encoding of a body swapd inflated, and `Expect` (swapd read
    the body already) stay behind; end-to-end headers, repeated ones included, go on."""
    client = CIMultiDict([("Host", "swapd:28080"), ("Connection", "keep-alive"),
                          ("Content-Length", "9"), ("Content-Encoding", "gzip"),
                          ("Expect", "100-continue"), ("Transfer-Encoding", "chunked"),
                          ("Accept", "text/event-stream"), ("X-Trace", "1"), ("X-Trace", "2"),
                          ("Authorization", "Bearer k")])
    assert list(forward_headers(client).items()) == [
        ("Accept", "text/event-stream"), ("X-Trace", "1"), ("X-Trace", "2"),
        ("Authorization", "Bearer k")]
    assert "Authorization" not in forward_headers(client, strip_auth=True)

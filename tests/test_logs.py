"""swapd.logs: the LogHub ring buffers and subscribers, the /logs routes, structlog setup."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from swapd.observe import logs
from swapd.observe.logs import ENGINES, LogHub, configure_logging, log_routes, parse_level
from tests.support import gate_middleware, wait_until_async

# -- ring buffers -----------------------------------------------------------------------------


def test_ring_buffers_are_bounded_per_source_and_overall() -> None:
    hub = LogHub(lines_per_source=3)
    for i in range(5):
        hub.append("a", f"a{i}")
    hub.append("swapd", "s0\n")
    assert hub.recent("a") == ["a2", "a3", "a4"]
    assert hub.recent("swapd") == ["s0"]
    assert hub.recent() == ["[a] a3", "[a] a4", "[swapd] s0"]
    assert hub.recent(ENGINES) == ["[a] a2", "[a] a3", "[a] a4"]
    assert hub.recent("nobody") == []
    assert sorted(hub.sources()) == ["a", "swapd"]


def test_also_copies_a_line_into_a_model_buffer() -> None:
    hub = LogHub()
    hub.append("swapd", "engine ready model=m1", also="m1")
    assert hub.recent("swapd") == ["engine ready model=m1"]
    assert hub.recent("m1") == ["[swapd] engine ready model=m1"]
    assert hub.recent() == ["[swapd] engine ready model=m1"]  # once, not twice
    assert hub.recent(ENGINES) == []


def test_long_lines_are_clipped() -> None:
    hub = LogHub()
    hub.append("a", "x" * (logs.MAX_LINE_CHARS + 10))
    (line,) = hub.recent("a")
    assert line.startswith("x" * logs.MAX_LINE_CHARS)
    assert line.endswith("(10 more characters)")


def test_source_count_is_bounded() -> None:
    hub = LogHub(lines_per_source=2, max_sources=3)
    hub.append("swapd", "s")
    for name in ("m1", "m2", "m3", "m4"):
        hub.append(name, name)
    assert "swapd" in hub.sources()
    assert len(hub.sources()) == 3
    assert hub.recent("m4") == ["m4"]


# -- subscribers ------------------------------------------------------------------------------


async def test_subscriber_gets_live_lines_after_recent_ones() -> None:
    hub = LogHub()
    hub.append("m1", "old")
    history = hub.recent("m1")
    async with hub.subscribe("m1") as sub:
        hub.append("m1", "new1")
        hub.append("m2", "other model")
        hub.append("m1", "new2")
        got = [await anext(sub), await anext(sub)]
    assert history + got == ["old", "new1", "new2"]
    assert hub.subscriber_count() == 0


async def test_subscriber_waits_for_lines() -> None:
    hub = LogHub()
    sub = hub.subscribe()
    reader = asyncio.create_task(anext(sub))
    await asyncio.sleep(0)  # let the reader park on its empty queue
    assert not reader.done()
    hub.append("m1", "hello")
    assert await asyncio.wait_for(reader, 5) == "[m1] hello"
    sub.close()


async def test_slow_reader_loses_lines_gets_a_marker_and_never_blocks_append() -> None:
    hub = LogHub(lines_per_source=100_000)
    async with hub.subscribe("m1", queue_size=3) as sub:
        start = time.monotonic()
        for i in range(10_000):
            hub.append("m1", f"l{i}")  # synchronous: it cannot wait for the reader
        assert time.monotonic() - start < 5
        assert sub.dropped == 9_997
        got = [await anext(sub) for _ in range(4)]
        assert got == ["l0", "l1", "l2", "[swapd] ... 9997 lines dropped (slow reader)"]
        hub.append("m1", "after")
        assert await anext(sub) == "after"
    assert len(hub.recent("m1")) == 10_001


async def test_dropping_lasts_until_the_reader_caught_up() -> None:
    hub = LogHub()
    async with hub.subscribe(queue_size=2) as sub:
        for line in ("a", "b", "c"):
            hub.append("x", line)
        assert await anext(sub) == "[x] a"
        hub.append("x", "d")  # a slot is free, but the gap must stay in one place
        assert sub.drain_nowait() == ["[x] b", "[swapd] ... 2 lines dropped (slow reader)"]
        hub.append("x", "e")
        assert await anext(sub) == "[x] e"


async def test_hub_close_ends_iteration() -> None:
    hub = LogHub()
    sub = hub.subscribe("m1")
    hub.append("m1", "last")

    async def collect() -> list[str]:
        return [line async for line in sub]

    task = asyncio.create_task(collect())
    await wait_until_async(lambda: sub._waiter is not None)
    hub.close()
    assert await asyncio.wait_for(task, 5) == ["last"]
    assert hub.subscriber_count() == 0


async def test_append_threadsafe_from_a_worker_thread() -> None:
    hub = LogHub()
    hub.bind(asyncio.get_running_loop())
    async with hub.subscribe("swapd") as sub:
        worker = threading.Thread(target=hub.append_threadsafe, args=("swapd", "from thread"))
        worker.start()
        assert await asyncio.wait_for(anext(sub), 5) == "from thread"
        worker.join()


# -- HTTP routes ------------------------------------------------------------------------------


@pytest.fixture
async def hub_client() -> AsyncIterator[tuple[LogHub, TestClient[web.Request, web.Application]]]:
    hub = LogHub()
    app = web.Application(middlewares=[gate_middleware()])
    app.add_routes(log_routes(hub, known_sources=lambda: ["m1", "m2"], disconnect_poll=0.05))
    async with TestClient(TestServer(app)) as client:
        yield hub, client
    hub.close()


async def test_get_logs_returns_all_recent_lines(
    hub_client: tuple[LogHub, TestClient[web.Request, web.Application]],
) -> None:
    hub, client = hub_client
    resp = await client.get("/logs")
    assert resp.status == 200 and await resp.text() == ""
    hub.append("swapd", "starting")
    hub.append("m1", "loading model")
    resp = await client.get("/logs")
    assert resp.content_type == "text/plain"
    assert await resp.text() == "[swapd] starting\n[m1] loading model\n"


async def read_line(resp: aiohttp.ClientResponse) -> str:
    line = await asyncio.wait_for(resp.content.readline(), 5)
    return line.decode().rstrip("\n")


async def test_stream_all_sends_history_then_live_lines(
    hub_client: tuple[LogHub, TestClient[web.Request, web.Application]],
) -> None:
    hub, client = hub_client
    hub.append("swapd", "one")
    hub.append("m1", "two")
    async with client.get("/logs/stream") as resp:
        assert resp.status == 200
        assert resp.headers["X-Accel-Buffering"] == "no"
        assert resp.headers["Cache-Control"] == "no-cache"
        assert resp.content_type == "text/plain"
        assert [await read_line(resp), await read_line(resp)] == ["[swapd] one", "[m1] two"]
        await wait_until_async(lambda: hub.subscriber_count() == 1)
        hub.append("m2", "three")
        assert await read_line(resp) == "[m2] three"
    await wait_until_async(lambda: hub.subscriber_count() == 0)


async def test_stream_one_model(
    hub_client: tuple[LogHub, TestClient[web.Request, web.Application]],
) -> None:
    hub, client = hub_client
    hub.append("m1", "m1 old")
    hub.append("m2", "m2 old")
    async with client.get("/logs/stream/m1") as resp:
        assert resp.status == 200
        assert await read_line(resp) == "m1 old"
        await wait_until_async(lambda: hub.subscriber_count() == 1)
        hub.append("m2", "not mine")
        hub.append("swapd", "engine ready", also="m1")
        hub.append("m1", "m1 new")
        assert await read_line(resp) == "[swapd] engine ready"
        assert await read_line(resp) == "m1 new"


async def test_stream_known_model_without_lines_and_no_history(
    hub_client: tuple[LogHub, TestClient[web.Request, web.Application]],
) -> None:
    hub, client = hub_client
    hub.append("m2", "history")
    async with client.get("/logs/stream/m2?no-history") as resp:
        assert resp.status == 200
        await wait_until_async(lambda: hub.subscriber_count() == 1)
        hub.append("m2", "live")
        assert await read_line(resp) == "live"


async def test_stream_llama_swap_names(
    hub_client: tuple[LogHub, TestClient[web.Request, web.Application]],
) -> None:
    hub, client = hub_client
    hub.append("swapd", "own line")
    hub.append("m1", "engine line")
    async with client.get("/logs/stream/proxy") as resp:
        assert await read_line(resp) == "own line"
    async with client.get("/logs/stream/upstream") as resp:
        assert await read_line(resp) == "[m1] engine line"


async def test_stream_unknown_model_is_400_openai_shaped(
    hub_client: tuple[LogHub, TestClient[web.Request, web.Application]],
) -> None:
    """400, as llama-swap answers a log source it does not know."""
    hub, client = hub_client
    hub.append("ghost", "a source that is not a configured model")
    resp = await client.get("/logs/stream/ghost")
    assert resp.status == 400
    body = await resp.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "ghost" in body["error"]["message"]


async def test_stream_ends_when_client_disconnects_while_idle(
    hub_client: tuple[LogHub, TestClient[web.Request, web.Application]],
) -> None:
    hub, client = hub_client
    resp = await client.get("/logs/stream")
    await wait_until_async(lambda: hub.subscriber_count() == 1)
    resp.close()  # no line flows: the handler must notice by itself
    await wait_until_async(lambda: hub.subscriber_count() == 0)


async def test_stream_ends_at_hub_close(
    hub_client: tuple[LogHub, TestClient[web.Request, web.Application]],
) -> None:
    hub, client = hub_client
    async with client.get("/logs/stream/m1") as resp:
        await wait_until_async(lambda: hub.subscriber_count() == 1)
        hub.append("m1", "bye")
        hub.close()
        assert await asyncio.wait_for(resp.text(), 5) == "bye\n"


async def test_unknown_sources_without_known_sources_callback() -> None:
    hub = LogHub()
    hub.append("m1", "x")
    app = web.Application(middlewares=[gate_middleware()])
    app.add_routes(log_routes(hub))
    async with TestClient(TestServer(app)) as client:
        assert (await client.get("/logs/stream/nope")).status == 400
        async with client.get("/logs/stream/m1") as resp:
            assert await read_line(resp) == "x"
    hub.close()


# -- structlog --------------------------------------------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    yield
    if logs._handler is not None:
        root.removeHandler(logs._handler)
        logs._handler = None
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.NOTSET)
    structlog.reset_defaults()


def json_lines(buf: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def test_parse_level_maps_llama_swap_names() -> None:
    assert parse_level("warn") == logging.WARNING
    assert parse_level("DEBUG") == logging.DEBUG
    with pytest.raises(ValueError, match="unknown log level"):
        parse_level("loud")


@pytest.mark.usefixtures("restore_logging")
def test_json_output_to_a_non_tty_with_level_filter() -> None:
    buf = io.StringIO()  # not a TTY: JSON lines, as for journald
    configure_logging("warn", stream=buf)
    log = structlog.get_logger("swapd.test")
    log.info("too chatty")
    log.warning("engine ignored SIGTERM", model="m1", pgid=42)
    logging.getLogger("aiohttp.server").error("Error handling request")
    first, second = json_lines(buf)
    assert first["event"] == "engine ignored SIGTERM"
    assert first["level"] == "warning"
    assert first["model"] == "m1" and first["pgid"] == 42
    assert first["logger"] == "swapd.test"
    assert isinstance(first["timestamp"], str)
    assert second["event"] == "Error handling request"
    assert second["logger"] == "aiohttp.server"


@pytest.mark.usefixtures("restore_logging")
def test_events_reach_the_hub_and_a_second_configure_replaces_the_first() -> None:
    hub = LogHub()
    configure_logging("info", stream=io.StringIO(), hub=hub)
    buf = io.StringIO()
    configure_logging("debug", json_output=True, stream=buf, hub=hub)
    log = structlog.get_logger("swapd.engine")
    log.debug("engine state", model="m1", state="starting")
    log.info("listening", address="127.0.0.1:28080")
    assert [e["event"] for e in json_lines(buf)] == ["engine state", "listening"]
    swapd_lines = hub.recent("swapd")
    assert len(swapd_lines) == 2
    assert "engine state" in swapd_lines[0] and "model=m1 state=starting" in swapd_lines[0]
    assert "listening address=127.0.0.1:28080" in swapd_lines[1]
    (m1_line,) = hub.recent("m1")
    assert m1_line.startswith("[swapd] ") and "engine state" in m1_line


@pytest.mark.usefixtures("restore_logging")
def test_exceptions_are_rendered() -> None:
    hub = LogHub()
    buf = io.StringIO()
    configure_logging("info", json_output=True, stream=buf, hub=hub)
    log = structlog.get_logger("swapd.test")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("handler failed")
    (event,) = json_lines(buf)
    assert "RuntimeError: boom" in str(event["exception"])
    assert "RuntimeError: boom" in hub.recent("swapd")[0]


@pytest.mark.usefixtures("restore_logging")
def test_console_renderer_when_asked() -> None:
    buf = io.StringIO()
    configure_logging("info", json_output=False, stream=buf)
    structlog.get_logger("swapd.test").info("hello", model="m1")
    out = buf.getvalue()
    assert "hello" in out and "model" in out and "m1" in out
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)


@pytest.mark.usefixtures("restore_logging")
async def test_log_from_a_worker_thread_reaches_a_live_subscriber() -> None:
    hub = LogHub()
    configure_logging("info", json_output=True, stream=io.StringIO(), hub=hub)
    async with hub.subscribe("swapd") as sub:
        log = structlog.get_logger("swapd.gpu")
        worker = threading.Thread(target=log.info, args=("no NVML, no GPU metrics",))
        worker.start()
        line = await asyncio.wait_for(anext(sub), 5)
        worker.join()
    assert "no NVML, no GPU metrics" in line


async def test_a_bound_hub_takes_other_threads_lines_on_its_loop() -> None:
    """Bound at startup, before any reader: a line from a worker thread is appended by the
    loop (the buffers are the loop's alone), not by the thread that wrote it."""
    hub = LogHub()
    hub.bind(asyncio.get_running_loop())
    worker = threading.Thread(target=hub.append_threadsafe, args=("swapd", "from thread"))
    worker.start()
    worker.join()
    assert hub.recent("swapd") == []  # handed to the loop, not written by the worker
    await wait_until_async(lambda: hub.recent("swapd") == ["from thread"])

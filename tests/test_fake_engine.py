"""The fake engine itself: started as a real subprocess, hit over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support import FAKE_ENGINE as FAKE
from tests.support import free_port, pid_alive, wait_until_async


class Fake:
    """A fake engine process with its output collected line by line."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int) -> None:
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.lines: list[str] = []
        self._changed = asyncio.Condition()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            async with self._changed:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._changed.notify_all()

    async def wait_line(self, needle: str, timeout: float = 10.0) -> str:
        async with asyncio.timeout(timeout), self._changed:
            while True:
                for line in self.lines:
                    if needle in line:
                        return line
                await self._changed.wait()

    async def wait_ready(self, session: aiohttp.ClientSession, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                raise AssertionError(f"fake engine exited: {self.lines}")
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{self.url}/health") as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.02)
        raise AssertionError(f"fake engine not ready in {timeout}s: {self.lines}")

    async def wait_exit(self, timeout: float = 10.0) -> int:
        async with asyncio.timeout(timeout):
            rc = await self.proc.wait()
            await self._reader
        return rc

    def kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


@contextlib.asynccontextmanager
async def start_fake(*args: str) -> AsyncIterator[Fake]:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(FAKE),
        "--port",
        str(port),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    fake = Fake(proc, port)
    try:
        yield fake
    finally:
        fake.kill_group()
        with contextlib.suppress(TimeoutError):
            await fake.wait_exit(5)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def read_record(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_endpoints_and_graceful_sigterm(
    session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    rec = tmp_path / "rec.jsonl"
    env_dump = tmp_path / "env.json"
    async with start_fake(
        "--model-name", "m1", "--record", str(rec), "--env-dump", str(env_dump)
    ) as fake:
        await fake.wait_ready(session)
        await fake.wait_line("listening on port")

        async with session.get(f"{fake.url}/health") as r:
            assert await r.json() == {"status": "ok"}
        async with session.get(f"{fake.url}/v1/models") as r:
            assert [m["id"] for m in (await r.json())["data"]] == ["m1"]

        req = {"model": "alias", "messages": [{"role": "user", "content": "hi"}], "top_k": 5}
        async with session.post(f"{fake.url}/v1/chat/completions", json=req) as r:
            body = await r.json()
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["content"] == "hello from m1"
        assert body["model"] == "alias"
        assert body["x_request"] == req
        assert body["x_pid"] == fake.proc.pid

        async with session.post(f"{fake.url}/v1/completions", json={"prompt": "x"}) as r:
            assert (await r.json())["choices"][0]["text"] == "hello from m1"

        async with session.post(f"{fake.url}/v1/embeddings", json={"input": ["a", "b"]}) as r:
            emb = await r.json()
        assert [len(d["embedding"]) for d in emb["data"]] == [8, 8]
        async with session.post(f"{fake.url}/v1/embeddings", json={"input": "a"}) as r:
            assert (await r.json())["data"][0]["embedding"] == emb["data"][0]["embedding"]

        async with session.post(f"{fake.url}/v1/messages", json={"model": "c"}) as r:
            msg = await r.json()
        assert msg["type"] == "message" and msg["content"][0]["text"] == "hello from m1"

        form = aiohttp.FormData()
        form.add_field("model", "whisper")
        form.add_field("file", b"RIFF....", filename="a.wav")
        async with session.post(f"{fake.url}/v1/audio/transcriptions?x=1", data=form) as r:
            echo = await r.json()
        assert echo["path"] == "/v1/audio/transcriptions"
        assert echo["method"] == "POST"
        assert echo["query"] == "x=1"
        assert echo["content_type"].startswith("multipart/form-data")
        assert 'name="model"' in echo["body"] and "whisper" in echo["body"]

        async with session.delete(f"{fake.url}/some/path") as r:
            assert (await r.json())["method"] == "DELETE"

        async with session.post(f"{fake.url}/slow?seconds=0.05") as r:
            assert (await r.json())["slept"] == 0.05

        await fake.wait_line("request POST /v1/chat/completions")
        fake.proc.send_signal(signal.SIGTERM)
        assert await fake.wait_exit() == 0

    events = read_record(rec)
    assert [e["event"] for e in events] == ["start", "ready", "exit"]
    assert {e["pid"] for e in events} == {fake.proc.pid}
    assert {e["model"] for e in events} == {"m1"}
    assert events[0]["t"] <= events[1]["t"] <= events[2]["t"]
    assert json.loads(env_dump.read_text())["PATH"] == os.environ["PATH"]


async def test_streaming_chat(session: aiohttp.ClientSession) -> None:
    async with start_fake("--stream-tokens", "3") as fake:
        await fake.wait_ready(session)
        req = {"model": "m", "stream": True, "stream_options": {"include_usage": True}}
        async with session.post(f"{fake.url}/v1/chat/completions", json=req) as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            text = await r.text()
        datas = [ln[len("data: ") :] for ln in text.splitlines() if ln.startswith("data: ")]
        assert datas[-1] == "[DONE]"
        chunks = [json.loads(d) for d in datas[:-1]]
        content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:3])
        assert content == "tok0 tok1 tok2 "
        assert chunks[3]["choices"][0]["finish_reason"] == "stop"
        assert chunks[4]["usage"]["completion_tokens"] == 3
        await fake.wait_line("stream done")


async def test_client_disconnect_is_seen(session: aiohttp.ClientSession) -> None:
    async with start_fake("--stream-tokens", "1000", "--token-delay", "0.02") as fake:
        await fake.wait_ready(session)
        req = {"model": "m", "stream": True}
        async with session.post(f"{fake.url}/v1/chat/completions", json=req) as r:
            first = await r.content.readline()
            assert first.startswith(b"data: ")
            r.close()
        await fake.wait_line("stream cancelled")
        async with session.get(f"{fake.url}/health") as r:
            assert r.status == 200


async def test_health_503_then_ok(session: aiohttp.ClientSession, tmp_path: Path) -> None:
    rec = tmp_path / "rec.jsonl"
    async with start_fake("--health-503-for", "1.5", "--record", str(rec)) as fake:
        await fake.wait_line("listening on port")
        async with session.get(f"{fake.url}/health") as r:
            assert r.status == 503
        await fake.wait_ready(session)
        await fake.wait_line("server ready")
        assert [e["event"] for e in read_record(rec)] == ["start", "ready"]


async def test_boot_delay_opens_port_late(session: aiohttp.ClientSession) -> None:
    async with start_fake("--boot-delay", "2") as fake:
        await fake.wait_line("loading model")
        with pytest.raises(aiohttp.ClientConnectionError):
            async with session.get(f"{fake.url}/health"):
                pass
        await fake.wait_ready(session)


async def test_crash_at_startup(tmp_path: Path) -> None:
    rec = tmp_path / "rec.jsonl"
    async with start_fake("--crash-after", "0", "--record", str(rec)) as fake:
        assert await fake.wait_exit() == 3
        assert any("fatal: simulated crash" in line for line in fake.lines)
    assert [e["event"] for e in read_record(rec)] == ["start", "exit"]


async def test_crash_after_second_request(session: aiohttp.ClientSession) -> None:
    async with start_fake("--crash-after", "2") as fake:
        await fake.wait_ready(session)
        for _ in range(2):
            async with session.post(f"{fake.url}/v1/chat/completions", json={}) as r:
                assert r.status == 200
                assert (await r.json())["choices"][0]["message"]["content"] == "hello from fake"
        assert await fake.wait_exit() == 3


async def test_crash_before_answer(session: aiohttp.ClientSession) -> None:
    async with start_fake("--crash-after", "1", "--crash-before-answer") as fake:
        await fake.wait_ready(session)
        with pytest.raises(aiohttp.ClientError):
            async with session.post(f"{fake.url}/v1/chat/completions", json={}) as r:
                await r.read()
        assert await fake.wait_exit() == 3


async def test_crash_mid_stream(session: aiohttp.ClientSession) -> None:
    async with start_fake("--crash-mid-stream", "--stream-tokens", "10") as fake:
        await fake.wait_ready(session)
        got = b""
        with pytest.raises(aiohttp.ClientPayloadError):
            async with session.post(f"{fake.url}/v1/chat/completions", json={"stream": True}) as r:
                async for chunk in r.content.iter_any():
                    got += chunk
        assert got.count(b"data: ") == 2
        assert b"[DONE]" not in got
        assert await fake.wait_exit() == 4


async def test_ignore_sigterm_and_grandchild(
    session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    rec = tmp_path / "rec.jsonl"
    async with start_fake("--ignore-sigterm", "--spawn-grandchild", "--record", str(rec)) as fake:
        line = await fake.wait_line("grandchild pid ")
        gpid = int(line.rsplit(" ", 1)[1])
        assert os.getpgid(gpid) == os.getpgid(fake.proc.pid) == fake.proc.pid
        await fake.wait_ready(session)

        os.killpg(fake.proc.pid, signal.SIGTERM)
        await fake.wait_line("ignoring SIGTERM")
        async with session.get(f"{fake.url}/health") as r:
            assert r.status == 200
        assert pid_alive(gpid)

        fake.kill_group()
        assert await fake.wait_exit() == -signal.SIGKILL
        await wait_until_async(lambda: not pid_alive(gpid), message="grandchild gone")
    grand = [e for e in read_record(rec) if e["event"] == "grandchild"]
    assert grand[0]["child"] == gpid


async def test_exit_on_sigterm_delay(session: aiohttp.ClientSession) -> None:
    async with start_fake("--exit-on-sigterm-delay", "1.5") as fake:
        await fake.wait_ready(session)
        fake.proc.send_signal(signal.SIGTERM)
        await fake.wait_line("received SIGTERM")
        # still serving during the delay
        async with session.get(f"{fake.url}/health") as r:
            assert r.status == 200
        assert await fake.wait_exit() == 0

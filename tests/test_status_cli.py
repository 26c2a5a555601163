"""`swapd status`: why each engine last stopped, by what signal, and its failures, in words."""

from __future__ import annotations

import subprocess
import sys

from swapd.cli import format_status
from tests.support import PY, fake_cmd, model, wait_until

NOW = 1_800_000_000.0


def row(text: str, name: str) -> str:
    [line] = [line for line in text.splitlines() if line.split()[:1] == [name]]
    return line


def test_the_table_says_why_and_how_an_engine_stopped() -> None:
    doc = {
        "version": "1", "listen": "127.0.0.1:28080", "tenant": ["qwen"], "queue": 0,
        "models": {
            "qwen": {"state": "ready", "pid": 4242, "uptime": 75.0, "inflight": 1, "queued": 0,
                     "last_exit": {"reason": "swap", "code": 0, "signal": None, "at": NOW - 900},
                     "failure": None},
            "gemma": {"state": "stopped", "pid": None, "uptime": None, "inflight": 0,
                      "queued": 0, "failure": None,
                      "last_exit": {"reason": "swap", "code": -15, "signal": "SIGTERM",
                                    "at": NOW - 180}},
            "vllm": {"state": "failed", "pid": None, "uptime": None, "inflight": 0, "queued": 0,
                     "last_exit": {"reason": "crash", "code": 1, "signal": None, "at": NOW - 12},
                     "failure": {"reason": "model 'vllm' crashed: exited with code 1",
                                 "count": 4, "retry_at": NOW + 30, "retry_in": 30.0}},
            "idle": {"state": "stopped", "pid": None, "uptime": None, "inflight": 0,
                     "queued": 0, "failure": None,
                     "last_exit": {"reason": "idle", "code": -9, "signal": "SIGKILL",
                                   "at": NOW - 7200}},
            "new": {"state": "stopped", "pid": None, "uptime": None, "inflight": 0, "queued": 0,
                    "last_exit": None, "failure": None},
        },
    }
    text = format_status(doc, now=NOW)
    assert "FAILURES" in text and "LAST STOP" in text
    # No exit code beside a running engine: that exit belongs to an earlier run.
    assert row(text, "qwen").split()[-2:] == ["-", "-"]
    assert "code 0" not in text and "-15" not in text and "-9" not in text
    assert row(text, "gemma").endswith("swap (SIGTERM) 3m ago")
    assert row(text, "idle").endswith("idle (SIGKILL) 2h ago")
    assert "4, retry in 30s" in row(text, "vllm")
    assert row(text, "vllm").endswith("crash (exit 1) 12s ago")
    assert row(text, "new").split()[-2:] == ["-", "-"]
    assert text.splitlines()[-1] == (
        "vllm: failed 4 times, next try in 30s: model 'vllm' crashed: exited with code 1")


def swapd_status(url: str) -> str:
    done = subprocess.run([sys.executable, "-m", "swapd", "status", "--url", url],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_swapd_status_against_a_running_swapd(start_swapd, tmp_path) -> None:
    daemon = start_swapd({"models": {
        "a": model(fake_cmd(name="a")),
        "b": model(fake_cmd("--ignore-sigterm", name="b"), unloadTimeout=1),
        "broken": model(f"{PY} -c 'import sys; sys.exit(3)' ${{PORT}}",
                        restart={"backoffInitial": 60, "backoffMax": 120}),
    }})
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    assert daemon.post("/v1/chat/completions", {"model": "a", **chat})[0] == 200
    assert daemon.post("/v1/chat/completions", {"model": "b", **chat})[0] == 200  # a swap
    assert daemon.post("/models/b/unload")[0] == 200  # b ignores SIGTERM: SIGKILL after 1 s
    assert daemon.post("/v1/chat/completions", {"model": "broken", **chat})[0] == 503
    wait_until(lambda: daemon.status()["models"]["broken"]["failure"], timeout=10,
               message="broken's failure in /status")

    status = daemon.status()["models"]
    assert status["a"]["last_exit"]["reason"] == "swap"
    assert status["b"]["last_exit"]["reason"] == "unload"
    assert status["b"]["last_exit"]["signal"] == "SIGKILL"
    assert status["broken"]["last_exit"]["reason"] == "start_failed"
    assert status["broken"]["failure"]["count"] == 1
    assert 0 < status["broken"]["failure"]["retry_in"] <= 60

    text = swapd_status(daemon.url)
    assert "swap (exit 0)" in row(text, "a")  # the fake engine exits 0 on SIGTERM
    assert "unload (SIGKILL)" in row(text, "b")
    assert "start failed (exit 3)" in row(text, "broken")
    assert "1, retry in" in row(text, "broken")

    # A running engine: no exit beside it.
    assert daemon.post("/v1/chat/completions", {"model": "a", **chat})[0] == 200
    assert row(swapd_status(daemon.url), "a").split()[-2:] == ["-", "-"]

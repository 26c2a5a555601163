"""The daemon's lifecycle (startup → serve → shutdown) with a real swapd process: whatever
ends it, what startup acquired is released."""

from __future__ import annotations

import http.client
import signal
import socket
from collections.abc import Callable
from pathlib import Path

from tests.support import Swapd, fake_cmd, model, pid_alive, wait_until


def test_a_port_in_use_exits_1_with_the_reason_and_leaves_nothing(
    start_swapd: Callable[..., Swapd], tmp_path: Path
) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        record = tmp_path / "engine.jsonl"
        daemon = start_swapd({"models": {"m": model(fake_cmd(name="m", record=record))},
                              "hooks": {"on_startup": {"preload": ["m"]}}},
                             port=port, wait=False)
        assert daemon.proc.wait(30) == 1
    log = daemon.log()
    assert "cannot listen" in log and "Traceback" not in log
    # Startup stopped before preloading: no engine was ever started.
    assert not record.exists()


def test_sigterm_ends_open_log_streams_and_stops_every_engine(
    start_swapd: Callable[..., Swapd], tmp_path: Path
) -> None:
    daemon = start_swapd({"models": {"m": model(fake_cmd(name="m"))}})
    assert daemon.post("/models/m/load")[0] == 200
    pid = daemon.status()["models"]["m"]["pid"]
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=30)
    conn.request("GET", "/logs/stream")
    stream = conn.getresponse()
    assert stream.status == 200
    wait_until(lambda: daemon.status()["models"]["m"]["state"] == "ready")
    daemon.signal(signal.SIGTERM)
    # The reader's stream ends (the hub closes before the server waits for its handlers),
    # the engine is stopped, and swapd exits 0.
    stream.read()
    conn.close()
    assert daemon.proc.wait(30) == 0
    assert not pid_alive(pid)
    assert "swapd stopped" in daemon.log()
